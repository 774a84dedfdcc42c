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

from . import run_state
from .precision import autocast_for


class Method(Protocol):
    def parameters(self) -> Iterable[torch.Tensor]: ...

    def loss(self, step: int) -> torch.Tensor: ...

    # Optional hooks, called when the method has them:
    # ``param_groups()`` -> [{"params": [...], "lr": float, "until": int | None}, ...] for per-group
    #   learning rates; a group with ``until`` stops learning after that step (pivotal tuning trains
    #   the new word's vectors for the first part of the run only).
    # ``observe(step, loss)``: every finite loss, before backward, with the parameters that gave it
    #   (SeedSelect keeps its best iterate here).
    # ``should_stop(step, loss)`` -> bool: after ``observe``; True ends the run at this step, before
    #   its update (SeedSelect's target loss).
    # ``after_step(step)``: after the optimizer changed the parameters (SeedSelect projects its
    #   noise back onto the Gaussian shell).
    # ``state_ok()`` -> bool: whether the parameters still give a finite result (finite vectors can
    #   overflow a text encoder).  The next step's forward proves an update's parameters for free
    #   (a finite loss: they become the last good ones; a non-finite one: back to the last good), so
    #   ``state_ok`` is only asked for parameters about to be saved that no forward has proven yet:
    #   once per save, not once per step (with the snapshot on).
    # ``extra_state()`` / ``load_extra_state(tensors, json)``: state of the method's own to keep
    #   in a run state beside the generators (``trainers/run_state.py``).


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
    #: "adamw", or "adafactor" (factored second moment, no momentum: optimizer state of a few
    #: vectors per weight instead of two full copies; for full fine-tuning on small cards)
    optimizer: str = "adamw"
    #: clip the global gradient norm to this (0: off)
    max_grad_norm: float = 0.0
    #: keep a copy of the last finite parameters to restore after a non-finite step.  Off for
    #: full fine-tuning (a second copy of the model); then a step is only taken when the loss and
    #: every gradient are finite, which is checked before the optimizer touches anything.
    snapshot: bool = True
    #: multiplier of every group's learning rate at a step (after warm-up); None: 1
    lr_factor: Callable[[int], float] | None = None
    #: run ``method.loss`` under the host's autocast (off when the method casts per call itself)
    autocast: bool = True
    #: write the run's state (``trainers/run_state.py``) with every save, and resume from
    #: ``state.path`` when set; None: no states (a SeedSelect without a folder, tests of the loop alone)
    state: "run_state.StateSpec | None" = None
    #: call ``run``'s ``evaluate(step)`` every N steps and at the last step (0: never); its wall
    #: time is kept apart in ``LoopResult.eval_seconds`` (trainers/best_step.py)
    eval_every: int = 0


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    skipped_steps: int = 0
    cancelled: bool = False
    stopped_early: bool = False
    seconds: float = 0.0
    #: the step a resumed run continued after (0: a fresh run)
    resumed_from: int = 0
    #: the step of the last result ``save`` that completed, and the last state file written
    saved_step: int = 0
    state_path: "run_state.Path | None" = None
    #: of ``seconds``, the time ``evaluate`` took (sampling and scoring, not training)
    eval_seconds: float = 0.0


