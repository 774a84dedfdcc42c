"""The running WebUI, as the run manager needs it (``runs.WebUIContext``): imported only inside a
WebUI process (``modules.shared`` is the WebUI's own).

Forge keeps the model as ``shared.sd_model.forge_objects``: runs train through the Forge host.
AUTOMATIC1111 keeps one hijacked LDM model (``shared.sd_model``): runs train through the A1111 host
(SD1.x; another family stops at once with a message saying where to train it).
"""
from __future__ import annotations

from pathlib import Path

from .runs import WebUIContext


def is_forge() -> bool:
    try:
        import backend.loader  # noqa: F401  (Forge's backend; AUTOMATIC1111 has none)
    except ImportError:
        return False
    return True


def _model():
    from modules import sd_models

    # Forge loads the selected checkpoint when a generation first needs it; so does a run
    model, _ = sd_models.forge_model_reload()
    if model is None or not hasattr(model, "forge_objects"):
        raise ValueError("No Stable Diffusion checkpoint is loaded: pick one in the checkpoint list at the top "
                         "of the page, then start again.")
    return model


def _a1111_model():
    from modules import shared

    model = shared.sd_model  # A1111 loads the selected checkpoint on first access
    if model is None or not hasattr(model, "cond_stage_model"):
        raise ValueError("No Stable Diffusion checkpoint is loaded: pick one in the checkpoint list at the top "
                         "of the page, then start again.")
    return model


def _make_host():
    if not is_forge():
        from ..hosts.webui.a1111 import A1111Host

        return A1111Host(_a1111_model())
    from ..hosts.webui.forge import ForgeHost

    return ForgeHost(_model())


def _text_engines(model) -> list:
    return [e for e in (getattr(model, a, None) for a in ("text_processing_engine", "text_processing_engine_l",
                                                           "text_processing_engine_g")) if e is not None]


def refresh(kind: str) -> None:
    """The WebUI's lists after a new file: the loaded model's embedding databases and the Textual
    Inversion page (as Forge's own API does after it writes an embedding; A1111's page reads its one
    database), or the LoRA list (the built-in LoRA extension's, in both)."""
    from modules import shared

    if kind == "seed":
        return  # the txt2img section lists the folder when its Refresh is pressed
    if kind == "embedding" and not is_forge():  # A1111: one database, on the hijack
        from modules import sd_hijack

        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    elif kind == "embedding":
        for engine in _text_engines(shared.sd_model):
            engine.embeddings.load_textual_inversion_embeddings()
        import modules.ui_extra_networks_textual_inversion as ti_page

        ti_page.embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
    else:
        import networks  # the built-in LoRA extension's module (on sys.path in the WebUI)

        networks.list_available_networks()


def seeds_dir() -> Path:
    """Where SeedSelect's seeds go and the txt2img section reads them: ``models/likeness_seeds``
    (the folder ComfyUI's nodes use, below the WebUI's own models folder)."""
    from modules import paths

    return Path(paths.models_path) / "likeness_seeds"


def context() -> WebUIContext:
    from modules import call_queue, shared

    return WebUIContext(make_host=_make_host, embeddings_dir=lambda: Path(shared.cmd_opts.embeddings_dir),
                        lora_dir=lambda: Path(shared.cmd_opts.lora_dir), seeds_dir=seeds_dir, refresh=refresh,
                        lock=call_queue.queue_lock, webui="Forge" if is_forge() else "AUTOMATIC1111")


__all__ = ["context", "refresh", "is_forge", "seeds_dir"]
