"""Likeness: teach the model ComfyUI has loaded a new subject, style or seed.

ComfyUI imports this folder from ``custom_nodes/``; it calls ``comfy_entrypoint`` (V3 API) and
serves ``WEB_DIRECTORY``.  The package is also importable without ComfyUI (as ``likeness``, for the
CLI and the tests): nothing here touches ComfyUI until ``comfy_entrypoint`` runs.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # Imported lazily: nodes/ needs comfy_api, which exists only inside ComfyUI.
    from .nodes import LikenessExtension

    return LikenessExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
