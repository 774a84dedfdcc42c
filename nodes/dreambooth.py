"""DreamBooth as ComfyUI nodes: LoRA, full fine-tune and pivotal tuning on the MODEL/CLIP/VAE the
graph loaded.

Each node wraps ComfyUI's objects in a ``ComfyHost``, trains with ``trainers.dreambooth`` (the
input MODEL and CLIP are never modified) and returns *clones* with the result applied, ready for
``KSampler`` in the same graph: the LoRA through ComfyUI's own ``load_lora_for_models`` (exactly
what ``LoraLoader`` does with the file), the full fine-tune as ``diff`` patches.  Files go where
ComfyUI's loaders look: ``models/loras``, ``models/checkpoints``, ``models/embeddings``.
Prior-preservation class images come either from an IMAGE input (e.g. ``KSampler → VAEDecode`` on
the class prompt) or are sampled by the node with the frozen model.
"""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..hosts.comfy import ComfyHost
from ..trainers import data as D
from ..trainers.compile import compiled_step
from ..trainers.formats import kohya_lora
from ..trainers.dreambooth import MODE_DEFAULTS, DreamBoothConfig, train_dreambooth
from ..trainers.lora import PRESETS
from ..trainers.loop import OPTIMIZERS
from . import best_step as NB
from .common import (TRAINING_CATEGORY, batch_captions, compile_input, compile_notes, count_reporter, embeddings_dir,
                     model_folder, node_id_of, node_type_of, progress_reporter, state_inputs, training_report)
from .common import init_lora_input, typed_file


def _common_inputs(mode: str) -> list:
    """Inputs every DreamBooth node shares, in the order ``_config`` reads them; the defaults that
    differ per mode come from ``trainers.dreambooth.MODE_DEFAULTS``, as the CLI's do."""
    d = MODE_DEFAULTS[mode]
    return [
        io.Model.Input("model", tooltip="The diffusion model to fine-tune (SD1.x, SD2.x or SDXL). It is not "
                       "modified: the outputs are clones with the result applied."),
        io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint (encodes the prompts; trained too when "
                      "asked)."),
        io.Vae.Input("vae", tooltip="The VAE of the same checkpoint: encodes the images once, decodes previews."),
        io.Image.Input("images", tooltip="3-5 (up to ~20) images of the subject, as one IMAGE batch."),
        io.String.Input("name", default="my_subject", tooltip="File name of what is written (letters, digits, "
                        "_ - .)."),
        io.String.Input("instance_prompt", default="a photo of sks dog", tooltip="The prompt the subject is "
                        "bound to: a rare identifier plus the class noun (DreamBooth: 'a [V] [class]')."),
        io.String.Input("class_prompt", default="", tooltip="The class alone ('a photo of a dog'). With a "
                        "prior weight > 0 the model keeps drawing the class as before (prior preservation). "
                        "Empty: no prior preservation."),
        io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05, advanced=True, tooltip="λ of the "
                       "prior-preservation loss. Default 1: the DreamBooth paper's weight."),
        io.Int.Input("num_class_images", default=50, min=0, max=2000, advanced=True, tooltip="Without a "
                     "class_images input: how many class images the node samples with the frozen model first "
                     "(Euler, 20 steps, at the training size). Default 50: enough variety for a few hundred steps "
                     "at a modest sampling cost; 100-200 for long runs."),
        io.Int.Input("steps", default=d.steps, min=1, max=100000, tooltip="Optimisation steps."),
        io.Float.Input("learning_rate", default=d.learning_rate, min=1e-7, max=1.0, step=1e-6, round=1e-7,
                       advanced=True, tooltip="Learning rate of the trained weights. The default is the usual "
                       "one for this method (LoRA 1e-4, full fine-tune 5e-6): lower it if previews break up."),
        io.Int.Input("batch_size", default=1, min=1, max=64, advanced=True, tooltip="Subject images per step (as "
                     "many class images join them). Default 1: fits the least memory; DreamBooth's few images "
                     "need no larger batches."),
        io.Int.Input("resolution", default=0, min=0, max=4096, step=8, advanced=True, tooltip="Resize the short "
                     "side to this and train on square crops. Default 0: the images' own size, as Load Training "
                     "Images already sized them. Class images follow the training size by themselves."),
        io.Boolean.Input("flip", default=False, advanced=True, tooltip="Also train on mirrored images (off by "
                         "default: subjects are often asymmetric)."),
    ] + _loss_and_run_inputs(d)


