"""Stopping and continuing SeedSelect (issue 15): a run stopped at any iteration - in its main run
or in a bootstrap run - and resumed ends bit-identical on the CPU to the same run never stopped;
a state of another run (other references, prompt, schedule, settings) is refused naming what
differs; the CLI's Ctrl-C leaves a seed and a state that ``--resume`` continues."""
from __future__ import annotations

import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from likeness.trainers import run_state
from likeness.trainers import seedselect as S
from support.cli_process import stop_when
from test_seedselect import ToySeedModel, references_from, toy_config, vision  # noqa: F401 (fixture)


class Stop(BaseException):
    """What ComfyUI's Cancel is: a BaseException out of the progress callback."""


class NamedToy(ToySeedModel):
    """The toy model with the ``identity()`` a run state's fingerprint needs: its weights, and a
    prompt standing in for the conditioning."""

    def __init__(self, prompt: str = "a toy"):
        super().__init__()
        self.prompt = prompt

    def identity(self):
        return run_state.digest([self.w.numpy().tobytes(), self.prompt.encode()])


def _cfg(out, **kw):
    base = dict(iterations=8, num_seeds=3, bootstrap_iterations=3, state_every=3, output_dir=out, name="toy",
                learning_rate=0.2, lr_drop_at=4)
    base.update(kw)
    return toy_config(**base)


def _refs():
    model = ToySeedModel()
    return torch.cat([references_from(model, s, toy_config(), n=1) for s in (10, 11, 12, 13)])


def _stop_at(iteration):
    def progress(i, n, loss, img):
        if i == iteration:
            raise Stop()
    return progress


def _same(a: S.SeedSelectResult, b: S.SeedSelectResult) -> None:
    assert torch.equal(a.noise, b.noise) and torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert a.losses == b.losses and a.seed_losses == b.seed_losses
    assert (a.best_iteration, a.iterations_done, a.semantic, a.appearance) == \
        (b.best_iteration, b.iterations_done, b.semantic, b.appearance)


@pytest.mark.parametrize("stop_at", [5, 9, 13])  # the main run, the first and the last bootstrap run
def test_seedselect_stopped_and_resumed_is_bit_identical(vision, tmp_path, stop_at):
    refs = _refs()
    whole = S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "a"))
    kept = []
    with pytest.raises(Stop) as stopped:
        S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "b"), progress=_stop_at(stop_at),
                           on_cancel=kept.append)
    assert kept and kept[0].cancelled  # the best seed so far, as before
    state = stopped.value.likeness_state
    assert state is not None and run_state.read_header(state)["step"] == stop_at
    seen = []
    res = S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "b", resume="latest"),
                             progress=lambda i, n, loss, img: seen.append((i, loss)))
    assert res.resumed_from == stop_at and res.noise.shape[0] == 3
    _same(res, whole)
    assert [i for i, _ in seen] == list(range(1, 15))  # the chart is redrawn, then continues
    assert res.state_path.name == "toy.step00000014.likeness-state"
    assert len(run_state.list_states(tmp_path / "b", "toy")) == 2  # keep 2
    assert not list((tmp_path / "b").glob("*.likeness-lock"))  # the name is released


def test_seedselect_trains_longer_and_keeps_a_target_stop(vision, tmp_path):
    refs = _refs()
    whole = S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "a", num_seeds=4))
    S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "b"))  # 3 seeds, then one more
    res = S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "b", num_seeds=4, resume="latest"))
    assert res.resumed_from == 14 and res.noise.shape[0] == 4
    _same(res, whole)
    # a main run that ended at its target stays ended when its state is resumed
    target = whole.losses[2]
    ended = S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "c", target_loss=target, num_seeds=2,
                                                              keep_states=10))
    assert ended.iterations_to_target == 3 and ended.iterations_done < 8  # the main run ended at 3
    at_target = run_state.state_path(tmp_path / "c", "toy", 3)  # written when the main run met its target
    _same(S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path / "c", target_loss=target, num_seeds=2,
                                                             resume=str(at_target))), ended)


