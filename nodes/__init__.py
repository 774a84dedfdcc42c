"""Likeness's ComfyUI nodes (V3 schema API).  Imported only inside ComfyUI, by the package's
``comfy_entrypoint``; one module per feature, each listing its node classes in ``NODES``, found
here by name so a new feature is one new module."""
from __future__ import annotations

import importlib
import pkgutil

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io


def node_list() -> list[type[io.ComfyNode]]:
    out: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        out.extend(getattr(module, "NODES", ()))
    return out


class LikenessExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()

    @override
    async def on_load(self) -> None:
        # The live chart's route (reload-safe history, which nodes chart) exists only in a server.
        from .progress import register_routes

        register_routes(node_list())


__all__ = ["LikenessExtension", "node_list"]
