"""Embedding files, and the file-safety rules every writer in the package follows.

Formats (see shared/reference/algorithms.md §4.1-4.5 for what each UI's loader accepts):

* SD1 / SD2: ``<name>.safetensors`` = ``{"emb_params": [n, dim]}`` (kohya's layout; ComfyUI,
  A1111 and diffusers all take a one-tensor file) and ``<name>.pt`` in AUTOMATIC1111's own layout
  (``string_to_param``, ``name``, ``step``, ...), which A1111 users and diffusers'
  ``load_textual_inversion`` expect and which carries the step/checkpoint fields.
* SDXL: one ``<name>.safetensors`` = ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``; ComfyUI
  picks the key per encoder, A1111 recognises the pair.

Safety rules (DESIGN.md, "Numbers and files"): a name cannot escape its folder, files are written
to a temp file and renamed (a crash or Cancel never leaves a half-written embedding), nothing is
overwritten unless asked, and loading never unpickles arbitrary objects
(``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import secrets
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

import safetensors
import safetensors.torch
import torch

from .seam import ModelInfo

#: Text encoders per model family, in file order: (key, width).  Mirrors ``seam.TextEncoderInfo``.
FAMILY_ENCODERS: dict[str, tuple[tuple[str, int], ...]] = {
    "sd1": (("clip_l", 768),),
    "sd2": (("clip_h", 1024),),
    "sdxl": (("clip_l", 768), ("clip_g", 1280)),
}

#: Which encoder a lone tensor belongs to, judged by its width (the file does not say).
WIDTH_TO_KEY = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

#: Extensions a user might type into a name; the writer adds its own.
KNOWN_EXTENSIONS = (".pt", ".safetensors", ".bin", ".ckpt")

MAX_NAME_LENGTH = 80

#: CLIP token id of "*"; A1111 writes it as a constant and never reads it back.
A1111_STAR_TOKEN = 265

# Windows refuses these as file names whatever the extension; a name that works on one OS
# should work on the others, since embeddings are shared.
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


# --------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------

def validate_name(name: str) -> str:
    """Check an embedding/file name a user typed and return it stripped of outer whitespace.

    The name becomes both a file stem and the prompt trigger (A1111 uses the stem, ComfyUI's
    ``embedding:NAME`` syntax splits on whitespace and ``:``), so it must be one plain word.
    Raises ``ValueError`` saying what to change.
    """
    if not isinstance(name, str):
        raise ValueError(f"The name must be text, got {type(name).__name__}.")
    name = name.strip()
    if not name:
        raise ValueError("The name is empty: type a short word such as 'my_cat'.")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"The name is {len(name)} characters long; use at most {MAX_NAME_LENGTH}.")
    lower = name.lower()
    for ext in KNOWN_EXTENSIONS:
        if lower.endswith(ext):
            raise ValueError(f"Drop the extension: use '{name[:-len(ext)]}' instead of '{name}'; "
                             "the file extensions are added automatically.")
    if "/" in name or "\\" in name:
        raise ValueError(f"The name '{name}' contains a path separator ('/' or '\\'); "
                         "use a plain name, files always go to the embeddings folder.")
    if ".." in name:
        raise ValueError(f"The name '{name}' contains '..'; remove it.")
    if name.startswith("."):
        raise ValueError(f"The name '{name}' starts with '.', which hides the file; "
                         "remove the dot.")
    if name.endswith("."):
        raise ValueError(f"The name '{name}' ends with '.'; remove the trailing dot.")
    if ":" in name:
        raise ValueError(f"The name '{name}' contains ':' (a drive letter or ComfyUI's "
                         "'embedding:' syntax); remove it.")
    for ch in name:
        _check_name_char(name, ch)
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise ValueError(f"'{name}' is a reserved file name on Windows; choose another name.")
    return name


def _check_name_char(name: str, ch: str) -> None:
    """Allow letters (any script), digits, '_', '-' and '.'; say which character is wrong."""
    if unicodedata.category(ch).startswith("C"):  # control, format, unassigned, private use
        raise ValueError(f"The name contains an invisible control character {ch!r}; retype it.")
    if ch.isspace():
        raise ValueError(f"The name '{name}' contains a space; use '_' or '-' instead "
                         "(a prompt would read it as two words).")
    if not (ch.isalnum() or ch in "_-."):
        raise ValueError(f"The name '{name}' contains {ch!r}; use only letters, digits, "
                         "'_', '-' and '.'.")


def safe_path(folder: str | os.PathLike, filename: str | os.PathLike) -> Path:
    """``folder/filename`` resolved, refusing anything that lands outside ``folder``.

    Both sides are resolved (symlinks followed), so ``..``, absolute names and a symlink inside
    the folder that points elsewhere are all caught.  Raises ``ValueError``.
    """
    root = Path(folder).resolve()
    target = (root / filename).resolve()
    if target == root or not target.is_relative_to(root):
        raise ValueError(f"'{filename}' would be written outside the folder {root}; "
                         "use a plain file name.")
    return target


def _check_family(family: str) -> tuple[tuple[str, int], ...]:
    try:
        return FAMILY_ENCODERS[family]
    except KeyError:
        raise ValueError(f"Unknown model family '{family}'; expected one of "
                         f"{', '.join(FAMILY_ENCODERS)}.") from None


def embedding_paths(folder: str | os.PathLike, name: str, family: str) -> list[Path]:
    """The files an embedding of ``family`` is written to: SD1/SD2 ``.safetensors`` + ``.pt``
    (A1111 users expect the ``.pt``), SDXL ``.safetensors`` only (A1111 has no SDXL ``.pt``)."""
    name = validate_name(name)
    exts = [".safetensors"] if len(_check_family(family)) > 1 else [".safetensors", ".pt"]
    return [safe_path(folder, name + ext) for ext in exts]


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_can_write(folder: str | os.PathLike, name: str, family: str,
                    overwrite: bool = False) -> list[Path]:
    """Fail early, before any training, if the embedding's files could not be written.

    A missing folder is fine if it can be created (``save_embedding`` creates it).  Writability is
    probed by creating and deleting a temp file: ``os.access`` says yes to root and ignores
    read-only mounts.  Returns the target paths.
    """
    return check_paths_writable(folder, embedding_paths(folder, name, family), overwrite)


def check_paths_writable(folder: str | os.PathLike, paths: list[Path], overwrite: bool) -> list[Path]:
    """Refuse targets that exist (unless ``overwrite``) or a folder we cannot write to; shared by
    every file kind we write (embeddings, LoRAs)."""
    for p in paths:
        if p.exists() and not p.is_file():
            raise FileExistsError(f"{p} exists and is not a file; choose another name.")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; choose another name or set overwrite.")
    base = _nearest_existing(Path(folder).absolute())
    if not base.is_dir():
        raise NotADirectoryError(f"Cannot write to {folder}: {base} is not a folder.")
    try:
        fd, probe = _open_temp(base / ".likeness-write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"Cannot write to {folder} ({e.strerror}); "
                              "choose a folder you can write to.") from e
    return paths


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------

def _open_temp(path: Path) -> tuple[int, Path]:
    """Create a new hidden temp file next to ``path``; mode 0o666 minus umask like a normal file
    (``mkstemp`` would make it 0o600, unreadable to a UI running as another user)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), tmp
        except FileExistsError:
            continue


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh temp file beside ``path`` and return it; on any failure (Cancel
    is a ``BaseException``) the temp file is removed before the error propagates."""
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_files(files: Mapping[Path, bytes]) -> list[Path]:
    """Write several files so that none is replaced until all are fully written.

    Each goes to a temp file in its own folder, then all are renamed with ``os.replace`` (atomic
    on one filesystem): a failure or Cancel while writing leaves the old files (or none) and no
    temp files, never a half-written target or half of a set.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            staged.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [path for _, path in staged]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file and a rename (see ``atomic_write_files``)."""
    return atomic_write_files({Path(path): data})[0]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that need a file name rather than bytes (large LoRAs, checkpoints)::

        with atomic_path(target) as tmp:
            safetensors.torch.save_file(sd, tmp)

    ``tmp`` becomes ``target`` when the block ends normally and is deleted if it raises.
    """
    path = Path(path)
    fd, tmp = _open_temp(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Saving embeddings
# --------------------------------------------------------------------------------------------

def _check_vectors(vectors: Mapping[str, torch.Tensor], family: str,
                   widths: Mapping[str, int] | None = None) -> int:
    """Keys and shapes must be exactly the family's encoders, ``[n, width]`` with one ``n``.
    ``widths`` overrides the standard widths (the tiny test models are narrower than real ones)."""
    encoders = _check_family(family)
    if widths is not None:
        encoders = tuple((key, int(widths.get(key, width))) for key, width in encoders)
    expected = {key for key, _ in encoders}
    if set(vectors) != expected:
        raise ValueError(f"A {family} embedding needs vectors for {sorted(expected)}, "
                         f"got {sorted(vectors)}.")
    counts = set()
    for key, width in encoders:
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


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous fp32 CPU tensor: safetensors refuses non-contiguous or shared storage,
    # and a clone is a normal tensor even when the input was made under inference_mode.
    with torch.inference_mode(False):
        return t.detach().to("cpu", torch.float32).contiguous().clone()


def _modelspec(info: ModelInfo, name: str, date: str) -> dict[str, str]:
    """SAI modelspec keys, so kohya-style tools and model managers recognise the file."""
    if info.family == "sdxl":
        arch, reso = "stable-diffusion-xl-v1-base", "1024x1024"
    elif info.family == "sd2":
        v = info.prediction == "v"
        arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        reso = "768x768" if v else "512x512"
    else:
        arch, reso = "stable-diffusion-v1", "512x512"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/textual-inversion",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "modelspec.resolution": reso,
        "modelspec.date": date,
        "modelspec.prediction_type": "v" if info.prediction == "v" else "epsilon",
    }


