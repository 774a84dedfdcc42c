"""`likeness` command line: the same trainers as the ComfyUI nodes, on the diffusers host.

    likeness ti --model <diffusers folder | .safetensors | .ckpt> --images <dir> --name <word> [...]
    likeness dreambooth --model <...> --images <dir> --name <file> --instance-prompt 'a photo of sks dog' [...]
    likeness seedselect --model <...> --references <dir> --prompt <text> --clip-vision <folder> [...]
    likeness demo [--out DIR]
    likeness bench quality [--concepts moon checked] [--methods base ti] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _save_png(image, path: Path) -> None:
    """[H, W, 3] float image -> PNG, written atomically like every other file we write."""
    import numpy as np
    from PIL import Image

    from .trainers.formats import files

    arr = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)  # the first preview may come before the first save
    files.atomic_write_bytes(path, buf.getvalue())


class _Printer:
    """Progress lines for a terminal; previews written next to the embedding."""

    def __init__(self, preview_path: Path | None):
        self.preview_path = preview_path
        self.t0 = time.perf_counter()
        self.ema = None

    def __call__(self, step, total, loss, preview):
        if loss is not None:
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if preview is not None and self.preview_path is not None:
            _save_png(preview, self.preview_path)
        if step == total or step % max(1, total // 20) == 0 or preview is not None:
            rate = (time.perf_counter() - self.t0) / step
            ema = f"{self.ema:.4f}" if self.ema is not None else "n/a"
            extra = f"  preview -> {self.preview_path}" if preview is not None and self.preview_path else ""
            print(f"step {step}/{total}  loss(ema) {ema}  {rate:.2f} s/step{extra}", flush=True)


def _model_args(p, what: str) -> None:
    """The options every training command shares: overwriting, the device, SD2's prediction."""
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} of the same name")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--prediction", default="auto", choices=["auto", "eps", "v"],
                   help="single-file SD2 checkpoints: eps (512-base) or v (768); auto = v for SD2")
    from .trainers.compile import MODES as COMPILE_MODES

    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="torch.compile the denoiser step (CUDA): default, or max = also CUDA graphs; the "
                        "warm-up is reported apart from s/step, and a failure to compile runs eagerly")


def _compiled(args, target):
    """``trainers.compile.compiled_step`` for ``--compile``; prints what it did when the run ends."""
    import contextlib

    from .trainers.compile import compiled_step

    @contextlib.contextmanager
    def run():
        with compiled_step(target, args.compile) as state:
            yield state
        if args.compile != "off":
            print(state.summary(), flush=True)

    return run()


def _eval_args(p, subject: str) -> None:
    """Best step (trainers/best_step.py): the options the training commands share."""
    p.add_argument("--eval-every", type=int, default=0,
                   help="every N steps (and at the end) sample the evaluation prompts, score them against the "
                        "training images and keep the best snapshot as <name>.best.* (0: off; needs --clip)")
    p.add_argument("--eval-prompt", action="append", default=None, metavar="PROMPT",
                   help=f"an evaluation prompt, {{}} = {subject} (repeat it; default: four varied prompts)")
    p.add_argument("--eval-steps", type=int, default=20, help="sampling steps of each evaluation image")
    p.add_argument("--clip", default=None, metavar="DIR",
                   help="local transformers CLIP folder for CLIP-I (a full CLIPModel with its tokenizer: CLIP-T too)")
    p.add_argument("--dino", default=None, metavar="DIR", help="local transformers DINOv2 folder for DINO")


def _eval_config(args) -> dict:
    return dict(eval_every=args.eval_every, eval_prompts="\n".join(args.eval_prompt or []),
                eval_steps=args.eval_steps)


def _encoders(args, host):
    """The metrics' encoders of --clip / --dino (None without --clip: the trainer then refuses
    --eval-every before any work, saying to give one)."""
    if not args.clip:
        if args.dino:
            raise ValueError("--dino needs --clip too (CLIP-I is the metric every score uses)")
        return None
    from .hosts.diffusers.metric_encoders import load_encoders

    return load_encoders(args.clip, args.dino, host.device)


