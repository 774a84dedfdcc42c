"""Likeness on ComfyUI's own objects: the host (``host.py``: the whole seam on MODEL + CLIP + VAE),
SeedSelect's model and NOISE and the image encoder over CLIP_VISION (CLIP or DINOv2, also used by
the Evaluate node) (``seedselect.py``), and what both build on: model
detection (``detection.py``), trainable clones and out-of-place layers (``patching.py``) and the
VAE (``vae.py``).

Importable only inside ComfyUI (or a process that put a ComfyUI checkout on ``sys.path`` and
configured ``comfy.cli_args`` first): every module imports ``comfy.*``.
"""
from .detection import SUPPORTED, ModelFacts, check_clip, check_vae, checkpoint_name, family_of, model_facts, \
    prediction_of, unet_layout_of
from .host import ComfyCond, ComfyHost
from .patching import PatchableWrapper, add_identity_wrappers, checkpointed_blocks, out_of_place_clip_layers
from .seedselect import ComfyClipVision, ComfySeedModel, FunctionSampler, OptimizedNoise
from .vae import ComfyVAE

__all__ = ["ComfyHost", "ComfyCond", "ComfySeedModel", "ComfyClipVision", "OptimizedNoise", "FunctionSampler",
           "ComfyVAE", "ModelFacts", "model_facts", "family_of", "prediction_of", "checkpoint_name", "check_clip",
           "check_vae", "unet_layout_of", "SUPPORTED", "PatchableWrapper", "add_identity_wrappers",
           "checkpointed_blocks", "out_of_place_clip_layers"]
