"""`likeness` command line: the same trainers as the ComfyUI nodes, on the diffusers host.

    likeness ti --model <diffusers folder | .safetensors | .ckpt> --images <dir> --name <word> [...]
    likeness demo [--out DIR]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path


def _save_png(image, path: Path) -> None:
    """[H, W, 3] float image -> PNG, written atomically like every other file we write."""
    import numpy as np
    from PIL import Image

    from .trainers import formats

    arr = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)  # the first preview may come before the first save
    formats.atomic_write_bytes(path, buf.getvalue())


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


def _ti_parser(sub) -> None:
    p = sub.add_parser("ti", help="train a Textual Inversion embedding")
    p.add_argument("--model", required=True, help="diffusers folder, or a single-file .safetensors/.ckpt checkpoint")
    p.add_argument("--images", required=True, help="folder of RGB images; same-named .txt/.caption files are captions")
    p.add_argument("--name", required=True, help="the new word; also the file name (<name>.safetensors)")
    p.add_argument("--init-text", default="", help="word(s) to start from (default: 'object', or 'painting' for style)")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token (1 edits best; 2-8 fit harder subjects)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate for the vectors")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--templates", default="auto", choices=["auto", "object", "style", "captions"],
                   help="prompts: auto = captions when every image has one, else object templates")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize the short side to this and train on square crops (default: images' own size)")
    p.add_argument("--random-crop", action="store_true", help="random instead of centre square crops")
    p.add_argument("--no-flip", action="store_true", help="don't add mirrored copies (for asymmetric subjects, text)")
    p.add_argument("--save-every", type=int, default=100, help="write the embedding every N steps (0: end only)")
    p.add_argument("--preview-every", type=int, default=50, help="render a preview every N steps (0: never)")
    p.add_argument("--preview-prompt", default="a photo of {}", help="{} is replaced by the new word")
    p.add_argument("--out", default="embeddings", help="folder to write the embedding into")
    p.add_argument("--overwrite", action="store_true", help="replace an existing embedding of the same name")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--prediction", default="auto", choices=["auto", "eps", "v"],
                   help="single-file SD2 checkpoints: eps (512-base) or v (768); auto = v for SD2")


def _run_ti(args) -> int:
    from .hosts.diffusers import DiffusersHost
    from .trainers import data as D
    from .trainers.textual_inversion import TIConfig, train_textual_inversion

    cfg = TIConfig(
        name=args.name, output_dir=args.out, init_text=args.init_text, num_vectors=args.vectors,
        steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
        templates=args.templates, resolution=args.resolution, random_crop=args.random_crop,
        flip=not args.no_flip, save_every=args.save_every, preview_every=args.preview_every,
        preview_prompt=args.preview_prompt, overwrite=args.overwrite,
    )
    images = D.load_image_folder(args.images)  # image problems are reported before the model loads
    host = DiffusersHost.load(args.model, device=args.device, prediction=args.prediction)
    print(images.summary(), flush=True)  # the trainer runs every remaining check before any work
    preview_path = Path(args.out) / f"{cfg.name}.preview.png"
    res = train_textual_inversion(host, images, cfg, progress=_Printer(preview_path if args.preview_every else None))
    print(f"done: {res.steps_done} steps in {res.seconds:.1f} s ({res.skipped_steps} non-finite steps skipped)")
    for f in res.files:
        print(f"wrote {f}")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="teach the bundled small model a new concept on the CPU (a few minutes)")
    p.add_argument("--out", default="likeness-demo", help="folder for the embedding and the before/after grid")
    p.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    p.add_argument("--overwrite", action="store_true", help="replace the demo's earlier output")


def _run_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out=Path(args.out), steps=args.steps, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch: every file we need is local
    parser = argparse.ArgumentParser(prog="likeness", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _ti_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {"ti": _run_ti, "demo": _run_demo}[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        print(f"likeness: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("likeness: interrupted; the last good result (if any step finished) was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
