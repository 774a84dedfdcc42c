"""Where low precision is allowed: the frozen model computes in the host's bf16/fp16 on CUDA,
while everything a method trains (and its optimizer state, and sampler states) stays fp32."""
from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device, compute_dtype: torch.dtype | None):
    """bf16/fp16 autocast on CUDA (the frozen model's compute dtype), nothing on CPU or for fp32."""
    if compute_dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=compute_dtype)
    return contextlib.nullcontext()


__all__ = ["autocast_for"]
