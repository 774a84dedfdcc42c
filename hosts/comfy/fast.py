"""The fast path of ``ComfyHost``: the UNet and the text encoders as private module trees whose
weights are ordinary tensors, made once per ``training()`` block, so a step neither copies a weight
nor reloads the model.

Why it is built this way (ComfyUI runs nodes under ``torch.inference_mode()``; see ``host.py``):

* The loaded weights are inference tensors, which autograd refuses to save.  An *ordinary* tensor
  over the same storage (``Tensor.set_``) is not one, and costs no memory: the fast path aliases
  every weight ComfyUI has loaded on the device in the dtype the step computes in.  Only what
  ComfyUI would cast or stream on every forward (DynamicVRAM, partially loaded or cast weights) is
  copied, once; ``estimate`` tells a VRAM preflight how much that is.
* The user's MODEL/CLIP and every clone sharing their modules must stay untouched, so the trees are
  *replicas*: each module is shallow-copied with its own parameter, buffer, child and hook dicts.
  Patches (``parametrize``), forward hooks and gradient checkpointing go on the replicas only.
  ComfyUI replaces a weight when it patches another clone (``set_attr_param``), so an alias keeps
  the values the replica was built from.
* The replica of the ``BaseModel`` keeps ComfyUI's own ``apply_model`` and ``extra_conds``; the
  replica of the CLIP keeps its own ``encode_from_tokens``, with the once-per-block load in place
  of ComfyUI's load on every call.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

import comfy.model_management
import comfy.ops

from .patching import PatchableWrapper

#: what DynamicVRAM and ComfyUI's low-VRAM loading put on a layer to stream or cast its weights
#: per forward; a replica computes from its own tensors instead
_STREAMING = ("_v", "_v_weight", "_v_bias", "_v_signature", "_prefetch",
              "weight_lowvram_function", "bias_lowvram_function")


def ordinary(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an ordinary (non-inference) tensor over the same storage: no copy."""
    if not t.is_inference():
        return t
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _is_op(m: torch.nn.Module) -> bool:
    return hasattr(m, "weight_function")


def _streams(m: torch.nn.Module) -> bool:
    """Whether ComfyUI computes ``m``'s weights per forward (streamed, low-VRAM patches) rather
    than reading them as stored; our own ``PatchableWrapper``s do not count (identity)."""
    fns = list(getattr(m, "weight_function", [])) + list(getattr(m, "bias_function", []))
    return hasattr(m, "_v") or any(not isinstance(f, PatchableWrapper) for f in fns)


