"""DreamBooth (Ruiz et al. 2023, arXiv 2208.12242): bind an identifier to a subject by fine-tuning
the denoiser on a few images, with the prior-preservation loss (eq. 2)

    L = E[w_t ||x̂(x_t, c) - x||²] + λ · E[||x̂(x_pr,t', c_pr) - x_pr||²]

in the model's own parameterisation (eps or v, through ``seam.Host.output_scale``), where ``x_pr``
are samples the *frozen* model drew for the class prompt.  Three modes:

* ``lora`` - low-rank adapters (``trainers/lora.py``) on the UNet and optionally the text
  encoders; the file is kohya's format (``formats.kohya_lora.save_lora``).
* ``full`` - every UNet parameter (optionally the text encoders') gets an fp32 *delta*; the host's
  weights stay untouched and the result is a single-file checkpoint (plus, optionally, the delta
  distilled into a LoRA).
* ``pivotal`` - Textual Inversion vectors for a new word and a LoRA trained together, the vectors
  only for the first ``ti_fraction`` of the steps (the "pivot"), as diffusers' advanced scripts do.

Instance and prior samples share one forward (one batch of 2B).  Min-SNR-γ weights (Hang et al.
2023) are computed per sample from *that sample's own* noise level and applied to the instance half;
the prior term is unweighted (algorithms.md §2.1: diffusers' basic scripts compute them from all 2B
timesteps - a silent broadcast for B = 1, an error for B > 1).
"""
from __future__ import annotations

import contextlib
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import data as D
from . import best_step as BS
from . import loop, objective, preflight, run_state
from .formats import embedding, kohya_lora
from .formats.files import check_paths_writable, safe_path, validate_name
from .formats.layer_names import layer_key, normalize_layer_name
from .formats.metadata import trained_steps
from .lora import PRESETS, LoraSet, extract_lora, fit_layers, target_weights
from .diff_sampling import sample_euler
from .objective import min_snr_weights
from .seam import Host, ImageMeta, Tunable
from .preview import render_preview
from .word_vectors import initial_vectors

MODES = ("lora", "full", "pivotal")
PROMPT_SOURCES = ("auto", "instance", "captions")


@dataclass
class DreamBoothConfig:
    name: str  # file name of the LoRA / checkpoint
    output_dir: str | Path  # loras folder (lora, pivotal) or checkpoints folder (full)
    instance_prompt: str  # "a photo of sks dog"; pivotal: contains ``token``
    mode: str = "lora"
    class_prompt: str = ""  # "a photo of a dog"; "" = no prior preservation
    prior_weight: float = 1.0  # λ
    num_class_images: int = 50  # sampled with the frozen model when no class images are given
    class_sample_steps: int = 20
    class_cfg: float = 7.0
    prompts: str = "auto"  # auto | instance | captions (auto: captions when every image has one)
    # LoRA
    rank: int = 8
    alpha: float | None = None  # None: = rank (scale 1, as diffusers)
    targets: str = "attention"
    train_text_encoder: bool = False
    # optimisation
    steps: int = 500
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-5
    batch_size: int = 1
    min_snr_gamma: float = 0.0  # 0: off; 5 is the paper's value
    noise_offset: float = 0.0
    optimizer: str = "adamw"  # adamw | adafactor
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False  # the memory preflight may also turn it on (trainers/preflight.py)
    memory_budget_gb: float = 0.0  # 0: the device's free memory (CUDA)
    seed: int = 0
    # data
    resolution: int | None = None
    random_crop: bool = False
    flip: bool = False  # DreamBooth default: subjects are often asymmetric
    # pivotal
    token: str = ""
    embedding_dir: str | Path | None = None
    init_text: str = ""  # "": the class prompt's last word, else "object"
    num_vectors: int = 2
    ti_learning_rate: float = 5e-3
    ti_fraction: float = 0.5
    bundle_embedding: bool = False
    #: lora / pivotal: continue an existing kohya LoRA file (ours or another tool's): its layers,
    #: ranks and alphas are trained on (rank, alpha, targets and train_text_encoder are then the
    #: file's), and the written step count continues from the file's own
    init_lora: str = ""
    #: pivotal: continue the new word's vectors from an embedding file (default: the vectors
    #: ``init_lora`` bundles under the token, else ``init_text``)
    init_embedding: str = ""
    # full
    extract_rank: int = 0  # full: also write the delta as a LoRA of this rank (0: no)
    lora_dir: str | Path | None = None  # where the extracted LoRA goes (default: output_dir)
    # files, previews
    save_dtype: str = "fp16"
    save_every: int = 100
    preview_every: int = 50
    preview_prompt: str = ""  # "": the instance prompt
    preview_steps: int = 20
    preview_cfg: float = 5.0
    overwrite: bool = False
    #: continue a stopped run: "off", "latest", or a state file (``trainers/run_state.py``)
    resume: str = "off"
    #: run states kept beside the result (0: none)
    keep_states: int = run_state.KEEP
    # best step (trainers/best_step.py): sample the evaluation prompts every N steps (0: off)
    eval_every: int = 0
    eval_prompts: str = ""  # one per line, {} = the instance prompt; "": best_step.DEFAULT_PROMPTS["instance"]
    eval_steps: int = 20  # sampling steps of each evaluation image (Euler, cfg preview_cfg)


