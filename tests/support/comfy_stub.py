"""A stand-in for the few ComfyUI modules Likeness's nodes import, so nodes/ is tested in CI.

``installed(base_dir)`` puts fake ``comfy_api.latest`` (``io``, ``ui``, ``ComfyExtension``),
``comfy.utils`` (``ProgressBar``), ``comfy.model_management``, ``comfy.samplers``,
``folder_paths`` (every folder under ``base_dir``) and ``server`` (``PromptServer.instance = None``)
into ``sys.modules`` - only when the real ComfyUI is absent from the process (not loaded: in CI
it is not even importable) - and takes them out again, together with every ``likeness`` module
imported meanwhile (those hold references to the fakes), so no test sees them unless it asks.
Where a test session has loaded the real ComfyUI (``tests/test_comfy_*.py`` set it up with its
arguments, CPU and folders), the real modules are used instead: importing them raw would start
ComfyUI's device setup.  Any other ``comfy.*`` module (what the ComfyUI host imports
for its type checks) is an empty module whose attributes are placeholder classes: enough to
import, never enough to run a model.

The fakes mirror the attribute names of ComfyUI's V3 API (``Input.id/.tooltip/.optional/
.default/.options``, ``Output.display_name/.tooltip``, ``io_type`` on both, ``Schema`` fields), so a
test written against them also runs against the real modules.
"""
from __future__ import annotations

import contextlib
import enum
import importlib.abc
import importlib.machinery
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

#: top-level names the stand-in provides
TOP_LEVEL = ("comfy", "comfy_api", "folder_paths", "server")
#: ComfyUI's V3 types the nodes use, by their io type
IO_TYPES = {
    "Boolean": "BOOLEAN", "Int": "INT", "Float": "FLOAT", "String": "STRING", "Combo": "COMBO",
    "Image": "IMAGE", "Latent": "LATENT", "Conditioning": "CONDITIONING", "Model": "MODEL", "Clip": "CLIP",
    "Vae": "VAE", "ClipVision": "CLIP_VISION", "Noise": "NOISE", "Sigmas": "SIGMAS", "LossMap": "LOSS_MAP",
}
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "vae", "clip_vision")


def comfy_loaded() -> bool:
    """Whether this process has loaded the real ComfyUI (then the stand-in is never installed)."""
    return any(name in sys.modules for name in ("comfy", "comfy_api", "folder_paths"))


# ---- comfy_api.latest ------------------------------------------------------------------------


class _Input:
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 default: Any = None, options: list | None = None, advanced: bool | None = None, **extra):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.default, self.options, self.advanced, self.extra = default, options, advanced, extra


class _Output:
    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 **extra):
        self.id, self.display_name, self.tooltip, self.extra = id, display_name or id, tooltip, extra


def _comfy_type(name: str, io_type: str) -> type:
    """``io.<name>`` with ``Input``/``Output`` classes carrying ``io_type``, as ComfyUI's are."""
    inp = type("Input", (_Input,), {"io_type": io_type})
    out = type("Output", (_Output,), {"io_type": io_type})
    return type(name, (), {"io_type": io_type, "Input": inp, "Output": out})


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_output_node: bool = False


class NodeOutput:
    def __init__(self, *args, ui=None, **kw):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    hidden = None  # ComfyUI sets a holder with ``unique_id`` on the class clone it executes


class ComfyExtension:
    async def get_node_list(self) -> list:
        return []


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"


class ControlAfterGenerate(str, enum.Enum):
    fixed = "fixed"
    increment = "increment"
    decrement = "decrement"
    randomize = "randomize"


class PreviewText:
    def __init__(self, value: str, **kw):
        self.value = value

    def as_dict(self) -> dict:
        return {"text": (self.value,)}


class PreviewImage:
    """Writes nothing (ComfyUI's saves into its temp folder); keeps the batch's shape."""

    def __init__(self, image, cls=None, **kw):
        self.shape = tuple(image.shape)

    def as_dict(self) -> dict:
        return {"images": [{"shape": self.shape}], "animated": (False,)}


