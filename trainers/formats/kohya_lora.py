"""LoRA files in kohya's interchange format, which ComfyUI, AUTOMATIC1111/Forge and diffusers load.

One layer of a LoRA is ``(down, up, alpha)``; the weight change it stands for is
``ΔW = (alpha / r) · up @ down`` with ``r = down.shape[0]`` (Hu et al. 2021, "LoRA", eq. 3, with
kohya's ``alpha`` scaling).  A file holds, per layer, ``<key>.lora_down.weight``,
``<key>.lora_up.weight`` and a 0-dim fp32 ``<key>.alpha``, where ``<key>`` is kohya's name for the
module (``layer_names.layer_key``).  Linear: ``down [r, in]``, ``up [out, r]``; Conv2d:
``down [r, in, kh, kw]``, ``up [out, r, 1, 1]`` - 4-D, not flattened, as kohya writes them and as
the conv LoRA layers diffusers/PEFT build hold them (ComfyUI and A1111 accept either).

We write what kohya's sd-scripts write, so kohya's own tools (resize, merge, extract) also read
our files.  ``docs/FORMATS.md`` lists the keys and which loader reads what, including the opt-in
bundled embeddings (``bundle_emb``, for pivotal tuning).  A1111 applies LoRA to an OpenCLIP
attention (SD2's encoder, SDXL's second) only when q, k, v and out_proj of that layer are all
present, so a partial set is refused.  Files follow the package's safety rules (``files``);
loading reads safetensors only (no pickle).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import torch

from ..families import FAMILIES, WIDTH_TO_KEY, family as family_of
from ..seam import ParameterNaming
from .embedding import check_vectors, cpu_fp32
from .files import atomic_write_files, check_paths_writable, read_safetensors, safe_path, validate_name
from .layer_names import canonical_name, layer_key, name_of_key, normalize_layer_name, unet_key_scheme
from .metadata import SGM, lora_metadata, with_model_hash
from .unet_names import DEFAULT_LAYOUTS, UNetLayout

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}

#: Encoders in OpenCLIP's layout in the original checkpoints (fused ``in_proj`` attention).
_OPENCLIP = frozenset({"clip_h", "clip_g"})


class LoraLayer(NamedTuple):
    """One layer: ``down [r, in(, kh, kw)]``, ``up [out, r(, 1, 1)]``, ``alpha`` (scale alpha/r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"Unknown dtype '{dtype}'; use fp16, bf16 or fp32.")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"LoRA files are fp16, bf16 or fp32, not {dtype}.")
    return dtype


def _check_layer(name: str, value) -> LoraLayer:
    try:
        down, up, alpha = value
    except (TypeError, ValueError):
        raise ValueError(f"'{name}': a layer is (down, up, alpha).") from None
    if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise ValueError(f"'{name}': down and up must be tensors.")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(f"'{name}': down/up must be [r, in] and [out, r] (Linear) or "
                         f"[r, in, kh, kw] and [out, r, 1, 1] (Conv2d), got "
                         f"{tuple(down.shape)} and {tuple(up.shape)}.")
    r = down.shape[0]
    if r < 1 or up.shape[1] != r or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise ValueError(f"'{name}': rank mismatch or bad up shape: down {tuple(down.shape)}, "
                         f"up {tuple(up.shape)} (up must be [out, {r}] or [out, {r}, 1, 1]).")
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"'{name}': alpha must be one number.")
        alpha = alpha.item()
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"'{name}': alpha must be a number, got {alpha!r}.") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"'{name}': alpha must be a positive number, got {alpha}.")
    return LoraLayer(down, up, alpha)


