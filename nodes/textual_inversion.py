"""Textual Inversion as a ComfyUI node: train a new word on the MODEL/CLIP/VAE the graph loaded.

The node only wires ComfyUI's objects to the method: it wraps them in a ``ComfyHost``, leaves
ComfyUI's inference mode for the training, reports progress (with preview images) through
ComfyUI's progress bar, and turns the result into ComfyUI outputs.  The embedding is written to
the first ``models/embeddings`` folder, where ``embedding:<name>`` in any prompt finds it.
"""
from __future__ import annotations

import os

import torch

from comfy_api.latest import io

from ..hosts.comfy import ComfyHost
from ..trainers import data as D
from ..trainers.compile import compiled_step
from ..trainers.textual_inversion import TIConfig, train_textual_inversion
from . import best_step as NB
from .common import (TRAINING_CATEGORY, batch_captions, compile_input, compile_notes, embeddings_dir, node_id_of,
                     node_type_of, progress_reporter, state_inputs, training_report)


def _prompt_text(prompt: str, name: str) -> str:
    return prompt.replace("{}", name)


class TrainTextualInversion(io.ComfyNode):
    LIVE_CHART = True  # reports a loss per step: web/likeness.js gives it the live chart

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainTextualInversion",
            display_name="Train Textual Inversion (Likeness)",
            category=TRAINING_CATEGORY,
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
                io.String.Input("init_text", default="", advanced=True, tooltip="Existing words that roughly describe "
                                "the concept (e.g. 'cat', 'oil painting'); training starts from their embedding. "
                                "Empty by default: 'object', or 'painting' for the style templates."),
                io.Combo.Input("templates", options=list(D.TEMPLATE_KINDS), default="auto", advanced=True,
                               tooltip="The prompts each image is trained with. object: 'a photo of a <name>' "
                               "style prompts; style: 'a painting in the style of <name>'; captions: the "
                               "captions below; auto (default): captions if given, else object, so captions work once "
                               "connected."),
                io.Int.Input("num_vectors", default=1, min=1, max=75, advanced=True, tooltip="Tokens the new word "
                             "takes in a prompt. Default 1: the original paper's choice; 1-4 is typical; more can capture "
                             "more detail but overfit sooner and leave less room in the 75-token prompt."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimisation steps. 300-1500 is "
                             "typical; watch the previews and the loss."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-5, max=1.0, step=1e-4, round=1e-5,
                               advanced=True, tooltip="AdamW learning rate for the new word's vectors. Default 5e-3: the "
                               "usual TI rate; "
                               "lower it if the previews break up or the loss turns non-finite."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step. Default 1: fits "
                             "the least memory. Larger batches give smoother updates but need more memory and "
                             "time per step.", advanced=True),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8, advanced=True, tooltip="Resize the "
                             "short side of every image to this many pixels and train on square crops. Default 0: "
                             "the images' own size, as Load Training Images already sized them (SD1.x 512, SD2.x 768, "
                             "SDXL 1024 are the native sizes)."),
                io.Boolean.Input("flip", default=True, advanced=True, tooltip="Also train on mirrored images (on by "
                                 "default: twice the views of a few images). Turn off for "
                                 "subjects whose left and right differ (text, logos, asymmetric faces)."),
                io.Boolean.Input("random_crop", default=False, advanced=True, tooltip="With a resolution set: "
                                 "a random square crop each step instead of the centre crop. Off by default: the subject "
                                 "stays whole in every crop."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=io.ControlAfterGenerate.fixed, advanced=True,
                             tooltip="Seed for the noise, timesteps, prompt choice and crops. Fixed by default: the "
                             "same seed and inputs train the same embedding (and ComfyUI then reuses the cached result "
                             "instead of retraining)."),
                io.String.Input("prompt", default="a photo of {}", tooltip="What the previews show and what the "
                                "conditioning output encodes; {} stands for the new word."),
                io.Int.Input("preview_every", default=50, min=0, max=100000, advanced=True, tooltip="Render a preview "
                             "image every N steps (shown on the progress bar) and at the end. 0: no previews "
                             "(faster). Default 50: a preview costs preview_steps sampling steps, a few percent "
                             "of the run."),
                io.Int.Input("preview_steps", default=20, min=1, max=200, advanced=True, tooltip="Sampling "
                             "steps of each preview (Euler, cfg 5). Fewer is faster and rougher. Default 20: a "
                             "recognisable image at a small cost."),
                io.Int.Input("save_every", default=100, min=0, max=100000, advanced=True, tooltip="Also write the "
                             "embedding every N steps, so a long run keeps its progress. It is always written "
                             "at the end and when you cancel. Default 100: a crash loses at most 100 steps."),
                io.Boolean.Input("overwrite", default=False, advanced=True, tooltip="Replace an existing embedding of "
                                 "the same name. Off by default, so a finished embedding is never replaced by "
                                 "accident: training refuses to start if <name> already exists."),
                io.String.Input("captions", default="", multiline=True, optional=True, advanced=True,
                                tooltip="Optional: one caption per line, in image order, each containing the new word (or "
                                "[name]); an "
                                "empty line is an image without a caption. Connect the captions output of Load "
                                "Training Images (Likeness). Used when templates is 'captions' or 'auto'. Empty by default: "
                                "the templates' prompts."),
                *state_inputs(),
                io.String.Input("init_embedding", default="", optional=True, advanced=True, tooltip="Continue training an "
                                "existing embedding instead of starting from init_text: a file name in "
                                "models/embeddings or a path (ours, an A1111 .pt, emb_params or clip_l+clip_g "
                                ".safetensors). Its vectors and their count are used; the step count continues. "
                                "Give a new name, or set overwrite to replace that file. Empty by default: start from init_text."),
                compile_input(),
            ] + NB.eval_inputs("the new word"),
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The prompt above, encoded with "
                                       "the trained embedding (the same as CLIPTextEncode of it with "
                                       "embedding:<name>)."),
                io.String.Output(display_name="embedding", tooltip="'embedding:<name>', to put in prompts."),
                io.Image.Output(display_name="preview", tooltip="The last preview image (a blank image when "
                                "previews are off)."),
                io.LossMap.Output(display_name="loss", tooltip="The loss of every step, for the Plot Loss "
                                  "Graph node."),
                NB.CURVES_OUTPUT,
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, images, name, init_text, templates, num_vectors, steps, learning_rate,
                batch_size, resolution, flip, random_crop, seed, prompt, preview_every, preview_steps, save_every,
                overwrite, captions="", resume="off", keep_states=2, init_embedding="",
                compile="off", **evaluation) -> io.NodeOutput:
        data = D.images_from_batch(images, batch_captions(images, captions))
        cfg = TIConfig(
            name=name, output_dir=embeddings_dir(), init_text=init_text, num_vectors=num_vectors, steps=steps,
            learning_rate=learning_rate, batch_size=batch_size, seed=seed, templates=templates,
            resolution=resolution or None, random_crop=random_crop, flip=flip, save_every=save_every,
            preview_every=preview_every, preview_steps=preview_steps, preview_prompt=prompt, overwrite=overwrite,
            resume=resume, keep_states=keep_states, init_file=_embedding_file(init_embedding),
            eval_every=evaluation.get("eval_every", 0), eval_prompts=evaluation.get("eval_prompts", ""),
        )
        which = evaluation.get("output", "last")
        host = ComfyHost(model, clip, vae)
        path_note = host.choose_path()
        with host.training(), compiled_step(host, compile) as compiled:
            progress = progress_reporter(node_id_of(cls), steps, node_type_of(cls))
            res = train_textual_inversion(host, data, cfg, progress=progress, encoders=NB.encoders(evaluation),
                                          on_point=progress.on_point)
            word = name.strip()
            with torch.no_grad():
                cond = host.encode_text([_prompt_text(prompt, word)], word, res.pick(which))
        extra = dict(cond.extra[0]) if cond.extra else {}
        conditioning = [[cond.cross_attn[0].detach().cpu(), {"pooled_output": _cpu(cond.pooled[0]), **extra}]]
        if which == "best" and res.pick("best") is not res.vectors:
            word += ".best"  # the best snapshot's file: <name>.best
        preview, loss, show = training_report(cls, res, f"embedding:{word}", (path_note,) * bool(path_note) + compile_notes(compiled) + NB.notes(res, which))
        return io.NodeOutput(conditioning, f"embedding:{word}", preview, loss, NB.curves(res), ui=show)


def _embedding_file(name: str) -> str:
    """A typed embedding: a file name in the embeddings folder when there is one, else a path as given."""
    name = (name or "").strip()
    inside = os.path.join(embeddings_dir(), name)
    return inside if name and not os.path.isabs(name) and os.path.isfile(inside) else name


def _cpu(t):
    return t.detach().cpu() if torch.is_tensor(t) else t


NODES = [TrainTextualInversion]
