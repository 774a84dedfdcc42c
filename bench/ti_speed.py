"""Textual Inversion speed on the ComfyUI host: seconds per step and peak GPU memory, beside the
anchor scripts (``SHARED_BENCH``: ComfyUI's own floor and trainer) measured in the same run.

Random-weight, full-size SD1.5 or SDXL checkpoints are built in memory and loaded through ComfyUI's
own detection (weights change no timing; no pretrained weights can be had).  The anchors are the
shared scripts, run as subprocesses right after ours on the same GPU:
  comfy_anchor.py   ComfyUI's built-in TrainLoraNode and a lean UNet fwd+bwd (grads to the text
                    conditioning only: the TI pattern, the floor a TI step can approach)
  anchors.sh        the diffusers example scripts (only when DIFFUSERS_EXAMPLES is set)

    python bench/ti_speed.py --comfy $COMFYUI_PATH --arch sd15 --batch 4 --res 512 [--steps 40]
    python bench/ti_speed.py --comfy $COMFYUI_PATH --arch sdxl --batch 1 --res 1024
Prints one RESULT line per measurement; `--markdown FILE` appends a dated table to FILE.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED_BENCH = Path(os.environ.get("LIKENESS_SHARED_BENCH", HERE.parent.parent / "shared" / "bench"))


def _import_comfy(comfy_dir: str):
    sys.path.insert(0, os.path.abspath(comfy_dir))
    os.chdir(comfy_dir)
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def random_checkpoint(arch: str):
    """A state dict with the real architecture in ComfyUI's checkpoint layout, random weights
    (``comfy_env.random_checkpoint``: the one builder of bench/gpu.py and devtools/gpu)."""
    import comfy_env

    return comfy_env.random_checkpoint(arch)


def time_training(arch: str, train, warmup: int) -> dict:
    """Median seconds per step and peak CUDA memory of ``train(host, out_dir, progress)`` on a
    random-weight ``arch`` checkpoint loaded as ComfyUI loads it, inside a node's inference mode;
    the first ``warmup`` steps are not counted."""
    import torch
    import comfy.sd

    from likeness.hosts.comfy import ComfyHost

    stamps: list[float] = []
    cuda = torch.cuda.is_available()

    def progress(step, total, loss, img):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with torch.inference_mode():  # as ComfyUI runs every node
        model, clip, vae = comfy.sd.load_state_dict_guess_config(random_checkpoint(arch))[:3]
        host = ComfyHost(model, clip, vae, name=f"random-{arch}")
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"likeness-bench-{os.getpid()}"
        with host.training():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            train(host, out, progress)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"s_per_step": statistics.median(gaps) if gaps else float("nan"), "peak_GB": peak, "steps": len(stamps)}


def time_likeness(arch: str, batch: int, res: int, steps: int, warmup: int) -> dict:
    import torch

    from likeness.trainers import data as D
    from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion

    images = D.images_from_batch(torch.rand(4, res, res, 3, generator=torch.Generator().manual_seed(0)))

    def train(host, out, progress):
        cfg = TIConfig(name=f"bench-{arch}", output_dir=out, steps=warmup + steps, batch_size=batch,
                       save_every=0, preview_every=0, overwrite=True)
        train_textual_inversion(host, images, cfg, progress=progress)

    return time_training(arch, train, warmup)


def anchors(comfy_dir: str, arch: str, batch: int, res: int) -> list[str]:
    """The anchor lines, measured now: ComfyUI's own floor and trainer, and the diffusers examples
    where ``DIFFUSERS_EXAMPLES`` is set."""
    lines = run_anchor([sys.executable, str(SHARED_BENCH / "comfy_anchor.py"), comfy_dir, arch, str(batch),
                        str(res), "20"])
    if os.environ.get("DIFFUSERS_EXAMPLES"):
        lines += run_anchor(["bash", str(SHARED_BENCH / "anchors.sh"), arch],
                            env=dict(os.environ, COMFYUI_PATH=comfy_dir))
    return lines


def report(lines: list[str], markdown: str | None, title: str, script: str) -> None:
    """Print the result lines; with ``markdown``, append them under a dated heading with the command."""
    for line in lines:
        print(line, flush=True)
    if markdown:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(markdown, "a", encoding="utf-8") as fh:
            fh.write(f"\n### {title}, {stamp}\n\n`python {script} " + " ".join(sys.argv[1:]) + "`\n\n```\n"
                     + "\n".join(lines) + "\n```\n")


def run_anchor(cmd: list[str], env: dict | None = None) -> list[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith(("ANCHOR", "RESULT", "FLOOR"))]
    return lines or [f"ANCHOR-FAILED {' '.join(cmd)} rc={proc.returncode}: {(proc.stderr or '')[-300:]}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), required=not os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--markdown", default=None, help="append a dated results table to this file")
    args = ap.parse_args()
    comfy_dir = os.path.abspath(args.comfy)
    _import_comfy(comfy_dir)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    ours = time_likeness(args.arch, args.batch, args.res, args.steps, args.warmup)
    lines = [f"RESULT likeness_ti {args.arch} bs={args.batch} res={args.res} "
             f"s_per_step={ours['s_per_step']:.4f} peak_GB={ours['peak_GB']:.2f}"]
    if not args.no_anchors:
        lines += anchors(comfy_dir, args.arch, args.batch, args.res)
    report(lines, args.markdown, f"TI {args.arch} batch {args.batch} {args.res}px — {card}", "bench/ti_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
