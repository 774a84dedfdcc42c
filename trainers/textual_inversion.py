"""Textual Inversion (Gal et al. 2022, arXiv 2208.01618): learn the input embedding of a new word
from a few images, with the model frozen.

    v* = argmin_v E_{x0, y, eps, t} || eps - eps_theta(x_t, t, c_theta(y; v)) ||^2        (eq. 2)

measured in the model's own parameterisation (eps or v).  As in the paper's code and A1111, the
trainable vectors are a small separate fp32 tensor per text encoder spliced into the token
embeddings at the placeholder's positions; the vocabulary table is never touched, so there is no
dense 49408-row gradient or optimizer state (algorithms.md §1.7) and no weight gradients at all.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import data as D
from . import best_step as BS
from . import loop, objective, preflight, run_state
from .formats import embedding
from .formats.files import validate_name
from .preview import render_preview
from .word_vectors import initial_vectors
from .seam import Host


@dataclass
class TIConfig:
    name: str
    output_dir: str | Path
    init_text: str = ""  # "" -> "object" for object/caption templates, "painting" for style
    num_vectors: int = 1
    steps: int = 500
    learning_rate: float = 5e-3
    batch_size: int = 1
    seed: int = 0
    templates: str = "auto"  # auto | object | style | captions
    resolution: int | None = None  # None: train at the images' own (shared) size
    random_crop: bool = False
    flip: bool = True
    save_every: int = 100
    preview_every: int = 50
    preview_prompt: str = "a photo of {}"
    preview_steps: int = 20
    preview_cfg: float = 5.0
    overwrite: bool = False
    keep_snapshots: bool = False
    #: continue a stopped run: "off", "latest", or a state file (``trainers/run_state.py``)
    resume: str = "off"
    #: run states kept beside the embedding (0: none)
    keep_states: int = run_state.KEEP
    #: continue from an existing embedding file instead of ``init_text`` (ours, an A1111 ``.pt``,
    #: any ``emb_params`` or ``clip_l`` + ``clip_g`` safetensors): its vectors, its count, its step
    init_file: str = ""
    # best step (trainers/best_step.py): sample the evaluation prompts every N steps (0: off)
    eval_every: int = 0
    eval_prompts: str = ""  # one per line, {} = the new word; "": the template kind's defaults
    eval_steps: int = 20  # sampling steps of each evaluation image (Euler, cfg preview_cfg)
    memory_budget_gb: float = 0.0  # 0: the device's free memory (CUDA); see trainers/preflight.py


@dataclass
class TIResult:
    vectors: dict[str, torch.Tensor]
    files: list[Path]
    losses: list[float]
    steps_done: int
    skipped_steps: int
    seconds: float
    preview: torch.Tensor | None = None
    data_summary: str = ""
    template_kind: str = ""
    resumed_from: int = 0  # the step a resumed run continued after (0: a fresh run)
    state_path: Path | None = None  # the last run state written
    first_step: int = 0  # steps the embedding had before this run (init_file); files count on from it
    notes: list[str] = field(default_factory=list)  # settings the run changed on its own (memory)
    #: the evaluation (best step), None when ``eval_every`` was 0; ``state["vectors"]`` is the
    #: best snapshot's embedding
    evaluation: BS.Outcome | None = None

    def pick(self, which: str) -> dict[str, torch.Tensor]:
        """The vectors of the "best" snapshot or of the "last" step (the last without evaluation)."""
        if which == "best" and self.evaluation is not None and self.evaluation.state:
            return self.evaluation.state["vectors"]
        return self.vectors


def check_config(cfg: TIConfig) -> None:
    """Every check of the options alone (no model, no images): the CLI runs it before loading."""
    problems = D.number_problems(cfg.seed, cfg.resolution) + run_state.option_problems(cfg.keep_states, cfg.resume)
    if not 1 <= cfg.num_vectors <= 75:
        problems.append(f"vectors per token must be 1..75 (a prompt holds 75 tokens), got {cfg.num_vectors}")
    if cfg.steps < 1:
        problems.append(f"steps must be at least 1, got {cfg.steps}")
    if not 0 < cfg.learning_rate <= 1:
        problems.append(f"learning rate must be in (0, 1], got {cfg.learning_rate}")
    if cfg.batch_size < 1:
        problems.append(f"batch size must be at least 1, got {cfg.batch_size}")
    if cfg.save_every < 0 or cfg.preview_every < 0:
        problems.append("save/preview intervals must be 0 (off) or positive")
    problems += BS.check_plan(cfg.eval_every, cfg.eval_steps)
    if not cfg.memory_budget_gb >= 0:
        problems.append(f"memory budget must be 0 (the device's free memory) or a size in GB, got {cfg.memory_budget_gb}")
    if problems:
        raise ValueError("; ".join(problems))


class TextualInversion:
    """The method the loop drives: one step = a batch of cached latents, fresh noise levels and
    noise, a prompt per sample, and the native denoising loss."""

    def __init__(self, host: Host, cache: D.LatentCache, kind: str, captions: list[str | None],
                 name: str, vectors: dict[str, torch.Tensor], batch_size: int, seed: int):
        self.host, self.cache, self.kind, self.captions = host, cache, kind, captions
        self.name, self.batch_size = name, batch_size
        self.vectors = {k: torch.nn.Parameter(v.to(host.device, torch.float32)) for k, v in vectors.items()}
        self.rng = random.Random(seed)  # private: ComfyUI reseeds torch's global RNG when it samples
        self.gen = torch.Generator("cpu").manual_seed(seed)
        self.sigmas = host.training_sigmas().float()

    def parameters(self):
        return list(self.vectors.values())

    def state_ok(self) -> bool:
        """Whether the vectors still give finite conditioning: at an extreme learning rate finite
        vectors can overflow the text encoder, and such a state must not become the last good one."""
        with torch.no_grad():
            return _finite(self.host.encode_text([f"a photo of {self.name}"], self.name, self.vectors))

    def loss(self, step: int) -> torch.Tensor:
        host = self.host
        x0, idx, metas = self.cache.sample(self.batch_size, self.rng)
        prompts = [D.prompt_for(self.kind, self.name, self.captions[i], self.rng) for i in idx]
        n = objective.noised(x0, self.sigmas, self.gen)
        cond = host.encode_text(prompts, self.name, self.vectors, metas)
        x0_hat = host.denoise(n.x, n.sigma, cond)
        return objective.native_error(host, x0_hat, x0, n.sigma).mean()


#: options a resumed run may change: they decide what is shown and written, not what is trained
_VOLATILE = ("save_every", "preview_every", "preview_prompt", "preview_steps", "preview_cfg", "overwrite",
             "keep_snapshots", "memory_budget_gb")


def _finite(obj, depth: int = 3) -> bool:
    """Every floating tensor inside a host's conditioning (tensors, lists, dicts, plain objects) is finite."""
    if torch.is_tensor(obj):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if depth == 0:
        return True
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif not isinstance(obj, (list, tuple)):
        obj = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    return all(_finite(v, depth - 1) for v in obj)


