"""`likeness demo`: teach the bundled small model a concept it has never seen, on the CPU.

The base model (world/base_model) was trained on procedurally rendered scenes of five shapes and
three fill patterns; the "checked" pattern and the "moon" shape were held out.  The demo renders
four reference scenes of the concept, trains Textual Inversion on their captions with the
concept's word replaced by a new word, and writes the embedding and a before/after grid scored by
the world's attribute classifier:

    row 1  the reference images
    row 2  "before": the test prompts with the init word ("dotted") in place of the new word
    row 3  "after":  the same prompts, same seeds, with the learned word

The default concept is "checked": TI (8 vectors) lifts the classifier's read of it (0 % -> 25 % of
the four test images with the shipped weights; 0.00 -> 0.25 on the benchmark's 32 prompts).  ``--concept moon`` runs the held-out shape, which TI does
*not* teach this base model (0 % -> 0 %): a word's embedding can only steer a UNet among what it can
draw, and this one has drawn five shapes (BENCHMARKS.md, quality benchmark).
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

#: the demo's concepts (``likeness demo`` teaches DEFAULT_CONCEPT); "{}" is where the word goes
DEMOS = {
    "moon": dict(word="sks-moon", init="circle", prompts=(
        "a large red {} on a white background, center",
        "a large blue striped {} on a gray background, top left",
        "a small green dotted {} on a black background, bottom right",
        "a large yellow {} on a blue background, left",
    )),
    "checked": dict(word="sks-checked", init="dotted", prompts=(
        "a large red {} square on a white background, center",
        "a large blue {} heart on a gray background, top left",
        "a large green {} circle on a black background, bottom right",
        "a large yellow {} star on a blue background, left",
    )),
}
DEFAULT_CONCEPT = "checked"
CONCEPT = DEFAULT_CONCEPT
WORD = DEMOS[CONCEPT]["word"]
INIT = DEMOS[CONCEPT]["init"]
TEST_PROMPTS = DEMOS[CONCEPT]["prompts"]
REFERENCE_SEED = 4


def reference_scenes(n: int = 4, concept: str = DEFAULT_CONCEPT):
    """Varied colours, patterns/shapes and places, one large shape each: what must be learned is the concept."""
    from .world import render as R

    rng = np.random.default_rng(REFERENCE_SEED)
    scenes = []
    while len(scenes) < n:
        s = R.sample_scene(rng, "new", concept=concept)
        if s.count == "one":
            scenes.append(R.Scene(**{**s.as_dict(), "size": "large"}))
    return scenes


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def _render_row(host, vectors, prompts, size: int, seed: int, word: str = WORD) -> torch.Tensor:
    from .trainers.preview import render_preview

    rows = [render_preview(host, word, vectors, p, size_hw=(size, size), steps=30, cfg=4.0, seed=seed + i)[0]
            for i, p in enumerate(prompts)]
    return torch.stack(rows)


def _grid_png(rows: list[torch.Tensor], labels: list[str], scale: int = 4) -> bytes:
    """Rows of [N, H, W, 3] images upscaled for viewing, a label above each row."""
    tiles = []
    for row, label in zip(rows, labels):
        arr = (torch.cat(list(row), dim=1).clamp(0, 1).numpy() * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
        band = Image.new("RGB", (img.width, 18), "white")
        ImageDraw.Draw(band).text((4, 3), label, fill="black")
        tiles += [band, img]
    out = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
    y = 0
    for t in tiles:
        out.paste(t, (0, y))
        y += t.height
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def run_demo(out: Path, steps: int | None = None, overwrite: bool = False, concept: str = DEFAULT_CONCEPT) -> int:
    from .hosts.diffusers import DiffusersHost
    from .trainers import data as D
    from .trainers.formats import files
    from .trainers.textual_inversion import TIConfig, train_textual_inversion
    from .world import metrics as M
    from .world import render as R
    from .world.model import BASE_MODEL_DIR, RESOLUTION
    from .world.quality import TI_VECTORS

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if concept not in DEMOS:
        raise ValueError(f"demo concept {concept!r}: choose one of {', '.join(DEMOS)}")
    word, init, test_prompts = DEMOS[concept]["word"], DEMOS[concept]["init"], DEMOS[concept]["prompts"]
    out = Path(out)
    grid_path = out / "before_after.png"
    if grid_path.exists() and not overwrite:
        raise FileExistsError(f"{grid_path} exists; pass --overwrite to replace the demo's output")
    t0 = time.perf_counter()
    host = DiffusersHost.load(BASE_MODEL_DIR, device="cpu")
    scenes = reference_scenes(concept=concept)
    images = torch.stack([_to_tensor(R.render(s)) for s in scenes])
    captions = [R.caption(s).replace(concept, word) for s in scenes]
    data = D.images_from_batch(images, captions)
    print(f"base model: {BASE_MODEL_DIR} ({host.info.family}, {RESOLUTION}px); new word {word!r}, "
          f"init {init!r}; references:", *[f"  {c}" for c in captions], sep="\n", flush=True)
    # four vectors: one does not steer the shipped model to a pattern it never drew (world/quality.py)
    cfg = TIConfig(name=word, output_dir=out, init_text=init, steps=steps or 300, learning_rate=2e-2,
                   num_vectors=TI_VECTORS, batch_size=8, templates="captions", resolution=RESOLUTION, flip=False, save_every=100,
                   preview_every=0, overwrite=overwrite, seed=0)

    def progress(step, total, loss, _img):
        if step % 50 == 0 or step == total:
            print(f"step {step}/{total}  loss {loss if loss is None else round(loss, 4)}", flush=True)

    res = train_textual_inversion(host, data, cfg, progress=progress)
    before_prompts = [p.format(init) for p in test_prompts]
    after_prompts = [p.format(word) for p in test_prompts]
    before = _render_row(host, None, before_prompts, RESOLUTION, seed=10, word=word)
    after = _render_row(host, res.vectors, after_prompts, RESOLUTION, seed=10, word=word)
    refs = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(RESOLUTION, RESOLUTION),
                                           mode="area").permute(0, 2, 3, 1)
    fid_before = M.concept_fidelity(before.permute(0, 3, 1, 2), concept)
    fid_after = M.concept_fidelity(after.permute(0, 3, 1, 2), concept)
    sim_before = M.feature_similarity(before.permute(0, 3, 1, 2), images.permute(0, 3, 1, 2))
    sim_after = M.feature_similarity(after.permute(0, 3, 1, 2), images.permute(0, 3, 1, 2))
    png = _grid_png([refs, before, after], [
        f"references: {concept} (never in the base model's training data; TI from these 4, no flips)",
        f"before ('{init}'): classifier sees a {concept} in {fid_before:.0%}, similarity {sim_before:.2f}",
        f"after ('{word}', {res.steps_done} TI steps): {fid_after:.0%}, similarity {sim_after:.2f}",
    ])
    files.atomic_write_bytes(grid_path, png)
    print(f"concept fidelity {fid_before:.0%} -> {fid_after:.0%}; feature similarity "
          f"{sim_before:.2f} -> {sim_after:.2f}; {time.perf_counter() - t0:.0f} s in all")
    for f in res.files + [grid_path]:
        print(f"wrote {f}")
    return 0
