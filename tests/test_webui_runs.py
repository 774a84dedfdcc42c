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
from support.tiny_clip_vision import hf_folder

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
    ({"kind": "seed"}, "kind must be one of"),
    ({"kind": "seedselect", "name": "s", "prompt": "a disc"}, "CLIP vision model folder"),
    ({"kind": "seedselect", "name": "s", "clip_vision": "."}, "needs the prompt"),
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


def test_seedselect_run_saves_a_seed_the_txt2img_section_uses(tiny_sd1_host, tmp_path, dataset):
    """SeedSelect from the tab: the seed file in models/likeness_seeds, the loss per iteration, and
    the seed's noise is what the WebUI's txt2img then starts from (``seed_noise``)."""
    from likeness.trainers import seed_bank as B
    from likeness.webui import seed_noise

    seeds = tmp_path / "models" / "likeness_seeds"
    manager, refreshed = _manager(tiny_sd1_host, tmp_path)
    manager.ctx.seeds_dir = lambda: seeds
    run = manager.start({"kind": "seedselect", "name": "disc_seed", "images": str(dataset), "steps": 3,
                         "prompt": "a photo of a disc", "clip_vision": str(hf_folder(tmp_path / "cv")),
                         "resolution": 64, "sampling_steps": 2})
    got = _wait(manager, run.id)
    assert got["state"] == "done", got["error"]
    assert got["files"] == [str(seeds / "disc_seed.seed.safetensors")] and refreshed == ["seed"]
    assert [s for s, _ in got["losses"]] == [1, 2, 3] and "Likeness seed" in got["message"]
    entry = B.load_seed(seeds, "disc_seed")
    assert (entry.width, entry.height, entry.steps, entry.prompt) == (64, 64, 2, "a photo of a disc")
    assert seed_noise.choices(seeds) == [seed_noise.NONE, "disc_seed"]


class _WebUIRNG:
    """The WebUIs' ``ImageRNG`` as processing uses it: ``shape`` and successive ``next()`` draws."""

    def __init__(self, shape, batch):
        import torch

        self.shape, self.batch, self.g = shape, batch, torch.Generator().manual_seed(1)

    def next(self):
        import torch

        return torch.randn((self.batch, *self.shape), generator=self.g)


def test_the_txt2img_section_starts_from_the_saved_noise_and_refuses_another_size(tmp_path):
    import types

    import torch

    from likeness.trainers import seed_bank as B
    from likeness.webui import seed_noise

    noise = torch.randn(1, 4, 8, 8)
    B.save_seed(tmp_path, "s", B.SeedEntry(noise=noise, sigmas=torch.linspace(14, 0, 3), sampler="euler", cfg=7.0,
                                          width=64, height=64))
    p = types.SimpleNamespace(rng=_WebUIRNG((4, 8, 8), 2), extra_generation_params={})
    plain = _WebUIRNG((4, 8, 8), 2)
    seed_noise.apply(p, seed_noise.NONE, tmp_path)
    assert isinstance(p.rng, _WebUIRNG)  # off: the WebUI's own noise
    seed_noise.apply(p, "s", tmp_path)
    first = p.rng.next()
    assert torch.equal(first, noise.expand(2, -1, -1, -1)) and p.extra_generation_params["Likeness seed"] == "s"
    plain.next()
    assert torch.equal(p.rng.next(), plain.next())  # later draws (ancestral noise) as without the seed
    p = types.SimpleNamespace(rng=_WebUIRNG((4, 16, 16), 1), extra_generation_params={})
    with pytest.raises(ValueError, match="made for 64x64 px"):
        seed_noise.apply(p, "s", tmp_path)


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
