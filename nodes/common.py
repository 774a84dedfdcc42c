"""What every Likeness node shares: ComfyUI's folders, caption text, progress and the result panel.

Kept here, not in one feature's module, so no node imports another node's private helpers and
the progress reporting (progress bar + preview, loss chart event, Cancel) exists once.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..trainers.compile import MODES as COMPILE_MODES
from . import progress as live

TRAINING_CATEGORY = "Likeness/training"
#: the websocket event web/likeness.js draws as a loss chart
PROGRESS_EVENT = "likeness.progress"
#: the longest side of the preview ComfyUI shows on a node's progress bar
PREVIEW_SIZE = 512


def model_folder(kind: str) -> str:
    """The first folder ComfyUI searches for ``kind`` ("embeddings", "loras", "checkpoints"): files
    written there are listed by ComfyUI's own loaders without a restart."""
    return folder_paths.get_folder_paths(kind)[0]


def typed_file(kind: str, name: str) -> str:
    """A file named in a text input: the file of that name in the ``kind`` folder ("loras",
    "embeddings") when there is one, else the text as a path (the trainer says if it is missing)."""
    name = (name or "").strip()
    if not name or os.path.isabs(name):
        return name
    for folder in folder_paths.get_folder_paths(kind):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return name


def embeddings_dir() -> str:
    """Where ComfyUI looks first for ``embedding:NAME`` files."""
    return model_folder("embeddings")


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI IMAGE ``[H, W, 3]`` in 0..1 as an 8-bit PIL image (what previews take)."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def parse_captions(text: str | None, count: int) -> list[str | None] | None:
    """Line i is the caption of image i, an empty line means "no caption" (the layout the
    Load Training Images node outputs); None when there is no caption at all.  Blank lines after
    the last image are ignored; missing lines at the end are images without a caption, and more
    captions than images is an error (raised by ``images_from_batch``)."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    if not any(lines):
        return None
    while len(lines) > count and not lines[-1]:
        lines.pop()
    lines += [""] * (count - len(lines))
    return [ln or None for ln in lines]


def batch_captions(images: torch.Tensor | None, text: str | None) -> list[str | None] | None:
    """``parse_captions`` for an IMAGE batch (None: no images, so any caption is one too many)."""
    return parse_captions(text, 0 if images is None else images.shape[0])


def send_progress(node_id, step: int, total: int, loss: float | None, elapsed: float = 0.0,
                  node_type: str | None = None, metrics: list[dict] | None = None) -> None:
    """The ``likeness.progress`` websocket event that web/likeness.js draws as a loss chart, also
    kept by ``progress.record`` so a reloaded page can ask for the run so far.  ``node_type`` lets
    the page skip a node of another workflow that happens to have the same id.  ``metrics``: the
    evaluations (best step, ``trainers/best_step.Point.as_dict``) finished since the last event,
    drawn as the chart's second panel."""
    if node_id is None:
        return
    value = loss if loss is not None and math.isfinite(loss) else None
    prompt_id = live.running_prompt_id()
    live.record(str(node_id), int(step), int(total), value, float(elapsed), prompt_id, node_type, metrics)
    # ComfyUI's main.py has imported its ``server`` module before any node runs; outside a server
    # (tests, scripts) there is none, or no PromptServer instance, and nothing is sent.
    srv = live.prompt_server()
    if srv is None:
        return
    srv.send_sync(PROGRESS_EVENT, {"node": str(node_id), "step": int(step), "total": int(total), "loss": value,
                                   "elapsed": round(float(elapsed), 3), "prompt_id": prompt_id, "type": node_type,
                                   **({"metrics": metrics} if metrics else {})},
                  getattr(srv, "client_id", None))


def progress_reporter(node_id, total: int, node_type: str | None = None):
    """The ``progress(step, total, loss, preview)`` callback the trainers take: checks Cancel
    (ComfyUI raises it from here, so the trainer saves what is good and re-raises), sends the
    loss-chart event (with the seconds since the run started, for the chart's ETA) and moves the
    node's progress bar, with the preview image when there is one."""
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)
    started = time.monotonic()
    pending: list[dict] = []  # evaluations since the last event (``progress.on_point``)

    def progress(step, n, loss, preview):
        comfy.model_management.throw_exception_if_processing_interrupted()
        send_progress(node_id, step, n, loss, time.monotonic() - started, node_type, pending[:] or None)
        pending.clear()
        shown = ("JPEG", to_pil(preview), PREVIEW_SIZE) if preview is not None else None
        pbar.update_absolute(step, n, shown)

    # the trainers' ``on_point``: an evaluation travels with the next progress event
    # (a best-step ``Point``, or SeedSelect's ``{"step", "CLIP distance"}``)
    progress.on_point = lambda point: pending.append(point.as_dict() if hasattr(point, "as_dict") else dict(point))
    return progress