def _print_point(point) -> None:
    parts = [f"{k} {v:.4f}" for k, v in point.as_dict().items() if k not in ("step", "seconds") and v is not None]
    print(f"eval step {point.step}: {'  '.join(parts)}  ({point.seconds:.1f} s)", flush=True)


def _report_evaluation(res, out: Path, name: str) -> None:
    """The pick, the time evaluation took apart from training, the best files and the curves PNG."""
    ev = getattr(res, "evaluation", None)
    if ev is None:
        return
    from .trainers.best_step import curves_image

    print(ev.summary() + f"; training alone {res.seconds - ev.seconds:.1f} s")
    for f in ev.files:
        print(f"wrote {f} (best step)")
    if ev.points:
        path = out / f"{name}.curves.png"
        _save_png(curves_image(ev.points, ev.best)[0], path)
        print(f"wrote {path}")
def _memory_arg(p) -> None:
    p.add_argument("--memory-budget", type=float, default=0.0, metavar="GB",
                   help="GPU memory the run may use (default: what is free); the run turns on gradient "
                        "checkpointing or stops before starting when it would not fit")


def _state_args(p, what: str) -> None:
    """Stopping and continuing (trainers/run_state.py): the options every resumable command shares."""
    p.add_argument("--resume", nargs="?", const="latest", default="off", metavar="STATE",
                   help=f"continue a stopped run of this --name: its latest state beside the {what} (no value), "
                        "or a .likeness-state file; same model, images and settings, --steps may be raised")
    p.add_argument("--keep-states", type=int, default=2,
                   help="run states (for --resume) kept beside the result; one per save, at the end and on a "
                        "stop (0: none)")


