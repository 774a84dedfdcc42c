"""ComfyUI in this process, and random-weight SD1.5 / SDXL / CLIP vision models built in memory:
what ``bench/gpu.py`` and ``devtools/gpu/cuda_check.py`` run on.

Weights change no timing and no code path, and no pretrained weights can be had on the GPU
machine, so the models have the real architectures and random weights (scaled like a trained
network's, so bf16/fp16 activations stay finite).  ``tiny=True`` keeps ComfyUI's detection (the
same model classes, text encoders and VAE) but gives the UNet one level: the CPU rehearsal of the
same code.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import tempfile
import types
from pathlib import Path

#: the checkout's parent, so ``import likeness`` finds this checkout whatever its folder is called
REPO = Path(__file__).resolve().parents[1]


class _VideoStandIn(types.ModuleType):
    """PyAV is imported by ComfyUI's video types at import time but used only by video nodes;
    a GPU machine without it gets this module, whose every attribute is an empty class."""

    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _VideoStandIn(spec.name)

    def exec_module(self, module):
        return None


def import_likeness():
    """``import likeness`` resolving to this checkout (not to an installed copy): a link named
    ``likeness`` in a temp folder, first on the path.  Call before anything imports it."""
    link_dir = Path(tempfile.mkdtemp(prefix="likeness-import-"))
    (link_dir / "likeness").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(link_dir))


def import_comfy(comfy_dir: str | os.PathLike, base: str | os.PathLike | None = None):
    """Import ComfyUI from ``comfy_dir`` as its ``main.py`` would (CPU when there is no CUDA);
    every folder it writes (models, output, temp, user) goes below ``base`` (a temp folder)."""
    import torch

    comfy_dir = os.path.abspath(comfy_dir)
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_management.py")):
        raise SystemExit(f"{comfy_dir} is not a ComfyUI folder (no comfy/model_management.py)")
    try:
        import av  # noqa: F401
    except ImportError:
        sys.meta_path.insert(0, _StandInFinder())
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    base = Path(base or tempfile.mkdtemp(prefix="likeness-comfy-"))
    import folder_paths

    for kind in ("output", "temp", "input", "user"):
        (base / kind).mkdir(parents=True, exist_ok=True)
        getattr(folder_paths, f"set_{kind}_directory")(str(base / kind))
    for kind in ("embeddings", "loras", "checkpoints"):  # first in the list: where our nodes write
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(base / "models" / kind), is_default=True)
    import_likeness()
    return base


_COMMON = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
               use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
               use_temporal_resblock=False)
#: the real SD1.5 UNet (860 M parameters) and SDXL base UNet (2.6 G), in ComfyUI's terms
UNETS = {
    "sd15": dict(_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8),
    "sdxl": dict(_COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 use_linear_in_transformer=True, context_dim=2048, num_head_channels=64),
}
#: the CPU rehearsal's SD1.5 UNet: one level, one res block, the detection's fixed widths
TINY_SD15 = dict(UNETS["sd15"], num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                 transformer_depth_output=[0, 0], transformer_depth_middle=-2)
VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
           num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def random_like(module, device, seed: int = 0) -> dict:
    """Random fp16 values for every tensor of ``module`` (built on the meta device): biases zero,
    other vectors (norm gains: GroupNorms are named ``in_layers.0``, ``out.0``, ...) and scalars one,
    matrices normal with std min(0.02, 1/sqrt(fan-in)).  A zero gain would silence the UNet's output
    and with it every gradient the benchmarks and checks rely on."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        shape = tuple(v.shape)
        leaf = k.rsplit(".", 1)[-1]
        if k.endswith("position_ids"):
            out[k] = torch.arange(shape[-1]).expand(shape).clone()
        elif leaf == "bias" or leaf.endswith("_bias"):
            out[k] = torch.zeros(shape, dtype=torch.float16)
        elif len(shape) <= 1:  # every norm's gain, whatever it is called ("in_layers.0", "out.0"), and scales
            out[k] = torch.ones(shape, dtype=torch.float16)
        else:
            std = min(0.02, 1 / math.sqrt(max(1, math.prod(shape[1:]))))
            out[k] = (torch.randn(shape, generator=gen, device=device) * std).half().cpu()
    return out


def random_checkpoint(arch: str, tiny: bool = False) -> dict:
    """A single-file checkpoint state dict (ComfyUI's layout) with ``arch``'s real architecture.
    Tiny: SD1.5 only (the rehearsal's SDXL workloads use it too: SDXL's CLIP-G alone would not fit
    a CPU minute)."""
    import torch
    import comfy.ops
    import comfy.supported_models as sm
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_cfg = dict(TINY_SD15 if tiny else UNETS[arch])
    model_cfg = sm.SDXL(unet_cfg) if arch == "sdxl" and not tiny else sm.SD15(unet_cfg)
    unet = UNetModel(**dict(model_cfg.unet_config), device="meta", operations=comfy.ops.disable_weight_init)
    clip = model_cfg.clip_target().clip(device="meta", dtype=torch.float16, model_options={})
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sd = {}
    sd.update(model_cfg.process_unet_state_dict_for_saving(random_like(unet, dev, 1)))
    sd.update(model_cfg.process_clip_state_dict_for_saving(random_like(clip, dev, 2)))
    sd.update(model_cfg.process_vae_state_dict_for_saving(random_like(vae, dev, 3)))
    return sd


def load_models(arch: str, tiny: bool = False, dtype=None):
    """(MODEL, CLIP, VAE) as CheckpointLoaderSimple returns them, under inference mode; ``dtype``
    forces the UNet's and text encoders' weight dtype (None: ComfyUI's choice, fp16 on most GPUs)."""
    import torch
    import comfy.sd

    opts = {"dtype": dtype} if dtype is not None else {}
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_state_dict_guess_config(
            random_checkpoint(arch, tiny), model_options=opts, te_model_options=dict(opts))[:3]
    return model, clip, vae


_TINY_VISION = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
                "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 4,
                "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16}


def random_clip_vision(tiny: bool = False):
    """A CLIP_VISION as Load CLIP Vision returns it: ViT-H/14 (SeedSelect's encoder), random weights."""
    import torch
    import comfy.clip_vision

    if tiny:
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(_TINY_VISION, fh)
    else:
        path = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
    with torch.inference_mode():
        cv = comfy.clip_vision.ClipVisionModel(path)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        cv.load_sd({k: v.float() for k, v in random_like(cv.model, dev, 4).items()})
    return cv


def conditioning(clip, text: str):
    """CLIPTextEncode's output for ``text``."""
    import torch

    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def random_images(n: int, size: int, seed: int = 0):
    """An IMAGE batch ``[n, size, size, 3]`` of smooth random pictures (not white noise, which no
    VAE encodes stably)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").permute(0, 2, 3, 1).contiguous()
