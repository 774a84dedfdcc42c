"""ComfyUI v0.20.1's embedding loading, ``comfy/sd1_clip.py:378-484`` (``load_embed`` and its
helpers), re-implemented from its source; ``real_load_embed`` pulls the real functions out of a
checkout to check this mirror."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import safetensors.torch
import torch

from .comfy_source import extract

# (embedding_key, embedding_size) each ComfyUI v0.20.1 tokenizer passes to load_embed:
# SD1 = sd1_clip.SDTokenizer defaults ('clip_l', 768); SD2 = text_encoders/sd2_clip.py:15
# ('clip_h', 1024); SDXL = SDXLTokenizer's clip_l (SDTokenizer defaults) and
# SDXLClipGTokenizer (sdxl_clip.py:21, 'clip_g', 1280).
COMFY_TOKENIZERS = {
    "sd1": [("clip_l", 768)],
    "sd2": [("clip_h", 1024)],
    "sdxl": [("clip_l", 768), ("clip_g", 1280)],
}


def comfy_zip_fallback(path):
    """safe_load_embed_zip: the last ``data/*`` blob of >= 768 floats, width 768 if divisible."""
    with zipfile.ZipFile(path) as z:
        for member in reversed([m for m in z.namelist() if "data/" in m]):
            raw = z.read(member)
            count = len(raw) // 4
            if count < 768:
                continue
            width = 768 if count % 768 == 0 else 1024
            return torch.frombuffer(bytearray(raw), dtype=torch.float).reshape(-1, width).clone()


def comfy_bundled(embed, prefix, suffix):
    parts = [v for k, v in embed.items() if k.startswith(prefix) and k.endswith(suffix)]
    return torch.cat(parts, dim=0) if parts else None


def comfy_load_embed(embedding_name, directories, embedding_size, embed_key=None):
    # Search each folder and its subfolders; the name must stay inside the folder.
    dirs = set(directories)
    for d in directories:
        dirs.update(root for root, _, _ in os.walk(d, followlinks=True))
    found = None
    for d in dirs:
        candidate = os.path.abspath(os.path.join(d, embedding_name))
        d = os.path.abspath(d)
        if os.path.commonpath((d, candidate)) != d:
            continue
        if os.path.isfile(candidate):
            found = candidate
        else:
            found = next((candidate + e for e in (".safetensors", ".pt", ".bin")
                          if os.path.isfile(candidate + e)), None)
        if found:
            break
    if found is None:
        return None
    out = None
    if found.lower().endswith(".safetensors"):
        embed = safetensors.torch.load_file(found, device="cpu")
    else:
        try:
            embed = torch.load(found, weights_only=True, map_location="cpu")
        except Exception:
            out = comfy_zip_fallback(found)
    if out is not None:
        return out
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values()))
    if isinstance(embed, list):
        return torch.cat([t.reshape(-1, t.shape[-1]) for x in embed for t in x.values()
                          if t.shape[-1] == embedding_size], dim=0)
    if embed_key is not None and embed_key in embed:
        return embed[embed_key]
    out = comfy_bundled(embed, "bundle_emb.", ".string_to_param.*")
    if out is None:
        out = comfy_bundled(embed, "bundle_emb.", f".{embed_key}")
    if out is None:
        out = next(iter(embed.values()))
    return out


def comfy_apply(emb, width):
    """SDClipModel.process_tokens (sd1_clip.py:~237): the embedding is viewed as [1, n, last dim]
    and spliced in only if its last dim equals the encoder's; otherwise it is ignored."""
    emb = emb.view(1, -1, emb.shape[-1]).float()
    return emb[0] if emb.shape[-1] == width else None


def real_load_embed(checkout: Path):
    """``load_embed`` and its helpers from the checkout's sd1_clip.py, without importing comfy
    (which needs a GPU stack); they only use os, zipfile, torch, safetensors and logging."""
    import logging
    import traceback

    namespace = {"os": os, "zipfile": zipfile, "torch": torch, "logging": logging, "traceback": traceback}
    wanted = {"safe_load_embed_zip", "expand_directory_list", "bundled_embed", "load_embed"}
    return extract(checkout / "comfy" / "sd1_clip.py", wanted, namespace)["load_embed"]
