"""The privacy matrix (`clicooper eval privacy`): every attack against every defence, each
configuration trained once, with the undefended chain measured in the same run.

What each attacker observes is captured from the real protocol traffic of the last training
round (a tap on the transport), never re-derived from the data owner's secrets: activations and
gradients each trainer received, and the pseudo-labels the last trainer received. True labels
and sample indices are used only to score the attacks.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from clicooper.attacks import (  # noqa: E402
    blackbox_inversion,
    clustering_label_attack,
    complete_model,
    psnr_batch,
    scratch_baseline,
    ssim_batch,
    train_inverse_decoder,
    whitebox_inversion,
)
from clicooper.config import JobConfig  # noqa: E402
from clicooper.data import DatasetSplits  # noqa: E402
from clicooper.evaluation.report import Report  # noqa: E402
from clicooper.job import ChainJob, build_model_and_plan  # noqa: E402
from clicooper.models import split_model  # noqa: E402
from clicooper.seeding import epoch_batches, generator  # noqa: E402
from clicooper.transport import Backward, Forward, Targets  # noqa: E402


def defence_settings(epsilon: float = 2.0, gamma: int = 2) -> dict[str, dict]:
    """The defence configurations of the matrix ([privacy] overrides)."""
    off = {"dp": False, "epsilon": None, "noise_multiplier": None, "gamma": 1, "u_shaped": False}
    dp = {"dp": True, "epsilon": epsilon}
    return {
        "no defence": off,
        "DP only": {**off, **dp},
        "label expansion only": {**off, "gamma": gamma},
        "full CliCooper": {**off, **dp, "gamma": gamma},
        "U-shaped": {**off, "u_shaped": True},
    }


@dataclass
class Observed:
    """What trainer `position` saw in the last round, aligned with the sample indices (for scoring)."""

    activations: list[torch.Tensor] = field(default_factory=list)
    gradients: list[torch.Tensor] = field(default_factory=list)
    pseudo_labels: list[torch.Tensor] = field(default_factory=list)
    act_ids: list[torch.Tensor] = field(default_factory=list)
    grad_ids: list[torch.Tensor] = field(default_factory=list)
    label_ids: list[torch.Tensor] = field(default_factory=list)


def train_and_observe(cfg: JobConfig, data: DatasetSplits) -> tuple[ChainJob, dict[int, Observed]]:
    """Train the job; record what every trainer receives during its last round."""
    job = ChainJob(cfg, data, None)
    last = cfg.training.epochs - 1
    batches = epoch_batches(
        cfg.job.seed,
        last,
        len(data.train_x),
        cfg.training.batch_size,
        poisson=cfg.training.sampling == "poisson",
    )
    seen: dict[int, Observed] = defaultdict(Observed)
    pos = {t.name: t.position for t in job.trainers}
    original = job.transport.send

    def tap(msg) -> None:
        h = msg.header
        if h.round == last and h.receiver in pos:
            o, ids = seen[pos[h.receiver]], batches[h.step] if h.step < len(batches) else None
            if isinstance(msg, Forward) and msg.train:
                o.activations.append(msg.activation.clone())
                o.act_ids.append(ids)
            elif isinstance(msg, Backward):
                o.gradients.append(msg.grad.clone())
                o.grad_ids.append(ids)
            elif isinstance(msg, Targets):
                o.pseudo_labels.append(msg.labels.clone())
                o.label_ids.append(ids)
        original(msg)

    job.transport.send = tap
    job.run()
    job.transport.send = original
    return job, dict(seen)


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.flatten(1) if x.dim() > 1 else x for x in xs])


def clustering_rows(
    obs: dict[int, Observed], data: DatasetSplits, gamma: int, seed: int, max_samples: int
) -> list[dict]:
    """Liu & Lyu clustering at every position, on activations and on gradients, k = K and gamma*K."""
    K, rows = data.num_classes, []
    for p, o in sorted(obs.items()):
        sources = [("activations", o.activations, o.act_ids), ("gradients", o.gradients, o.grad_ids)]
        if o.pseudo_labels:  # the last trainer's own loss gradient is driven by the pseudo-label it holds
            onehot = [F.one_hot(t, gamma * K).float() for t in o.pseudo_labels]
            sources.append(("pseudo-labels (loss gradient)", onehot, o.label_ids))
        for what, feats, ids in sources:
            if not feats:
                continue
            x, y = _cat(feats)[:max_samples], data.train_y[torch.cat(ids)][:max_samples]
            for k in sorted({K, gamma * K}):
                r = clustering_label_attack(x, y, K, k=k, seed=seed)
                rows.append(
                    {"position": p, "observed": what, "k": k, "accuracy": r.accuracy, "success": r.success}
                )
    return rows


def inversion_rows(
    job: ChainJob,
    obs: dict[int, Observed],
    data: DatasetSplits,
    aux_x: torch.Tensor,
    n_targets: int,
    quick: bool,
    seed: int,
) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """White-box rMLE and black-box decoder inversion at T1 on `n_targets` private training samples."""
    o = obs[1]
    target = _cat(o.activations)[:n_targets].reshape(-1, *o.activations[0].shape[1:])
    ids = torch.cat(o.act_ids)[:n_targets]
    originals = data.train_x[ids]
    head, defence = job.data_owner.head.eval(), job.defence
    clip = defence.cfg.clip if defence is not None and defence.accountant is not None else None
    wb = whitebox_inversion(head, target, data.input_shape, steps=300, clip=clip, seed=seed)
    gen = generator(seed, "attacker-queries")

    def query(x: torch.Tensor) -> torch.Tensor:  # the same release interface the data owner exposes
        with torch.no_grad():
            a = head(x)
            return defence.release(a, gen, train=True) if defence is not None else a

    decoder = train_inverse_decoder(query, aux_x, epochs=3 if quick else 15, seed=seed)
    bb = blackbox_inversion(decoder, target)
    mean_img = aux_x.mean(0, keepdim=True).expand_as(originals)  # what an attacker knowing nothing outputs
    row = {
        "mean_image_ssim": ssim_batch(mean_img, originals),
        "whitebox_ssim": ssim_batch(wb, originals),
        "whitebox_psnr": psnr_batch(wb, originals),
        "blackbox_ssim": ssim_batch(bb, originals),
        "blackbox_psnr": psnr_batch(bb, originals),
    }
    return row, originals, wb, bb


def extraction_rows(
    job: ChainJob,
    cfg: JobConfig,
    data: DatasetSplits,
    aux: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    sizes: list[int],
    quick: bool,
    seed: int,
) -> list[dict]:
    """Surrogates built by trainer 1 alone and by the coalition of all trainers, from n aux labels,
    against a model trained from scratch on the same labels (the fair bar)."""
    segs = [t.segment for t in job.trainers]
    n_seg = len(segs)

    def fresh() -> list[nn.Sequential]:  # randomly initialised copies of every segment, same cuts
        return split_model(build_model_and_plan(cfg.replace(job={"seed": seed + 1}), data)[0], job.plan)

    def head() -> nn.Module:
        return fresh()[0]

    def after_trainer_1() -> nn.Module:  # the trainers' segments it lacks (never a U-shaped tail)
        return nn.Sequential(*fresh()[2 : n_seg + 1])

    def whole() -> nn.Module:
        return nn.Sequential(*fresh())

    attackers = {
        "trainer 1 alone": ([segs[0]], after_trainer_1 if n_seg > 1 else None),
        "all trainers (coalition)": (segs, None),
    }
    out_dim, epochs, chance = _output_width(job, data), 30, 1 / data.num_classes
    rows = []
    for n in sizes:
        ax, ay = aux[0][:n], aux[1][:n]
        for name, (held, missing) in attackers.items():
            r = complete_model(
                held,
                head,
                missing,
                out_dim,
                data.num_classes,
                ax,
                ay,
                *test,
                epochs=epochs,
                seed=seed,
                attacker=name,
            )
            rows.append(
                {
                    "attacker": name,
                    "aux_labels": n,
                    "surrogate_accuracy": r.accuracy,
                    "mode": r.mode,
                    "chance": chance,
                }
            )
        if n > 0:
            acc = scratch_baseline(whole, ax, ay, *test, epochs=epochs, seed=seed)
            rows.append(
                {
                    "attacker": "from scratch (fair bar)",
                    "aux_labels": n,
                    "surrogate_accuracy": acc,
                    "mode": "trained",
                    "chance": chance,
                }
            )
    return rows


def _output_width(job: ChainJob, data: DatasetSplits) -> int:
    with torch.no_grad():
        x = job.data_owner.head.eval()(data.test_x[:1])
        for t in job.trainers:
            x = t.segment.eval()(x)
    return x.shape[1]


def _u_shaped_cuts(cfg: JobConfig, data: DatasetSplits) -> JobConfig:
    """U-shaped: the data owner also keeps the last block, so the trainers share one block fewer; cut
    automatically, with as many trainers as the model's blocks allow (the report states the count)."""
    n_blocks = len(list(build_model_and_plan(cfg.replace(privacy={"u_shaped": False}), data)[0].children()))
    n = min(cfg.model.n_trainers, n_blocks - cfg.model.head_blocks - 1)
    return cfg.replace(model={"cut_points": None, "capacities": None, "n_trainers": n})


