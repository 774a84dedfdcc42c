"""SeedSelect (Samuel et al., AAAI 2024): optimise the starting noise so a frozen model renders a
rare concept the way a few reference images show it.  No weight changes: the result is a *noise*
that any sampler with the same settings turns into the image.

The objective is the official code's (Samuel et al.'s released implementation):

* semantic: ``1 - cos(CLIP(decode(x0_k)), C)`` for the x0 estimates of the last K steps, weighted
  0.05 / 0.25 / 0.70, where ``C`` is the L2-normalised mean of the references' CLIP embeddings;
* appearance: the MSE between the final latent and the mean of the references' latents;
* ``10 * semantic + 1 * appearance``, AdamW with lr 0.1 dropping to 0.01 from iteration 3.

Deliberate differences (each a config field): the semantic terms use the steps' x0 estimates
(the official code decodes the still-noisy latents after steps 17 and 18); the seed is kept on its
starting norm (``keep_norm``: a seed must stay Gaussian-looking for the sampler, and Adam's
steps otherwise inflate it); the best iterate is returned, not the last; a better start (best of
several seeds by one forward pass, or norm-aware interpolation between DDIM-inverted references)
and early stopping on a target loss.  The paper's bootstrap (``num_seeds`` > 1: one full run, then
brief runs on random subsets of the references starting from its seed) and its contrastive loss
for several concepts (``others``: other concepts' reference images) are here; the official code
has neither, so they follow the paper's text (seed document 004).

The model side is the seam's ``SeedModel``: a prompt-conditioned denoiser reached through ``run``
(ComfyUI needs its sampler machinery around every denoiser call), plus a differentiable VAE
decode.  ``SeamSeedModel`` below builds one over any seam ``Host`` (diffusers, CLI, tests); the
ComfyUI host builds its own over MODEL/conditioning/VAE.  Each noise is optimised by the shared
training loop (``trainers/loop.py``), so the non-finite guard, fp16 loss scaling, Cancel and
progress are the same as every other method's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import diff_sampling as DS
from . import loop, run_state, seed_bank
from .image_encoder import centroid
from .seam import Host, ImageEncoder, SeedModel

#: progress(iteration, total, loss or None, preview image [H, W, 3] or None)
ProgressFn = loop.ProgressFn
STARTS = ("seed", "best_of", "inversion")




# ----------------------------------------------------------------------------------------------
# the seam adapter


class SeamSeedModel:
    """The seam's ``SeedModel`` over any ``Host`` and a prompt (negative prompt for CFG)."""

    def __init__(self, host: Host, prompt: str, negative: str = ""):
        self.host, self.prompt, self.negative = host, prompt, negative
        self.device, self.compute_dtype = host.device, host.compute_dtype
        self.latent_channels, self.latent_scale = host.latent_channels, host.latent_scale
        self.latent_multiple = host.latent_multiple
        self._conds: dict[str, Any] = {}

    def training_sigmas(self) -> torch.Tensor:
        return self.host.training_sigmas()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.host.encode_images(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.host.decode_latents(latents, differentiable=True)

    def _cond(self, text: str):
        if text not in self._conds:
            with torch.no_grad():
                self._conds[text] = self.host.encode_text([text])
        return self._conds[text]

    def identity(self) -> str:
        """The model and the prompts, for a run state's fingerprint (``trainers/run_state.py``)."""
        return run_state.digest([run_state.model_digest(self.host).encode(), self.prompt.encode(),
                                 self.negative.encode()])

    def run(self, sigmas, cfg, fn, shape=None):
        cond = self._cond(self.prompt)
        uncond = self._cond(self.negative) if cfg != 1.0 else None

        one = DS.host_denoiser(self.host, cond, uncond, cfg)

        def denoiser(x, sigma):  # the conds are for one prompt: one sample at a time
            return torch.cat([one(x[j:j + 1], sigma[j:j + 1]) for j in range(x.shape[0])])

        return fn(denoiser)


# ----------------------------------------------------------------------------------------------
# configuration and result


@dataclass
class SeedSelectConfig:
    width: int = 512  # pixels of the image to render
    height: int = 512
    sampler: str = "ddim"  # one of diff_sampling.SAMPLERS
    scheduler: str = "ddim_uniform"  # used when sigmas is None
    steps: int = 20
    sigmas: torch.Tensor | None = None  # an explicit schedule (ComfyUI SIGMAS) instead of scheduler/steps
    cfg: float = 7.5  # guidance of the result (the NOISE reproduces it with this cfg)
    optimise_cfg: float | None = None  # guidance while optimising; None = cfg; 1 = none (half the cost)
    iterations: int = 30
    learning_rate: float = 0.1
    lr_drop_at: int = 3  # from this iteration (0-based) on, lr * lr_drop
    lr_drop: float = 0.1
    weight_decay: float = 0.01  # torch's AdamW default, as in the official code
    semantic_weights: tuple[float, ...] = (0.05, 0.25, 0.70)  # last K steps, oldest first
    lambda_semantic: float = 10.0
    lambda_appearance: float = 1.0
    contrast_temperature: float = 0.1  # contrastive semantic loss (with ``others``)
    seed: int = 0
    start: str = "seed"  # "seed", "best_of" (candidates seeds from ``seed``), "inversion"
    candidates: int = 4  # for best_of / inversion: how many starts to score
    keep_norm: bool = True
    target_loss: float | None = None  # stop as soon as the loss is at or below this
    num_seeds: int = 1  # >1: bootstrap that many seeds in all
    bootstrap_iterations: int = 5
    use_checkpoint: bool = True
    max_bad_steps: int = 5
    #: where run states go (``trainers/run_state.py``: beside the seed file) and the name they
    #: carry; None: no states, no resume
    output_dir: str | Path | None = None
    name: str = "seedselect"
    #: continue a stopped run: "off", "latest", or a state file
    resume: str = "off"
    #: run states kept (0: none); one is written every ``state_every`` iterations, at the end of
    #: every noise's run and when the run stops (Cancel, Ctrl-C, a non-finite stop)
    keep_states: int = run_state.KEEP
    state_every: int = 10


@dataclass
class SeedSelectResult:
    noise: torch.Tensor  # [n, C, h, w] fp32 CPU, unit variance: ComfyUI's NOISE convention
    latents: torch.Tensor  # [n, C, h, w] model-space results of ``noise`` with the given settings
    images: torch.Tensor  # [n, H, W, 3] decoded latents (CPU)
    sigmas: torch.Tensor  # the schedule used
    sampler: str
    cfg: float
    losses: list[float] = field(default_factory=list)  # total loss per iteration (first run)
    semantic: list[float] = field(default_factory=list)
    appearance: list[float] = field(default_factory=list)
    start_loss: float = math.nan
    best_loss: float = math.nan
    best_iteration: int = -1
    iterations_done: int = 0
    seconds: float = 0.0
    iterations_to_target: int | None = None  # first iteration whose loss met target_loss
    seconds_to_target: float | None = None
    skipped_steps: int = 0
    cancelled: bool = False
    seed_losses: list[float] = field(default_factory=list)  # best loss of every returned seed
    resumed_from: int = 0  # the iteration a resumed run continued after (0: a fresh run)
    state_path: Path | None = None  # the last run state written (None: none)


# ----------------------------------------------------------------------------------------------
# checks (all before any work)


def check_config(cfg: SeedSelectConfig) -> None:
    """Every check of the options alone (no model, no references): the CLI runs it before loading."""
    DS.check_sampler(cfg.sampler)
    for name, v in (("width", cfg.width), ("height", cfg.height)):
        if not 8 <= v <= 16384:
            raise ValueError(f"{name} {v} px is not a size a model can render: use 8..16384 pixels "
                             "(e.g. 512 for SD1, 1024 for SDXL)")
    if not 0 <= cfg.seed <= 2**64 - 1:
        raise ValueError(f"seed must be a whole number from 0 to {2**64 - 1}, got {cfg.seed}")
    if cfg.start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, not {cfg.start!r}")
    positive = {"iterations": cfg.iterations, "learning_rate": cfg.learning_rate, "num_seeds": cfg.num_seeds,
                "candidates": cfg.candidates}
    for name, value in positive.items():
        if not 0 < value < math.inf:
            raise ValueError(f"{name} must be positive, got {value}")
    if cfg.sigmas is None and cfg.steps < 1:
        raise ValueError(f"steps must be at least 1, got {cfg.steps}")
    if not cfg.semantic_weights or any(w < 0 for w in cfg.semantic_weights):
        raise ValueError("semantic_weights must be one or more non-negative numbers (last steps, oldest first)")
    if not 0 < cfg.cfg < math.inf or (cfg.optimise_cfg is not None and not 0 < cfg.optimise_cfg < math.inf):
        raise ValueError(f"cfg must be a positive number (1 = no classifier-free guidance), got {cfg.cfg}")
    problems = run_state.option_problems(cfg.keep_states, cfg.resume)
    if cfg.state_every < 0:
        problems.append(f"state_every must be 0 (states only at the end and on a stop) or more, got {cfg.state_every}")
    if problems:
        raise ValueError("; ".join(problems))


def _check_references(references: torch.Tensor, what: str = "references") -> None:
    if references is None or not torch.is_tensor(references) or references.numel() == 0:
        raise ValueError(f"no {what}: give 3-10 images of the concept (an IMAGE batch / a folder of images)")
    if references.ndim != 4 or references.shape[-1] < 3:
        raise ValueError(f"{what} must be an image batch [B, H, W, 3], got {tuple(references.shape)}")
    if not bool(torch.isfinite(references).all()):
        raise ValueError(f"{what} contain NaN or infinite pixels")


def latent_shape(model: SeedModel, width: int, height: int, batch: int = 1) -> tuple[int, int, int, int]:
    """The noise/latent shape for an image of ``width`` x ``height`` pixels; ValueError with the
    nearest sizes that work when the model cannot take it."""
    step = model.latent_scale * model.latent_multiple
    for name, v in (("width", width), ("height", height)):
        if v < step or v % step:
            lo, hi = max(step, v // step * step), (v // step + 1) * step
            raise ValueError(f"{name} {v} px is not a size this model can render: it must be a multiple of "
                             f"{step} px (latent /{model.latent_scale}, then halved by the UNet); "
                             f"use {lo} or {hi}")
    return (batch, model.latent_channels, height // model.latent_scale, width // model.latent_scale)


def schedule(model: SeedModel, cfg: SeedSelectConfig) -> torch.Tensor:
    if cfg.sigmas is not None:
        return DS.check_sigmas(cfg.sigmas.detach().float().cpu().clone())
    return DS.make_sigmas(model.training_sigmas(), cfg.scheduler, cfg.steps)


# ----------------------------------------------------------------------------------------------
# targets


@dataclass
class _Targets:
    embeds: torch.Tensor  # [N, D] raw embeddings of the references
    latents: torch.Tensor  # [N, C, h, w]
    others: torch.Tensor | None  # [M, D] normalised centroids of other concepts

    def centroids(self, idx: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = list(range(len(self.embeds))) if idx is None else list(idx)
        return F.normalize(self.embeds[idx].mean(0), dim=-1), self.latents[idx].mean(0, keepdim=True)


def reference_batch(images, height: int, width: int) -> torch.Tensor:
    """A ``TrainingImages``' pictures (any sizes) as one ``[n, height, width, 3]`` batch (``fit_images``)."""
    return torch.cat([fit_images(im[None], height, width) for im in images.images])


def seed_entry(res: "SeedSelectResult", cfg: "SeedSelectConfig", host: Host, prompt: str,
               negative: str = "") -> "seed_bank.SeedEntry":
    """What a seed file records of a run over ``host`` (the CLI's and the WebUIs' result, and the best
    seed so far on a stop)."""
    return seed_bank.SeedEntry(
        noise=res.noise, sigmas=res.sigmas, sampler=res.sampler, cfg=res.cfg, prompt=prompt, negative=negative,
        model_name=host.info.name, model_hash=host.info.hash, family=host.info.family, scheduler=cfg.scheduler,
        steps=cfg.steps, width=cfg.width, height=cfg.height, losses=res.losses)


def fit_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize so the images cover ``height`` x ``width`` and centre-crop (no distortion)."""
    x = images[..., :3].movedim(-1, 1).float()
    scale = max(height / x.shape[-2], width / x.shape[-1])
    hw = (max(height, round(x.shape[-2] * scale)), max(width, round(x.shape[-1] * scale)))
    if hw != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width].movedim(1, -1).contiguous()


def _embeddings(vision: ImageEncoder, images: torch.Tensor, device, batch: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vision.embed(images[i:i + batch].to(device)).float()
                          for i in range(0, len(images), batch)])


def _targets(model: SeedModel, vision: ImageEncoder, references, others, cfg) -> _Targets:
    fitted = fit_images(references, cfg.height, cfg.width)
    with torch.no_grad():
        lat = torch.cat([model.encode_images(fitted[i:i + 4]) for i in range(0, len(fitted), 4)]).float()
    embeds = _embeddings(vision, references.float(), model.device)
    other = None
    if others:
        other = torch.stack([centroid(vision, o.float().to(model.device)) for o in others])
    return _Targets(embeds=embeds, latents=lat.to(model.device), others=other)


# ----------------------------------------------------------------------------------------------
# the loss of one noise


@dataclass
class _Eval:
    loss: torch.Tensor
    semantic: float
    appearance: float
    final: torch.Tensor  # final latent (detached)
    image: torch.Tensor  # decoded last x0 estimate [H, W, 3] (detached, CPU)


def semantic_terms(emb: torch.Tensor, target: torch.Tensor, others: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    """Per-image semantic loss ``[K]``: ``1 - cos`` to the target centroid, or with other concepts'
    centroids the paper's contrastive form ``-log softmax`` over all centroids of ``-dist / T``
    (dist = 1 - cos: pulled toward its own centroid, pushed from the others')."""
    f = F.normalize(emb.float(), dim=-1)
    own = f @ target
    if others is None or len(others) == 0:
        return 1 - own
    logits = torch.cat([own[:, None], f @ others.T], dim=1) / temperature
    return -torch.log_softmax(logits, dim=1)[:, 0]


class _Objective:
    """Loss of a noise for fixed targets: sample (checkpointed), decode the last K x0 estimates,
    embed, combine."""

    def __init__(self, model: SeedModel, vision: ImageEncoder, sigmas, cfg: SeedSelectConfig):
        self.model, self.vision, self.cfg = model, vision, cfg
        self.sigmas = sigmas.to(model.device)
        self.sigma_max = float(model.training_sigmas()[-1])
        steps = len(sigmas) - 1
        w = list(cfg.semantic_weights)[-steps:]  # fewer steps than weights: the last ones
        self.keep = tuple(range(-len(w), 0))
        self.weights = torch.tensor(w, dtype=torch.float32, device=model.device)

    def __call__(self, denoiser, z, target_emb, target_lat, others) -> _Eval:
        cfg = self.cfg
        x = DS.initial_latent(z, self.sigmas, self.sigma_max)
        final, kept = DS.sample(denoiser, x, self.sigmas, cfg.sampler, keep=self.keep,
                                use_checkpoint=cfg.use_checkpoint, compute_dtype=self.model.compute_dtype)
        dens = torch.cat([kept[i] for i in sorted(kept)])
        emb, imgs = self._embed(dens)
        sem = (self.weights * semantic_terms(emb, target_emb, others, cfg.contrast_temperature)).sum()
        app = F.mse_loss(final.float(), target_lat.expand_as(final))
        loss = cfg.lambda_semantic * sem + cfg.lambda_appearance * app
        return _Eval(loss, float(sem.detach()), float(app.detach()), final.detach(),
                     imgs[-1].detach().float().clamp(0, 1).cpu())

    def _embed(self, dens):
        def decode_embed(d):
            imgs = self.model.decode(d)
            return self.vision.embed(imgs), imgs

        if self.cfg.use_checkpoint and torch.is_grad_enabled() and dens.requires_grad:
            return checkpoint(decode_embed, dens, use_reentrant=False)
        return decode_embed(dens)


# ----------------------------------------------------------------------------------------------
# starts


def random_noise(shape, seed: int) -> torch.Tensor:
    """ComfyUI's ``RandomNoise(seed)`` for one latent: ``randn`` from a CPU generator seeded with
    ``seed`` (a private generator: the global RNG is untouched)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    an, bn = a.flatten() / a.norm(), b.flatten() / b.norm()
    omega = torch.acos((an @ bn).clamp(-1 + 1e-7, 1 - 1e-7))
    out = (torch.sin((1 - t) * omega) * a.flatten() + torch.sin(t * omega) * b.flatten()) / torch.sin(omega)
    return out.view_as(a)


def gaussian_norm(numel: int) -> float:
    """The most likely norm of ``numel``-dim standard Gaussian noise (the chi mode, sqrt(d - 1)):
    NAO's point - interpolated seeds must be moved back to this shell to look like noise."""
    return math.sqrt(max(numel - 1, 1))


def _inversion_candidates(model, sigmas, targets, shape, k) -> list[torch.Tensor]:
    """NAO-style starts: DDIM-invert the references' latents (no CFG, as NAO does), then
    norm-aware interpolation: the inversions and the spherical midpoints of pairs, all moved
    onto the Gaussian shell."""
    sigma_max = float(model.training_sigmas()[-1])
    scale = DS.noise_scale(sigmas, sigma_max)
    inv = model.run(sigmas, 1.0, lambda den: DS.invert(den, targets.latents, sigmas.to(model.device),
                                                        compute_dtype=model.compute_dtype),
                    tuple(targets.latents.shape))
    seeds = [(z / scale).float().cpu()[None] for z in inv]
    pairs = [slerp(seeds[i], seeds[j], 0.5) for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    r = gaussian_norm(math.prod(shape))
    return [c * (r / c.norm()) for c in (seeds + pairs)[:k]]


def _start(model, objective: _Objective, targets: _Targets, sigmas, shape, cfg) -> tuple[torch.Tensor, float]:
    """The noise to optimise from, and its loss.  best_of / inversion score every candidate by one
    forward pass without gradients (a third of an iteration each)."""
    if cfg.start == "seed":
        return random_noise(shape, cfg.seed), math.nan
    if cfg.start == "best_of":
        cands = [random_noise(shape, (cfg.seed + i) % 2**64) for i in range(cfg.candidates)]
    else:
        cands = _inversion_candidates(model, sigmas, targets, shape, cfg.candidates)
    emb, lat = targets.centroids()
    opt_cfg = cfg.optimise_cfg if cfg.optimise_cfg is not None else cfg.cfg

    def score(den):
        with torch.no_grad():
            return [float(objective(den, c.to(model.device), emb, lat, targets.others).loss) for c in cands]

    scores = model.run(sigmas, opt_cfg, score, shape)
    best = min(range(len(cands)), key=lambda i: scores[i] if math.isfinite(scores[i]) else math.inf)
    return cands[best], scores[best]


# ----------------------------------------------------------------------------------------------
# the optimisation


@dataclass
class _RunState:
    best_loss: float = math.inf
    best_z: torch.Tensor | None = None
    best_final: torch.Tensor | None = None
    best_image: torch.Tensor | None = None
    best_iteration: int = -1
    losses: list[float] = field(default_factory=list)
    semantic: list[float] = field(default_factory=list)
    appearance: list[float] = field(default_factory=list)
    iterations: int = 0
    skipped: int = 0
    to_target: int | None = None
    seconds_to_target: float | None = None
    chart: list = field(default_factory=list)  # the losses reported for the live chart (None: skipped)


# ----------------------------------------------------------------------------------------------
# stopping and continuing (trainers/run_state.py)

#: options a resumed run may change: where states go, and ``iterations`` / ``num_seeds`` raised to
#: train longer (the schedule is exact in ``sigmas`` below, so its tensor form is not compared)
_VOLATILE = ("iterations", "num_seeds", "state_every", "sigmas", "output_dir", "name", "resume", "keep_states")
_TENSORS = ("best_z", "best_final", "best_image")
_NUMBERS = ("best_loss", "best_iteration", "losses", "semantic", "appearance", "iterations", "skipped",
            "to_target", "seconds_to_target", "chart")


@dataclass
class _Session:
    """What the runs of one SeedSelect share and a resume restores: the start, every noise's run,
    where states go; ``resume_run`` / ``resume_step``: the run and its step a resume continues,
    ``resume_stopped``: whether that run had already ended at the target loss."""

    z0: torch.Tensor
    start_loss: float
    spec: run_state.StateSpec | None
    runs: list[_RunState] = field(default_factory=list)
    resume_run: int = -1
    resume_step: int = 0
    resume_stopped: bool = False
    resumed_from: int = 0  # the state's iteration, counted over all runs


def total_iterations(cfg: SeedSelectConfig) -> int:
    return cfg.iterations + (cfg.num_seeds - 1) * cfg.bootstrap_iterations


def _offset(cfg: SeedSelectConfig, run: int) -> int:
    """Iterations before run ``run`` (0: the main run; then the bootstrap runs): states number on."""
    return 0 if run == 0 else cfg.iterations + (run - 1) * cfg.bootstrap_iterations


def model_identity(model: SeedModel) -> str:
    """What names the model and its prompts in a state's fingerprint (``identity()``)."""
    fn = getattr(model, "identity", None)
    if fn is None:
        raise ValueError(f"this model ({type(model).__name__}) cannot name its weights and prompts, so a run state "
                         "could not tell another model's apart: set keep_states to 0 and resume to off")
    return fn()


def _state_spec(model, cfg: SeedSelectConfig, references, others, sigmas) -> run_state.StateSpec | None:
    """The run's ``StateSpec`` (None without ``output_dir``), the state to resume checked: the
    model and prompts, the references, the schedule, every setting but the volatile ones."""
    if cfg.output_dir is None:
        return None
    fp = run_state.fingerprint(
        "seedselect", cfg, volatile=_VOLATILE, model=model_identity(model),
        references=run_state.images_digest(references), others=run_state.images_digest(list(others or [])),
        sigmas=run_state.digest([sigmas.double().numpy().tobytes()]),
        precision=str(model.compute_dtype).replace("torch.", ""))
    spec = run_state.StateSpec(Path(cfg.output_dir), cfg.name, fp, keep=cfg.keep_states, resume=cfg.resume)
    run_state.check_resume(spec, total_iterations(cfg), longer="raise iterations or num_seeds (it has {step} "
                           "iterations in all)")
    return spec


def _pack(session: _Session, run: int, stopped: bool, cfg: SeedSelectConfig) -> tuple[dict, dict]:
    """A state's SeedSelect part: the start, and every noise's run up to the one under way."""
    tensors, runs = {"z0": session.z0}, []
    for i, st in enumerate(session.runs[:run + 1]):
        tensors.update({f"run{i}.{k}": getattr(st, k) for k in _TENSORS if getattr(st, k) is not None})
        runs.append({k: getattr(st, k) for k in _NUMBERS})
    return tensors, {"run": run, "stopped": stopped, "iterations": cfg.iterations, "start_loss": session.start_loss,
                     "runs": runs}


def _resumed(spec: run_state.StateSpec | None, cfg: SeedSelectConfig) -> _Session | None:
    """The session a state holds (None: a fresh run); refuses a state whose bootstrap runs were
    numbered for another ``iterations``."""
    if spec is None or spec.path is None:
        return None
    step, tensors, meta = run_state.read_extra(spec.path)
    run = meta["run"]
    if (run > 0 and meta["iterations"] != cfg.iterations) or (run == 0 and step > cfg.iterations):
        raise run_state.ResumeError(
            f"{spec.path.name} was saved {'after' if run else 'at iteration ' + str(step) + ' of'} a main run of "
            f"{meta['iterations']} iterations; resume with iterations {meta['iterations']}"
            + (" or more" if run == 0 else " (num_seeds may be raised)"))
    runs = []
    for i, numbers in enumerate(meta["runs"]):
        runs.append(_RunState(**numbers, **{k: tensors.get(f"run{i}.{k}") for k in _TENSORS}))
    session = _Session(tensors["z0"], meta["start_loss"], spec, runs, run, step - _offset(cfg, run), meta["stopped"],
                       step)
    # the run under way: its steps and chart come back with the loop's own state
    runs[-1].iterations, runs[-1].skipped, runs[-1].chart = session.resume_step, 0, []
    return session


class _NoiseMethod:
    """One noise being optimised, as a method of the shared loop: the loss of the current noise,
    the best iterate kept (``observe``), the target loss (``should_stop``) and the noise kept on its
    starting norm after every update (``after_step``).

    ``skip_start``: the starting noise itself is never the answer (bootstrap runs start from the
    main seed; returning it unchanged would give duplicate seeds)."""

    def __init__(self, objective: "_Objective", denoiser, z0: torch.Tensor, targets: tuple, *, cfg,
                 session: _Session, run: int, t0: float, iterations: int, skip_start: bool = False):
        device = objective.model.device
        self.objective, self.denoiser, self.targets, self.cfg = objective, denoiser, targets, cfg
        self.session, self.run, self.state, self.t0 = session, run, session.runs[run], t0
        self.stopped = False
        self.z = z0.detach().clone().to(device, torch.float32).requires_grad_(True)
        self.norm0 = z0.norm().to(device)
        self.skip_first = skip_start and iterations > 1
        self.ev: _Eval | None = None

    def parameters(self):
        return [self.z]

    def loss(self, step: int) -> torch.Tensor:
        self.state.iterations += 1
        self.ev = self.objective(self.denoiser, self.z, *self.targets)
        return self.ev.loss

    def observe(self, step: int, value: float) -> None:
        if not (self.skip_first and step == 1):
            _remember(self.state, value, self.z, self.ev, step - 1, self.cfg, self.t0)

    def should_stop(self, step: int, value: float) -> bool:
        self.stopped = self.cfg.target_loss is not None and value <= self.cfg.target_loss
        return self.stopped

    def extra_state(self) -> tuple[dict, dict]:
        return _pack(self.session, self.run, self.stopped, self.cfg)

    def after_step(self, step: int) -> None:
        if self.cfg.keep_norm:
            with torch.no_grad():
                self.z.mul_(self.norm0 / self.z.norm())

    def preview(self, step: int) -> torch.Tensor | None:
        ev = self.ev
        return ev.image if ev is not None and math.isfinite(float(ev.loss.detach())) else None


def _optimise(objective: _Objective, denoiser, z0: torch.Tensor, targets: tuple, *, iterations: int,
              cfg: SeedSelectConfig, report: "_Reporter", t0: float, session: _Session, run: int) -> None:
    """Optimise the noise of run ``run`` with the shared loop: AdamW with the official schedule
    (lr / 10 from iteration ``lr_drop_at`` on), weight decay, the non-finite guard, fp16 loss
    scaling, and its run states (resumed from the session's state when it is this run's)."""
    resuming = run == session.resume_run
    if resuming and session.resume_stopped:  # it had ended at the target: nothing more to do
        iterations = session.resume_step
    method = _NoiseMethod(objective, denoiser, z0, targets, cfg=cfg, session=session, run=run, t0=t0,
                          iterations=iterations, skip_start=run > 0)
    spec = session.spec and dataclasses.replace(session.spec, offset=_offset(cfg, run),
                                                path=session.spec.path if resuming else None)
    lcfg = loop.LoopConfig(steps=iterations, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                           preview_every=1, max_bad_steps=cfg.max_bad_steps, autocast=False,
                           lr_factor=lambda step: cfg.lr_drop if step - 1 >= cfg.lr_drop_at else 1.0,
                           save_every=cfg.state_every, state=spec)

    def progress(step, total, loss, image):
        method.state.chart.append(loss)
        report(loss, image, method.ev)

    res = loop.run(method, lcfg, device=objective.model.device, compute_dtype=objective.model.compute_dtype,
                   save=lambda step: None, progress=progress, preview=method.preview)
    method.state.skipped += res.skipped_steps


def _remember(state: _RunState, value: float, z, ev: _Eval, it: int, cfg, t0: float) -> None:
    state.losses.append(value)
    state.semantic.append(ev.semantic)
    state.appearance.append(ev.appearance)
    if value < state.best_loss:
        state.best_loss, state.best_iteration = value, it
        state.best_z = z.detach().float().cpu().clone()
        state.best_final, state.best_image = ev.final.float().cpu(), ev.image
    if cfg.target_loss is not None and value <= cfg.target_loss and state.to_target is None:
        state.to_target, state.seconds_to_target = it + 1, time.perf_counter() - t0


class _Reporter:
    """Numbers iterations across the main run and the bootstrap runs for ``progress``; with
    ``on_point``, each iteration's CLIP-space distance to the references (the weighted semantic
    term, ``1 - cos`` to the target centroid) goes out first, as the training nodes' evaluations
    do (the live chart's second panel)."""

    def __init__(self, progress: ProgressFn | None, total: int, on_point: Callable[[dict], None] | None = None):
        self.progress, self.total, self.done, self.on_point = progress, total, 0, on_point

    def __call__(self, loss, image, ev: "_Eval | None" = None) -> None:
        self.done += 1
        if self.on_point is not None and ev is not None and loss is not None:
            self.on_point({"step": self.done, "CLIP distance": float(ev.semantic)})
        if self.progress is not None:
            self.progress(self.done, self.total, loss, image)


def _subsets(n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` bootstrap samples of ``n`` references (drawn with replacement, duplicates dropped),
    all different where the references allow it, and never the full set when there is more than
    one reference, so every subset pulls somewhere new."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    for _ in range(count):
        for _try in range(50):
            idx = sorted(set(torch.randint(0, n, (n,), generator=g).tolist()))
            if len(idx) == n and n > 1:
                idx.pop(int(torch.randint(0, n, (1,), generator=g)))
            if idx not in out:
                break
        out.append(idx)
    return out


def train_seedselect(model: SeedModel, vision: ImageEncoder, references: torch.Tensor,
                     cfg: SeedSelectConfig, progress: ProgressFn | None = None, *,
                     others: Sequence[torch.Tensor] | None = None,
                     on_cancel: Callable[[SeedSelectResult], None] | None = None,
                     on_point: Callable[[dict], None] | None = None) -> SeedSelectResult:
    """Optimise ``cfg.num_seeds`` noises for ``references`` (``[N, H, W, 3]`` in [0, 1]).
    ``on_point`` gets ``{"step", "CLIP distance"}`` every iteration (``_Reporter``).

    ``others``: reference batches of other concepts, for the contrastive semantic loss.  Cancel
    (an exception from ``progress`` or the model): ``on_cancel`` gets the best seeds so far, then
    the exception propagates.  With ``cfg.output_dir`` the run's states are written there (the
    exception then carries the last one as ``likeness_state``) and ``cfg.resume`` continues one.
    """
    check_config(cfg)
    _check_references(references)
    for i, o in enumerate(others or []):
        _check_references(o, f"references of other concept {i + 1}")
    shape = latent_shape(model, cfg.width, cfg.height)
    sigmas = schedule(model, cfg)
    spec = _state_spec(model, cfg, references, others, sigmas)
    t0 = time.perf_counter()
    targets = _targets(model, vision, references, others, cfg)
    objective = _Objective(model, vision, sigmas, cfg)
    session = _resumed(spec, cfg) or _Session(*_start(model, objective, targets, sigmas, shape, cfg), spec)
    opt_cfg = cfg.optimise_cfg if cfg.optimise_cfg is not None else cfg.cfg
    report = _Reporter(progress, total_iterations(cfg), on_point)
    runs = session.runs
    try:
        with run_state.owned(spec):  # the name is this run's until it ends, across its loop runs
            model.run(sigmas, opt_cfg, lambda den: _all_runs(objective, den, session, targets, cfg, report, t0), shape)
    except BaseException as exc:
        with contextlib.suppress(AttributeError):
            exc.likeness_state = _last_state(spec)
        if on_cancel is not None and runs and runs[0].best_z is not None:
            on_cancel(_result(model, objective, sigmas, cfg, opt_cfg, session, t0, cancelled=True))
        raise
    return _result(model, objective, sigmas, cfg, opt_cfg, session, t0)


def _last_state(spec: run_state.StateSpec | None) -> Path | None:
    states = run_state.list_states(spec.folder, spec.name) if spec is not None else []
    return states[-1] if states else None


def _all_runs(objective, denoiser, session: _Session, targets: _Targets, cfg, report, t0) -> None:
    """The main run, then the bootstrap runs from its best seed; a resumed session redraws the
    chart of the runs it had finished and continues the one under way."""
    subsets = [None] + _subsets(len(targets.embeds), cfg.num_seeds - 1, cfg.seed)
    for run, idx in enumerate(subsets):
        if run < session.resume_run:
            for value in session.runs[run].chart:
                report(value, None)
            continue
        if run >= len(session.runs):
            session.runs.append(_RunState())
        e, l = targets.centroids(idx)
        _optimise(objective, denoiser, session.z0 if run == 0 else session.runs[0].best_z, (e, l, targets.others),
                  iterations=cfg.iterations if run == 0 else cfg.bootstrap_iterations, cfg=cfg, report=report,
                  t0=t0, session=session, run=run)


def _result(model, objective, sigmas, cfg, opt_cfg, session: _Session, t0,
            cancelled: bool = False) -> SeedSelectResult:
    runs, start_loss = session.runs, session.start_loss
    done = [r for r in runs if r.best_z is not None]
    noise = torch.cat([r.best_z for r in done])
    if opt_cfg == cfg.cfg or cancelled:
        latents = torch.cat([r.best_final for r in done])
    else:  # optimised without (or with other) guidance: render the result with the real cfg
        latents = render(model, noise, sigmas, cfg.sampler, cfg.cfg).cpu()
    with torch.no_grad():
        images = torch.cat([model.decode(latents[i:i + 1].to(model.device)).float().cpu()
                            for i in range(len(latents))]) if not cancelled else \
            torch.stack([r.best_image for r in done])
    main = runs[0]
    return SeedSelectResult(
        noise=noise, latents=latents, images=images.clamp(0, 1), sigmas=sigmas, sampler=cfg.sampler, cfg=cfg.cfg,
        losses=main.losses, semantic=main.semantic, appearance=main.appearance,
        start_loss=start_loss if math.isfinite(start_loss) else (main.losses[0] if main.losses else math.nan),
        best_loss=main.best_loss, best_iteration=main.best_iteration, iterations_done=sum(r.iterations for r in runs),
        seconds=time.perf_counter() - t0, iterations_to_target=main.to_target,
        seconds_to_target=main.seconds_to_target, skipped_steps=sum(r.skipped for r in runs),
        cancelled=cancelled, seed_losses=[r.best_loss for r in done],
        resumed_from=session.resumed_from,
        state_path=_last_state(session.spec))


def render(model: SeedModel, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str, cfg: float) -> torch.Tensor:
    """The final latents ``noise`` gives with these settings (no gradients), one seed at a time."""
    sigma_max = float(model.training_sigmas()[-1])

    def go(den):
        outs = []
        with torch.no_grad():
            for z in noise:
                x = DS.initial_latent(z[None].to(model.device, torch.float32), sigmas.to(model.device), sigma_max)
                outs.append(DS.sample(den, x, sigmas.to(model.device), sampler,
                                      compute_dtype=model.compute_dtype)[0])
        return torch.cat(outs)

    return model.run(sigmas, cfg, go, (1, *noise.shape[1:]))


__all__ = ["check_config", "SeamSeedModel", "SeedSelectConfig", "SeedSelectResult", "train_seedselect",
           "render", "random_noise", "latent_shape", "schedule", "semantic_terms", "fit_images", "slerp",
           "gaussian_norm", "STARTS"]