def _ti_parser(sub) -> None:
    from .trainers.data import TEMPLATE_KINDS

    p = sub.add_parser("ti", help="train a Textual Inversion embedding")
    p.add_argument("--model", required=True, help="diffusers folder, or a single-file .safetensors/.ckpt checkpoint")
    p.add_argument("--images", required=True, help="folder of RGB images; same-named .txt/.caption files are captions")
    p.add_argument("--name", required=True, help="the new word; also the file name (<name>.safetensors)")
    p.add_argument("--init-text", default="", help="word(s) to start from (default: 'object', or 'painting' for style)")
    p.add_argument("--init-from", default="", metavar="FILE",
                   help="continue training an existing embedding (ours, an A1111 .pt, emb_params or clip_l+clip_g "
                        ".safetensors): its vectors and count; the files' step count continues from its own")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token (1 edits best; 2-8 fit harder subjects)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate for the vectors")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--templates", default="auto", choices=TEMPLATE_KINDS,
                   help="prompts: auto = captions when every image has one, else object templates")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize the short side to this and train on square crops (default: images' own size)")
    p.add_argument("--random-crop", action="store_true", help="random instead of centre square crops")
    p.add_argument("--no-flip", action="store_true", help="don't add mirrored copies (for asymmetric subjects, text)")
    p.add_argument("--save-every", type=int, default=100, help="write the embedding every N steps (0: end only)")
    p.add_argument("--preview-every", type=int, default=50, help="render a preview every N steps (0: never)")
    p.add_argument("--preview-prompt", default="a photo of {}", help="{} is replaced by the new word")
    _memory_arg(p)
    p.add_argument("--out", default="embeddings", help="folder to write the embedding into")
    _eval_args(p, "the new word")
    _model_args(p, "embedding")
    _state_args(p, "embedding")


def _run_ti(args) -> int:
    from .hosts.diffusers import DiffusersHost
    from .trainers import data as D
    from .trainers.formats.files import validate_name
    from .trainers.textual_inversion import TIConfig, check_config, train_textual_inversion

    cfg = TIConfig(
        name=args.name, output_dir=args.out, init_text=args.init_text, num_vectors=args.vectors,
        steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
        templates=args.templates, resolution=args.resolution, random_crop=args.random_crop,
        flip=not args.no_flip, save_every=args.save_every, preview_every=args.preview_every,
        preview_prompt=args.preview_prompt, overwrite=args.overwrite, resume=args.resume,
        keep_states=args.keep_states, init_file=args.init_from, memory_budget_gb=args.memory_budget,
        **_eval_config(args),
    )
    check_config(cfg)  # option, name and image problems are reported before the model loads
    name = validate_name(args.name)
    _expect_result(args, Path(args.out) / f"{name}.safetensors", Path(args.out) / f"{name}.preview.png")
    images = D.load_image_folder(args.images)
    host = DiffusersHost.load(args.model, device=args.device, prediction=args.prediction)
    print(images.summary(), flush=True)  # the trainer runs every remaining check before any work
    preview_path = Path(args.out) / f"{cfg.name}.preview.png"
    with _compiled(args, host):
        res = train_textual_inversion(host, images, cfg, progress=_Printer(preview_path if args.preview_every else None),
                                      encoders=_encoders(args, host), on_point=_print_point)
    _print_done(res)
    _report_evaluation(res, Path(args.out), name)
    return 0


def _print_done(res) -> None:
    """The last lines of a run: steps, what it changed on its own, files, and the state that trains
    it longer (a stand-in result may know no state or notes: then nothing is said about them)."""
    resumed_from, state = getattr(res, "resumed_from", 0), getattr(res, "state_path", None)
    resumed = f", continued after step {resumed_from}" if resumed_from else ""
    print(f"done: {res.steps_done} steps in {res.seconds:.1f} s ({res.skipped_steps} non-finite steps skipped"
          f"{resumed})")
    for note in getattr(res, "notes", ()):  # what the run changed on its own (the memory preflight)
        print(note)
    for f in res.files:
        print(f"wrote {f}")
    if state is not None:
        print(f"run state {state} (train longer: raise --steps and add --resume)")


def _per_mode(field: str) -> str:
    """'lora 500, full 800, pivotal 500': a mode default for --help, read from the one table."""
    from .trainers.dreambooth import MODE_DEFAULTS

    return ", ".join(f"{mode} {getattr(d, field)}" for mode, d in MODE_DEFAULTS.items())


def _dreambooth_parser(sub) -> None:
    from .trainers.dreambooth import MODES, PROMPT_SOURCES
    from .trainers.loop import OPTIMIZERS
    from .trainers.lora import PRESETS

    p = sub.add_parser("dreambooth", help="DreamBooth: a LoRA, a full fine-tune or pivotal tuning")
    p.add_argument("--model", required=True, help="diffusers folder, or a single-file .safetensors/.ckpt checkpoint")
    p.add_argument("--images", required=True, help="folder of 3-5 (up to ~20) images of the subject")
    p.add_argument("--name", required=True, help="file name of the LoRA / checkpoint (<name>.safetensors)")
    p.add_argument("--instance-prompt", required=True, help="identifier + class, e.g. 'a photo of sks dog'")
    p.add_argument("--mode", default="lora", choices=MODES)
    p.add_argument("--prompts", default="auto", choices=PROMPT_SOURCES,
                   help="what each image is trained with: auto = its caption when every image has one, "
                        "else the instance prompt")
    p.add_argument("--class-prompt", default="", help="e.g. 'a photo of a dog': turns on prior preservation")
    p.add_argument("--class-images", default=None, help="folder of class images (default: sampled by the model)")
    p.add_argument("--num-class-images", type=int, default=50, help="class images to sample when none are given")
    p.add_argument("--prior-weight", type=float, default=1.0, help="λ of the prior-preservation loss")
    p.add_argument("--steps", type=int, default=None, help=f"default per mode: {_per_mode('steps')}")
    p.add_argument("--lr", type=float, default=None, help=f"default per mode: {_per_mode('learning_rate')}")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--targets", default="attention", choices=PRESETS)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--text-encoder-lr", type=float, default=None,
                   help=f"default per mode: {_per_mode('text_encoder_lr')}")
    p.add_argument("--token", default="", help="pivotal: the new word (must appear in the instance prompt)")
    p.add_argument("--num-vectors", type=int, default=2, help="pivotal: tokens the new word takes")
    p.add_argument("--ti-lr", type=float, default=5e-3, help="pivotal: learning rate of the word's vectors")
    p.add_argument("--ti-fraction", type=float, default=0.5, help="pivotal: part of the run the word trains")
    p.add_argument("--bundle-embedding", action="store_true", help="pivotal: also store the word in the LoRA")
    p.add_argument("--init-lora", default="", metavar="FILE",
                   help="lora/pivotal: continue training an existing kohya LoRA (ours or another tool's) at its own "
                        "layers, rank and alpha; the file's step count continues")
    p.add_argument("--init-embedding", default="", metavar="FILE",
                   help="pivotal: continue the word from an embedding file (default: the one --init-lora bundles "
                        "for --token, else the class noun)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help=f"default per mode: {_per_mode('optimizer')} (adafactor: almost no optimizer memory)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~25%% slower")
    p.add_argument("--min-snr-gamma", type=float, default=0.0, help="Min-SNR-γ weighting (5 is typical); 0: off")
    p.add_argument("--noise-offset", type=float, default=0.0)
    p.add_argument("--extract-rank", type=int, default=0, help="full: also write the change as a LoRA of this rank")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--flip", action="store_true", help="also train on mirrored images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=None,
                   help=f"default per mode: {_per_mode('save_every')} (0: at the end only)")
    p.add_argument("--preview-every", type=int, default=50)
    p.add_argument("--out", default=None, help=f"output folder (default per mode: {_per_mode('folder')})")
    _memory_arg(p)
    p.add_argument("--embeddings-out", default="embeddings", help="pivotal: folder for the embedding")
    _eval_args(p, "the instance prompt")
    _model_args(p, "file")
    _state_args(p, "LoRA / checkpoint")


