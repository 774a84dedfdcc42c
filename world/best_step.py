"""Is the best-step pick worth trusting?  In the shapes world the classifier is the ground truth:
DreamBooth (LoRA, full) trains on a new concept long enough to overfit, with best step on
(``trainers/best_step.py``, the world classifier's embedding as the image encoder, as SeedSelect's
quality row does, and its text tower ``world/text_tower.py`` for CLIP-T), and at every evaluation the same snapshot is also read by the classifier on the
quality benchmark's held-out prompts.

Per snapshot: the metrics (feature similarity = CLIP-I's counterpart, CLIP-T, diversity, the
combined score that picks) next to the classifier's concept probability and prompt fidelity, and the
classifier's combined measure sqrt(concept probability x prompt fidelity) - the same geometric
mean the metrics' combined score is, on the ground truth.  Reported: the pick, whether it scores at
least as well as the last step on the classifier's measure, Spearman's rho between the metrics'
ranking of the snapshots and the classifier's, and the wall time evaluation added.

    python bench/best_step.py [--modes lora full] [--steps 900] [--eval-every 100] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import metrics as MET
from . import render as R
from .quality import CONCEPTS, concept_caption, references, sample_prompts, test_scenes
from .quality_seedselect import WorldImageEncoder
from .text_tower import WorldTextEncoder, class_noun

MARK_START = "<!-- likeness-bench-best-step:start -->"
MARK_END = "<!-- likeness-bench-best-step:end -->"
#: the evaluation prompts' scenes: a seed of their own, apart from the references and the test prompts
EVAL_SEED = 77


@dataclass
class Snapshot:
    step: int
    metrics: dict  # the best-step point (as_dict)
    truth: dict  # the classifier's report on the held-out prompts

    @property
    def truth_score(self) -> float:
        return math.sqrt(max(0.0, self.truth["concept_probability"]) * max(0.0, self.truth["prompt_fidelity"]))


@dataclass
class Run:
    mode: str
    concept: str
    steps: int
    snapshots: list[Snapshot] = field(default_factory=list)
    best_step: int | None = None
    train_s: float = 0.0
    eval_s: float = 0.0
    truth_s: float = 0.0

    def snapshot(self, step: int) -> Snapshot:
        return next(s for s in self.snapshots if s.step == step)

    @property
    def pick_holds(self) -> bool:
        """The pick scores at least as well as the last step on the classifier's measure."""
        return self.snapshot(self.best_step).truth_score >= self.snapshots[-1].truth_score - 1e-9

    @property
    def rho(self) -> float:
        return spearman([s.metrics["combined"] for s in self.snapshots], [s.truth_score for s in self.snapshots])


