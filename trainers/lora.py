"""LoRA adapters trained as branches on a host's layers (``seam.Tunable.module_branches``).

A layer with weight ``W`` computes ``W x + (alpha / r) · up(down(x))`` (Hu et al. 2021, eq. 3,
with kohya's alpha scaling): the same function as the merged weight ``W + (alpha / r) · up @ down``
(conv factors flattened as every loader rebuilds them), so what we train is exactly what ComfyUI,
A1111/Forge and diffusers compute when they load the file.  It is trained as a branch, not merged,
because a merged change below half a bf16/fp16 step of ``W`` rounds away (a 1e-4 relative change is
lost in every element of a bf16 weight); the branch's own output is not rounded against ``W``.  The
factors are fp32 masters of our own, cast to the compute dtype inside the branch; the host's
weights are never written.

Targets (which layers get an adapter), by preset - names are matched on the module path's tail,
which is the same in diffusers and LDM naming inside a transformer block:

* ``attention`` - diffusers' DreamBooth-LoRA: ``attn1/attn2 .to_q .to_k .to_v .to_out.0``.
* ``transformer`` - kohya's default: every Linear and 1x1 conv of the transformer blocks
  (those four, plus ``proj_in``, ``proj_out``, ``ff.net.0.proj``, ``ff.net.2``).
* ``cross_kv`` - Custom Diffusion (Kumari et al. 2023): the cross-attention keys and values only.

Text encoders: ``attention`` and ``cross_kv`` train ``q/k/v/out_proj``; ``transformer`` also the
MLP (``fc1``, ``fc2``) - kohya's text-encoder set.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from .formats.kohya_lora import weight_delta

PRESETS = ("attention", "transformer", "cross_kv")

_UNET_TARGETS = {
    "attention": re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$"),
    "transformer": re.compile(r"(\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
                              r"|ff\.net\.0\.proj|ff\.net\.2)|\.proj_in|\.proj_out)\.weight$"),
    "cross_kv": re.compile(r"\.transformer_blocks\.\d+\.attn2\.(to_k|to_v)\.weight$"),
}
_TE_TARGETS = {
    "attention": re.compile(r"\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight$"),
    "transformer": re.compile(r"\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$"),
    "cross_kv": re.compile(r"\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight$"),
}


def target_weights(params: dict[str, torch.Tensor], preset: str, text_encoder: bool = False) -> list[str]:
    """Names of the weights in ``params`` (a host's ``tunable_parameters``) that ``preset`` adapts:
    2-D (Linear) or 4-D with a 1x1 kernel (the 1x1 convs some UNets use for ``proj_in/out``)."""
    if preset not in PRESETS:
        raise ValueError(f"LoRA targets must be one of {', '.join(PRESETS)}, not {preset!r}")
    rx = (_TE_TARGETS if text_encoder else _UNET_TARGETS)[preset]
    out = []
    for name, w in params.items():
        if rx.search(name) and (w.ndim == 2 or (w.ndim == 4 and tuple(w.shape[2:]) == (1, 1))):
            out.append(name)
    return sorted(out)


@dataclass
class LoraAdapter:
    """One layer's factors: ``down [r, in(, 1, 1)]``, ``up [out, r(, 1, 1)]`` (fp32), scale alpha/r."""

    down: torch.nn.Parameter
    up: torch.nn.Parameter
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        # the loaders' own formula (kohya_lora.weight_delta), differentiable in the factors
        return weight_delta(self.down, self.up, self.alpha)

    def patch(self, w: torch.Tensor) -> torch.Tensor:
        # the delta is computed in fp32 and enters in the weight's dtype: what a loader does
        return w + self.delta().to(w.dtype)

    def branch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + (alpha / r) · up(down(x))`` in ``y``'s dtype (the layer's compute dtype); ``x``
        is the layer's input (``[..., in]`` for a Linear, ``[B, in, h, w]`` for a 1x1 conv)."""
        down, up, x = self.down.to(y.dtype), self.up.to(y.dtype), x.to(y.dtype)
        if down.ndim == 4:
            h = F.conv2d(F.conv2d(x, down), up)
        else:
            h = F.linear(F.linear(x, down), up)
        return y + h * (self.alpha / self.rank)


