"""Textual Inversion as a ComfyUI node: train a new word on the MODEL/CLIP/VAE the graph loaded.

The node only wires ComfyUI's objects to the method: it wraps them in a ``ComfyHost``, leaves
ComfyUI's inference mode for the training, reports progress (with preview images) through
ComfyUI's progress bar, and turns the result into ComfyUI outputs.  The embedding is written to
the first ``models/embeddings`` folder, where ``embedding:<name>`` in any prompt finds it.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..hosts.comfy import ComfyHost
from ..trainers import data as D
from ..trainers.textual_inversion import TIConfig, train_textual_inversion

CATEGORY = "Likeness/training"


def _pil(image: torch.Tensor) -> Image.Image:
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def _captions(text: str | None, count: int) -> list[str | None] | None:
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


def _send_progress(node_id, step: int, total: int, loss: float | None) -> None:
    """The ``likeness.progress`` websocket event that web/likeness.js draws as a loss chart."""
    # ComfyUI's main.py has imported its ``server`` module before any node runs; outside a server
    # (tests, scripts) there is none, or no PromptServer instance, and nothing is sent.
    module = sys.modules.get("server")
    srv = getattr(getattr(module, "PromptServer", None), "instance", None)
    if srv is None or node_id is None:
        return
    value = loss if loss is not None and math.isfinite(loss) else None
    srv.send_sync("likeness.progress", {"node": str(node_id), "step": int(step), "total": int(total),
                                        "loss": value}, getattr(srv, "client_id", None))


def _prompt_text(prompt: str, name: str) -> str:
    return prompt.replace("{}", name)


def embeddings_dir() -> str:
    """Where ComfyUI looks first for ``embedding:NAME`` files."""
    return folder_paths.get_folder_paths("embeddings")[0]


class TrainTextualInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainTextualInversion",
            display_name="Train Textual Inversion (Likeness)",
            category=CATEGORY,
            description=(
                "Teaches the loaded checkpoint a new word from a few images (Textual Inversion): the model "
                "and text encoders stay frozen, only the new word's embedding is learned. Saves "
                "models/embeddings/<name>.safetensors (SD1/SD2 also an A1111 .pt); use it in any prompt as "
                "embedding:<name>. Works with SD1.x, SD2.x and SDXL checkpoints."
            ),
            search_aliases=["textual inversion", "embedding", "train embedding", "ti", "likeness"],
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model of the checkpoint to teach (SD1.x, SD2.x or "
                               "SDXL). It is not modified; LoRAs and patches applied upstream are trained through."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint. The new word's vectors live in its "
                              "input embeddings (SDXL: one set for each of its two text encoders)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint, used to encode the training images "
                             "(once) and to decode previews."),
                io.Image.Input("images", tooltip="The training images: 3-20 views of the subject (or examples of "
                               "the style), as one IMAGE batch. Use a resolution below if their size is large."),
                io.String.Input("name", default="my_concept", tooltip="The new word and the file name. Use it in "
                                "prompts as embedding:<name>. Pick a made-up word that is not an existing "
                                "vocabulary word (e.g. 'my_cat_lk', not 'cat')."),
                io.String.Input("init_text", default="", tooltip="Existing words that roughly describe the "
                                "concept (e.g. 'cat', 'oil painting'); training starts from their embedding. "
                                "Empty: 'object', or 'painting' for the style templates."),
                io.Combo.Input("templates", options=list(D.TEMPLATE_KINDS), default="auto",
                               tooltip="The prompts each image is trained with. object: 'a photo of a <name>' "
                               "style prompts; style: 'a painting in the style of <name>'; captions: the "
                               "captions below; auto: captions if given, else object."),
                io.Int.Input("num_vectors", default=1, min=1, max=75, tooltip="Tokens the new word takes in a "
                             "prompt. 1-4 is typical; more can capture more detail but overfit sooner and "
                             "leave less room in the 75-token prompt."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimisation steps. 300-1500 is "
                             "typical; watch the previews and the loss."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-5, max=1.0, step=1e-4, round=1e-5,
                               tooltip="AdamW learning rate for the new word's vectors. 5e-3 is a good start; "
                               "lower it if the previews break up or the loss turns non-finite."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step. Larger batches "
                             "give smoother updates but need more memory and time per step."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8, tooltip="Resize the short side "
                             "of every image to this many pixels and train on square crops. 0: train at the "
                             "images' own size (SD1.x 512, SD2.x 768, SDXL 1024 are the native sizes)."),
                io.Boolean.Input("flip", default=True, tooltip="Also train on mirrored images. Turn off for "
                                 "subjects whose left and right differ (text, logos, asymmetric faces)."),
                io.Boolean.Input("random_crop", default=False, advanced=True, tooltip="With a resolution set: "
                                 "a random square crop each step instead of the centre crop."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=io.ControlAfterGenerate.fixed, tooltip="Seed for the noise, "
                             "timesteps, prompt choice and crops: the same seed and inputs train the same "
                             "embedding (and ComfyUI then reuses the cached result instead of retraining)."),
                io.String.Input("prompt", default="a photo of {}", tooltip="What the previews show and what the "
                                "conditioning output encodes; {} stands for the new word."),
                io.Int.Input("preview_every", default=50, min=0, max=100000, tooltip="Render a preview image "
                             "every N steps (shown on the progress bar) and at the end. 0: no previews (faster)."),
                io.Int.Input("preview_steps", default=20, min=1, max=200, advanced=True, tooltip="Sampling "
                             "steps of each preview (Euler, cfg 5). Fewer is faster and rougher."),
                io.Int.Input("save_every", default=100, min=0, max=100000, advanced=True, tooltip="Also write the "
                             "embedding every N steps, so a long run keeps its progress. It is always written "
                             "at the end and when you cancel."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing embedding of the same "
                                 "name. Off: training refuses to start if <name> already exists."),
                io.String.Input("captions", default="", multiline=True, optional=True, tooltip="Optional: one "
                                "caption per line, in image order, each containing the new word (or [name]); an "
                                "empty line is an image without a caption. Connect the captions output of Load "
                                "Training Images (Likeness). Used when templates is 'captions' or 'auto'."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The prompt above, encoded with "
                                       "the trained embedding (the same as CLIPTextEncode of it with "
                                       "embedding:<name>)."),
                io.String.Output(display_name="embedding", tooltip="'embedding:<name>', to put in prompts."),
                io.Image.Output(display_name="preview", tooltip="The last preview image (a blank image when "
                                "previews are off)."),
                io.LossMap.Output(display_name="loss", tooltip="The loss of every step, for the Plot Loss "
                                  "Graph node."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, images, name, init_text, templates, num_vectors, steps, learning_rate,
                batch_size, resolution, flip, random_crop, seed, prompt, preview_every, preview_steps, save_every,
                overwrite, captions="") -> io.NodeOutput:
        data = D.images_from_batch(images, _captions(captions, 0 if images is None else images.shape[0]))
        cfg = TIConfig(
            name=name, output_dir=embeddings_dir(), init_text=init_text, num_vectors=num_vectors, steps=steps,
            learning_rate=learning_rate, batch_size=batch_size, seed=seed, templates=templates,
            resolution=resolution or None, random_crop=random_crop, flip=flip, save_every=save_every,
            preview_every=preview_every, preview_steps=preview_steps, preview_prompt=prompt, overwrite=overwrite,
        )
        host = ComfyHost(model, clip, vae)
        node_id = getattr(cls.hidden, "unique_id", None)
        pbar = comfy.utils.ProgressBar(steps, node_id=node_id)

        def progress(step, total, loss, preview):
            comfy.model_management.throw_exception_if_processing_interrupted()
            _send_progress(node_id, step, total, loss)
            pv = ("JPEG", _pil(preview), 512) if preview is not None else None
            pbar.update_absolute(step, total, pv)

        with host.training():
            res = train_textual_inversion(host, data, cfg, progress=progress)
            word = name.strip()
            with torch.no_grad():
                cond = host.encode_text([_prompt_text(prompt, word)], word, res.vectors)
        extra = dict(cond.extra[0]) if cond.extra else {}
        conditioning = [[cond.cross_attn[0].detach().cpu(), {"pooled_output": _cpu(cond.pooled[0]), **extra}]]
        preview = res.preview[None].cpu() if res.preview is not None else torch.zeros(1, 64, 64, 3)
        last = f"{res.losses[-1]:.4f}" if res.losses else "n/a"
        text = (f"embedding:{word} - {res.steps_done} steps in {res.seconds:.0f} s, last loss {last}"
                + (f", {res.skipped_steps} non-finite steps skipped" if res.skipped_steps else "")
                + "\n" + "\n".join(str(f) for f in res.files) + "\n" + res.data_summary)
        show = ui.PreviewText(text).as_dict()
        if res.preview is not None:
            show = ui.PreviewImage(preview, cls=cls).as_dict() | show
        return io.NodeOutput(conditioning, f"embedding:{word}", preview, {"loss": list(res.losses)}, ui=show)


def _cpu(t):
    return t.detach().cpu() if torch.is_tensor(t) else t


NODES = [TrainTextualInversion]
