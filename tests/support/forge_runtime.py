"""Stable Diffusion WebUI Forge's backend in a test process: what ``FORGE_PATH`` points to (a
checkout laid out by ``tests/support/get_webui.sh``), put on ``sys.path`` the way Forge's launch
does, on the CPU, and the tiny checkpoints loaded by Forge's own loader as its WebUI loads a
checkpoint (``backend.loader.forge_loader`` under ``torch.inference_mode()``, as
``modules/sd_models.py`` calls it).

Forge's text-processing engine reads one setting (``opts.emphasis``) from the WebUI's
``modules.shared``, which imports gradio and the whole UI; outside the WebUI that module is the
small stand-in below with Forge's defaults for the settings the backend reads.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

#: the WebUI settings Forge's backend reads, at Forge's defaults (modules/shared_options.py)
DEFAULT_OPTS = {"emphasis": "Original", "sdxl_crop_left": 0, "sdxl_crop_top": 0,
                "sdxl_refiner_low_aesthetic_score": 2.5, "sdxl_refiner_high_aesthetic_score": 6.0}


def forge_path() -> Path | None:
    """The Forge checkout named by ``FORGE_PATH``, when it is one (has ``backend/loader.py``)."""
    p = os.environ.get("FORGE_PATH")
    if p and (Path(p) / "backend" / "loader.py").is_file():
        return Path(p)
    return None


def import_forge(root: Path) -> None:
    """Forge's backend importable on the CPU: its root and the huggingface_guess repository on the
    path, ``--always-cpu`` for its argument parser, and the settings stand-in when the WebUI's
    own ``modules.shared`` is not loaded."""
    for p in (root / "repositories" / "huggingface_guess", root):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    if "backend.args" not in sys.modules:
        argv = sys.argv
        sys.argv = [argv[0], "--always-cpu"]
        try:
            import backend.args  # noqa: F401  (parses sys.argv once, at import)
        finally:
            sys.argv = argv
    if "modules.shared" not in sys.modules:
        import modules  # Forge's package (an empty __init__)

        shared = types.ModuleType("modules.shared")
        shared.opts = types.SimpleNamespace(**DEFAULT_OPTS)
        sys.modules["modules.shared"] = shared
        modules.shared = shared


def load_engine(path: Path):
    """A checkpoint loaded as Forge's WebUI loads it: ``shared.sd_model`` (a ForgeDiffusionEngine)."""
    from backend.loader import forge_loader

    with torch.inference_mode():
        return forge_loader(str(path))


def forge_checkpoint(arch: str) -> Path:
    """The tiny ``arch`` checkpoint with the blocks Forge's UNet always has and ComfyUI's tiny
    layout leaves out (the middle res block) added as identity blocks (unit norms, zero convs):
    Forge would otherwise leave them as uninitialised memory.  Cached beside the original."""
    import safetensors.torch as sf

    from support.tiny_checkpoints import ensure_tiny_checkpoint

    src = ensure_tiny_checkpoint(arch)
    out = src.with_name(f"forge_{src.name}")
    if out.is_file():
        return out
    sd = sf.load_file(str(src))
    unet = load_engine(src).forge_objects.unet.model.diffusion_model
    for k, v in unet.state_dict().items():
        key = f"model.diffusion_model.{k}"
        if key not in sd:
            norm = k.endswith(".weight") and v.ndim == 1
            sd[key] = torch.ones(v.shape, dtype=v.dtype) if norm else torch.zeros(v.shape, dtype=v.dtype)
    for name, m in unet.named_modules():  # Forge's Linear is left without weights when none load
        if hasattr(m, "in_features") and getattr(m, "weight", None) is None:
            sd[f"model.diffusion_model.{name}.weight"] = torch.zeros(m.out_features, m.in_features)
            sd[f"model.diffusion_model.{name}.bias"] = torch.zeros(m.out_features)
    tmp = out.with_name(out.name + ".tmp")
    sf.save_file(sd, str(tmp))
    os.replace(tmp, out)
    return out


def load_tiny(arch: str):
    """The tiny ``arch`` checkpoint (``support.tiny_checkpoints``) as a Forge engine."""
    return load_engine(forge_checkpoint(arch))
