"""Hostile inputs on the CLI: every bad option is refused before the model loads, every known
failure ends in one line with a non-zero exit status, a stop signal keeps the last good result,
and nothing is written (or claimed written) that was not."""
import errno
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from likeness import cli

HUGE_SEED = str(10**23)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_sd1_host):
    import tiny_models

    return tiny_models.save_diffusers_folder(tiny_models.host_parts(tiny_sd1_host),
                                             tmp_path_factory.mktemp("model") / "tiny-sd1")


def _images(folder, n=3):
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def _refused(capsys, rc, match, out, expected_rc=2):
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    assert "likeness: error:" in err and "Traceback" not in err
    assert re.search(match, err), err
    assert not out.exists() or not any(out.iterdir()), "a refused run wrote files"
    return err


def _base(command, model, imgs, out):
    common = ["--model", str(model), "--out", str(out), "--device", "cpu"]
    if command == "ti":
        return ["ti", *common, "--images", str(imgs), "--name", "sks-hostile", "--preview-every", "0"]
    if command == "dreambooth":
        return ["dreambooth", *common, "--images", str(imgs), "--name", "subj",
                "--instance-prompt", "a photo of sks dog", "--preview-every", "0"]
    return ["seedselect", *common, "--references", str(imgs), "--prompt", "a cat",
            "--clip-vision", str(model)]


OPTION_CASES = [
    ("ti", ["--memory-budget", "-1"], r"memory budget must be 0 .* got -1"),
    ("ti", ["--steps", "0"], r"steps must be at least 1, got 0"),
    ("ti", ["--steps", "-1"], r"steps must be at least 1, got -1"),
    ("ti", ["--lr", "0"], r"learning rate must be in \(0, 1\], got 0"),
    ("ti", ["--lr", "nan"], r"learning rate .* got nan"),
    ("ti", ["--lr", "1e9"], r"learning rate .* got 1000000000"),
    ("ti", ["--vectors", "0"], r"vectors per token must be 1\.\.75, .*got 0|vectors per token .*got 0"),
    ("ti", ["--vectors", "1000"], r"vectors per token .*got 1000"),
    ("ti", ["--batch-size", "0"], r"batch size must be at least 1, got 0"),
    ("ti", ["--resolution", "7"], r"resolution must be a multiple of 8 .*got 7"),
    ("ti", ["--resolution", "100000"], r"resolution .*got 100000"),
    ("ti", ["--seed", HUGE_SEED], r"seed must be a whole number from 0 to \d+, got " + HUGE_SEED),
    ("dreambooth", ["--steps", "0"], r"steps must be at least 1, got 0"),
    ("dreambooth", ["--lr", "0"], r"learning rate must be in \(0, 1\], got 0"),
    ("dreambooth", ["--lr", "nan"], r"learning rate .* got nan"),
    ("dreambooth", ["--text-encoder-lr", "nan", "--train-text-encoder"], r"text encoder learning rate .*got nan"),
    ("dreambooth", ["--rank", "0"], r"LoRA rank must be at least 1, got 0"),
    ("dreambooth", ["--batch-size", "0"], r"batch size must be at least 1, got 0"),
    ("dreambooth", ["--resolution", "100000"], r"resolution .*got 100000"),
    ("dreambooth", ["--prior-weight", "-1", "--class-prompt", "a dog"], r"prior weight must be 0 or a positive"),
    ("dreambooth", ["--seed", HUGE_SEED], r"seed must be a whole number"),
    ("seedselect", ["--width", "0"], r"width 0 px is not a size a model can render: use 8\.\.16384 pixels"),
    ("seedselect", ["--cfg", "nan"], r"cfg must be a positive number .*got nan"),
    ("seedselect", ["--seed", HUGE_SEED], r"seed must be a whole number"),
]


