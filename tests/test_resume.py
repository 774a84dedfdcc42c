"""Stopping and continuing (issue 15): a run stopped at any step and resumed ends bit-identical on
the CPU to the same run never stopped; a state of another run is refused naming what differs; only
the last K states are kept, written atomically beside the result."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from likeness import cli
from likeness.trainers import data as D
from likeness.trainers import loop, run_state
from likeness.trainers.dreambooth import DreamBoothConfig, train_dreambooth
from likeness.trainers.textual_inversion import TIConfig, start_vectors, train_textual_inversion
from support.cli_process import stop_when


class Stop(BaseException):
    """What ComfyUI's Cancel is: a BaseException out of the progress callback."""


def _images(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return D.images_from_batch(torch.rand(n, size, size, 3, generator=g))


def _stop_at(step):
    def progress(s, total, loss, img):
        if s == step:
            raise Stop()
    return progress


def _ti(out, **kw):
    base = dict(name="sks-resume", output_dir=out, steps=9, learning_rate=5e-2, batch_size=2, save_every=4,
                preview_every=0, random_crop=True, resolution=64, flip=True, seed=3)
    base.update(kw)
    return TIConfig(**base)


def test_ti_stopped_and_resumed_is_bit_identical(tiny_sd1_host, tmp_path):
    host, imgs = tiny_sd1_host, _images(size=80)
    whole = train_textual_inversion(host, imgs, _ti(tmp_path / "a"))
    with pytest.raises(Stop):
        train_textual_inversion(host, imgs, _ti(tmp_path / "b"), progress=_stop_at(6))
    states = run_state.list_states(tmp_path / "b", "sks-resume")
    assert [p.name for p in states] == ["sks-resume.step00000004.likeness-state",
                                        "sks-resume.step00000006.likeness-state"]
    seen = []
    res = train_textual_inversion(host, imgs, _ti(tmp_path / "b", resume="latest"),
                                  progress=lambda s, n, loss, img: seen.append((s, loss)))
    assert res.resumed_from == 6 and res.steps_done == 9
    assert torch.equal(res.vectors["clip_l"], whole.vectors["clip_l"])
    assert res.losses == whole.losses  # the history continues, every value the same
    assert [s for s, _ in seen] == list(range(1, 10))  # the chart is redrawn from step 1, then continues
    assert [v for _, v in seen] == whole.losses
    saved = load_file(str(tmp_path / "b" / "sks-resume.safetensors"))["emb_params"]
    assert torch.equal(saved, whole.vectors["clip_l"])
    # keep 2: the final state and the one before it
    assert [p.name[-27:] for p in run_state.list_states(tmp_path / "b", "sks-resume")] == [
        "step00000008.likeness-state", "step00000009.likeness-state"]


def test_ti_resume_from_a_chosen_state_and_train_longer(tiny_sd1_host, tmp_path):
    host, imgs = tiny_sd1_host, _images()
    whole = train_textual_inversion(host, imgs, _ti(tmp_path / "a", steps=12, resolution=None, random_crop=False))
    short = _ti(tmp_path / "b", steps=8, resolution=None, random_crop=False, keep_states=5)
    train_textual_inversion(host, imgs, short)
    chosen = run_state.state_path(tmp_path / "b", "sks-resume", 4)
    res = train_textual_inversion(host, imgs, _ti(tmp_path / "b", steps=12, resolution=None, random_crop=False,
                                                  resume=str(chosen)))
    assert res.resumed_from == 4 and torch.equal(res.vectors["clip_l"], whole.vectors["clip_l"])


@pytest.mark.parametrize("change, named", [
    (dict(learning_rate=1e-2), "learning_rate"),
    (dict(num_vectors=2), "num_vectors"),
    (dict(seed=4), "seed"),
    ("images", "images"),
])
def test_a_state_of_another_run_is_refused_naming_what_differs(tiny_sd1_host, tmp_path, change, named):
    host = tiny_sd1_host
    train_textual_inversion(host, _images(), _ti(tmp_path, steps=4, resolution=None, random_crop=False))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    imgs = _images(seed=1) if change == "images" else _images()
    kw = {} if change == "images" else change
    cfg = _ti(tmp_path, steps=8, resolution=None, random_crop=False, resume="latest", **kw)
    with pytest.raises(run_state.ResumeError, match=rf"belongs to another run.*{named}: saved"):
        train_textual_inversion(host, imgs, cfg)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written


def test_resume_refusals_before_any_work(tiny_sd1_host, tmp_path):
    host = tiny_sd1_host
    with pytest.raises(run_state.ResumeError, match="no saved run state of 'sks-resume'"):
        train_textual_inversion(host, _images(), _ti(tmp_path, resume="latest"))
    train_textual_inversion(host, _images(), _ti(tmp_path, steps=4, resolution=None, random_crop=False))
    with pytest.raises(run_state.ResumeError, match="already at step 4; set steps above 4"):
        train_textual_inversion(host, _images(), _ti(tmp_path, steps=4, resolution=None, random_crop=False,
                                                     resume="latest"))
    (tmp_path / "junk.likeness-state").write_bytes(b"not a state")
    with pytest.raises(run_state.ResumeError, match="not a readable Likeness run state"):
        train_textual_inversion(host, _images(), _ti(tmp_path, steps=8, resume="junk.likeness-state"))


DB_MODES = {
    "lora": dict(rank=2, train_text_encoder=True),
    "full": dict(optimizer="adamw", learning_rate=1e-4),
    "pivotal": dict(token="sks_lk", ti_fraction=0.5, rank=2),
}


def _db(out, mode, **kw):
    base = dict(name="subj", output_dir=out, instance_prompt="a photo of sks_lk dog", mode=mode, steps=7,
                save_every=3, preview_every=0, seed=5, batch_size=1, flip=True, class_prompt="a photo of a dog",
                num_class_images=2, class_sample_steps=2, embedding_dir=out / "emb", **DB_MODES[mode])
    base.update(kw)
    return DreamBoothConfig(**base)


@pytest.mark.parametrize("mode", list(DB_MODES))
def test_dreambooth_stopped_and_resumed_is_bit_identical(tiny_sd1_host, tmp_path, mode):
    host, imgs = tiny_sd1_host, _images()
    whole = train_dreambooth(host, imgs, _db(tmp_path / "a", mode))
    with pytest.raises(Stop):
        train_dreambooth(host, imgs, _db(tmp_path / "b", mode), progress=_stop_at(5))
    res = train_dreambooth(host, imgs, _db(tmp_path / "b", mode, resume="latest"))
    assert res.resumed_from == 5 and res.losses == whole.losses
    if mode == "full":
        assert whole.deltas and all(torch.equal(res.deltas[k], v) for k, v in whole.deltas.items())
    else:
        assert all(torch.equal(a, b) for k in whole.lora_layers
                   for a, b in zip(res.lora_layers[k][:2], whole.lora_layers[k][:2]))
    if mode == "pivotal":
        assert all(torch.equal(res.vectors[k], v) for k, v in whole.vectors.items())


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_sd1_host):
    import tiny_models

    return tiny_models.save_diffusers_folder(tiny_models.host_parts(tiny_sd1_host),
                                             tmp_path_factory.mktemp("model") / "tiny-sd1")


