"""The memory preflight: the measurement is exact where it can be checked by hand, the extrapolation
from tiny probes matches the real step at the training size, and a run that would not fit either
switches on gradient checkpointing and says so, or is refused with the setting to change — before
any image is encoded or any file written."""
from __future__ import annotations

import pytest
import torch

from likeness.trainers import data as D
from likeness.trainers import preflight as P
from likeness.trainers.dreambooth import DreamBoothConfig, train_dreambooth
from likeness.trainers.textual_inversion import TIConfig, train_textual_inversion

MB = 1024 ** 2


def _mlp_step(hw):
    lin = torch.nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(2, hw[0] * hw[1], 64, requires_grad=True)
    return lin(lin(x).relu()).relu().sum()


def test_retained_bytes_counts_what_backward_keeps():
    # kept: the leaf input and the two relu outputs (fp32, 2 x tokens x 64), nothing of the weights
    for hw in ((8, 8), (24, 24)):
        expected = 3 * 2 * hw[0] * hw[1] * 64 * 4
        assert expected <= P.retained_bytes(lambda: _mlp_step(hw)) <= expected + 64 * 1024


def test_extrapolation_is_exact_for_a_materialised_attention_map():
    def attention(hw):
        x = torch.randn(1, hw[0] * hw[1], 16, requires_grad=True)
        return ((x @ x.transpose(1, 2)).softmax(-1) @ x).sum()

    assert P.extrapolate(attention, 4, (32, 32)) == P.retained_bytes(lambda: attention((32, 32)))


def _need(plain, ckpt):
    return P.Need(state=0, activations=plain, activations_checkpointed=ckpt)


def test_decide_keeps_a_run_that_fits_and_adds_checkpointing_when_needed():
    need = _need(4000 * MB, 500 * MB)
    fits = P.decide(need, 8 * P.GiB, checkpointing=False, what_to_lower="x")
    assert (fits.checkpointing, fits.note) == (False, "")
    tight = P.decide(need, 2 * P.GiB, checkpointing=False, what_to_lower="x")
    assert tight.checkpointing and "gradient checkpointing" in tight.note and tight.estimate <= 2 * P.GiB


def test_decide_refuses_naming_the_setting():
    with pytest.raises(P.PreflightError, match="lower the batch size"):
        P.decide(_need(4000 * MB, 900 * MB), P.GiB, checkpointing=False,
                 what_to_lower="the batch size")
    with pytest.raises(P.PreflightError):  # a host that cannot checkpoint has nothing to switch on
        P.decide(_need(4000 * MB, None), 2 * P.GiB, checkpointing=False, what_to_lower="x")


def test_no_budget_known_means_nothing_measured(tiny_sd1_host):
    def never(hw):
        raise AssertionError("measured without a budget")

    choice = P.plan(tiny_sd1_host, never, target_hw=(8, 8), trainable_numel=10, optimizer="adamw",
                    checkpointing=False, budget_gb=0.0, what_to_lower="x")
    assert choice.budget is None and not choice.checkpointing


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_probe_extrapolation_matches_the_real_step(family, request):
    host = request.getfixturevalue(f"tiny_{family}_host")
    vecs = {e.key: torch.zeros(1, e.width, requires_grad=True) for e in host.text_encoders()}
    step = P.denoising_step(host, "a photo of zqx_lk", 2, "zqx_lk", vecs)
    target = (6 * host.latent_multiple, 6 * host.latent_multiple)
    with host.training():
        predicted = P.extrapolate(step, host.latent_multiple, target)
        real = P.retained_bytes(lambda: step(target))
    assert abs(predicted - real) <= 0.02 * real


def _images():
    return D.images_from_batch(torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)))


class _Spy:
    """Counts the host calls the preflight must (checkpointing) or must not (encoding) cause."""

    def __init__(self, host, monkeypatch):
        self.ckpt, self.encoded = 0, 0
        real_ckpt, real_enc = host.gradient_checkpointing, host.encode_images

        def ckpt():
            self.ckpt += 1
            return real_ckpt()

        def enc(images):
            self.encoded += 1
            return real_enc(images)

        monkeypatch.setattr(host, "gradient_checkpointing", ckpt)
        monkeypatch.setattr(host, "encode_images", enc)


def _measured(monkeypatch) -> list:
    """What the trainer's own preflight measured: (plain, checkpointed) activations per call."""
    seen, real = [], P.measure

    def measure(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(P, "measure", measure)
    return seen


def test_dreambooth_turns_on_checkpointing_for_a_tight_budget_and_says_so(tiny_sd1_host, tmp_path, monkeypatch):
    host, seen = tiny_sd1_host, _measured(monkeypatch)

    def cfg(name, budget):
        return DreamBoothConfig(name=name, output_dir=tmp_path, instance_prompt="a photo of sks_lk dog", steps=2,
                                save_every=0, preview_every=0, memory_budget_gb=budget)

    roomy = train_dreambooth(host, _images(), cfg("roomy", 64.0))
    assert roomy.notes == [] and len(seen) == 1
    plain, ckpt = seen[0]
    assert ckpt < plain  # LoRA keeps every adapted layer's input; checkpointing keeps block inputs
    # a budget between the two peaks (the LoRA's own state is tiny next to the activations)
    low = P.Need(0, plain, ckpt).peak(checkpointing=True)
    high = P.Need(0, plain, ckpt).peak(checkpointing=False)
    spy = _Spy(host, monkeypatch)
    res = train_dreambooth(host, _images(), cfg("tight", (low + high) / 2 / P.GiB))
    assert spy.ckpt >= 2 and any("gradient checkpointing" in n for n in res.notes)
    assert (tmp_path / "tight.safetensors").is_file()


def test_a_run_that_cannot_fit_is_refused_before_any_work(tiny_sd1_host, tmp_path, monkeypatch):
    spy = _Spy(tiny_sd1_host, monkeypatch)
    ti = TIConfig(name="toobig_lk", output_dir=tmp_path / "ti", steps=2, save_every=0, preview_every=0,
                  memory_budget_gb=1e-6)
    with pytest.raises(P.PreflightError, match="batch size or the resolution"):
        train_textual_inversion(tiny_sd1_host, _images(), ti)
    db = DreamBoothConfig(name="toobig", output_dir=tmp_path / "db", instance_prompt="a photo of sks_lk dog",
                          steps=2, save_every=0, preview_every=0, memory_budget_gb=1e-6)
    with pytest.raises(P.PreflightError, match="mode lora instead of full"):
        train_dreambooth(tiny_sd1_host, _images(), db)
    assert spy.encoded == 0
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_budget_is_checked_with_the_other_options():
    from likeness.trainers import textual_inversion
    with pytest.raises(ValueError, match="memory budget"):
        textual_inversion.check_config(TIConfig(name="x", output_dir=".", memory_budget_gb=float("nan")))


def test_the_probes_run_eagerly_under_compile(tiny_sd1_host):
    from likeness.trainers.compile import compiled_step

    vecs = {e.key: torch.zeros(1, e.width, requires_grad=True) for e in tiny_sd1_host.text_encoders()}
    step = P.denoising_step(tiny_sd1_host, "a photo of zqx_lk", 1, "zqx_lk", vecs)
    with tiny_sd1_host.training(), compiled_step(tiny_sd1_host, "default", note=lambda _: None) as state:
        choice = P.plan(tiny_sd1_host, step, target_hw=(16, 16), trainable_numel=10, optimizer="adamw",
                        checkpointing=False, budget_gb=64.0, what_to_lower="x")
    assert choice.estimate > 0 and state.calls == 0 and state.warmup_seconds == 0