def _loss_and_run_inputs(d) -> list:
    """The second half of ``_common_inputs`` (its order is the saved workflows' widget order)."""
    return [
        io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=20.0, step=0.5, advanced=True,
                       tooltip="Min-SNR-γ loss weighting (5 is the paper's value). Default 0: off, the "
                       "plain DreamBooth loss."),
        io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01, advanced=True,
                       tooltip="Offset noise (0.05-0.1 lets the model learn very dark/bright images). Default "
                       "0: off, as the checkpoint was trained."),
        io.Boolean.Input("gradient_checkpointing", default=False, advanced=True, tooltip="Recompute "
                         "activations in backward: much less memory, ~20-30% slower. Off by default: faster where "
                         "the memory suffices."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                     control_after_generate=io.ControlAfterGenerate.fixed, advanced=True, tooltip="Seed of noise, "
                     "timesteps and class samples. Fixed by default: same inputs and seed give the same result "
                     "(and a cached re-run)."),
        io.Int.Input("preview_every", default=50, min=0, max=100000, advanced=True, tooltip="Preview the "
                     "instance prompt every N steps (0: never). Default 50: a preview costs about 20 sampling "
                     "steps, a few percent of the run."),
        io.Int.Input("save_every", default=d.save_every, min=0, max=100000, advanced=True, tooltip="Also write "
                     "the file every N steps (it is always written at the end and on Cancel). The default keeps "
                     "a long run's progress (a full checkpoint is large, so 0 there: end and Cancel only)."),
        compile_input(),
        io.Boolean.Input("overwrite", default=False, advanced=True, tooltip="Replace existing files of the same "
                         "name. Off by default, so a finished model is never replaced by accident: training "
                         "refuses to start instead."),
        io.Image.Input("class_images", optional=True, tooltip="Optional class images for prior preservation, "
                       "e.g. from KSampler → VAEDecode on the class prompt; resized and centre-cropped to the "
                       "training size when theirs differs."),
        io.String.Input("captions", default="", multiline=True, optional=True, advanced=True, tooltip="Optional: "
                        "one caption per line in image order; when every image has one they replace the instance "
                        "prompt. Empty by default: the instance prompt names the subject."),
        *state_inputs(),  # optional inputs follow every required one, so these stay last in each node
    ]


def _config(kw: dict, mode: str, **extra) -> DreamBoothConfig:
    """The node's inputs as a config; the file goes to the models/ folder of the mode."""
    return DreamBoothConfig(
        mode=mode, output_dir=model_folder(MODE_DEFAULTS[mode].folder),
        name=kw["name"], instance_prompt=kw["instance_prompt"], class_prompt=kw["class_prompt"],
        prior_weight=kw["prior_weight"], num_class_images=kw["num_class_images"], steps=kw["steps"],
        learning_rate=kw["learning_rate"], batch_size=kw["batch_size"], resolution=kw["resolution"] or None,
        flip=kw["flip"], min_snr_gamma=kw["min_snr_gamma"], noise_offset=kw["noise_offset"],
        gradient_checkpointing=kw["gradient_checkpointing"], seed=kw["seed"], preview_every=kw["preview_every"],
        save_every=kw["save_every"], overwrite=kw["overwrite"], resume=kw.get("resume", "off"),
        keep_states=kw.get("keep_states", 2), eval_every=kw.get("eval_every", 0),
        eval_prompts=kw.get("eval_prompts", ""), **extra)


