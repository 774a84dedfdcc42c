"""ComfyUI's own LoRA key maps and ``load_lora``, pulled out of a ComfyUI checkout's source (AST
extraction, no ``import comfy``: that needs its whole runtime), to check the re-implementation in
``comfy_lora`` against the real thing."""
from __future__ import annotations

import ast
import functools
import logging
import os
import typing
from pathlib import Path
from types import SimpleNamespace

import torch


def comfy_checkout(probe: str = "comfy/lora.py") -> Path | None:
    """The ComfyUI checkout to read (``COMFYUI_PATH`` or the test cache), if it has ``probe``."""
    for cand in (os.environ.get("COMFYUI_PATH"), Path.home() / ".cache/likeness/ComfyUI"):
        if cand and (Path(cand) / probe).is_file():
            return Path(cand)
    return None


def extract(path: Path, names: set[str], namespace: dict, cls: str | None = None) -> dict:
    """Run the top-level functions and assignments ``names`` of a source file (of class ``cls``
    if given) in ``namespace`` and return it; asserts they are all there."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    nodes = []
    for n in body:
        if isinstance(n, ast.FunctionDef) and n.name in names:
            n.decorator_list = []
            nodes.append(n)
        elif isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets):
            nodes.append(n)
    found = {getattr(n, "name", None) or n.targets[0].id for n in nodes}
    assert found == names, f"{path.name} changed shape: missing {names - found}"
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@functools.lru_cache(maxsize=None)
def real_comfy() -> SimpleNamespace:
    root = comfy_checkout()
    utils = extract(root / "comfy" / "utils.py",
                     {"UNET_MAP_ATTENTIONS", "TRANSFORMER_BLOCKS", "UNET_MAP_RESNET", "UNET_MAP_BASIC",
                      "unet_to_diffusers"}, {})

    class _Dummy:  # isinstance(model, comfy.model_base.<Other>) is False for our stub model
        pass

    comfy = SimpleNamespace(utils=SimpleNamespace(unet_to_diffusers=utils["unet_to_diffusers"]),
                            model_base=SimpleNamespace(**{n: type(n, (_Dummy,), {}) for n in (
                                "StableCascade_C", "SD3", "AuraFlow", "PixArt", "HunyuanDiT", "Flux",
                                "GenmoMochi", "HunyuanVideo", "HiDream", "ACEStep", "Omnigen2",
                                "QwenImage", "Lumina2", "Kandinsky5", "ACEStep15", "ErnieImage")}))

    class LoRAAdapter:
        def __init__(self, loaded_keys, weights):
            self.loaded_keys, self.weights = loaded_keys, weights

    adapter_ns = extract(root / "comfy" / "weight_adapter" / "lora.py", {"load"},
                          {"Optional": typing.Optional, "torch": torch}, cls="LoRAAdapter")
    LoRAAdapter.load = classmethod(adapter_ns["load"])
    lora = extract(root / "comfy" / "lora.py",
                    {"LORA_CLIP_MAP", "load_lora", "model_lora_keys_clip", "model_lora_keys_unet"},
                    {"comfy": comfy, "weight_adapter": SimpleNamespace(adapters=[LoRAAdapter]),
                     "logging": logging, "torch": torch})
    return SimpleNamespace(unet_to_diffusers=utils["unet_to_diffusers"], **{
        k: lora[k] for k in ("load_lora", "model_lora_keys_clip", "model_lora_keys_unet")})
