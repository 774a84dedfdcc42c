"""What the files we write say about themselves: kohya's ``ss_*`` keys (LoRAs), SAI's
``modelspec.*`` keys (every file), ``likeness.*`` keys, and the ``sshs_model_hash`` by which
AUTOMATIC1111 shows and looks up LoRAs.  All values are strings, as safetensors requires.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Mapping

import safetensors.torch
import torch

from ..families import family as family_of
from ..seam import ModelInfo

#: Metadata keys the caller may give without the ``ss_`` prefix.
SS_KEYS = frozenset({
    "output_name", "training_started_at", "training_finished_at", "steps", "epoch",
    "max_train_steps", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler",
    "lr_warmup_steps", "optimizer", "resolution", "num_train_images", "num_reg_images",
    "num_batches_per_epoch", "num_epochs", "batch_size_per_device", "tag_frequency", "datasets",
    "dataset_dirs", "seed", "mixed_precision", "full_fp16", "gradient_checkpointing",
    "gradient_accumulation_steps", "max_grad_norm", "prior_loss_weight", "min_snr_gamma",
    "noise_offset", "clip_skip", "cache_latents", "caption_dropout_rate", "network_dropout",
    "training_comment", "sd_model_name", "sd_model_hash", "new_sd_model_hash", "vae_name",
    "vae_hash", "session_id", "loss_type", "zero_terminal_snr", "max_token_length",
})

#: Keys a LoRA's metadata computes from its layers; a caller's value for them is ignored.
_RESERVED = frozenset({
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
    "sshs_model_hash", "sshs_legacy_hash", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "format",
})

#: SAI's name for an implementation in the original (SGM) layout.
SGM = "https://github.com/Stability-AI/generative-models"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def modelspec(family: str, prediction: str, kind: str, title: str, *, implementation: str = SGM,
              resolution: tuple[int, int] | None = None) -> dict[str, str]:
    """SAI model-spec keys (kohya sd-scripts ``library/sai_model_spec.py``), so kohya-style tools
    and model managers recognise the file; ``kind`` is ``lora`` or ``textual-inversion``."""
    v = prediction == "v"
    if family == "sdxl":
        arch, reso = "stable-diffusion-xl-v1-base", (1024, 1024)
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        reso = (768, 768) if v else (512, 512)
    else:
        arch, reso = "stable-diffusion-v1", (512, 512)
    reso = resolution or reso
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/{kind}",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.date": _now(),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }


def embedding_metadata(name: str, info: ModelInfo, n: int, step: int,
                       extra: Mapping[str, object] | None) -> dict[str, str]:
    """An embedding's metadata.  The caller's keys get a ``likeness.`` prefix and cannot override
    the fields written here."""
    meta = {k if k.startswith("likeness.") else f"likeness.{k}": str(v)
            for k, v in (extra or {}).items()}
    spec = modelspec(info.family, info.prediction, "textual-inversion", name)
    meta.update(spec)
    meta.update({
        "format": "pt",  # diffusers/transformers check this to pick the torch backend
        "likeness.name": name,
        "likeness.base_model": str(info.name),
        "likeness.family": info.family,
        "likeness.prediction": info.prediction,
        "likeness.vectors": str(n),
        "likeness.step": str(int(step)),
        "likeness.date": spec["modelspec.date"],
    })
    if info.hash:
        meta["likeness.base_model_hash"] = str(info.hash)
    return meta


def _meta_str(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _resolution(value) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def _caller_keys(extra: Mapping[str, object] | None):
    """The caller's keys sorted into (ss_/likeness. keys, modelspec keys, training resolution)."""
    meta: dict[str, str] = {}
    spec: dict[str, str] = {}
    res = None
    for k, v in (extra or {}).items():
        if v is None or k in _RESERVED:
            continue
        if k in ("resolution", "ss_resolution"):
            res = _resolution(v) or res
            if res is not None:
                v = str(res)  # kohya writes the tuple: "(512, 512)"
        if k.startswith("modelspec."):
            spec[k] = _meta_str(v)
        elif k.startswith(("ss_", "likeness.")):
            meta[k] = _meta_str(v)
        elif k in SS_KEYS:
            meta[f"ss_{k}"] = _meta_str(v)
        else:
            meta[f"likeness.{k}"] = _meta_str(v)
    return meta, spec, res


