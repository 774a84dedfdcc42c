"""The **Likeness** tab (gradio, as the WebUI builds its tabs): method, dataset folder, the inputs
that matter, Start / Cancel, a live loss chart and preview, and the result with how to use it.  It
talks to the same ``RunManager`` as the API route."""
from __future__ import annotations

import base64
import io

from ..trainers import data as D
from .runs import RunManager

METHODS = {"Textual Inversion": "ti", "DreamBooth LoRA": "lora", "DreamBooth LoRA + new word (pivotal)": "pivotal",
           "SeedSelect (a seed that draws the references' concept)": "seedselect"}
FIELDS = ("name", "images", "init_text", "instance_prompt", "token", "vectors", "steps", "learning_rate",
          "rank", "resolution", "seed", "preview_every", "overwrite", "prompt", "negative", "clip_vision",
          "sampling_steps", "cfg")
#: the fields each method reads (the others are dropped from its request)
USES = {"ti": {"init_text", "vectors", "preview_every"},
        "lora": {"instance_prompt", "rank", "preview_every"},
        "pivotal": {"instance_prompt", "token", "vectors", "rank", "preview_every"},
        "seedselect": {"prompt", "negative", "clip_vision", "sampling_steps", "cfg"}}
COMMON = {"name", "images", "steps", "learning_rate", "resolution", "seed", "overwrite"}


def dataset_summary(folder: str) -> str:
    """What the picker shows for a folder: images found, captions, or why it cannot be used."""
    try:
        return D.load_image_folder(folder.strip()).summary()
    except ValueError as e:
        return f"**Cannot use this folder:** {e}"


def _request(method: str, values) -> dict:
    kind = METHODS.get(method, method)
    req = {k: v for k, v in zip(FIELDS, values) if k in COMMON | USES.get(kind, set())}
    req["kind"] = kind
    if req.get("learning_rate") in (0, None):
        req.pop("learning_rate", None)
    return {k: v for k, v in req.items() if v not in (None, "")}


def _status(run: dict) -> str:
    text = f"**{run['state']}** - {run['kind']} `{run['name']}` step {run['step']}/{run['total']} ({run['seconds']} s)"
    return text + (f"\n\n**Error:** {run['error']}" if run.get("error") else "")


def _image(b64: str | None):
    if not b64:
        return None
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def poll_view(manager: RunManager, run_id: str):
    """(status, loss table, preview, result) for the run ``run_id`` (the latest when empty)."""
    import pandas as pd

    try:
        run = manager.poll(run_id or None)
    except KeyError:
        return "No run yet.", pd.DataFrame({"step": [], "loss": []}), None, ""
    chart = pd.DataFrame(run["losses"] or [], columns=["step", "loss"])
    return _status(run), chart, _image(run["preview"]), run["message"]


def _inputs(gr) -> tuple:
    method = gr.Radio(list(METHODS), value="Textual Inversion", label="Method")
    name = gr.Textbox(label="Name (the embedding's word / the LoRA's file name)", placeholder="my_cat_lk")
    images = gr.Textbox(label="Dataset folder (images; same-named .txt files are captions)")
    with gr.Row():
        init_text = gr.Textbox(label="Start from word(s) (TI)", placeholder="cat")
        instance_prompt = gr.Textbox(label="Instance prompt (DreamBooth)", placeholder="a photo of sks cat")
        token = gr.Textbox(label="New word (pivotal; in the instance prompt)")
    with gr.Row():
        vectors = gr.Number(label="Vectors per token", value=1, precision=0)
        steps = gr.Number(label="Steps", value=500, precision=0)
        lr = gr.Number(label="Learning rate (0: the method's default)", value=0)
        rank = gr.Number(label="LoRA rank", value=8, precision=0)
    with gr.Row():
        resolution = gr.Number(label="Resolution (0: the images' own)", value=512, precision=0)
        seed = gr.Number(label="Seed", value=0, precision=0)
        preview_every = gr.Number(label="Preview every N steps", value=50, precision=0)
        overwrite = gr.Checkbox(label="Replace an existing file of this name", value=False)
    with gr.Accordion("SeedSelect (Steps = iterations; the dataset holds the reference images)", open=False):
        prompt = gr.Textbox(label="Prompt (the one you will generate with)")
        negative = gr.Textbox(label="Negative prompt")
        clip_vision = gr.Textbox(label="CLIP vision model folder (config.json + weights)")
        with gr.Row():
            sampling_steps = gr.Number(label="Sampling steps", value=20, precision=0)
            cfg = gr.Number(label="CFG scale", value=7.0)
    return method, (name, images, init_text, instance_prompt, token, vectors, steps, lr, rank, resolution,
                    seed, preview_every, overwrite, prompt, negative, clip_vision, sampling_steps, cfg)


def build(manager: RunManager):
    """The tab, as ``script_callbacks.on_ui_tabs`` wants it: ``[(blocks, title, element id)]``."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as tab:
        run_id = gr.State("")
        with gr.Row():
            with gr.Column():
                method, fields = _inputs(gr)
                found = gr.Markdown()
                with gr.Row():
                    start, cancel = gr.Button("Start", variant="primary"), gr.Button("Cancel")
            with gr.Column():
                status = gr.Markdown("No run yet.")
                chart = gr.LinePlot(x="step", y="loss", title="Loss", height=260)
                preview = gr.Image(label="Preview", interactive=False)
                result = gr.Markdown(elem_id="likeness_result")
        fields[1].change(dataset_summary, inputs=[fields[1]], outputs=[found])
        start.click(lambda m, *v: _start(manager, m, v), inputs=[method, *fields], outputs=[run_id, status])
        cancel.click(lambda r: _status(manager.cancel(r)) if r else "No run.", inputs=[run_id], outputs=[status])
        poll = (lambda r: poll_view(manager, r)), [run_id], [status, chart, preview, result]
        if hasattr(gr, "Timer"):  # gradio 4 (Forge)
            gr.Timer(1.0).tick(*poll)
        else:  # gradio 3 (AUTOMATIC1111): a periodic load event
            tab.load(*poll, every=1.0)
    return [(tab, "Likeness", "likeness")]


def _start(manager: RunManager, method: str, values) -> tuple[str, str]:
    values = [None if (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0
                       and f in ("resolution", "learning_rate")) else v for f, v in zip(FIELDS, values)]
    try:
        run = manager.start(_request(method, values))
    except ValueError as e:
        return "", f"**Not started:** {e}"
    return run.id, _status(run.as_dict())


__all__ = ["build", "poll_view", "dataset_summary", "METHODS"]