def count_reporter(node_id):
    """A ``(done, total)`` callback for a stage without loss or previews (sampling class images):
    Cancel works and the node's bar shows the stage's own count."""
    def progress(done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        comfy.utils.ProgressBar(total, node_id=node_id).update_absolute(done, total)

    return progress


def state_inputs() -> list:
    """The inputs of stopping and continuing that every trainer node shares (``trainers/run_state.py``),
    optional and last, so workflows saved before them still load."""
    from ..trainers.run_state import KEEP, SUFFIX

    return [
        io.String.Input("resume", default="off", optional=True, advanced=True, tooltip="Continue a stopped run "
                        "of this name: 'off' (start anew), 'latest' (its most recent saved state), or a state's "
                        f"file name (<name>.stepNNNNNNNN{SUFFIX}, beside the result). Same model, images and "
                        "settings; steps may be raised to train longer. The result is the same as a run never "
                        "stopped. Default off: a new run starts fresh."),
        io.Int.Input("keep_states", default=KEEP, min=0, max=1000, optional=True, advanced=True,
                     tooltip="How many run states (for resume) to keep beside the result; one is written with "
                     "every save, at the end and on Cancel. 0: write none. Default 2: the latest and one before it, should the "
                     "latest be from a step you do not want."),
    ]


def init_lora_input():
    """DreamBooth LoRA / pivotal: continue an existing LoRA (``DreamBoothConfig.init_lora``)."""
    return io.String.Input("init_lora", default="", optional=True, advanced=True, tooltip="Continue training an "
                           "existing LoRA instead of starting new adapters: a file name in models/loras or a path "
                           "(ours or another trainer's kohya LoRA). Its layers, rank and alpha are kept (rank, "
                           "alpha, targets and train_text_encoder are then the file's); the step count continues. "
                           "Give a new name, or set overwrite to replace that file. Empty by default: new adapters.")


def compile_input():
    """The advanced ``compile`` input every training node shares (``trainers.compile``)."""
    return io.Combo.Input("compile", options=list(COMPILE_MODES), default="off", advanced=True, optional=True,
                          tooltip="Compile the denoiser step with torch.compile (CUDA). default: faster steps "
                          "after a warm-up of a minute or so; max: also CUDA graphs (fastest at one resolution "
                          "and batch). If compiling fails the run continues unchanged, uncompiled, with a note. Off by "
                          "default: the warm-up only pays for itself on longer runs.")


def compile_notes(state) -> tuple[str, ...]:
    """The result panel's line about compilation (nothing when it was off)."""
    return () if state.requested == "off" else (state.summary(),)


def node_type_of(node_cls) -> str:
    """The node's type as the graph names it (the schema's ``node_id``, e.g. "LikenessSeedSelect")."""
    return node_cls.define_schema().node_id


def node_id_of(node_cls) -> str | None:
    """The running node's id (``io.Hidden.unique_id``), None outside a prompt."""
    return getattr(getattr(node_cls, "hidden", None), "unique_id", None)


def training_report(node_cls, res, headline: str, notes: tuple[str, ...] = ()):
    """``(preview IMAGE, loss map, ui dict)`` of a finished training: the last preview (a blank
    image when previews were off, so the output always exists), the loss of every step for Plot
    Loss Graph, and a text panel with the headline, the notes, the files written and the data."""
    preview = res.preview[None].cpu() if res.preview is not None else torch.zeros(1, 64, 64, 3)
    last = f"{res.losses[-1]:.4f}" if res.losses else "n/a"
    skipped = (f"{res.skipped_steps} non-finite steps skipped",) if res.skipped_steps else ()
    text = (", ".join((f"{headline} - {res.steps_done} steps in {res.seconds:.0f} s, last loss {last}",
                       *notes, *getattr(res, "notes", ()), *skipped))
            + "\n" + "\n".join(str(f) for f in res.files) + "\n" + res.data_summary)
    show = ui.PreviewText(text).as_dict()
    if res.preview is not None:
        show = ui.PreviewImage(preview, cls=node_cls).as_dict() | show
    return preview, {"loss": list(res.losses)}, show


__all__ = ["compile_input", "compile_notes",
           "TRAINING_CATEGORY", "PROGRESS_EVENT", "model_folder", "embeddings_dir", "to_pil", "parse_captions",
           "batch_captions", "send_progress", "progress_reporter", "count_reporter", "node_id_of",
           "node_type_of",
           "training_report", "state_inputs", "typed_file", "init_lora_input"]