def _image_folder(folder):
    folder.mkdir()
    for i, im in enumerate(_images().images):
        Image.fromarray((im * 255).round().byte().numpy()).save(folder / f"{i}.png")
    return folder


def _ti_args(model, imgs, out, *extra):
    return ["ti", "--model", str(model), "--images", str(imgs), "--out", str(out), "--device", "cpu",
            "--name", "sks-cli", "--preview-every", "0", "--steps", "16", "--save-every", "3",
            "--lr", "0.05", *extra]


def test_cli_ctrl_c_then_resume_is_bit_identical(tiny_folder, tmp_path, capsys, monkeypatch):
    # the child process must sum in the same order as this one: the same number of CPU threads
    # (other test modules set this process to one)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    imgs = _image_folder(tmp_path / "imgs")
    assert cli.main(_ti_args(tiny_folder, imgs, tmp_path / "whole")) == 0
    out = tmp_path / "stopped"
    rc, err = stop_when(_ti_args(tiny_folder, imgs, out), "step 4/", signal.SIGINT)
    assert rc == 128 + signal.SIGINT, err
    assert re.search(r"interrupted; the last good result \(step (\d+)\) was saved to .*continue it with "
                     r"--resume \(state sks-cli\.step\d{8}\.likeness-state\)", err), err
    states = run_state.list_states(out, "sks-cli")
    assert states and run_state.read_header(states[-1])["step"] < 16
    capsys.readouterr()
    assert cli.main(_ti_args(tiny_folder, imgs, out, "--resume")) == 0
    assert "continued after step" in capsys.readouterr().out
    whole = load_file(str(tmp_path / "whole" / "sks-cli.safetensors"))["emb_params"]
    assert torch.equal(load_file(str(out / "sks-cli.safetensors"))["emb_params"], whole)
    assert torch.load(out / "sks-cli.pt", weights_only=True)["step"] == 16


# ------------------------------------------------------------------------------ a run owns its name


