"""The WebUI extension without a WebUI: the run manager the tab and the API route share, on a tiny
diffusers host (what the Forge host is in a real Forge: ``tests/host_contract.py``), its API routes
on a FastAPI app, the install script, and the extension layout the WebUI loads."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support.images import write_disc_images

from likeness.webui.runs import RunManager, WebUIContext

REPO = Path(__file__).resolve().parents[1]


def _manager(host, tmp_path, lock=None):
    refreshed = []
    ctx = WebUIContext(make_host=lambda: host, embeddings_dir=lambda: tmp_path / "embeddings",
                       lora_dir=lambda: tmp_path / "models" / "Lora", refresh=refreshed.append,
                       lock=lock or threading.Lock())
    return RunManager(ctx), refreshed


def _wait(manager, run_id, timeout=300, until=("done", "cancelled", "failed")):
    t0 = time.time()
    while time.time() - t0 < timeout:
        run = manager.poll(run_id)
        if run["state"] in until:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} still {manager.poll(run_id)['state']} after {timeout} s")


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "data"
    write_disc_images(folder, n=3, captions=True)
    return folder


def test_ti_run_writes_the_embedding_into_the_webuis_folder_and_says_how_to_use_it(tiny_sd1_host, tmp_path, dataset):
    manager, refreshed = _manager(tiny_sd1_host, tmp_path)
    run = manager.start({"kind": "ti", "name": "lk_disc", "images": str(dataset), "steps": 3, "learning_rate": 0.01,
                         "preview_every": 3, "save_every": 0})
    got = _wait(manager, run.id)
    assert got["state"] == "done", got["error"]
    path = tmp_path / "embeddings" / "lk_disc.safetensors"
    assert got["files"] == [str(path), str(path.with_suffix(".pt"))]  # the .pt: A1111's own format too
    assert set(load_file(path)) == {"emb_params"}
    assert [s for s, _ in got["losses"]] == [1, 2, 3] and got["preview"]
    assert "`lk_disc`" in got["message"] and str(path) in got["message"]
    assert refreshed == ["embedding"]
    assert manager.poll(None)["id"] == run.id  # "latest"


def test_lora_run_goes_to_the_lora_folder_with_the_prompt_tag(tiny_sd1_host, tmp_path, dataset):
    manager, refreshed = _manager(tiny_sd1_host, tmp_path)
    run = manager.start({"kind": "lora", "name": "disc_lora", "images": str(dataset), "steps": 2,
                         "instance_prompt": "a photo of sks_lk disc", "rank": 2, "preview_every": 0})
    got = _wait(manager, run.id)
    assert got["state"] == "done", got["error"]
    assert (tmp_path / "models" / "Lora" / "disc_lora.safetensors").is_file()
    assert "<lora:disc_lora:1>" in got["message"] and refreshed == ["lora"]


@pytest.mark.parametrize("req, match", [
    ({"kind": "seedselect"}, "kind must be one of"),
    ({"kind": "ti", "name": "lk_x", "images": "/no/such/folder"}, "does not exist"),
    ({"kind": "ti", "name": "lk_x", "steps": 0}, "steps must be at least 1"),
    ({"kind": "ti", "name": "lk_x", "steps": "many"}, "'steps' must be a int"),
    ({"kind": "lora", "name": "x", "steps": 2}, "instance"),
])
def test_bad_requests_are_refused_before_any_work(tiny_sd1_host, tmp_path, dataset, req, match):
    manager, _ = _manager(tiny_sd1_host, tmp_path)
    req = {"images": str(dataset), **req}
    with pytest.raises(ValueError, match=match):
        manager.start(req)
    assert manager.runs == {} and not (tmp_path / "embeddings").exists()


def test_cancel_keeps_the_last_good_file_and_one_run_at_a_time(tiny_sd1_host, tmp_path, dataset):
    gate = threading.Lock()
    manager, _ = _manager(tiny_sd1_host, tmp_path, lock=gate)
    run = manager.start({"kind": "ti", "name": "lk_cancel", "images": str(dataset), "steps": 500,
                         "save_every": 0, "preview_every": 0})
    _wait(manager, run.id, until=("running",))
    with pytest.raises(ValueError, match="already in progress"):
        manager.start({"kind": "ti", "name": "lk_other", "images": str(dataset), "steps": 1})
    manager.cancel(run.id)
    got = _wait(manager, run.id)
    assert got["state"] == "cancelled" and 0 < got["step"] < 500
    assert got["files"] == [str(tmp_path / "embeddings" / "lk_cancel.safetensors")]  # the kept file, listed
    assert Path(got["files"][0]).is_file() and "Cancelled at step" in got["message"]
    assert gate.acquire(blocking=False)  # the WebUI's lock is free again


def test_api_routes_start_poll_and_cancel(tiny_sd1_host, tmp_path, dataset):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from likeness.webui.api import register_routes

    app = FastAPI()
    manager, _ = _manager(tiny_sd1_host, tmp_path)
    register_routes(app, manager)
    client = TestClient(app)
    bad = client.post("/likeness/v1/runs", json={"kind": "ti", "name": "lk_api", "images": "/nope"})
    assert bad.status_code == 400 and "does not exist" in bad.json()["detail"]
    assert client.get("/likeness/v1/runs/latest").status_code == 404
    r = client.post("/likeness/v1/runs", json={"kind": "ti", "name": "lk_api", "images": str(dataset), "steps": 2})
    assert r.status_code == 200, r.text
    got = _wait(manager, r.json()["id"])
    polled = client.get(f"/likeness/v1/runs/{got['id']}").json()
    assert polled["state"] == "done" and polled["files"]
    assert client.post("/likeness/v1/runs/nope/cancel").status_code == 404


def test_install_script_installs_nothing_when_everything_is_there():
    out = subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "nothing to do" in out.stdout, out.stdout + out.stderr


def test_the_webui_finds_one_python_script_and_the_comfyui_package_still_imports():
    assert sorted(p.name for p in (REPO / "scripts").glob("*.py")) == ["likeness_webui.py"]
    spec = importlib.util.spec_from_file_location("likeness_probe", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.comfy_entrypoint) and module.WEB_DIRECTORY == "./web"
