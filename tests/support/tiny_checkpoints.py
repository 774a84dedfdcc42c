"""Tiny random-weight checkpoints that ComfyUI's own CheckpointLoaderSimple detects as SD1.x
(``supported_models.SD15``), SD2.x (``SD20``) and SDXL (``SDXL``).

ComfyUI tells the families apart by the UNet alone (``comfy/model_detection.py``): the widths and
flags each ``supported_models`` class lists in its ``unet_config`` (model channels, context width,
linear or convolutional transformer projections, the size-conditioning input, and for SDXL the
transformer depth of every input block).  Everything else about the UNet is free, so ours is as
small as that allows.  The text encoders and the KL-VAE are built by ComfyUI at a fixed full size,
so their weights must all be present (a missing one would stay uninitialised memory) - which is
why the files are still 0.4 GiB (SD1), 0.9 GiB (SD2: OpenCLIP ViT-H) and 2 GiB (SDXL: CLIP-G).

The key names and shapes come from ComfyUI's modules instantiated on the ``meta`` device, mapped
to the single-file layout by the same ``process_*_state_dict_for_saving`` functions its
``save_checkpoint`` uses, so a file round-trips through the loader.  SD20 infers v-prediction from
a block this UNet does not have, so the SD2 file loads as EPS; tests that need v-prediction patch
``model_sampling`` (:func:`support.comfy_runtime.v_prediction`).

Files are cached outside any checkout, in ``$LIKENESS_TEST_MODELS`` (default
``~/.cache/likeness/test-models``) under a folder named for :data:`BUILDER_VERSION`, written
atomically, and reused by later runs; the first test that needs one builds it.  To build (or
rebuild) them ahead of a test run, from the ``tests`` folder::

    COMFYUI_PATH=... python -m support.tiny_checkpoints sd15 sdxl sd2
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: bump when the files this module writes change, so stale cached files are not reused
BUILDER_VERSION = 1


@dataclass(frozen=True)
class TinyArch:
    """One tiny checkpoint: the ComfyUI model class it must be detected as, and the free part of
    the UNet layout (levels, res blocks per level, transformer blocks per input block when the
    class does not fix them)."""

    model_class: str
    file: str
    layout: dict = field(default_factory=dict)


_ONE_LEVEL = {"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1]}
ARCHS: dict[str, TinyArch] = {
    "sd15": TinyArch("SD15", "tiny_sd15.safetensors", _ONE_LEVEL),
    "sd2": TinyArch("SD20", "tiny_sd2.safetensors", _ONE_LEVEL),
    # SDXL fixes transformer_depth [0,0,2,2,10,10]: SDXL's own three levels of two res blocks,
    # kept at 320 channels throughout
    "sdxl": TinyArch("SDXL", "tiny_sdxl.safetensors", {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1]}),
}
CHECKPOINTS = {arch: a.file for arch, a in ARCHS.items()}

#: the KL-f8 autoencoder every SD1/SD2/SDXL checkpoint carries (4 latent channels)
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

#: how long each checkpoint took to build in this process (seconds), for reports
CREATION_SECONDS: dict[str, float] = {}


def cache_dir() -> Path:
    """Where the built files live: outside every checkout, reused across runs."""
    root = os.environ.get("LIKENESS_TEST_MODELS") or Path.home() / ".cache" / "likeness" / "test-models"
    return Path(root).expanduser() / f"tiny-v{BUILDER_VERSION}"


def ensure_tiny_checkpoint(arch: str) -> Path:
    """Path of the tiny ``arch`` checkpoint ("sd15", "sdxl", "sd2"), built if not cached yet.

    The build runs in a child process (``COMFYUI_PATH`` must be set): it imports ComfyUI and holds
    up to 2 GiB of weights, neither of which the test process should keep."""
    out = cache_dir() / ARCHS[arch].file
    if not out.is_file():
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "support.tiny_checkpoints", arch], cwd=Path(__file__).parents[1],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0 or not out.is_file():
            raise RuntimeError(f"building the tiny {arch} checkpoint failed ({res.returncode}):\n{res.stdout[-3000:]}")
        CREATION_SECONDS[arch] = time.perf_counter() - t0
        log.warning("built %s in %.1f s (%.0f MiB)", out, CREATION_SECONDS[arch], out.stat().st_size / 2**20)
    return out


def _build_cached(arch: str) -> Path:
    """Build into the cache atomically: a partial file of this process, renamed when complete
    (another process may be building the same file)."""
    out = cache_dir() / ARCHS[arch].file
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        build(arch, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def unet_config(arch: str) -> dict:
    """The UNet configuration: what the model class's detection matches, plus our small layout.
    A depth of -2 in the middle means no middle block; output blocks get no transformers."""
    import comfy.supported_models

    a = ARCHS[arch]
    fixed = getattr(comfy.supported_models, a.model_class).unet_config
    cfg = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
           "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False, "transformer_depth_middle": -2,
           **a.layout, **fixed}
    cfg["transformer_depth_output"] = [0] * sum(n + 1 for n in cfg["num_res_blocks"])
    if cfg.get("adm_in_channels"):  # the size/pooled-text conditioning is a sequential MLP
        cfg["num_classes"] = "sequential"
    return cfg


def shapes(arch: str):
    """``(model_config, {part: {key: (shape, dtype)}})`` for the parts "unet", "clip", "vae",
    from ComfyUI's own modules built on the meta device (no memory, no initialisation)."""
    import torch
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model_config = getattr(comfy.supported_models, ARCHS[arch].model_class)(unet_config(arch))
    unet = UNetModel(**model_config.unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    clip = model_config.clip_target().clip(device="meta", dtype=torch.float16, model_options={})
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=VAE_CONFIG["z_channels"])
    parts = {name: {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}
             for name, m in (("unet", unet), ("clip", clip), ("vae", vae))}
    return model_config, parts