def _run_dreambooth(args) -> int:
    from .hosts.diffusers import DiffusersHost
    from .trainers import data as D
    from .trainers.dreambooth import MODE_DEFAULTS, DreamBoothConfig, check_config, train_dreambooth
    from .trainers.formats.files import validate_name

    defaults = MODE_DEFAULTS[args.mode]
    given = dict(steps=args.steps, learning_rate=args.lr, text_encoder_lr=args.text_encoder_lr,
                 optimizer=args.optimizer, save_every=args.save_every)
    per_mode = {**defaults.config_fields(), **{k: v for k, v in given.items() if v is not None}}
    out = Path(defaults.folder if args.out is None else args.out)
    cfg = DreamBoothConfig(
        name=args.name, output_dir=out, instance_prompt=args.instance_prompt, mode=args.mode, prompts=args.prompts,
        class_prompt=args.class_prompt, prior_weight=args.prior_weight, num_class_images=args.num_class_images,
        rank=args.rank, alpha=args.alpha, targets=args.targets, train_text_encoder=args.train_text_encoder,
        batch_size=args.batch_size, min_snr_gamma=args.min_snr_gamma, noise_offset=args.noise_offset,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, resolution=args.resolution,
        flip=args.flip, token=args.token, embedding_dir=args.embeddings_out, num_vectors=args.num_vectors,
        ti_learning_rate=args.ti_lr, ti_fraction=args.ti_fraction, bundle_embedding=args.bundle_embedding,
        extract_rank=args.extract_rank, lora_dir=None if args.out is not None else MODE_DEFAULTS["lora"].folder,
        preview_every=args.preview_every, overwrite=args.overwrite, resume=args.resume,
        keep_states=args.keep_states, memory_budget_gb=args.memory_budget, **per_mode,
        init_lora=args.init_lora, init_embedding=args.init_embedding,
        **_eval_config(args),
    )
    check_config(cfg)  # option, name and image problems are reported before the model loads
    name = validate_name(args.name)
    _expect_result(args, out / f"{name}.safetensors", out / f"{name}.preview.png")
    images = D.load_image_folder(args.images)
    class_images = D.load_image_folder(args.class_images) if args.class_images else None
    host = DiffusersHost.load(args.model, device=args.device, prediction=args.prediction)
    print(images.summary(), flush=True)

    def class_progress(done, total):
        print(f"class images {done}/{total}", flush=True)

    preview_path = out / f"{cfg.name}.preview.png"
    with _compiled(args, host):
        res = train_dreambooth(host, images, cfg, class_images=class_images,
                               progress=_Printer(preview_path if args.preview_every else None),
                               class_progress=class_progress, encoders=_encoders(args, host),
                               on_point=_print_point)
    _print_done(res)
    _report_evaluation(res, out, name)
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="teach the bundled small model a new concept on the CPU (a few minutes)")
    p.add_argument("--out", default="likeness-demo", help="folder for the embedding and the before/after grid")
    p.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    p.add_argument("--overwrite", action="store_true", help="replace the demo's earlier output")
    # no `choices`: they live in demo.py, which --help does not import; run_demo names them on a typo
    p.add_argument("--concept", default="checked",
                   help="the held-out concept to teach: checked, or moon (a shape TI cannot teach this small model)")