#: progress(step, total, loss or None, preview image [H, W, 3] or None)
ProgressFn = Callable[[int, int, "float | None", "torch.Tensor | None"], None]


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    # one reduction and one host sync for all gradients, not one per tensor
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) with an absolute learning rate, no first moment and update
    clipping at RMS 1: the second moment of a matrix is kept as a row and a column average
    (``[out] + [in]`` numbers instead of ``[out, in]``), so a full fine-tune's optimizer state is
    ~0 instead of AdamW's two fp32 copies of the model.  Unlike ``torch.optim.Adafactor`` the step
    is not relative to the parameter's RMS: we train weight *deltas* that start at zero."""

    def __init__(self, params, lr: float, beta2: float = 0.999, eps: float = 1e-30,
                 clip: float = 1.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta2=beta2, eps=eps, clip=clip, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        g, state = p.grad.float(), self.state[p]
        state["step"] = state.get("step", 0) + 1
        b2 = group["beta2"]
        correction = 1 - b2 ** state["step"]
        g2 = g * g + group["eps"]
        if g.ndim >= 2:
            g2m = g2.reshape(g.shape[0], -1)
            row = state.setdefault("row", torch.zeros(g2m.shape[0], device=g.device))
            col = state.setdefault("col", torch.zeros(g2m.shape[1], device=g.device))
            row.lerp_(g2m.mean(1), 1 - b2)
            col.lerp_(g2m.mean(0), 1 - b2)
            # (row / mean(row)) first: row * col of two tiny numbers would underflow fp32 to 0
            v = ((row / row.mean().clamp_min(1e-38))[:, None] * col[None, :]).reshape(g.shape)
        else:
            v = state.setdefault("v", torch.zeros_like(g))
            v.lerp_(g2, 1 - b2)
        u = g / (v / correction).sqrt()
        u.div_((u.pow(2).mean().sqrt() / group["clip"]).clamp_min(1.0))
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(u, alpha=-group["lr"])


def _param_groups(method, cfg: "LoopConfig") -> list[dict]:
    if hasattr(method, "param_groups"):
        groups = [dict(g) for g in method.param_groups()]
    else:
        groups = [{"params": list(method.parameters()), "lr": cfg.learning_rate}]
    for g in groups:
        g["params"] = list(g["params"])
        g["base_lr"] = g.get("lr", cfg.learning_rate)
        g.setdefault("until", None)
    return [g for g in groups if g["params"]]


#: the optimizers ``LoopConfig.optimizer`` names (the CLI and the nodes offer these)
OPTIMIZERS = ("adamw", "adafactor")


def _make_optimizer(groups: list[dict], cfg: "LoopConfig") -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        return Adafactor(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'adafactor', not {cfg.optimizer!r}")


def _set_lrs(opt: torch.optim.Optimizer, cfg: "LoopConfig", step: int) -> None:
    warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_factor is not None:
        warm *= cfg.lr_factor(step)
    for g in opt.param_groups:
        active = g["until"] is None or step <= g["until"]
        g["lr"] = g["base_lr"] * warm if active else 0.0


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


class _Run:
    """One run of the loop: the optimizer, the fp16 loss scaler, the snapshot and the counters.

    fp16 compute uses a GradScaler so small gradients survive; bf16 needs none.  A step whose loss
    or gradients are not finite is skipped (parameters and optimizer state untouched) and counted."""

    def __init__(self, method: Method, cfg: LoopConfig, device: torch.device, compute_dtype: torch.dtype):
        groups = _param_groups(method, cfg)
        self.params = [p for g in groups for p in g["params"]]
        if any(p.dtype != torch.float32 for p in self.params):
            raise TypeError("trainable tensors must be fp32 (optimizer state follows their dtype)")
        self.method, self.cfg, self.device, self.compute_dtype = method, cfg, device, compute_dtype
        self.opt = _make_optimizer(groups, cfg)
        # fp16 on the CPU too (a CPU host loaded in fp16): its gradients underflow the same way
        use_scaler = device.type in ("cuda", "cpu") and compute_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.snap = _Snapshot(self.params) if cfg.snapshot else None
        self.result = LoopResult()
        self.bad_run = 0
        self.last_good = 0  # the step whose parameters the snapshot holds
        # a method with ``state_ok``: the step whose update no forward has proven yet (0: none)
        self.pending = 0
        # for the run state: every step's loss (NaN: skipped), the generators as the last finished
        # step left them (a stop can land mid-step, after some draws), and whether the step under
        # way has begun to change the method or the optimizer (from ``observe`` until it is booked:
        # a stop then finds a state that is neither the last step's nor this one's, and none is saved)
        self.history: list[float] = []
        self.rngs_end = run_state.rng_states(method)
        #: ``run``'s ``evaluate``; with ``state()`` / ``load_state(tensors, json)`` (best step) its
        #: tracking is kept in the run state too, so a resumed run goes on from it
        self.evaluator = None
        self.dirty = False
        self.state_step = 0

    def _hook(self, name: str, *args):
        fn = getattr(self.method, name, None)
        return fn(*args) if fn is not None else None

    def _loss(self, step: int) -> torch.Tensor:
        _set_lrs(self.opt, self.cfg, step)
        self.opt.zero_grad(set_to_none=True)
        ctx = autocast_for(self.device, self.compute_dtype) if self.cfg.autocast else contextlib.nullcontext()
        with ctx:
            return self.method.loss(step)

    def _backward(self, loss: torch.Tensor) -> bool:
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        ok = _grads_finite(self.params)
        if ok and self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        return ok

    def _update(self) -> bool:
        self.dirty = True
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.snap is None:
            return True
        # finite parameters can still give a non-finite result (vectors so large the text encoder
        # overflows): that is proven by the next forward (``_proven``) or before a save (``confirm``)
        ok = all(bool(torch.isfinite(p).all()) for p in self.params)
        if not ok:
            self.snap.restore()
        return ok

    def _proven(self, finite: bool) -> None:
        """This step's forward ran with the last update's parameters: a finite loss makes them the
        last good ones, a non-finite one puts the last good ones back."""
        if not self.pending:
            return
        if finite:
            self.snap.take()
            self.last_good = self.pending
        else:
            self.dirty = True  # the parameters change before this step is booked
            self.snap.restore()
        self.pending = 0

    def confirm(self) -> int:
        """Before a save: parameters no forward has proven yet are checked by the method's
        ``state_ok``; returns the step whose parameters the run now holds (what a save is labelled)."""
        if self.pending:
            if self._hook("state_ok") is not False:
                self.snap.take()
                self.last_good = self.pending
            else:
                self.snap.restore()
                self.result.skipped_steps += 1
            self.pending = 0
        return self.last_good

    def step(self, step: int) -> tuple[float, bool, bool]:
        """One optimisation step: (loss value, whether it counted, whether the run should stop)."""
        loss = self._loss(step)
        value = float(loss.detach())
        ok = math.isfinite(value)
        self._proven(ok)
        if ok:
            self.dirty = True
            self._hook("observe", step, value)
            if self._hook("should_stop", step, value):
                self._good(step, value)
                return value, True, True
            ok = self._backward(loss) and self._update()
        if ok:
            self._hook("after_step", step)
            self._good(step, value)
        else:
            self._bad()
        return value, ok, False

    def finished(self, step: int, value: float, ok: bool) -> None:
        """Book-keeping after a step, whatever it gave: the history and the generators' states."""
        self.result.steps_done = step
        self.history.append(value if ok else math.nan)
        self.rngs_end = run_state.rng_states(self.method)
        self.dirty = False

    def write_state(self, step: int) -> None:
        spec = self.cfg.state
        if spec is None or spec.keep < 1 or step <= self.state_step or self.dirty:
            return
        counters = {"last_good": self.last_good, "bad_run": self.bad_run, "skipped": self.result.skipped_steps}
        extra = _with_evaluation(self._hook("extra_state"), self.evaluator)
        self.result.state_path = run_state.write(
            spec, step, params=self.params, opt=self.opt, rngs=self.rngs_end, history=self.history,
            counters=counters, scaler=self.scaler, extra=extra)
        self.state_step = step

    def resume(self, path) -> int:
        """Continue from a state file: parameters, optimizer, generators, history, counters."""
        got = run_state.restore(path, params=self.params, opt=self.opt, method=self.method, scaler=self.scaler)
        own, evaluation = _without_evaluation(got.extra)
        if hasattr(self.method, "load_extra_state"):
            self.method.load_extra_state(*own)
        if evaluation is not None and hasattr(self.evaluator, "load_state"):
            self.evaluator.load_state(*evaluation)
        if self.snap is not None:
            self.snap.take()
        self.pending = 0
        self.history = list(got.history)
        self.rngs_end = run_state.rng_states(self.method)
        self.last_good, self.bad_run = got.counters["last_good"], got.counters["bad_run"]
        self.result.skipped_steps = got.counters["skipped"]
        self.result.losses = run_state.finite_losses(self.history)
        self.result.steps_done = self.result.resumed_from = self.state_step = got.step
        return got.step

    def _good(self, step: int, value: float) -> None:
        if self.snap is not None and hasattr(self.method, "state_ok"):
            self.pending = step  # proven by the next forward, or by ``confirm`` before a save
        else:
            if self.snap is not None:
                self.snap.take()
            self.last_good = step
        self.bad_run = 0
        self.result.losses.append(value)

    def _bad(self) -> None:
        if self.scaler:  # lower the scale so the next fp16 step can succeed
            self.scaler.update(self.scaler.get_scale() / 2)
        self.result.skipped_steps += 1
        self.bad_run += 1
        if self.bad_run >= self.cfg.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_run} steps in a row gave a non-finite loss or gradient; the last good "
                f"result (step {self.last_good}) was kept. Lower the learning rate, or use "
                f"bf16/fp32 instead of fp16.")


