"""Privacy-utility sweep (`clicooper eval utility`): test accuracy against epsilon, one line per
gamma, for both release modes, with the undefended chain and centralized training as references.

Every configuration is trained from the same seed and initial weights. Accuracy is reported for
inference on clipped clean activations (the deployed model) and, for DP runs, with the same noise
at inference too (what the trainers could be shown of test inputs under the same guarantee).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clicooper.config import NO_DEFENCES, JobConfig  # noqa: E402
from clicooper.data import DatasetSplits  # noqa: E402
from clicooper.evaluation.report import Report  # noqa: E402
from clicooper.job import ChainJob, train_centralized  # noqa: E402

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
GAMMAS = (1, 2, 4)
MODES = ("per-step", "one-shot")


def privacy_variant(cfg: JobConfig, epsilon: float, gamma: int, mode: str) -> JobConfig:
    """The job with activation DP at `epsilon` (none if inf) and label expansion `gamma`."""
    dp = math.isfinite(epsilon)
    return cfg.replace(
        privacy={
            "dp": dp,
            "epsilon": epsilon if dp else None,
            "noise_multiplier": None,
            "release": mode,
            "gamma": gamma,
            "secret_seed": cfg.job.seed,
        }
    )


def undefended(cfg: JobConfig) -> JobConfig:
    return cfg.replace(privacy=NO_DEFENCES)


def run_variant(cfg: JobConfig, data: DatasetSplits) -> dict:
    t0 = time.perf_counter()
    job = ChainJob(cfg, data, None)
    s = job.run()
    row = {
        "test_accuracy": s.test_accuracy,
        "epsilon_spent": s.epsilon,
        "time_s": time.perf_counter() - t0,
        "sigma": getattr(job.defence, "noise_multiplier", None),
        "noisy_inference_accuracy": None,
    }
    if cfg.privacy.dp:
        job.defence.cfg = cfg.privacy.model_copy(update={"noise_at_inference": True})
        row["noisy_inference_accuracy"] = job.data_owner.evaluate("test", tag="noisy-inference")
    return row


def run_utility_sweep(
    cfg: JobConfig, data: DatasetSplits, out: Path, *, epsilons=EPSILONS, gammas=GAMMAS, modes=MODES
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    central, _ = train_centralized(undefended(cfg).replace(privacy={"gamma": 1}), data)
    plain = run_variant(undefended(cfg), data)
    rows = []
    for mode in modes:
        for gamma in gammas:
            for eps in epsilons:
                if not math.isfinite(eps) and mode != modes[0]:
                    continue  # without DP the release mode does not matter
                r = run_variant(privacy_variant(cfg, eps, gamma, mode), data)
                rows.append(
                    {
                        "release": mode if math.isfinite(eps) else "-",
                        "gamma": gamma,
                        "epsilon_target": eps,
                        **r,
                    }
                )
    with (out / "utility.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = _plot(rows, plain["test_accuracy"], central.test_accuracy, gammas, modes, out / "utility.png")
    report = Report(f"Privacy-utility sweep ({data.name})")
    report.text(
        f"{cfg.model.arch}, {cfg.model.n_trainers} trainers, {cfg.training.epochs} epoch(s), "
        f"{len(data.train_x)} training samples, batches: {cfg.training.sampling}. "
        f"References from the same run: centralized {central.test_accuracy:.4f}, "
        f"undefended chain {plain['test_accuracy']:.4f}."
    )
    report.table(
        rows,
        [
            "release",
            "gamma",
            "epsilon_target",
            "epsilon_spent",
            "sigma",
            "test_accuracy",
            "noisy_inference_accuracy",
            "time_s",
        ],
    )
    report.figure(png, "test accuracy vs epsilon (clean inference), one line per gamma")
    md, _ = report.write(out, "utility")
    return md


def _plot(rows, plain_acc, central_acc, gammas, modes, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    finite = sorted({r["epsilon_target"] for r in rows if math.isfinite(r["epsilon_target"])})
    x_inf = (max(finite) * 2) if finite else 1.0
    for ax, mode in zip(axes[0], modes, strict=True):
        for g in gammas:
            rs = [r for r in rows if r["gamma"] == g and r["release"] in (mode, "-")]
            rs.sort(key=lambda r: r["epsilon_target"])
            xs = [r["epsilon_target"] if math.isfinite(r["epsilon_target"]) else x_inf for r in rs]
            ax.plot(xs, [r["test_accuracy"] for r in rs], "o-", label=f"gamma={g}")
        ax.axhline(plain_acc, color="k", ls="--", lw=1, label="undefended chain")
        ax.axhline(central_acc, color="grey", ls=":", lw=1, label="centralized")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (rightmost point: no DP)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"release: {mode}")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