def _train(cls, kw: dict, cfg: DreamBoothConfig):
    """Run the trainer with ComfyUI's progress bar, previews, loss chart and Cancel; returns
    (host, result)."""
    images = kw["images"]
    data = D.images_from_batch(images, batch_captions(images, kw.get("captions")))
    class_data = D.images_from_batch(kw["class_images"]) if kw.get("class_images") is not None else None
    host = ComfyHost(kw["model"], kw["clip"], kw["vae"])
    path_note = host.choose_path()
    node_id = node_id_of(cls)
    with host.training(), compiled_step(host, kw.get("compile", "off")) as compiled:
        progress = progress_reporter(node_id, cfg.steps, node_type_of(cls))
        res = train_dreambooth(host, data, cfg, class_images=class_data, progress=progress,
                               class_progress=count_reporter(node_id), encoders=NB.encoders(kw),
                               on_point=progress.on_point)
    continued = (f"continued {os.path.basename(cfg.init_lora.strip())} (trained {res.first_step} steps before): its "
                 "layers, ranks and alphas were trained; the rank, alpha and targets inputs were not used",)
    res.compile_notes = ((path_note,) * bool(path_note) + continued * bool(cfg.init_lora.strip())
                         + compile_notes(compiled))  # for _report's panel
    return host, res


def _report(cls, res, headline: str, which: str = "last"):
    notes = (f"{res.class_images} class images",) if res.class_images else ()
    notes += getattr(res, "compile_notes", ())
    return training_report(cls, res, headline, notes + NB.notes(res, which))


def _lora_applied(host: ComfyHost, res, which: str = "last"):
    sd = kohya_lora.lora_state_dict(res.pick(which)["lora_layers"], family=host.info.family, dtype=torch.float32,
                                    layout=host.unet_layout(), naming=host.naming)
    return host.with_lora(sd)


_OUT_MODEL = io.Model.Output(display_name="model", tooltip="A clone of the input model with the result applied.")
_OUT_CLIP = io.Clip.Output(display_name="clip", tooltip="A clone of the input CLIP (with the text-encoder part "
                           "of the result, if any).")
_OUT_PREVIEW = io.Image.Output(display_name="preview", tooltip="The last preview image.")
_OUT_LOSS = io.LossMap.Output(display_name="loss", tooltip="The loss of every step (Plot Loss Graph).")


class TrainDreamBoothLoRA(io.ComfyNode):
    LIVE_CHART = True  # reports a loss per step: web/likeness.js gives it the live chart

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainDreamBoothLoRA",
            display_name="Train DreamBooth LoRA (Likeness)",
            category=TRAINING_CATEGORY,
            description=("DreamBooth as a LoRA: binds the instance prompt's identifier to the subject, with "
                         "prior preservation. Writes models/loras/<name>.safetensors in kohya's format (loads in "
                         "ComfyUI's LoraLoader, A1111/Forge and diffusers) and outputs the model with it applied."),
            search_aliases=["dreambooth", "lora", "train lora", "likeness"],
            inputs=_common_inputs("lora") + [
                io.Int.Input("rank", default=8, min=1, max=256, advanced=True, tooltip="LoRA rank (dimension). Default "
                             "8: enough for one subject in a file of a few MB."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=256.0, step=0.5, advanced=True, tooltip="LoRA alpha: "
                               "the update is scaled by alpha/rank. Default 0: alpha = rank (scale 1), so the "
                               "learning rate means the same at any rank."),
                io.Combo.Input("targets", options=list(PRESETS), default="attention", advanced=True,
                               tooltip="attention (default, as diffusers' DreamBooth LoRA): the attention "
                               "projections; transformer: every linear layer of the "
                               "transformer blocks (kohya); cross_kv: cross-attention keys/values (Custom "
                               "Diffusion)."),
                io.Boolean.Input("train_text_encoder", default=False, advanced=True, tooltip="Also put LoRA layers on "
                                 "the text encoder(s). Off by default: less memory, and the UNet alone learns most "
                                 "subjects."),
                io.Float.Input("text_encoder_lr", default=MODE_DEFAULTS["lora"].text_encoder_lr, min=1e-7, max=1.0,
                               step=1e-6, round=1e-7, advanced=True, tooltip="Learning rate of the text-encoder "
                               "LoRA layers. Default 5e-5: half the UNet's, as the text encoder overfits sooner."),
            ] + NB.eval_inputs("the instance prompt") + [
                init_lora_input(),  # last: saved workflows keep their widget values in order
            ],
            outputs=[_OUT_MODEL, _OUT_CLIP, io.String.Output(display_name="lora_name", tooltip="The file "
                     "name, as LoraLoader lists it."), _OUT_PREVIEW, _OUT_LOSS, NB.CURVES_OUTPUT],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        cfg = _config(kw, "lora", rank=kw["rank"], alpha=kw["alpha"] or None,
                      targets=kw["targets"], train_text_encoder=kw["train_text_encoder"],
                      text_encoder_lr=kw["text_encoder_lr"], init_lora=typed_file("loras", kw.get("init_lora", "")))
        host, res = _train(cls, kw, cfg)
        which = kw.get("output", "last")
        model, clip = _lora_applied(host, res, which)
        lora = NB.chosen_file(res, which)
        preview, loss, show = _report(cls, res, f"LoRA {lora.name}", which)
        return io.NodeOutput(model, clip, lora.name, preview, loss, NB.curves(res), ui=show)