def start_vectors(host: Host, cfg: TIConfig, init_text: str) -> tuple[dict[str, torch.Tensor], int]:
    """The vectors a run starts from and the step they were trained to: ``init_file``'s (its own
    vector count, whatever ``num_vectors`` says), or ``init_text``'s words at step 0."""
    if not cfg.init_file:
        return initial_vectors(host, init_text, cfg.num_vectors), 0
    path = Path(cfg.init_file)
    if not path.is_file():
        raise FileNotFoundError(f"init file {path} does not exist: give an embedding file (.safetensors or .pt)")
    widths = {e.key: e.width for e in host.text_encoders()}
    try:
        vectors, meta = embedding.load_embedding(path, family=host.info.family, widths=widths)
        embedding.check_vectors(vectors, host.info.family, widths)
    except ValueError as e:
        raise ValueError(f"init file {path}: {e} Give an embedding trained for this model's family.") from e
    try:
        first = int(meta.get("likeness.step") or meta.get("step") or 0)
    except ValueError:
        first = 0
    return vectors, max(first, 0)


def _metadata(cfg: TIConfig, init_text: str, kind: str) -> dict[str, str]:
    return {
        "steps": str(cfg.steps), "lr": str(cfg.learning_rate), "batch_size": str(cfg.batch_size),
        "init_text": init_text, "templates": kind, "seed": str(cfg.seed),
        "resolution": str(cfg.resolution or "native"),
        "trained": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trainer": "likeness textual inversion",
    }


