"""Best step in the shapes world (world/best_step.py, bench/best_step.py): Spearman's rho and the
table by hand, and the CI version of the experiment - a short DreamBooth LoRA run at a learning
rate high enough to overfit within it, where the step best step picks (by the metrics on the world
classifier's embedding) must score at least as well as the last step on the classifier's own
combined measure, sqrt(concept probability x prompt fidelity), on held-out prompts."""
from __future__ import annotations

import math

import pytest

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


def test_the_pick_and_the_table():
    run = W.Run("lora", "moon", 30, [_snapshot(10, 0.30, 0.2, 0.9), _snapshot(20, 0.40, 0.4, 0.8),
                                     _snapshot(30, 0.20, 0.5, 0.3)], best_step=20, train_s=10, eval_s=2)
    assert run.snapshot(20).truth_score == pytest.approx(math.sqrt(0.4 * 0.8))
    assert run.pick_holds  # 0.566 at the pick >= 0.387 at the last step
    assert run.rho == pytest.approx(W.spearman([0.3, 0.4, 0.2], [math.sqrt(0.18), math.sqrt(0.32), math.sqrt(0.15)]))
    table = W.render_markdown([run], "python bench/best_step.py")
    assert table.startswith(W.MARK_START) and table.endswith(W.MARK_END)
    assert "| 20 ← |" in table and "best step **20**" in table and "20 % added" in table