def run(
    method: Method,
    cfg: LoopConfig,
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    save: Callable[[int], None],
    progress: ProgressFn | None = None,
    preview: Callable[[int], torch.Tensor] | None = None,
    evaluate: Callable[[int], object] | None = None,
) -> LoopResult:
    """Optimise ``method.parameters()`` for ``cfg.steps`` steps (AdamW or Adafactor, state in fp32);
    ``save(step)`` every ``save_every`` steps, at the end and on Cancel (the last good state), each
    time with the run's state beside it (``cfg.state``), from which a later run can resume;
    ``evaluate(step)`` every ``eval_every`` steps and at the last one (best step)."""
    with run_state.owned(cfg.state):  # a second run of the same name refuses while this one lives
        return _run(method, cfg, device, compute_dtype, save, progress, preview, evaluate)


#: where an evaluator's state goes inside a run state's ``extra`` (tensors ``eval.<key>``)
_EVAL = "eval"


def _with_evaluation(extra, evaluator):
    """The method's ``extra`` state with the evaluator's (``state()``) beside it, under ``_EVAL``."""
    if not hasattr(evaluator, "state"):
        return extra
    tensors, head = extra if extra is not None else ({}, {})
    ev_tensors, ev_head = evaluator.state()
    return {**tensors, **{f"{_EVAL}.{k}": v for k, v in ev_tensors.items()}}, {**head, _EVAL: ev_head}