def _run_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out=Path(args.out), steps=args.steps, overwrite=args.overwrite, concept=args.concept)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (not timed tests): `likeness bench quality`")
    bsub = p.add_subparsers(dest="bench", required=True)
    # The benchmark's options (and its --help) are the testbed's own (world/quality.py): they are
    # parsed there, so that nothing of the world is imported until a benchmark runs.
    bsub.add_parser("quality", add_help=False,
                    help="teach the world base model its new concepts with each method; fidelity / prompt "
                         "fidelity / wall-time table (`likeness bench quality --help` lists its options)")


def _run_bench(args, rest: list[str]) -> int:
    from .world.quality import main

    return main(rest, prog="likeness bench quality")


def _seedselect_parser(sub) -> None:
    from .trainers.diff_sampling import SAMPLERS, SCHEDULERS
    from .trainers.seedselect import STARTS

    p = sub.add_parser("seedselect", help="optimise starting noise so the model draws a concept like the references")
    p.add_argument("--model", required=True, help="diffusers folder, or a single-file .safetensors/.ckpt checkpoint")
    p.add_argument("--references", required=True, help="folder of 3-10 images of the concept")
    p.add_argument("--prompt", required=True, help="the prompt naming the concept, e.g. 'a photo of a tiger cat'")
    p.add_argument("--negative", default="", help="negative prompt (with --cfg > 1)")
    p.add_argument("--clip-vision", required=True,
                   help="local folder of a transformers CLIPVisionModelWithProjection (e.g. CLIP-ViT-H-14)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--scheduler", default="ddim_uniform", choices=SCHEDULERS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--optimise-without-cfg", action="store_true", help="optimise at cfg 1 (half the cost)")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate on the noise (/10 after 3 iterations)")
    p.add_argument("--seed", type=int, default=0, help="the noise to start from (ComfyUI's RandomNoise(seed))")
    p.add_argument("--start", default="seed", choices=STARTS)
    p.add_argument("--candidates", type=int, default=4, help="starts scored by best_of / inversion")
    p.add_argument("--num-seeds", type=int, default=1, help=">1: bootstrap that many varied seeds")
    p.add_argument("--bootstrap-iterations", type=int, default=5, help="iterations of each extra seed's run")
    p.add_argument("--target-loss", type=float, default=None, help="stop once the loss is at or below this")
    p.add_argument("--name", default="seedselect", help="seed file name (<name>.seed.safetensors)")
    p.add_argument("--out", default="seeds", help="folder for the seed file and the result images")
    _model_args(p, "seed")
    _state_args(p, "seed file")
    p.add_argument("--state-every", type=int, default=10,
                   help="also write a run state every N iterations (0: only at the end of each seed's run and on a stop)")