class Line:
    """A tiny method for the loop alone: fit p to a target."""

    def __init__(self):
        self.p = torch.nn.Parameter(torch.zeros(3))

    def parameters(self):
        return [self.p]

    def loss(self, step):
        return ((self.p - torch.tensor([1.0, 2.0, 3.0])) ** 2).sum()


def _loop(folder, **kw):
    spec = run_state.StateSpec(folder, "owned", {"method": "line"}, **kw)
    cfg = loop.LoopConfig(steps=3, learning_rate=0.1, save_every=1, state=spec)
    return loop.run(Line(), cfg, device=torch.device("cpu"), compute_dtype=torch.float32, save=lambda s: None)


def test_a_second_run_of_the_same_name_refuses_while_the_first_lives(tmp_path):
    lock = tmp_path / "owned.likeness-lock"
    tmp_path.mkdir(exist_ok=True)
    lock.write_text(f"{os.getppid()}\n{os.uname().nodename}\n")  # a live process of this machine
    with pytest.raises(FileExistsError, match=rf"another run \(process {os.getppid()}\) is writing 'owned'"):
        _loop(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [lock.name]  # nothing written, the lock left alone


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "owned.likeness-lock").write_text(f"{int(dead.stdout)}\n{os.uname().nodename}\n")
    res = _loop(tmp_path)
    assert res.steps_done == 3 and res.state_path.name == "owned.step00000003.likeness-state"
    assert not (tmp_path / "owned.likeness-lock").exists()
    assert len(run_state.list_states(tmp_path, "owned")) == 2  # keep 2


# ------------------------------------------------------------------------ continue from a file (TI)


def test_ti_continues_from_its_own_file_and_counts_steps_on(tiny_sd1_host, tmp_path):
    host = tiny_sd1_host
    first = train_textual_inversion(host, _images(), _ti(tmp_path, name="sks-base", steps=4, resolution=None,
                                                         random_crop=False, save_every=0))
    more = _ti(tmp_path, name="sks-more", steps=3, resolution=None, random_crop=False, save_every=0,
               init_file=str(tmp_path / "sks-base.safetensors"), num_vectors=5)
    vecs, step = start_vectors(host, more, "")
    assert step == 4 and torch.equal(vecs["clip_l"], first.vectors["clip_l"])  # its count, not num_vectors
    res = train_textual_inversion(host, _images(), more)
    assert res.first_step == 4 and res.vectors["clip_l"].shape == first.vectors["clip_l"].shape
    assert torch.load(tmp_path / "sks-more.pt", weights_only=True)["step"] == 7
    vecs, step = start_vectors(host, _ti(tmp_path, init_file=str(tmp_path / "sks-base.pt")), "")  # the A1111 .pt
    assert step == 4 and torch.equal(vecs["clip_l"], first.vectors["clip_l"])


def test_ti_continues_from_another_tools_files(tiny_sd1_host, tiny_sdxl_host, tmp_path):
    from safetensors.torch import save_file

    v = torch.randn(2, 32)
    save_file({"emb_params": v}, str(tmp_path / "kohya.safetensors"))
    vecs, step = start_vectors(tiny_sd1_host, _ti(tmp_path, init_file=str(tmp_path / "kohya.safetensors")), "")
    assert step == 0 and torch.equal(vecs["clip_l"], v)
    widths = {e.key: e.width for e in tiny_sdxl_host.text_encoders()}
    pair = {k: torch.randn(3, w) for k, w in widths.items()}
    save_file(pair, str(tmp_path / "xl.safetensors"))
    vecs, _ = start_vectors(tiny_sdxl_host, _ti(tmp_path, init_file=str(tmp_path / "xl.safetensors")), "")
    assert all(torch.equal(vecs[k], pair[k]) for k in widths)
    with pytest.raises(ValueError, match=r"init file .*xl\.safetensors.*this model's family"):
        train_textual_inversion(tiny_sd1_host, _images(), _ti(tmp_path, init_file=str(tmp_path / "xl.safetensors")))
    assert not (tmp_path / "sks-resume.safetensors").exists()


# ------------------------------------------------------------- the guard checks the state it keeps


class Overflowing(Line):
    """Finite parameters whose *result* is not finite beyond 1.5, as huge vectors overflow a text
    encoder: the next forward's loss says so, and ``state_ok`` does before a save."""

    def __init__(self):
        super().__init__()
        self.asked = 0  # how often the loop called state_ok

    def fine(self):
        return bool((self.p.abs() < 1.5).all())

    def state_ok(self):
        self.asked += 1
        return self.fine()

    def loss(self, step):
        value = super().loss(step)
        return value if self.fine() else value * float("nan")


