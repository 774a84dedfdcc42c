"""The quality benchmark (issue 5): does a personalization method teach the shapes-world base model
a concept it has never seen, from four reference images?

    likeness bench quality [--concepts moon checked] [--methods base ti] [--markdown BENCHMARKS.md]
    python bench/quality.py ...                                   (the same, without the CLI)

For each concept (the world's NEW concepts by default: the shape ``moon`` and the pattern
``checked``, never in the base model's training captions), four reference scenes are rendered
(one large shape each, varied colour / pattern-or-shape / background / position) and every
registered method learns the concept from them.  Each method returns a ``Learned``: the word that
stands for the concept in a prompt and a ``sample`` function.  Held-out test prompts (the same for
every method: other colours, backgrounds, positions, sizes) are sampled with fixed seeds and read
by the world classifier (``world/metrics.py``):

* concept fidelity   — the fraction of samples in which the classifier sees the concept
* concept prob.      — the classifier's mean probability of the concept (a smoother fidelity)
* feature similarity — mean cosine of classifier embeddings to the references (CLIP-I / DINO)
* prompt fidelity    — the fraction of the prompt's *other* attributes the classifier finds (CLIP-T)
* diversity          — mean pairwise cosine distance of the samples' embeddings
* train time         — the method's wall time on this machine (sampling excluded)

The ``base`` row is the base model prompted with the concept's own word ("moon"), which it never
saw: the baseline every method must beat.

Methods are a registry, ``METHODS``: name → ``callable(host, refs, concept, out_dir, opts)``
returning a ``Learned``.  Textual Inversion is registered here; DreamBooth-LoRA / full / pivotal
and SeedSelect (for the rare concept ``diamond``) are added with ``register("name")`` and then
appear as rows.  Results are kept (as JSON, inside the marker block of the markdown file) per
(concept, method), so a run of one method replaces only its own rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import metrics as MET
from . import render as R
from .model import BASE_MODEL_DIR, RESOLUTION

MARK_START = "<!-- likeness-bench-quality:start -->"
MARK_END = "<!-- likeness-bench-quality:end -->"

#: per concept: the learned word, the init word for TI (an existing word of the same attribute)
CONCEPTS = {
    "moon": dict(word="sks-moon", init="circle"),
    "checked": dict(word="sks-checked", init="dotted"),
    "diamond": dict(word="sks-diamond", init="square"),     # the RARE concept (SeedSelect's)
}
DEFAULT_CONCEPTS = ("moon", "checked")
REFERENCE_SEED = 11
TEST_SEED = 2024


# --------------------------------------------------------------------------------------- data
@dataclass
class References:
    concept: str
    scenes: list
    images: torch.Tensor          # [4, 64, 64, 3] the crisp renders (feature-similarity anchors)
    images_model: torch.Tensor    # [4, 32, 32, 3] box-filtered to the model's resolution (training input)

    def captions(self, word: str) -> list[str]:
        """The references' captions with the concept's word replaced by ``word``."""
        return [concept_caption(s, self.concept, word) for s in self.scenes]


def concept_caption(scene, concept: str, word: str) -> str:
    """``render.caption`` with the concept's word said as ``word`` (count is always one here)."""
    attr = MET.concept_attribute(concept)
    text = R.caption(scene)
    return re.sub(rf"\b{re.escape(getattr(scene, attr))}\b", word, text, count=1)


def _to_hw3(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255.0) for im in images])


def _split(concept: str) -> str:
    if concept in R.NEW_CONCEPTS:
        return "new"
    if concept == R.RARE_CONCEPT[1]:
        return "rare"
    raise ValueError(f"concept {concept!r}: choose one of {list(R.NEW_CONCEPTS) + [R.RARE_CONCEPT[1]]}")


def _scenes(concept: str, n: int, seed: int, large: bool) -> list:
    """``n`` scenes of the concept with one shape each (plural forms are a different word)."""
    rng = np.random.default_rng(seed)
    split = _split(concept)
    out = []
    while len(out) < n:
        s = R.sample_scene(rng, split, concept=concept if split == "new" else None)
        if s.count != "one":
            continue
        out.append(R.Scene(**{**s.as_dict(), "size": "large"}) if large else s)
    return out