def _to_file(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    with torch.inference_mode(False):
        out = t.detach().to("cpu", dtype).contiguous().clone()
    if not torch.isfinite(out).all():
        raise ValueError(f"{what} is not finite in {str(dtype).replace('torch.', '')} "
                         "(NaN, infinity, or too large for fp16); not saving it.")
    return out


def _check_openclip_attention(keys: Iterable[str], family: str) -> None:
    """A1111 patches an OpenCLIP ``nn.MultiheadAttention`` (SD2's encoder, SDXL's second) only
    when the layer's q, k, v and out_proj LoRAs are all present
    (``networks.network_apply_weights``); with a partial set it silently drops them."""
    keys = list(keys)
    for enc in family_of(family).encoders:
        if enc.key not in _OPENCLIP:
            continue
        te = re.escape(canonical_name(enc.key, "text_model.encoder.layers.", family))
        seen: dict[str, set[str]] = {}
        for k in keys:
            if m := re.match(rf"^{te}(\d+)\.self_attn\.([qkv]|out)_proj$", k):
                seen.setdefault(m.group(1), set()).add(m.group(2))
        bad = sorted((int(i) for i, s in seen.items() if s != {"q", "k", "v", "out"}))
        if bad:
            raise ValueError(f"{enc.component} layer(s) {bad}: AUTOMATIC1111 applies a LoRA to this "
                             "encoder's attention only with q_proj, k_proj, v_proj and out_proj "
                             "together; train all four or none.")


def lora_state_dict(layers: Mapping[str, object], *, family: str, dtype=torch.float16,
                    layout: UNetLayout | None = None,
                    naming: ParameterNaming | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors for ``layers`` (name → ``(down, up, alpha)``; names as the host's
    ``naming`` spells them, default the diffusers host's).  Factors are cast to ``dtype``;
    ``alpha`` is stored as an fp32 scalar (loaders read it with ``.item()``; fp16 would round
    alphas such as 0.3)."""
    family_of(family)
    dtype = _as_dtype(dtype)
    if not layers:
        raise ValueError("No LoRA layers to save.")
    out: dict[str, torch.Tensor] = {}
    canon: dict[str, str] = {}
    for name, value in layers.items():
        c = normalize_layer_name(name, family, layout, naming)
        if c in canon:
            raise ValueError(f"'{name}' and '{canon[c]}' are the same module.")
        canon[c] = name
        layer = _check_layer(name, value)
        key = layer_key(c, family, layout)
        out[f"{key}.lora_down.weight"] = _to_file(layer.down, dtype, f"'{name}' down")
        out[f"{key}.lora_up.weight"] = _to_file(layer.up, dtype, f"'{name}' up")
        out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    _check_openclip_attention(canon, family)
    return out


def weight_delta(down: torch.Tensor, up: torch.Tensor, alpha: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ΔW = (alpha / r) · up @ down``, shaped like the module's weight: ``[out, in]`` or
    ``[out, in, kh, kw]`` (the conv factors are flattened, multiplied and reshaped, as ComfyUI's
    ``LoRAAdapter.calculate_weight`` and A1111's ``rebuild_conventional`` do)."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.item()
    r = down.shape[0]
    delta = up.reshape(up.shape[0], -1).to(dtype) @ down.reshape(r, -1).to(dtype)
    return (delta * (float(alpha) / r)).reshape(up.shape[0], *down.shape[1:])


def lora_state_dict_to_weight_delta(layers: Mapping[str, object],
                                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """ΔW per layer, from either a layers dict (name → ``(down, up, alpha)``, as
    :func:`load_lora` returns) or a raw kohya state dict (``<key>.lora_down.weight`` …; keyed by
    ``<key>``; a missing alpha means scale 1, as every loader treats it)."""
    if all(isinstance(v, torch.Tensor) for v in layers.values()):
        out = {}
        for k, down in layers.items():
            if k.endswith(".lora_down.weight"):
                base = k[: -len(".lora_down.weight")]
                alpha = layers.get(f"{base}.alpha")
                alpha = down.shape[0] if alpha is None else alpha.item()
                out[base] = weight_delta(down, layers[f"{base}.lora_up.weight"], alpha, dtype)
        return out
    return {k: weight_delta(*_check_layer(k, v), dtype=dtype) for k, v in layers.items()}


def _bundle_tensors(bundle: Mapping[str, object], family: str,
                    widths: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """``bundle_emb.<name>.string_to_param.*`` (SD1/SD2) or ``bundle_emb.<name>.clip_l|clip_g``
    (SDXL): the layouts A1111's ``networks.load_network`` and ComfyUI's ``load_embed`` read."""
    out: dict[str, torch.Tensor] = {}
    keys = list(family_of(family).encoder_keys)
    for emb_name, value in bundle.items():
        emb_name = validate_name(emb_name)
        if "." in emb_name:
            raise ValueError(f"Bundled embedding name '{emb_name}' contains '.'; A1111 splits "
                             "the key there. Use '_' or '-'.")
        vectors = dict(value) if isinstance(value, Mapping) else (
            {keys[0]: value} if len(keys) == 1 else {})
        check_vectors(vectors, family, widths)
        if len(keys) > 1:
            for k in keys:
                out[f"bundle_emb.{emb_name}.{k}"] = cpu_fp32(vectors[k])
        else:
            out[f"bundle_emb.{emb_name}.string_to_param.*"] = cpu_fp32(vectors[keys[0]])
    return out


def lora_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder/<name>.safetensors``; the name is checked (``files.validate_name``) and cannot
    leave the folder."""
    return safe_path(folder, validate_name(name) + ".safetensors")


def check_can_write_lora(folder: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Fail early, before training, if the LoRA file could not be written; returns its path."""
    path = lora_path(folder, name)
    check_paths_writable(folder, [path], overwrite)
    return path


def save_lora(folder: str | os.PathLike, name: str, layers: Mapping[str, object], *, family: str,
              metadata: Mapping[str, object] | None = None, dtype=torch.float16,
              prediction: str = "eps", layout: UNetLayout | None = None,
              naming: ParameterNaming | None = None, bundle_emb: Mapping[str, object] | None = None,
              bundle_widths: Mapping[str, int] | None = None, overwrite: bool = False) -> Path:
    """Write ``folder/<name>.safetensors`` in kohya's format (module docstring) and return it.

    ``layers``: layer name (as the host's ``naming`` spells it; default the diffusers host's) →
    ``(down, up, alpha)``.  ``dtype``: of the factors, fp16 (kohya's default), bf16 or fp32.
    ``prediction``: the base model's ("eps" or "v"; SD2-768 is "v").  ``layout``: the UNet's
    (default: the real model's).  ``bundle_emb``: name → vectors (``{"clip_l": [n,768],
    "clip_g": [n,1280]}`` for SDXL, a ``[n, width]`` tensor or ``{"clip_l"|"clip_h": T}`` for
    SD1/SD2), read by A1111 and by ComfyUI as an embedding (``docs/FORMATS.md``);
    ``bundle_widths`` ({encoder key: width}) replaces the real encoders' widths (tiny test
    models).  Every check runs before anything is written.
    """
    family_of(family)
    path = check_can_write_lora(folder, name, overwrite)
    name = path.stem
    tensors = lora_state_dict(layers, family=family, dtype=dtype, layout=layout, naming=naming)
    checked = {k: _check_layer(k, v) for k, v in layers.items()}
    if bundle_emb:
        tensors.update(_bundle_tensors(bundle_emb, family, bundle_widths))
    impl = "diffusers" if unet_key_scheme(family) == "diffusers" else SGM
    meta = lora_metadata(checked, name, family, prediction=prediction, implementation=impl, extra=metadata)
    data = with_model_hash(tensors, meta)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return atomic_write_files({path: data})[0]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: LoRA files are read from .safetensors only (a .pt/.ckpt "
                         "could run code when unpickled).")
    return read_safetensors(path)


def _family_of(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    """The family a file says it is for: kohya's base-model version (A1111 reads the same keys),
    else ours, else SDXL if it has a second text encoder's keys."""
    version = meta.get("ss_base_model_version", "")
    by_version = {f.base_model_version: f.name for f in FAMILIES.values()}
    for v in sorted(by_version, key=len, reverse=True):
        if version.startswith(v):
            return by_version[v]
    if meta.get("ss_v2") == "True":
        return "sd2"
    if meta.get("likeness.family") in FAMILIES:
        return meta["likeness.family"]
    if any(k.startswith("lora_te2_") for k in tensors):
        return "sdxl"
    return "sd1"


def _layer_groups(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya key: {"lora_down.weight" | "lora_up.weight" | "alpha": tensor}}, bundles left out."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("bundle_emb."):
            continue
        base, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"{source}: '{key}' is not a plain LoRA tensor (DoRA, LoCon, LoHa "
                             "and other variants are not supported).")
        groups.setdefault(base, {})[part] = t
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{source}: '{base}' lacks lora_down or lora_up.")
    return groups


def _own_names(module_names: Iterable[str], family: str, layout: UNetLayout,
               naming: ParameterNaming | None) -> dict[str, str]:
    """{canonical name: the caller's name} for the caller's modules that can be LoRA layers."""
    own: dict[str, str] = {}
    for n in module_names:
        try:
            own.setdefault(normalize_layer_name(n, family, layout, naming), n)
        except ValueError:
            continue
    return own


def load_lora(path: str | os.PathLike, *, family: str | None = None,
              layout: UNetLayout | None = None, module_names: Iterable[str] | None = None,
              naming: ParameterNaming | None = None) -> tuple[dict[str, LoraLayer], dict[str, str]]:
    """Read a kohya-format LoRA file: ``({layer name: LoraLayer}, metadata)`` (see
    :func:`lora_layers`).  ``family`` defaults to what the metadata says."""
    path = Path(path)
    tensors, meta = _read(path)
    family = family or _family_of(tensors, meta)
    return lora_layers(tensors, family=family, layout=layout, module_names=module_names, naming=naming,
                       source=path.name), meta


def lora_layers(tensors: Mapping[str, torch.Tensor], *, family: str, layout: UNetLayout | None = None,
                module_names: Iterable[str] | None = None, naming: ParameterNaming | None = None,
                source: str = "LoRA") -> dict[str, LoraLayer]:
    """The layers of a kohya LoRA state dict: ``{layer name: LoraLayer}``.

    Names are canonical (:func:`normalize_layer_name`: ``unet.<diffusers path>``,
    ``text_encoder[_2].text_model.…``) whichever UNet naming the file uses, or, with
    ``module_names`` (e.g. a host's parameter names without ``.weight``, spelled as its
    ``naming`` declares), the caller's own spelling of each module.  Factors keep the file's
    dtype; a missing alpha reads as the rank (scale 1, as every loader treats it).  Bundled
    embeddings are skipped (:func:`load_bundled_embeddings`); other LoRA variants (DoRA, LoCon mid,
    LoHa, ...) are refused."""
    family = family_of(family).name
    layout = layout or DEFAULT_LAYOUTS[family]
    own = None if module_names is None else _own_names(module_names, family, layout, naming)
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for base, parts in _layer_groups(tensors, source).items():
        try:
            name = name_of_key(base, family, layout)
        except ValueError as e:
            raise ValueError(f"{source}: cannot place '{base}' in a {family} model: {e}") from None
        if own is not None:
            if name not in own:
                unknown.append(name)
                continue
            name = own[name]
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = parts.get("alpha")
        layers[name] = _check_layer(base, (down, up, down.shape[0] if alpha is None else alpha))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} layer(s) match no given module, e.g. {unknown[:3]}.")
    return layers


def load_bundled_embeddings(path: str | os.PathLike,
                            family: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Embeddings bundled in a LoRA, name → encoder-keyed fp32 vectors (``{"clip_l": T}``,
    ``{"clip_h": T}`` or ``{"clip_l": T, "clip_g": T}``).  An SD1/SD2 ``string_to_param`` vector
    is keyed by its width (768 clip_l, 1024 clip_h), or by ``family``'s encoder when given."""
    first = None if family is None else family_of(family).encoders[0].key
    tensors, _ = _read(Path(path))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("bundle_emb."):
            continue
        emb_name, _, rest = key[len("bundle_emb."):].partition(".")
        if rest.startswith("string_to_param."):
            enc = first or WIDTH_TO_KEY.get(t.shape[-1])
            if enc is None:
                raise ValueError(f"'{key}': width {t.shape[-1]} matches no text encoder.")
        elif rest in WIDTH_TO_KEY.values():
            enc = rest
        else:
            raise ValueError(f"'{key}' is not a bundled-embedding key.")
        out.setdefault(emb_name, {})[enc] = cpu_fp32(t.reshape(-1, t.shape[-1]))
    return out


__all__ = ["LoraLayer", "lora_state_dict", "weight_delta", "lora_state_dict_to_weight_delta", "lora_path",
           "check_can_write_lora", "save_lora", "load_lora", "load_bundled_embeddings"]