def _run_seedselect(args) -> int:
    import torch

    from .hosts.diffusers import DiffusersHost, load_clip_vision
    from .trainers import data as D
    from .trainers import seed_bank as B
    from .trainers.seedselect import (SeamSeedModel, SeedSelectConfig, check_config, reference_batch, seed_entry,
                                      train_seedselect)

    cfg = SeedSelectConfig(
        width=args.width, height=args.height, sampler=args.sampler, scheduler=args.scheduler, steps=args.steps,
        cfg=args.cfg, optimise_cfg=1.0 if args.optimise_without_cfg else None, iterations=args.iterations,
        learning_rate=args.lr, seed=args.seed, start=args.start, candidates=args.candidates,
        num_seeds=args.num_seeds, target_loss=args.target_loss, bootstrap_iterations=args.bootstrap_iterations,
        output_dir=args.out, name=args.name, resume=args.resume, keep_states=args.keep_states,
        state_every=args.state_every)
    check_config(cfg)
    target = B.seed_path(args.out, args.name)  # name and overwrite problems before any loading
    _expect_result(args, target, Path(args.out) / f"{args.name}.preview.png")
    replace = args.overwrite or args.resume != "off"  # a resumed run replaces its own seed file
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; pick another --name, pass --overwrite, or --resume to continue "
                              "the run that wrote it")
    images = D.load_image_folder(args.references)
    refs = reference_batch(images, args.height, args.width)
    host = DiffusersHost.load(args.model, device=args.device, prediction=args.prediction)
    vision = load_clip_vision(args.clip_vision, device=host.device)
    print(images.summary(), flush=True)
    seed_model = SeamSeedModel(host, args.prompt, args.negative)

    def save(res):  # the result, or on a stop the best seed so far (the loop's last good state)
        return B.save_seed(args.out, args.name, seed_entry(res, cfg, host, args.prompt, args.negative),
                           overwrite=replace)

    with _compiled(args, seed_model):
        res = train_seedselect(seed_model, vision, refs, cfg, on_cancel=save,
                               progress=_Printer(Path(args.out) / f"{args.name}.preview.png"))
    path = save(res)
    for i, im in enumerate(res.images):
        _save_png(im, Path(args.out) / f"{args.name}.{i}.png")
    reached = f", target at iteration {res.iterations_to_target}" if res.iterations_to_target else ""
    resumed = f", continued after iteration {res.resumed_from}" if res.resumed_from else ""
    print(f"done: loss {res.start_loss:.4f} -> {res.best_loss:.4f}, {res.iterations_done} iterations in "
          f"{res.seconds:.1f} s{reached}{resumed}\nwrote {path}")
    if res.state_path is not None:
        print(f"run state {res.state_path} (train longer: raise --iterations or --num-seeds and add --resume)")
    return 0


# ------------------------------------------------------------------------------------------
# failures and stops: one line that says what happened and what is on disk, never a traceback


def _expect_result(args, path: Path, preview: Path) -> None:
    """Refuse an output folder that is a file, or a result/preview path that is a folder, before
    anything loads; then remember which file holds the run's result and when the run began, so
    that a stop or a failure reports a save only when this run really wrote that file."""
    if getattr(args, "out", None) is not None and not str(args.out).strip():
        raise ValueError("--out is empty: give the folder to write into")
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"--out {path.parent} is a file, not a folder: choose a folder to write into")
    for p in (path, preview):
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a folder, so the run could not write its file there: "
                                    "move that folder away or choose another --name")
    args.result_path, args.started = path, time.time()


