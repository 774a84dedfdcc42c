"""Stable Diffusion WebUI (Forge, AUTOMATIC1111) entry point: the WebUI loads every ``.py`` file in an
extension's ``scripts/`` folder; this one registers the **Likeness** tab and the API routes
(``/likeness/v1/...``).  The repository root is the ``likeness`` package (ComfyUI imports the same
folder); it is imported here from this extension's own folder, so the tab runs the code it ships
with, whatever else is installed.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package():
    loaded = sys.modules.get("likeness")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("likeness", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["likeness"] = module
    spec.loader.exec_module(module)
    return module


_package()

from likeness.webui import api, app, runs, seed_noise, tab  # noqa: E402  (after the package is importable)
from modules import script_callbacks, scripts  # noqa: E402  (the WebUI's own modules)

_MANAGER = []


def manager() -> runs.RunManager:
    """One run manager per WebUI process, shared by the tab and the API route."""
    if not _MANAGER:
        _MANAGER.append(runs.RunManager(app.context()))
    return _MANAGER[0]


script_callbacks.on_ui_tabs(lambda: tab.build(manager()), name="likeness")
script_callbacks.on_app_started(lambda _blocks, fastapi_app: api.register_routes(fastapi_app, manager()),
                                name="likeness")


class LikenessSeed(scripts.Script):
    """The **Likeness seed** section of txt2img: generate from a seed SeedSelect saved."""

    def title(self):
        return "Likeness seed"

    def show(self, is_img2img):
        return False if is_img2img else scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        folder = app.seeds_dir()
        with gr.Accordion("Likeness seed", open=False):
            name = gr.Dropdown(seed_noise.choices(folder), value=seed_noise.NONE, label="Seed from SeedSelect "
                               "(replaces the seed number; same size, prompt and CFG as it was made for)")
            refresh = gr.Button("Refresh list")
        refresh.click(lambda: gr.update(choices=seed_noise.choices(app.seeds_dir())), outputs=[name])
        return [name]

    def process_batch(self, p, name=seed_noise.NONE, **kwargs):
        seed_noise.apply(p, name, app.seeds_dir())