def _without_evaluation(extra):
    """``extra`` split into the method's own part and the evaluator's (None when it has none)."""
    tensors, head = extra
    prefix = _EVAL + "."
    own = ({k: v for k, v in tensors.items() if not k.startswith(prefix)}, {k: v for k, v in head.items() if k != _EVAL})
    if _EVAL not in head:
        return own, None
    return own, ({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, head[_EVAL])


def _run(method, cfg: LoopConfig, device, compute_dtype, save, progress, preview, evaluate) -> LoopResult:
    r = _Run(method, cfg, device, compute_dtype)
    r.evaluator = evaluate
    t0 = time.perf_counter()
    start = 1
    if cfg.state is not None and cfg.state.path is not None:
        start = r.resume(cfg.state.path) + 1

    def report(step: int, loss: float | None) -> None:
        if progress is None:
            return
        wanted = preview is not None and cfg.preview_every
        img = preview(step) if wanted and (step % cfg.preview_every == 0 or step == cfg.steps) else None
        progress(step, cfg.steps, loss, img)

    try:
        if progress is not None:  # a resumed run's chart continues from the saved history
            for step, v in enumerate(r.history, 1):
                progress(step, cfg.steps, v if math.isfinite(v) else None, None)
        for step in range(start, cfg.steps + 1):
            value, ok, stop = r.step(step)
            r.finished(step, value, ok)
            saving = cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps and not stop
            if saving:
                good = r.confirm()  # labelled with the step whose values it holds
                save(good)
                r.result.saved_step = good
            if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps or stop):
                t_eval = time.perf_counter()
                evaluate(step)
                r.result.eval_seconds += time.perf_counter() - t_eval
            if saving:  # after this step's evaluation, so that the state holds it
                r.write_state(step)
            report(step, value if ok else None)
            if stop:
                r.result.stopped_early = True
                break
    except BaseException as exc:
        # Cancel, Ctrl-C, OOM or a bug: keep the last good state on disk, then let it propagate.
        _stopped(r, save)
        r.result.seconds = time.perf_counter() - t0
        with contextlib.suppress(AttributeError):  # what was saved, for whoever reports the stop
            exc.likeness_result = r.result
        raise
    good = r.confirm()
    save(good)
    r.result.saved_step = good
    r.write_state(r.result.steps_done)
    r.result.seconds = time.perf_counter() - t0
    return r.result


def _stopped(r: _Run, save: Callable[[int], None]) -> None:
    """A run that stops early keeps its last good result and its state; a failure to write the
    state (a full disk) does not hide why the run stopped."""
    r.result.cancelled = True
    if r.snap is not None:
        with contextlib.suppress(Exception):  # the last update's parameters, when no forward proved them
            r.confirm()
        r.snap.restore()
    if r.last_good > r.result.saved_step:
        save(r.last_good)
        r.result.saved_step = r.last_good
    with contextlib.suppress(Exception):
        r.write_state(r.result.steps_done)
