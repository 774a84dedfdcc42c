"""The shapes world: renderer, captions, splits, classifier, metrics, training script, base model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from likeness.world import render as R
from likeness.world.render import Scene, caption, parse_caption, render, sample_scene


def _scenes(n, seed=0, split="all"):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


# ------------------------------------------------------------------------------------------ renderer
def test_fixed_seed_renders_the_same_image():
    a = [np.asarray(render(s)) for s in _scenes(20, seed=7)]
    b = [np.asarray(render(s)) for s in _scenes(20, seed=7)]
    c = [np.asarray(render(s)) for s in _scenes(20, seed=8)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8


def test_caption_parses_back_to_the_scene():
    for s in _scenes(400, seed=1):
        assert parse_caption(caption(s)) == s.as_dict(), caption(s)
    text = caption(Scene("star", "red", "striped", "blue", "top left", "small", "two"))
    assert text == "two small red striped stars on a blue background, top left"
    assert caption(Scene("circle", "red", background="white"), drop={"size", "position"}) == \
        "a red circle on a white background"


def test_colour_at_the_shape_centre_matches_the_colour_word():
    for s in _scenes(300, seed=2):
        s = Scene(s.shape, s.colour, "solid", s.background, s.position, s.size, s.count)
        img = np.asarray(render(s)).astype(int)
        r = R._RADIUS[s.size]
        for cx, cy in R.shape_centres(s):
            if s.shape == "moon":                         # the bite takes the centre: probe the body
                cx -= 0.7 * r
            px = img[int(cy), int(cx)]
            assert np.abs(px - np.array(R.COLOURS[s.colour])).max() <= 3, (caption(s), px)
        corner = img[0, 0] if s.position != "top left" else img[63, 63]
        assert np.abs(corner - np.array(R.BACKGROUNDS[s.background])).max() <= 3


def test_position_and_count_are_where_the_caption_says():
    for s in _scenes(200, seed=3):
        img = np.asarray(render(s)).astype(int)
        fg = np.abs(img - np.array(R.BACKGROUNDS[s.background])).sum(-1) > 30
        ys, xs = np.nonzero(fg)
        i = R.POSITIONS.index(s.position)
        tol_x = 9 if s.shape == "moon" else 6               # the bite moves a moon's centroid left
        assert abs(xs.mean() - R._CELL[i % 3]) < tol_x and abs(ys.mean() - R._CELL[i // 3]) < 6, caption(s)
        if s.count == "two":     # two blobs: the column through the cell centre is (nearly) empty
            cx = R._CELL[i % 3]
            assert fg[:, cx - 8 - 2:cx - 8 + 3].sum() > fg[:, cx].sum()


def test_train_split_never_has_new_concepts_and_rare_is_rare():
    scenes = _scenes(5000, seed=4, split="train")
    assert not any(s.shape == "moon" or s.pattern == "checked" for s in scenes)
    rare = sum(s.shape == "diamond" for s in scenes) / len(scenes)
    assert 0 < rare < 0.01
    assert all(s.shape == "moon" for s in (sample_scene(np.random.default_rng(i), "new", "moon") for i in range(20)))
    assert all(s.pattern == "checked" for s in (sample_scene(np.random.default_rng(i), "new", "checked") for i in range(20)))
    assert all(s.shape == "diamond" for s in _scenes(20, seed=5, split="rare"))


def test_concept_words_are_single_clip_tokens():
    from likeness.world.model import load_tokenizer, tokenizer_dir
    if not (tokenizer_dir() / "vocab.json").exists():
        pytest.skip("CLIP tokenizer files not shipped")
    tok = load_tokenizer()
    words = (R.SHAPES + [R.PLURAL[s] for s in R.SHAPES if s != "triangle"] + list(R.COLOURS)
             + R.PATTERNS + list(R.BACKGROUNDS) + R.SIZES + ["two", "top", "bottom", "left", "right", "center"])
    for w in words:
        assert len(tok.tokenize(w)) == 1, w


# ------------------------------------------------------------------------------------------ classifier
@pytest.fixture(scope="module")
def held_out():
    scenes = _scenes(400, seed=12345, split="all")            # the classifier trained on seeds 100/101
    return scenes, [render(s) for s in scenes]


def test_classifier_held_out_accuracy(held_out):
    from likeness.world.classifier import CLASSIFIER_PATH, predict
    if not CLASSIFIER_PATH.exists():
        pytest.skip("world/classifier.safetensors not trained yet")
    scenes, images = held_out
    preds = predict(images)
    for k in R.ATTRIBUTES:
        acc = np.mean([p[k] == getattr(s, k) for p, s in zip(preds, scenes)])
        assert acc >= 0.9, (k, acc)


def test_metrics_behave(held_out):
    from likeness.world import metrics
    from likeness.world.classifier import CLASSIFIER_PATH
    if not CLASSIFIER_PATH.exists():
        pytest.skip("world/classifier.safetensors not trained yet")
    scenes, images = held_out
    moons = [render(sample_scene(np.random.default_rng(i), "new", "moon")) for i in range(16)]
    assert metrics.concept_fidelity(moons, "moon") >= 0.9
    assert metrics.concept_fidelity(images[:50], "moon") < 0.4
    assert metrics.prompt_fidelity(images, [caption(s) for s in scenes]) >= 0.9
    assert metrics.diversity([images[0]] * 4) == pytest.approx(0.0, abs=1e-5)
    assert metrics.diversity(images[:32]) > 0.2
    assert metrics.feature_similarity(images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    assert metrics.feature_similarity(moons[:8], moons[8:]) > metrics.feature_similarity(moons[:8], images[:50])
    acc = metrics.attribute_accuracy(images, [caption(s) for s in scenes])
    assert set(acc) == set(R.ATTRIBUTES) and min(acc.values()) >= 0.9


# ------------------------------------------------------------------------------------------ training script
def test_training_script_runs_end_to_end(tmp_path, monkeypatch):
    from devtools.world import train_base
    from likeness.world.model import tokenizer_dir
    if not (tokenizer_dir() / "vocab.json").exists():
        pytest.skip("CLIP tokenizer files not shipped")
    monkeypatch.setattr(train_base, "QUICK", dict(train_base.QUICK, vae_images=8, vae_steps=2, vae_batch=4,
                                                  unet_images=8, unet_steps=2, unet_batch=4, dec_steps=2,
                                                  pos_phases="high:2:1e-3,weighted:1:5e-4,plain:1:2.5e-4"))
    dest = tmp_path / "pipe"
    blocks = ["CrossAttnDownBlock2D"] * 3             # an architecture override reaches the saved UNet
    train_base.main(["--stage", "all", "--out", str(tmp_path / "run"), "--dest", str(dest),
                     "--unet-config", json.dumps({"down_block_types": blocks})])
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (dest / sub).is_dir()
    assert json.loads((dest / "unet" / "config.json").read_text())["down_block_types"] == blocks
    log = (tmp_path / "run" / "train.log").read_text()
    assert "[unet] done" in log and "[position] done: 4 steps in 3 phases" in log
    from safetensors.torch import load_file       # the pipeline carries stage 2c's weights, not stage 2's
    shipped = load_file(dest / "unet" / "diffusion_pytorch_model.safetensors")
    pos = load_file(tmp_path / "run" / "unet_pos" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], pos[k].half()) for k in pos)
    img = train_base.sample(dest, ["a red circle"], steps=2)[0]
    assert img.size == (train_base.M.RESOLUTION,) * 2
    # a new stage 2 makes stage 2c's output stale: the next save must not pick it up
    train_base.main(["--stage", "unet", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "unet_pos").exists() and not (tmp_path / "run" / "text_encoder_pos").exists()


def test_position_phases_parse_and_reject_unknown_losses():
    from devtools.world.train_base import POSITION_PHASES, parse_phases
    assert parse_phases("high:800:1e-3,plain:400:2.5e-4") == [("high", 800, 1e-3), ("plain", 400, 2.5e-4)]
    assert [p[0] for p in parse_phases(POSITION_PHASES)][0] == "high"
    with pytest.raises(ValueError, match="not one of high, weighted, plain"):
        parse_phases("x0:800:1e-3")


def test_attribute_probe_reads_the_words_each_caption_states():
    """Training a text encoder through the probes makes a stated attribute readable from its
    states — the pressure that keeps position words from fading in stage 2c."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from devtools.world.architecture import TEXT_CONFIG
    from devtools.world.text_probe import AttributeProbe
    from likeness.world.model import load_tokenizer, tokenizer_dir
    if not (tokenizer_dir() / "vocab.json").exists():
        pytest.skip("CLIP tokenizer files not shipped")
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**dict(TEXT_CONFIG, num_hidden_layers=1)))
    probe, tok = AttributeProbe(te.config.hidden_size), load_tokenizer()
    eos = te.config.eos_token_id

    def batch(seed, n=32):
        rng = np.random.default_rng(seed)
        caps = [R.sample_caption(s, rng, 0.2) for s in _scenes(n, seed)] + [""]
        return caps, tok(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids

    def position_accuracy():
        caps, ids = batch(999, 128)
        with torch.no_grad():
            logits = probe.heads["position"](probe.features(te(ids).last_hidden_state, ids, eos))
        said = [(i, parse_caption(c)["position"]) for i, c in enumerate(caps) if c and "position" in parse_caption(c)]
        return np.mean([R.POSITIONS[int(logits[i].argmax())] == p for i, p in said])

    caps, ids = batch(0)
    f = probe.features(te(ids).last_hidden_state, ids, eos)
    assert f.shape == (len(caps), 2 * te.config.hidden_size)
    empty = probe.loss(te(ids[-1:]).last_hidden_state, ids[-1:], [""], eos)
    assert empty.item() == 0.0 and empty.requires_grad          # the unconditional caption states nothing
    before = position_accuracy()
    opt = torch.optim.Adam(list(te.parameters()) + list(probe.parameters()), lr=3e-3)
    for step in range(100):
        caps, ids = batch(step + 1)
        loss = probe.loss(te(ids).last_hidden_state, ids, caps, eos)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 0.4 and position_accuracy() > 0.9, (before, position_accuracy())


def test_timestep_weights_favour_high_noise_and_keep_the_mean():
    from devtools.world.architecture import build_scheduler
    from devtools.world.train_base import timestep_weights
    acp = build_scheduler().alphas_cumprod
    assert torch.equal(timestep_weights(acp, 0.0), torch.ones_like(acp))      # plain SD loss
    w = timestep_weights(acp, 20.0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert bool((w[1:] >= w[:-1]).all())                                     # more weight as noise grows
    assert w.max().item() / w.min().item() == pytest.approx(20.0 * acp[0].item(), rel=1e-4)   # the cap bounds it
    assert w[-1].item() == pytest.approx(w[800].item())                      # capped at high noise


# ------------------------------------------------------------------------------------------ base model
def test_base_model_loads_offline_and_samples(monkeypatch):
    from likeness.world.model import BASE_MODEL_DIR, RESOLUTION, load_pipeline
    if not (BASE_MODEL_DIR / "model_index.json").exists():
        pytest.skip("world/base_model not trained yet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline()            # the folder's tokenizer is the package's shipped BPE files
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle on a white background", num_inference_steps=4,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (RESOLUTION, RESOLUTION)       # the pipeline's default size is the model's
    total = sum(f.stat().st_size for f in BASE_MODEL_DIR.rglob("*") if f.is_file())
    assert total <= 20 * 1024 * 1024


def test_base_model_keeps_no_copy_of_the_shipped_tokenizer():
    """The BPE files are the package's (hosts' shipped CLIP tokenizer); the model folder names only
    its pad token, and its loader reads the shipped files."""
    from likeness.world.model import BASE_MODEL_DIR, load_tokenizer, tokenizer_dir
    folder = BASE_MODEL_DIR / "tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer_config.json"]
    if not (tokenizer_dir() / "vocab.json").exists():
        pytest.skip("CLIP tokenizer files not shipped")
    tok = load_tokenizer()
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407] and tok.pad_token == "<|endoftext|>"


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluation_samples_at_the_models_resolution():
    """The first evaluations sampled 64 px (16×16 latents the UNet never saw) and read shapes at chance."""
    from devtools.world import evaluate_base as E
    from devtools.world.architecture import SCHEDULER_CONFIG
    from likeness.world.model import RESOLUTION
    seen = {}

    class FakePipe:
        class scheduler:
            config = dict(SCHEDULER_CONFIG, _class_name="DDPMScheduler")

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, prompts, height, width, **kw):
            seen.update(height=height, width=width)
            return type("Out", (), {"images": [None] * len(prompts)})()

    E.generate(FakePipe(), ["a red circle"] * 3, steps=2)
    assert seen == {"height": RESOLUTION, "width": RESOLUTION}


def test_evaluation_markdown_block_is_replaced(tmp_path):
    from devtools.world import evaluate_base as E
    res = {"n": 4, "steps": 25, "guidance": 4.0, "seed": 0, "time_s": 3.0, "prompt_fidelity": 0.5,
           "all_attributes_right": 0.25, "diversity": 0.3,
           "per_attribute_accuracy": {k: 0.5 for k in R.ATTRIBUTES},
           "ceilings": {"vae_round_trip": {k: 0.9 for k in R.ATTRIBUTES}, "renders_32px": {k: 1.0 for k in R.ATTRIBUTES}}}
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n")
    E.write_markdown(md, res, "cmd")
    E.write_markdown(md, dict(res, prompt_fidelity=0.75), "cmd")
    text = md.read_text()
    assert text.count(E.MARK_START) == 1 and "**0.75**" in text and "| shape | 0.20 | **0.50** | 0.90 | 1.00 |" in text