@pytest.mark.parametrize("save_every", [0, 1])
def test_an_update_whose_state_gives_a_non_finite_result_is_never_kept(tmp_path, save_every):
    m, saved = Overflowing(), []
    cfg = loop.LoopConfig(steps=40, learning_rate=0.1, max_bad_steps=50, save_every=save_every)
    res = loop.run(m, cfg, device=torch.device("cpu"), compute_dtype=torch.float32,
                   save=lambda s: saved.append((s, m.p.detach().clone())))
    assert res.skipped_steps > 0 and m.fine()
    assert saved and all(bool((p.abs() < 1.5).all()) for _, p in saved)
    assert [s for s, _ in saved] == sorted(s for s, _ in saved) and saved[-1][0] == res.saved_step < 40
    # proven by the next forward, asked only before a save: no extra forward per step
    assert m.asked <= len(saved)


def test_the_textual_inversion_step_runs_no_extra_text_encoder_forward(tiny_sd1_host, tmp_path, monkeypatch):
    from likeness.trainers.textual_inversion import TextualInversion

    calls = []
    real = TextualInversion.state_ok
    monkeypatch.setattr(TextualInversion, "state_ok", lambda self: calls.append(1) or real(self))
    res = train_textual_inversion(tiny_sd1_host, _images(), _ti(tmp_path, steps=9, save_every=4, resolution=None,
                                                                  random_crop=False))
    assert res.steps_done == 9 and len(calls) == 3  # the saves at 4, 8 and the end


# ------------------------------------------------------------ continue from a file (DreamBooth)


def _kohya_file(host, path, *, rank, alpha, targets, text_encoder, steps, drop_alpha=False, seed=0):
    """Another tool's LoRA: its own rank, alpha and subset of layers, fp32 factors, kohya keys,
    optionally without ``alpha`` (every loader reads it as the rank) and with text-encoder layers."""
    from safetensors.torch import save_file

    from likeness.trainers.formats import kohya_lora
    from likeness.trainers.lora import target_weights

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for part in ["unet"] + (["clip_l"] if text_encoder else []):
        params = host.tunable_parameters(part)
        for n in target_weights(params, targets, text_encoder=part != "unet"):
            w = params[n]
            layers[n[:-len(".weight")]] = (torch.randn(rank, *w.shape[1:], generator=g) * 0.1,
                                           torch.randn(w.shape[0], rank, *w.shape[2:], generator=g) * 0.1, alpha)
    sd = kohya_lora.lora_state_dict(layers, family=host.info.family, dtype=torch.float32,
                                    layout=host.unet_layout(), naming=host.naming)
    if drop_alpha:
        sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    save_file(sd, str(path), metadata={"ss_steps": str(steps), "ss_network_dim": str(rank)})
    return sd


def _start(host, cfg):
    from likeness.trainers import dreambooth as DB

    plan = DB.prepare(host, _images(), cfg)
    return DB._Trainables(host, cfg, plan.init_text, plan.start)


def _denoised(host, x, sigma, prompt):
    with torch.no_grad():
        return host.denoise(x, sigma, host.encode_text([prompt]))


@pytest.mark.parametrize("text_encoder, drop_alpha", [(True, False), (False, True)])
def test_dreambooth_lora_continues_another_tools_file_exactly(tiny_sd1_host, tmp_path, text_encoder, drop_alpha):
    from likeness.trainers.formats import kohya_lora

    host, path = tiny_sd1_host, tmp_path / "other.safetensors"
    sd = _kohya_file(host, path, rank=3, alpha=1.5, targets="cross_kv", text_encoder=text_encoder, steps=120,
                     drop_alpha=drop_alpha)
    cfg = _db(tmp_path, "lora", steps=2, save_every=0, class_prompt="", rank=8, init_lora=str(path))
    tr = _start(host, cfg)
    # step 0: the adapters are the file's layers, ranks and alphas - the same tensors written back
    back = kohya_lora.lora_state_dict(tr.lora_layers(), family=host.info.family, dtype=torch.float32,
                                      layout=host.unet_layout(), naming=host.naming)
    alpha_keys = {k for k in back if k.endswith(".alpha")}
    assert set(back) - alpha_keys == set(sd) - alpha_keys and all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(float(back[k]) == (3.0 if drop_alpha else 1.5) for k in alpha_keys)
    # ... and the network trains from exactly what loading the file gives
    x, sigma, prompt = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([2.0]), \
        "a photo of sks_lk dog"
    with host.module_branches(tr.branches()):
        ours = _denoised(host, x, sigma, prompt)
    loaded = _denoised(host.with_lora(sd), x, sigma, prompt)
    assert torch.allclose(ours, loaded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, _denoised(host, x, sigma, prompt), atol=1e-4)  # the file does act
    res = train_dreambooth(host, _images(), cfg)
    meta = kohya_lora.load_lora(tmp_path / "subj.safetensors", family=host.info.family)[1]
    assert res.first_step == 120 and meta["ss_steps"] == "122" and meta["ss_max_train_steps"] == "122"
    assert {k for k in load_file(str(tmp_path / "subj.safetensors"))} == set(back)  # its layers, at rank 3


