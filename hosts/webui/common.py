"""What both WebUI hosts need to train through a loaded model they must not change.

The WebUIs load checkpoints under ``torch.inference_mode()`` (Forge's ``sd_models.load_model``),
so the weights are inference tensors that autograd refuses to save for backward, and their
``requires_grad`` is whatever the loader left (often true).  Rather than touching them, a host
runs every forward that needs gradients inside ``substituted_weights``: for the duration of the
block, each weight and bias of the Linear / Conv / norm layers is replaced in its module's
parameter table by an ordinary tensor (a detached view, or a copy when it is an inference tensor)
passed through the trainer's patch function, and the original ``Parameter`` objects are put back
in ``finally``.  Nothing is written into a stored tensor, so the WebUI's model stays bit-identical
and no gradient ever lands on it.

LoRA trains as a branch on a layer's activations (``seam.Tunable.module_branches``): forward
hooks, removed in ``finally``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

#: the layer kinds whose weights a fine-tune may patch, by class name: the WebUIs replace torch's
#: layers by their own classes of the same names (Forge's ``ForgeOperations.Linear`` is a plain
#: ``Module``), so a name test finds both
TUNABLE_KINDS = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")


def tunable_modules(root: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Module]:
    """``{module path: module}`` of ``root``'s patchable layers whose path starts with ``prefix``."""
    out = {}
    for name, m in root.named_modules():
        if name.startswith(prefix) and type(m).__name__ in TUNABLE_KINDS:
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                out[name] = m
    return out


def tunable_tensors(root: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"<path>.weight" / "<path>.bias": detached tensor}`` of ``tunable_modules``."""
    out = {}
    for name, m in tunable_modules(root, prefix).items():
        for pname in ("weight", "bias"):
            t = m._parameters.get(pname)
            if isinstance(t, torch.Tensor):
                out[f"{name}.{pname}"] = t.detach()
    return out


def ordinary(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor autograd may save: a detached view, or a copy of an inference tensor."""
    t = t.detach()
    return t.clone() if t.is_inference() else t


@contextlib.contextmanager
def substituted_weights(root: torch.nn.Module, fns: dict[str, Callable] | None = None) -> Iterator[None]:
    """While active, every parameter of ``root`` reads an ordinary tensor ``w`` (a detached view or
    a copy of the stored one: embedding tables too, autograd would otherwise save them), and a
    tunable weight/bias ``name`` reads ``fns[name](w)``; the stored ``Parameter`` objects are
    restored in ``finally``."""
    fns = dict(fns or {})
    saved: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    try:
        with torch.inference_mode(False):
            for path, m in root.named_modules(remove_duplicate=False):
                for pname, t in list(m._parameters.items()):
                    if not isinstance(t, torch.Tensor):
                        continue
                    new = ordinary(t)
                    fn = fns.pop(f"{path}.{pname}" if path else pname, None)
                    saved.append((m, pname, t))
                    m._parameters[pname] = fn(new) if fn is not None else new
        if fns:
            raise ValueError(f"cannot patch {sorted(fns)[:3]}: not a weight or bias of this model's layers")
        yield
    finally:
        for m, pname, t in reversed(saved):
            m._parameters[pname] = t


@contextlib.contextmanager
def activation_branches(root: torch.nn.Module, fns: dict[str, Callable]) -> Iterator[None]:
    """While active, the layer owning weight ``name`` returns ``fns[name](x, y)`` for input ``x``
    and output ``y``; the hooks are removed in ``finally``."""
    layers = tunable_modules(root)
    handles = []
    try:
        for name, fn in fns.items():
            path, _, leaf = name.rpartition(".")
            if leaf != "weight" or path not in layers:
                raise ValueError(f"cannot branch {name!r}: not the weight of a layer of this model")
            handles.append(layers[path].register_forward_hook(
                lambda mod, args, y, _fn=fn: _fn(args[0], y)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def block_input_copies(root: torch.nn.Module, block_kind: str) -> Iterator[None]:
    """While active, a tensor autograd saves inside a ``block_kind`` module (by class name) is saved
    as a copy when it shares storage with that block's input - the tensor such a block goes on to
    modify in place; everything else is saved as usual (no copy of attention maps or weights)."""
    running: list[int] = []  # storage address of each running block's input, innermost last

    def enter(module, args):
        running.append(args[0].untyped_storage().data_ptr() if args and torch.is_tensor(args[0]) else -1)

    def leave(module, args, output):
        running.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if running and t.untyped_storage().data_ptr() == running[-1] else t

    handles = []
    try:
        for m in root.modules():
            if type(m).__name__ == block_kind:
                handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in handles:
            h.remove()


def check_placeholder_tokens(name: str, token_ids: dict[str, list[int]]) -> None:
    """The WebUIs match an embedding by its name's tokens in the prompt: a name that is one token
    of an encoder's vocabulary would replace that word everywhere."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("The placeholder word is empty: pick a made-up word such as 'my_cat_lk'.")
    if any(ch.isspace() for ch in name):
        raise ValueError(f"The placeholder {name!r} contains whitespace; the WebUI names an embedding by its "
                         "file name, one word. Use '_' instead of spaces.")
    for key, ids in token_ids.items():
        if len(ids) == 1:
            raise ValueError(f"{name!r} is already a word of the {key} text encoder's vocabulary (token {ids[0]}); "
                             f"an embedding named so would replace that word in every prompt. Pick a made-up word "
                             f"such as '{name}_lk'.")


__all__ = ["TUNABLE_KINDS", "tunable_modules", "tunable_tensors", "ordinary", "substituted_weights",
           "activation_branches", "block_input_copies", "check_placeholder_tokens"]