@dataclass
class DreamBoothResult:
    files: list[Path]
    losses: list[float]
    steps_done: int
    skipped_steps: int
    seconds: float
    mode: str
    lora_layers: dict = field(default_factory=dict)  # module -> (down, up, alpha), fp32 CPU
    deltas: dict = field(default_factory=dict)  # full: parameter -> delta, fp32 CPU
    vectors: dict = field(default_factory=dict)  # pivotal: encoder key -> [n, width]
    class_images: int = 0
    preview: torch.Tensor | None = None
    data_summary: str = ""
    resumed_from: int = 0  # the step a resumed run continued after (0: a fresh run)
    state_path: Path | None = None  # the last run state written
    notes: list[str] = field(default_factory=list)  # settings the run changed on its own (memory)
    first_step: int = 0  # steps the init LoRA had before this run; the files count on from it
    #: the evaluation (best step) of the run, None when ``eval_every`` was 0; its ``state`` holds
    #: the best snapshot's ``lora_layers`` / ``deltas`` / ``vectors``
    evaluation: BS.Outcome | None = None

    def pick(self, which: str) -> dict:
        """``lora_layers``, ``deltas`` and ``vectors`` of the "best" snapshot or the "last" step
        (the last when there was no evaluation)."""
        if which == "best" and self.evaluation is not None and self.evaluation.state:
            return self.evaluation.state
        return {"lora_layers": self.lora_layers, "deltas": self.deltas, "vectors": self.vectors}


# ------------------------------------------------------------------------------------------
# checks: everything that can fail happens before any model work


def check_config(cfg: DreamBoothConfig) -> None:
    """Every check of the options alone (no model, no images): the CLI runs it before loading."""
    problems = _check_config(cfg)
    if problems:
        raise ValueError("; ".join(problems))


