"""Run state: everything a run needs to continue exactly where it stopped, written beside its result.

With every periodic save, at the end, and when a run stops (Cancel, Ctrl-C, SIGTERM, a non-finite
stop) the loop writes ``<name>.step<NNNNNNNN>.likeness-state`` next to the result file: one
safetensors file (never a pickle) holding

* the trained tensors in fp32 and the optimizer's state tensors,
* every random generator of the method (``torch.Generator`` states as bytes; ``random.Random``
  states in the JSON header): noise, timesteps, templates, flips, crops and data order,
* the step, the loss of every step (NaN for a skipped one), the loop's counters, the fp16 loss
  scaler, and a *fingerprint* of what must not change between the stopped run and its resume
  (method, model, images, resolution, vectors/rank/targets, precision, ...).

The file is written to a temp file and renamed, so a kill leaves the previous state whole; only
the ``keep`` most recent states of a name are kept, so a long run does not fill the disk.  The
``.likeness-state`` extension keeps the files out of every UI's embedding/LoRA/checkpoint lists.

Resuming restores all of it, so the continued run takes the very steps the uninterrupted run would
have taken: bit-identical on the CPU.  A state whose fingerprint differs is refused with the names
of what differs; only the step count (train longer) and the output options may change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import safetensors
import torch
from safetensors.torch import save as st_save

from .formats import files

SUFFIX = ".likeness-state"
FORMAT = "likeness.run-state/1"
#: how many states of a name are kept by default
KEEP = 2
#: what ``resume`` takes besides a state's file name or path
RESUME_CHOICES = ("off", "latest")
_HEADER = "likeness.state"


class ResumeError(ValueError):
    """A resume that cannot continue this run; the message names the file and what differs."""


@dataclass
class StateSpec:
    """Where a run's states go, what must match to resume one, and whether to resume."""

    folder: Path
    name: str
    fingerprint: dict[str, str]
    keep: int = KEEP
    #: "off", "latest", or a state's file name (in ``folder``) or path
    resume: str = "off"
    #: the state file to resume from, once ``check_resume`` found it
    path: Path | None = field(default=None, repr=False)
    #: steps of the method's earlier loop runs: a method that runs the loop several times
    #: (SeedSelect's main run, then its bootstrap runs) numbers its states on across them
    offset: int = 0


# ------------------------------------------------------------------------------------------
# fingerprints: what a resumed run must share with the run that stopped


def digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()[:16]


def images_digest(images, captions=None) -> str:
    """A digest of the pixels (and captions) of the training images, in their order."""
    def chunks():
        for im in images:
            yield im.detach().float().cpu().contiguous().numpy().tobytes()
        for c in captions or ():
            yield (c if c is not None else "\0").encode()
    return digest(chunks())


def model_digest(host) -> str:
    """The model's identity: its name, family, prediction, content hash when known, and its text
    encoders' vectors for a fixed phrase (a table lookup, exact on every device)."""
    info = host.info
    vecs = host.token_embeddings("a photo of a dog, painting")
    parts = [f"{info.name}|{info.family}|{info.prediction}|{info.hash or ''}".encode()]
    parts += [k.encode() + v.detach().float().cpu().contiguous().numpy().tobytes() for k, v in sorted(vecs.items())]
    return digest(parts)


def fingerprint(method: str, cfg: Any, *, volatile: Iterable[str], **extra: Any) -> dict[str, str]:
    """Every field of a trainer's config except the ``volatile`` ones (steps, output options),
    plus ``extra`` (model, images, precision): a resume refuses when any of them differs."""
    out = {"method": method}
    skip = set(volatile)
    for f in dataclasses.fields(cfg):
        if f.name not in skip:
            out[f.name] = repr(getattr(cfg, f.name))
    out.update({k: str(v) for k, v in extra.items()})
    return out


# ------------------------------------------------------------------------------------------
# files


def state_path(folder: str | os.PathLike, name: str, step: int) -> Path:
    return files.safe_path(folder, f"{name}.step{step:08d}{SUFFIX}")


