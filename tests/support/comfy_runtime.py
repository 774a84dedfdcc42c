"""ComfyUI's code inside the test process (``pytest -m comfyui``).

ComfyUI is not a pip package: the tests find its source through ``COMFYUI_PATH`` and skip without
it (CI has none).  :func:`setup_comfy` does what ComfyUI's ``main.py`` would have done before our
nodes run - import path, CPU device on machines without CUDA, and ``--base-directory``: every
folder ComfyUI reads or writes (models, input, output, temp, user) is moved under a temporary
directory, so a test run never writes into the checkout.  The tiny checkpoints are added as an
extra, read-only checkpoints folder (see :mod:`support.tiny_checkpoints`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SKIP_REASON = ("COMFYUI_PATH not set: these tests run inside a ComfyUI checkout "
               "(e.g. COMFYUI_PATH=~/.cache/likeness/ComfyUI)")


def comfy_path() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH``, or None when unset."""
    p = os.environ.get("COMFYUI_PATH")
    if not p:
        return None
    path = Path(p).expanduser().resolve()
    if not (path / "comfy" / "model_management.py").is_file():
        raise RuntimeError(f"COMFYUI_PATH={p} is not a ComfyUI checkout (no comfy/model_management.py)")
    return path


def import_comfy(root: Path):
    """Make ``import comfy`` work in-process; idempotent.  Returns ``comfy.model_management``.

    The device is chosen when that module is first imported, so ``args.cpu`` must be set before,
    on machines without CUDA (ComfyUI does not parse argv when imported).  The working directory
    becomes the checkout, as when ComfyUI is started from it; nothing is written relative to it.
    """
    import torch

    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    os.chdir(root)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management

    return comfy.model_management


def use_base_directory(base: Path) -> None:
    """What ``--base-directory base`` does, applied after ``folder_paths`` was imported: every
    default folder below the checkout (or a previous base) moves below ``base``.  Folders added by
    tests or custom nodes elsewhere are kept."""
    import comfy.cli_args
    import folder_paths

    base = Path(base).resolve()
    old = Path(folder_paths.base_path)
    comfy.cli_args.args.base_directory = str(base)
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        moved = [_rebase(p, old, base) for p in paths]
        folder_paths.folder_names_and_paths[name] = (moved, exts)
    folder_paths.base_path, folder_paths.models_dir = str(base), str(base / "models")
    for kind in ("output", "temp", "input", "user"):
        (base / kind).mkdir(parents=True, exist_ok=True)
        setattr(folder_paths, f"{kind}_directory", str(base / kind))
    folder_paths.filename_list_cache.clear()


def _rebase(path: str, old: Path, new: Path) -> str:
    try:
        return str(new / Path(path).relative_to(old))
    except ValueError:  # not below the old base: a folder someone added on purpose
        return path


def setup_comfy(root: Path, base: Path):
    """ComfyUI imported from ``root`` with ``base`` as its base directory and the tiny checkpoints'
    cache as an extra checkpoints folder; the ``comfy_root`` fixture (conftest.py) calls it once
    per session.  Returns ``comfy.model_management``."""
    from . import tiny_checkpoints

    mm = import_comfy(root)
    import folder_paths

    use_base_directory(base)
    folder_paths.add_model_folder_path("checkpoints", str(tiny_checkpoints.cache_dir()))
    return mm


def checkout_listing(root: Path) -> dict[str, list[str]]:
    """What lies in the checkout's writable folders (names below ``models``, ``input``, ``output``,
    ``user``, ``temp``), to show a run left them as they were."""
    out = {}
    for sub in ("models", "input", "output", "user", "temp"):
        top = root / sub
        out[sub] = sorted(str(p.relative_to(top)) for p in top.rglob("*")) if top.is_dir() else []
    return out


def load_checkpoint(name: str):
    """``(MODEL, CLIP, VAE)`` through ComfyUI's own CheckpointLoaderSimple node, under
    ``torch.inference_mode()`` as ComfyUI's executor runs every node."""
    import torch
    import nodes  # ComfyUI's nodes.py

    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(name)


def v_prediction(model):
    """A clone of ``model`` that samples as v-prediction, as ComfyUI's ModelSamplingDiscrete node
    ("v_prediction") makes it: an object patch of ``model_sampling``."""
    import torch
    import comfy.model_sampling

    class ModelSamplingV(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    with torch.inference_mode():
        m = model.clone()
        ms = ModelSamplingV(model.model.model_config)
        m.add_object_patch("model_sampling", ms)
    return m


def load_tiny(arch: str):
    """``(MODEL, CLIP, VAE)`` of the tiny ``arch`` checkpoint ("sd15", "sd2", "sdxl"), built on
    first use, through ComfyUI's own loader."""
    from . import tiny_checkpoints

    return load_checkpoint(tiny_checkpoints.ensure_tiny_checkpoint(arch).name)