def prepare(host: Host, images: D.TrainingImages, cfg: TIConfig, encoders: BS.Encoders | None = None):
    """Every check that can fail, before any model work: config, name, output files, images,
    captions, the state to resume, the init file.  Returns (name, kind, captions, planned images, init
    text, state spec, (start vectors, their step))."""
    check_config(cfg)
    problems = BS.check_plan(cfg.eval_every, cfg.eval_steps, encoders is not None)
    if problems:
        raise ValueError("; ".join(problems))
    name = validate_name(cfg.name)
    host.check_placeholder(name)
    if len(images) == 0:
        raise D.DatasetError("no training images")
    spec = run_state.spec_for("textual_inversion", cfg, host, images, name=name, folder=cfg.output_dir,
                              volatile=_VOLATILE)
    # a resumed run replaces its own files
    embedding.check_can_write(cfg.output_dir, name, host.info.family, cfg.overwrite or spec.path is not None)
    if cfg.eval_every:
        embedding.check_can_write(cfg.output_dir, name + ".best", host.info.family,
                                  cfg.overwrite or spec.path is not None)
    kind, captions = D.resolve_prompts(images, name, cfg.templates)
    planned = D.plan_geometry(images, cfg.resolution, host.latent_scale)
    init_text = cfg.init_text.strip() or ("painting" if kind == "style" else "object")
    if name in init_text.split():
        raise ValueError(f"the init text must describe the concept with existing words, not the new word {name!r}")
    return name, kind, captions, planned, init_text, spec, start_vectors(host, cfg, init_text)


def _evaluation(host: Host, cfg: TIConfig, method: TextualInversion, kind: str, init_text: str, planned,
                crop_hw, encoders, on_point) -> BS.BestStep | None:
    """The loop's best-step hook: the evaluation prompts sampled with the vectors as they are."""
    prompts = BS.fill(BS.parse_prompts(cfg.eval_prompts, kind), method.name)
    plan = BS.Plan(cfg.eval_every, prompts, cfg.eval_steps, cfg.preview_cfg, cfg.seed, method.name, init_text)
    sample = BS.host_sampler(host, method.name, method.vectors, crop_hw, cfg.eval_steps, cfg.preview_cfg)
    return BS.start(plan, encoders, planned, sample, method.parameters(), on_point)