def lora_metadata(layers: Mapping[str, object], name: str, family: str, *, prediction: str = "eps",
                  implementation: str = SGM,
                  extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` + SAI ``modelspec.*`` + ``likeness.*`` metadata of a LoRA whose ``layers``
    are ``(down, up, alpha)`` triples.

    ``extra``: ``ss_*`` and ``modelspec.*`` keys are kept, the short forms in :data:`SS_KEYS`
    (``steps``, ``learning_rate``, ``tag_frequency``, ...) get the ``ss_`` prefix, anything else
    becomes ``likeness.<key>``; dicts and lists are written as JSON, ``None`` is dropped.  The
    keys in ``_RESERVED`` are computed here from the layers and cannot be overridden.
    ``implementation``: what names the file's UNet keys follow ("diffusers" or :data:`SGM`).
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction is 'eps' or 'v', not {prediction!r}.")
    ranks = {int(l[0].shape[0]) for l in layers.values()}
    alphas = {float(l[2]) for l in layers.values()}
    caller, caller_spec, res = _caller_keys(extra)
    meta = {"ss_output_name": name, "ss_training_started_at": str(time.time()), "ss_network_args": "{}",
            **caller}
    v2 = family == "sd2"
    version = family_of(family).base_model_version + ("_v" if v2 and prediction == "v" else "")
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": version,
        "ss_v2": str(v2),
    })
    spec = modelspec(family, prediction, "lora", name, implementation=implementation, resolution=res)
    reserved = {k: spec.pop(k) for k in ("modelspec.sai_model_spec", "modelspec.architecture",
                                         "modelspec.implementation")}
    meta.update({**spec, **caller_spec, **reserved})
    meta.update({"format": "pt", "likeness.family": family, "likeness.layers": str(len(layers))})
    return meta


def trained_steps(meta: Mapping[str, str]) -> int:
    """How many steps a file says it was trained for (kohya's ``ss_steps``, our ``likeness.step``,
    A1111's ``step``); 0 when it does not say: a run continuing the file counts on from it."""
    for key in ("ss_steps", "likeness.step", "step"):
        try:
            return max(0, int(float(meta.get(key, ""))))
        except (TypeError, ValueError, OverflowError):
            continue
    return 0


def addnet_hash(data: bytes) -> str:
    """sha256 of a safetensors file's bytes after its header: kohya's ``sshs_model_hash`` and
    A1111's ``hashes.addnet_hash_safetensors`` (what A1111 shows and matches LoRAs by)."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()


_HASH_PLACEHOLDER = "0" * 64


def with_model_hash(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with ``meta`` + ``sshs_model_hash`` in the header.

    The data section does not depend on the header, so the file is serialised once with a
    placeholder of the hash's length, which is then replaced in place (the header's length and
    the data offsets do not change)."""
    meta = {**meta, "sshs_model_hash": _HASH_PLACEHOLDER}
    data = bytearray(safetensors.torch.save(dict(tensors), metadata=meta))
    n = int.from_bytes(data[:8], "little")
    field = f'"sshs_model_hash":"{_HASH_PLACEHOLDER}"'.encode()
    at = data.find(field, 8, 8 + n)
    if at < 0 or data.find(field, at + 1, 8 + n) >= 0:  # not the compact JSON we expect
        meta["sshs_model_hash"] = addnet_hash(bytes(data))
        return safetensors.torch.save(dict(tensors), metadata=meta)
    digest = addnet_hash(bytes(data)).encode()
    start = at + len(field) - 65
    data[start:start + 64] = digest
    return bytes(data)


__all__ = ["SS_KEYS", "SGM", "modelspec", "embedding_metadata", "lora_metadata", "trained_steps", "addnet_hash",
           "with_model_hash"]