def _best_success(rows: list[dict], observed_prefix: str | None = None) -> float:
    vals = [
        r["success"] for r in rows if observed_prefix is None or r["observed"].startswith(observed_prefix)
    ]
    return max(vals) if vals else float("nan")


def run_privacy_eval(
    cfg: JobConfig,
    data: DatasetSplits,
    out: Path,
    *,
    quick: bool = False,
    epsilon: float = 2.0,
    gamma: int = 2,
    eps_sweep: tuple[float, ...] = (),
) -> Path:
    """Train each defence configuration once, attack it, and write report.md/.html, results.json, figures."""
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.job.seed
    # attacker's auxiliary data: a random half of the test set (disjoint from training); the other half
    # scores the attacks. Random, because a dataset's test split may be ordered by class.
    perm = torch.randperm(len(data.test_x), generator=generator(seed, "aux-split"))
    half = len(perm) // 2
    aux = (data.test_x[perm[:half]], data.test_y[perm[:half]])
    test = (data.test_x[perm[half:]], data.test_y[perm[half:]])
    sizes = [0, 50] if quick else [0, 100, 1000]
    sizes = [n for n in sizes if n <= half]
    n_targets = 8 if quick else 64
    max_samples = 500 if quick else 5000
    results: dict[str, dict] = {}
    grids = {}
    for name, privacy in defence_settings(epsilon, gamma).items():
        t0 = time.perf_counter()
        c = cfg.replace(privacy={**privacy, "secret_seed": seed})
        if c.privacy.u_shaped:
            c = _u_shaped_cuts(c, data)
        job, obs = train_and_observe(c, data)
        g = c.privacy.gamma
        inv, originals, wb, bb = inversion_rows(job, obs, data, aux[0], n_targets, quick, seed)
        grids[name] = (originals, wb, bb)
        results[name] = {
            "test_accuracy": job.data_owner.evaluate("test", tag="privacy-eval"),
            "epsilon": job.defence.epsilon() if job.defence is not None else None,
            "guarantee": getattr(job.defence, "guarantee", None),
            "clustering": clustering_rows(obs, data, g, seed, max_samples),
            "inversion": inv,
            "extraction": extraction_rows(job, c, data, aux, test, sizes, quick, seed),
            "time_s": time.perf_counter() - t0,
            "n_trainers": len(job.trainers),
        }
        (out / "results.json").write_text(json.dumps({"defences": results, "epsilon_sweep": []}, indent=2))
    sweep = []
    for eps in eps_sweep:
        c = cfg.replace(privacy={**defence_settings(eps, gamma)["full CliCooper"], "secret_seed": seed})
        job, obs = train_and_observe(c, data)
        rows = clustering_rows({1: obs[1]}, data, gamma, seed, max_samples)
        inv, *_ = inversion_rows(job, obs, data, aux[0], n_targets, quick, seed)
        sweep.append(
            {
                "epsilon": eps,
                "activation_clustering_success_T1": _best_success(rows, "activations"),
                "whitebox_ssim": inv["whitebox_ssim"],
                "blackbox_ssim": inv["blackbox_ssim"],
            }
        )
    (out / "results.json").write_text(json.dumps({"defences": results, "epsilon_sweep": sweep}, indent=2))
    return _write_report(cfg, data, out, results, grids, sweep, quick, epsilon, gamma)


