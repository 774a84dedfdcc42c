"""Textual-inversion embedding files, in the layouts every UI we target loads.

* SD1 / SD2: ``<name>.safetensors`` = ``{"emb_params": [n, dim]}`` (kohya's layout; ComfyUI,
  A1111 and diffusers all take a one-tensor file) and ``<name>.pt`` in AUTOMATIC1111's own layout
  (``string_to_param``, ``name``, ``step``, ...), which A1111 users and diffusers'
  ``load_textual_inversion`` expect and which carries the step/checkpoint fields.
* SDXL: one ``<name>.safetensors`` = ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``; ComfyUI
  picks the key per encoder, A1111 recognises the pair.

``docs/FORMATS.md`` lists which loader reads what.  Files follow the package's safety rules
(``files``); loading never unpickles arbitrary objects (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch

from ..families import FAMILIES, WIDTH_TO_KEY, family as family_of
from ..seam import ModelInfo
from .files import atomic_write_files, check_paths_writable, read_safetensors, safe_path, validate_name
from .metadata import embedding_metadata

#: CLIP token id of "*"; A1111 writes it as a constant and never reads it back.
A1111_STAR_TOKEN = 265


def _widths(family: str) -> dict[str, int]:
    """{encoder key: width} of ``family``'s encoders, in file order."""
    return {e.key: e.width for e in family_of(family).encoders}


def embedding_paths(folder: str | os.PathLike, name: str, family: str) -> list[Path]:
    """The files an embedding of ``family`` is written to: SD1/SD2 ``.safetensors`` + ``.pt``
    (A1111 users expect the ``.pt``), SDXL ``.safetensors`` only (A1111 has no SDXL ``.pt``)."""
    name = validate_name(name)
    exts = [".safetensors"] if len(_widths(family)) > 1 else [".safetensors", ".pt"]
    return [safe_path(folder, name + ext) for ext in exts]


def check_can_write(folder: str | os.PathLike, name: str, family: str,
                    overwrite: bool = False) -> list[Path]:
    """Fail early, before any training, if the embedding's files could not be written
    (``files.check_paths_writable``); returns the target paths."""
    return check_paths_writable(folder, embedding_paths(folder, name, family), overwrite)


def check_vectors(vectors: Mapping[str, torch.Tensor], family: str,
                   widths: Mapping[str, int] | None = None) -> int:
    """Keys and shapes must be exactly the family's encoders, ``[n, width]`` with one ``n``.
    ``widths`` overrides the standard widths (the tiny test models are narrower than real ones)."""
    encoders = _widths(family)
    if widths is not None:
        encoders = {key: int(widths.get(key, width)) for key, width in encoders.items()}
    expected = set(encoders)
    if set(vectors) != expected:
        raise ValueError(f"A {family} embedding needs vectors for {sorted(expected)}, "
                         f"got {sorted(vectors)}.")
    counts = set()
    for key, width in encoders.items():
        t = vectors[key]
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != width or t.shape[0] < 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"Vectors for {key} must have shape [n, {width}], got {shape}.")
        if not torch.isfinite(t).all():
            raise ValueError(f"Vectors for {key} contain NaN or infinity; not saving them.")
        counts.add(t.shape[0])
    if len(counts) != 1:
        raise ValueError(f"Every encoder needs the same number of vectors, got {sorted(counts)}.")
    return counts.pop()


def cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous fp32 CPU tensor: safetensors refuses non-contiguous or shared storage,
    # and a clone is a normal tensor even when the input was made under inference_mode.
    with torch.inference_mode(False):
        return t.detach().to("cpu", torch.float32).contiguous().clone()


def _a1111_pt_bytes(name: str, vec: torch.Tensor, step: int, info: ModelInfo) -> bytes:
    """A1111's ``Embedding.save`` layout; plain dict/str/int/tensor only, so
    ``torch.load(weights_only=True)`` reads it."""
    buf = io.BytesIO()
    torch.save({
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": vec},
        "name": name,
        "step": int(step),
        "sd_checkpoint": info.hash,
        "sd_checkpoint_name": info.name,
    }, buf)
    return _a1111_safe_zip(buf.getvalue())


#: the entries of a torch zip that A1111's safe unpickler (``modules/safe.py``) accepts; newer torch
#: also writes ``.format_version`` and ``.storage_alignment``, and A1111 then refuses the whole file
_A1111_ZIP_NAMES = re.compile(r"^[^/]+/(data\.pkl|data/\d+|version|byteorder|\.data/serialization_id)$")