def _latest() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in IO_TYPES.items():
        setattr(io, name, _comfy_type(name, io_type))
    for obj in (Schema, NodeOutput, ComfyNode, Hidden, ControlAfterGenerate):
        setattr(io, obj.__name__, obj)
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewText, ui.PreviewImage = PreviewText, PreviewImage
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, ui, ComfyExtension
    return latest, io, ui


# ---- comfy.* ---------------------------------------------------------------------------------


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.node_id, self.updates = total, node_id, []

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total, preview))


class InterruptProcessingException(Exception):
    pass


class _Placeholders(types.ModuleType):
    """A ``comfy.*`` module the nodes do not call: every attribute is a class of that name."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _ComfyFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes any ``comfy.<name>`` not given explicitly a ``_Placeholders`` module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("comfy.") and fullname.count(".") == 1:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _Placeholders(spec.name)

    def exec_module(self, module):
        sys.modules["comfy"].__dict__[module.__name__.split(".")[1]] = module


def _comfy() -> list[types.ModuleType]:
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so ``import comfy.x`` goes to the finder
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupted = False

    def throw_exception_if_processing_interrupted():
        if mm.interrupted:
            mm.interrupted = False
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    samplers = _Placeholders("comfy.samplers")

    def calculate_sigmas(model_sampling, scheduler, steps):
        raise NotImplementedError("the ComfyUI stand-in has no model sampling")

    samplers.calculate_sigmas = calculate_sigmas
    comfy.utils, comfy.model_management, comfy.samplers = utils, mm, samplers
    return [comfy, utils, mm, samplers]


# ---- folder_paths, server --------------------------------------------------------------------


def _folder_paths(base_dir: str) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.base_path = base_dir
    fp.models_dir = os.path.join(base_dir, "models")
    fp.input_directory = os.path.join(base_dir, "input")
    fp.folder_names_and_paths = {k: ([os.path.join(fp.models_dir, k)], {".safetensors"}) for k in MODEL_FOLDERS}

    def get_folder_paths(folder_name: str) -> list[str]:
        return fp.folder_names_and_paths[folder_name][0][:]

    def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
        paths, exts = fp.folder_names_and_paths.setdefault(folder_name, ([], set()))
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    def get_input_directory() -> str:
        return fp.input_directory

    fp.get_folder_paths, fp.add_model_folder_path = get_folder_paths, add_model_folder_path
    fp.get_input_directory = get_input_directory
    return fp


def _server() -> types.ModuleType:
    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": None})
    return server


# ---- install / remove ------------------------------------------------------------------------


def _is_stubbed(name: str) -> bool:
    return name.split(".")[0] in TOP_LEVEL


def _forget(name: str) -> None:
    """Drop a module and its parent package's attribute for it (else ``from pkg import name``
    would still find the old module)."""
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if parent in sys.modules and getattr(sys.modules[parent], child, None) is not None:
        with contextlib.suppress(AttributeError):
            delattr(sys.modules[parent], child)


@contextlib.contextmanager
def installed(base_dir: str):
    """The stand-in in ``sys.modules`` for the duration (a no-op when ComfyUI is loaded): yields
    True when it was installed."""
    if comfy_loaded():
        yield False
        return
    before, other_server = set(sys.modules), sys.modules.get("server")
    latest, io, ui = _latest()
    api = types.ModuleType("comfy_api")
    api.__path__, api.latest = [], latest
    fakes = [api, latest, io, ui, *_comfy(), _folder_paths(str(base_dir)), _server()]
    finder = _ComfyFinder()
    sys.modules.update({m.__name__: m for m in fakes})
    sys.meta_path.insert(0, finder)
    try:
        yield True
    finally:
        sys.meta_path.remove(finder)
        for name in sorted(set(sys.modules) - before, key=len, reverse=True):
            if _is_stubbed(name) or name.split(".")[0] == "likeness":
                _forget(name)
        if other_server is not None:  # a module of that name that is not ComfyUI's comes back
            sys.modules["server"] = other_server


__all__ = ["installed", "comfy_loaded", "ProgressBar", "InterruptProcessingException", "IO_TYPES"]
