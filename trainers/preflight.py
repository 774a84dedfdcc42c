"""Memory preflight: before any work, estimate a run's peak memory on its device and pick
gradient checkpointing (or the host's low-memory path) when the plain run would not fit — or
refuse with the setting to change — instead of running out of memory halfway through.

How the estimate is made, and why so:

* **State** (exact): every trainable tensor in fp32, its gradient and the optimizer's state
  (AdamW: two moments; Adafactor: factored second moments, about nothing for matrices).
* **Activations** (measured): what one step keeps for backward depends on the network, the
  attention kernel, the method (weight gradients keep every layer input; TI keeps less) and the
  host's path (the low-memory path copies weights per forward).  Rather than a table that goes
  stale, the trainer runs its own forward at three tiny latent sizes and we measure the bytes that
  stay alive after it — storages created during the forward that something still references
  (autograd's saved tensors, checkpoint frames) — then extrapolate exactly: per UNet level,
  retained memory is ``a + b·area + c·area²`` (the quadratic term is a materialised attention map).
* **Checkpointed peak**: what stays alive with checkpointing, plus one block recomputed in
  backward; the largest block of an SD UNet holds well under an eighth of a step's activations.
* A margin: 15 % plus 512 MiB for kernels' workspaces and the allocator's fragmentation.

The budget is the device's free memory (CUDA) or what the user set; on the CPU with no budget set
nothing is measured and nothing changes.  It is read after the probes, so a host that loads its
weights lazily, or makes its fast path's weight copies at first use (ComfyUI), is counted with
them already in place.  The host's low-memory path is not a choice here: the path is fixed once a
``training()`` block has run its first step, before the probes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import objective
from .compile import eager
from .precision import autocast_for
from .seam import Host, ImageMeta, Tunable

MiB = 1024 ** 2
GiB = 1024 ** 3
MARGIN, WORKSPACE = 1.15, 512 * MiB
#: a checkpointed step's recompute: at most this share of the plain step's activations at once
BLOCK_SHARE = 1 / 8


class PreflightError(ValueError):
    """The run cannot fit on its device with any setting the preflight may change on its own."""


@dataclass(frozen=True)
class Need:
    """Bytes a run needs on its device beyond the weights already there."""

    state: int  # the trainable tensors' gradients and optimizer state
    activations: int  # kept for backward per step, no checkpointing
    activations_checkpointed: int | None  # None: the host cannot checkpoint

    def peak(self, *, checkpointing: bool) -> int:
        act = self.activations_checkpointed if checkpointing else self.activations
        return int((self.state + act) * MARGIN) + WORKSPACE


@dataclass(frozen=True)
class Choice:
    """What the run will use; ``note`` is one line for the user when the preflight changed something."""

    checkpointing: bool
    estimate: int
    budget: int | None
    note: str = ""


def state_bytes(numel: int, optimizer: str = "adamw") -> int:
    """fp32 gradients (+ AdamW's two moments; Adafactor's factored moments are negligible for
    matrices).  The trainable tensors themselves already exist when the budget is read."""
    per = 4 * (1 + (2 if optimizer == "adamw" else 0))
    return per * int(numel)


class _Created(TorchDispatchMode):
    """Records every storage an op creates, weakly, so that what is still alive afterwards can be
    told apart from what was freed (and from what existed before: the weights)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                old = self.storages.get(s.data_ptr())
                if old is None or old[0].expired():  # a freed storage's address is reused
                    self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out


def retained_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes created by ``forward()`` that are still referenced once it returns, the output (and
    whatever it holds for backward) kept alive: what a step keeps until its backward."""
    mode = _Created()
    with mode:
        out = forward()
    alive = sum(n for ref, n in mode.storages.values() if not ref.expired())
    del out
    return alive


def extrapolate(forward_at: Callable[[tuple[int, int]], torch.Tensor], multiple: int,
                target_hw: tuple[int, int]) -> int:
    """Retained bytes at ``target_hw`` (a latent size) from three probes at 1, 2 and 3 times
    ``multiple``: the exact quadratic in the area through them (negative curvature, a measuring
    artefact, falls back to the line through the two larger probes)."""
    areas, kept = [], []
    for k in (1, 2, 3):
        hw = (k * multiple, k * multiple)
        areas.append(float(hw[0] * hw[1]))
        kept.append(float(retained_bytes(lambda: forward_at(hw))))
    (a1, a2, a3), (b1, b2, b3) = areas, kept
    s12, s23 = (b2 - b1) / (a2 - a1), (b3 - b2) / (a3 - a2)
    c = (s23 - s12) / (a3 - a1)
    area = float(target_hw[0] * target_hw[1])
    if c < 0:
        return max(0, int(b3 + s23 * (area - a3)))
    return max(0, int(b2 + s23 * (area - a2) + c * (area - a2) * (area - a3)))


def measure(forward_at: Callable[[tuple[int, int]], torch.Tensor], multiple: int, target_hw: tuple[int, int],
            checkpointing: Callable[[], ContextManager] | None) -> tuple[int, int | None]:
    """(activations, checkpointed activations or None) of one step at ``target_hw``."""
    plain = extrapolate(forward_at, multiple, target_hw)
    if checkpointing is None:
        return plain, None
    with checkpointing():
        kept = extrapolate(forward_at, multiple, target_hw)
    return plain, kept + int(plain * BLOCK_SHARE)


def device_budget(device: torch.device) -> int | None:
    """Memory a run may use: CUDA's free memory plus what PyTorch holds cached but unused; None
    (no limit known) elsewhere."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def _gb(n: int) -> str:
    return f"{n / GiB:.1f} GB"


