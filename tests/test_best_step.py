"""Best step: the pick on a synthetic metric curve (subject fidelity rises, diversity collapses),
the parameters it restores, ties, and the trainers' ``<name>.best.*`` files and checks."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from likeness.trainers import best_step as BS
from likeness.trainers import data as D
from likeness.trainers import loop
from likeness.trainers.dreambooth import DreamBoothConfig, train_dreambooth
from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion


class MeanColour:
    """An image encoder whose embedding is an image's mean colour: the tests choose embeddings by
    choosing colours."""

    tower = "test:mean-colour"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return images[..., :3].float().mean((1, 2))


SUBJECT = torch.tensor([1.0, 0.0, 0.0])
#: one direction per evaluation prompt, orthogonal to the subject: what a model that still
#: follows the prompt draws
CONTEXTS = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def colour_images(colours: torch.Tensor, size: int = 4) -> torch.Tensor:
    return colours[:, None, None, :].expand(len(colours), size, size, 3).clone()


def synthetic_run(theta: torch.Tensor):
    """A "model" with one parameter theta (the training progress, 0..1): its image for prompt k
    is theta * subject + (1 - theta) * context k, so CLIP-I rises with theta while diversity
    falls to 0 (every prompt gives the training photo)."""
    def sample(prompts, seeds):
        t = float(theta)
        return colour_images(t * SUBJECT + (1 - t) * CONTEXTS[: len(prompts)])

    refs = colour_images(SUBJECT[None].repeat(3, 1))
    return BS.BestStep(BS.Encoders(MeanColour()), refs, sample, ["p1", "p2", "p3", "p4"], [theta])


def expected_score(t: float) -> float:
    """The combined score of the synthetic model, by hand: CLIP-I = cos(g_k, subject) =
    t / r with r = sqrt(t^2 + (1-t)^2); the pairwise cosines are (t^2 + (1-t)^2 c) / r^2 with c the
    contexts' cosine (0 for 4 of the 6 pairs, -1 for 2), so diversity = mean(1 - cos)."""
    r2 = t * t + (1 - t) ** 2
    clip_i = t / math.sqrt(r2)
    cosines = [t * t / r2] * 4 + [(t * t - (1 - t) ** 2) / r2] * 2
    div = sum(1 - c for c in cosines) / 6
    return math.sqrt(clip_i * div)


def test_best_step_picks_the_peak_of_a_synthetic_curve_not_the_last_step():
    theta = torch.zeros(1)
    best = synthetic_run(theta)
    for step in range(1, 11):
        theta.fill_(step / 10)
        best(step)
    scores = [p.score for p in best.points]
    assert scores == pytest.approx([expected_score(s / 10) for s in range(1, 11)], abs=1e-5)
    peak = max(range(10), key=lambda i: scores[i]) + 1
    assert 1 < peak < 10  # the curve rises, then overfitting (theta -> 1) brings it down
    assert best.best.step == peak
    assert best.points[-1].score == pytest.approx(0.0, abs=1e-6)  # diversity has collapsed
    with best.swapped() as point:
        assert point.step == peak and float(theta) == pytest.approx(peak / 10)
    assert float(theta) == pytest.approx(1.0)  # the last values come back


def test_a_tie_keeps_the_earlier_step_and_no_score_means_no_pick():
    theta = torch.zeros(1)
    best = synthetic_run(theta)
    theta.fill_(0.5)
    best(2)
    best(4)  # the same model again: the same score
    assert best.best.step == 2
    empty = synthetic_run(torch.zeros(1))
    with pytest.raises(RuntimeError, match="no best step"):
        with empty.swapped():
            pass


def test_the_loop_evaluates_every_n_steps_and_at_the_end_and_times_it_apart():
    class Counter:
        def __init__(self):
            self.w = torch.zeros(1, requires_grad=True)

        def parameters(self):
            return [self.w]

        def loss(self, step):
            return (self.w - 1).pow(2).sum()

    seen = []
    cfg = loop.LoopConfig(steps=7, learning_rate=0.1, eval_every=3)
    res = loop.run(Counter(), cfg, device=torch.device("cpu"), compute_dtype=torch.float32, save=lambda s: None,
                   evaluate=seen.append)
    assert seen == [3, 6, 7]
    assert 0 <= res.eval_seconds <= res.seconds


