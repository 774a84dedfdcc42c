"""Best step, kept automatically: every ``every`` steps the model under training samples a fixed
list of evaluation prompts at fixed seeds, ``metrics`` scores the images against the training
images, and the parameters of the best combined score so far are kept (a CPU copy).

One mechanism for every trainer: the loop calls ``BestStep(step)`` (``loop.run(evaluate=...)``);
the trainer hands it a ``sample(prompts, seeds)`` function (its own sampler on the model as it is
now) and the list of tensors it trains; ``swapped()`` puts the best values into those tensors for
as long as the trainer writes ``<name>.best.*`` or reads the best result out, then restores the
last ones.

Why a fixed prompt list with fixed seeds: the same noise at every evaluation makes snapshots
comparable (a change of score is a change of the model, not of the draw), and prompts that put
the subject in new contexts are what an overfitted model fails - it draws the training photo
whatever the prompt, so its prompt fidelity (CLIP-T, or diversity as its stand-in) falls while its
subject fidelity keeps rising.  The combined score (``metrics.combined_score``) weighs both.

Ties keep the earlier step: fewer steps are less overfitted for the same score.  The base model
(step 0) is not a candidate: the best snapshot is always a trained one.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from . import metrics as M
from .preview import render_preview
from .seam import Host, ImageEncoder

#: default evaluation prompts per kind; ``{}`` is the subject (TI: the new word; DreamBooth: the
#: instance prompt).  Varied contexts, so an overfitted model that ignores them scores lower.
DEFAULT_PROMPTS = {
    "object": ("a photo of {}", "a photo of {} on a beach", "a photo of {} in the snow",
               "an oil painting of {}"),
    "style": ("a painting of a house in the style of {}", "a portrait of a woman in the style of {}",
              "a city street in the style of {}", "a bowl of fruit in the style of {}"),
    "instance": ("{}", "{}, on a beach", "{}, in the snow", "{}, as an oil painting"),
}
#: the choices of the "output" switch of the nodes: the best snapshot, or the last step's
OUTPUTS = ("best", "last")


def default_prompts(kind: str) -> list[str]:
    """The evaluation prompts of a template kind ("captions" and unknown kinds: object's)."""
    return list(DEFAULT_PROMPTS.get(kind, DEFAULT_PROMPTS["object"]))


def parse_prompts(text: str | Sequence[str] | None, kind: str) -> list[str]:
    """One prompt per line (or a list); empty: the kind's defaults."""
    lines = text.splitlines() if isinstance(text, str) else list(text or [])
    lines = [ln.strip() for ln in lines if ln and ln.strip()]
    return lines or default_prompts(kind)


def fill(prompts: Sequence[str], subject: str) -> list[str]:
    """The prompts with ``{}`` replaced by the subject (a prompt without ``{}`` is used as is)."""
    return [p.replace("{}", subject) for p in prompts]


def identifier(instance_prompt: str, class_prompt: str) -> tuple[str, str]:
    """DreamBooth's (identifier, class noun) for CLIP-T.  The usual form: the class noun is the
    class prompt's last word (else the instance prompt's) and the identifier the word before it in
    the instance prompt that the class prompt does not have ("a photo of sks dog" / "a photo of a
    dog" -> ("sks", "dog")).  Where the noun does not follow the identifier but the prompts differ
    by one word each, those words are the pair ("a red sks-moon on blue, left" / "a red shape on
    blue, left" -> ("sks-moon", "shape"))."""
    inst, cls = instance_prompt.split(), class_prompt.split()
    noun = (cls or inst or [""])[-1]
    new = [w for w in inst if w not in cls and w != noun]
    word = new[-1] if new else ""
    only_cls = [w for w in cls if w not in inst]
    usual = word != "" and noun in inst[inst.index(word) + 1:inst.index(word) + 2]
    if not usual and len(new) == 1 and len(only_cls) == 1:
        return new[0], only_cls[0]
    return word, noun


@dataclass(frozen=True)
class Encoders:
    """What the metrics are computed with: a CLIP vision model (or any ``ImageEncoder``, e.g. the
    world classifier), optionally DINOv2 and the CLIP text tower of the same model (CLIP-T)."""

    clip: ImageEncoder
    dino: ImageEncoder | None = None
    text: M.TextEncoder | None = None


@dataclass(frozen=True)
class Point:
    """One evaluation: the metrics at ``step`` (None where unavailable) and its wall time."""

    step: int
    clip_i: float | None
    dino: float | None
    clip_t: float | None
    diversity: float | None
    score: float | None
    seconds: float
    clip_t_margin: float | None = None  # the combined score's prompt factor where there is CLIP-T

    def as_dict(self) -> dict:
        return {"step": self.step, "CLIP-I": self.clip_i, "DINO": self.dino, "CLIP-T": self.clip_t,
                "CLIP-T margin": self.clip_t_margin, "diversity": self.diversity, "combined": self.score,
                "seconds": round(self.seconds, 3)}


#: sample(prompts, seeds) -> IMAGE [len(prompts), H, W, 3]: the model as it is now
SampleFn = Callable[[list[str], list[int]], torch.Tensor]


def embed_references(encoders: Encoders, images: Sequence[torch.Tensor] | torch.Tensor):
    """(CLIP, DINO or None) embeddings of the references, once per run: images of different sizes
    are embedded one at a time (the encoder resizes each)."""
    def embed(enc):
        if torch.is_tensor(images):
            return M.embed_all(enc, images)
        return torch.cat([M.embed_all(enc, im[None]) for im in images])

    return embed(encoders.clip), (embed(encoders.dino) if encoders.dino is not None else None)


@dataclass
class BestStep:
    """Called by the loop at each evaluation step; keeps the best parameters (module docstring)."""

    encoders: Encoders
    references: Sequence[torch.Tensor] | torch.Tensor
    sample: SampleFn
    prompts: list[str]  # filled in: what the model is asked to draw
    params: list[torch.Tensor]
    seed: int = 0
    word: str = ""  # CLIP-T scores each prompt with ``word`` replaced by ``class_noun``
    class_noun: str = ""
    on_point: Callable[[Point], None] | None = None
    points: list[Point] = field(default_factory=list)
    best: Point | None = None
    formula: str = ""
    _saved: list[torch.Tensor] | None = None
    _refs: tuple | None = None

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("evaluation needs at least one prompt")
        if self.encoders.text is not None:
            M.check_same_tower(self.encoders.clip, self.encoders.text)  # before any training

    @property
    def seconds(self) -> float:
        """Wall time spent evaluating (sampling + metrics), reported apart from training."""
        return sum(p.seconds for p in self.points)

    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(len(self.prompts))]

    def __call__(self, step: int) -> Point:
        t0 = time.perf_counter()
        if self._refs is None:
            self._refs = embed_references(self.encoders, self.references)
        with torch.no_grad():
            images = self.sample(list(self.prompts), self.seeds())
        report = M.evaluate(None, images, self.encoders.clip, self.encoders.dino, self.encoders.text,
                            self.prompts, self.word, self.class_noun, refs=self._refs)
        point = Point(step, report.clip_i.value, report.dino.value, report.clip_t.value, report.diversity.value,
                      report.combined.value, time.perf_counter() - t0, report.clip_t_margin.value)
        self.formula = report.combined.formula
        self.points.append(point)
        if point.score is not None and (self.best is None or point.score > self.best.score):
            self.best = point
            self._saved = [p.detach().to("cpu", copy=True) for p in self.params]
        if self.on_point is not None:
            self.on_point(point)
        return point

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a run state keeps of the evaluation (``trainers/run_state.py``): every point so far,
        the best step, and the best snapshot's parameters in fp32, so that a resumed run goes on
        comparing against the best it had instead of starting the tracking anew."""
        tensors = {f"best.{i}": t.detach().float().cpu() for i, t in enumerate(self._saved or [])}
        head = {"points": [p.as_dict() for p in self.points], "best": None if self.best is None else self.best.step,
                "formula": self.formula, "prompts": list(self.prompts), "seeds": self.seeds()}
        return tensors, head

    def load_state(self, tensors: dict[str, torch.Tensor], head: dict) -> None:
        """Take back what ``state`` kept; a state written without evaluation, or with other
        prompts or seeds (whose scores would not compare), leaves the tracking empty."""
        if not head or head.get("prompts") != list(self.prompts) or head.get("seeds") != self.seeds():
            return
        self.points = [Point(d["step"], d["CLIP-I"], d["DINO"], d["CLIP-T"], d["diversity"], d["combined"],
                             d["seconds"], d.get("CLIP-T margin")) for d in head["points"]]
        self.formula = head.get("formula", "")
        self.best = next((p for p in self.points if p.step == head.get("best")), None)
        saved = [tensors.get(f"best.{i}") for i in range(len(self.params))]
        if self.best is None or any(t is None or t.shape != p.shape for t, p in zip(saved, self.params)):
            self.best, self._saved = None, None
            return
        self._saved = [t.to(dtype=p.dtype) for t, p in zip(saved, self.params)]

    @contextlib.contextmanager
    def swapped(self) -> Iterator[Point]:
        """The best snapshot's values in the trained tensors for the ``with`` block; the last
        values come back afterwards (also on an error)."""
        if self.best is None or self._saved is None:
            raise RuntimeError("no evaluation has produced a score yet: there is no best step")
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self._saved):
                p.copy_(s.to(p.device))
            try:
                yield self.best
            finally:
                for p, c in zip(self.params, current):
                    p.copy_(c)



def host_sampler(host: Host, word: str, vectors: dict[str, torch.Tensor] | None, size_hw: tuple[int, int],
                 steps: int, guidance: float) -> SampleFn:
    """The evaluation images of a trainer: the preview sampler (Euler, CFG, the model with the
    training's patches and vectors as they are now), one image per prompt at its own seed."""
    def sample(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return torch.cat([render_preview(host, word, vectors, p, size_hw=size_hw, steps=steps, cfg=guidance, seed=s)
                          for p, s in zip(prompts, seeds)])

    return sample


@dataclass(frozen=True)
class Plan:
    """What a trainer's config says about evaluation (the same fields on every trainer)."""

    every: int
    prompts: list[str]  # filled in
    steps: int
    guidance: float
    seed: int
    word: str
    class_noun: str


def check_plan(every: int, steps: int, has_encoder: bool = True) -> list[str]:
    """The problems of the evaluation options, for the trainers' checks before any work (the
    options alone: ``has_encoder`` True; with the model: whether an image encoder was given)."""
    problems = []
    if every < 0:
        problems.append(f"eval_every must be 0 (off) or positive, got {every}")
    if every > 0 and not has_encoder:
        problems.append("eval_every needs an image encoder for the metrics: connect a CLIP vision model "
                        "(ComfyUI: clip_vision input; CLI: --clip DIR), or set eval_every to 0")
    if every > 0 and steps < 1:
        problems.append(f"evaluation sampling steps must be at least 1, got {steps}")
    return problems


def start(plan: Plan, encoders: Encoders | None, references, sample: SampleFn, params: list[torch.Tensor],
          on_point: Callable[[Point], None] | None = None) -> BestStep | None:
    """The loop's ``evaluate`` hook for a run (None when evaluation is off)."""
    if plan.every <= 0 or encoders is None:
        return None
    return BestStep(encoders, references, sample, list(plan.prompts), list(params), seed=plan.seed,
                    word=plan.word, class_noun=plan.class_noun, on_point=on_point)


@dataclass
class Outcome:
    """What a run's evaluation produced, for the result objects: every point, the pick, the
    formula the scores used, the evaluation wall time and the ``<name>.best.*`` files written."""

    points: list[Point]
    best: Point | None
    formula: str
    seconds: float
    files: list = field(default_factory=list)
    state: dict = field(default_factory=dict)  # the best snapshot's exported tensors (per trainer)

    def summary(self) -> str:
        if self.best is None:
            return f"evaluation: no combined score ({len(self.points)} evaluations, {self.seconds:.1f} s)"
        last = self.points[-1]
        last_s = "n/a" if last.score is None else f"{last.score:.4f}"
        return (f"best step {self.best.step} (combined {self.best.score:.4f}; last step {last.step}: {last_s}); "
                f"{len(self.points)} evaluations took {self.seconds:.1f} s")


def finish(best: BestStep | None, write: Callable[[int], list], export: Callable[[], dict]) -> Outcome | None:
    """After the run: with the best snapshot's values in place, ``write(step)`` its files and
    ``export()`` its tensors; None when evaluation was off."""
    if best is None:
        return None
    out = Outcome(list(best.points), best.best, best.formula, best.seconds)
    if best.best is not None:
        with best.swapped() as point:
            out.files = list(write(point.step))
            out.state = _copied(export())  # exports may share storage with the trained tensors
    return out


def _copied(value):
    """``value`` with every tensor in it (dicts, tuples, lists) copied."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    return value


#: the curves drawn, with their colours (also the live chart's: web/likeness.js)
CURVES = {"CLIP-I": (52, 120, 220), "DINO": (150, 60, 200), "CLIP-T": (220, 120, 30),
          "diversity": (40, 160, 90), "combined": (20, 20, 20)}


def curves_image(points: Sequence[Point], best: Point | None = None, size: tuple[int, int] = (640, 320)):
    """The metric curves over the steps as IMAGE ``[1, H, W, 3]``: one line per available metric
    (each scaled to its own range, so a flat CLIP-T and a steep CLIP-I are both readable; the
    legend gives each range), the best step as a vertical line."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    img = Image.new("RGB", (w, h), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=12)
    left, right, top, bottom = 12, w - 12, 12, h - 30 - 16 * 2
    steps = [p.step for p in points]
    lo_s, hi_s = (min(steps), max(steps)) if steps else (0, 1)
    x_of = lambda s: left + (s - lo_s) / max(1, hi_s - lo_s) * (right - left)  # noqa: E731
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    if best is not None:
        draw.line((x_of(best.step), top, x_of(best.step), bottom), fill=(230, 60, 60), width=2)
    legend = []
    for name, colour in CURVES.items():
        pts = [(p.step, p.as_dict()[name]) for p in points if p.as_dict()[name] is not None]
        if not pts:
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        y_of = lambda v: bottom - (v - lo) / ((hi - lo) or 1.0) * (bottom - top)  # noqa: E731
        xy = [(x_of(s), y_of(v)) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3 if name == "combined" else 2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        legend.append((f"{name} {lo:.3f}..{hi:.3f}", colour))
    for k, (text, colour) in enumerate(legend):
        row, col = divmod(k, 3)
        draw.text((left + col * (w - 24) // 3, bottom + 8 + row * 16), text, fill=colour, font=font)
    pick = f"best step {best.step}" if best is not None else "no best step"
    draw.text((left, h - 18), f"steps {lo_s}..{hi_s}   {pick}", fill=(230, 60, 60), font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


__all__ = ["DEFAULT_PROMPTS", "OUTPUTS", "default_prompts", "parse_prompts", "fill", "identifier", "Encoders",
           "Point", "SampleFn", "embed_references", "BestStep", "host_sampler", "Plan", "check_plan", "start", "Outcome",
           "finish", "CURVES", "curves_image"]
