"""The privacy matrix (`clicooper eval privacy`): every attack against every defence, each
configuration trained once, with the undefended chain measured in the same run.

What each attacker observes is captured from the real protocol traffic of the last training
round (a tap on the transport), never re-derived from the data owner's secrets: activations and
gradients each trainer received, and the pseudo-labels the last trainer received. True labels
and sample indices are used only to score the attacks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from clicooper.attacks import (  # noqa: E402
    SSIM_SETTINGS,
    blackbox_inversion,
    clustering_label_attacks,
    complete_model,
    default_decoder,
    psnr_batch,
    scratch_baseline,
    ssim_batch,
    train_inverse_decoder,
    whitebox_inversion,
)
from clicooper.attacks.inversion import _frozen, _seeded  # noqa: E402
from clicooper.config import NO_DEFENCES, JobConfig  # noqa: E402
from clicooper.data import DatasetSplits  # noqa: E402
from clicooper.evaluation.report import Report  # noqa: E402
from clicooper.job import ChainJob, build_model_and_plan  # noqa: E402
from clicooper.models import build_model, split_model  # noqa: E402
from clicooper.privacy.label_accounting import binomial_margin, composed, success_bound  # noqa: E402
from clicooper.seeding import epoch_batches, generator  # noqa: E402
from clicooper.transport import Backward, Forward, Targets  # noqa: E402

BASELINE = "no defence (same architecture)"  # the defended job's model with every defence off
DEFAULT_JOB = "no defence (default job)"  # the undefended job a user runs (its own architecture)
KNOWN_PER_CLASS = (1, 5)  # sizes of the clustering attacker's known labelled set, per class


WIDE_FEATURES = 1024  # numbers per sample above which clustering takes a subset (conv feature maps)
WIDE_SAMPLES = 20_000


def clustered_samples(quick: bool, width: int) -> int:
    """How many of the last round's training samples a clustering attack clusters, for features of
    `width` numbers each: every sample the attacker saw (Liu & Lyu cluster the whole training set),
    except conv feature maps, of which the first 20,000 (full k-means on 60,000 x 3,136 numbers would
    take hours here; their success is tens of points, so the subset's error does not matter).

    Why not fewer: with 5,000 samples one attack's success moved between 0 and 2.3 points from one
    5,000-sample slice of the same epoch to another at the same position, and with 20,000 the best of
    the four settings reached 1.15 points where every sample gave at most 0.45 (EXPERIMENTS.md,
    section 18): the subset's error was as large as the 1-point target. More samples also give the
    attacker more to cluster, never less.
    """
    if quick:
        return 500
    return WIDE_SAMPLES if width > WIDE_FEATURES else sys.maxsize


def clustered_text(quick: bool) -> str:
    if quick:
        return "the first 500 training samples"
    return (
        f"every training sample (the first {WIDE_SAMPLES} where a sample has more than "
        f"{WIDE_FEATURES} numbers)"
    )


def defence_settings(
    epsilon: float = 2.0, gamma: int = 2, label_epsilon: float | None = None
) -> dict[str, dict]:
    """The defence configurations of the matrix ([privacy] overrides); with `label_epsilon`, also full
    CliCooper and U-shaped with label DP."""
    off = dict(NO_DEFENCES)
    dp = {"dp": True, "epsilon": epsilon}
    out = {
        BASELINE: off,
        "DP only": {**off, **dp},
        "label expansion only": {**off, "gamma": gamma},
        "full CliCooper": {**off, **dp, "gamma": gamma},
    }
    if label_epsilon is not None:
        out["full CliCooper + label DP"] = {**off, **dp, "gamma": gamma, "label_epsilon": label_epsilon}
    out["U-shaped"] = {**off, "u_shaped": True}
    if label_epsilon is not None:
        out["U-shaped + label DP"] = {**off, "u_shaped": True, "label_epsilon": label_epsilon}
    return out


def attacker_split(
    data: DatasetSplits, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The attackers' auxiliary data and the scoring set, the same in `clicooper attack` and `eval privacy`:
    a seeded random half of the test set each (disjoint from training; random, because a dataset's test
    split may be ordered by class)."""
    perm = torch.randperm(len(data.test_x), generator=generator(seed, "aux-split"))
    half = len(perm) // 2
    aux = (data.test_x[perm[:half]], data.test_y[perm[:half]])
    test = (data.test_x[perm[half:]], data.test_y[perm[half:]])
    return aux, test


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


@dataclass(frozen=True)
class Epsilons:
    """The job's DP parameters, for the attacker-success bounds beside each clustering figure."""

    activation: float | None = None
    delta: float = 0.0
    label: float | None = None

    @classmethod
    def of(cls, job: ChainJob) -> Epsilons:
        d = job.defence
        if d is None:
            return cls()
        eps = d.epsilon() if hasattr(d, "epsilon") else None
        leps = d.label_epsilon() if hasattr(d, "label_epsilon") else None
        return cls(eps, float(d.delta) if eps is not None else 0.0, leps)

    def bound(self, observed: str, num_classes: int) -> float | None:
        """Bound on clustering success (advantage over chance) implied by the epsilons; None = no bound.

        Pseudo-labels: the label release alone (the uniform-prior RR label is drawn independently of
        the features). Activations: the activation release alone (given the head). Gradients mix both:
        the composition, which needs both DPs on.
        """
        if observed.startswith("pseudo"):
            eps, delta = self.label, 0.0
        elif observed.startswith("activations"):
            eps, delta = self.activation, self.delta
        else:
            eps, delta = composed(self.activation, self.delta, self.label)
        return None if eps is None else success_bound(eps, num_classes, delta)


def clustering_rows(
    obs: dict[int, Observed],
    data: DatasetSplits,
    gamma: int,
    seed: int,
    quick: bool,
    *,
    known_per_class: tuple[int, ...] = (5,),
    epsilons: Epsilons | None = None,
    sources: tuple[str, ...] = ("activations", "gradients", "pseudo-labels"),
) -> list[dict]:
    """Liu & Lyu clustering at every position, on activations, gradients and pseudo-labels, k = K and
    gamma*K, for each size of the known labelled set; with the bound the epsilons imply beside each."""
    K, rows = data.num_classes, []
    eps = epsilons or Epsilons()
    for p, o in sorted(obs.items()):
        found = [("activations", o.activations, o.act_ids), ("gradients", o.gradients, o.grad_ids)]
        if o.pseudo_labels:  # the last trainer's own loss gradient is driven by the pseudo-label it holds
            onehot = [F.one_hot(t, gamma * K).float() for t in o.pseudo_labels]
            found.append(("pseudo-labels (loss gradient)", onehot, o.label_ids))
        for what, feats, ids in found:
            if not feats or not any(what.startswith(src) for src in sources):
                continue
            x = _cat(feats)
            n = clustered_samples(quick, x.shape[1])
            x, y = x[:n], data.train_y[torch.cat(ids)][:n]
            bound = eps.bound(what, K)
            for k in sorted({K, gamma * K}):
                results = clustering_label_attacks(x, y, K, k=k, known_per_class=known_per_class, seed=seed)
                for known, r in zip(known_per_class, results, strict=True):
                    n = r.n_samples - r.n_known
                    margin = binomial_margin(r.accuracy, n) / (1 - 1 / K)
                    rows.append(
                        {
                            "position": p,
                            "observed": what,
                            "k": k,
                            "known_per_class": known,
                            "accuracy": r.accuracy,
                            "success": r.success,
                            "success_bound": "none" if bound is None else bound,
                            "within_bound": None if bound is None else r.success <= bound + margin,
                        }
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
    *,
    aux_y: torch.Tensor | None = None,
) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """White-box rMLE and black-box decoder inversion at T1 on `n_targets` private training samples,
    scored as SSIM and PSNR beside the trivial guesses (the auxiliary data's mean image and, given
    `aux_y`, the mean image of the target's class) and as an SSIM advantage over the mean image."""
    o = obs[1]
    # the last released rows: a head trained per step keeps changing, and the white-box attacker is granted
    # the head that made the release (the final one made the last batch, up to one step)
    target = _cat(o.activations)[-n_targets:].reshape(-1, *o.activations[0].shape[1:])
    ids = torch.cat(o.act_ids)[-n_targets:]
    originals = data.train_x[ids]
    head, defence = job.data_owner.head.eval(), job.defence
    clip = defence.cfg.clip if defence is not None and defence.accountant is not None else None
    steps = 150 if quick else 300
    wb = whitebox_inversion(head, target, data.input_shape, steps=steps, clip=clip, seed=seed)
    gen = generator(seed, "attacker-queries")

    def query(x: torch.Tensor) -> torch.Tensor:  # the same release interface the data owner exposes
        with torch.no_grad():
            a = head(x)
            return defence.release(a, gen, train=True) if defence is not None else a

    decoder = None
    epochs = 15
    if quick:  # a narrower decoder, trained ~150 steps whatever the auxiliary set's size (one that barely
        # trained would flatter any defence)
        epochs = min(60, max(3, math.ceil(150 / math.ceil(len(aux_x) / 64))))
        with torch.no_grad():
            act_shape = query(aux_x[:1]).shape[1:]
        with _seeded(seed):
            decoder = default_decoder(act_shape, aux_x.shape[1:], width=16)
    decoder = train_inverse_decoder(query, aux_x, epochs=epochs, seed=seed, decoder=decoder)
    bb = blackbox_inversion(decoder, target)
    mean_img = aux_x.mean(0, keepdim=True).expand_as(originals)  # what an attacker knowing nothing outputs
    guesses = {"mean_image": mean_img}
    if aux_y is not None:  # an attacker that knows each target's label and nothing else
        labels = data.train_y[ids]
        means = {int(c): aux_x[aux_y == c].mean(0) for c in labels.unique() if (aux_y == c).any()}
        guesses["class_mean_image"] = torch.stack([means.get(int(c), mean_img[0]) for c in labels])
    guesses.update(whitebox=wb, blackbox=bb)
    row: dict = {}
    for name, imgs in guesses.items():
        row[f"{name}_ssim"] = ssim_batch(imgs, originals)
    for name in ("whitebox", "blackbox"):
        row[f"{name}_ssim_advantage"] = row[f"{name}_ssim"] - row["mean_image_ssim"]
    for name, imgs in guesses.items():
        row[f"{name}_psnr"] = psnr_batch(imgs, originals)
    for name, imgs in guesses.items():
        row[f"{name}_ssim_gaussian"] = ssim_batch(imgs, originals, gaussian=True)
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
    against models trained from scratch on the same labels (the fair bar: the best of them)."""
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
            rows += _scratch_rows(cfg, data, whole, ax, ay, test, epochs, seed, chance)
    return rows


def _scratch_rows(
    cfg: JobConfig,
    data: DatasetSplits,
    whole: Callable[[], nn.Module],
    ax: torch.Tensor,
    ay: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    seed: int,
    chance: float,
) -> list[dict]:
    """Models trained from scratch on the aux labels alone: the row's architecture, the default job's
    architecture for the data, and the fair bar = the better of them.

    An attacker who holds labels is not bound to the defended job's architecture: `small-cnn-dp`
    (a 16-number unit-norm embedding) trains badly from 100 labels, and comparing a stolen segment
    only with it would make extraction look like a gain when a standard CNN does better.
    """
    standard = "mlp" if len(data.input_shape) == 1 else JobConfig().model.arch  # tabular rows: the MLP

    def standard_model() -> nn.Module:
        return build_model(standard, data.input_shape, data.num_classes)

    bars = {f"from scratch ({cfg.model.arch}, the row's architecture)": whole}
    if standard != cfg.model.arch:
        bars[f"from scratch ({standard})"] = standard_model
    rows = [
        {
            "attacker": name,
            "aux_labels": len(ay),
            "surrogate_accuracy": scratch_baseline(make, ax, ay, *test, epochs=epochs, seed=seed),
            "mode": "trained",
            "chance": chance,
        }
        for name, make in bars.items()
    ]
    best = max(rows, key=lambda r: r["surrogate_accuracy"])
    return rows + [{**best, "attacker": "from scratch (fair bar: the best above)"}]


def _output_width(job: ChainJob, data: DatasetSplits) -> int:
    segments = [job.data_owner.head, *(t.segment for t in job.trainers)]
    x = data.test_x[:1]
    with torch.no_grad(), ExitStack() as stack:
        for s in segments:  # evaluated, and left as found
            stack.enter_context(_frozen(s))
            x = s(x)
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


def _train_and_attack(
    c: JobConfig,
    data: DatasetSplits,
    aux: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    quick: bool,
    extraction: bool,
    sources: tuple[str, ...] = ("activations", "gradients", "pseudo-labels"),
) -> tuple[dict, tuple]:
    """One row of the matrix: train the configuration once, then run every attack on its traffic."""
    t0 = time.perf_counter()
    seed = c.job.seed
    if c.privacy.u_shaped:
        c = _u_shaped_cuts(c, data)
    job, obs = train_and_observe(c, data)
    sizes = [n for n in ([0, 50] if quick else [0, 100, 1000]) if n <= len(aux[0])]
    inv, originals, wb, bb = inversion_rows(
        job, obs, data, aux[0], 8 if quick else 64, quick, seed, aux_y=aux[1]
    )
    res = {
        "arch": c.model.arch,
        "test_accuracy": job.data_owner.evaluate("test", tag="privacy-eval"),
        "epsilon": job.defence.epsilon() if job.defence is not None else None,
        "label_epsilon": Epsilons.of(job).label,
        "clustering": clustering_rows(
            obs,
            data,
            c.privacy.gamma,
            seed,
            quick,
            known_per_class=KNOWN_PER_CLASS,
            epsilons=Epsilons.of(job),
            sources=sources,
        ),
        "inversion": inv,
        "extraction": extraction_rows(job, c, data, aux, test, sizes, quick, seed) if extraction else [],
        "n_trainers": len(job.trainers),
    }
    res["time_s"] = time.perf_counter() - t0
    return res, (originals, wb, bb)


class UnknownRowError(ValueError):
    """`only` names a row the matrix does not have (a usage error, raised before any training)."""


def run_privacy_eval(
    cfg: JobConfig,
    data: DatasetSplits,
    out: Path,
    *,
    quick: bool = False,
    epsilon: float = 2.0,
    gamma: int = 2,
    eps_sweep: tuple[float, ...] = (),
    label_epsilon: float | None = None,
    default_job: JobConfig | None = None,
    only: tuple[str, ...] | None = None,
    extraction: bool = True,
    clustering_sources: tuple[str, ...] = ("activations", "gradients", "pseudo-labels"),
) -> Path:
    """Train each defence configuration once, attack it, and write report.md/.html, results.json, figures.

    `cfg` is the defended job (its model, training and data); each row overrides its [privacy] section.
    `default_job`: the undefended job a user would run (its own architecture), attacked as the row
    "no defence (default job)". `label_epsilon` adds the label-DP rows. `only` restricts the rows (by
    name), `extraction=False` skips model extraction and `clustering_sources` limits what is clustered
    (for fast tests).
    """
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.job.seed
    aux, test = attacker_split(data, seed)
    jobs: dict[str, JobConfig] = {}
    if default_job is not None:
        jobs[DEFAULT_JOB] = default_job.replace(
            privacy={**defence_settings()[BASELINE], "secret_seed": seed}, watermark={"enabled": False}
        )
    for name, privacy in defence_settings(epsilon, gamma, label_epsilon).items():
        jobs[name] = cfg.replace(privacy={**privacy, "secret_seed": seed})
    if only is not None:
        unknown = set(only) - set(jobs)
        if unknown:
            raise UnknownRowError(f"unknown matrix rows {sorted(unknown)}; available: {list(jobs)}")
        jobs = {n: c for n, c in jobs.items() if n in only}
    results: dict[str, dict] = {}
    grids = {}
    for name, c in jobs.items():
        results[name], grids[name] = _train_and_attack(
            c, data, aux, test, quick=quick, extraction=extraction, sources=clustering_sources
        )
        (out / "results.json").write_text(json.dumps({"defences": results, "epsilon_sweep": []}, indent=2))
    sweep = []
    n_targets = 8 if quick else 64
    for eps in eps_sweep:
        c = cfg.replace(privacy={**defence_settings(eps, gamma)["full CliCooper"], "secret_seed": seed})
        job, obs = train_and_observe(c, data)
        rows = clustering_rows({1: obs[1]}, data, gamma, seed, quick, sources=("activations",))
        inv, *_ = inversion_rows(job, obs, data, aux[0], n_targets, quick, seed)
        sweep.append(
            {
                "epsilon": eps,
                "activation_clustering_success_T1": _best_success(rows, "activations"),
                "whitebox_ssim": inv["whitebox_ssim"],
                "blackbox_ssim": inv["blackbox_ssim"],
                "mean_image_ssim": inv["mean_image_ssim"],
            }
        )
    (out / "results.json").write_text(
        json.dumps({"defences": results, "epsilon_sweep": sweep, "ssim": SSIM_SETTINGS}, indent=2)
    )
    return _write_report(cfg, data, out, results, grids, sweep, quick, epsilon, gamma)


def summary_rows(results: dict[str, dict], known: int = 5) -> list[dict]:
    """One line per defence: accuracy, epsilons, best clustering success (with `known` labels per class)
    and its bound, inversion scores beside the trivial guesses."""
    out = []
    for name, res in results.items():
        clus = [r for r in res["clustering"] if r.get("known_per_class", known) == known]
        ext = {e["attacker"]: e["surrogate_accuracy"] for e in res["extraction"] if e["aux_labels"] == 0}
        inv = res["inversion"]
        row = {
            "defence": name,
            "arch": res.get("arch"),
            "test_accuracy": res["test_accuracy"],
            "epsilon": res["epsilon"],
            "label_epsilon": res.get("label_epsilon"),
        }
        for what in ("activations", "gradients", "pseudo"):
            best = [r for r in clus if r["observed"].startswith(what)]
            top = max(best, key=lambda r: r["success"]) if best else None
            key = "pseudo_labels" if what == "pseudo" else what
            row[f"clustering_{key}"] = top["success"] if top else None
            row[f"clustering_{key}_bound"] = top["success_bound"] if top else None
        row.update(
            {
                "whitebox_ssim": inv["whitebox_ssim"],
                "blackbox_ssim": inv["blackbox_ssim"],
                "mean_image_ssim": inv["mean_image_ssim"],
                "class_mean_image_ssim": inv.get("class_mean_image_ssim"),
                "whitebox_ssim_advantage": inv.get("whitebox_ssim_advantage"),
                "blackbox_ssim_advantage": inv.get("blackbox_ssim_advantage"),
                "extraction_coalition_no_labels": ext.get("all trainers (coalition)"),
            }
        )
        out.append(row)
    return out


def _write_report(cfg, data, out, results, grids, sweep, quick, epsilon, gamma) -> Path:
    r = Report(f"Privacy evaluation ({data.name}{', quick' if quick else ''})")
    r.text(
        f"Defended job: {cfg.model.arch}, {cfg.model.n_trainers} trainers, {cfg.training.epochs} epoch(s), "
        f"{len(data.train_x)} training samples. DP at epsilon = {epsilon}; label expansion gamma = {gamma}. "
        f"'{DEFAULT_JOB}' is the undefended job a user runs, with its own architecture; '{BASELINE}' is "
        "the defended job's model with every defence off."
    )
    r.text(
        f"Attackers observe the last training round. Clustering: k-means on {clustered_text(quick)} "
        "of that round, with a known labelled set of 1 or 5 "
        "samples per class (Liu & Lyu 2022); success = advantage over chance; success_bound = the bound the "
        "epsilons imply (pseudo-labels: label epsilon; activations: activation epsilon, given the head; "
        "gradients: both composed; 'none' = no DP covers it). Inversion targets private training samples at "
        "trainer 1; the black-box attacker queries the data owner's release interface on a random half of "
        "the test set (disjoint from training); the mean image (and the class-mean image, which knows the "
        "label) are what attackers that learned nothing output; advantage = SSIM - mean-image SSIM. SSIM: "
        "skimage, data range 1, 7x7 uniform window (the *_gaussian columns: 11x11 Gaussian, sigma 1.5). "
        "Extraction is scored on the other half of the test set."
    )
    r.heading("Summary (5 known labels per class; the undefended rows first)")
    r.table(summary_rows(results, 5))
    r.text(
        "Clustering columns give the maximum over trainer positions and k (K and gamma*K), with its bound."
    )
    r.heading("Clustering label inference per position")
    rows = [{"defence": n, **row} for n, res in results.items() for row in res["clustering"]]
    r.table(
        rows,
        [
            "defence",
            "position",
            "observed",
            "k",
            "known_per_class",
            "accuracy",
            "success",
            "success_bound",
            "within_bound",
        ],
    )
    r.heading("Inversion at trainer 1 (SSIM, advantage over the mean image, PSNR)")
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
                    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
                    ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)  # numpy: matplotlib's own type
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
    base = results.get(BASELINE)
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
