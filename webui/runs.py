"""Training runs started from a WebUI: one at a time, on the model the WebUI has loaded, through the
same trainers the ComfyUI nodes and the CLI use (``trainers/``).

The tab and the API route (``webui/api.py``) both go through ``RunManager``: ``start`` checks the
request and the dataset before any work (a bad option is an error the caller sees at once, not a
failed run), the run trains in a worker thread, ``poll`` returns its state (losses for the chart,
the last preview, the result and how to use it) and ``cancel`` stops it at the next step - the loop
then writes the last good state, so Cancel keeps a usable file, as in the nodes.

What a WebUI provides is one ``WebUIContext``: how to build a host over its loaded model, its
folders, how to refresh its lists after a file is written, and the lock its own generation holds
(a run and a generation never use the model at the same time).
"""
from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..trainers import data as D

#: the methods the tab offers
KINDS = ("ti", "lora", "pivotal", "seedselect")


class Cancelled(Exception):
    """Raised from the progress callback when the user pressed Cancel (the loop saves, then re-raises)."""


@dataclass
class WebUIContext:
    """What a WebUI hands the run manager (see the module doc)."""

    make_host: Callable[[], Any]
    embeddings_dir: Callable[[], Path]
    lora_dir: Callable[[], Path]
    seeds_dir: Callable[[], Path] = lambda: Path("models") / "likeness_seeds"
    refresh: Callable[[str], None] = lambda kind: None  # "embedding" or "lora"
    lock: Any = field(default_factory=threading.Lock)
    webui: str = "WebUI"


@dataclass
class Run:
    id: str
    kind: str
    name: str
    state: str = "starting"  # starting | running | done | cancelled | failed
    step: int = 0
    total: int = 0
    losses: list = field(default_factory=list)  # [step, loss]
    preview_png: str | None = None  # base64 PNG of the latest preview
    files: list = field(default_factory=list)
    message: str = ""
    error: str | None = None
    started: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name, "state": self.state, "step": self.step,
                "total": self.total, "losses": self.losses, "preview": self.preview_png, "files": self.files,
                "message": self.message, "error": self.error, "seconds": round(time.time() - self.started, 1)}


def _png_b64(image: torch.Tensor) -> str:
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    arr = arr[0] if arr.ndim == 4 else arr
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _num(req: dict, key: str, kind, default):
    value = req.get(key, default)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key!r} must be a {kind.__name__}, got {value!r}") from None


def ti_config(req: dict, folder: Path):
    from ..trainers.textual_inversion import TIConfig

    return TIConfig(
        name=str(req.get("name", "")).strip(), output_dir=folder, init_text=str(req.get("init_text", "")),
        num_vectors=_num(req, "vectors", int, 1), steps=_num(req, "steps", int, 500),
        learning_rate=_num(req, "learning_rate", float, 5e-3), batch_size=_num(req, "batch_size", int, 1),
        seed=_num(req, "seed", int, 0), templates=str(req.get("templates", "auto")),
        resolution=_num(req, "resolution", int, None), save_every=_num(req, "save_every", int, 100),
        preview_every=_num(req, "preview_every", int, 50),
        preview_prompt=str(req.get("preview_prompt") or "a photo of {}"), overwrite=bool(req.get("overwrite")))


def dreambooth_config(req: dict, mode: str, lora_dir: Path, embeddings_dir: Path):
    from ..trainers.dreambooth import MODE_DEFAULTS, DreamBoothConfig

    d = MODE_DEFAULTS[mode]
    return DreamBoothConfig(
        name=str(req.get("name", "")).strip(), output_dir=lora_dir, mode=mode,
        instance_prompt=str(req.get("instance_prompt", "")), class_prompt=str(req.get("class_prompt", "")),
        num_class_images=_num(req, "num_class_images", int, 50), rank=_num(req, "rank", int, 8),
        alpha=_num(req, "alpha", float, None), targets=str(req.get("targets", "attention")),
        train_text_encoder=bool(req.get("train_text_encoder")), steps=_num(req, "steps", int, d.steps),
        learning_rate=_num(req, "learning_rate", float, d.learning_rate), seed=_num(req, "seed", int, 0),
        resolution=_num(req, "resolution", int, None), token=str(req.get("token", "")),
        num_vectors=_num(req, "vectors", int, 2), embedding_dir=embeddings_dir,
        save_every=_num(req, "save_every", int, d.save_every), preview_every=_num(req, "preview_every", int, 50),
        gradient_checkpointing=bool(req.get("gradient_checkpointing")), overwrite=bool(req.get("overwrite")))


