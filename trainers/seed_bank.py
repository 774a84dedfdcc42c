"""The seed bank: optimised noises saved with what reproduces them.

A SeedSelect result is only meaningful with the settings it was optimised for, so every file
carries them: ``<name>.seed.safetensors`` holds ``noise`` ``[n, C, h, w]`` (fp32, unit variance:
ComfyUI's NOISE convention) and ``sigmas``, and string metadata ``likeness.*`` (prompt, negative
prompt, model name and hash, family, sampler, scheduler, steps, cfg, width, height, losses).
Writes are atomic (temp file + rename), names are validated and cannot escape the folder, and an
existing seed is never replaced unless asked.  Loading reads tensors only (safetensors).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .formats import files

SUFFIX = ".seed.safetensors"
FORMAT = "likeness.seed/1"


@dataclass
class SeedEntry:
    noise: torch.Tensor  # [n, C, h, w] fp32
    sigmas: torch.Tensor  # the schedule it was optimised over
    sampler: str
    cfg: float
    prompt: str = ""
    negative: str = ""
    model_name: str = "unknown"
    model_hash: str | None = None
    family: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    losses: list[float] = field(default_factory=list)

    def metadata(self) -> dict[str, str]:
        fields = {"prompt": self.prompt, "negative": self.negative, "model_name": self.model_name,
                  "model_hash": self.model_hash, "family": self.family, "sampler": self.sampler,
                  "scheduler": self.scheduler, "steps": self.steps, "cfg": self.cfg, "width": self.width,
                  "height": self.height, "losses": [round(float(v), 6) for v in self.losses]}
        meta = {f"likeness.{k}": json.dumps(v) for k, v in fields.items()}
        meta["format"] = "pt"
        meta["likeness.format"] = FORMAT
        return meta


def seed_path(folder: str | os.PathLike, name: str) -> Path:
    return files.safe_path(folder, files.validate_name(name) + SUFFIX)


def list_seeds(folder: str | os.PathLike) -> list[str]:
    p = Path(folder)
    return sorted(f.name[: -len(SUFFIX)] for f in p.glob("*" + SUFFIX)) if p.is_dir() else []


def save_seed(folder: str | os.PathLike, name: str, entry: SeedEntry, *, overwrite: bool = False) -> Path:
    """Write ``entry`` as ``folder/<name>.seed.safetensors``; FileExistsError if it exists and
    ``overwrite`` is off."""
    from safetensors.torch import save

    noise = entry.noise.detach().float().cpu().contiguous()
    if noise.ndim != 4:
        raise ValueError(f"a seed's noise must be [n, C, h, w], got {tuple(noise.shape)}")
    path = seed_path(folder, name)
    if path.exists() and not overwrite:
        raise FileExistsError(f"a seed named {name!r} already exists ({path}); pick another name or allow "
                              "overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({"noise": noise, "sigmas": entry.sigmas.detach().float().cpu().contiguous()},
                metadata=entry.metadata())
    return files.atomic_write_bytes(path, data)


def load_seed(path_or_folder: str | os.PathLike, name: str | None = None) -> SeedEntry:
    """Read a seed file (or ``folder/<name>.seed.safetensors``)."""
    import safetensors
    from safetensors.torch import load_file

    path = seed_path(path_or_folder, name) if name is not None else Path(path_or_folder)
    if not path.is_file():
        raise FileNotFoundError(f"no seed file {path}")
    try:
        tensors = load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path.name} is not a readable seed file ({e})") from e
    if meta.get("likeness.format") != FORMAT or "noise" not in tensors:
        raise ValueError(f"{path.name} is not a Likeness seed file (no {FORMAT} metadata / noise tensor)")
    m = {k[len("likeness."):]: json.loads(v) for k, v in meta.items() if k.startswith("likeness.") and k != "likeness.format"}
    return SeedEntry(noise=tensors["noise"], sigmas=tensors.get("sigmas", torch.zeros(0)), sampler=m.get("sampler"),
                     cfg=m.get("cfg"), prompt=m.get("prompt") or "", negative=m.get("negative") or "",
                     model_name=m.get("model_name") or "unknown", model_hash=m.get("model_hash"),
                     family=m.get("family"), scheduler=m.get("scheduler"), steps=m.get("steps"),
                     width=m.get("width"), height=m.get("height"), losses=m.get("losses") or [])


__all__ = ["SeedEntry", "save_seed", "load_seed", "list_seeds", "seed_path", "SUFFIX"]