#: commands whose result file is written by the training loop (it reports what it saved)
_LOOP_SAVES = ("ti", "dreambooth")


def _saved_note(args, exc: BaseException | None = None) -> str:
    path = getattr(args, "result_path", None)
    if path is None:
        return "nothing was saved"
    done = getattr(exc, "likeness_result", None) if args.command in _LOOP_SAVES else None
    if done is not None:  # the loop says which step it saved, and which state can continue it
        if not done.saved_step:
            return f"nothing was saved by this run ({path} was not written)"
        note = f"the last good result (step {done.saved_step}) was saved to {path}"
        if done.state_path is not None:
            note += f"; continue it with --resume (state {done.state_path.name})"
        return note
    try:
        fresh = path.stat().st_mtime >= args.started - 1
    except OSError:
        fresh = False
    state = getattr(exc, "likeness_state", None)  # SeedSelect: the state that continues it
    resume = f"; continue it with --resume (state {state.name})" if state is not None else ""
    if fresh:
        what = "the best seed so far" if args.command == "seedselect" else "the last good result"
        return f"{what} was saved to {path}{resume}"
    return f"nothing was saved by this run ({path} was not written){resume}"


_OOM_HINT = ("out of memory: lower the resolution or batch size, use --gradient-checkpointing or "
             "--optimizer adafactor, or pick a smaller model")


def _failure(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for the failures a user can act on; None for a bug.
    2: the input (an option, a file, a folder) must change; 1: the run itself failed."""
    import errno
    import pickle

    import torch
    from PIL import Image

    if isinstance(exc, (ValueError, FileExistsError, FileNotFoundError, PermissionError,
                        NotADirectoryError, IsADirectoryError)):
        return str(exc), 2
    if isinstance(exc, pickle.UnpicklingError):
        return (f"a model file holds a pickle that is not plain weights and was not loaded ({exc}); "
                "use a .safetensors copy of the model"), 2
    if isinstance(exc, Image.DecompressionBombError):
        return f"an image is too large to open safely ({exc}); downscale it", 2
    if isinstance(exc, FloatingPointError):
        return str(exc), 1
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
            isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate" in str(exc))):
        return _OOM_HINT, 1
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"the disk is full{where}: free some space or choose another --out, then run again", 1
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}", 1
    return None


class _StopSignals:
    """SIGINT, SIGTERM and SIGHUP all stop a run like Cancel: the first raises KeyboardInterrupt
    (the loop then saves the last good result); a second one while that save runs is only
    acknowledged, so a hurried double Ctrl-C does not lose the result; a third abandons it."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.signum, self.count, self.old = signal.SIGINT, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.signum = signum
            raise KeyboardInterrupt
        if self.count == 2:
            print("likeness: saving the last good result; signal again to abandon it", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    def reason(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch: every file we need is local
    parser = argparse.ArgumentParser(prog="likeness", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _ti_parser(sub)
    _dreambooth_parser(sub)
    _demo_parser(sub)
    _bench_parser(sub)
    _seedselect_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":  # only a benchmark takes options this parser does not know
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    runs = {"ti": _run_ti, "dreambooth": _run_dreambooth, "demo": _run_demo, "seedselect": _run_seedselect,
            "bench": lambda a: _run_bench(a, rest)}
    with _StopSignals() as stop:
        try:
            return runs[args.command](args)
        except KeyboardInterrupt as exc:
            print(f"likeness: {stop.reason()}; {_saved_note(args, exc)}", file=sys.stderr)
            return 128 + stop.signum
        except Exception as exc:  # noqa: BLE001 - every failure ends in one line, never a traceback
            known = _failure(exc)
            if known is None:
                raise  # a bug: its traceback is what a report needs
            message, rc = known
            print(f"likeness: error: {message}", file=sys.stderr)
            if rc == 1:
                print(f"likeness: {_saved_note(args, exc)}", file=sys.stderr)
            return rc

if __name__ == "__main__":
    sys.exit(main())