class TrainDreamBoothFull(io.ComfyNode):
    LIVE_CHART = True  # reports a loss per step: web/likeness.js gives it the live chart

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainDreamBoothFull",
            display_name="Train DreamBooth Full (Likeness)",
            category=TRAINING_CATEGORY,
            description=("Full DreamBooth: fine-tunes every weight of the denoiser (optionally the text encoders) "
                         "with prior preservation. Writes models/checkpoints/<name>.safetensors (loads in "
                         "CheckpointLoaderSimple and A1111) and, optionally, the change as a LoRA."),
            search_aliases=["dreambooth", "fine-tune", "finetune", "likeness"],
            inputs=_common_inputs("full") + [
                io.Combo.Input("optimizer", options=sorted(OPTIMIZERS), default=MODE_DEFAULTS["full"].optimizer,
                               advanced=True, tooltip="adafactor (default): almost no optimizer memory (SD1.5 fits 12 GB "
                               "with gradient "
                               "checkpointing); adamw: two more fp32 copies of the model."),
                io.Boolean.Input("train_text_encoder", default=False, advanced=True, tooltip="Also fine-tune the text "
                                 "encoder(s). Off by default: much less memory, and the UNet alone learns most "
                                 "subjects."),
                io.Float.Input("text_encoder_lr", default=MODE_DEFAULTS["full"].text_encoder_lr, min=1e-8, max=1.0,
                               step=1e-7, round=1e-8, advanced=True, tooltip="Learning rate of the text "
                               "encoder(s). Default 2e-6: below the UNet's, as the text encoder overfits sooner."),
                io.Int.Input("extract_lora_rank", default=0, min=0, max=256, advanced=True, tooltip="Also write the "
                             "change as models/loras/<name>_lora.safetensors of this rank. Default 0: no second "
                             "file unless asked."),
            ] + NB.eval_inputs("the instance prompt"),
            outputs=[_OUT_MODEL, _OUT_CLIP, io.String.Output(display_name="ckpt_name", tooltip="The "
                     "checkpoint's file name, as CheckpointLoaderSimple lists it."), _OUT_PREVIEW, _OUT_LOSS,
                     NB.CURVES_OUTPUT],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        cfg = _config(kw, "full", optimizer=kw["optimizer"],
                      train_text_encoder=kw["train_text_encoder"], text_encoder_lr=kw["text_encoder_lr"],
                      extract_rank=kw["extract_lora_rank"], lora_dir=model_folder(MODE_DEFAULTS["lora"].folder))
        host, res = _train(cls, kw, cfg)
        which = kw.get("output", "last")
        model, clip = host.with_deltas(res.pick(which)["deltas"])
        ckpt = NB.chosen_file(res, which)
        preview, loss, show = _report(cls, res, f"checkpoint {ckpt.name}", which)
        return io.NodeOutput(model, clip, ckpt.name, preview, loss, NB.curves(res), ui=show)