class LoraSet:
    """Adapters for a set of a host's weights; ``branches()`` feeds ``host.module_branches``."""

    def __init__(self, weights: dict[str, torch.Tensor], rank: int, alpha: float, *,
                 device: torch.device, seed: int = 0):
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha}")
        if not weights:
            raise ValueError("no layers to adapt")
        gen = torch.Generator("cpu").manual_seed(seed)
        self.adapters: dict[str, LoraAdapter] = {}
        for name, w in weights.items():
            self.adapters[name] = self._new(w, rank, alpha, gen, device)

    @staticmethod
    def _new(w: torch.Tensor, rank: int, alpha: float, gen: torch.Generator,
             device: torch.device) -> LoraAdapter:
        out_f, in_f = w.shape[0], int(math.prod(w.shape[1:]))
        r = min(rank, out_f, in_f)
        # kohya / PEFT init: down ~ kaiming-uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), up = 0,
        # so training starts exactly at the base model
        bound = 1.0 / math.sqrt(in_f)
        down = (torch.rand(r, in_f, generator=gen) * 2 - 1) * bound
        up = torch.zeros(out_f, r)
        extra = (1, 1) if w.ndim == 4 else ()
        # a layer narrower than the rank gets rank r; alpha shrinks with it so the layer's scale
        # stays the alpha/rank that was asked for (alpha kept as-is would scale it by rank/r)
        return LoraAdapter(
            down=torch.nn.Parameter(down.reshape(r, *w.shape[1:]).to(device)),
            up=torch.nn.Parameter(up.reshape(out_f, r, *extra).to(device)),
            alpha=float(alpha) * r / rank,
        )

    @classmethod
    def from_layers(cls, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]], *,
                    device: torch.device) -> "LoraSet":
        """Adapters that continue existing factors (``fit_layers``: keyed by weight name, shaped
        as the weights), each at its own rank and alpha: a LoRA file trained on."""
        out = cls.__new__(cls)
        out.adapters = {name: LoraAdapter(down=torch.nn.Parameter(down.detach().to(device, torch.float32).clone()),
                                          up=torch.nn.Parameter(up.detach().to(device, torch.float32).clone()),
                                          alpha=float(alpha))
                        for name, (down, up, alpha) in layers.items()}
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        return [t for a in self.adapters.values() for t in (a.down, a.up)]

    def patches(self) -> dict:
        """Merged-weight patches for ``host.parameter_patches`` (what a loader computes; used to
        check results, not to train: a small change rounds away in a bf16 weight)."""
        return {name: a.patch for name, a in self.adapters.items()}

    def branches(self) -> dict:
        """Branches for ``host.module_branches``: how the adapters train."""
        return {name: a.branch for name, a in self.adapters.items()}

    def layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{module name: (down, up, alpha)}`` on the CPU, fp32 - what ``kohya_lora.save_lora``
        takes (module names: the weight names without ``.weight``)."""
        return {name[: -len(".weight")]: (a.down.detach().float().cpu(), a.up.detach().float().cpu(), a.alpha)
                for name, a in self.adapters.items()}

    def __len__(self) -> int:
        return len(self.adapters)


def fit_layers(layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
               weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA's layers (``{module name: (down, up, alpha)}``, as a file holds them) placed on the
    ``weights`` they adapt (``{module name + ".weight": W}``), factors shaped as our adapters hold
    them (a Linear's factors stored as 1x1 convs, or the reverse, are reshaped).  ValueError naming
    the first layer that does not fit: another model's width, or a layer kind we cannot train."""
    out = {}
    for name, (down, up, alpha) in layers.items():
        w = weights[name + ".weight"]
        r, out_f, in_f = down.shape[0], w.shape[0], int(math.prod(w.shape[1:]))
        if w.ndim == 4 and tuple(w.shape[2:]) != (1, 1):
            raise ValueError(f"{name!r} is a {w.shape[2]}x{w.shape[3]} convolution (a LoCon layer), which "
                             "Likeness cannot train; give a LoRA of linear and 1x1 layers")
        if down.numel() != r * in_f or up.numel() != out_f * r:
            raise ValueError(f"{name!r} is {in_f} -> {out_f} in this model, but the file's factors are down "
                             f"{tuple(down.shape)}, up {tuple(up.shape)}")
        extra = (1, 1) if w.ndim == 4 else ()
        out[name + ".weight"] = (down.reshape(r, *w.shape[1:]), up.reshape(out_f, r, *extra), float(alpha))
    return out


def extract_lora(deltas: dict[str, torch.Tensor], rank: int, *, min_norm: float = 0.0) -> dict:
    """Best rank-``rank`` approximation (truncated SVD) of each weight delta, as LoRA layers
    ``{module: (down, up, alpha=r)}`` - a full fine-tune distilled into a small file.  Only the
    Linear and conv weights LoRA loaders patch are taken; deltas with norm ≤ ``min_norm`` dropped."""
    out = {}
    for name, d in deltas.items():
        if not name.endswith(".weight") or d.ndim not in (2, 4):
            continue
        m = d.detach().float().cpu().reshape(d.shape[0], -1)
        if float(m.norm()) <= min_norm:
            continue
        r = min(rank, *m.shape)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        up = (u[:, :r] * s[:r]).reshape(d.shape[0], r, *((1, 1) if d.ndim == 4 else ()))
        down = vh[:r].reshape(r, *d.shape[1:])
        out[name[: -len(".weight")]] = (down.contiguous(), up.contiguous(), float(r))
    return out


def count_parameters(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


__all__ = ["PRESETS", "target_weights", "LoraAdapter", "LoraSet", "fit_layers", "extract_lora", "count_parameters"]
