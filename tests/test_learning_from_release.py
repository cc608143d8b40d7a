"""The defended model learns from its noised release: the learner comparison runs and ranks as the
design says, and the defended default job (quick) ends well above chance."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from clicooper.cli import app
from clicooper.evaluation.release_learners import run_release_learners
from tests.conftest import tiny_config


def test_release_learners_report(digits, tmp_path):
    cfg = tiny_config(
        model={"arch": "small-cnn-dp", "n_trainers": 3, "cut_points": [1, 2, 3], "head_pretrain_epochs": 5},
        privacy={"dp": True, "epsilon": 8.0, "release": "one-shot"},
    )
    md = run_release_learners(cfg, digits, tmp_path, epochs=20, lr=1e-2)
    with (tmp_path / "release_learners.csv").open() as f:
        acc = {r["learner"]: float(r["test_accuracy"]) for r in csv.DictReader(f)}
    reference = acc["no DP: linear read-out of clean activations (reference)"]
    assert reference > 0.6  # the pre-trained head's embedding is discriminative
    assert acc["nearest class mean of the release"] > 0.3  # chance is 0.1
    assert "linear segments" in md.read_text()


def test_defended_quick_demo_learns(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.iterdir()
    s = json.loads((run / "summary.json").read_text())
    assert s["epsilon"] <= 2.0 + 1e-9 and "activation DP" in " ".join(s["defences"])
    assert s["test_accuracy"] > 0.6, s["test_accuracy"]  # chance is 0.1: the release is learnable
    shares = {c["party"]: c["share"] for c in s["compute"]}
    assert set(shares) == {"data_owner", "trainer_1", "trainer_2", "trainer_3"}
    assert abs(sum(shares.values()) - 1) < 1e-9