def _a1111_safe_zip(data: bytes) -> bytes:
    """``data`` (a ``torch.save`` zip) with only the entries A1111 accepts; torch reads it the same."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for entry in src.infolist():
            if _A1111_ZIP_NAMES.match(entry.filename):
                dst.writestr(entry, src.read(entry.filename))
    return out.getvalue()


def save_embedding(folder: str | os.PathLike, name: str, vectors: Mapping[str, torch.Tensor],
                   info: ModelInfo, *, step: int, metadata: Mapping[str, object] | None = None,
                   overwrite: bool = False, widths: Mapping[str, int] | None = None) -> list[Path]:
    """Write an embedding in the family's formats (module docstring); return the paths written.
    ``widths`` ({encoder key: width}, from the host) replaces the family's standard widths.

    ``vectors`` is keyed by encoder (``seam.TextEncoderInfo.key``): SD1 ``{"clip_l": [n,768]}``,
    SD2 ``{"clip_h": [n,1024]}``, SDXL ``{"clip_l": [n,768], "clip_g": [n,1280]}``.  All files
    are written atomically and together; an existing file is replaced only with ``overwrite``.
    """
    name = validate_name(name)
    n = check_vectors(vectors, info.family, widths)
    paths = check_can_write(folder, name, info.family, overwrite)  # again: files may have appeared
    tensors = {key: cpu_fp32(vectors[key]) for key in _widths(info.family)}
    meta = embedding_metadata(name, info, n, step, metadata)
    if len(tensors) > 1:  # SDXL: one file keyed by encoder
        files = {paths[0]: safetensors.torch.save(tensors, metadata=meta)}
    else:
        (vec,) = tensors.values()
        files = {paths[0]: safetensors.torch.save({"emb_params": vec}, metadata=meta),
                 paths[1]: _a1111_pt_bytes(name, vec, step, info)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    return atomic_write_files(files)


# --------------------------------------------------------------------------------------------
# Loading embeddings
# --------------------------------------------------------------------------------------------

def _as_2d(key: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2):
        raise ValueError(f"'{key}' is not a [n, width] tensor, so this is not an embedding file.")
    return cpu_fp32(t.unsqueeze(0) if t.ndim == 1 else t)  # diffusers may store one vector as 1-D


def _vectors_from_dict(data: Mapping[str, object], source: str,
                       widths: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Encoder-keyed vectors from a tensor dict: ``{clip_l, clip_g}`` (SDXL), or one tensor under
    any name (kohya ``emb_params``, diffusers ``{token: T}``, ``{"clip_l": T}``).  ``widths``
    ({encoder key: width} of a model, e.g. a narrow test model) replaces the standard widths."""
    pair = family_of("sdxl")
    width_to_key = {w: k for k, w in widths.items()} if widths else WIDTH_TO_KEY
    if set(data) == set(pair.encoder_keys):
        vectors = {e.key: _as_2d(e.key, data[e.key]) for e in pair.encoders}
        shapes = {k: tuple(v.shape) for k, v in vectors.items()}
        n = shapes[pair.encoders[0].key][0]
        if shapes != {e.key: (n, (widths or {}).get(e.key, e.width)) for e in pair.encoders}:
            need = " and ".join(f"{e.key} [n, {e.width}]" for e in pair.encoders)
            raise ValueError(f"{source}: an {pair.title} embedding needs {need}, got {shapes}.")
        return vectors
    if len(data) == 1:
        (key, t), = data.items()
        t = _as_2d(key, t)
        width_key = width_to_key.get(t.shape[1])
        if width_key is None or (key in WIDTH_TO_KEY.values() and key != width_key):
            known = ", ".join(f"{f.title} ({'+'.join(str(e.width) for e in f.encoders)})"
                              for f in FAMILIES.values())
            raise ValueError(f"{source}: a vector width of {t.shape[1]} under '{key}' matches no "
                             f"text encoder of {known}.")
        return {width_key: t}
    raise ValueError(f"{source}: unknown embedding layout with keys {sorted(data)[:8]}; expected "
                     "one tensor, {clip_l, clip_g}, or an A1111 .pt.")


def _load_pt(path: Path, widths: Mapping[str, int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A1111 ``.pt`` or diffusers ``.bin``.  ``weights_only=True`` refuses arbitrary objects
    (pickles can run code), which also rules out rinongal's ParameterDict files."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path.name} holds more than plain tensors; refusing to unpickle it "
                         "(convert it to .safetensors).") from e
    except Exception as e:  # truncated, or not a torch file at all
        raise ValueError(f"{path.name} is not a readable torch file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a dict, found {type(data).__name__}.")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{path.name}: 'string_to_param' must hold exactly one tensor.")
        (t,) = params.values()
        vectors = _vectors_from_dict({"*": t}, path.name, widths)
        meta = {k: str(data[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
                if data.get(k) is not None}
        return vectors, meta
    return _vectors_from_dict(data, path.name, widths), {}


def load_embedding(path: str | os.PathLike, family: str | None = None,
                   widths: Mapping[str, int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an embedding (ours or a common third-party layout) as encoder-keyed fp32 CPU vectors
    plus its metadata (safetensors header, or the A1111 ``.pt`` fields as strings).

    A lone tensor is assigned by width (768 clip_l, 1024 clip_h, 1280 clip_g).  With ``family``
    the result must match that family's encoders exactly, else ``ValueError``.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".safetensors":
        data, meta = read_safetensors(path, max_tensors=8, what="an embedding")
        vectors = _vectors_from_dict(data, path.name, widths)
    elif ext in (".pt", ".bin"):
        vectors, meta = _load_pt(path, widths)
    else:
        raise ValueError(f"{path.name}: embeddings are .safetensors, .pt or .bin files.")
    if family is not None:
        _check_loaded_family(vectors, family, path.name)
    return vectors, meta


def _check_loaded_family(vectors: Mapping[str, torch.Tensor], family: str, source: str) -> None:
    expected = set(_widths(family))
    if set(vectors) != expected:
        widths = {k: v.shape[1] for k, v in vectors.items()}
        raise ValueError(f"{source} is an embedding for {sorted(vectors)} (widths {widths}); "
                         f"a {family} model needs {sorted(expected)}.")


__all__ = ["A1111_STAR_TOKEN", "embedding_paths", "check_can_write", "check_vectors", "cpu_fp32",
           "save_embedding", "load_embedding"]
