"""The learner comparison on a noised one-shot release runs and its reference learns (the defended quick
demo's accuracy is asserted in tests/test_evaluation.py)."""

from __future__ import annotations

import csv

from clicooper.evaluation.release_learners import run_release_learners
from tests.conftest import tiny_config


def test_release_learners_report(digits, tmp_path):
    cfg = tiny_config(
        model={"arch": "small-cnn-dp", "n_trainers": 3, "cut_points": [1, 2, 3], "head_pretrain_epochs": 5},
        privacy={"dp": True, "epsilon": 16.0, "release": "one-shot"},
    )
    md = run_release_learners(cfg, digits, tmp_path, epochs=20, lr=1e-2)
    with (tmp_path / "release_learners.csv").open() as f:
        acc = {r["learner"]: float(r["test_accuracy"]) for r in csv.DictReader(f)}
    reference = acc["no DP: linear read-out of clean activations (reference)"]
    assert reference > 0.6  # the pre-trained head's embedding is discriminative
    assert acc["nearest class mean of the release"] > 0.3  # chance is 0.1
    assert "linear segments" in md.read_text()
