"""Label DP against the label attacks (`clicooper eval label-dp`): accuracy and clustering success on
gradients and pseudo-labels for a list of label epsilons, with the bound the epsilons imply beside each
figure, for the chain (labels leave the data owner as pseudo-labels) and for U-shaped mode (labels never
leave, but the gradients the data owner returns carry them).

Every configuration is the given job (any model, defences and data) with only `privacy.label_epsilon`
(and, for the U-shaped rows, `privacy.u_shaped`) changed, trained once; the attacks are those of the
privacy matrix (`clicooper.evaluation.privacy`), on the traffic of the last training round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.evaluation.privacy import (
    KNOWN_PER_CLASS,
    Epsilons,
    _u_shaped_cuts,
    clustered_text,
    clustering_rows,
    train_and_observe,
)
from clicooper.evaluation.report import Report, write_csv
from clicooper.privacy.label_accounting import accuracy_bound, success_bound

LABEL_EPSILONS: tuple[float | None, ...] = (1.0, 2.0, 4.0, 8.0, None)


def _best(rows: list[dict], observed: str, known: int) -> dict | None:
    cand = [r for r in rows if r["observed"].startswith(observed) and r["known_per_class"] == known]
    return max(cand, key=lambda r: r["success"]) if cand else None


def label_dp_row(
    setting: str, cfg: JobConfig, data: DatasetSplits, *, quick: bool
) -> tuple[dict, list[dict]]:
    """Train `cfg` once; its accuracy, and the best clustering success on gradients and pseudo-labels
    (over positions and k) for 1 and 5 known labels per class, each with its bound."""
    t0 = time.perf_counter()
    if cfg.privacy.u_shaped:
        cfg = _u_shaped_cuts(cfg, data)
    job, obs = train_and_observe(cfg, data)
    eps = Epsilons.of(job)
    rows = clustering_rows(
        obs,
        data,
        cfg.privacy.gamma,
        cfg.job.seed,
        quick,
        known_per_class=KNOWN_PER_CLASS,
        epsilons=eps,
        sources=("gradients", "pseudo-labels"),
    )
    K = data.num_classes
    out = {
        "setting": setting,
        "label_epsilon": eps.label,
        "activation_epsilon": eps.activation,
        "test_accuracy": job.data_owner.evaluate("test", tag="label-dp-eval"),
        "label_prior": cfg.privacy.label_prior if eps.label is not None else None,
        # what the release alone keeps: P(noisy label = true label) under uniform-prior RR
        "label_keep_rate": accuracy_bound(eps.label, K),
        # and what this run's release kept (measured; true labels used only to score)
        "labels_kept": _kept(job, data),
    }
    for observed, key in (("gradients", "gradients"), ("pseudo", "pseudo_labels")):
        for known in KNOWN_PER_CLASS:
            best = _best(rows, observed, known)
            out[f"{key}_success_known{known}"] = best["success"] if best else None
            out[f"{key}_position_known{known}"] = best["position"] if best else None
        best = _best(rows, observed, KNOWN_PER_CLASS[-1])
        out[f"{key}_bound"] = best["success_bound"] if best else None
        out[f"{key}_within_bound"] = best["within_bound"] if best else None
    out["label_only_bound"] = success_bound(eps.label, K)
    out["time_s"] = time.perf_counter() - t0
    return out, rows


def _kept(job, data: DatasetSplits) -> float | None:
    """Share of training labels the label-DP release left unchanged (None without label DP)."""
    defence = job.defence
    if defence is None or getattr(defence, "label_dp", None) is None:
        return None
    noisy = defence.privatize_labels(data.train_y, torch.arange(len(data.train_y)))
    return float((noisy == data.train_y).float().mean())


def run_label_dp_eval(
    cfg: JobConfig,
    data: DatasetSplits,
    out: Path,
    *,
    quick: bool = False,
    label_epsilons: tuple[float | None, ...] = LABEL_EPSILONS,
    u_shaped: bool = True,
) -> Path:
    """The label-DP table for `cfg` (e.g. the defended default job); writes label_dp.csv, results.json and
    report.md/.html into `out`. With `u_shaped`, the same epsilons in U-shaped mode as well."""
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.job.seed
    settings = [("chain", False)] + ([("U-shaped", True)] if u_shaped else [])
    table, details = [], {}
    for setting, u in settings:
        for eps in label_epsilons:
            c = cfg.replace(privacy={"label_epsilon": eps, "u_shaped": u, "secret_seed": seed})
            row, rows = label_dp_row(setting, c, data, quick=quick)
            table.append(row)
            details[f"{setting}, label epsilon {eps}"] = rows
            (out / "results.json").write_text(json.dumps({"table": table, "clustering": details}, indent=2))
    for setting, _ in settings:  # accuracy cost against the same setting without label DP
        ref = [r for r in table if r["setting"] == setting and r["label_epsilon"] is None]
        for r in table:
            if r["setting"] == setting and ref:
                r["accuracy_cost"] = ref[0]["test_accuracy"] - r["test_accuracy"]
    write_csv(table, out / "label_dp.csv")
    (out / "results.json").write_text(json.dumps({"table": table, "clustering": details}, indent=2))
    return _write_report(cfg, data, out, table, details, quick)


def _write_report(cfg, data, out, table, details, quick) -> Path:
    r = Report(f"Label DP against label inference ({data.name}{', quick' if quick else ''})")
    p = cfg.privacy
    act = f"epsilon = {p.epsilon}" if p.dp else "off"
    r.text(
        f"Job: {cfg.model.arch}, {cfg.model.n_trainers} trainers, {cfg.training.epochs} epoch(s), "
        f"{len(data.train_x)} training samples; activation DP {act}"
        f", gamma = {p.gamma}. Label DP: randomized response with a prior (uniform prior, K-ary RR), "
        "each label drawn once per job from OS randomness. Clustering (Liu & Lyu 2022) on the gradients "
        "every trainer receives and on the last trainer's pseudo-labels of the last round "
        f"({clustered_text(quick)}), k = K and gamma*K, best over "
        "positions and k, with 1 or 5 known labels per class; success = advantage over chance."
    )
    r.text(
        "Bounds (advantage over chance, balanced classes): pseudo-labels are post-processing of the label "
        "release alone: (e^eps - 1)/(e^eps + K - 1). Gradients mix features and labels: the bound "
        "composes activation and label epsilons (with the activation delta) and exists only with both DPs "
        "on ('none' otherwise: features predict labels). within_bound allows 2 standard errors of sampling."
    )
    r.table(
        table,
        [
            "setting",
            "label_epsilon",
            "label_prior",
            "labels_kept",
            "activation_epsilon",
            "test_accuracy",
            "accuracy_cost",
            "gradients_success_known1",
            "gradients_success_known5",
            "gradients_bound",
            "gradients_within_bound",
            "pseudo_labels_success_known1",
            "pseudo_labels_success_known5",
            "pseudo_labels_bound",
            "pseudo_labels_within_bound",
        ],
    )
    r.heading("Clustering per position")
    rows = [{"configuration": n, **row} for n, rs in details.items() for row in rs]
    r.table(rows)
    md, _ = r.write(out)
    return md
