"""DreamBooth speed on the ComfyUI host: seconds per step and peak GPU memory for LoRA, full and
pivotal training, beside the anchor scripts (``ti_speed.SHARED_BENCH``) measured in the same run.

The model is a random-weight, full-size SD1.5 or SDXL checkpoint built in memory and loaded through
ComfyUI's own detection (``ti_speed.random_checkpoint``).  With ``--prior`` every step also trains
one class image (prior preservation, 2 images per step - what the diffusers anchor times).  The
anchors are the shared scripts, run as subprocesses right after ours on the same GPU:
``comfy_anchor.py`` (ComfyUI's built-in TrainLoraNode) and, with DIFFUSERS_EXAMPLES set,
``anchors.sh`` (diffusers' train_dreambooth[_lora][_sdxl].py).

    python bench/dreambooth_speed.py --comfy $COMFYUI_PATH --arch sd15 --mode lora --res 512 --prior
    python bench/dreambooth_speed.py --comfy $COMFYUI_PATH --arch sd15 --mode full --res 512 --prior
    python bench/dreambooth_speed.py --comfy $COMFYUI_PATH --arch sdxl --mode lora --res 1024
Prints one RESULT line per measurement; ``--markdown FILE`` appends a dated table to FILE.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ti_speed  # noqa: E402  (its checkpoint builder and anchor runner)


def time_dreambooth(arch: str, mode: str, res: int, prior: bool, steps: int, warmup: int, rank: int,
                    checkpointing: bool) -> dict:
    import torch

    from likeness.trainers import data as D
    from likeness.trainers.dreambooth import DreamBoothConfig, train_dreambooth

    g = torch.Generator().manual_seed(0)
    images = D.images_from_batch(torch.rand(4, res, res, 3, generator=g))
    cls_images = D.images_from_batch(torch.rand(4, res, res, 3, generator=g)) if prior else None

    def train(host, out, progress):
        cfg = DreamBoothConfig(
            name=f"bench-{arch}-{mode}", output_dir=out, instance_prompt="a photo of sks_lk dog", mode=mode,
            class_prompt="a photo of a dog" if prior else "", token="sks_lk", embedding_dir=out, rank=rank,
            steps=warmup + steps, learning_rate=5e-6 if mode == "full" else 1e-4, save_every=0, preview_every=0,
            optimizer="adafactor" if mode == "full" else "adamw", gradient_checkpointing=checkpointing,
            overwrite=True)
        train_dreambooth(host, images, cfg, class_images=cls_images, progress=progress)

    return ti_speed.time_training(arch, train, warmup)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), required=not os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--mode", choices=["lora", "full", "pivotal"], default="lora")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--prior", action="store_true", help="one class image per step (prior preservation)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank (the anchors use 4)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (default on for full)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--markdown", default=None, help="append a dated results table to this file")
    args = ap.parse_args()
    comfy_dir = os.path.abspath(args.comfy)
    ti_speed._import_comfy(comfy_dir)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    ours = time_dreambooth(args.arch, args.mode, args.res, args.prior, args.steps, args.warmup, args.rank,
                           args.checkpointing or args.mode == "full")
    lines = [f"RESULT likeness_dreambooth_{args.mode} {args.arch} bs=1{'+1 prior' if args.prior else ''} "
             f"res={args.res} s_per_step={ours['s_per_step']:.4f} peak_GB={ours['peak_GB']:.2f}"]
    if not args.no_anchors:
        lines += ti_speed.anchors(comfy_dir, args.arch, 1, args.res)
    ti_speed.report(lines, args.markdown, f"DreamBooth {args.mode} {args.arch} {args.res}px — {card}",
                    "bench/dreambooth_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