def _preflight(host: Host, name: str, vectors: dict, cfg: TIConfig, crop_hw) -> preflight.Choice:
    """Will the run fit?  Measured with the run's own step on throw-away copies of the vectors."""
    trial = {k: v.detach().to(host.device, torch.float32).requires_grad_() for k, v in vectors.items()}
    step = preflight.denoising_step(host, f"a photo of {name}", cfg.batch_size, name, trial)
    hw = (crop_hw[0] // host.latent_scale, crop_hw[1] // host.latent_scale)
    return preflight.plan(host, step, target_hw=hw, trainable_numel=sum(v.numel() for v in trial.values()),
                          optimizer="adamw", checkpointing=False, budget_gb=cfg.memory_budget_gb,
                          what_to_lower="the batch size or the resolution")


def train_textual_inversion(host: Host, images: D.TrainingImages, cfg: TIConfig,
                            progress: loop.ProgressFn | None = None, encoders: BS.Encoders | None = None,
                            on_point: Callable[[BS.Point], None] | None = None) -> TIResult:
    """Train, save ``<name>`` into ``cfg.output_dir`` (every ``save_every`` steps, at the end, and
    on Cancel), and return the vectors, files and loss history.  With ``eval_every`` the best
    step is kept (scored with ``encoders``) and written as ``<name>.best``."""
    name, kind, captions, planned, init_text, spec, (vectors, first) = prepare(host, images, cfg, encoders)
    crop = min(min(im.shape[:2]) for im in planned) if cfg.resolution else None
    crop_hw = (crop, crop) if crop else tuple(planned[0].shape[:2])
    memory = _preflight(host, name, vectors, cfg, crop_hw)
    cache = D.LatentCache(host, planned, crop_hw=crop_hw, flip=cfg.flip, random_crop=cfg.random_crop)
    method = TextualInversion(host, cache, kind, captions, name, vectors, cfg.batch_size, cfg.seed)
    meta = _metadata(cfg, init_text, kind)
    widths = {e.key: e.width for e in host.text_encoders()}
    files: list[Path] = []

    def save(step: int) -> None:
        vecs = {k: v.detach().float().cpu() for k, v in method.vectors.items()}
        files[:] = embedding.save_embedding(cfg.output_dir, name, vecs, host.info, step=first + step,
                                          metadata=dict(meta, steps_done=str(first + step)), overwrite=True,
                                          widths=widths)
        if cfg.keep_snapshots and step < cfg.steps:
            embedding.save_embedding(Path(cfg.output_dir) / "snapshots", f"{name}-{step}", vecs, host.info,
                                   step=step, metadata=meta, overwrite=True, widths=widths)

    last_preview: list[torch.Tensor] = []

    def preview(step: int) -> torch.Tensor:
        img = render_preview(host, name, method.vectors, cfg.preview_prompt, size_hw=crop_hw,
                             steps=cfg.preview_steps, cfg=cfg.preview_cfg, seed=cfg.seed)
        last_preview[:] = [img[0]]
        return img[0]

    lcfg = loop.LoopConfig(steps=cfg.steps, learning_rate=cfg.learning_rate, save_every=cfg.save_every,
                           preview_every=cfg.preview_every, state=spec, eval_every=cfg.eval_every)
    best = _evaluation(host, cfg, method, kind, init_text, planned, crop_hw, encoders, on_point)
    ckpt = host.gradient_checkpointing() if memory.checkpointing else contextlib.nullcontext()
    with ckpt:
        res = loop.run(method, lcfg, device=host.device, compute_dtype=host.compute_dtype, save=save,
                       progress=progress, preview=preview if cfg.preview_every else None, evaluate=best)

    def write_best(step: int) -> list[Path]:
        vecs = {k: v.detach().float().cpu() for k, v in method.vectors.items()}
        return embedding.save_embedding(cfg.output_dir, name + ".best", vecs, host.info, step=step,
                                        metadata=dict(meta, steps_done=str(step), best_step=str(step)),
                                        overwrite=True, widths=widths)

    evaluation = BS.finish(best, write_best, lambda: {"vectors": {k: v.detach().float().cpu()
                                                                  for k, v in method.vectors.items()}})
    return TIResult(
        vectors={k: v.detach().float().cpu() for k, v in method.vectors.items()}, files=list(files),
        losses=res.losses, steps_done=res.steps_done, skipped_steps=res.skipped_steps, seconds=res.seconds,
        preview=last_preview[0] if last_preview else None, data_summary=images.summary(), template_kind=kind,
        resumed_from=res.resumed_from, state_path=res.state_path, first_step=first,
        evaluation=evaluation,
        notes=[memory.note] if memory.note else [],
    )


__all__ = ["TIConfig", "TIResult", "TextualInversion", "train_textual_inversion", "prepare", "check_config"]