@pytest.mark.parametrize("change, named", [
    (dict(learning_rate=0.1), "learning_rate"),
    (dict(cfg=2.0), "cfg"),
    (dict(steps=6), "sigmas"),
    (dict(seed=2), "seed"),
    ("references", "references"),
    ("prompt", "model"),
])
def test_a_seedselect_state_of_another_run_is_refused_naming_what_differs(vision, tmp_path, change, named):
    refs = _refs()
    with pytest.raises(Stop):
        S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path), progress=_stop_at(4))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = NamedToy("another prompt") if change == "prompt" else NamedToy()
    other = refs.flip(0) if change == "references" else refs
    kw = change if isinstance(change, dict) else {}
    with pytest.raises(run_state.ResumeError, match=rf"belongs to another run.*{named}: saved"):
        S.train_seedselect(model, vision, other, _cfg(tmp_path, resume="latest", **kw))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written


def test_seedselect_resume_refusals(vision, tmp_path):
    refs = _refs()
    with pytest.raises(run_state.ResumeError, match="no saved run state of 'toy'"):
        S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path, resume="latest"))
    S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path))
    with pytest.raises(run_state.ResumeError, match="already at step 14; raise iterations or num_seeds"):
        S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path, resume="latest"))
    with pytest.raises(run_state.ResumeError, match="main run of 8 iterations; resume with iterations 8"):
        S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path, iterations=9, num_seeds=4, resume="latest"))
    with pytest.raises(ValueError, match="cannot name its weights and prompts"):
        S.train_seedselect(ToySeedModel(), vision, refs, _cfg(tmp_path / "x"))
    with pytest.raises(ValueError, match="keep states must be 0"):
        S.train_seedselect(NamedToy(), vision, refs, _cfg(tmp_path, keep_states=-1))


# ------------------------------------------------------------------------------------------ the CLI


def _cli_args(model_dir, refs, clip, out, *extra):
    return ["seedselect", "--model", str(model_dir), "--references", str(refs), "--prompt", "a photo of a cat",
            "--clip-vision", str(clip), "--width", "64", "--height", "64", "--steps", "3", "--iterations", "12",
            "--num-seeds", "2", "--bootstrap-iterations", "3", "--state-every", "2", "--cfg", "2",
            "--device", "cpu", "--out", str(out), "--name", "cat", *extra]


def test_cli_seedselect_ctrl_c_then_resume_is_bit_identical(tmp_path, tiny_sd1_host, vision, capsys, monkeypatch):
    import tiny_models
    from likeness import cli
    from likeness.trainers import seed_bank as B

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the child sums in the same order
    model_dir = tiny_models.save_diffusers_folder(tiny_models.host_parts(tiny_sd1_host), tmp_path / "model")
    vision.model.save_pretrained(tmp_path / "clip")
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)).save(refs / f"{i}.png")
    assert cli.main(_cli_args(model_dir, refs, tmp_path / "clip", tmp_path / "whole")) == 0
    out = tmp_path / "stopped"
    rc, err = stop_when(_cli_args(model_dir, refs, tmp_path / "clip", out), "step 5/", signal.SIGINT)
    assert rc == 128 + signal.SIGINT, err
    assert re.search(r"interrupted; the best seed so far was saved to .*cat\.seed\.safetensors; continue it with "
                     r"--resume \(state cat\.step\d{8}\.likeness-state\)", err), err
    assert B.load_seed(out, "cat").noise.shape == (1, 4, 8, 8)  # the seed so far, loadable
    capsys.readouterr()
    assert cli.main(_cli_args(model_dir, refs, tmp_path / "clip", out, "--resume")) == 0, capsys.readouterr().err
    assert "continued after iteration" in capsys.readouterr().out
    whole, resumed = B.load_seed(tmp_path / "whole", "cat"), B.load_seed(out, "cat")
    assert torch.equal(resumed.noise, whole.noise) and resumed.losses == whole.losses
    assert (out / "cat.1.png").read_bytes() == (tmp_path / "whole" / "cat.1.png").read_bytes()