def _metadata(name: str, info: ModelInfo, n: int, step: int,
              extra: Mapping[str, object] | None) -> dict[str, str]:
    """safetensors metadata (all values str).  The caller's keys get a ``likeness.`` prefix and
    cannot override the fields written here."""
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {k if k.startswith("likeness.") else f"likeness.{k}": str(v)
            for k, v in (extra or {}).items()}
    meta.update(_modelspec(info, name, date))
    meta.update({
        "format": "pt",  # diffusers/transformers check this to pick the torch backend
        "likeness.name": name,
        "likeness.base_model": str(info.name),
        "likeness.family": info.family,
        "likeness.prediction": info.prediction,
        "likeness.vectors": str(n),
        "likeness.step": str(int(step)),
        "likeness.date": date,
    })
    if info.hash:
        meta["likeness.base_model_hash"] = str(info.hash)
    return meta


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
    return buf.getvalue()


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
    n = _check_vectors(vectors, info.family, widths)
    paths = check_can_write(folder, name, info.family, overwrite)  # again: files may have appeared
    tensors = {key: _cpu_fp32(vectors[key]) for key, _ in FAMILY_ENCODERS[info.family]}
    meta = _metadata(name, info, n, step, metadata)
    if info.family == "sdxl":
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
    return _cpu_fp32(t.unsqueeze(0) if t.ndim == 1 else t)  # diffusers may store one vector as 1-D


