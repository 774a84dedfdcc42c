"""``compile: off | default | max`` - the denoiser step through ``torch.compile``, with CUDA graphs
for "max", and eager as the fallback whenever compiling is unavailable or fails.

Why it sits at the seam and not inside a host: the step of a host (fast path, low-memory path,
LoRA branches) changes under us, but every method reaches the network through ``Host.denoise`` or
through the denoiser a ``SeedModel.run`` hands out.  Compiling that call compiles whatever the
host does inside it, so the option works on every host without knowing its internals.

What a user is promised:

* "default": ``torch.compile`` (inductor).  The backward is lowered together with the first
  forward (``force_non_lazy_backward_lowering``), so a compiler failure shows up inside the first
  call - where it is caught - and not later in ``loss.backward()``, where the step could not be
  re-run.
* "max": the same plus CUDA graphs (``mode="reduce-overhead"``): at batch 1 the UNet step is
  launch-bound and replaying a recorded graph removes the Python and launch cost.  CUDA graphs
  need a CUDA device; elsewhere "max" compiles like "default" and says so.
* Any failure - no compiler, no Triton, an unsupported operation - prints one line and the run
  continues eagerly from the same step with the same inputs; the result is the same model.
* The first compiled calls (compilation, graph recording) are the warm-up: their time is kept in
  ``CompileState.warmup_seconds`` so speed figures can leave it out and report it separately.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

#: the choices of the ``compile`` option (nodes and CLI)
MODES = ("off", "default", "max")

#: torch.compile's mode on CUDA for each of ours (other devices: ``_compile_options``)
_TORCH_MODE = {"default": "default", "max": "reduce-overhead"}

#: compiled calls counted as warm-up: the first compiles, CUDA graphs record on the next ones
WARMUP_CALLS = 3


def _stderr_note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


@dataclass
class CompileState:
    """What became of the ``compile`` option in one run: the mode asked for, the one that ran
    ("off" after a fallback), why it fell back, and the warm-up the compiled calls cost."""

    requested: str
    active: str
    reason: str = ""
    calls: int = 0
    warmup_seconds: float = 0.0
    note: Callable[[str], None] = field(default=_stderr_note, repr=False)

    def fall_back(self, why: str) -> None:
        if self.active != "off":
            self.active, self.reason = "off", why
            self.note(f"likeness: compile={self.requested} unavailable ({why}); running eager")

    def summary(self) -> str:
        """One line for a run's report: what ran, and the warm-up left out of s/step."""
        if self.requested == "off":
            return "compile off"
        if self.active == "off":
            return f"compile {self.requested} fell back to eager ({self.reason})"
        return f"compile {self.active}: warm-up {self.warmup_seconds:.1f} s (not counted in s/step)"


def _unavailable(mode: str, device: torch.device) -> str:
    """Why ``torch.compile`` cannot run here at all ('' when it may)."""
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # a PyTorch that moved it: let the first call decide
            return ""
        if not has_triton():
            return "Triton is not installed, and torch.compile needs it on CUDA"
    return ""


def _compile_options(state: CompileState, device: torch.device) -> dict:
    """``torch.compile``'s arguments for the mode on this device.  Off CUDA the graph is captured
    and differentiated (``aot_eager``) but no code is generated: on the CPU it would gain nothing,
    and inductor's CPU code gave gradients that differ from eager on our tiny UNet (torch 2.13)."""
    if device.type == "cuda":
        return {"mode": _TORCH_MODE[state.active]}
    if state.requested == "max":
        state.active = "default"
        state.note("likeness: compile=max: CUDA graphs need a CUDA device; compiling without them")
    return {"backend": "aot_eager"}


def _eager_backward_lowering():
    cfg = getattr(getattr(torch, "_functorch", None), "config", None)
    if cfg is None or not hasattr(cfg, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return cfg.patch(force_non_lazy_backward_lowering=True)


class _Compiled:
    """``fn`` compiled on first use; any failure of a compiled call falls back to ``fn`` itself
    for this call and every later one (``state.active`` becomes "off")."""

    def __init__(self, fn: Callable, state: CompileState, options: dict):
        self.fn, self.state, self.options = fn, state, options
        self.compiled = None
        self.paused = False  # ``eager``: measuring runs (the memory preflight) call ``fn`` itself

    def __call__(self, *args, **kwargs):
        state = self.state
        if state.active == "off" or self.paused:
            return self.fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, **self.options)
            with _eager_backward_lowering():
                out = self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager step is the same step
            first = str(exc).strip().splitlines()
            state.fall_back(f"{type(exc).__name__}: {first[0][:160]}" if first else type(exc).__name__)
            return self.fn(*args, **kwargs)
        state.calls += 1
        if state.calls <= WARMUP_CALLS:
            state.warmup_seconds += time.perf_counter() - t0
        return out


def _wrap_seed_run(run: Callable, state: CompileState, options: dict) -> Callable:
    """A ``SeedModel.run`` whose function receives the compiled denoiser.  The denoiser is a new
    closure per run but one code object, so the compiled graph is reused across runs."""

    def compiled_run(sigmas, cfg, fn, *args, **kwargs):
        return run(sigmas, cfg, lambda den: fn(_Compiled(den, state, options)), *args, **kwargs)

    return compiled_run


@contextlib.contextmanager
def compiled_step(target, mode: str, note: Callable[[str], None] = _stderr_note) -> Iterator[CompileState]:
    """While open, ``target``'s denoiser is compiled as ``mode`` asks: a ``Host``'s ``denoise``, or
    the denoiser a ``SeedModel``'s ``run`` hands to its function.  The target is restored on exit
    (its class's method, not a copy, is what remains).  Yields the run's ``CompileState``."""
    state = CompileState(requested=check_mode(mode), active=mode, note=note)
    attr = "denoise" if hasattr(target, "denoise") else "run"
    if mode == "off":
        yield state
        return
    device = torch.device(getattr(target, "device", "cpu"))
    why = _unavailable(mode, device)
    if why:
        state.fall_back(why)
        yield state
        return
    options = _compile_options(state, device)
    had_own = attr in vars(target)
    original = getattr(target, attr)
    wrapped = (_Compiled(original, state, options) if attr == "denoise"
               else _wrap_seed_run(original, state, options))
    setattr(target, attr, wrapped)
    try:
        yield state
    finally:
        if had_own:
            setattr(target, attr, original)
        else:
            delattr(target, attr)


@contextlib.contextmanager
def eager(target) -> Iterator[None]:
    """While open, a compiled ``target.denoise`` runs its eager original: the memory preflight
    measures the step op by op (compiled kernels hide their allocations from it) and its probe
    sizes must neither compile nor count as the run's warm-up."""
    step = vars(target).get("denoise")
    if not isinstance(step, _Compiled):
        yield
        return
    step.paused = True
    try:
        yield
    finally:
        step.paused = False


__all__ = ["MODES", "CompileState", "check_mode", "compiled_step", "eager"]
