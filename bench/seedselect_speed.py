"""SeedSelect speed and memory: seconds per iteration and peak memory, random-weight models.

    python bench/seedselect_speed.py --family sd15 --size 512 --steps 20      # SD1.5 shape, 512 px
    python bench/seedselect_speed.py --family sdxl --size 1024 --steps 20     # SDXL shape, 1024 px
    python bench/seedselect_speed.py --tiny                                   # CPU smoke run

Real-size architectures from the shipped configs (hosts/assets), random weights (speed and memory
do not depend on the weights), CLIP ViT-H/14 vision tower (SeedSelect's encoder), DDIM 20 steps,
CFG 7.5 (or --no-cfg), bf16 compute on CUDA.  Peak memory: CUDA max allocated, else process RSS.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the folder holding the `likeness` package


def build_host(family: str, device, dtype, tiny: bool):
    from likeness.hosts.diffusers import DiffusersHost, config_folder, folder_scheduler, folder_tokenizer

    if tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import tiny_models

        return tiny_models.tiny_host("sd1", device=device, dtype=dtype)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_folder("sdxl" if family == "sdxl" else "sd1")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
    subs = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    tes = [(CLIPTextModelWithProjection if s.endswith("_2") else CLIPTextModel)(
        CLIPTextConfig.from_pretrained(str(folder / s))) for s in subs]
    toks = [folder_tokenizer(folder / s.replace("text_encoder", "tokenizer")) for s in subs]
    return DiffusersHost.from_components(unet, vae, toks, tes, folder_scheduler(folder / "scheduler"),
                                         family="sdxl" if family == "sdxl" else "sd1", device=device, dtype=dtype)


def build_vision(device, dtype, tiny: bool):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from likeness.hosts.diffusers import HFClipVision

    if tiny:
        cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    else:  # laion CLIP-ViT-H-14
        cfg = CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120,
                               num_hidden_layers=32, num_attention_heads=16, projection_dim=1024, hidden_act="gelu")
    return HFClipVision(CLIPVisionModelWithProjection(cfg).to(device, dtype), dtype=dtype)


def peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--no-cfg", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny SD1-shaped model at 64 px (CPU smoke run)")
    args = ap.parse_args(argv)
    from likeness.trainers.seedselect import SeamSeedModel, SeedSelectConfig, train_seedselect

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 64 if args.tiny else args.size
    torch.manual_seed(0)
    host = build_host(args.family, device, dtype, args.tiny)
    vision = build_vision(device, dtype, args.tiny)
    refs = torch.rand(4, size, size, 3)
    cfg = SeedSelectConfig(width=size, height=size, steps=args.steps, cfg=1.0 if args.no_cfg else 7.5,
                           iterations=args.iterations)
    times = []
    t = [time.perf_counter()]

    def progress(i, n, loss, img):
        now = time.perf_counter()
        times.append(now - t[0])
        t[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = train_seedselect(SeamSeedModel(host, "a photo of a tiger cat"), vision, refs, cfg, progress)
    per_it = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median, first (warm-up) excluded
    what = "tiny-sd1 64px" if args.tiny else f"{args.family} {size}px"
    print(f"{what}, {args.steps} steps, cfg {cfg.cfg}, {device.type}"
          f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}: "
          f"{per_it:.2f} s/iteration, peak {peak_mib(device):.0f} MiB, loss {res.losses[0]:.4f} -> {res.best_loss:.4f}; "
          f"30 iterations ~ {30 * per_it:.0f} s (paper: ~300 s per concept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
