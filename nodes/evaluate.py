"""Evaluate Likeness: the papers' metrics (``trainers/metrics.py``) on any IMAGE batch, so runs,
other tools' LoRAs and embeddings, or seeds can be compared by number instead of by eye.

The CLIP_VISION inputs are wrapped by the ComfyUI host's image encoder (``hosts/comfy``); the node
only parses its inputs, calls ``metrics.evaluate`` and shows the table as text and as an image.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from comfy_api.latest import io, ui

from ..hosts.comfy import ComfyClipVision
from ..trainers import metrics as M

CATEGORY = "Likeness/evaluate"
CLIP_USE = "Evaluate Likeness needs {} for CLIP-I (the clip_vision input)."
DINO_USE = "The dino input needs {} (ComfyUI's Load CLIP Vision loads DINOv2 checkpoints too)."


def table_image(rows: list[list[str]], notes: list[str], size: int = 16) -> torch.Tensor:
    """The table drawn on white, right-aligned columns, the notes below: IMAGE ``[1, H, W, 3]``."""
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(probe.textlength(r[c], font=font) for r in rows) for c in range(len(rows[0]))]
    pad, line = size, int(size * 1.5)
    width = int(max(sum(widths) + pad * (len(widths) + 1),
                    max((probe.textlength(n, font=font) for n in notes), default=0) + 2 * pad))
    img = Image.new("RGB", (width, line * (len(rows) + len(notes) + 1) + pad), "white")
    draw = ImageDraw.Draw(img)
    for i, row in enumerate(rows):
        x, y = pad, pad + i * line
        for cell, w in zip(row, widths):
            draw.text((x + w - probe.textlength(cell, font=font), y), cell, fill="black", font=font)
            x += w + pad
        if i in (0, len(rows) - 2):  # under the header and above the overall row
            draw.line((pad, y + line - 3, width - pad, y + line - 3), fill=(160, 160, 160))
    for j, note in enumerate(notes):
        draw.text((pad, pad + (len(rows) + 1 + j) * line - line // 2), note, fill=(60, 60, 60), font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class EvaluateLikeness(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessEvaluate",
            display_name="Evaluate (Likeness)",
            category=CATEGORY,
            description=(
                "Scores generated images against reference images of the subject with DreamBooth's metrics: "
                "CLIP-I and DINO (subject fidelity: mean cosine similarity to the references), diversity (mean "
                "pairwise distance of the generated images) and a combined score = sqrt(subject x prompt "
                "fidelity). CLIP-T (prompt fidelity) needs the text tower of the same CLIP model, which a "
                "CLIP_VISION does not hold: inside ComfyUI it is reported as unavailable for now, and diversity "
                "stands in for prompt fidelity in the combined score (the table says which)."),
            search_aliases=["evaluate likeness", "evaluate", "metrics", "clip score", "dino", "clip-i", "clip-t",
                            "likeness", "compare"],
            inputs=[
                io.Image.Input("references", tooltip="Images of the subject (e.g. the training images)."),
                io.Image.Input("images", tooltip="The generated images to score, as one IMAGE batch (the "
                               "output of any sampler + VAE Decode)."),
                io.ClipVision.Input("clip_vision", tooltip="A CLIP vision model (Load CLIP Vision, e.g. "
                                    "CLIP-ViT-L-14 or CLIP-ViT-H-14) for CLIP-I."),
                io.String.Input("prompts", default="", multiline=True, tooltip="The prompts the images were "
                                "generated from: one line per image, or one line for all (for CLIP-T)."),
                io.String.Input("word", default="", tooltip="The new word in the prompts (e.g. 'sks' or the "
                                "embedding's name); CLIP-T scores the prompt with it replaced by the class noun."),
                io.String.Input("class_noun", default="", tooltip="The class noun (e.g. 'dog') that replaces "
                                "the word for CLIP-T."),
                io.ClipVision.Input("dino", optional=True, tooltip="Optional DINOv2 model (Load CLIP Vision "
                                    "with dinov2-large / dinov2-giant) for DINO, the sharper identity metric; "
                                    "diversity is then measured with it too."),
            ],
            outputs=[
                io.String.Output(display_name="table", tooltip="The metrics as a text table: one row per "
                                 "generated image, the overall row, and notes (formula, what was unavailable)."),
                io.Image.Output(display_name="table_image", tooltip="The same table drawn as an image."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, references, images, clip_vision, prompts, word, class_noun, dino=None) -> io.NodeOutput:
        lines = (prompts or "").splitlines()  # checked by evaluate before any image is embedded
        clip = ComfyClipVision(clip_vision, CLIP_USE, ("clip_vision_model",))
        dino_enc = ComfyClipVision(dino, DINO_USE, ("dinov2",)) if dino is not None else None
        report = M.evaluate(references, images, clip, dino_enc, None, lines, word, class_noun)
        text, picture = report.table(), table_image(report.rows(), report.notes())
        show = ui.PreviewText(text).as_dict()
        return io.NodeOutput(text, picture, ui=show)


NODES = [EvaluateLikeness]
