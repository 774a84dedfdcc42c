"""The live loss chart's memory on the server: every point a long-running node has reported in the
current prompt, and the HTTP route the page reads it from.

The websocket ``likeness.progress`` events are lost on a page reload; keeping the points here lets
web/likeness.js redraw a run's chart from its first step when the page comes back mid-run.  The
same route tells the page which node types draw a chart (the node classes with ``LIVE_CHART``), so
a new long-running node gets one by setting that flag, not by editing the JavaScript.

Only the latest prompt's runs are kept (a new prompt id clears the others), a node's run restarts
when its step goes back (the same node queued again), and a point is three numbers: the memory is
bounded by the longest run.
"""
from __future__ import annotations

import sys
import threading

#: GET: ``{"chart_nodes": [...], "prompt_id", "nodes": {node id: run}}``; ``/{node_id}``: one run
ROUTE = "/likeness/progress"

_lock = threading.Lock()
_runs: dict[str, dict] = {}
_prompt: dict[str, str | None] = {"id": None}


def running_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing (None outside one, e.g. in tests)."""
    module = sys.modules.get("comfy_execution.utils")
    context = getattr(module, "get_executing_context", lambda: None)()
    return getattr(context, "prompt_id", None)


def record(node_id: str, step: int, total: int, loss: float | None, elapsed: float,
           prompt_id: str | None = None, node_type: str | None = None, metrics: list[dict] | None = None) -> None:
    """Remember one point of ``node_id``'s run (``loss`` None for a skipped step), and the
    evaluations (best step) that came with it under ``"metrics"``."""
    with _lock:
        if prompt_id != _prompt["id"]:
            _runs.clear()
            _prompt["id"] = prompt_id
        run = _runs.get(node_id)
        if run is None or (run["steps"] and step <= run["steps"][-1]):
            run = _runs[node_id] = {"type": node_type, "total": total, "steps": [], "losses": [], "elapsed": []}
        run["total"] = total
        run["steps"].append(step)
        run["losses"].append(loss)
        run["elapsed"].append(round(elapsed, 3))
        if metrics:
            run.setdefault("metrics", []).extend(dict(m) for m in metrics)


def snapshot(node_id: str | None = None) -> dict:
    """A copy of the recorded runs (all, or ``node_id``'s alone under ``"nodes"``)."""
    with _lock:
        keys = list(_runs) if node_id is None else [k for k in (str(node_id),) if k in _runs]
        nodes = {k: {f: (list(v) if isinstance(v, list) else v) for f, v in _runs[k].items()} for k in keys}
        return {"prompt_id": _prompt["id"], "nodes": nodes}


def clear() -> None:
    with _lock:
        _runs.clear()
        _prompt["id"] = None


def chart_node_types(node_classes) -> list[str]:
    """The node ids (class types) of the nodes that report a loss per step: ``LIVE_CHART = True``."""
    return sorted(cls.define_schema().node_id for cls in node_classes if getattr(cls, "LIVE_CHART", False))


def prompt_server():
    """ComfyUI's running ``PromptServer`` (None outside a server: tests, scripts, the CLI)."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def register_routes(node_classes, server=None) -> bool:
    """Add ``GET /likeness/progress`` and ``GET /likeness/progress/{node_id}`` to ComfyUI's server
    (once per process; the server prefixes ``/api`` itself).  False when there is no server."""
    server = server if server is not None else prompt_server()
    routes = getattr(server, "routes", None)
    if routes is None:
        return False
    if any(getattr(r, "path", None) == ROUTE for r in routes):
        return True
    from aiohttp import web

    charts = chart_node_types(node_classes)

    async def all_runs(request):
        return web.json_response({"chart_nodes": charts} | snapshot())

    async def one_run(request):
        node_id = request.match_info["node_id"]
        found = snapshot(node_id)
        if node_id not in found["nodes"]:
            return web.json_response({"error": f"no progress recorded for node {node_id} in the latest prompt",
                                      "prompt_id": found["prompt_id"]}, status=404)
        return web.json_response({"node": node_id, "prompt_id": found["prompt_id"]} | found["nodes"][node_id])

    routes.get(ROUTE)(all_runs)
    routes.get(ROUTE + "/{node_id}")(one_run)
    return True


__all__ = ["ROUTE", "record", "snapshot", "clear", "chart_node_types", "prompt_server", "register_routes",
           "running_prompt_id"]