class TrainPivotal(io.ComfyNode):
    LIVE_CHART = True  # reports a loss per step: web/likeness.js gives it the live chart

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainPivotal",
            display_name="Train Pivotal Tuning (Likeness)",
            category=TRAINING_CATEGORY,
            description=("Pivotal tuning: a new word's embedding (Textual Inversion) and a LoRA trained together, "
                         "the word for the first part of the run. Writes models/embeddings/<token> and "
                         "models/loras/<name>.safetensors; prompt with embedding:<token>."),
            search_aliases=["pivotal", "dreambooth", "lora", "textual inversion", "likeness"],
            inputs=_common_inputs("pivotal") + [
                io.String.Input("token", default="sks_lk", tooltip="The new word; the instance prompt must "
                                "contain it (e.g. 'a photo of sks_lk dog'). Not an existing vocabulary word."),
                io.String.Input("init_text", default="", advanced=True, tooltip="Word(s) the vectors start from. "
                                "Empty by default: the class prompt's last word (the class noun)."),
                io.Int.Input("num_vectors", default=2, min=1, max=75, advanced=True, tooltip="Tokens the new word "
                             "takes. Default 2: room for an identity, little room to overfit."),
                io.Float.Input("ti_learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                               advanced=True, tooltip="Learning rate of the word's vectors. Default 5e-3: the "
                               "usual Textual Inversion rate."),
                io.Float.Input("ti_fraction", default=0.5, min=0.05, max=1.0, step=0.05, advanced=True, tooltip="Part "
                               "of the run the word trains (the pivot); afterwards only the LoRA. Default 0.5: the "
                               "word settles before the LoRA refines the details."),
                io.Int.Input("rank", default=8, min=1, max=256, advanced=True, tooltip="LoRA rank (dimension): higher "
                             "keeps more detail, in a larger file. Default 8: a few MB, enough with the word."),
                io.Combo.Input("targets", options=list(PRESETS), default="attention", advanced=True, tooltip="LoRA "
                               "layers. Default attention: the attention projections, as diffusers does."),
                io.Boolean.Input("bundle_embedding", default=False, advanced=True, tooltip="Also store the word "
                                 "inside the LoRA file (A1111 reads it; ComfyUI's LoraLoader logs those keys as "
                                 "not loaded). Off by default: the separate embedding file is what ComfyUI reads."),
            ] + NB.eval_inputs("the instance prompt") + [
                init_lora_input(),  # last: saved workflows keep their widget values in order
                io.String.Input("init_embedding", default="", optional=True, advanced=True, tooltip="Continue the "
                                "new word from an existing embedding: a file name in models/embeddings or a path. "
                                "Its vectors and their count are used. Empty by default: the vectors the init_lora "
                                "bundles for the token, else init_text."),
            ],
            outputs=[_OUT_MODEL, _OUT_CLIP, io.String.Output(display_name="embedding", tooltip=
                     "'embedding:<token>' for your prompts."), io.String.Output(display_name="lora_name", tooltip=
                     "The LoRA's file name, as LoraLoader lists it."),
                     _OUT_PREVIEW, _OUT_LOSS, NB.CURVES_OUTPUT],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        token = kw["token"].strip()
        cfg = _config(kw, "pivotal", token=token, embedding_dir=embeddings_dir(),
                      init_text=kw["init_text"], num_vectors=kw["num_vectors"],
                      ti_learning_rate=kw["ti_learning_rate"], ti_fraction=kw["ti_fraction"], rank=kw["rank"],
                      targets=kw["targets"], bundle_embedding=kw["bundle_embedding"],
                      init_lora=typed_file("loras", kw.get("init_lora", "")),
                      init_embedding=typed_file("embeddings", kw.get("init_embedding", "")))
        host, res = _train(cls, kw, cfg)
        which = kw.get("output", "last")
        model, clip = _lora_applied(host, res, which)
        lora = NB.chosen_file(res, which)  # the LoRA is written first, then the embedding files
        word = token + ".best" if lora is not res.files[0] else token
        preview, loss, show = _report(cls, res, f"embedding:{word} + LoRA {lora.name}", which)
        return io.NodeOutput(model, clip, f"embedding:{word}", lora.name, preview, loss, NB.curves(res), ui=show)


NODES = [TrainDreamBoothLoRA, TrainDreamBoothFull, TrainPivotal]
