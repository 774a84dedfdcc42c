"""`likeness demo`: teach the bundled small model a shape it has never seen, on the CPU.

The base model (world/base_model) was trained on procedurally rendered scenes of five shapes; the
"moon" shape was held out.  The demo renders four reference scenes with a moon, trains Textual
Inversion on their captions with the shape word replaced by a new word, and writes the embedding
and a before/after grid scored by the world's attribute classifier:

    row 1  the reference images
    row 2  "before": the test prompts with the init word ("circle") in place of the new word
    row 3  "after":  the same prompts, same seeds, with the learned word
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CONCEPT = "moon"
WORD = "sks-moon"
INIT = "circle"
REFERENCE_SEED = 4
TEST_PROMPTS = (
    "a large red {} on a white background, center",
    "a large blue striped {} on a yellow background, top left",
    "a small green dotted {} on a black background, bottom right",
    "a large yellow {} on a blue background, left",
)


def reference_scenes(n: int = 4):
    """Varied colours, patterns and places, one large moon each: what must be learned is the shape."""
    from .world import render as R

    rng = np.random.default_rng(REFERENCE_SEED)
    scenes = []
    while len(scenes) < n:
        s = R.sample_scene(rng, "new", concept=CONCEPT)
        if s.count == "one":
            scenes.append(R.Scene(**{**s.as_dict(), "size": "large"}))
    return scenes


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def _render_row(host, vectors, prompts, size: int, seed: int) -> torch.Tensor:
    from .trainers.textual_inversion import render_preview

    rows = [render_preview(host, WORD, vectors, p, size_hw=(size, size), steps=30, cfg=4.0, seed=seed + i)[0]
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


def run_demo(out: Path, steps: int | None = None, overwrite: bool = False) -> int:
    from .hosts.diffusers import DiffusersHost
    from .trainers import data as D
    from .trainers import formats
    from .trainers.textual_inversion import TIConfig, train_textual_inversion
    from .world import metrics as M
    from .world import render as R
    from .world.model import BASE_MODEL_DIR, RESOLUTION

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out)
    grid_path = out / "before_after.png"
    if grid_path.exists() and not overwrite:
        raise FileExistsError(f"{grid_path} exists; pass --overwrite to replace the demo's output")
    t0 = time.perf_counter()
    host = DiffusersHost.load(BASE_MODEL_DIR, device="cpu")
    scenes = reference_scenes()
    images = torch.stack([_to_tensor(R.render(s)) for s in scenes])
    captions = [R.caption(s).replace(CONCEPT, WORD) for s in scenes]
    data = D.images_from_batch(images, captions)
    print(f"base model: {BASE_MODEL_DIR} ({host.info.family}, {RESOLUTION}px); new word {WORD!r}, "
          f"init {INIT!r}; references:", *[f"  {c}" for c in captions], sep="\n", flush=True)
    cfg = TIConfig(name=WORD, output_dir=out, init_text=INIT, steps=steps or 300, learning_rate=2e-2,
                   batch_size=8, templates="captions", resolution=RESOLUTION, flip=True, save_every=100,
                   preview_every=0, overwrite=overwrite, seed=0)

    def progress(step, total, loss, _img):
        if step % 50 == 0 or step == total:
            print(f"step {step}/{total}  loss {loss if loss is None else round(loss, 4)}", flush=True)

    res = train_textual_inversion(host, data, cfg, progress=progress)
    before_prompts = [p.format(INIT) for p in TEST_PROMPTS]
    after_prompts = [p.format(WORD) for p in TEST_PROMPTS]
    before = _render_row(host, None, before_prompts, RESOLUTION, seed=10)
    after = _render_row(host, res.vectors, after_prompts, RESOLUTION, seed=10)
    refs = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(RESOLUTION, RESOLUTION),
                                           mode="area").permute(0, 2, 3, 1)
    fid_before = M.concept_fidelity(before.permute(0, 3, 1, 2), CONCEPT)
    fid_after = M.concept_fidelity(after.permute(0, 3, 1, 2), CONCEPT)
    sim_before = M.feature_similarity(before.permute(0, 3, 1, 2), images.permute(0, 3, 1, 2))
    sim_after = M.feature_similarity(after.permute(0, 3, 1, 2), images.permute(0, 3, 1, 2))
    png = _grid_png([refs, before, after], [
        f"references: {CONCEPT} (never in the base model's training data)",
        f"before ('{INIT}'): classifier sees a {CONCEPT} in {fid_before:.0%}, similarity {sim_before:.2f}",
        f"after ('{WORD}', {res.steps_done} TI steps): {fid_after:.0%}, similarity {sim_after:.2f}",
    ])
    formats.atomic_write_bytes(grid_path, png)
    print(f"concept fidelity {fid_before:.0%} -> {fid_after:.0%}; feature similarity "
          f"{sim_before:.2f} -> {sim_after:.2f}; {time.perf_counter() - t0:.0f} s in all")
    for f in res.files + [grid_path]:
        print(f"wrote {f}")
    return 0
