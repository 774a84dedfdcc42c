"""The extension's HTTP API, on the WebUI's own FastAPI app (``script_callbacks.on_app_started``):
the tab and scripts start and poll runs the same way.

    POST /likeness/v1/runs               {"kind": "ti" | "lora" | "pivotal", "name", "images", ...}
                                         -> the run (``id``, ``state``...); 400 with the reason if the
                                         request or the dataset is wrong (nothing started)
    GET  /likeness/v1/runs/{id}          -> state, step/total, losses [[step, loss]...], preview
                                         (base64 PNG), files, message (how to use the result), error
    GET  /likeness/v1/runs/latest        -> the latest run
    POST /likeness/v1/runs/{id}/cancel   -> stops at the next step; the last good file is kept

The request's fields are ``webui/runs.py``'s ``ti_config`` / ``dreambooth_config``.
"""
from __future__ import annotations

from .runs import RunManager

PREFIX = "/likeness/v1"


def register_routes(app, manager: RunManager) -> None:
    """Add the routes to a FastAPI ``app`` (imported here: the WebUI ships FastAPI)."""
    from fastapi import Body, HTTPException

    def start(body: dict = Body(...)):  # noqa: B008 - FastAPI's declaration style
        try:
            return manager.start(body).as_dict()
        except (ValueError, OSError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    def poll(run_id: str):
        try:
            return manager.poll(None if run_id == "latest" else run_id)
        except KeyError as e:
            raise HTTPException(status_code=404, detail=str(e.args[0])) from None

    def cancel(run_id: str):
        try:
            return manager.cancel(run_id)
        except KeyError as e:
            raise HTTPException(status_code=404, detail=str(e.args[0])) from None

    app.add_api_route(f"{PREFIX}/runs", start, methods=["POST"])
    app.add_api_route(f"{PREFIX}/runs/{{run_id}}", poll, methods=["GET"])
    app.add_api_route(f"{PREFIX}/runs/{{run_id}}/cancel", cancel, methods=["POST"])


__all__ = ["PREFIX", "register_routes"]