def _ranks(values: list[float]) -> list[float]:
    """Ranks (1 = smallest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (nan when either side is constant)."""
    ra, rb = torch.tensor(_ranks(a)), torch.tensor(_ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else float("nan")


def _config(concept: str, mode: str, out_dir: Path, opts: dict, refs):
    from ..trainers.dreambooth import DreamBoothConfig

    word, noun = CONCEPTS[concept]["word"], class_noun(concept)
    evals = [concept_caption(s, concept, word) for s in test_scenes(concept, opts.get("eval_prompts", 8), EVAL_SEED)]
    lr = opts.get("lora_lr", 3e-3) if mode == "lora" else opts.get("full_lr", 3e-4)
    extra = dict(rank=8, targets="transformer") if mode == "lora" else dict(optimizer="adafactor")
    # the class prompt only names the class noun for CLIP-T (prior weight 0: no prior preservation,
    # the world has no class images)
    return DreamBoothConfig(
        name=f"{word}-{mode}", output_dir=out_dir, instance_prompt=refs.captions(word)[0], mode=mode,
        class_prompt=refs.captions(noun)[0], prior_weight=0.0,
        prompts="captions", batch_size=opts.get("batch", 4), seed=opts.get("seed", 0), flip=False, save_every=0,
        preview_every=0, overwrite=True, steps=opts["steps"], learning_rate=lr, eval_every=opts["eval_every"],
        eval_prompts="\n".join(evals), eval_steps=opts.get("sample_steps", 15), preview_cfg=4.0, **extra)


def run_mode(host, concept: str, mode: str, out_dir: Path, opts: dict, log=print) -> Run:
    """One overfitting run with best step on; every evaluation also sampled on the held-out prompts
    and read by the classifier (inside the loop: the snapshot as it is at that step)."""
    from ..trainers import data as D
    from ..trainers.best_step import Encoders
    from ..trainers.dreambooth import train_dreambooth

    refs = references(concept)
    word = CONCEPTS[concept]["word"]
    scenes = test_scenes(concept, opts.get("n_test", 32))
    prompts = [concept_caption(s, concept, word) for s in scenes]
    truth_prompts = [R.caption(s) for s in scenes]
    run = Run(mode, concept, opts["steps"])

    def on_point(point):
        t0 = time.perf_counter()
        images = sample_prompts(host, prompts, opts.get("seed", 0), steps=opts.get("sample_steps", 15))
        truth = MET.report(images.permute(0, 3, 1, 2), concept, truth_prompts)
        run.truth_s += time.perf_counter() - t0
        run.snapshots.append(Snapshot(point.step, point.as_dict(), truth))
        log(f"[{concept} {mode}] step {point.step}: combined {point.score:.4f} (feature {point.clip_i:.3f}, "
            f"CLIP-T {point.clip_t:.3f}, margin {point.clip_t_margin:.3f}, diversity {point.diversity:.3f}) | classifier: concept prob {truth['concept_probability']:.3f}, "
            f"prompt fidelity {truth['prompt_fidelity']:.3f}")

    data = D.images_from_batch(refs.images_model, refs.captions(word))
    cfg = _config(concept, mode, out_dir, opts, refs)
    image = WorldImageEncoder()
    encoders = Encoders(image, text=WorldTextEncoder(image))
    res = train_dreambooth(host, data, cfg, encoders=encoders, on_point=on_point)
    ev = res.evaluation
    run.best_step, run.eval_s = ev.best.step, ev.seconds
    run.train_s = res.seconds - ev.seconds - run.truth_s
    return run


def run_all(concept: str = "moon", modes=("lora", "full"), *, model=None, out_dir="likeness-bench-best-step",
            opts: dict | None = None, log=print) -> list[Run]:
    from ..hosts.diffusers import DiffusersHost
    from .model import BASE_MODEL_DIR

    opts = {"steps": 900, "eval_every": 100, **(opts or {})}
    host = DiffusersHost.load(model or BASE_MODEL_DIR, device="cpu")
    out = []
    for mode in modes:
        torch.manual_seed(opts.get("seed", 0))
        out.append(run_mode(host, concept, mode, Path(out_dir) / mode, opts, log))
    return out


def render_markdown(runs: list[Run], command: str) -> str:
    lines = [MARK_START, "", f"Command: `{command}`", ""]
    for r in runs:
        lines += [f"**{r.concept}, DreamBooth {r.mode}**, {r.steps} steps: best step **{r.best_step}** "
                  f"(last {r.snapshots[-1].step}); the pick scores at least as well as the last step on the "
                  f"classifier's measure: **{'yes' if r.pick_holds else 'no'}**; Spearman's rho (metrics' combined "
                  f"score vs the classifier's) **{r.rho:.2f}**; training {r.train_s:.0f} s, best-step evaluation "
                  f"{r.eval_s:.0f} s ({100 * r.eval_s / max(1e-9, r.train_s):.0f} % added).", "",
                  "| step | feature sim. | CLIP-T | CLIP-T margin | diversity | combined (picks) | concept fidelity | "
                  "concept prob. | prompt fidelity | classifier combined |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in r.snapshots:
            mark = " ←" if s.step == r.best_step else ""
            m, t = s.metrics, s.truth
            lines.append(f"| {s.step}{mark} | {m['CLIP-I']:.3f} | {_num(m.get('CLIP-T'))} | {_num(m.get('CLIP-T margin'))} | "
                         f"{m['diversity']:.3f} | "
                         f"{m['combined']:.4f} | "
                         f"{t['concept_fidelity']:.2f} | {t['concept_probability']:.3f} | {t['prompt_fidelity']:.3f} | "
                         f"{s.truth_score:.4f} |")
        lines.append("")
    lines.append(MARK_END)
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_markdown(path, runs: list[Run], command: str) -> None:
    MET.merge_block(path, render_markdown(runs, command), MARK_START, MARK_END, "Best step in the shapes world (issue 16)")


__all__ = ["Snapshot", "Run", "spearman", "run_mode", "run_all", "render_markdown", "write_markdown"]