def _write_report(cfg, data, out, results, grids, sweep, quick, epsilon, gamma) -> Path:
    r = Report(f"Privacy evaluation ({data.name}{', quick' if quick else ''})")
    r.text(
        f"{cfg.model.arch}, {cfg.model.n_trainers} trainers, {cfg.training.epochs} epoch(s), "
        f"{len(data.train_x)} training samples. DP at epsilon = {epsilon}; label expansion gamma = {gamma}."
    )
    r.text(
        "Attackers observe the last training round. Clustering: k-means with a known labelled set "
        "of 5 samples per class (Liu & Lyu 2022); success = advantage over chance. Inversion targets "
        "private training samples at trainer 1; the black-box attacker queries the data owner's release "
        "interface on half of the test set (disjoint from training); mean_image_ssim is the score of "
        "the mean auxiliary image, i.e. of an attacker that learned nothing. Extraction is scored on the "
        "other half of the test set."
    )
    r.heading("Summary (the undefended chain is the first row)")
    summary = []
    for name, res in results.items():
        ext = {e["attacker"]: e["surrogate_accuracy"] for e in res["extraction"] if e["aux_labels"] == 0}
        summary.append(
            {
                "defence": name,
                "test_accuracy": res["test_accuracy"],
                "epsilon": res["epsilon"],
                "guarantee": res.get("guarantee"),
                "clustering_success_activations": _best_success(res["clustering"], "activations"),
                "clustering_success_gradients": _best_success(res["clustering"], "gradients"),
                "clustering_success_pseudo_labels": _best_success(res["clustering"], "pseudo"),
                "whitebox_ssim": res["inversion"]["whitebox_ssim"],
                "blackbox_ssim": res["inversion"]["blackbox_ssim"],
                "extraction_coalition_no_labels": ext.get("all trainers (coalition)"),
            }
        )
    r.table(summary)
    r.text("Clustering success columns give the maximum over trainer positions and k (K and gamma*K).")
    r.heading("Clustering label inference per position")
    rows = [{"defence": n, **row} for n, res in results.items() for row in res["clustering"]]
    r.table(rows, ["defence", "position", "observed", "k", "accuracy", "success"])
    r.heading("Inversion at trainer 1")
    r.table([{"defence": n, **res["inversion"]} for n, res in results.items()])
    r.heading("Model extraction / completion (surrogate accuracy on true labels)")
    r.table(
        [{"defence": n, **row} for n, res in results.items() for row in res["extraction"]],
        ["defence", "attacker", "aux_labels", "surrogate_accuracy", "mode", "chance"],
    )
    r.figure(_grid(grids, out), "original (top) vs white-box and black-box reconstructions, per defence")
    if sweep:
        r.heading("Attack success vs epsilon (full CliCooper)")
        r.table(sweep)
        r.figure(_sweep_plot(sweep, results, out), "attack success vs epsilon")
    md, _ = r.write(out)
    return md