def random_tensor(key: str, shape: tuple, dtype, seed: int = 0):
    """A value for one weight that keeps activations in range through many random layers: norm
    gains (1-D weights) and scalar scales one, biases zero, integer buffers (position ids) a range,
    matrices and kernels normal with std min(0.02, 1/sqrt(fan-in)).  Each key has its own random
    stream, so a value does not depend on which other keys exist."""
    import torch

    leaf = key.rsplit(".", 1)[-1]
    if not dtype.is_floating_point:
        return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
    if leaf == "bias" or leaf.endswith("_bias"):
        t = torch.zeros(shape)
    elif len(shape) <= 1:
        t = torch.ones(shape)
    else:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        std = min(0.02, 1.0 / math.sqrt(math.prod(shape[1:])))
        t = torch.randn(shape, generator=gen) * std
    return t.to(torch.float16)


def build(arch: str, out: Path, seed: int = 0) -> None:
    """Write the tiny ``arch`` checkpoint (float16) to ``out``."""
    import safetensors.torch

    model_config, parts = shapes(arch)
    save = {"unet": model_config.process_unet_state_dict_for_saving,
            "clip": model_config.process_clip_state_dict_for_saving,
            "vae": model_config.process_vae_state_dict_for_saving}
    sd = {}
    for part, keys in parts.items():
        values = {k: random_tensor(k, shape, dtype, seed) for k, (shape, dtype) in keys.items()}
        sd.update(save[part](values))
    sd = {k: v.contiguous() for k, v in sd.items()}
    safetensors.torch.save_file(sd, str(out), metadata={"format": "pt", "likeness_tiny": arch,
                                                       "builder_version": str(BUILDER_VERSION)})
    log.info("tiny %s: %d keys, %.1f M params", arch, len(sd), sum(math.prod(v.shape) for v in sd.values()) / 1e6)


def main(argv: list[str]) -> None:
    """Build the named checkpoints (all when none is named) into the cache, replacing stale ones."""
    from .comfy_runtime import comfy_path, import_comfy

    logging.basicConfig(level=logging.INFO)
    root = comfy_path()
    if root is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    import_comfy(root)
    for arch in argv or list(ARCHS):
        t = time.perf_counter()
        p = _build_cached(arch)
        print(f"{arch}: {p} ({p.stat().st_size / 2**20:.0f} MiB) {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