def list_states(folder: str | os.PathLike, name: str) -> list[Path]:
    """The states of ``name`` in ``folder``, oldest step first."""
    pattern = re.compile(rf"{re.escape(name)}\.step(\d{{8}}){re.escape(SUFFIX)}")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def read_header(path: Path) -> dict:
    """The JSON header of a state file (step, fingerprint, ...); ResumeError if it is not one."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as e:
        raise ResumeError(f"{path} is not a readable Likeness run state ({e})") from e
    if meta.get("format") != FORMAT or _HEADER not in meta:
        raise ResumeError(f"{path} is not a Likeness run state (written by another tool or version)")
    return json.loads(meta[_HEADER])


def _resolve(spec: StateSpec) -> Path | None:
    choice = (spec.resume or "off").strip()
    if choice == "off":
        return None
    if choice == "latest":
        states = list_states(spec.folder, spec.name)
        if not states:
            raise ResumeError(f"resume 'latest': no saved run state of {spec.name!r} in {spec.folder} "
                              f"(states are {spec.name}.stepNNNNNNNN{SUFFIX}); set resume to off to start anew")
        return states[-1]
    path = Path(choice)
    if not path.is_absolute() and not path.exists():
        path = Path(spec.folder) / path
    if not path.is_file():
        raise ResumeError(f"resume: {choice} is not a run state file (expected 'off', 'latest', or a "
                          f"{SUFFIX} file, e.g. {spec.name}.step00000100{SUFFIX} in {spec.folder})")
    return path


def check_resume(spec: StateSpec | None, steps: int, longer: str = "set steps above {step}") -> Path | None:
    """Find the state to resume from and refuse it, before any work, when it belongs to another
    run (naming what differs) or already reached ``steps`` (``longer`` says how to train on, in the
    method's own words).  Sets and returns ``spec.path``."""
    if spec is None:
        return None
    path = _resolve(spec)
    if path is None:
        return None
    head = read_header(path)
    saved = head.get("fingerprint", {})
    differ = sorted(k for k in set(saved) | set(spec.fingerprint) if saved.get(k) != spec.fingerprint.get(k))
    if differ:
        what = "; ".join(f"{k}: saved {saved.get(k, 'absent')}, now {spec.fingerprint.get(k, 'absent')}"
                         for k in differ[:6])
        raise ResumeError(f"{path.name} belongs to another run and would train something else ({what}); "
                          "resume with the same model, images and settings, or set resume to off")
    if head["step"] >= steps:
        raise ResumeError(f"{path.name} is already at step {head['step']}; {longer.format(step=head['step'])} "
                          "to train longer from it")
    spec.path = path
    return path


def _prune(spec: StateSpec, written: Path) -> None:
    """Keep the ``keep`` most recently written states of this name (the one just written always)."""
    states = [p for p in list_states(spec.folder, spec.name) if p != written]
    states.sort(key=lambda p: p.stat().st_mtime_ns)
    for p in states[:max(0, len(states) - (spec.keep - 1))]:
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# capture and restore


def method_rngs(method) -> dict[str, Any]:
    """The method's random generators by attribute name (``random.Random`` and
    ``torch.Generator``): every draw a method makes comes from one of them."""
    return {k: v for k, v in sorted(vars(method).items()) if isinstance(v, (random.Random, torch.Generator))}


def rng_states(method) -> dict[str, Any]:
    return {k: (g.get_state().clone() if isinstance(g, torch.Generator) else g.getstate())
            for k, g in method_rngs(method).items()}


def _optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, scalars


def write(spec: StateSpec, step: int, *, params: list[torch.Tensor], opt: torch.optim.Optimizer,
          rngs: dict[str, Any], history: list[float], counters: dict, scaler=None, extra=None) -> Path:
    """Write the state of ``step`` (of this loop run: the file counts on from ``spec.offset``)
    atomically beside the result and prune older ones."""
    tensors = {f"param.{i}": p.detach().float().cpu().contiguous() for i, p in enumerate(params)}
    opt_tensors, opt_scalars = _optimizer_parts(opt)
    tensors.update(opt_tensors)
    tensors["history"] = torch.tensor(history, dtype=torch.float64)
    py_rngs = {}
    for k, s in rngs.items():
        if torch.is_tensor(s):
            tensors[f"rng.{k}"] = s
        else:
            py_rngs[k] = [s[0], list(s[1]), s[2]]
    ex_tensors, ex_json = extra if extra is not None else ({}, {})
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in ex_tensors.items()})
    step += spec.offset
    head = {"step": step, "offset": spec.offset, "fingerprint": spec.fingerprint, "optimizer": opt_scalars,
            "random": py_rngs, "counters": counters, "scaler": scaler.state_dict() if scaler is not None else None,
            "extra": ex_json}
    data = st_save(tensors, metadata={"format": FORMAT, _HEADER: json.dumps(head)})
    path = files.atomic_write_bytes(state_path(spec.folder, spec.name, step), data)
    _prune(spec, path)
    return path


@dataclass
class Loaded:
    step: int
    history: list[float]
    counters: dict
    extra: tuple[dict[str, torch.Tensor], dict]