def decide(need: Need, budget: int | None, *, checkpointing: bool, what_to_lower: str) -> Choice:
    """As asked if that fits ``budget``; else with gradient checkpointing if that fits; else
    ``PreflightError`` naming ``what_to_lower``."""
    can_ckpt = need.activations_checkpointed is not None
    asked = need.peak(checkpointing=checkpointing and can_ckpt)
    if budget is None or asked <= budget:
        return Choice(checkpointing and can_ckpt, asked, budget)
    if can_ckpt and not checkpointing:
        est = need.peak(checkpointing=True)
        if est <= budget:
            return Choice(True, est, budget, f"memory: the run as set needs about {_gb(asked)}, {_gb(budget)} "
                          f"are free; using gradient checkpointing (about {_gb(est)}, somewhat slower)")
    least = need.peak(checkpointing=can_ckpt)
    raise PreflightError(
        f"this run needs about {_gb(least)} even with every memory saving on, and the device has "
        f"{_gb(budget)} free: lower {what_to_lower}, or close what else uses the GPU")


def denoising_step(host: Host, prompt: str, batch: int, placeholder: str | None = None,
                   vectors: dict | None = None) -> Callable[[tuple[int, int]], torch.Tensor]:
    """A method's step at any latent size: encode, noise, denoise, native loss — what a trainer's
    ``loss`` does, without its data, so the preflight can run it before any latent is encoded."""
    sigmas = host.training_sigmas().float()

    def forward_at(hw: tuple[int, int]) -> torch.Tensor:
        x0 = torch.zeros(batch, host.latent_channels, *hw, device=host.device)
        metas = [ImageMeta((hw[0] * host.latent_scale, hw[1] * host.latent_scale))] * batch
        with autocast_for(host.device, host.compute_dtype):
            cond = host.encode_text([prompt] * batch, placeholder, vectors, metas)
            n = objective.noised(x0, sigmas, torch.Generator("cpu").manual_seed(0))
            return objective.native_error(host, host.denoise(n.x, n.sigma, cond), x0, n.sigma).mean()

    return forward_at


def plan(host: Host, forward_at: Callable[[tuple[int, int]], torch.Tensor], *, target_hw: tuple[int, int],
         trainable_numel: int, optimizer: str, checkpointing: bool, budget_gb: float,
         what_to_lower: str) -> Choice:
    """Measure and decide (see the module docstring); nothing is measured when no budget is known.
    A note about a changed setting is also logged at once, before the run starts."""
    can_ckpt = isinstance(host, Tunable)
    if budget_gb <= 0 and host.device.type != "cuda":
        return Choice(checkpointing and can_ckpt, 0, None)
    with eager(host):
        act, act_ckpt = measure(forward_at, host.latent_multiple, target_hw,
                                host.gradient_checkpointing if can_ckpt else None)
    # read after the probes: a host that loads its weights lazily (ComfyUI) has loaded them now
    budget = int(budget_gb * GiB) if budget_gb > 0 else device_budget(host.device)
    need = Need(state_bytes(trainable_numel, optimizer), act, act_ckpt)
    choice = decide(need, budget, checkpointing=checkpointing, what_to_lower=what_to_lower)
    if choice.note:
        logging.getLogger("likeness").warning(choice.note)
    return choice


__all__ = ["denoising_step", "plan", "Need", "Choice", "PreflightError", "state_bytes", "retained_bytes", "extrapolate", "measure",
           "device_budget", "decide", "GiB", "MiB"]
