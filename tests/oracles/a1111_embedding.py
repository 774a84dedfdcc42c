"""AUTOMATIC1111's embedding loading, ``modules/textual_inversion/textual_inversion.py@22ecb78b``
(``EmbeddingDatabase.load_from_file`` / ``load_from_dir``; image embeddings left out),
re-implemented from its source."""
from __future__ import annotations

import os
import re
import zipfile

import safetensors.torch
import torch

# A1111's EmbeddingDatabase.expected_shape: width of encode_embedding_init_text(",", 1);
# SDXL concatenates both encoders (1280 + 768).
A1111_EXPECTED_SHAPE = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
# modules/safe.py's allowed_zip_names_re (v1.10.1)
A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")


def a1111_load_from_file(path, filename):
    name, ext = os.path.splitext(filename)
    ext = ext.upper()
    if ext in (".BIN", ".PT"):
        # A1111 calls torch.load through modules/safe.py's restricted unpickler (tensors, dicts,
        # OrderedDict and a few torch classes); weights_only=True is today's equivalent.  Before
        # unpickling, safe.py refuses a zip holding any entry its allow-list does not name.
        with zipfile.ZipFile(path) as z:
            for entry in z.namelist():
                if not A1111_ZIP_NAMES.match(entry):
                    raise Exception(f"bad file inside {path}: {entry}")
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif ext == ".SAFETENSORS":
        data = safetensors.torch.load_file(path, device="cpu")
    else:
        return None
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().float()
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:  # SDXL
        vec = {k: v.detach().float() for k, v in data.items()}
        shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
        vectors = data["clip_g"].shape[0]
    elif type(data) is dict and type(next(iter(data.values()))) is torch.Tensor:  # diffusers
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        vec = (emb.unsqueeze(0) if emb.ndim == 1 else emb).detach().float()
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {filename} as textual inversion embedding")
    return {"name": name, "vec": vec, "shape": shape, "vectors": vectors,
            "step": data.get("step"), "sd_checkpoint": data.get("sd_checkpoint"),
            "sd_checkpoint_name": data.get("sd_checkpoint_name")}


def a1111_load_dir(folder, expected_shape):
    """(registered, skipped) by trigger word; a later file with the same stem replaces the
    earlier one (register_embedding_by_name)."""
    registered, skipped = {}, {}
    for root, _, files in os.walk(folder, followlinks=True):
        for fn in files:
            full = os.path.join(root, fn)
            if os.stat(full).st_size == 0:
                continue
            emb = a1111_load_from_file(full, fn)
            if emb is None:
                continue
            target = registered if emb["shape"] == expected_shape else skipped
            target[emb["name"]] = emb
    return registered, skipped