def restore(path: Path, *, params: list[torch.Tensor], opt: torch.optim.Optimizer, method,
            scaler=None) -> Loaded:
    """Put a state back into the parameters, the optimizer, the method's generators and the
    scaler; returns the step (of its loop run), the loss history and the loop's counters."""
    tensors, meta = files.read_safetensors(path, what="a run state")
    head = json.loads(meta[_HEADER])
    saved = [k for k in tensors if k.startswith("param.")]
    if len(saved) != len(params):
        raise ResumeError(f"{path.name} holds {len(saved)} trained tensors, this run trains {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            t = tensors[f"param.{i}"]
            if t.shape != p.shape:
                raise ResumeError(f"{path.name}: trained tensor {i} is {tuple(t.shape)}, this run's is {tuple(p.shape)}")
            p.copy_(t.to(p.device, p.dtype))
    sd = opt.state_dict()
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    for idx, kv in head["optimizer"].items():
        state.setdefault(int(idx), {}).update(kv)
    sd["state"] = state
    opt.load_state_dict(sd)
    for k, g in method_rngs(method).items():
        if isinstance(g, torch.Generator):
            g.set_state(tensors[f"rng.{k}"])
        else:
            v, s, gauss = head["random"][k]
            g.setstate((v, tuple(s), gauss))
    if scaler is not None and head.get("scaler"):
        scaler.load_state_dict(head["scaler"])
    history = [float(x) for x in tensors["history"].tolist()]
    return Loaded(head["step"] - head.get("offset", 0), history, head["counters"], _extra(tensors, head))


def _extra(tensors: dict[str, torch.Tensor], head: dict) -> tuple[dict[str, torch.Tensor], dict]:
    return {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}, head.get("extra") or {}


def read_extra(path: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """A state's step and the method's own part of it (``extra_state``), without a loop: what a
    method that runs the loop several times needs to know which of its runs to continue."""
    tensors, meta = files.read_safetensors(path, what="a run state")
    head = json.loads(meta[_HEADER])
    return (head["step"], *_extra(tensors, head))


def finite_losses(history: list[float]) -> list[float]:
    return [v for v in history if math.isfinite(v)]


__all__ = ["SUFFIX", "KEEP", "RESUME_CHOICES", "ResumeError", "StateSpec", "fingerprint", "images_digest",
           "model_digest", "state_path", "list_states", "read_header", "check_resume", "write", "restore",
           "rng_states", "method_rngs", "finite_losses", "read_extra"]


def spec_for(method: str, cfg: Any, host, images, *, name: str, folder, volatile: Iterable[str],
             **extra: Any) -> StateSpec:
    """A trainer's ``StateSpec`` from its config (``resume``, ``keep_states``, ``steps``): the
    fingerprint of the model, the images and the settings, and the state to resume, checked."""
    fp = fingerprint(method, cfg, volatile=(*volatile, "resume", "keep_states", "steps", "output_dir"),
                     model=model_digest(host), images=images_digest(images.images, images.captions),
                     precision=str(host.compute_dtype).replace("torch.", ""), **extra)
    spec = StateSpec(Path(folder), name, fp, keep=cfg.keep_states, resume=cfg.resume)
    check_resume(spec, cfg.steps)
    return spec


LOCK_SUFFIX = ".likeness-lock"
#: the locks this process holds now (``owned``)
_HELD: set[Path] = set()


def _holder(path: Path) -> int | None:
    """The pid of the live process of this machine that holds ``path``, or None (stale or unreadable)."""
    try:
        pid_text, host = path.read_text().split("\n")[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if host != _host() or pid == os.getpid():  # ours: an earlier run of this process that ended
        return None if host == _host() else pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return pid


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")


@contextlib.contextmanager
def owned(spec: StateSpec | None):
    """Own the name ``spec.name`` in ``spec.folder`` for the whole run: ``<name>.likeness-lock``
    beside the files, so a second run of the same name refuses instead of silently replacing the
    first one's files; a lock left by a process that died is taken over.  Re-entrant: a method
    that holds its name across several loop runs keeps it while each of them takes it again."""
    if spec is None:
        yield
        return
    path = files.safe_path(spec.folder, spec.name + LOCK_SUFFIX)
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = _holder(path)
            if pid is not None:
                raise FileExistsError(f"another run (process {pid}) is writing {spec.name!r} in {spec.folder}; "
                                      "wait for it to finish or choose another name") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise FileExistsError(f"could not take the lock {path}; remove it if no run of {spec.name!r} is going")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n{_host()}\n")
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        path.unlink(missing_ok=True)


def option_problems(keep_states: int, resume: str) -> list[str]:
    """The checks of the state options alone, with the other option checks before any loading."""
    p = []
    if keep_states < 0:
        p.append(f"keep states must be 0 (write none) or more, got {keep_states}")
    if not str(resume).strip():
        p.append("resume is empty: use 'off', 'latest' or a state file")
    return p
