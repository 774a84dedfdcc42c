"""A tiny CLIP vision model (2 layers of width 32, random weights) built by ComfyUI's own
``ClipVisionModel`` from a config file: its loader's detection knows only full-size encoders (ViT-L
and up, hundreds of MB and far too slow for a CPU test).  Used in-process by the SeedSelect node
tests and, through :mod:`support.server_nodes`, by the server's Load CLIP Vision."""
from __future__ import annotations

import json
from pathlib import Path

FILE = "tiny_clip_vision.safetensors"
CONFIG = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
          "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3,
          "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16}
_LAYER_KEY = "vision_model.encoder.layers.{}.layer_norm1.weight"


def write_config(path: Path) -> Path:
    Path(path).write_text(json.dumps(CONFIG), encoding="utf-8")
    return Path(path)


def is_tiny(sd: dict) -> bool:
    """Whether a CLIP vision state dict is this model's (width 32, two layers)."""
    first = sd.get(_LAYER_KEY.format(0))
    return (first is not None and first.shape[0] == CONFIG["hidden_size"]
            and _LAYER_KEY.format(CONFIG["num_hidden_layers"]) not in sd)


def random_state_dict(model, seed: int = 0) -> dict:
    """float32 weights for ``model`` (a ``ClipVisionModel``'s ``.model``): norm gains one, the rest
    normal with std 0.1, drawn in the model's key order from one seeded stream."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: (torch.ones(v.shape) if "norm" in k and k.endswith("weight") else
                0.1 * torch.randn(v.shape, generator=g)).float().contiguous()
            for k, v in model.state_dict().items()}


def random_model(config_path: Path, seed: int = 0):
    """A ``ClipVisionModel`` with random weights loaded under inference mode (as Load CLIP Vision
    does); ComfyUI must be importable."""
    import torch
    import comfy.clip_vision

    with torch.inference_mode():
        cv = comfy.clip_vision.ClipVisionModel(str(config_path))
        cv.load_sd(random_state_dict(cv.model, seed))
    return cv


def hf_folder(folder: Path, seed: int = 0) -> Path:
    """The same shape as a transformers folder (``config.json`` + weights): what the CLI and the
    WebUI tab take as SeedSelect's image encoder.  Torch's global generator is left as it was."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # safetensors whatever the transformers version's default: AUTOMATIC1111 replaces torch.load
        # by its safe unpickler, which refuses a .bin written by a newer torch
        CLIPVisionModelWithProjection(cfg).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