def _check_config(cfg: DreamBoothConfig) -> list[str]:
    p = D.number_problems(cfg.seed, cfg.resolution) + run_state.option_problems(cfg.keep_states, cfg.resume)
    if cfg.mode not in MODES:
        p.append(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if not cfg.instance_prompt.strip():
        p.append("the instance prompt is empty: use e.g. 'a photo of sks dog' (identifier + class)")
    if cfg.steps < 1:
        p.append(f"steps must be at least 1, got {cfg.steps}")
    if cfg.batch_size < 1:
        p.append(f"batch size must be at least 1, got {cfg.batch_size}")
    for what, lr in (("learning rate", cfg.learning_rate), ("text encoder learning rate", cfg.text_encoder_lr),
                     ("pivotal word learning rate", cfg.ti_learning_rate)):
        if not 0 < lr <= 1:
            p.append(f"{what} must be in (0, 1], got {lr}")
    if cfg.mode != "full" and cfg.rank < 1:
        p.append(f"LoRA rank must be at least 1, got {cfg.rank}")
    if cfg.alpha is not None and not cfg.alpha > 0:
        p.append(f"LoRA alpha must be positive, got {cfg.alpha}")
    if cfg.targets not in PRESETS:
        p.append(f"LoRA targets must be one of {', '.join(PRESETS)}, got {cfg.targets!r}")
    for what, v in (("prior weight", cfg.prior_weight), ("class image count", cfg.num_class_images),
                    ("min-SNR gamma", cfg.min_snr_gamma), ("noise offset", cfg.noise_offset)):
        if not 0 <= v < math.inf:
            p.append(f"{what} must be 0 or a positive number, got {v}")
    if cfg.prompts not in PROMPT_SOURCES:
        p.append(f"prompts must be one of {', '.join(PROMPT_SOURCES)}, got {cfg.prompts!r}")
    if cfg.save_every < 0 or cfg.preview_every < 0:
        p.append("save/preview intervals must be 0 (off) or positive")
    p += BS.check_plan(cfg.eval_every, cfg.eval_steps)
    if cfg.init_lora.strip() and cfg.mode == "full":
        p.append("init LoRA continues a LoRA (modes lora and pivotal); a full fine-tune starts from the model")
    if cfg.init_embedding.strip() and cfg.mode != "pivotal":
        p.append("init embedding continues the new word of pivotal tuning; use mode pivotal (or Textual Inversion)")
    if cfg.extract_rank < 0:
        p.append(f"extract rank must be 0 (off) or positive, got {cfg.extract_rank}")
    if not cfg.memory_budget_gb >= 0:
        p.append(f"memory budget must be 0 (the device's free memory) or a size in GB, got {cfg.memory_budget_gb}")
    if cfg.mode == "pivotal":
        if not cfg.token:
            p.append("pivotal tuning needs the new word (token) it learns vectors for")
        elif cfg.token not in cfg.instance_prompt:
            p.append(f"the instance prompt must contain the new word {cfg.token!r}")
        if not 1 <= cfg.num_vectors <= 75:
            p.append(f"vectors per token must be 1..75, got {cfg.num_vectors}")
        if not 0 < cfg.ti_fraction <= 1:
            p.append(f"the Textual Inversion fraction must be in (0, 1], got {cfg.ti_fraction}")
    return p


@dataclass
class _Plan:
    images: list[torch.Tensor]
    crop_hw: tuple[int, int]
    captions: list[str | None]
    class_images: list[torch.Tensor] | None
    prior: bool
    files: dict[str, Path]
    init_text: str = ""
    state: run_state.StateSpec | None = None
    best_files: dict[str, Path] = field(default_factory=dict)
    start: "_Start | None" = None


@dataclass
class _Start:
    """What a run continues from files (``init_lora`` / ``init_embedding``): the LoRA's layers per
    part (``{part: {weight name: (down, up, alpha)}}``, None: fresh adapters), the word's vectors
    (None: from the init text), and the steps each file had been trained for."""

    layers: dict[str, dict] | None = None
    vectors: dict[str, torch.Tensor] | None = None
    lora_step: int = 0
    vector_step: int = 0


def _lora_start(host: Host, path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """A kohya LoRA file's layers placed on this host's weights, by part; refused, naming the
    file and its first key that does not fit, when it was made for another model."""
    if not path.is_file():
        raise FileNotFoundError(f"init LoRA {path} does not exist: give a kohya LoRA .safetensors file")
    parts = {"unet": host.tunable_parameters("unet")}
    parts.update({e.key: host.tunable_parameters(e.key) for e in host.text_encoders()})
    owner = {n[:-len(".weight")]: part for part, ps in parts.items() for n in ps if n.endswith(".weight")}
    fam, layout = host.info.family, host.unet_layout()
    try:
        layers, meta = kohya_lora.load_lora(path, family=fam, layout=layout, module_names=owner, naming=host.naming)
    except ValueError as e:
        raise ValueError(f"init LoRA {path}: {e} It was made for another model; give a LoRA of this "
                         f"{fam} model") from e
    out: dict[str, dict] = {}
    for name, layer in layers.items():
        part = owner[name]
        try:
            out.setdefault(part, {}).update(fit_layers({name: layer}, parts[part]))
        except ValueError as e:
            key = layer_key(normalize_layer_name(name, fam, layout, host.naming), fam, layout)
            raise ValueError(f"init LoRA {path}: layer {key}: {e}; it was made for another model") from e
    return out, meta


def _start_files(host: Host, cfg: DreamBoothConfig) -> _Start:
    """Read and check ``init_lora`` / ``init_embedding`` before any work."""
    start = _Start()
    if cfg.init_lora.strip():
        path = Path(cfg.init_lora.strip())
        start.layers, meta = _lora_start(host, path)
        start.lora_step = trained_steps(meta)
        if cfg.mode == "pivotal" and not cfg.init_embedding.strip():
            bundled = kohya_lora.load_bundled_embeddings(path, host.info.family).get(cfg.token)
            if bundled is not None:
                start.vectors, start.vector_step = bundled, start.lora_step
    if cfg.init_embedding.strip():
        path = Path(cfg.init_embedding.strip())
        if not path.is_file():
            raise FileNotFoundError(f"init embedding {path} does not exist: give an embedding file")
        widths = {e.key: e.width for e in host.text_encoders()}
        try:
            start.vectors, meta = embedding.load_embedding(path, family=host.info.family, widths=widths)
            embedding.check_vectors(start.vectors, host.info.family, widths)
        except ValueError as e:
            raise ValueError(f"init embedding {path}: {e} Give an embedding of this model's family.") from e
        start.vector_step = trained_steps(meta)
    return start


def _files_digest(cfg: DreamBoothConfig) -> str:
    """The init files' contents, for the fingerprint: a resume must continue from the same files."""
    names = [p.strip() for p in (cfg.init_lora, cfg.init_embedding) if p.strip()]
    return run_state.digest(Path(p).read_bytes() for p in names if Path(p).is_file())


def _prompts(images: D.TrainingImages, how: str, cfg: DreamBoothConfig) -> list[str | None]:
    have = [c is not None for c in images.captions]
    use = how == "captions" or (how == "auto" and have and all(have))
    if how == "captions" and not all(have):
        missing = [s for s, h in zip(images.sources, have) if not h]
        raise D.DatasetError("prompts 'captions' but these images have no caption: " + ", ".join(missing))
    if not use:
        if any(have):
            images.notes.append("captions present but not used: every image trains with the instance prompt")
        return [None] * len(images)
    caps = [c.replace(D.NAME_TAG, cfg.token or "") for c in images.captions]  # type: ignore[union-attr]
    if cfg.mode == "pivotal":
        lacking = [s for s, c in zip(images.sources, caps) if cfg.token not in c]
        if lacking:
            raise D.DatasetError(f"captions must contain the new word {cfg.token!r}; missing in: " + ", ".join(lacking))
    return caps


def _output_files(host: Host, cfg: DreamBoothConfig, name: str, overwrite: bool) -> dict[str, Path]:
    files = {}
    if cfg.mode == "full":
        files["checkpoint"] = safe_path(cfg.output_dir, name + ".safetensors")
        check_paths_writable(cfg.output_dir, [files["checkpoint"]], overwrite)
        if cfg.extract_rank:
            files["lora"] = kohya_lora.check_can_write_lora(cfg.lora_dir or cfg.output_dir, name + "_lora",
                                                              overwrite)
    else:
        files["lora"] = kohya_lora.check_can_write_lora(cfg.output_dir, name, overwrite)
    if cfg.mode == "pivotal":
        embedding.check_can_write(cfg.embedding_dir or cfg.output_dir, cfg.token, host.info.family, overwrite)
    return files


#: options a resumed run may change: they decide what is shown and written, not what is trained
_VOLATILE = ("save_every", "preview_every", "preview_prompt", "preview_steps", "preview_cfg", "overwrite",
             "save_dtype", "extract_rank", "lora_dir", "embedding_dir", "bundle_embedding", "memory_budget_gb",
             "init_lora", "init_embedding")  # the init files are compared by their contents


def _state_spec(host: Host, images: D.TrainingImages, cfg: DreamBoothConfig, name: str,
                class_images: D.TrainingImages | None) -> run_state.StateSpec:
    cls = run_state.images_digest(class_images.images) if class_images is not None and len(class_images) else ""
    init = {"init_files": _files_digest(cfg)} if (cfg.init_lora.strip() or cfg.init_embedding.strip()) else {}
    return run_state.spec_for(f"dreambooth_{cfg.mode}", cfg, host, images, name=name, folder=cfg.output_dir,
                              volatile=_VOLATILE, class_images=cls, **init)
def _best_cfg(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """The config the best snapshot is written with: ``<name>.best`` (pivotal: ``<token>.best``)."""
    return replace(cfg, name=cfg.name.strip() + ".best", token=cfg.token + ".best" if cfg.token else "")


def prepare(host: Host, images: D.TrainingImages, cfg: DreamBoothConfig,
            class_images: D.TrainingImages | None = None, encoders: BS.Encoders | None = None) -> _Plan:
    """Every check that can fail, before any model work: config, model, names, files, images."""
    check_config(cfg)
    problems = BS.check_plan(cfg.eval_every, cfg.eval_steps, encoders is not None)
    if problems:
        raise ValueError("; ".join(problems))
    if not isinstance(host, Tunable):
        raise ValueError(f"this model ({type(host).__name__}) cannot be fine-tuned by Likeness: it does not "
                         "expose its weights for patching (SD1.x, SD2.x and SDXL checkpoints do)")
    name = validate_name(cfg.name)
    if cfg.mode == "pivotal":
        validate_name(cfg.token)
        host.check_placeholder(cfg.token)
    if len(images) == 0:
        raise D.DatasetError("no instance images: connect 3-5 images of the subject")
    start = _start_files(host, cfg)
    spec = _state_spec(host, images, cfg, name, class_images)
    replace_own = cfg.overwrite or spec.path is not None  # a resume replaces its own files
    files = _output_files(host, cfg, name, replace_own)
    best_files = _output_files(host, _best_cfg(cfg), name + ".best", replace_own) if cfg.eval_every else {}
    captions = _prompts(images, cfg.prompts, cfg)
    planned = D.plan_geometry(images, cfg.resolution, host.latent_scale)
    crop = min(min(im.shape[:2]) for im in planned) if cfg.resolution else None
    crop_hw = (crop, crop) if crop else tuple(planned[0].shape[:2])
    prior = bool(cfg.class_prompt.strip()) and cfg.prior_weight > 0
    cls_planned = None
    if class_images is not None and len(class_images):
        if not cfg.class_prompt.strip():
            raise ValueError("class images were given but no class prompt (e.g. 'a photo of a dog'); "
                             "the prior-preservation loss needs the prompt they show")
        cls_planned = _plan_class_images(class_images, crop_hw)
    elif prior and cfg.num_class_images < 1:
        raise ValueError("prior preservation needs class images: connect some, or let the model "
                         "sample them (class image count > 0)")
    init = ""
    if cfg.mode == "pivotal":
        words = cfg.class_prompt.split()
        init = cfg.init_text.strip() or (words[-1] if words else "object")
        if cfg.token in init.split():
            raise ValueError(f"the init text must describe the concept with existing words, not {cfg.token!r}")
    return _Plan(planned, crop_hw, captions, cls_planned, prior, files, init, spec, best_files, start)


def _plan_class_images(class_images: D.TrainingImages, crop_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Class images at the training size: resized to cover it and centre-cropped, so a user who
    changes the training resolution need not change the size the class images are drawn at."""
    return [D.cover_crop(im, crop_hw) for im in class_images.images]


# ------------------------------------------------------------------------------------------
# class images sampled by the frozen model


def sample_class_latents(host: Host, prompt: str, count: int, size_hw: tuple[int, int], *, steps: int,
                         cfg: float, seed: int, batch: int = 4,
                         progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``count`` latents the *frozen* model draws for ``prompt`` (Euler, CFG): the x_pr of eq. 2.
    Kept as latents - no decode/re-encode round trip through the VAE."""
    out = []
    f = host.latent_scale
    for start in range(0, count, batch):
        n = min(batch, count - start)
        meta = [ImageMeta(size_hw, (0, 0), size_hw)] * n
        with torch.no_grad():
            cond = host.encode_text([prompt] * n, meta=meta)
            uncond = host.encode_text([""] * n, meta=meta)
            shape = (n, host.latent_channels, size_hw[0] // f, size_hw[1] // f)
            seed_k = D.offset_seed(seed, start)
            out.append(sample_euler(host, cond, uncond, shape=shape, steps=steps, cfg=cfg, seed=seed_k).float())
        if progress is not None:
            progress(start + n, count)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# the method the loop drives


class _CondCache:
    """Text conditioning per (prompts, sizes): computed once while the text encoders are frozen."""

    def __init__(self, size: int = 64):
        self.items: OrderedDict = OrderedDict()
        self.size = size

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class DreamBooth:
    def __init__(self, host: Host, cfg: DreamBoothConfig, inst: D.LatentCache, prompts: list[str],
                 prior: D.LatentCache | None, groups: list[dict], vectors: dict | None, text_lora: bool = False):
        self.host, self.cfg, self.inst, self.prior, self.groups = host, cfg, inst, prior, groups
        self.prompts = prompts  # per instance image
        self.vectors = vectors
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed)
        self.sigmas = host.training_sigmas().float()
        # an init LoRA may adapt the text encoders without train_text_encoder
        self.text_trains = cfg.train_text_encoder or vectors is not None or text_lora
        self.conds = _CondCache()

    def param_groups(self) -> list[dict]:
        return self.groups

    def parameters(self):
        return [p for g in self.groups for p in g["params"]]

    def _encode(self, prompts: list[str], metas: list[ImageMeta]):
        placeholder = self.cfg.token if self.vectors is not None else None
        if self.text_trains:
            return self.host.encode_text(prompts, placeholder, self.vectors, metas)
        with torch.no_grad():
            return self.conds.get((tuple(prompts), tuple(metas)),
                                  lambda: self.host.encode_text(prompts, None, None, metas))

    def loss(self, step: int) -> torch.Tensor:
        host, b = self.host, self.cfg.batch_size
        x0, idx, metas = self.inst.sample(b, self.rng)
        prompts = [self.prompts[i] for i in idx]
        if self.prior is not None:
            xp, _, pmetas = self.prior.sample(b, self.rng)
            x0 = torch.cat([x0, xp.to(x0.device)])
            prompts += [self.cfg.class_prompt] * b
            metas += pmetas
        n = objective.noised(x0, self.sigmas, self.gen, self.cfg.noise_offset)
        sigma = n.sigma
        x0_hat = host.denoise(n.x, sigma, self._encode(prompts, metas))
        err = objective.native_error(host, x0_hat, x0, sigma)
        inst = err[:b]
        if self.cfg.min_snr_gamma:
            inst = inst * min_snr_weights(sigma[:b], self.cfg.min_snr_gamma, host.info.prediction).to(inst.device)
        loss = inst.mean()
        if self.prior is not None:
            loss = loss + self.cfg.prior_weight * err[b:].mean()
        return loss


# ------------------------------------------------------------------------------------------
# training


class _Trainables:
    """What a mode trains: LoRA sets or full deltas (per part), and the pivotal vectors."""

    def __init__(self, host, cfg: DreamBoothConfig, init_text: str, start: _Start | None = None):
        self.host, self.cfg = host, cfg
        self.loras: dict[str, LoraSet] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.vectors: dict[str, torch.nn.Parameter] | None = None
        start = start or _Start()
        parts = ["unet"] + ([e.key for e in host.text_encoders()] if cfg.train_text_encoder else [])
        if start.layers is not None:  # an init LoRA: its own layers, ranks and alphas
            parts = []
            self.loras = {part: LoraSet.from_layers(layers, device=host.device)
                          for part, layers in start.layers.items()}
        for part in parts:
            params = host.tunable_parameters(part)
            if cfg.mode == "full":
                for n, w in params.items():
                    self.deltas[n] = torch.nn.Parameter(torch.zeros(w.shape, device=host.device))
            else:
                names = target_weights(params, cfg.targets, text_encoder=part != "unet")
                if not names:
                    raise ValueError(f"this model has no {cfg.targets!r} layers in its {part} to adapt")
                alpha = cfg.alpha if cfg.alpha is not None else float(cfg.rank)
                self.loras[part] = LoraSet({n: params[n] for n in names}, cfg.rank, alpha,
                                           device=host.device, seed=D.offset_seed(cfg.seed, len(self.loras)))
        if cfg.mode == "pivotal":
            vecs = start.vectors if start.vectors is not None else initial_vectors(host, init_text, cfg.num_vectors)
            self.vectors = {k: torch.nn.Parameter(v.to(host.device, torch.float32)) for k, v in vecs.items()}

    def groups(self) -> list[dict]:
        cfg, out = self.cfg, []
        for part, ls in self.loras.items():
            out.append({"params": ls.parameters(), "lr": cfg.learning_rate if part == "unet" else cfg.text_encoder_lr})
        if self.deltas:
            unet = [p for n, p in self.deltas.items() if self._is_unet(n)]
            text = [p for n, p in self.deltas.items() if not self._is_unet(n)]
            out.append({"params": unet, "lr": cfg.learning_rate})
            out.append({"params": text, "lr": cfg.text_encoder_lr})
        if self.vectors is not None:
            until = max(1, round(cfg.steps * cfg.ti_fraction))
            out.append({"params": list(self.vectors.values()), "lr": cfg.ti_learning_rate, "until": until})
        return out

    @staticmethod
    def _is_unet(name: str) -> bool:
        return name.startswith(("unet.", "diffusion_model."))

    def patches(self) -> dict:
        """Full fine-tune: the weight plus its fp32 delta, summed in fp32 and rounded once (a host
        that keeps a full-precision weight passes that one, so the sum is exact before the cast)."""
        return {n: (lambda w, _d=d: (w.float() + _d).to(w.dtype)) for n, d in self.deltas.items()}

    def branches(self) -> dict:
        """LoRA (and pivotal tuning's LoRA): branches on the activations, never merged weights."""
        fns = {}
        for ls in self.loras.values():
            fns.update(ls.branches())
        return fns

    def lora_layers(self) -> dict:
        out = {}
        for ls in self.loras.values():
            out.update(ls.layers())
        return out

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        return {n: d.detach().float().cpu() for n, d in self.deltas.items()}

    def vector_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in (self.vectors or {}).items()}


def _metadata(cfg: DreamBoothConfig, host: Host, n_images: int, n_class: int,
              start: _Start | None = None) -> dict[str, str]:
    continued = {}
    if start is not None and start.layers is not None:  # the step count goes on from the init LoRA's
        continued = {"ss_max_train_steps": str(start.lora_step + cfg.steps),
                     "likeness_continued_from": f"{Path(cfg.init_lora.strip()).name} (step {start.lora_step})"}
    return {
        "ss_output_name": cfg.name, "ss_training_comment": f"likeness dreambooth ({cfg.mode})",
        "ss_max_train_steps": str(cfg.steps), "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0),
        "ss_batch_size_per_device": str(cfg.batch_size), "ss_num_train_images": str(n_images),
        "ss_num_reg_images": str(n_class), "ss_prior_loss_weight": str(cfg.prior_weight),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma or None), "ss_noise_offset": str(cfg.noise_offset or None),
        "ss_seed": str(cfg.seed), "ss_optimizer": cfg.optimizer, "ss_sd_model_name": host.info.name,
        "ss_sd_model_hash": str(host.info.hash or ""), "ss_resolution": str(cfg.resolution or "native"),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_training_started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "likeness_mode": cfg.mode, "likeness_instance_prompt": cfg.instance_prompt,
        "likeness_class_prompt": cfg.class_prompt, "likeness_targets": cfg.targets,
    } | continued


class _Saver:
    """Writes the mode's files (atomically, replacing our own earlier writes of this run)."""

    def __init__(self, host, cfg: DreamBoothConfig, plan: _Plan, tr: _Trainables, meta: dict):
        self.host, self.cfg, self.plan, self.tr, self.meta = host, cfg, plan, tr, meta
        self.files: list[Path] = []
        self.widths = {e.key: e.width for e in host.text_encoders()}

    def __call__(self, step: int) -> None:
        cfg, host, files = self.cfg, self.host, []
        start = self.plan.start or _Start()  # files continued from count on from their own steps
        meta = dict(self.meta, ss_steps=str(start.lora_step + step))
        fam, pred = host.info.family, host.info.prediction
        layout = host.unet_layout()
        if cfg.mode == "full":
            deltas = self.tr.delta_tensors()
            host.save_checkpoint(self.plan.files["checkpoint"], deltas, meta)
            files.append(self.plan.files["checkpoint"])
            if cfg.extract_rank:
                layers = extract_lora(deltas, cfg.extract_rank)
                layers = {n: l for n, l in layers.items() if _loader_maps(n, fam, layout, host.naming)}
                if layers:
                    p = self.plan.files["lora"]
                    files.append(kohya_lora.save_lora(p.parent, p.stem, layers, family=fam, metadata=meta,
                                                      dtype=cfg.save_dtype, prediction=pred, layout=layout,
                                                      naming=host.naming, overwrite=True))
        else:
            p = self.plan.files["lora"]
            vecs = self.tr.vector_tensors()
            bundle = {cfg.token: vecs} if (cfg.mode == "pivotal" and cfg.bundle_embedding) else None
            files.append(kohya_lora.save_lora(p.parent, p.stem, self.tr.lora_layers(), family=fam, metadata=meta,
                                              dtype=cfg.save_dtype, prediction=pred, layout=layout, naming=host.naming,
                                              bundle_emb=bundle, bundle_widths=self.widths, overwrite=True))
            if cfg.mode == "pivotal":
                done = start.vector_step + step
                files += embedding.save_embedding(cfg.embedding_dir or cfg.output_dir, cfg.token, vecs, host.info,
                                                  step=done, metadata={"trainer": "likeness pivotal tuning",
                                                                       "steps_done": str(done)},
                                                  overwrite=True, widths=self.widths)
        self.files = files


def _loader_maps(name: str, family: str, layout, naming) -> bool:
    try:
        normalize_layer_name(name, family, layout, naming)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def _trained(host: Host, tr: _Trainables):
    """The network as the method trains it (what the step, the preflight and previews run in):
    full fine-tune deltas as parameter patches, LoRA as branches on the activations."""
    with host.parameter_patches(tr.patches()), host.module_branches(tr.branches()):
        yield


def _preflight(host: Host, cfg: DreamBoothConfig, plan: _Plan, tr: _Trainables) -> preflight.Choice:
    """Will the run fit?  Measured with the mode's own step (patched network, the prior's doubled
    batch) before class images are sampled or any latent is encoded."""
    batch = cfg.batch_size * (2 if plan.prior else 1)
    token = cfg.token if tr.vectors is not None else None
    step = preflight.denoising_step(host, cfg.instance_prompt, batch, token, tr.vectors)
    hw = (plan.crop_hw[0] // host.latent_scale, plan.crop_hw[1] // host.latent_scale)
    numel = sum(p.numel() for g in tr.groups() for p in g["params"])
    with _trained(host, tr):
        return preflight.plan(host, step, target_hw=hw, trainable_numel=numel, optimizer=cfg.optimizer,
                              checkpointing=cfg.gradient_checkpointing, budget_gb=cfg.memory_budget_gb,
                              what_to_lower="the batch size or the resolution, or use mode lora instead of full")
def _eval_plan(cfg: DreamBoothConfig) -> BS.Plan:
    word, noun = BS.identifier(cfg.instance_prompt, cfg.class_prompt)
    prompts = BS.fill(BS.parse_prompts(cfg.eval_prompts, "instance"), cfg.instance_prompt)
    return BS.Plan(cfg.eval_every, prompts, cfg.eval_steps, cfg.preview_cfg, cfg.seed, word, noun)


def _evaluation(host: Host, cfg: DreamBoothConfig, plan: _Plan, tr: "_Trainables", encoders, on_point):
    """The loop's best-step hook: the evaluation prompts sampled through the patched model."""
    sample = BS.host_sampler(host, cfg.token, tr.vectors, plan.crop_hw, cfg.eval_steps, cfg.preview_cfg)
    params = [p for g in tr.groups() for p in g["params"]]
    return BS.start(_eval_plan(cfg), encoders, plan.images, sample, params, on_point)


def _finish_best(best, host: Host, cfg: DreamBoothConfig, plan: _Plan, tr: "_Trainables", meta: dict):
    """``<name>.best.*`` written with the best snapshot's values, and those values for the nodes."""
    saver = _Saver(host, _best_cfg(cfg), replace(plan, files=plan.best_files), tr, meta)

    def write(step: int) -> list[Path]:
        saver.meta = dict(meta, likeness_best_step=str(step))
        saver(step)
        return saver.files

    return BS.finish(best, write, lambda: {"lora_layers": tr.lora_layers(), "vectors": tr.vector_tensors(),
                                           "deltas": tr.delta_tensors() if cfg.mode == "full" else {}})


def train_dreambooth(host: Host, images: D.TrainingImages, cfg: DreamBoothConfig,
                     class_images: D.TrainingImages | None = None,
                     progress: loop.ProgressFn | None = None,
                     class_progress: Callable[[int, int], None] | None = None,
                     encoders: BS.Encoders | None = None,
                     on_point: Callable[[BS.Point], None] | None = None) -> DreamBoothResult:
    """Train, write the mode's files (every ``save_every`` steps, at the end and on Cancel) and
    return the result.  The host's weights are never modified.  With ``eval_every`` the best
    step is kept (``encoders`` score it; ``on_point`` sees every evaluation) and written as
    ``<name>.best.*``."""
    plan = prepare(host, images, cfg, class_images, encoders)
    tr = _Trainables(host, cfg, plan.init_text, plan.start)
    memory = _preflight(host, cfg, plan, tr)
    inst = D.LatentCache(host, plan.images, crop_hw=plan.crop_hw, flip=cfg.flip, random_crop=cfg.random_crop)
    prior, n_class = None, 0
    if plan.prior:
        if plan.class_images is not None:
            prior = D.LatentCache(host, plan.class_images, crop_hw=plan.crop_hw, flip=False, random_crop=False)
        else:
            lat = sample_class_latents(host, cfg.class_prompt, cfg.num_class_images, plan.crop_hw,
                                       steps=cfg.class_sample_steps, cfg=cfg.class_cfg,
                                       seed=D.offset_seed(cfg.seed, 1_000_003), progress=class_progress)
            prior = D.LatentCache.from_latents(lat, host.latent_scale)
        n_class = len(prior)
    prompts = [c if c is not None else cfg.instance_prompt for c in plan.captions]
    method = DreamBooth(host, cfg, inst, prompts, prior, tr.groups(), tr.vectors,
                        text_lora=any(part != "unet" for part in tr.loras))
    saver = _Saver(host, cfg, plan, tr, _metadata(cfg, host, len(images), n_class, plan.start))
    last_preview: list[torch.Tensor] = []

    def preview(step: int) -> torch.Tensor:
        prompt = cfg.preview_prompt or cfg.instance_prompt
        img = render_preview(host, cfg.token, tr.vectors, prompt, size_hw=plan.crop_hw, steps=cfg.preview_steps,
                             cfg=cfg.preview_cfg, seed=cfg.seed)
        last_preview[:] = [img[0]]
        return img[0]

    lcfg = loop.LoopConfig(steps=cfg.steps, learning_rate=cfg.learning_rate, save_every=cfg.save_every,
                           preview_every=cfg.preview_every, optimizer=cfg.optimizer,
                           max_grad_norm=cfg.max_grad_norm, snapshot=cfg.mode != "full", state=plan.state,
                           eval_every=cfg.eval_every)
    ckpt = host.gradient_checkpointing() if memory.checkpointing else contextlib.nullcontext()
    best = _evaluation(host, cfg, plan, tr, encoders, on_point)
    with _trained(host, tr), ckpt:
        res = loop.run(method, lcfg, device=host.device, compute_dtype=host.compute_dtype, save=saver,
                       progress=progress, preview=preview if cfg.preview_every else None, evaluate=best)
    evaluation = _finish_best(best, host, cfg, plan, tr, saver.meta)
    return DreamBoothResult(
        files=list(saver.files), losses=res.losses, steps_done=res.steps_done, skipped_steps=res.skipped_steps,
        seconds=res.seconds, mode=cfg.mode, lora_layers=tr.lora_layers(),
        deltas=tr.delta_tensors() if cfg.mode == "full" else {}, vectors=tr.vector_tensors(),
        class_images=n_class, preview=last_preview[0] if last_preview else None, data_summary=images.summary(),
        resumed_from=res.resumed_from, state_path=res.state_path,
        first_step=plan.start.lora_step if plan.start is not None else 0,
        evaluation=evaluation,
        notes=[memory.note] if memory.note else [],
    )


# ---- per-mode defaults (read by the CLI and the ComfyUI nodes; one home so they cannot drift) ----


@dataclass(frozen=True)
class ModeDefaults:
    """What a mode starts from when the user does not say: a full fine-tune moves every weight, so
    it takes a smaller learning rate, more steps and Adafactor (no optimizer copies of the model);
    it still writes its multi-GB checkpoint (and its run state) every 200 steps, so a run that is
    killed keeps a recent result and can be resumed."""

    steps: int
    learning_rate: float
    text_encoder_lr: float
    optimizer: str  # "adamw" | "adafactor" (trainers/loop.py)
    save_every: int  # 0: only at the end (and on Cancel)
    folder: str  # the models/ folder the file belongs in (ComfyUI's name for it)

    def config_fields(self) -> dict:
        """The DreamBoothConfig fields these defaults fill."""
        return dict(steps=self.steps, learning_rate=self.learning_rate, text_encoder_lr=self.text_encoder_lr,
                    optimizer=self.optimizer, save_every=self.save_every)


MODE_DEFAULTS = {
    "lora": ModeDefaults(steps=500, learning_rate=1e-4, text_encoder_lr=5e-5, optimizer="adamw", save_every=100,
                         folder="loras"),
    "full": ModeDefaults(steps=800, learning_rate=5e-6, text_encoder_lr=2e-6, optimizer="adafactor", save_every=200,
                         folder="checkpoints"),
    "pivotal": ModeDefaults(steps=500, learning_rate=1e-4, text_encoder_lr=5e-5, optimizer="adamw", save_every=100,
                            folder="loras"),
}


__all__ = ["check_config", "DreamBoothConfig", "DreamBoothResult", "MODES", "MODE_DEFAULTS", "ModeDefaults", "train_dreambooth",
           "prepare", "sample_class_latents"]
