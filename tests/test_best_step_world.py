"""Best step in the shapes world (world/best_step.py, bench/best_step.py): Spearman's rho and the
table by hand, and the CI version of the experiment - a short DreamBooth LoRA run at a learning
rate high enough to overfit within it, where the step best step picks (by the metrics on the world
classifier's embedding) must score at least as well as the last step on the classifier's own
combined measure, sqrt(concept probability x prompt fidelity), on held-out prompts."""
from __future__ import annotations

import math

import pytest
import torch

from likeness.world import best_step as W
from likeness.world.model import BASE_MODEL_DIR


def test_spearman_by_hand():
    assert W.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert W.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks [1, 2, 3] vs [1.5, 1.5, 3] (a tie shares its mean rank): Pearson of the ranks
    assert W.spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(W.spearman([1, 2, 3], [7, 7, 7]))


def _snapshot(step, combined, prob, prompt):
    metrics = {"CLIP-I": 0.5, "diversity": 0.2, "combined": combined}
    return W.Snapshot(step, metrics, {"concept_fidelity": prob, "concept_probability": prob, "prompt_fidelity": prompt})


def test_the_world_text_tower_matches_its_image_tower():
    """CLIP-T in the world: the text tower carries the image tower's tag (the metrics refuse any
    other pairing), reads the class noun as "some shape", and puts each reference nearest to its
    own caption."""
    from likeness.trainers import metrics as M
    from likeness.world import quality as Q
    from likeness.world.quality_seedselect import WorldImageEncoder
    from likeness.world.text_tower import WorldTextEncoder, class_noun, stated

    image = WorldImageEncoder()
    text = WorldTextEncoder(image)
    M.check_same_tower(image, text)
    assert class_noun("moon") == "shape" and class_noun("checked") == "pattern"
    said = stated("a large red shape on a blue background, left")
    assert "shape" not in said and said["colour"] == "red" and said["background"] == "blue"
    assert "pattern" not in stated("a large red pattern circle on a white background")
    refs = Q.references("moon")
    captions = [M.with_class_noun(c, "sks-moon", "shape") for c in refs.captions("sks-moon")]
    sim = M.cosine_matrix(M.embed_all(image, refs.images_model), text.embed_text(captions))
    assert torch.equal(sim.argmax(1), torch.arange(len(captions)))
    assert torch.equal(text.embed_text(captions[:1]), text.embed_text(captions[:1]))  # deterministic


def test_the_pick_and_the_table():
    run = W.Run("lora", "moon", 30, [_snapshot(10, 0.30, 0.2, 0.9), _snapshot(20, 0.40, 0.4, 0.8),
                                     _snapshot(30, 0.20, 0.5, 0.3)], best_step=20, train_s=10, eval_s=2)
    assert run.snapshot(20).truth_score == pytest.approx(math.sqrt(0.4 * 0.8))
    assert run.pick_holds  # 0.566 at the pick >= 0.387 at the last step
    assert run.rho == pytest.approx(W.spearman([0.3, 0.4, 0.2], [math.sqrt(0.18), math.sqrt(0.32), math.sqrt(0.15)]))
    table = W.render_markdown([run], "python bench/best_step.py")
    assert table.startswith(W.MARK_START) and table.endswith(W.MARK_END)
    assert "| 20 ← |" in table and "best step **20**" in table and "20 % added" in table


def test_a_short_overfitting_run_picks_a_step_at_least_as_good_as_the_last(tmp_path):
    """DreamBooth LoRA at lr 1e-2 learns the moon within 100 steps and by 200 has stopped following
    the prompts (measured, one thread: the classifier's prompt fidelity on held-out prompts 0.92 at
    step 50, 0.40 at 200; about 50 s).  Best step, scored by the metrics alone (world classifier embedding, its text tower for
    CLIP-T), must pick a snapshot the classifier rates at least as high as the last one."""
    if not (BASE_MODEL_DIR / "model_index.json").exists():
        pytest.skip("world/base_model not trained")
    import time

    from likeness.hosts.diffusers import DiffusersHost

    t0, threads = time.perf_counter(), torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the numbers measured in the docstring; and no oversubscribed cores
    try:
        host = DiffusersHost.load(BASE_MODEL_DIR, device="cpu")
        opts = dict(steps=200, eval_every=50, lora_lr=1e-2, n_test=16, eval_prompts=4, sample_steps=10)
        run = W.run_mode(host, "moon", "lora", tmp_path, opts, log=print)
    finally:
        torch.set_num_threads(threads)
    first, last = run.snapshots[0], run.snapshots[-1]
    print(f"picked {run.best_step}; classifier: " + ", ".join(f"{s.step}: {s.truth_score:.3f}" for s in run.snapshots)
          + f"; rho {run.rho:.2f}; {time.perf_counter() - t0:.0f} s")
    assert [s.step for s in run.snapshots] == [50, 100, 150, 200]
    assert last.truth["prompt_fidelity"] < first.truth["prompt_fidelity"] - 0.1  # it did overfit
    assert run.snapshot(run.best_step).metrics["CLIP-T margin"] is not None  # CLIP-T counted
    assert run.pick_holds