@pytest.mark.parametrize("command,args,match", OPTION_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_option_is_refused_by_name_before_the_model_loads(tmp_path, capsys, command, args, match):
    # the model path does not exist: a check that ran after loading would report the model instead
    out = tmp_path / "out"
    rc = cli.main(_base(command, tmp_path / "no-such-model", _images(tmp_path / "imgs"), out) + args)
    _refused(capsys, rc, match, out)


def test_a_zero_that_is_allowed_is_honoured_not_replaced(tiny_folder, tmp_path):
    # --save-every 0 means "only at the end": no default may stand in for it
    out = tmp_path / "out"
    assert cli.main(_base("dreambooth", tiny_folder, _images(tmp_path / "imgs"), out)
                    + ["--steps", "2", "--save-every", "0", "--lr", "0.001"]) == 0
    from safetensors import safe_open

    with safe_open(str(out / "subj.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_max_train_steps"] == "2" and float(meta["ss_learning_rate"]) == 0.001


@pytest.mark.parametrize("command", ["ti", "dreambooth"])
def test_an_empty_out_is_refused_not_replaced_by_a_default(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(_base(command, tmp_path / "no-model", _images(tmp_path / "imgs"), "") + ["--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out is empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_the_highest_seed_a_node_offers_runs(tiny_folder, tmp_path):
    # the run derives its class-image and adapter seeds from it: they must wrap, not overflow
    out = tmp_path / "out"
    assert cli.main(_base("dreambooth", tiny_folder, _images(tmp_path / "imgs"), out)
                    + ["--steps", "1", "--seed", str(2**64 - 1), "--class-prompt", "a photo of a dog",
                       "--num-class-images", "1"]) == 0
    assert (out / "subj.safetensors").is_file()


def test_an_out_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    rc = cli.main(_base("ti", tmp_path / "no-model", _images(tmp_path / "imgs"), out) + ["--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {out} is a file, not a folder" in err and "Traceback" not in err
    assert out.read_text() == "mine"


def test_a_preview_path_that_is_a_folder_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sks-hostile.preview.png").mkdir(parents=True)
    rc = cli.main(_base("ti", tmp_path / "no-model", _images(tmp_path / "imgs"), out) + ["--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "sks-hostile.preview.png is a folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["sks-hostile.preview.png"]


def test_an_image_too_large_to_open_safely_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2x the limit: a "bomb"
    out = tmp_path / "out"
    rc = cli.main(_base("ti", tmp_path / "no-model", _images(tmp_path / "imgs"), out) + ["--steps", "1"])
    _refused(capsys, rc, r"0\.png is too large to open safely", out)


def test_a_looping_symlink_among_the_images_is_reported(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    os.symlink(imgs / "b.png", imgs / "a.png")
    os.symlink(imgs / "a.png", imgs / "b.png")
    out = tmp_path / "out"
    rc = cli.main(_base("ti", tmp_path / "no-model", imgs, out) + ["--steps", "1"])
    _refused(capsys, rc, r"a\.png is a symbolic link that loops or points to nothing", out)


def _raising(exc):
    def fail(*a, **k):
        raise exc
    return fail


@pytest.mark.parametrize("exc,match,rc", [
    (pickle.UnpicklingError("Weights only load failed"), r"pickle that is not plain weights .*safetensors", 2),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"), r"out of memory: lower the", 1),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), r"out of memory: lower the", 1),
])
def test_a_model_load_failure_is_one_line(tmp_path, capsys, monkeypatch, exc, match, rc):
    from likeness.hosts.diffusers import DiffusersHost

    monkeypatch.setattr(DiffusersHost, "load", _raising(exc))
    out = tmp_path / "out"
    code = cli.main(_base("ti", tmp_path / "model", _images(tmp_path / "imgs"), out) + ["--steps", "1"])
    err = _refused(capsys, code, match, out, expected_rc=rc)
    assert "saved to" not in err


@pytest.mark.parametrize("exc,match", [
    (FloatingPointError("20 steps in a row gave a non-finite loss"), r"20 steps in a row"),
    (OSError(errno.ENOSPC, "No space left on device", "x.safetensors"), r"the disk is full writing x\.safetensors"),
])
def test_a_run_failure_is_one_line_and_claims_no_save(tiny_folder, tmp_path, capsys, monkeypatch, exc, match):
    from likeness.trainers.formats import embedding

    monkeypatch.setattr(embedding, "save_embedding", _raising(exc))
    out = tmp_path / "out"
    rc = cli.main(_base("ti", tiny_folder, _images(tmp_path / "imgs"), out) + ["--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(match, err) and "Traceback" not in err
    assert "nothing was saved by this run" in err and "saved to" not in err
    assert not (out / "sks-hostile.safetensors").exists()


@pytest.mark.parametrize("command", ["ti", "dreambooth"])
def test_a_run_too_big_for_its_memory_budget_is_refused_before_training(tiny_folder, tmp_path, capsys, command):
    out = tmp_path / "out"
    rc = cli.main(_base(command, tiny_folder, _images(tmp_path / "imgs"), out) + ["--memory-budget", "0.000001"])
    err = _refused(capsys, rc, r"needs about .* GB even with every memory saving on.*lower the batch size", out)
    assert "saved to" not in err


def test_a_rank_above_a_layers_width_keeps_the_asked_scale(tiny_folder, tmp_path):
    out = tmp_path / "out"
    assert cli.main(_base("dreambooth", tiny_folder, _images(tmp_path / "imgs"), out)
                    + ["--steps", "1", "--rank", "1000", "--alpha", "500"]) == 0
    sd = load_file(str(out / "subj.safetensors"))
    downs = {k[: -len(".lora_down.weight")]: v for k, v in sd.items() if k.endswith(".lora_down.weight")}
    assert downs and all(d.shape[0] < 1000 for d in downs.values())  # every tiny layer was clamped
    for module, down in downs.items():
        assert float(sd[module + ".alpha"]) / down.shape[0] == pytest.approx(0.5)


def test_a_killed_saves_temp_file_is_removed_by_the_next_save_of_that_name(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".sks-hostile.safetensors.0badc0de.tmp"
    fresh = out / ".sks-hostile.safetensors.12345678.tmp"  # maybe another run's save in progress
    users = [out / ".sks-hostile.safetensors.mine.tmp", out / "sks-hostile.safetensors.0badc0de.tmp"]
    for p in (stale, fresh, *users):
        p.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for p in (stale, *users):
        os.utime(p, (hour_ago, hour_ago))
    assert cli.main(_base("ti", tiny_folder, _images(tmp_path / "imgs"), out) + ["--steps", "1"]) == 0
    assert not stale.exists()
    assert fresh.exists() and all(p.exists() for p in users)


def test_stop_signals_stop_once_and_do_not_abort_the_save(capsys):
    with cli._StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # during the save: acknowledged, not raised
        time.sleep(0.1)
    assert stop.reason() == "stopped by SIGTERM"
    assert "saving the last good result" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_mid_run_keeps_the_last_good_embedding(tiny_folder, tmp_path):
    imgs, out = _images(tmp_path / "imgs"), tmp_path / "out"
    cmd = [sys.executable, "-u", "-m", "likeness.cli", *_base("ti", tiny_folder, imgs, out),
           "--steps", "2000", "--save-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM; the last good result was saved to" in err and "Traceback" not in err
    assert load_file(str(out / "sks-hostile.safetensors"))["emb_params"].shape == (1, 32)
    assert 100 <= torch.load(out / "sks-hostile.pt", weights_only=True)["step"] < 2000


def test_sighup_stops_a_run_like_ctrl_c():
    with cli._StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
    assert stop.reason() == "stopped by SIGHUP" and stop.signum == signal.SIGHUP


def test_a_seed_written_as_a_float_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(_base("ti", tmp_path / "no-model", tmp_path, tmp_path / "out") + ["--seed", "1e23"])
    assert stop.value.code == 2 and "argument --seed: invalid int value: '1e23'" in capsys.readouterr().err