def references(concept: str, n: int = 4, seed: int = REFERENCE_SEED) -> References:
    scenes = _scenes(concept, n, seed, large=True)
    imgs = _to_hw3([R.render(s) for s in scenes])
    small = torch.nn.functional.avg_pool2d(imgs.permute(0, 3, 1, 2), imgs.shape[1] // RESOLUTION)
    return References(concept, scenes, imgs, small.permute(0, 2, 3, 1).contiguous())


def test_scenes(concept: str, n: int = 32, seed: int = TEST_SEED) -> list:
    """Held-out prompts' scenes (a different seed from the references; sizes vary)."""
    return _scenes(concept, n, seed, large=False)


# --------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_prompts(host, prompts: list[str], seed: int = 0, *, placeholder: str | None = None,
                   vectors: dict | None = None, steps: int = 25, cfg: float = 4.0, batch: int = 32) -> torch.Tensor:
    """One image per prompt, [N, H, W, 3] in [0, 1], at the model's resolution; image i's noise
    depends only on (seed, i // batch), so every method sees the same noise for the same prompt."""
    from ..trainers import data as D
    from ..trainers.diff_sampling import sample_euler

    size = (RESOLUTION, RESOLUTION)
    f = host.latent_scale
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        meta = [D.ImageMeta(size, (0, 0), size)] * len(chunk)
        use = placeholder if (placeholder and vectors is not None) else None
        cond = host.encode_text(chunk, use, vectors if use else None, meta)
        uncond = host.encode_text([""] * len(chunk), None, None, meta)
        lat = sample_euler(host, cond, uncond, shape=(len(chunk), host.latent_channels, size[0] // f, size[1] // f),
                           steps=steps, cfg=cfg, seed=seed + i)
        out.append(host.decode_latents(lat))
    return torch.cat(out)


# --------------------------------------------------------------------------------------- methods
@dataclass
class Learned:
    """What a method hands back: the concept's word in prompts and how to sample with it."""
    word: str
    sample: Callable[[list[str], int], torch.Tensor]     # (prompts with the word, seed) -> [N, H, W, 3]
    seconds: float                                       # training wall time
    steps: int | None = None
    files: list = field(default_factory=list)
    note: str = ""


#: (host, refs: References, concept, out_dir: Path, opts: dict) -> Learned.  ``opts`` holds the run's
#: knobs (``seed``, ``sample_steps``, ``ti_steps``, ...); a method reads what it knows and ignores the rest.
MethodFn = Callable[..., Learned]
METHODS: dict[str, MethodFn] = {}
METHOD_NOTES: dict[str, str] = {}


def register(name: str, note: str = ""):
    """Add a method row: ``@register("dreambooth-lora")`` on ``fn(host, refs, concept, out_dir, opts)``."""
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        METHOD_NOTES[name] = note
        return fn
    return deco


@register("base", "the base model prompted with the concept's own word (never trained; 'diamond': 0.5 % of training)")
def base_method(host, refs: References, concept: str, out_dir: Path, opts: dict) -> Learned:
    steps = opts.get("sample_steps", 25)
    return Learned(word=concept, sample=lambda prompts, seed: sample_prompts(host, prompts, seed, steps=steps),
                   seconds=0.0, steps=0)


#: Textual Inversion's vectors per concept word.  Eight, not one: the shipped base model draws only
#: the patterns it was trained on, and a word's embedding can only steer it among them.  On the
#: weights with position words (stage 2c), "checked" from 300 steps at lr 0.02: 2 / 4 / 8 / 16
#: vectors reach 0.13 (lr 0.05) / 0.13 / 0.22 / 0.13 of samples, the last at prompt fidelity 0.72
#: (BENCHMARKS.md, "Quality benchmark").
TI_VECTORS = 8


@register("ti", f"Textual Inversion, {TI_VECTORS} vectors, init word in brackets")
def ti_method(host, refs: References, concept: str, out_dir: Path, opts: dict) -> Learned:
    from ..trainers import data as D
    from ..trainers.textual_inversion import TIConfig, train_textual_inversion

    word, init = CONCEPTS[concept]["word"], CONCEPTS[concept]["init"]
    data = D.images_from_batch(refs.images_model, refs.captions(word))
    # no flips: the world is not mirror-symmetric (a moon's bite, "left"/"right" in the captions)
    cfg = TIConfig(name=word, output_dir=out_dir, init_text=init, steps=opts.get("ti_steps", 300),
                   num_vectors=opts.get("ti_vectors", TI_VECTORS),
                   learning_rate=opts.get("ti_lr", 2e-2), batch_size=opts.get("ti_batch", 8), templates="captions",
                   flip=False, save_every=0, preview_every=0, overwrite=True, seed=opts.get("seed", 0))
    res = train_textual_inversion(host, data, cfg)
    vectors, steps = res.vectors, opts.get("sample_steps", 25)
    return Learned(word=word, seconds=res.seconds, steps=res.steps_done, files=res.files,
                   note=f"init '{init}', {cfg.num_vectors} vector(s), lr {cfg.learning_rate}, batch {cfg.batch_size}",
                   sample=lambda prompts, seed: sample_prompts(host, prompts, seed, placeholder=word, vectors=vectors,
                                                               steps=steps))


#: modules that register more rows (DreamBooth LoRA / full / pivotal; SeedSelect for the rare concept)
PLUGINS = ("quality_dreambooth", "quality_seedselect")


def load_plugins() -> None:
    import importlib
    for name in PLUGINS:
        importlib.import_module(f"{__package__}.{name}")


# --------------------------------------------------------------------------------------- evaluation
def evaluate(learned: Learned, refs: References, concept: str, scenes: list, seed: int = 0) -> tuple[dict, torch.Tensor]:
    prompts = [concept_caption(s, concept, learned.word) for s in scenes]
    truth = [R.caption(s) for s in scenes]                  # the same prompts in the world's words
    t0 = time.perf_counter()
    images = learned.sample(prompts, seed)
    x = images.permute(0, 3, 1, 2)
    ref = refs.images.permute(0, 3, 1, 2)
    row = MET.report(x, concept, truth, references=ref)
    row.update(train_s=round(learned.seconds, 1), sample_s=round(time.perf_counter() - t0, 1),
               steps=learned.steps, word=learned.word, note=learned.note)
    return row, images


def run(concepts=DEFAULT_CONCEPTS, methods=("base", "ti"), *, model=BASE_MODEL_DIR, out_dir="likeness-bench-quality",
        n_test: int = 32, seed: int = 0, opts: dict | None = None, log=print) -> dict:
    """Run every (concept, method); returns {concept: {method: row}} and writes sample grids."""
    from ..hosts.diffusers import DiffusersHost

    opts = dict(opts or {})
    load_plugins()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {list(METHODS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    host = DiffusersHost.load(model, device="cpu")
    results: dict = {}
    for concept in concepts:
        refs = references(concept)
        scenes = test_scenes(concept, n_test)
        rows, grids = {}, [refs.images_model]
        for name in methods:
            torch.manual_seed(seed)
            learned = METHODS[name](host, refs, concept, out_dir / concept / name, opts)
            row, images = evaluate(learned, refs, concept, scenes, seed)
            rows[name] = row
            grids.append(images[:8])
            log(f"[{concept}] {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items() if k not in ("note",)))
        _save_grid(grids, out_dir / f"{concept}.png")
        results[concept] = rows
    return results


def _save_grid(rows: list[torch.Tensor], path: Path, scale: int = 3) -> None:
    from PIL import Image
    tiles = []
    for r in rows:
        r = torch.nn.functional.interpolate(r.permute(0, 3, 1, 2), size=(RESOLUTION, RESOLUTION), mode="area")
        tiles.append(torch.cat(list(r.permute(0, 2, 3, 1)), dim=1))
    w = max(t.shape[1] for t in tiles)
    tiles = [torch.nn.functional.pad(t, (0, 0, 0, w - t.shape[1]), value=1.0) for t in tiles]
    arr = (torch.cat(tiles, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


# --------------------------------------------------------------------------------------- markdown
COLUMNS = [("concept_fidelity", "concept fidelity"), ("concept_probability", "concept prob."),
           ("feature_similarity", "feature sim."), ("prompt_fidelity", "prompt fidelity"),
           ("diversity", "diversity"), ("train_s", "train time (s)")]


def _load_block(text: str) -> dict:
    i, j = text.find(MARK_START), text.find(MARK_END)
    if i < 0 or j < 0:
        return {}
    m = re.search(r"<!-- results-json\n(.*?)\n-->", text[i:j], re.S)
    return json.loads(m.group(1)) if m else {}


def render_markdown(store: dict, command: str) -> str:
    commands = sorted({r.get("command", command) for rows in store.values() for r in rows.values()})
    lines = [MARK_START, "",
             "Command" + ("s" if len(commands) > 1 else "") + " (the rows' dates and machines are in their notes): "
             + ", ".join(f"`{c}`" for c in commands), "",
             "| concept | method | " + " | ".join(c[1] for c in COLUMNS) + " | steps | notes |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
    for concept in sorted(store, key=lambda c: list(CONCEPTS).index(c) if c in CONCEPTS else 99):
        entries = store[concept]
        order = [m for m in METHODS if m in entries] + [m for m in entries if m not in METHODS]
        for name in order:
            r = entries[name]
            cells = []
            for key, _ in COLUMNS:
                v = r.get(key)
                cells.append("—" if v is None else (f"{v:.0f}" if key == "train_s" else f"{v:.2f}"))
            label = f"**{name}**" if name != "base" else "base model"
            note = r.get("note") or METHOD_NOTES.get(name, "")
            lines.append(f"| {concept} | {label} | " + " | ".join(cells) +
                         f" | {r.get('steps') if r.get('steps') is not None else '—'} | {note}; {r.get('when', '')} |")
    lines += ["", "<!-- results-json", json.dumps(store, indent=1, sort_keys=True), "-->", "", MARK_END]
    return "\n".join(lines)


def write_markdown(path, results: dict, command: str) -> None:
    """Merge ``results`` into the block between the markers in ``path`` (appended if absent)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    store = _load_block(text)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d") + f", {platform.machine()} CPU"
    for concept, rows in results.items():
        for name, row in rows.items():
            store.setdefault(concept, {})[name] = {k: (round(v, 4) if isinstance(v, float) else v)
                                                   for k, v in dict(row, when=when, command=command).items()}
    MET.merge_block(path, render_markdown(store, command), MARK_START, MARK_END, "Quality benchmark (issue 5)")


# --------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    load_plugins()
    p.add_argument("--concepts", nargs="+", default=list(DEFAULT_CONCEPTS), choices=list(CONCEPTS))
    p.add_argument("--methods", nargs="+", default=["base", "ti"], help=f"registered: {', '.join(METHODS)}")
    p.add_argument("--model", default=str(BASE_MODEL_DIR), help="the world base model (a diffusers folder)")
    p.add_argument("--n", type=int, default=32, help="test prompts per concept")
    p.add_argument("--ti-steps", type=int, default=300)
    p.add_argument("--ti-vectors", type=int, default=TI_VECTORS, help="Textual Inversion vectors per word")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="likeness-bench-quality", help="embeddings and sample grids go here")
    p.add_argument("--markdown", default=None, help="merge the table into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def run_from_args(a) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = run(a.concepts, a.methods, model=a.model, out_dir=a.out, n_test=a.n, seed=a.seed,
              opts={"ti_steps": a.ti_steps, "ti_vectors": a.ti_vectors, "seed": a.seed})
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.markdown:
        cmd = "likeness bench quality" + (f" --methods {' '.join(a.methods)}" if a.methods != ["base", "ti"] else "") + \
              (f" --concepts {' '.join(a.concepts)}" if list(a.concepts) != list(DEFAULT_CONCEPTS) else "") + \
              (f" --ti-steps {a.ti_steps}" if a.ti_steps != 300 else "") + \
              (f" --ti-vectors {a.ti_vectors}" if a.ti_vectors != TI_VECTORS else "") + \
              (f" --n {a.n}" if a.n != 32 else "") + (f" --threads {a.threads}" if a.threads else "") + \
              f" --markdown {Path(a.markdown).name}"
        write_markdown(a.markdown, res, cmd)
        print(f"wrote the table into {a.markdown}")
    return 0


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