def _aliasable(m: torch.nn.Module, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> bool:
    plain = type(t) in (torch.Tensor, torch.nn.Parameter)  # not a quantized / meta subclass
    return plain and not _streams(m) and t.device == device and (dtype is None or t.dtype == dtype)


def _op_tensors(m: torch.nn.Module, device: torch.device, dtype: torch.dtype | None):
    """(weight, bias) of ComfyUI layer ``m`` as ordinary tensors: aliases where possible, else what
    ComfyUI's own cast computes for a forward (streaming, patches, dequantisation), copied once."""
    w, b = m.weight, m.bias
    if w is None or (_aliasable(m, w, device, dtype) and (b is None or _aliasable(m, b, device, dtype))):
        return (None if w is None else ordinary(w)), (None if b is None else ordinary(b))
    with torch.no_grad():
        cw, cb = comfy.ops.cast_bias_weight(m, dtype=dtype or w.dtype, device=device,
                                            bias_dtype=dtype or (b.dtype if b is not None else w.dtype))
    return cw.detach().clone(), (None if cb is None else cb.detach().clone())


def _param(t: torch.Tensor | None):
    return None if t is None else torch.nn.Parameter(t, requires_grad=False)


def _cast_once(module, original, input, *args, **kwargs):
    """A layer that casts its weights to its input's dtype on every call (ComfyUI's text encoders
    store fp16 and compute in fp32) keeps the cast weights once an input needs gradients (Textual
    Inversion, a trained text encoder): autograd would keep each step's casts alive until backward
    anyway.  Inputs without gradients (frozen text, encoded once per prompt) cast per call as
    ComfyUI does, so no memory is held for them."""
    if isinstance(input, torch.Tensor) and input.requires_grad and input.is_floating_point():
        for name in ("weight", "bias"):
            t = module._parameters.get(name)  # a patched weight lives elsewhere: left to the patch
            if t is not None and t.dtype != input.dtype and t.is_floating_point():
                module._parameters[name] = _param(t.to(input.dtype))
    return original(input, *args, **kwargs)


def replicate(root: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """A private copy of the module tree ``root`` over ordinary tensors (see the module doc).
    ``dtype``: what ComfyUI's layers compute in (their weights are cast once to it), or None to
    keep each weight's own dtype (layers that cast per call keep doing so)."""
    memo: dict[int, torch.nn.Module] = {}

    def rep(m):
        if m is None or id(m) in memo:
            return None if m is None else memo[id(m)]
        new = copy.copy(m)
        memo[id(m)] = new
        for k, v in vars(m).items():  # hooks, options: never shared with the user's module
            if isinstance(v, (dict, set, list)):
                new.__dict__[k] = copy.copy(v)
        for k in _STREAMING:
            new.__dict__.pop(k, None)
        if _is_op(m):
            w, b = _op_tensors(m, device, dtype)
            new._parameters["weight"], new._parameters["bias"] = _param(w), _param(b)
            new.weight_function, new.bias_function = [], []
            if hasattr(m, "forward_comfy_cast_weights"):
                new.forward_comfy_cast_weights = functools.partial(_cast_once, new, new.forward_comfy_cast_weights)
        for k, p in m._parameters.items():
            if not (_is_op(m) and k in ("weight", "bias")):
                new._parameters[k] = _param(ordinary(p)) if p is not None else None
        for k, t in m._buffers.items():
            new._buffers[k] = ordinary(t) if t is not None else None
        new._modules = {k: rep(c) for k, c in m._modules.items()}
        return new

    return rep(root)


@dataclass
class FastPathMemory:
    """Bytes on the device the fast path needs for its weights: ``resident`` every weight the step
    reads, held for the whole run; ``copied`` the part of it that is a copy made on top of what
    ComfyUI itself loads (0 when ComfyUI loads the whole model in the compute dtype).  Text-encoder
    weights stored narrower than fp32 count at fp32: their one-time cast when text is trained
    (``_cast_once``); a run with frozen text does not make it."""

    resident: int
    copied: int


def estimate(parts) -> FastPathMemory:
    """``parts``: (patcher, root module, compute dtype or None) per replicated tree."""
    resident = copied = 0
    for patcher, root, dtype in parts:
        dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
        for m in root.modules():
            for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if _is_op(m) else ():
                if not isinstance(t, torch.Tensor):
                    continue
                wide = dtype or (torch.float32 if t.is_floating_point() and t.itemsize < 4 else t.dtype)
                n = t.numel() * wide.itemsize
                resident += n
                if dynamic or type(t) not in (torch.Tensor, torch.nn.Parameter) or wide != t.dtype:
                    copied += n
    return FastPathMemory(resident, copied)


class _Patch(torch.nn.Module):
    """A parametrization of weight ``key`` computing the trainer's ``fns[key](weight)``, on a
    replica only (the ``PatchableWrapper`` of the fast path)."""

    def __init__(self, key: str, fns: dict):
        super().__init__()
        self.key, self.fns = key, fns

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.fns[self.key](original)


class FastModels:
    """The replicas one ``training()`` block trains through: ``base`` (the ``BaseModel``, whose
    ``apply_model`` runs the UNet replica) and ``clip`` (a CLIP object over the text-encoder
    replica).  Built after loading ``model`` and ``clip`` once."""

    def __init__(self, model, clip):
        comfy.model_management.load_models_gpu([model, clip.patcher])
        base = model.model
        self.base = replicate(base, model.load_device, base.get_dtype_inference())
        self.base.current_patcher = None  # no DynamicVRAM prefetching: the replica streams nothing
        self.patcher = model
        self.clip = copy.copy(clip)
        self.clip.cond_stage_model = replicate(clip.cond_stage_model, clip.patcher.load_device, None)
        self.clip.load_model = lambda tokens=None: clip.patcher  # loaded above, once
        self._patched: dict[str, tuple[torch.nn.Module, str]] = {}

    def _owner(self, key: str) -> tuple[torch.nn.Module, str]:
        mname, _, pname = key.rpartition(".")
        root = self.base if key.startswith("diffusion_model.") else self.clip.cond_stage_model
        return root.get_submodule(mname), pname

    def patch(self, fns: dict) -> None:
        """``fns[key](weight)`` replaces weight ``key`` (names as ComfyUI's weight wrappers)."""
        fns = dict(fns)  # the patches of this call, whatever the caller's dict does later
        for key in fns:
            self.unpatch([key])
            module, pname = self._owner(key)
            parametrize.register_parametrization(module, pname, _Patch(key, fns), unsafe=True)
            self._patched[key] = (module, pname)

    def unpatch(self, keys) -> None:
        for key in keys:
            if key in self._patched:
                module, pname = self._patched.pop(key)
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)


__all__ = ["FastModels", "FastPathMemory", "estimate", "ordinary", "replicate"]
