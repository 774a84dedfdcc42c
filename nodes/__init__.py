"""Likeness's ComfyUI nodes (V3 schema API).  Imported only inside ComfyUI, by the package's
``comfy_entrypoint``; one module per feature, each listing its node classes in ``NODES``."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import dreambooth, image_folder, seedselect, textual_inversion


def node_list() -> list[type[io.ComfyNode]]:
    return [*image_folder.NODES, *textual_inversion.NODES, *dreambooth.NODES, *seedselect.NODES]


class LikenessExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


__all__ = ["LikenessExtension", "node_list"]