def test_pivotal_continues_its_own_lora_and_embedding(tiny_sd1_host, tmp_path):
    host = tiny_sd1_host
    first = train_dreambooth(host, _images(), _db(tmp_path / "a", "pivotal", steps=4, save_every=0, class_prompt=""))
    lora, emb = tmp_path / "a" / "subj.safetensors", tmp_path / "a" / "emb" / "sks_lk.safetensors"
    cfg = _db(tmp_path / "b", "pivotal", steps=3, save_every=0, class_prompt="", init_lora=str(lora),
              init_embedding=str(emb), num_vectors=5)
    tr = _start(host, cfg)
    assert all(torch.equal(tr.vectors[k].detach(), v) for k, v in first.vectors.items())  # its count, not 5
    assert all(torch.equal(tr.lora_layers()[k][1], v[1].half().float()) for k, v in first.lora_layers.items())
    res = train_dreambooth(host, _images(), cfg)
    assert res.first_step == 4 and res.vectors["clip_l"].shape == first.vectors["clip_l"].shape
    assert torch.load(tmp_path / "b" / "emb" / "sks_lk.pt", weights_only=True)["step"] == 7
    with safe_open(str(tmp_path / "b" / "subj.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "7"


def test_an_init_lora_for_another_model_is_refused_naming_the_file_and_key(tiny_sd1_host, tiny_sdxl_host, tmp_path):
    from safetensors.torch import save_file

    host = tiny_sd1_host
    sd = _kohya_file(host, tmp_path / "ok.safetensors", rank=2, alpha=2.0, targets="attention",
                     text_encoder=False, steps=0)
    first = sorted(k for k in sd if k.endswith(".lora_down.weight"))[0]
    bad = dict(sd, **{first: torch.zeros(2, 7)})  # another width
    save_file(bad, str(tmp_path / "narrow.safetensors"))
    cfg = _db(tmp_path / "out", "lora", init_lora=str(tmp_path / "narrow.safetensors"))
    key = first[:-len(".lora_down.weight")]
    with pytest.raises(ValueError, match=rf"init LoRA .*narrow\.safetensors: layer {key}: .* is \d+ -> \d+ in this "
                                         r"model, but the file's factors are down \(2, 7\)"):
        train_dreambooth(host, _images(), cfg)
    _kohya_file(tiny_sdxl_host, tmp_path / "xl.safetensors", rank=2, alpha=2.0, targets="attention",
                text_encoder=False, steps=0)
    with pytest.raises(ValueError, match=r"init LoRA .*xl\.safetensors: .*another model"):
        train_dreambooth(host, _images(), _db(tmp_path / "out", "lora", init_lora=str(tmp_path / "xl.safetensors")))
    with pytest.raises(FileNotFoundError, match="init LoRA .*missing.safetensors does not exist"):
        train_dreambooth(host, _images(), _db(tmp_path / "out", "lora", init_lora=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match="a full fine-tune starts from the model"):
        train_dreambooth(host, _images(), _db(tmp_path / "out", "full", init_lora=str(tmp_path / "ok.safetensors")))
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_dreambooth_continues_a_lora_file(tiny_folder, tiny_sd1_host, tmp_path, capsys):
    _kohya_file(tiny_sd1_host, tmp_path / "other.safetensors", rank=3, alpha=1.5, targets="cross_kv",
                text_encoder=True, steps=40)
    imgs = _image_folder(tmp_path / "imgs")
    args = ["dreambooth", "--model", str(tiny_folder), "--images", str(imgs), "--name", "more", "--instance-prompt",
            "a photo of sks dog", "--steps", "2", "--preview-every", "0", "--device", "cpu", "--out",
            str(tmp_path / "out"), "--init-lora", str(tmp_path / "other.safetensors")]
    assert cli.main(args) == 0, capsys.readouterr().err
    with safe_open(str(tmp_path / "out" / "more.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "42" and f.metadata()["ss_network_dim"] == "3"
    assert cli.main(args[:-1] + [str(tmp_path / "nothing.safetensors"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "init LoRA" in err and "nothing.safetensors does not exist" in err
