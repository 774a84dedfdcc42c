"""SeedSelect as ComfyUI nodes: optimise the starting noise on the loaded model, hand it to
``SamplerCustomAdvanced``; keep good seeds in a seed bank.

The node only wires ComfyUI's objects to the method (``trainers/seedselect.py``) through
``hosts/comfy/seedselect.py``; progress, previews and Cancel work as in the Textual Inversion node.
"""
from __future__ import annotations

import os

import torch

import comfy.samplers
import folder_paths
from comfy_api.latest import io, ui

from ..hosts.comfy import ComfyClipVision, ComfySeedModel, OptimizedNoise
from ..trainers import diff_sampling as DS
from ..trainers import seed_bank as B
from ..trainers.compile import compiled_step
from ..trainers.seedselect import STARTS, SeedSelectConfig, SeedSelectResult, train_seedselect
from .common import (compile_input, compile_notes, model_folder, node_id_of, node_type_of, progress_reporter,
                     state_inputs)

CATEGORY = "Likeness/seeds"
FOLDER = "likeness_seeds"
CANCEL_NAME = "seedselect_cancelled"


def seeds_dir() -> str:
    """``models/likeness_seeds`` (registered with ComfyUI's folder_paths on first use)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    return model_folder(FOLDER)


def _sigmas(model, sigmas, scheduler: str, steps: int) -> torch.Tensor:
    if sigmas is not None:
        return sigmas
    with torch.inference_mode(False):
        return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu().clone()


def _entry(res: SeedSelectResult, model, cfg: SeedSelectConfig, scheduler, steps, sigmas_given) -> B.SeedEntry:
    name = getattr(model, "cached_patcher_init", None)
    try:
        name = os.path.basename(name[1][0])
    except (TypeError, IndexError):
        name = "unknown"
    return B.SeedEntry(noise=res.noise, sigmas=res.sigmas, sampler=res.sampler, cfg=res.cfg, model_name=name,
                       scheduler=None if sigmas_given else scheduler, steps=len(res.sigmas) - 1,
                       width=cfg.width, height=cfg.height, losses=res.losses)


class SeedSelect(io.ComfyNode):
    LIVE_CHART = True  # reports a loss per step: web/likeness.js gives it the live chart

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessSeedSelect",
            display_name="SeedSelect (Likeness)",
            category=CATEGORY,
            description=(
                "Finds a starting noise that makes the loaded model draw a rare concept the way 3-10 reference "
                "images show it (SeedSelect, AAAI 2024). No weights change: plug the NOISE output into "
                "SamplerCustomAdvanced with the same sampler, sigmas, cfg and latent size to get the result."),
            search_aliases=["seedselect", "seed select", "optimise noise", "rare concept", "seed", "likeness"],
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL). Not modified."),
                io.Conditioning.Input("positive", tooltip="The prompt naming the concept (e.g. 'a photo of a tiger cat')."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (used when cfg > 1)."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint: encodes the references (appearance loss) "
                             "and decodes the last steps for the semantic loss."),
                io.ClipVision.Input("clip_vision", tooltip="A CLIP vision model (Load CLIP Vision, e.g. "
                                    "CLIP-ViT-H-14) for the semantic loss."),
                io.Image.Input("references", tooltip="3-10 images of the concept, as one IMAGE batch."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Width of the image to "
                             "render, in pixels (SD1.x 512, SD2.x 512/768, SDXL 1024). Use the same size in the "
                             "Empty Latent Image that goes into SamplerCustomAdvanced."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Height in pixels."),
                io.Combo.Input("sampler", options=list(DS.SAMPLERS), default="ddim", tooltip="The deterministic "
                               "sampler to optimise through; use the same one (KSamplerSelect) in "
                               "SamplerCustomAdvanced. ddim = SeedSelect's original."),
                io.Combo.Input("scheduler", options=list(DS.SCHEDULERS), default="ddim_uniform", tooltip="Noise "
                               "schedule (ignored when sigmas are connected). ddim_uniform with ddim is the "
                               "paper's setting."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps; fewer steps optimise "
                             "faster. Use the same steps in BasicScheduler."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01, tooltip="CFG scale "
                               "of the result; use the same in CFGGuider."),
                io.Int.Input("iterations", default=30, min=1, max=1000, tooltip="Optimisation iterations (each "
                             "one full differentiable sampling pass). The paper uses 30; a good start needs ~5."),
                io.Float.Input("learning_rate", default=0.1, min=1e-4, max=10.0, step=0.01, round=1e-4,
                               tooltip="AdamW learning rate on the noise; divided by 10 after 3 iterations."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=io.ControlAfterGenerate.fixed, tooltip="The seed to start "
                             "from (the same noise as RandomNoise with this seed); best_of tries seed, seed+1, ..."),
                io.Int.Input("num_seeds", default=1, min=1, max=64, tooltip="How many seeds to return. More "
                             "than 1: after the main run, brief runs on random subsets of the references "
                             "(the paper's bootstrap) give varied seeds; set the latent batch to this."),
                io.Combo.Input("start", options=list(STARTS), default="seed", tooltip="seed: start from the "
                               "seed above. best_of: score 'candidates' seeds with one forward pass each and "
                               "start from the best. inversion: DDIM-invert the references and start from the "
                               "best of them and their norm-aware midpoints (NAO-style); fastest to converge."),
                io.Int.Input("candidates", default=4, min=1, max=64, advanced=True, tooltip="Starts scored by "
                             "best_of / inversion."),
                io.Boolean.Input("optimise_without_cfg", default=False, advanced=True, tooltip="Optimise at cfg "
                                 "1 (half the cost per iteration, as NAO does) and render the result with cfg."),
                io.Float.Input("target_loss", default=0.0, min=0.0, max=100.0, step=0.01, advanced=True,
                               tooltip="Stop as soon as the loss is at or below this (0: run all iterations)."),
                io.Int.Input("bootstrap_iterations", default=5, min=1, max=200, advanced=True, tooltip="Iterations "
                             "of each extra seed's run."),
                io.String.Input("save_as", default="", tooltip="Save the seed(s) under this name in "
                                "models/likeness_seeds (Load Seed reads it back). Empty: not saved. On Cancel the "
                                f"best seed so far is saved under this name (or '{CANCEL_NAME}')."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a saved seed of the same name."),
                io.Sigmas.Input("sigmas", optional=True, tooltip="A schedule (e.g. from BasicScheduler) instead of "
                                "scheduler/steps; connect the same SIGMAS to SamplerCustomAdvanced."),
                compile_input(),
                *state_inputs(),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="The optimised noise, for SamplerCustomAdvanced."),
                io.Latent.Output(display_name="noise_latent", tooltip="The same noise as a LATENT (unit variance), "
                                 "to save; Noise From Latent turns it back into a NOISE."),
                io.Latent.Output(display_name="samples", tooltip="What the noise renders to (the optimised result); "
                                 "VAE Decode shows it without sampling again."),
                io.Image.Output(display_name="preview", tooltip="The decoded result(s)."),
                io.LossMap.Output(display_name="loss", tooltip="The loss of every iteration of the main run."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, clip_vision, references, width, height, sampler, scheduler,
                steps, cfg, iterations, learning_rate, seed, num_seeds, start, candidates, optimise_without_cfg,
                target_loss, bootstrap_iterations, save_as, overwrite, sigmas=None, compile="off", resume="off",
                keep_states=2) -> io.NodeOutput:
        save_name = save_as.strip()
        folder = seeds_dir()
        overwrite = overwrite or resume.strip() != "off"  # a resumed run replaces its own seed
        if save_name:  # name problems and an existing file are reported before any work
            path = B.seed_path(folder, save_name)
            if path.exists() and not overwrite:
                raise FileExistsError(f"A seed named {save_name!r} already exists; pick another name, turn "
                                      "on overwrite, or set resume to 'latest' to continue the run that saved it.")
        seed_model = ComfySeedModel(model, positive, negative, vae)
        vision = ComfyClipVision(clip_vision)
        with torch.inference_mode(False):
            sig = _sigmas(model, sigmas, scheduler, steps).detach().float().cpu().clone()
            refs = references.clone() if references is not None else None
        conf = SeedSelectConfig(
            width=width, height=height, sampler=sampler, scheduler=scheduler, steps=steps, sigmas=sig, cfg=cfg,
            optimise_cfg=1.0 if optimise_without_cfg else None, iterations=iterations, learning_rate=learning_rate,
            seed=seed, start=start, candidates=candidates, target_loss=target_loss or None, num_seeds=num_seeds,
            bootstrap_iterations=bootstrap_iterations, output_dir=folder, name=save_name or CANCEL_NAME,
            resume=resume, keep_states=keep_states)
        progress = progress_reporter(node_id_of(cls), iterations + (num_seeds - 1) * bootstrap_iterations,
                                     node_type_of(cls))

        def on_cancel(partial):
            B.save_seed(folder, save_name or CANCEL_NAME, _entry(partial, model, conf, scheduler, steps, sigmas is not None),
                        overwrite=overwrite or not save_name)

        with torch.inference_mode(False), torch.enable_grad(), compiled_step(seed_model, compile) as compiled:
            res = train_seedselect(seed_model, vision, refs, conf, progress, on_cancel=on_cancel,
                                   on_point=progress.on_point)
        files = []
        if save_name:
            files.append(B.save_seed(folder, save_name, _entry(res, model, conf, scheduler, steps, sigmas is not None),
                                     overwrite=overwrite))
        samples = seed_model.process_latent_out(res.latents)
        text = (f"SeedSelect: {len(res.noise)} seed(s), {res.iterations_done} iterations in {res.seconds:.1f} s; "
                f"loss {res.start_loss:.4f} -> {res.best_loss:.4f} (best at iteration {res.best_iteration + 1})"
                + (f"; target reached at iteration {res.iterations_to_target} ({res.seconds_to_target:.1f} s)"
                   if res.iterations_to_target else "")
                + (f"; continued after iteration {res.resumed_from}" if res.resumed_from else "")
                + "".join(f"; {n}" for n in compile_notes(compiled))
                + "".join(f"\nsaved {f}" for f in files)
                + (f"\nrun state {res.state_path.name} (resume: latest)" if res.state_path else ""))
        show = ui.PreviewImage(res.images, cls=cls).as_dict() | ui.PreviewText(text).as_dict()
        return io.NodeOutput(OptimizedNoise(res.noise, seed), {"samples": res.noise.clone()}, {"samples": samples},
                             res.images, {"loss": list(res.losses)}, ui=show)


class LoadSeed(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessLoadSeed",
            display_name="Load Seed (Likeness)",
            category=CATEGORY,
            description="Loads a seed saved by SeedSelect from models/likeness_seeds, with the sigmas it was "
                        "optimised over, for SamplerCustomAdvanced.",
            inputs=[io.Combo.Input("name", options=B.list_seeds(seeds_dir()) or [""], tooltip="The saved seed.")],
            outputs=[io.Noise.Output(display_name="noise", tooltip="The saved seed as a NOISE for "
                                     "SamplerCustomAdvanced (same sampler, cfg and size as saved)."),
                     io.Sigmas.Output(display_name="sigmas", tooltip="The sigmas the seed was optimised over."),
                     io.String.Output(display_name="info", tooltip="Prompt, model, sampler, cfg and size it was "
                                      "optimised for.")],
        )

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        if not name:
            raise ValueError("No seed saved yet: run SeedSelect with a save_as name first.")
        e = B.load_seed(seeds_dir(), name)
        info = (f"{name}: {len(e.noise)} seed(s) for {e.width}x{e.height} px, sampler {e.sampler}, "
                f"{e.steps} steps ({e.scheduler or 'custom sigmas'}), cfg {e.cfg}, model {e.model_name}")
        return io.NodeOutput(OptimizedNoise(e.noise), e.sigmas.clone(), info, ui=ui.PreviewText(info))


class NoiseFromLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessNoiseFromLatent",
            display_name="Noise From Latent (Likeness)",
            category=CATEGORY,
            description="Turns SeedSelect's noise_latent output (or any unit-variance LATENT) back into a NOISE "
                        "for SamplerCustomAdvanced.",
            inputs=[io.Latent.Input("noise_latent", tooltip="SeedSelect's noise_latent output (unit-variance "
                                    "noise, not a sampled image).")],
            outputs=[io.Noise.Output(display_name="noise", tooltip="A NOISE for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, noise_latent) -> io.NodeOutput:
        return io.NodeOutput(OptimizedNoise(noise_latent["samples"]))


NODES = [SeedSelect, LoadSeed, NoiseFromLatent]
