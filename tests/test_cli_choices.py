"""The command line reads its choices and DreamBooth's per-mode defaults from the trainers'
registries (the nodes read the same ones: tests/test_nodes_offline.py), and `likeness --help`
imports nothing of the testbed (world/, demo.py, bench/)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from likeness import cli
from likeness.trainers import data as D
from likeness.trainers import diff_sampling as DS
from likeness.trainers import dreambooth as DB
from likeness.trainers.lora import PRESETS
from likeness.trainers.seedselect import STARTS


def _choices(build, dest: str) -> list:
    parser = argparse.ArgumentParser()
    build(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    (command,) = sub.choices.values()
    return list(next(a for a in command._actions if a.dest == dest).choices)


def test_choices_are_the_registries():
    assert _choices(cli._ti_parser, "templates") == list(D.TEMPLATE_KINDS)
    assert _choices(cli._dreambooth_parser, "mode") == list(DB.MODES)
    assert _choices(cli._dreambooth_parser, "prompts") == list(DB.PROMPT_SOURCES)
    assert _choices(cli._dreambooth_parser, "targets") == list(PRESETS)
    assert _choices(cli._seedselect_parser, "sampler") == list(DS.SAMPLERS)
    assert _choices(cli._seedselect_parser, "scheduler") == list(DS.SCHEDULERS)
    assert _choices(cli._seedselect_parser, "start") == list(STARTS)


@pytest.fixture
def captured_config(monkeypatch):
    """Run `likeness dreambooth` up to the trainer, which records the config instead of training."""
    from likeness.hosts import diffusers as host_module

    seen = {}

    def train(host, images, cfg, **kw):
        seen["cfg"] = cfg
        return types.SimpleNamespace(steps_done=0, seconds=0.0, skipped_steps=0, files=[], notes=[])

    monkeypatch.setattr(DB, "train_dreambooth", train)
    monkeypatch.setattr(D, "load_image_folder", lambda path: types.SimpleNamespace(summary=lambda: "images"))
    monkeypatch.setattr(host_module.DiffusersHost, "load", classmethod(lambda cls, *a, **kw: object()))
    return seen


@pytest.mark.parametrize("mode", list(DB.MODES))
def test_dreambooth_defaults_per_mode_come_from_one_table(captured_config, tmp_path, monkeypatch, mode):
    monkeypatch.chdir(tmp_path)
    base = ["dreambooth", "--model", "m", "--images", "i", "--name", "n", "--instance-prompt", "a sks dog",
            "--mode", mode] + (["--token", "sks"] if mode == "pivotal" else [])  # the options are checked first
    assert cli.main(base) == 0
    cfg, want = captured_config["cfg"], DB.MODE_DEFAULTS[mode]
    assert {k: getattr(cfg, k) for k in want.config_fields()} == want.config_fields()
    assert Path(cfg.output_dir) == Path(want.folder) and cfg.mode == mode and cfg.prompts == "auto"
    assert cli.main(base + ["--steps", "7", "--lr", "0.5", "--save-every", "0", "--optimizer", "adamw",
                            "--out", "elsewhere", "--prompts", "instance"]) == 0
    cfg = captured_config["cfg"]
    assert (cfg.steps, cfg.learning_rate, cfg.save_every, cfg.optimizer) == (7, 0.5, 0, "adamw")
    assert Path(cfg.output_dir) == Path("elsewhere") and cfg.prompts == "instance"
    assert cfg.text_encoder_lr == want.text_encoder_lr


def test_unknown_options_are_refused_outside_the_benchmark(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ti", "--model", "m", "--images", "i", "--name", "n", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_help_imports_nothing_of_the_testbed():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "likeness.cli", "--help"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "dreambooth" in out.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert "likeness.trainers.dreambooth" in imported          # the registries the choices come from
    assert not [m for m in imported if m.split(".")[:2] in (["likeness", "world"], ["likeness", "demo"],
                                                             ["likeness", "bench"])]