def _grid(grids: dict, out: Path, n: int = 8) -> Path:
    fig, axes = plt.subplots(3 * len(grids), n, figsize=(n * 1.1, 3.3 * len(grids)))
    for gi, (name, (orig, wb, bb)) in enumerate(grids.items()):
        for row, (label, imgs) in enumerate((("original", orig), ("white-box", wb), ("black-box", bb))):
            for i in range(n):
                ax = axes[3 * gi + row, i]
                ax.axis("off")
                if i < len(imgs):
                    img = imgs[i].detach()
                    ax.imshow(
                        img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1
                    )
            axes[3 * gi + row, 0].set_title(f"{name}: {label}", fontsize=7, loc="left")
    fig.tight_layout()
    path = out / "reconstructions.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _sweep_plot(sweep: list[dict], results: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [s["epsilon"] for s in sweep]
    ax.plot(
        xs, [s["activation_clustering_success_T1"] for s in sweep], "o-", label="clustering success (T1 acts)"
    )
    ax.plot(xs, [s["whitebox_ssim"] for s in sweep], "s-", label="white-box SSIM")
    ax.plot(xs, [s["blackbox_ssim"] for s in sweep], "^-", label="black-box SSIM")
    base = results.get("no defence")
    if base:
        ax.axhline(
            base["inversion"]["whitebox_ssim"],
            ls="--",
            color="grey",
            lw=1,
            label="white-box SSIM, no defence",
        )
    ax.set_xscale("log")
    ax.set_xlabel("epsilon")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "success_vs_epsilon.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
