"""The ``compile`` option: the compiled denoiser computes what the eager one does, and any failure
to compile falls back to eager with one line and the same result."""
import pytest
import torch

from likeness.trainers import compile as C
from likeness.trainers import data as D
from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion


def _train(host, tmp_path, name, mode, notes):
    images = D.images_from_batch(torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    cfg = TIConfig(name=name, output_dir=tmp_path, steps=3, learning_rate=1e-2, batch_size=2, preview_every=0)
    with C.compiled_step(host, mode, note=notes.append) as state:
        res = train_textual_inversion(host, images, cfg)
    return res, state


def _broken_compile(monkeypatch):
    """torch.compile that hands back a function failing on its first call, as a missing C++
    compiler or an unsupported operation does."""
    calls = []

    def fake_compile(fn, **kw):
        def compiled(*a, **k):
            calls.append(kw.get("mode", kw.get("backend")))
            raise RuntimeError("backend compiler failed\nlong traceback that must not be printed")
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_a_failing_compile_falls_back_to_eager_with_one_note(tiny_sd1_host, tmp_path, monkeypatch):
    eager, _ = _train(tiny_sd1_host, tmp_path / "a", "sks-eager", "off", [])
    calls = _broken_compile(monkeypatch)
    notes = []
    res, state = _train(tiny_sd1_host, tmp_path / "b", "sks-eager", "default", notes)
    assert calls == ["aot_eager"]  # the CPU's backend, tried once, never again after the failure
    assert state.active == "off" and "RuntimeError: backend compiler failed" in state.reason
    assert len(notes) == 1 and "running eager" in notes[0] and "traceback" not in notes[0]
    assert res.steps_done == 3 and res.losses == eager.losses  # the very same run, eagerly
    assert torch.equal(res.vectors["clip_l"], eager.vectors["clip_l"])
    assert "denoise" not in vars(tiny_sd1_host)  # the host's own method is back
    assert "fell back to eager" in state.summary()


def test_off_leaves_the_host_untouched_and_max_without_cuda_says_so(tiny_sd1_host, monkeypatch):
    calls = _broken_compile(monkeypatch)
    notes = []
    with C.compiled_step(tiny_sd1_host, "off", note=notes.append) as state:
        assert "denoise" not in vars(tiny_sd1_host)
    assert state.summary() == "compile off" and notes == [] and calls == []
    with C.compiled_step(tiny_sd1_host, "max", note=notes.append) as state:
        assert state.active == "default"  # CPU: no CUDA graphs, plain compile
        x = torch.randn(1, 4, 8, 8)
        cond = tiny_sd1_host.encode_text(["a photo"])
        tiny_sd1_host.denoise(x, torch.tensor([1.0]), cond)
    assert "CUDA graphs need a CUDA device" in notes[0] and "running eager" in notes[1]
    with pytest.raises(ValueError, match="compile must be one of off, default, max"):
        with C.compiled_step(tiny_sd1_host, "fast"):
            pass


def test_a_seed_models_denoiser_is_wrapped_for_each_run(monkeypatch):
    calls = _broken_compile(monkeypatch)

    class Model:
        device = torch.device("cpu")

        def run(self, sigmas, cfg, fn, shape=None):
            return fn(lambda x, sigma: x * 2)

    model, notes = Model(), []
    with C.compiled_step(model, "default", note=notes.append) as state:
        out = model.run(torch.ones(2), 1.0, lambda den: den(torch.ones(1), torch.ones(1)))
    assert torch.equal(out, torch.full((1,), 2.0)) and calls == ["aot_eager"] and state.active == "off"
    assert "run" not in vars(model)


def test_compiled_denoise_gives_the_eager_loss_and_gradient(tiny_sd1_host):
    """The real graph capture on this CPU (dynamo + AOTAutograd through the host's denoise)."""
    host = tiny_sd1_host
    vec = torch.zeros(1, 32, requires_grad=True)
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.5, 3.0])

    def loss_and_grad():
        vec.grad = None
        cond = host.encode_text(["a photo of <w>", "<w> on a table"], "<w>", {"clip_l": vec})
        loss = host.denoise(x, sigma, cond).square().mean()
        loss.backward()
        return float(loss.detach()), vec.grad.clone()

    with host.training():
        want = loss_and_grad()
        notes = []
        with C.compiled_step(host, "default", note=notes.append) as state:
            got = [loss_and_grad() for _ in range(2)]
    assert state.active == "default" and state.calls == 2 and state.warmup_seconds > 0 and notes == []
    for loss, grad in got:
        assert loss == pytest.approx(want[0], rel=1e-6)
        torch.testing.assert_close(grad, want[1], rtol=1e-5, atol=1e-7)


def test_the_cli_option_compiles_the_hosts_denoiser_and_reports_it(monkeypatch, tmp_path, capsys):
    import argparse
    import types

    from likeness import cli
    from likeness.hosts import diffusers as host_module
    from likeness.trainers import textual_inversion as TI

    parser = argparse.ArgumentParser()
    cli._ti_parser(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(next(a for a in sub.choices["ti"]._actions if a.dest == "compile").choices) == list(C.MODES)

    class Host:
        device = torch.device("cpu")

        def denoise(self, x, sigma, cond):
            return x

    seen = {}

    def train(host, images, cfg, **kw):
        seen["wrapped"] = "denoise" in vars(host)
        return types.SimpleNamespace(steps_done=0, seconds=0.0, skipped_steps=0, files=[], notes=[])

    monkeypatch.setattr(TI, "train_textual_inversion", train)
    monkeypatch.setattr(D, "load_image_folder", lambda path: types.SimpleNamespace(summary=lambda: "images"))
    monkeypatch.setattr(host_module.DiffusersHost, "load", classmethod(lambda cls, *a, **kw: Host()))
    monkeypatch.chdir(tmp_path)
    base = ["ti", "--model", "m", "--images", "i", "--name", "sks-thing"]
    assert cli.main(base + ["--compile", "default"]) == 0 and seen["wrapped"]
    assert "compile default: warm-up 0.0 s (not counted in s/step)" in capsys.readouterr().out
    assert cli.main(base) == 0 and not seen["wrapped"]
    assert "compile" not in capsys.readouterr().out