def _vectors_from_dict(data: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """Encoder-keyed vectors from a tensor dict: ``{clip_l, clip_g}`` (SDXL), or one tensor under
    any name (kohya ``emb_params``, diffusers ``{token: T}``, ``{"clip_l": T}``)."""
    if set(data) == {"clip_l", "clip_g"}:
        vectors = {k: _as_2d(k, data[k]) for k in ("clip_l", "clip_g")}
        shapes = {k: tuple(v.shape) for k, v in vectors.items()}
        n = shapes["clip_l"][0]
        if shapes != {"clip_l": (n, 768), "clip_g": (n, 1280)}:
            raise ValueError(f"{source}: an SDXL embedding needs clip_l [n, 768] and clip_g "
                             f"[n, 1280], got {shapes}.")
        return vectors
    if len(data) == 1:
        (key, t), = data.items()
        t = _as_2d(key, t)
        width_key = WIDTH_TO_KEY.get(t.shape[1])
        if width_key is None or (key in WIDTH_TO_KEY.values() and key != width_key):
            raise ValueError(f"{source}: a vector width of {t.shape[1]} under '{key}' matches no "
                             "SD1 (768), SD2 (1024) or SDXL (768+1280) text encoder.")
        return {width_key: t}
    raise ValueError(f"{source}: unknown embedding layout with keys {sorted(data)[:8]}; expected "
                     "one tensor, {clip_l, clip_g}, or an A1111 .pt.")


def _load_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
        vectors = _vectors_from_dict({"*": t}, path.name)
        meta = {k: str(data[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
                if data.get(k) is not None}
        return vectors, meta
    return _vectors_from_dict(data, path.name), {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if len(keys) > 8:  # a model, not an embedding: do not read gigabytes
                raise ValueError(f"{path.name} has {len(keys)} tensors; it is not an embedding.")
            return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path.name} is not a readable safetensors file: {e}") from e


def load_embedding(path: str | os.PathLike,
                   family: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an embedding (ours or a common third-party layout) as encoder-keyed fp32 CPU vectors
    plus its metadata (safetensors header, or the A1111 ``.pt`` fields as strings).

    A lone tensor is assigned by width (768 clip_l, 1024 clip_h, 1280 clip_g).  With ``family``
    the result must match that family's encoders exactly, else ``ValueError``.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".safetensors":
        data, meta = _read_safetensors(path)
        vectors = _vectors_from_dict(data, path.name)
    elif ext in (".pt", ".bin"):
        vectors, meta = _load_pt(path)
    else:
        raise ValueError(f"{path.name}: embeddings are .safetensors, .pt or .bin files.")
    if family is not None:
        _check_loaded_family(vectors, family, path.name)
    return vectors, meta


def _check_loaded_family(vectors: Mapping[str, torch.Tensor], family: str, source: str) -> None:
    expected = {key for key, _ in _check_family(family)}
    if set(vectors) != expected:
        widths = {k: v.shape[1] for k, v in vectors.items()}
        raise ValueError(f"{source} is an embedding for {sorted(vectors)} (widths {widths}); "
                         f"a {family} model needs {sorted(expected)}.")
