"""bench/gpu.py's bookkeeping, without a GPU or ComfyUI: every result is on disk as soon as it is
measured, a timed-out workload is recorded as such, and the budget ends the plan with the rest
listed as skipped (so a GPU run cut short still says what it measured and what it did not)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("likeness_bench_gpu", BENCH / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("comfy_env", None)


def test_results_are_saved_as_they_come_and_a_timeout_is_recorded(gpu, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    seen_on_disk = []

    def fake_child(cmd, timeout):
        name, mode = cmd[cmd.index("--one") + 1], cmd[cmd.index("--compile") + 1]
        path = out / "gpu_bench.json"
        seen_on_disk.append(len(json.loads(path.read_text())["results"]) if path.exists() else 0)
        if mode != "off":
            return 124, "compiling...", timeout
        r = {"workload": name, "compile": mode, "compile_ran": "off", "s_per_step": 0.5, "warmup_s": 2.0,
             "peak_GB": None, "steps": 3, "loss_first": 0.3, "loss_last": 0.2}
        return 0, "noise\nRESULT-JSON " + json.dumps(r) + "\n", 1.0

    monkeypatch.setattr(gpu, "_run_child", fake_child)
    rc = gpu.main(["--comfy", str(tmp_path), "--cpu-smoke", "--out", str(out)])
    doc = json.loads((out / "gpu_bench.json").read_text())
    assert seen_on_disk == list(range(len(gpu.SMOKE_PLAN)))  # each result was written before the next began
    assert [r["status"] for r in doc["results"]] == ["ok"] * len(gpu.WORKLOADS) + ["timeout"] * 2
    assert rc == 1  # the smoke fails when a workload does
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT ")]
    assert lines[0].startswith("RESULT ti_sd15_512_b4 compile=off ran=off s_per_step=0.5000 warmup_s=2.0")
    assert "peak_GB=n/a" in lines[0] and lines[-1].endswith("status=timeout")
    assert not list(out.glob(".*tmp"))  # no half-written file left behind


def test_the_budget_ends_the_plan_and_lists_what_was_left(gpu, tmp_path, monkeypatch):
    import time
    import types

    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(gpu, "time", types.SimpleNamespace(monotonic=lambda: next(clock),
                                                           perf_counter=time.perf_counter))

    def fake_child(cmd, timeout):
        return 0, "ANCHOR native sd15 bs=1: 0.228 s/step\n", 1.0

    monkeypatch.setattr(gpu, "_run_child", fake_child)
    out = tmp_path / "out"
    assert gpu.main(["--comfy", str(tmp_path), "--out", str(out), "--budget", "250",
                     "--only", "comfy_anchor.py"]) == 0
    doc = json.loads((out / "gpu_bench.json").read_text())
    anchors = [p for p in gpu.PLAN if p[1] == "comfy_anchor.py"]
    assert len(doc["anchors"]) == 2 and doc["anchors"][0]["lines"] == ["ANCHOR native sd15 bs=1: 0.228 s/step"]
    assert doc["skipped"] == [f"{n} {w}: budget spent" for _, n, w in anchors[2:]]


def test_without_comfyui_the_smoke_runs_on_the_diffusers_host_and_drops_the_anchors(gpu, tmp_path, monkeypatch):
    """CI has no ComfyUI: the rehearsal must still run every workload (on the CLI's host), and the
    GPU plan on that host must not try ComfyUI's anchors."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    cmds = []

    def fake_child(cmd, timeout):
        cmds.append(cmd)
        r = {"workload": cmd[cmd.index("--one") + 1], "compile": "off", "s_per_step": 0.1}
        return 0, "RESULT-JSON " + json.dumps(r), 1.0

    monkeypatch.setattr(gpu, "_run_child", fake_child)
    assert gpu.main(["--cpu-smoke", "--out", str(tmp_path / "a")]) == 0
    assert len(cmds) == len([p for p in gpu.SMOKE_PLAN if p[2] != "low_memory"])  # ComfyUI's fallback path
    assert all(c[c.index("--host") + 1] == "diffusers" and "--comfy" not in c for c in cmds)
    assert json.loads((tmp_path / "a" / "gpu_bench.json").read_text())["host"] == "diffusers"
    cmds.clear()
    assert gpu.main(["--host", "diffusers", "--out", str(tmp_path / "b"), "--budget", "10000"]) == 0
    assert all("--one" in c for c in cmds)
    assert len(cmds) == sum(p[0] == "ours" and p[2] != "low_memory" for p in gpu.PLAN)
    with pytest.raises(SystemExit):
        gpu.main(["--host", "comfy", "--out", str(tmp_path / "c")])  # no folder named: a clear usage error
