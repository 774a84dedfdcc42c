"""The loop every method runs in: optimizer, precision, non-finite guard, checkpoints, progress,
previews and Cancel.

A method is a small object with ``parameters()`` (fp32 tensors it trains) and ``loss(step)``
(a scalar for one optimisation step).  The loop never knows which method it drives.

Cancel: ComfyUI raises ``InterruptProcessingException`` (a BaseException) from its progress bar,
and the CLI gets ``KeyboardInterrupt``.  Both arrive here as exceptions from a callback or from the
model; the loop then calls ``save`` with the last good state and re-raises, so the host still sees
the interruption and nothing half-trained is presented as finished.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch


class Method(Protocol):
    def parameters(self) -> Iterable[torch.Tensor]: ...

    def loss(self, step: int) -> torch.Tensor: ...


@dataclass
class LoopConfig:
    steps: int
    learning_rate: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    #: write the result every N steps (0: only at the end or on Cancel)
    save_every: int = 0
    #: render a preview every N steps (0: never)
    preview_every: int = 0
    #: give up after this many consecutive non-finite steps: something is broken, not unlucky
    max_bad_steps: int = 20
    #: constant learning rate after a short linear warm-up (steps)
    warmup_steps: int = 0


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    skipped_steps: int = 0
    cancelled: bool = False
    seconds: float = 0.0


#: progress(step, total, loss or None, preview image [H, W, 3] or None)
ProgressFn = Callable[[int, int, "float | None", "torch.Tensor | None"], None]


def autocast_for(device: torch.device, compute_dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA (the frozen model's compute dtype), nothing on CPU."""
    if device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=compute_dtype)
    return contextlib.nullcontext()


def _grads_finite(params: list[torch.Tensor]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


class _Snapshot:
    """The last parameters known to be finite; restored if a step ever produces non-finite ones."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.saved = [p.detach().clone() for p in params]

    def take(self) -> None:
        for s, p in zip(self.saved, self.params):
            s.copy_(p.detach())

    def restore(self) -> None:
        with torch.no_grad():
            for s, p in zip(self.saved, self.params):
                p.copy_(s)


def run(
    method: Method,
    cfg: LoopConfig,
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    save: Callable[[int], None],
    progress: ProgressFn | None = None,
    preview: Callable[[int], torch.Tensor] | None = None,
) -> LoopResult:
    """Optimise ``method.parameters()`` for ``cfg.steps`` steps with AdamW in fp32.

    fp16 compute uses a GradScaler so small gradients survive; bf16 needs none.  A step whose loss
    or gradients are not finite is skipped (parameters and optimizer state untouched) and counted.
    """
    params = [p for p in method.parameters()]
    if any(p.dtype != torch.float32 for p in params):
        raise TypeError("trainable tensors must be fp32 (optimizer state follows their dtype)")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
    use_scaler = device.type == "cuda" and compute_dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    snap = _Snapshot(params)
    result = LoopResult()
    t0 = time.perf_counter()
    bad_run = 0
    last_saved = 0
    last_good = 0  # the step whose parameters the snapshot holds

    def report(step: int, loss: float | None) -> None:
        if progress is None:
            return
        img = None
        if preview is not None and cfg.preview_every and (step % cfg.preview_every == 0 or step == cfg.steps):
            img = preview(step)
        progress(step, cfg.steps, loss, img)

    try:
        for step in range(1, cfg.steps + 1):
            if cfg.warmup_steps:
                for g in opt.param_groups:
                    g["lr"] = cfg.learning_rate * min(1.0, step / cfg.warmup_steps)
            opt.zero_grad(set_to_none=True)
            with autocast_for(device, compute_dtype):
                loss = method.loss(step)
            value = float(loss.detach())
            ok = math.isfinite(value)
            if ok:
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.unscale_(opt)
                ok = _grads_finite(params)
            if ok:
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                ok = all(bool(torch.isfinite(p).all()) for p in params)
                if not ok:
                    snap.restore()
            if ok:
                snap.take()
                last_good = step
                bad_run = 0
                result.losses.append(value)
            else:
                if scaler:  # lower the scale so the next fp16 step can succeed
                    scaler.update(scaler.get_scale() / 2)
                result.skipped_steps += 1
                bad_run += 1
                if bad_run >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_run} steps in a row gave a non-finite loss or gradient; the last good "
                        f"result (step {last_good}) was saved. Lower the learning rate, or use "
                        f"bf16/fp32 instead of fp16."
                    )
            result.steps_done = step
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save(step)
                last_saved = step
            report(step, value if ok else None)
    except BaseException:
        # Cancel, Ctrl-C, OOM or a bug: keep the last good state on disk, then let it propagate.
        result.cancelled = True
        snap.restore()
        if last_good > last_saved:
            save(last_good)
        result.seconds = time.perf_counter() - t0
        raise
    save(cfg.steps)
    result.seconds = time.perf_counter() - t0
    return result
