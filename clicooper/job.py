"""Build a job's parties from a configuration and run it: the chain, and the
centralized reference that trains the same model in one place.

The runner wires parties to a transport and calls the data owner's driving
methods; it never reaches into a party's state beyond asking it to save or load
its own checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clicooper.build import (
    build_trainer,
    build_verifier,
    lr_schedule,
    make_optimizer,
    model_and_plan,
    segment_shapes,
    trainer_segments,
)
from clicooper.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    round_prefix,
    saved_rounds,
)
from clicooper.config import JobConfig, ResumeError, resume_changes
from clicooper.data import DatasetSplits, load_dataset
from clicooper.data.loaders import DataLimits
from clicooper.manifest import DATA_OWNER, JobManifest, PartyKeys, build_manifest, party_names
from clicooper.models import SplitPlan, split_model
from clicooper.models.cost import PartyCompute, SegmentWork, party_compute
from clicooper.models.split import block_costs
from clicooper.parties import DataOwner, Trainer
from clicooper.privacy.defence import DataOwnerDefences
from clicooper.privacy.dp_sgd import DpSgdPlan, dp_sgd_train
from clicooper.privacy.label_dp import new_label_key, transition_matrix
from clicooper.privacy.label_prior import (
    PRIOR_FILE,
    calibration_split,
    cosine_logits,
    fit_temperature,
    load_priors,
    prior_stages,
    probe_priors,
    save_priors,
)
from clicooper.privacy.labels import generate_secret, load_secret, save_secret_encrypted
from clicooper.provenance import WatermarkSpec
from clicooper.schedule import set_lr
from clicooper.seeding import epoch_batches
from clicooper.transport import InProcTransport, Transport
from clicooper.transport.messages import Rewind
from clicooper.transport.precision import WIRE_DTYPES

EpochCallback = Callable[[dict], None]
StepCallback = Callable[[int, int], None]
NoteCallback = Callable[[str], None]
PINNED_CONFIG = "job_config.json"  # in the data owner's folder: the configuration of the last (re)start
RESUME_LOG = "resume_log.jsonl"


@dataclass
class RunSummary:
    mode: str
    dataset: str
    test_accuracy: float
    epochs: int
    wall_time_s: float
    epoch_times_s: list[float]
    n_trainers: int = 0
    bytes_per_step: dict[str, float] = field(default_factory=dict)
    defences: list[str] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    label_epsilon: float | None = None  # label DP (pure), beside the activation epsilon
    run_dir: str | None = None
    compute: list[dict] = field(default_factory=list)  # per party: params, training multiply-adds, share
    extra: dict = field(default_factory=dict)
    # What `epsilon` covers: "activation-level (given the head)" or "end-to-end" (None without DP).
    guarantee: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def prepare_data(cfg: JobConfig) -> DatasetSplits:
    d = cfg.data
    limits = DataLimits(d.max_classes, d.max_input_elements, d.max_samples)
    data = load_dataset(d.dataset, d.path, seed=cfg.job.seed, limits=limits)
    if cfg.data.train_subset or cfg.data.test_subset:
        data = data.subset(cfg.data.train_subset, cfg.data.test_subset, seed=cfg.job.seed)
    return data


def build_model_and_plan(
    cfg: JobConfig, data: DatasetSplits, model: nn.Sequential | None = None
) -> tuple[nn.Sequential, SplitPlan]:
    """The full model (seeded initial weights, or the user's own) and where it is cut."""
    return model_and_plan(cfg, data.input_shape, data.num_classes, model)


def new_run_dir(cfg: JobConfig, suffix: str = "") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    d = cfg.job.run_root / f"{cfg.job.name}{suffix}-{stamp}"
    d.mkdir(parents=True, exist_ok=False)
    return d


PRETRAIN_SCALE = 16.0  # cosine-probe temperature
# Pull each feature to its class's probe direction. 4 rather than 1: the tighter classes make the
# clean linear read-out (what DP off gets) and the class means of the release (all DP leaves)
# agree; measured 0.9047 vs 0.8934-0.8971 (weight 4) against 0.9063 vs 0.8824-0.8876 (weight 1)
# on cached features (EXPERIMENTS.md, section 11).
PRETRAIN_CENTRE_WEIGHT = 4.0
PRETRAIN_LR = 2e-3


def pretrain_head(
    head: nn.Module,
    data: DatasetSplits,
    cfg: JobConfig,
    labels: torch.Tensor | None = None,
    transition: torch.Tensor | None = None,
) -> torch.Tensor:
    """The data owner's local "prep work": train the head on its own data (nothing leaves it), so
    that the activations it later releases are already discriminative.

    The throw-away probe is a cosine classifier (unit-norm features against unit-norm class
    directions) plus a centre term pulling each feature to its class's direction. Why: trainers
    can only learn class statistics from a noised release (see docs/privacy.md), which amounts to
    a nearest-class-mean read-out; the centre term makes that read-out as good as the probe
    (measured: 88.6% vs 88.9% on Fashion-MNIST after 2 epochs, against 86.1% vs 87.7% for a plain
    linear probe). `labels` replaces the true training labels (with label DP: the noisy ones, so
    the head never saw the true labels).

    `transition` (label DP: T[y, j] = P(noisy j | true y), public) corrects both terms for the
    label noise, so that they estimate the clean-label losses. Uncorrected, the probe learns to be
    unsure (no prediction can be right more often than the keep rate), which a cosine classifier
    of fixed temperature achieves by moving the class directions together, and the centre term
    pulls every direction toward the others' samples. At label epsilon 2 (keep rate 0.45) the
    class directions ended at a mean cosine of 0.97, and a class-mean read-out of the release (true
    labels, 20,000 images) scored 0.46, against 0.83 with the correction (EXPERIMENTS.md, section
    13). The cross-entropy is forward-corrected (the noisy label's likelihood is `softmax @ T`;
    Patrini et al., CVPR 2017) and the centre term backward-corrected (`T^-1` weighs every class's
    distance, an unbiased estimate of the clean term; Natarajan et al., NeurIPS 2013). Returns the
    probe's class directions (a learned label prior reads them, `privacy.label_prior`)."""
    labels = data.train_y if labels is None else labels
    with torch.no_grad():
        dim = head(data.train_x[:1]).flatten(1).shape[1]
    directions = nn.Parameter(torch.randn(data.num_classes, dim, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam([*head.parameters(), directions], lr=PRETRAIN_LR)
    epochs = cfg.model.head_pretrain_epochs
    batches = [epoch_batches(cfg.job.seed, f"pretrain-{e}", len(data.train_x), 128) for e in range(epochs)]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, PRETRAIN_LR, total_steps=max(sum(map(len, batches)), 1))
    T = None if transition is None else transition.float()
    T_inv = None if T is None else torch.linalg.inv(T)
    head.train()
    for epoch_ids in batches:
        for ids in epoch_ids:
            a = F.normalize(head(data.train_x[ids]).flatten(1), dim=1)
            w = F.normalize(directions, dim=1)
            y = labels[ids]
            logits = PRETRAIN_SCALE * a @ w.T
            if T is None:
                loss = F.cross_entropy(logits, y)
                loss = loss + PRETRAIN_CENTRE_WEIGHT * ((a - w[y]) ** 2).sum(1).mean()
            else:
                noisy = F.softmax(logits, dim=1) @ T
                loss = F.nll_loss(torch.log(noisy.clamp_min(1e-12)), y)
                dist = ((a.unsqueeze(1) - w.unsqueeze(0)) ** 2).sum(2)  # (batch, classes)
                loss = loss + PRETRAIN_CENTRE_WEIGHT * (T_inv[y] * dist).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return directions.detach()


class NormalizedProbe(nn.Module):
    """The head's throw-away linear probe, reading L2-normalised activations (scaled by 10): what
    clipping at C leaves of the direction, as in `pretrain_head`. `cosine`: the class weights are
    normalised too (no bias), so classes are directions and a nearest-class-mean read-out of the
    release matches what the head was trained for."""

    def __init__(self, dim: int, num_classes: int, cosine: bool = False) -> None:
        super().__init__()
        self.cosine = cosine
        self.linear = nn.Linear(dim, num_classes, bias=not cosine)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = a.flatten(1)
        a = 10 * a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if not self.cosine:
            return self.linear(a)
        w = self.linear.weight
        return a @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).T


def train_head_dp_sgd(
    head: nn.Module,
    data: DatasetSplits,
    plan: DpSgdPlan,
    *,
    lr: float,
    momentum: float,
    cosine_probe: bool = False,
    on_step: StepCallback | None = None,
) -> tuple[int, float]:
    """Train the head and a throw-away probe with DP-SGD on the data owner's data (end-to-end DP).

    The probe is trained under the same DP-SGD run (its weights shape the head's updates) and then
    dropped. Returns (steps taken, the probe's test accuracy, for reporting only).
    """
    with torch.no_grad():
        dim = head(data.train_x[:1]).flatten(1).shape[1]
    model = nn.Sequential(head, NormalizedProbe(dim, data.num_classes, cosine_probe))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    steps = dp_sgd_train(model, F.cross_entropy, data.train_x, data.train_y, plan, opt, on_step=on_step)
    return steps, evaluate_model(model, data.test_x, data.test_y)


def build_defence(cfg: JobConfig, data: DatasetSplits, run_dir: Path | None) -> DataOwnerDefences | None:
    """The data owner's defences from `[privacy]`, or None for the plain chain. The codebook secret is
    kept in the data owner's own folder (mode 0600), apart from every checkpoint."""
    p = cfg.privacy
    if not p.dp and p.gamma == 1 and p.label_epsilon is None:
        return None
    secret_path = run_dir / "data_owner" / "secret.json" if run_dir else None
    if (
        secret_path is not None
        and not secret_path.exists()
        and p.gamma > 1
        and saved_rounds(secret_path.parent)
    ):
        raise ResumeError(
            f"{secret_path} is missing: this run's secret label codebook cannot be recovered, and a new "
            "one would relabel data the trainers already learned. Restore the file or start a new run."
        )
    if secret_path is not None and secret_path.exists():
        secret = load_secret(secret_path, None)
    elif p.secret_seed is not None:  # reproducible experiments only: the seed must then stay private
        secret = hashlib.sha256(f"clicooper-secret:{p.secret_seed}".encode()).digest()
    else:
        secret = generate_secret()
    if secret_path is not None and not secret_path.exists():
        save_secret_encrypted(secret_path, secret, None)
    label_key = None
    if p.label_epsilon is not None:  # OS randomness, kept apart like the codebook secret (resume redraws it)
        key_path = run_dir / "data_owner" / "label_dp_key.json" if run_dir else None
        if key_path is not None and key_path.exists():
            label_key = load_secret(key_path, None)
        else:
            label_key = new_label_key()
            if key_path is not None:
                save_secret_encrypted(key_path, label_key, None)
    return DataOwnerDefences(
        p,
        num_classes=data.num_classes,
        epochs=cfg.training.epochs,
        n_train=len(data.train_x),
        batch_size=cfg.training.batch_size,
        poisson=cfg.training.sampling == "poisson",
        secret=secret,
        ledger_dir=run_dir / "data_owner" if run_dir else None,
        data_digest=data_digest(data),
        label_key=label_key,
    )


def data_digest(data: DatasetSplits) -> str:
    """SHA-256 of the training inputs and labels: which samples a DP release is about."""
    h = hashlib.sha256()
    for t in (data.train_x, data.train_y):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _pretrain(
    head: nn.Module, data: DatasetSplits, cfg: JobConfig, defence: object, run_dir: Path | None
) -> None:
    """The head's local pre-training. With label DP it uses the noisy labels (the same release the
    trainers get), so that the released activations carry no more of the true labels than the label
    epsilon, with the noise's public transition matrix to correct for it. With a learned label prior
    it trains on the first stage's labels only and sets the second stage's priors from its probe
    (`privacy.label_prior`)."""
    label_dp = getattr(defence, "label_dp", None)
    if label_dp is None:
        pretrain_head(head, data, cfg)
        return
    privatize = defence.privatize_labels
    if cfg.privacy.label_prior == "uniform":
        labels = privatize(data.train_y, torch.arange(len(data.train_y)))
        pretrain_head(head, data, cfg, labels=labels, transition=label_dp.transition())
        return
    first, second = prior_stages(cfg.job.seed, len(data.train_y))
    train, calibrate = calibration_split(first)
    stage1 = replace(data, train_x=data.train_x[train], train_y=data.train_y[train])
    uniform = transition_matrix(data.num_classes, label_dp.epsilon)
    directions = pretrain_head(head, stage1, cfg, labels=privatize(stage1.train_y, train), transition=uniform)
    path = run_dir / DATA_OWNER / PRIOR_FILE if run_dir else None
    if path is not None and path.exists():
        priors = load_priors(path, second, data.num_classes)
    else:
        held = cosine_logits(head, directions, data.train_x[calibrate])
        t = fit_temperature(held, privatize(data.train_y[calibrate], calibrate), uniform)
        priors = probe_priors(cosine_logits(head, directions, data.train_x[second]), t)
        if path is not None:
            save_priors(path, second, priors)
    label_dp.set_priors(second, priors)


FROM_CONFIG = object()  # sentinel: build the data owner's defences from the job's [privacy] section


class ChainJob:
    """A data owner and n trainers (and, with watermarking, the verifier) wired to one transport.

    The parties are built from a public manifest and each party's own keys (`clicooper.build`), as
    the separate party programs build them. Without `manifest`, one is made for this run: each
    party's keys are made (or, on resume, read) in its own folder of the run (`run_dir/<party>`),
    or kept in memory without a run folder. `local` names the parties hosted in this process (all by
    default); the others are reached through `transport` (the data owner's program hosts only
    itself). `keys` gives hosted parties' keys read elsewhere (their identity folders)."""

    def __init__(
        self,
        cfg: JobConfig,
        data: DatasetSplits,
        run_dir: Path | None,
        *,
        transport: Transport | None = None,
        defence: object = FROM_CONFIG,
        job_id: str | None = None,
        model: nn.Sequential | None = None,
        manifest: JobManifest | None = None,
        keys: dict[str, PartyKeys] | None = None,
        local: set[str] | None = None,
    ) -> None:
        self.cfg, self.data, self.run_dir = cfg, data, run_dir
        self.config_changes = self._pin_config()
        self.notes: list[str] = []
        self.transport = transport or InProcTransport()
        if manifest is not None:
            job_id = manifest.job_id
        self.job_id = job_id or (run_dir.name if run_dir else f"{cfg.job.name}-inproc")
        self.model, self.plan = build_model_and_plan(cfg, data, model)
        self._train_bytes: Counter[tuple[str, str]] = Counter()
        self._train_steps = 0
        # across `run` calls on this job (a data owner program's recoveries): the summary covers them all
        self._epoch_times: list[float] = []
        self._started: float | None = None
        segs = split_model(self.model, self.plan)
        head, tail = segs[0], (segs[-1] if self.plan.u_shaped else None)
        trainer_segs = trainer_segments(segs, self.plan)
        names = [f"trainer_{i + 1}" for i in range(len(trainer_segs))]
        self.trainer_names = names
        wm = cfg.watermark.enabled
        self.local = set(local) if local is not None else {n for n, _, _ in party_names(len(names), wm)}
        # Each segment's input shape, then the model's output shape, from the public architecture
        # (a dummy forward, before any local training).
        shapes = segment_shapes(segs, data.input_shape)
        keys = dict(keys or {})
        if manifest is None:
            for name, role, _ in party_names(len(names), wm):
                if name not in keys:
                    folder = run_dir / name if run_dir else None
                    keys[name] = PartyKeys.load_or_create(folder, name, role, watermark=wm)
            manifest = build_manifest(cfg, self.job_id, data.input_shape, data.num_classes, keys)
        elif (
            tuple(manifest.input_shape) != tuple(data.input_shape) or manifest.num_classes != data.num_classes
        ):
            raise ValueError(
                f"the data ({data.num_classes} classes of shape {tuple(data.input_shape)}) do not match the "
                f"job manifest ({manifest.num_classes} classes of shape {tuple(manifest.input_shape)})"
            )
        self.manifest = manifest
        if defence is FROM_CONFIG:
            defence = build_defence(cfg, data, run_dir)
        self.head_probe_accuracy: float | None = None
        head_plan = getattr(defence, "head_plan", None)
        if head_plan is not None:  # end-to-end DP: the head is trained with DP-SGD, then frozen
            p = cfg.privacy
            steps, probe_acc = train_head_dp_sgd(
                head,
                data,
                head_plan,
                lr=p.head_dp_lr,
                momentum=p.head_dp_momentum,
                cosine_probe=p.head_dp_probe == "cosine",
            )
            defence.record_head_steps(steps)
            self.head_probe_accuracy = probe_acc
        if cfg.model.head_pretrain_epochs:
            _pretrain(head, data, cfg, defence, run_dir)
        self.defence = defence
        one_shot = defence is not None and getattr(defence, "one_shot", False)
        if one_shot or cfg.model.freeze_head:
            head.requires_grad_(False)
        tcfg = cfg.training
        self.spec = WatermarkSpec(**cfg.watermark.model_dump(exclude={"enabled"})) if wm else None
        verifier = manifest.verifier
        self.verifier = (
            build_verifier(
                manifest,
                keys[verifier],
                self.transport,
                state_dir=run_dir / verifier if run_dir else None,
            )
            if verifier is not None and verifier in self.local
            else None
        )
        self.trainers: list[Trainer] = [
            build_trainer(
                manifest,
                keys[name],
                self.transport,
                checkpoint_dir=run_dir / name if run_dir else None,
                segment=seg,
                input_shape=shapes[i + 1],
            )
            for i, (name, seg) in enumerate(zip(names, trainer_segs, strict=True))
            if name in self.local
        ]
        self.data_owner = DataOwner(
            job_id=self.job_id,
            transport=self.transport,
            data=data,
            head=head,
            head_optimizer=make_optimizer(head.parameters(), tcfg) if _trainable(head) else None,
            trainers=names,
            batch_size=tcfg.batch_size,
            eval_batch_size=tcfg.eval_batch_size,
            seed=cfg.job.seed,
            poisson=tcfg.sampling == "poisson",
            tail=tail,
            tail_optimizer=make_optimizer(tail.parameters(), tcfg) if tail is not None else None,
            defence=defence,
            verifier=verifier,
            checkpoint_dir=run_dir / DATA_OWNER if run_dir else None,
            lr_schedule=lr_schedule(tcfg),
            micro_batches=tcfg.micro_batches,
            wire_dtype=WIRE_DTYPES[tcfg.wire_dtype],
            # what the last trainer returns for each sample: the model's output, or the tail's input
            output_shape=shapes[-2] if tail is not None else shapes[-1],
        )
        for t in self.trainers:
            t.register_with_verifier()
        if self.config_changes:  # a resume's changes (more epochs) are pinned once a round has opened
            self.data_owner.on_round_opened = lambda rnd: self._repin_config()

    def _pin_config(self) -> list[dict]:
        """Record the configuration a run starts with; a later job on the same folder (a resume) may
        change only what `resume_changes` allows, else ResumeError names the field. Each round that
        opens re-pins the configuration it runs under (`_repin_config`): the fields a resume may
        change are compared with the last opened round's, so epochs raised once (and planned with
        the verifier) cannot be lowered again, while a resume that fails before any round opens
        leaves the pin as it was."""
        if self.run_dir is None:
            return []
        path = self.run_dir / "data_owner" / PINNED_CONFIG
        if not path.exists():
            self._repin_config()
            return []
        try:
            started = JobConfig.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as e:
            raise ResumeError(
                f"{path} (the configuration this run was last started with) is unreadable: {e}"
            ) from None
        return resume_changes(started, self.cfg)

    def _repin_config(self) -> None:
        path = self.run_dir / "data_owner" / PINNED_CONFIG
        atomic_write_bytes(path, self.cfg.model_dump_json(indent=2).encode(), mode=0o600)

    def compute(self, head_pretrain_epochs: int | None = None) -> list[PartyCompute]:
        """Each party's parameters and share of the run's training multiply-adds (see models/cost.py).

        `head_pretrain_epochs` overrides the configured count, for a head pre-trained elsewhere."""
        pre = self.cfg.model.head_pretrain_epochs if head_pretrain_epochs is None else head_pretrain_epochs
        costs = block_costs(self.model, self.data.input_shape, "flops")
        b = self.plan.bounds
        segs = split_model(self.model, self.plan)
        macs = [sum(costs[lo:hi]) for lo, hi in zip(b[:-1], b[1:], strict=True)]
        n, epochs = len(self.data.train_x), self.cfg.training.epochs
        n_params = [sum(p.numel() for p in s.parameters()) for s in segs]
        head_trains = self.data_owner.head_optimizer is not None
        one_shot = bool(getattr(self.defence, "one_shot", False))
        work = [
            SegmentWork(
                "data_owner",
                n_params[0],
                macs[0],
                train_passes=n * (pre + (epochs if head_trains else 0)),
                forward_passes=0 if head_trains else (n if one_shot else n * epochs),
            )
        ]
        for i, name in enumerate(self.trainer_names):
            work.append(SegmentWork(name, n_params[i + 1], macs[i + 1], train_passes=n * epochs))
        if self.plan.u_shaped:
            work.append(SegmentWork("data_owner", n_params[-1], macs[-1], train_passes=n * epochs))
        return party_compute(work)

    @property
    def parties(self) -> list:
        return [self.data_owner, *self.trainers]

    def resume(self, on_note: NoteCallback | None = None) -> int:
        """Load every party's newest intact checkpoint of a round all of them completed; return the
        next round. A damaged checkpoint (SHA-256 mismatch, truncated, garbage) is never trained on:
        the newest round before it that loads for every party is used instead, and a note says so."""
        if self.run_dir is None:
            raise ValueError("resume needs a run folder")

        def note(text: str) -> None:
            self.notes.append(text)
            if on_note is not None:
                on_note(text)

        dirs = [self.run_dir / p.name for p in self.parties]
        common = set.intersection(*(set(saved_rounds(d)) for d in dirs))
        start = 0
        for rnd in sorted(common, reverse=True):
            try:
                for p, d in zip(self.parties, dirs, strict=True):
                    where = p.name
                    p.load(round_prefix(d, rnd))
            except (CheckpointError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                note(f"checkpoint of round {rnd + 1} is damaged ({where}: {e}); trying the round before")
                continue
            start = rnd + 1
            if rnd != max(common):
                note(f"resuming from round {rnd + 1}, the newest round intact for every party")
            break
        else:
            if common:
                raise ResumeError(f"no intact checkpoint in {self.run_dir}: every saved round is damaged")
        if start > self.cfg.training.epochs:  # a run folder pinned before epochs were re-pinned
            raise ResumeError(
                f"cannot resume with training.epochs = {self.cfg.training.epochs}: {start} rounds "
                "are already trained and planned with the verifier; rounds may only be added to"
            )
        if self.verifier is not None:
            self.verifier.truncate(start)
        if isinstance(self.transport, InProcTransport):  # what a failed round left undelivered
            self.transport.discard_pending()
        self.rewind_remote(start)
        with (self.run_dir / RESUME_LOG).open("a") as f:
            entry = {"time": datetime.now().isoformat(timespec="seconds"), "from_round": start}
            f.write(json.dumps({**entry, "changes": self.config_changes, "notes": self.notes}) + "\n")
        return start

    def rewind_remote(self, start: int) -> None:
        """Tell the parties in other processes to go back to the state after round `start - 1`
        (`Rewind`): those that kept running when another failed, and those restarted."""
        remote = [n for n in self.trainer_names if n not in self.local]
        if self.manifest.verifier is not None and self.manifest.verifier not in self.local:
            remote.append(self.manifest.verifier)
        for name in remote:
            self.data_owner.send(Rewind, name, start, 0)

    def run(
        self,
        *,
        resume: bool = False,
        on_epoch: EpochCallback | None = None,
        on_step: StepCallback | None = None,
        on_note: NoteCallback | None = None,
    ) -> RunSummary:
        start_round = self.resume(on_note) if resume else 0
        metrics_path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if metrics_path is not None and start_round > 0:
            self._complete_metrics(metrics_path, start_round)
        if self._started is None:
            self._started = time.perf_counter()
        acc = float("nan")
        for rnd in range(start_round, self.cfg.training.epochs):
            te = time.perf_counter()
            before = Counter(self.transport.bytes_sent)
            loss = self.data_owner.train_round(rnd, on_step)
            train_time = time.perf_counter() - te
            self._train_bytes.update(Counter(self.transport.bytes_sent) - before)
            self._train_steps += self.data_owner.last_round_steps
            self._epoch_times.append(train_time)
            acc = self.data_owner.evaluate("test", tag=rnd)
            row = {"epoch": rnd + 1, "train_loss": loss, "test_accuracy": acc, "epoch_time_s": train_time}
            row.update(self._privacy_row())
            if metrics_path is not None:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if on_epoch is not None:
                on_epoch(row)
        if start_round >= self.cfg.training.epochs:
            acc = self.data_owner.evaluate("test", tag="final")
        return self._summary(acc, time.perf_counter() - self._started, list(self._epoch_times))

    def _complete_metrics(self, path: Path, epoch: int) -> None:
        """A run stopped between saving a round and writing its metrics line (during the test
        evaluation) resumes after that round: evaluate the restored model and write the line, so the
        epoch is not missing for good. Its loss and time were not kept."""
        try:
            text = path.read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut off when the process was killed
                continue
            if isinstance(row, dict) and row.get("epoch") == epoch:
                return
        acc = self.data_owner.evaluate("test", tag=epoch - 1)
        row = {"epoch": epoch, "train_loss": None, "test_accuracy": acc, "epoch_time_s": None}
        row.update(self._privacy_row(), written_on_resume=True)
        with path.open("a") as f:
            f.write(("\n" if text and not text.endswith("\n") else "") + json.dumps(row) + "\n")

    def _privacy_row(self) -> dict:
        d = self.defence
        if d is None or not hasattr(d, "epsilon"):
            return {}
        row = {"epsilon": d.epsilon(), "delta": d.delta}
        if hasattr(d, "label_epsilon"):
            row["label_epsilon"] = d.label_epsilon()
        return row

    def _summary(self, acc: float, wall: float, epoch_times: list[float]) -> RunSummary:
        steps = max(self._train_steps, 1)
        hops = {f"{s}->{r}": round(b / steps, 1) for (s, r), b in sorted(self._train_bytes.items())}
        s = RunSummary(
            mode="chain",
            dataset=self.data.name,
            test_accuracy=acc,
            epochs=self.cfg.training.epochs,
            wall_time_s=wall,
            epoch_times_s=epoch_times,
            n_trainers=len(self.trainer_names),
            bytes_per_step=hops,
            defences=list(getattr(self.defence, "names", [])) if self.defence else [],
            run_dir=str(self.run_dir) if self.run_dir else None,
            guarantee=getattr(self.defence, "guarantee", None) if self.defence else None,
        )
        s.extra["split_bounds"] = list(self.plan.bounds)
        s.compute = [c.to_json() for c in self.compute()]
        if self.head_probe_accuracy is not None:
            s.extra["dp_sgd_head_probe_accuracy"] = self.head_probe_accuracy
        priv = self._privacy_row()
        s.epsilon, s.delta = priv.get("epsilon"), priv.get("delta")
        s.label_epsilon = priv.get("label_epsilon")
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / "summary.json", s.to_json())
        return s


def train_centralized(
    cfg: JobConfig,
    data: DatasetSplits,
    run_dir: Path | None = None,
    *,
    model: nn.Sequential | None = None,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
) -> tuple[RunSummary, nn.Sequential]:
    """The accuracy and speed reference: the same model, data order and optimiser, in one place."""
    model, opt = centralized_setup(cfg, data, model)
    bs = cfg.training.batch_size
    epoch_times, t0, acc = [], time.perf_counter(), float("nan")
    lr_at = lr_schedule(cfg.training) or (lambda _: cfg.training.lr)  # the rate the chain's parties use
    for epoch in range(cfg.training.epochs):
        te = time.perf_counter()
        set_lr(opt, lr_at(epoch))
        batches = epoch_batches(
            cfg.job.seed, epoch, len(data.train_x), bs, poisson=cfg.training.sampling == "poisson"
        )
        model.train()
        n_steps, n_seen = len(batches), 0
        total = 0.0
        for step, ids in enumerate(batches):
            if len(ids) == 0:
                continue
            n_seen += len(ids)
            total += centralized_step(model, opt, data.train_x[ids], data.train_y[ids]) * len(ids)
            if on_step is not None:
                on_step(step + 1, n_steps)
        epoch_times.append(time.perf_counter() - te)
        acc = evaluate_model(model, data.test_x, data.test_y, cfg.training.eval_batch_size)
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(n_seen, 1),
            "test_accuracy": acc,
            "epoch_time_s": epoch_times[-1],
        }
        if run_dir is not None:
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        if on_epoch is not None:
            on_epoch(row)
    s = RunSummary(
        mode="centralized",
        dataset=data.name,
        test_accuracy=acc,
        epochs=cfg.training.epochs,
        wall_time_s=time.perf_counter() - t0,
        epoch_times_s=epoch_times,
        run_dir=str(run_dir) if run_dir else None,
    )
    if run_dir is not None:
        atomic_write_json(run_dir / "summary.json", s.to_json())
    return s, model


def centralized_setup(
    cfg: JobConfig, data: DatasetSplits, model: nn.Sequential | None = None
) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """The reference's model (a copy of `model`, or the job's seeded one with the true classes as
    outputs) and its optimiser."""
    if model is None:
        model, _ = build_model_and_plan(cfg.replace(privacy={"gamma": 1, "u_shaped": False}), data)
    model = copy.deepcopy(model).train()
    return model, make_optimizer(model.parameters(), cfg.training)


def centralized_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimiser step of centralized training on the batch (x, y); returns its mean loss."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())