def test_default_prompts_and_the_dreambooth_identifier():
    assert BS.parse_prompts("", "style") == list(BS.DEFAULT_PROMPTS["style"])
    assert BS.parse_prompts("a {} hat\n\n  {} at night ", "object") == ["a {} hat", "{} at night"]
    assert BS.fill(["{}, on a beach"], "a photo of sks dog") == ["a photo of sks dog, on a beach"]
    assert BS.identifier("a photo of sks dog", "a photo of a dog") == ("sks", "dog")
    assert BS.identifier("a photo of sks_lk dog", "") == ("sks_lk", "dog")
    assert BS.identifier("sks dog", "a dog") == ("sks", "dog")
    # a caption-like instance prompt: the one word the class prompt swaps (the world's captions)
    assert BS.identifier("a red sks-moon on a blue background, left", "a red shape on a blue background, left") == (
        "sks-moon", "shape")


# ------------------------------------------------------------------------- the trainers' files


def training_images(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return D.images_from_batch(torch.rand(n, size, size, 3, generator=g))


def test_dreambooth_writes_the_best_lora_beside_the_last_and_outputs_it(tiny_sd1_host, tmp_path):
    cfg = DreamBoothConfig(name="subject", output_dir=tmp_path, instance_prompt="a photo of sks_lk dog", steps=4,
                           save_every=0, preview_every=0, eval_every=2, eval_steps=2, eval_prompts="{}\n{}, at night")
    points = []
    res = train_dreambooth(tiny_sd1_host, training_images(), cfg, encoders=BS.Encoders(MeanColour()),
                           on_point=points.append)
    ev = res.evaluation
    assert [p.step for p in ev.points] == [2, 4] and [p.step for p in points] == [2, 4]
    assert ev.best.step == max(ev.points, key=lambda p: p.score).step
    assert ev.seconds > 0 and "diversity" in ev.formula
    assert [f.name for f in ev.files] == ["subject.best.safetensors"]
    written = safetensors.torch.load_file(ev.files[0])
    best_layers = res.pick("best")["lora_layers"]
    name, (down, up, alpha) = next(iter(best_layers.items()))
    key = next(k for k in written if k.endswith("lora_down.weight"))
    assert any(torch.allclose(written[k].float(), d, atol=1e-3) for k in written if k.endswith("lora_down.weight")
               for d in [lay[0] for lay in best_layers.values()]), key
    assert res.pick("last")["lora_layers"] is res.lora_layers
    if ev.best.step == 2:  # the best snapshot is not the last step's
        assert not torch.equal(best_layers[name][1], res.lora_layers[name][1])


def test_an_existing_best_file_is_refused_before_any_work(tiny_sd1_host, tmp_path):
    (tmp_path / "subject.best.safetensors").write_bytes(b"the user's file")
    cfg = DreamBoothConfig(name="subject", output_dir=tmp_path, instance_prompt="a photo of sks_lk dog", steps=2,
                           save_every=0, preview_every=0, eval_every=1)
    with pytest.raises(Exception, match="subject.best"):
        train_dreambooth(tiny_sd1_host, training_images(), cfg, encoders=BS.Encoders(MeanColour()))
    assert (tmp_path / "subject.best.safetensors").read_bytes() == b"the user's file"
    assert not (tmp_path / "subject.safetensors").exists()


def test_eval_every_without_an_image_encoder_is_refused_before_any_work(tiny_sd1_host, tmp_path):
    cfg = TIConfig(name="thing_lk", output_dir=tmp_path, steps=2, save_every=0, preview_every=0, eval_every=1)
    with pytest.raises(ValueError, match="eval_every needs an image encoder"):
        train_textual_inversion(tiny_sd1_host, training_images(), cfg)
    assert not list(tmp_path.iterdir())


def test_textual_inversion_keeps_the_best_embedding(tiny_sd1_host, tmp_path):
    cfg = TIConfig(name="thing_lk", output_dir=tmp_path, steps=3, save_every=0, preview_every=0, eval_every=1,
                   eval_steps=2, eval_prompts="a photo of {}\n{} at night")
    res = train_textual_inversion(tiny_sd1_host, training_images(), cfg, encoders=BS.Encoders(MeanColour()))
    ev = res.evaluation
    assert [p.step for p in ev.points] == [1, 2, 3]
    assert sorted(f.name for f in ev.files) == ["thing_lk.best.pt", "thing_lk.best.safetensors"]
    saved = safetensors.torch.load_file(tmp_path / "thing_lk.best.safetensors")
    assert torch.allclose(saved["emb_params"].float(), res.pick("best")["clip_l"], atol=1e-6)
    assert res.pick("last") is res.vectors


class Stop(BaseException):
    """What ComfyUI's Cancel is: a BaseException out of the progress callback."""


def test_a_resumed_run_keeps_its_best_so_far(tiny_sd1_host, tmp_path):
    """Stopped at step 6 and resumed, a run evaluates and picks exactly as the run never stopped:
    the points before the stop come back from the run state, and so do the best parameters
    (fp32), so the ``.best`` file is the same."""
    def cfg(out, **kw):
        return TIConfig(name="thing_lk", output_dir=out, steps=9, learning_rate=5e-2, save_every=4, preview_every=0,
                        eval_every=2, eval_steps=2, eval_prompts="a photo of {}\n{} at night", seed=3, **kw)

    def stop_at_6(step, total, loss, img):
        if step == 6:
            raise Stop()

    enc, imgs = BS.Encoders(MeanColour()), training_images()
    whole = train_textual_inversion(tiny_sd1_host, imgs, cfg(tmp_path / "a"), encoders=enc).evaluation
    with pytest.raises(Stop):
        train_textual_inversion(tiny_sd1_host, imgs, cfg(tmp_path / "b"), encoders=enc, progress=stop_at_6)
    res = train_textual_inversion(tiny_sd1_host, imgs, cfg(tmp_path / "b", resume="latest"), encoders=enc)
    ev = res.evaluation
    assert res.resumed_from == 6
    assert [(p.step, p.score) for p in ev.points] == [(p.step, p.score) for p in whole.points]  # 2, 4, 6, 8, 9
    assert ev.best.step == whole.best.step
    assert torch.equal(res.pick("best")["clip_l"], whole.state["vectors"]["clip_l"])
    best = [safetensors.torch.load_file(d / "thing_lk.best.safetensors")["emb_params"] for d in (tmp_path / "a",
                                                                                             tmp_path / "b")]
    assert torch.equal(best[0], best[1])


def test_the_tracking_is_fp32_in_the_state_and_refused_for_other_prompts():
    theta = torch.tensor(0.3)
    tracker = synthetic_run(theta)
    tracker(1)
    theta.fill_(0.9)
    tracker(2)
    tensors, head = tracker.state()
    assert tracker.best.step == (1 if expected_score(0.3) > expected_score(0.9) else 2)
    assert tensors["best.0"].dtype == torch.float32 and head["best"] == tracker.best.step
    again = synthetic_run(torch.tensor(0.5))
    again.load_state(tensors, head)
    assert [p.step for p in again.points] == [1, 2] and again.best.step == tracker.best.step
    with again.swapped():
        assert float(again.params[0]) == pytest.approx(0.3 if tracker.best.step == 1 else 0.9)
    other = synthetic_run(torch.tensor(0.5))
    other.prompts = ["p1", "p2", "p3", "other"]  # scores of other prompts do not compare
    other.load_state(tensors, head)
    assert other.points == [] and other.best is None


# ------------------------------------------------------------------------------------- the CLI


def tiny_clip_and_dino(folder):
    """A full CLIPModel (both towers, the shipped tokenizer) and a DINOv2 model, tiny and random,
    saved as the local transformers folders --clip and --dino take."""
    from transformers import (CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model)

    from likeness.hosts.diffusers import CLIP_TOKENIZER_DIR

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder / "clip")
    CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)).save_pretrained(folder / "clip")
    Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4)).save_pretrained(folder / "dino")
    return folder / "clip", folder / "dino"


