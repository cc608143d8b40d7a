"""Which trainer-side learner generalises from a noised one-shot release to clean activations?
(`clicooper eval release-learners`)

The data owner pre-trains and freezes its head, releases every training sample's activation once
(clipped to C, plus secure Gaussian noise calibrated to the configured epsilon), and the
candidates below are trained on that release with the true labels and scored on the clean
(clipped, un-noised) test activations the deployed model sees. The same head and the same release
serve every candidate, so the differences are the learners' alone; the head's own accuracy on clean
activations (no DP) is the reference.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.evaluation.e2e import nearest_class_mean
from clicooper.evaluation.report import Report
from clicooper.job import build_model_and_plan, pretrain_head
from clicooper.models import split_model
from clicooper.privacy.accounting import calibrate_noise_multiplier
from clicooper.privacy.activation_dp import clip_and_noise, clip_per_sample
from clicooper.schedule import round_lr
from clicooper.seeding import epoch_batches

Learner = Callable[[torch.Tensor, torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]]


def _fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, schedule: str, seed: int, lr: float
) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for e in range(epochs):
        for g in opt.param_groups:
            g["lr"] = round_lr(lr, e, epochs, schedule)  # type: ignore[arg-type]
        model.train()
        for ids in epoch_batches(seed, f"learner-{e}", len(x), 256):
            loss = F.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def class_mean_learner(x: torch.Tensor, y: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda a: nearest_class_mean(x, y, k, a)


def _net(kind: str, d: int, k: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d, k)
    if kind == "linear-segments":  # the defended model's trainer segments: three linear maps
        return nn.Sequential(nn.Linear(d, 128), nn.Linear(128, 128), nn.Linear(128, k))
    return nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, k))


def trained(kind: str, schedule: str, epochs: int, seed: int, lr: float = 1e-3) -> Learner:
    def learner(x: torch.Tensor, y: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        torch.manual_seed(seed)
        m = _fit(_net(kind, x.shape[1], k), x, y, epochs, schedule, seed, lr)
        return lambda a: m(a)

    return learner


def matched_noise(base: Learner, std: float, draws: int) -> Learner:
    """Predict by averaging the learner's probabilities over `draws` fresh noisings of the input."""

    def learner(x: torch.Tensor, y: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        f = base(x, y, k)
        return lambda a: sum(F.softmax(f(a + std * torch.randn_like(a)), 1) for _ in range(draws)) / draws

    return learner


def run_release_learners(
    cfg: JobConfig, data: DatasetSplits, out: Path, *, epochs: int = 10, lr: float = 1e-3
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = cfg.privacy
    if p.epsilon is None:
        raise ValueError("release-learners needs privacy.epsilon (the release to learn from)")
    model, plan = build_model_and_plan(cfg, data)
    head = split_model(model, plan)[0]
    t0 = time.perf_counter()
    if cfg.model.head_pretrain_epochs:
        pretrain_head(head, data, cfg)
    head.eval()
    with torch.no_grad():
        feats = [
            clip_per_sample(
                torch.cat([head(x[i : i + 2000]) for i in range(0, len(x), 2000)]).flatten(1), p.clip
            )
            for x in (data.train_x, data.test_x)
        ]
    train, test = feats
    sigma = calibrate_noise_multiplier(p.epsilon, p.delta, 1, accountant=p.accountant)
    release = clip_and_noise(train, p.clip, sigma)  # secure noise, as the data owner draws it
    y, yt, k = data.train_y, data.test_y, data.num_classes
    seed = cfg.job.seed
    candidates: dict[str, tuple[Learner, torch.Tensor]] = {
        "no DP: linear read-out of clean activations (reference)": (
            trained("linear", "cosine", epochs, seed, lr),
            train,
        ),
        "nearest class mean of the release": (class_mean_learner, release),
        "linear, constant lr": (trained("linear", "constant", epochs, seed, lr), release),
        "linear, cosine lr": (trained("linear", "cosine", epochs, seed, lr), release),
        "linear segments 16-128-128-K, cosine lr (default)": (
            trained("linear-segments", "cosine", epochs, seed, lr),
            release,
        ),
        "ReLU MLP 16-256-256-K, constant lr": (trained("mlp", "constant", epochs, seed, lr), release),
        "ReLU MLP 16-256-256-K, cosine lr": (trained("mlp", "cosine", epochs, seed, lr), release),
        "ReLU MLP, cosine lr, matched-noise inference x64": (
            matched_noise(trained("mlp", "cosine", epochs, seed, lr), sigma * p.clip, 64),
            release,
        ),
    }
    rows = []
    for name, (learner, x) in candidates.items():
        ts = time.perf_counter()
        f = learner(x, y, k)
        with torch.no_grad():
            acc = float((f(test).argmax(1) == yt).float().mean())
        rows.append({"learner": name, "test_accuracy": acc, "time_s": time.perf_counter() - ts})
    with (out / "release_learners.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    report = Report(f"Learning from a one-shot release ({data.name})")
    report.text(
        f"Head: {cfg.model.arch}, pre-trained {cfg.model.head_pretrain_epochs} epoch(s), frozen; "
        f"release: one-shot, epsilon {p.epsilon} (delta {p.delta:g}, sigma {sigma:.3f}, C {p.clip}); "
        f"{len(train)} training / {len(test)} test samples, {train.shape[1]} numbers per release; "
        f"learners trained {epochs} epochs (batch 256, Adam lr {lr:g}). Scored on clean test activations. "
        f"Total time {time.perf_counter() - t0:.0f} s."
    )
    report.table(rows, ["learner", "test_accuracy", "time_s"])
    md, _ = report.write(out, "release_learners")
    return md
