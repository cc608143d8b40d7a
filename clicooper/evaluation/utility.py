"""Privacy-utility frontier (`clicooper eval utility`): test accuracy against epsilon, for the
activation-level guarantee (DP release of a head pre-trained on the private data) and, where
available, the end-to-end guarantee (head trained with DP-SGD, composed with the release).

Every point is the configured job with only the privacy settings changed, trained from the same
seed, and shows the data owner's share of the training multiply-adds. References from the same
run: the same model with every defence off (the undefended chain) and trained centrally.
Accuracy is for inference on clean (clipped, un-noised) activations, the deployed model.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clicooper.config import EMBEDDING_ARCHS, NO_DEFENCES, JobConfig  # noqa: E402
from clicooper.data import DatasetSplits  # noqa: E402
from clicooper.evaluation.e2e import E2E_EMBED  # noqa: E402
from clicooper.evaluation.report import Report  # noqa: E402
from clicooper.job import ChainJob, build_model_and_plan, pretrain_head, train_centralized  # noqa: E402
from clicooper.models import split_model  # noqa: E402

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
GUARANTEES = ("activation", "end-to-end")


def privacy_variant(cfg: JobConfig, epsilon: float) -> JobConfig:
    """The job with activation DP at `epsilon` (none if inf); every other setting unchanged."""
    dp = math.isfinite(epsilon)
    privacy = {"dp": dp, "epsilon": epsilon if dp else None, "noise_multiplier": None, "budget_epsilon": None}
    if not dp:  # no DP: no end-to-end guarantee either
        privacy |= {"guarantee": "activation", "head_dp_noise_multiplier": None}
    return cfg.replace(privacy=privacy)


def end_to_end_variant(cfg: JobConfig, epsilon: float) -> JobConfig:
    """The job with end-to-end DP at a total `epsilon`: the head is trained with DP-SGD instead of
    pre-trained on the private data (see docs/privacy.md, "Two guarantees")."""
    model: dict = {"head_pretrain_epochs": 0}
    if cfg.model.arch in EMBEDDING_ARCHS and cfg.model.embed is None:
        model["embed"] = E2E_EMBED  # the end-to-end release width (e2e.E2E_EMBED)
    return privacy_variant(cfg, epsilon).replace(model=model, privacy={"guarantee": "end-to-end"})


def undefended(cfg: JobConfig) -> JobConfig:
    return cfg.replace(privacy=NO_DEFENCES, watermark={"enabled": False})


def _pretrained_head(cfg: JobConfig, data: DatasetSplits) -> dict:
    """The configured head pre-trained once, as a state dict shared by every point that pre-trains
    it the same way (pre-training depends only on the seed, the data and the head, not on epsilon)."""
    model, plan = build_model_and_plan(cfg, data)
    head = split_model(model, plan)[0]
    if cfg.model.head_pretrain_epochs:
        pretrain_head(head, data, cfg)
    return copy.deepcopy(head.state_dict())


def run_point(cfg: JobConfig, data: DatasetSplits, head_state: dict | None = None) -> dict:
    """Train one configuration; with `head_state` its head starts pre-trained (not repeated, but
    its cost still counted in the compute share)."""
    t0 = time.perf_counter()
    pre = cfg.model.head_pretrain_epochs
    model = None
    if head_state is not None:
        model, plan = build_model_and_plan(cfg, data)
        split_model(model, plan)[0].load_state_dict(head_state)
        cfg = cfg.replace(model={"head_pretrain_epochs": 0})
    job = ChainJob(cfg, data, None, model=model)
    s = job.run()
    share = next(c.share for c in job.compute(head_pretrain_epochs=pre) if c.party == "data_owner")
    return {
        "test_accuracy": s.test_accuracy,
        "epsilon_spent": s.epsilon,
        "sigma": getattr(job.defence, "noise_multiplier", None),
        "data_owner_share": share,
        "time_s": time.perf_counter() - t0,
    }


def run_utility_sweep(
    cfg: JobConfig,
    data: DatasetSplits,
    out: Path,
    *,
    epsilons=EPSILONS,
    guarantees=GUARANTEES,
    pretrain_epochs: tuple[int, ...] = (),
) -> Path:
    """The frontier, and (for each count in `pretrain_epochs`) the configured epsilon with the head
    pre-trained that many epochs: how the data owner's compute share trades against accuracy."""
    out.mkdir(parents=True, exist_ok=True)
    central, _ = train_centralized(undefended(cfg), data)
    head_state = _pretrained_head(cfg, data)
    plain = run_point(undefended(cfg), data, head_state)
    rows = []
    for guarantee in guarantees:
        for eps in epsilons:
            if guarantee != "activation" and not math.isfinite(eps):
                continue  # without DP there is one guarantee (none); it is in the activation line
            if guarantee == "activation":
                r = run_point(privacy_variant(cfg, eps), data, head_state)
            else:
                r = run_point(end_to_end_variant(cfg, eps), data)
            rows.append(
                {"guarantee": guarantee if math.isfinite(eps) else "none", "epsilon_target": eps, **r}
            )
    share_rows = []
    for pre in pretrain_epochs:
        c = cfg.replace(model={"head_pretrain_epochs": pre})
        share_rows.append({"head_pretrain_epochs": pre, **run_point(c, data)})
    with (out / "utility.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = _plot(rows, plain, central.test_accuracy, out / "utility.png")
    report = Report(f"Privacy-utility frontier ({data.name})")
    p = cfg.privacy
    report.text(
        f"{cfg.model.arch}, {cfg.model.n_trainers} trainers, {cfg.training.epochs} epoch(s) "
        f"(lr schedule: {cfg.training.lr_schedule}), head pre-trained {cfg.model.head_pretrain_epochs} "
        f"epoch(s), release {p.release}, gamma {p.gamma}, delta {p.delta:g}, "
        f"{len(data.train_x)} training / {len(data.test_x)} test samples. "
        f"References from the same run: centralized {central.test_accuracy:.4f}, undefended chain "
        f"{plain['test_accuracy']:.4f} (data owner's share of the multiply-adds "
        f"{plain['data_owner_share']:.1%})."
    )
    report.table(
        rows,
        [
            "guarantee",
            "epsilon_target",
            "epsilon_spent",
            "sigma",
            "test_accuracy",
            "data_owner_share",
            "time_s",
        ],
    )
    report.figure(png, "test accuracy vs epsilon (clean inference); labels: data owner's compute share")
    if share_rows:
        report.heading(f"Data owner's compute share against accuracy (epsilon {p.epsilon})")
        report.table(
            share_rows,
            ["head_pretrain_epochs", "test_accuracy", "epsilon_spent", "data_owner_share", "time_s"],
        )
        with (out / "compute_share.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(share_rows[0]))
            w.writeheader()
            w.writerows(share_rows)
    md, _ = report.write(out, "utility")
    return md


def _plot(rows: list[dict], plain: dict, central_acc: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = sorted({r["epsilon_target"] for r in rows if math.isfinite(r["epsilon_target"])})
    x_inf = (max(finite) * 2) if finite else 1.0
    none = [r for r in rows if r["guarantee"] == "none"]
    for g in sorted({r["guarantee"] for r in rows} - {"none"}):
        rs = sorted([r for r in rows if r["guarantee"] == g] + none, key=lambda r: r["epsilon_target"])
        xs = [r["epsilon_target"] if math.isfinite(r["epsilon_target"]) else x_inf for r in rs]
        ax.plot(xs, [r["test_accuracy"] for r in rs], "o-", label=f"{g} DP")
        for x, r in zip(xs, rs, strict=True):
            ax.annotate(
                f"{r['data_owner_share']:.0%}",
                (x, r["test_accuracy"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(0, 5),
                ha="center",
            )
    ax.axhline(plain["test_accuracy"], color="k", ls="--", lw=1, label="undefended chain")
    ax.axhline(central_acc, color="grey", ls=":", lw=1, label="centralized")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (rightmost point: no DP)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
