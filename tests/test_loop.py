"""The shared training loop: fp32 state, non-finite guard, saves, Cancel."""
import pytest
import torch

from likeness.trainers import loop


class Quadratic:
    """Minimise ||p - target||^2; optionally poison chosen steps with NaN/inf."""

    def __init__(self, bad_steps=(), bad_value=float("nan")):
        self.p = torch.nn.Parameter(torch.zeros(4))
        self.target = torch.tensor([1.0, -2.0, 3.0, 0.5])
        self.bad_steps, self.bad_value = set(bad_steps), bad_value

    def parameters(self):
        return [self.p]

    def loss(self, step):
        loss = ((self.p - self.target) ** 2).sum()
        if step in self.bad_steps:
            loss = loss * self.bad_value
        return loss


def _run(method, steps=50, **kw):
    saves = []
    cfg = loop.LoopConfig(steps=steps, learning_rate=0.1, **kw)
    res = loop.run(method, cfg, device=torch.device("cpu"), compute_dtype=torch.float32,
                   save=lambda s: saves.append((s, method.p.detach().clone())))
    return res, saves


def test_converges_and_saves_at_the_end():
    m = Quadratic()
    res, saves = _run(m, steps=200, save_every=50)
    assert torch.allclose(m.p, m.target, atol=0.05)
    assert [s for s, _ in saves] == [50, 100, 150, 200]
    assert res.losses[-1] < 1e-2 * res.losses[0] and res.skipped_steps == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_steps_are_skipped_and_keep_the_last_good_state(bad):
    m = Quadratic(bad_steps={5, 6}, bad_value=bad)
    snapshots = {}

    def progress(step, total, loss, img):
        snapshots[step] = (loss, m.p.detach().clone())

    cfg = loop.LoopConfig(steps=10, learning_rate=0.1)
    res = loop.run(m, cfg, device=torch.device("cpu"), compute_dtype=torch.float32, save=lambda s: None,
                   progress=progress)
    assert res.skipped_steps == 2 and len(res.losses) == 8
    assert snapshots[5][0] is None and snapshots[6][0] is None  # reported as skipped
    assert torch.equal(snapshots[4][1], snapshots[6][1])  # untouched through the bad steps
    assert torch.isfinite(m.p).all() and not torch.equal(snapshots[6][1], snapshots[7][1])


def test_gives_up_after_many_bad_steps_with_a_clear_message():
    m = Quadratic(bad_steps=set(range(3, 100)))
    with pytest.raises(FloatingPointError, match="non-finite.*last good result \\(step 2\\)"):
        _run(m, steps=50, max_bad_steps=5)
    assert torch.isfinite(m.p).all()


class Cancelled(BaseException):
    """Stands in for ComfyUI's InterruptProcessingException (also a BaseException)."""


def test_cancel_saves_the_last_good_state_then_propagates():
    m = Quadratic()
    saves = []
    at_cancel = {}

    def progress(step, total, loss, img):
        if step == 7:
            at_cancel["p"] = m.p.detach().clone()
            raise Cancelled()

    cfg = loop.LoopConfig(steps=100, learning_rate=0.1, save_every=5)
    with pytest.raises(Cancelled):
        loop.run(m, cfg, device=torch.device("cpu"), compute_dtype=torch.float32,
                 save=lambda s: saves.append((s, m.p.detach().clone())), progress=progress)
    assert [s for s, _ in saves] == [5, 7]
    assert torch.equal(saves[-1][1], at_cancel["p"])


def test_cancel_before_any_step_writes_nothing():
    class Boom(Quadratic):
        def loss(self, step):
            raise Cancelled()

    saves = []
    with pytest.raises(Cancelled):
        loop.run(Boom(), loop.LoopConfig(steps=5, learning_rate=0.1), device=torch.device("cpu"),
                 compute_dtype=torch.float32, save=saves.append)
    assert saves == []


def test_trainable_tensors_must_be_fp32():
    m = Quadratic()
    m.p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    with pytest.raises(TypeError, match="fp32"):
        _run(m, steps=1)


def test_previews_only_on_their_interval():
    m = Quadratic()
    got = []
    cfg = loop.LoopConfig(steps=10, learning_rate=0.1, preview_every=4)
    loop.run(m, cfg, device=torch.device("cpu"), compute_dtype=torch.float32, save=lambda s: None,
             progress=lambda s, t, l, img: got.append((s, img is not None)),
             preview=lambda s: torch.zeros(8, 8, 3))
    assert [s for s, has in got if has] == [4, 8, 10]