@dataclass
class SeedJob:
    """A SeedSelect run from a WebUI: the config and what the result needs beside it (a seed file
    named ``name`` in ``output_dir``).  ``steps`` and ``name`` are what every run reports."""

    name: str
    prompt: str
    negative: str
    clip_vision: str
    config: Any
    output_dir: Path
    overwrite: bool = False

    @property
    def steps(self) -> int:
        return self.config.iterations


def seedselect_job(req: dict, folder: Path) -> SeedJob:
    """The request as a SeedSelect run: the WebUI's ``Euler`` with the ``Normal`` schedule is the
    sampler the noise is optimised through, so the seed reproduces there (``usage`` says how)."""
    from ..trainers.seedselect import SeedSelectConfig

    size = _num(req, "resolution", int, None) or 512
    cfg = SeedSelectConfig(width=_num(req, "width", int, size), height=_num(req, "height", int, size),
                           sampler="euler", scheduler="normal", steps=_num(req, "sampling_steps", int, 20),
                           cfg=_num(req, "cfg", float, 7.0), iterations=_num(req, "steps", int, 30),
                           learning_rate=_num(req, "learning_rate", float, 0.1), seed=_num(req, "seed", int, 0))
    return SeedJob(name=str(req.get("name", "")).strip(), prompt=str(req.get("prompt", "")),
                   negative=str(req.get("negative", "")), clip_vision=str(req.get("clip_vision", "")).strip(),
                   config=cfg, output_dir=folder, overwrite=bool(req.get("overwrite")))


def check_seed_job(job: SeedJob) -> None:
    """What would fail later, now: the options, the name and an existing file, the encoder folder."""
    from ..trainers import seed_bank as B
    from ..trainers.seedselect import check_config

    check_config(job.config)
    if not job.prompt.strip():
        raise ValueError("SeedSelect needs the prompt the seed is for (the one you will generate with)")
    target = B.seed_path(job.output_dir, job.name)
    if target.exists() and not job.overwrite:
        raise ValueError(f"{target} exists; pick another name or tick 'Replace an existing file'")
    if not (Path(job.clip_vision) / "config.json").is_file():
        raise ValueError(f"clip_vision must be a CLIP vision model folder (config.json + weights, e.g. IP-Adapter's "
                         f"models/image_encoder), got {job.clip_vision or '(nothing)'!r}")


def usage(kind: str, name: str, files: list[str], token: str = "") -> str:
    """What the result area says: where the file went and how to use it in the next generation."""
    where = ", ".join(files) if files else "(no file)"
    if kind == "ti":
        return f"Saved {where}. Write `{name}` in a prompt to use the embedding (the list was refreshed)."
    if kind == "seedselect":
        return (f"Saved {where}. In txt2img open **Likeness seed**, pick `{name}` and generate with the same prompt, "
                "size, CFG and steps, sampler Euler with the Normal schedule (the seed number is then ignored).")
    text = f"Saved {where}. Add `<lora:{name}:1>` to a prompt (the LoRA list was refreshed)."
    if kind == "pivotal" and token:
        text += f" Keep the new word `{token}` in the prompt: it is the embedding trained with it."
    return text