def test_cli_dreambooth_eval_every_writes_the_best_lora_and_the_curves(tiny_sd1_host, tmp_path, capsys):
    import tiny_models
    from PIL import Image

    from likeness import cli

    model = tiny_models.save_diffusers_folder(tiny_models.host_parts(tiny_sd1_host), tmp_path / "tiny-sd1")
    clip, dino = tiny_clip_and_dino(tmp_path)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, im in enumerate(training_images().images):
        Image.fromarray((im.numpy() * 255).round().astype("uint8")).save(imgs / f"{i}.png")
    out = tmp_path / "out"
    args = ["dreambooth", "--model", str(model), "--images", str(imgs), "--name", "subj", "--steps", "4",
            "--preview-every", "0", "--out", str(out), "--device", "cpu", "--instance-prompt", "a photo of sks dog",
            "--eval-every", "2", "--eval-steps", "2", "--eval-prompt", "{}", "--eval-prompt", "{} at night",
            "--clip", str(clip), "--dino", str(dino)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "eval step 2:" in printed and "eval step 4:" in printed
    assert "CLIP-T" in printed and "DINO" in printed  # both towers of the one folder; DINO from --dino
    assert "best step" in printed and "training alone" in printed
    assert (out / "subj.safetensors").is_file() and (out / "subj.best.safetensors").is_file()
    assert Image.open(out / "subj.curves.png").size == (640, 320)
    assert cli.main(args[:-4] + ["--dino", str(dino)]) == 2  # --dino without --clip
    assert "--dino needs --clip" in capsys.readouterr().err
