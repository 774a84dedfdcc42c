"""What the trainer nodes share for best step (``trainers/best_step.py``): the evaluation inputs,
the CLIP_VISION inputs wrapped as image encoders, the "best"/"last" switch, the curves output and
the metric points sent with the live chart's progress events.

A module of its own (no ``NODES``) so the training nodes add a few lines each instead of a copy.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..hosts.comfy import ComfyClipVision
from ..trainers import best_step as BS

CLIP_USE = "eval_every needs {} for the metrics (the clip_vision input)."
DINO_USE = "The dino input needs {} (ComfyUI's Load CLIP Vision loads DINOv2 checkpoints too)."


def eval_inputs(subject: str) -> list:
    """The inputs every training node adds, after its own: all optional and last, so a saved
    workflow's widget values (positional) still land on the widgets they were saved from, and the
    defaults keep evaluation off."""
    return [
        io.Int.Input("eval_every", default=0, min=0, max=100000, optional=True, advanced=True,
                     tooltip="Best step: every N steps (and at the end) sample the evaluation prompts with the "
                     "model being trained, score the images against the training images (CLIP-I, DINO, "
                     "diversity; needs clip_vision) and keep the best snapshot. Default 0 (off): evaluating "
                     "costs sampling time and needs a CLIP vision model."),
        io.String.Input("eval_prompts", default="", multiline=True, advanced=True, optional=True, tooltip="Evaluation prompts, "
                        f"one per line, {{}} = {subject}; each is sampled at its own fixed seed so snapshots are "
                        "comparable. Empty by default: four varied prompts (photo, beach, snow, painting)."),
        io.Combo.Input("output", options=list(BS.OUTPUTS), default="best", optional=True, advanced=True,
                       tooltip="With eval_every: output the best snapshot (also written as <name>.best.*) or the "
                       "last step's. Default best: what evaluation is for. Without evaluation the last step is "
                       "output."),
        io.ClipVision.Input("clip_vision", optional=True, tooltip="For eval_every: a CLIP vision model (Load "
                            "CLIP Vision, e.g. CLIP-ViT-L-14 or CLIP-ViT-H-14) for CLIP-I."),
        io.ClipVision.Input("dino", optional=True, tooltip="Optional for eval_every: a DINOv2 model (Load CLIP "
                            "Vision with dinov2-large/giant) for DINO, the sharper identity metric."),
    ]


CURVES_OUTPUT = io.Image.Output(display_name="curves", tooltip="The evaluation metrics over the steps, the best "
                                "step marked (a blank image when eval_every is 0).")


def encoders(kw: dict) -> BS.Encoders | None:
    """The image encoders the node's CLIP_VISION inputs give (None without clip_vision: a run
    with eval_every > 0 then stops before any work, saying what to connect)."""
    if kw.get("clip_vision") is None:
        if kw.get("dino") is not None and kw.get("eval_every"):
            raise ValueError(CLIP_USE.format("a CLIP vision model") + " DINO alone is not enough: connect one.")
        return None
    clip = ComfyClipVision(kw["clip_vision"], CLIP_USE, ("clip_vision_model",))
    dino = ComfyClipVision(kw["dino"], DINO_USE, ("dinov2",)) if kw.get("dino") is not None else None
    return BS.Encoders(clip, dino)


def curves(res):
    """The curves IMAGE of a result (a small blank image without evaluation)."""
    import torch

    ev = getattr(res, "evaluation", None)
    if ev is None or not ev.points:
        return torch.ones(1, 64, 64, 3)
    return BS.curves_image(ev.points, ev.best)


def notes(res, which: str) -> tuple[str, ...]:
    """The evaluation lines of the node's text panel: the pick, the time, the best files, what
    the outputs are."""
    ev = getattr(res, "evaluation", None)
    if ev is None:
        return ()
    shown = "best snapshot" if which == "best" and ev.state else "last step"
    return (ev.summary(), f"outputs: the {shown}", *(f"best: {f}" for f in ev.files))


def chosen_file(res, which: str):
    """The file the node's name output names: the best snapshot's where it is output."""
    ev = getattr(res, "evaluation", None)
    if which == "best" and ev is not None and ev.files:
        return ev.files[0]
    return res.files[0]


__all__ = ["eval_inputs", "CURVES_OUTPUT", "encoders", "curves", "notes", "chosen_file"]