class RunManager:
    """One run at a time over a ``WebUIContext``; runs are kept for ``poll`` until the process ends."""

    def __init__(self, ctx: WebUIContext):
        self.ctx = ctx
        self.runs: dict[str, Run] = {}
        self._active: Run | None = None
        self._guard = threading.Lock()

    def start(self, req: dict) -> Run:
        """Check ``req`` and its dataset, then start the run in a worker thread.  Raises
        ``ValueError`` with advice for anything wrong, before any work."""
        kind = str(req.get("kind", "")).lower()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {req.get('kind')!r}")
        cfg = self._config(kind, req)
        images = D.load_image_folder(str(req.get("images", "")).strip() or "(no dataset folder given)")
        with self._guard:
            if self._active is not None and self._active.state in ("starting", "running"):
                raise ValueError(f"a run is already in progress ({self._active.kind} '{self._active.name}'); "
                                 "cancel it or wait for it to finish")
            run = Run(id=uuid.uuid4().hex[:12], kind=kind, name=cfg.name, total=cfg.steps)
            self.runs[run.id], self._active = run, run
        threading.Thread(target=self._work, args=(run, cfg, images), name=f"likeness-{run.id}", daemon=True).start()
        return run

    def _config(self, kind: str, req: dict):
        from ..trainers import dreambooth, textual_inversion

        if kind == "seedselect":
            job = seedselect_job(req, Path(self.ctx.seeds_dir()))
            check_seed_job(job)
            return job
        if kind == "ti":
            cfg = ti_config(req, Path(self.ctx.embeddings_dir()))
            textual_inversion.check_config(cfg)
        else:
            cfg = dreambooth_config(req, kind, Path(self.ctx.lora_dir()), Path(self.ctx.embeddings_dir()))
            dreambooth.check_config(cfg)
        return cfg

    def poll(self, run_id: str | None = None) -> dict:
        run = self._active if run_id is None else self.runs.get(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r}" if run_id else "no run yet")
        return run.as_dict()

    def cancel(self, run_id: str) -> dict:
        run = self.runs.get(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r}")
        run.cancel.set()
        return run.as_dict()

    def _progress(self, run: Run):
        def progress(step, total, loss, preview):
            run.state, run.step, run.total = "running", step, total
            if loss is not None:
                run.losses.append([step, float(loss)])
            if preview is not None:
                run.preview_png = _png_b64(preview)
            if run.cancel.is_set():
                raise Cancelled()
        return progress

    def _train(self, run: Run, cfg, images):
        from ..trainers.dreambooth import train_dreambooth
        from ..trainers.textual_inversion import train_textual_inversion

        with self.ctx.lock:
            host = self.ctx.make_host()
            try:
                with host.training():
                    if run.kind == "seedselect":
                        return _select_seed(host, images, cfg, self._progress(run))
                    if run.kind == "ti":
                        return train_textual_inversion(host, images, cfg, progress=self._progress(run))
                    return train_dreambooth(host, images, cfg, progress=self._progress(run))
            finally:
                del host
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _work(self, run: Run, cfg, images) -> None:
        try:
            res = self._train(run, cfg, images)
            run.files = [str(f) for f in res.files]
            run.state = "done"
        except Cancelled:
            run.files = self._kept_files(run, cfg)
            run.state = "cancelled"
        except BaseException as e:  # the thread's last word: report, never raise into the WebUI
            run.state, run.error = "failed", f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return
        with contextlib.suppress(Exception):
            self.ctx.refresh({"ti": "embedding", "seedselect": "seed"}.get(run.kind, "lora"))
            if run.kind == "pivotal":
                self.ctx.refresh("embedding")
        run.message = usage(run.kind, run.name, run.files, getattr(cfg, "token", ""))
        if run.state == "cancelled":
            run.message = f"Cancelled at step {run.step}; the last good state is kept. " + run.message

    @staticmethod
    def _kept_files(run: Run, cfg) -> list[str]:
        from ..trainers.seed_bank import seed_path

        folder = Path(cfg.output_dir)
        kept = seed_path(folder, cfg.name) if run.kind == "seedselect" else folder / f"{cfg.name}.safetensors"
        return [str(kept)] if kept.is_file() else []


@dataclass
class _SeedResult:
    files: list


def _select_seed(host, images, job: SeedJob, progress) -> _SeedResult:
    """SeedSelect on the WebUI's model; the best seed (so far, on Cancel) is written as a seed file."""
    from ..hosts.diffusers import load_clip_vision
    from ..trainers import seed_bank as B
    from ..trainers.seedselect import SeamSeedModel, reference_batch, seed_entry, train_seedselect

    c = job.config
    refs = reference_batch(images, c.height, c.width)
    vision = load_clip_vision(job.clip_vision, device=host.device)

    def save(res):
        entry = seed_entry(res, c, host, job.prompt, job.negative)
        return B.save_seed(job.output_dir, job.name, entry, overwrite=job.overwrite)

    res = train_seedselect(SeamSeedModel(host, job.prompt, job.negative), vision, refs, c, progress, on_cancel=save)
    return _SeedResult(files=[save(res)])


__all__ = ["KINDS", "Cancelled", "WebUIContext", "Run", "RunManager", "usage", "ti_config", "dreambooth_config",
           "SeedJob", "seedselect_job", "check_seed_job"]
