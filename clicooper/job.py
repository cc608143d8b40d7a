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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clicooper.checkpoint import atomic_write_bytes, atomic_write_json, latest_round, round_prefix
from clicooper.config import JobConfig, TrainingSection
from clicooper.data import DatasetSplits, load_dataset
from clicooper.models import SplitPlan, build_model, plan_from_capacities, plan_from_cuts, split_model
from clicooper.parties import DataOwner, Trainer, Verifier
from clicooper.parties.verifier import STATE_FILE
from clicooper.privacy.defence import DataOwnerDefences
from clicooper.privacy.label_dp import new_label_key
from clicooper.privacy.labels import generate_secret, load_secret, save_secret_encrypted
from clicooper.provenance import Identity, WatermarkSpec, new_watermark_key
from clicooper.provenance.stage import StageProvenance
from clicooper.seeding import derive_seed, epoch_batches
from clicooper.transport import InProcTransport, Transport

EpochCallback = Callable[[dict], None]
StepCallback = Callable[[int, int], None]


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
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def make_optimizer(params, cfg: TrainingSection) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def prepare_data(cfg: JobConfig) -> DatasetSplits:
    data = load_dataset(cfg.data.dataset, cfg.data.path, seed=cfg.job.seed)
    if cfg.data.train_subset or cfg.data.test_subset:
        data = data.subset(cfg.data.train_subset, cfg.data.test_subset, seed=cfg.job.seed)
    return data


def output_dim(cfg: JobConfig, num_classes: int) -> int:
    """Pseudo-classes for the last trainer, or true classes when the data owner keeps the tail."""
    return num_classes if cfg.privacy.u_shaped else cfg.privacy.gamma * num_classes


def build_model_and_plan(
    cfg: JobConfig, data: DatasetSplits, model: nn.Sequential | None = None
) -> tuple[nn.Sequential, SplitPlan]:
    """The full model (seeded initial weights, or the user's own) and where it is cut."""
    if model is None:
        torch.manual_seed(derive_seed(cfg.job.seed, "init"))
        model = build_model(cfg.model.arch, data.input_shape, output_dim(cfg, data.num_classes))
    else:
        model = copy.deepcopy(model)
    n_blocks = len(list(model.children()))
    u = cfg.privacy.u_shaped
    if cfg.model.cut_points is not None:
        plan = plan_from_cuts(cfg.model.cut_points, n_blocks, u_shaped=u)
        if plan.n_trainers != cfg.model.n_trainers:
            raise ValueError(
                f"model.cut_points {cfg.model.cut_points} give {plan.n_trainers} trainer segment(s) "
                f"but model.n_trainers is {cfg.model.n_trainers}"
            )
    else:
        caps = cfg.model.capacities or [1.0] * cfg.model.n_trainers
        plan = plan_from_capacities(
            model,
            data.input_shape,
            caps,
            head_blocks=cfg.model.head_blocks,
            metric=cfg.model.balance_by,
            u_shaped=u,
        )
    return model, plan


def new_run_dir(cfg: JobConfig, suffix: str = "") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    d = cfg.job.run_root / f"{cfg.job.name}{suffix}-{stamp}"
    d.mkdir(parents=True, exist_ok=False)
    return d


def pretrain_head(
    head: nn.Module, data: DatasetSplits, cfg: JobConfig, labels: torch.Tensor | None = None
) -> None:
    """The data owner's local "prep work": train the head with a throw-away linear probe on its own
    data (nothing leaves it), so that the activations it later releases are already discriminative.
    The probe reads L2-normalised activations, matching what clipping leaves of them. `labels` replaces
    the true training labels (with label DP: the noisy ones, so the head never saw the true labels)."""
    labels = data.train_y if labels is None else labels
    with torch.no_grad():
        dim = head(data.train_x[:1]).flatten(1).shape[1]
    probe = nn.Linear(dim, data.num_classes)
    opt = torch.optim.Adam([*head.parameters(), *probe.parameters()], lr=1e-3)
    head.train()
    for epoch in range(cfg.model.head_pretrain_epochs):
        for ids in epoch_batches(cfg.job.seed, f"pretrain-{epoch}", len(data.train_x), 128):
            a = head(data.train_x[ids]).flatten(1)
            a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
            loss = F.cross_entropy(probe(a) * 10, labels[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def build_defence(cfg: JobConfig, data: DatasetSplits, run_dir: Path | None) -> DataOwnerDefences | None:
    """The data owner's defences from `[privacy]`, or None for the plain chain. The codebook secret is
    kept in the data owner's own folder (mode 0600), apart from every checkpoint."""
    p = cfg.privacy
    if not p.dp and p.gamma == 1 and p.label_epsilon is None:
        return None
    secret_path = run_dir / "data_owner" / "secret.json" if run_dir else None
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
        label_key=label_key,
    )


def _pretrain_labels(defence: object, data: DatasetSplits) -> torch.Tensor | None:
    """With label DP, the head's local pre-training uses the noisy labels (the same release the trainers
    get), so that the released activations carry no more of the true labels than the label epsilon."""
    privatize = getattr(defence, "privatize_labels", None)
    if privatize is None:
        return None
    return privatize(data.train_y, torch.arange(len(data.train_y)))


FROM_CONFIG = object()  # sentinel: build the data owner's defences from the job's [privacy] section


class ChainJob:
    """A data owner and n trainers wired to one transport."""

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
    ) -> None:
        self.cfg, self.data, self.run_dir = cfg, data, run_dir
        self.transport = transport or InProcTransport()
        self.job_id = job_id or (run_dir.name if run_dir else f"{cfg.job.name}-inproc")
        self.model, self.plan = build_model_and_plan(cfg, data, model)
        self._train_bytes: Counter[tuple[str, str]] = Counter()
        self._train_steps = 0
        segs = split_model(self.model, self.plan)
        head, tail = segs[0], (segs[-1] if self.plan.u_shaped else None)
        if defence is FROM_CONFIG:
            defence = build_defence(cfg, data, run_dir)
        if cfg.model.head_pretrain_epochs:
            pretrain_head(head, data, cfg, labels=_pretrain_labels(defence, data))
        trainer_segs = segs[1 : len(segs) - int(self.plan.u_shaped)]
        names = [f"trainer_{i + 1}" for i in range(len(trainer_segs))]
        self.defence = defence
        one_shot = defence is not None and getattr(defence, "one_shot", False)
        if one_shot or cfg.model.freeze_head:
            head.requires_grad_(False)
        tcfg = cfg.training
        shapes = self._segment_input_shapes(segs)
        wm = cfg.watermark.enabled
        self.spec = WatermarkSpec(**cfg.watermark.model_dump(exclude={"enabled"})) if wm else None
        self.verifier = (
            Verifier(
                job_id=self.job_id,
                transport=self.transport,
                trainers=names,
                spec=self.spec,
                identity=self._identity("verifier"),
                state_dir=run_dir / "verifier" if run_dir else None,
            )
            if wm
            else None
        )
        self.trainers: list[Trainer] = []
        for i, seg in enumerate(trainer_segs):
            self.trainers.append(
                Trainer(
                    name=names[i],
                    position=i + 1,
                    job_id=self.job_id,
                    transport=self.transport,
                    segment=seg,
                    optimizer=make_optimizer(seg.parameters(), tcfg),
                    prev=names[i - 1] if i else "data_owner",
                    next=names[i + 1] if i + 1 < len(names) else None,
                    data_owner="data_owner",
                    input_shape=shapes[i + 1],
                    num_outputs=output_dim(cfg, data.num_classes),
                    u_shaped=self.plan.u_shaped,
                    hooks=self._stage_provenance(i, names) if wm else None,
                    verifier="verifier" if wm else None,
                    checkpoint_dir=run_dir / names[i] if run_dir else None,
                )
            )
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
            verifier="verifier" if wm else None,
            checkpoint_dir=run_dir / "data_owner" if run_dir else None,
        )
        for t in self.trainers:
            t.register_with_verifier()

    def _identity(self, name: str) -> Identity:
        """A party's Ed25519 identity, kept in its own folder so a resumed job keeps it."""
        path = self.run_dir / name / "identity.pem" if self.run_dir else None
        if path is not None and path.exists():
            return Identity.load(path, name=name)
        ident = Identity.generate(name)
        if path is not None:
            ident.save(path)
        return ident

    def _stage_provenance(self, i: int, names: list[str]) -> StageProvenance:
        key_path = self.run_dir / names[i] / "watermark.key" if self.run_dir else None
        if key_path is not None and key_path.exists():
            wm_key = bytes.fromhex(key_path.read_text().strip())
        else:
            wm_key = new_watermark_key()
            if key_path is not None:
                atomic_write_bytes(key_path, wm_key.hex().encode(), mode=0o600)
        return StageProvenance(
            identity=self._identity(names[i]),
            wm_key=wm_key,
            spec=self.spec,
            job_id=self.job_id,
            position=i + 1,
            prev=names[i - 1] if i else "data_owner",
            next=names[i + 1] if i + 1 < len(names) else None,
            n_positions=len(names),
        )

    def _segment_input_shapes(self, segs: list[nn.Module]) -> list[tuple[int, ...]]:
        shapes, x = [], self.data.train_x[:2]
        with torch.no_grad():
            for s in segs:
                shapes.append(tuple(x.shape[1:]))
                x = s.eval()(x)
        return shapes

    @property
    def parties(self) -> list:
        return [self.data_owner, *self.trainers]

    def resume(self) -> int:
        """Load every party's newest checkpoint of a round all of them completed; return the next round."""
        if self.run_dir is None:
            raise ValueError("resume needs a run folder")
        dirs = [self.run_dir / p.name for p in self.parties]
        rounds = [latest_round(d) for d in dirs]
        if any(r is None for r in rounds):
            return 0
        rnd = min(rounds)  # type: ignore[type-var]
        for p, d in zip(self.parties, dirs, strict=True):
            p.load(round_prefix(d, rnd))
        if self.verifier is not None:
            self.verifier.load_state_dict(json.loads((self.run_dir / "verifier" / STATE_FILE).read_text()))
            self.verifier.truncate(rnd + 1)
        return rnd + 1

    def run(
        self,
        *,
        resume: bool = False,
        on_epoch: EpochCallback | None = None,
        on_step: StepCallback | None = None,
    ) -> RunSummary:
        start_round = self.resume() if resume else 0
        metrics_path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        epoch_times: list[float] = []
        t0 = time.perf_counter()
        acc = float("nan")
        for rnd in range(start_round, self.cfg.training.epochs):
            te = time.perf_counter()
            before = Counter(self.transport.bytes_sent)
            loss = self.data_owner.train_round(rnd, on_step)
            train_time = time.perf_counter() - te
            self._train_bytes.update(Counter(self.transport.bytes_sent) - before)
            self._train_steps += self.data_owner.last_round_steps
            epoch_times.append(train_time)
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
        return self._summary(acc, time.perf_counter() - t0, epoch_times)

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
            n_trainers=len(self.trainers),
            bytes_per_step=hops,
            defences=list(getattr(self.defence, "names", [])) if self.defence else [],
            run_dir=str(self.run_dir) if self.run_dir else None,
        )
        s.extra["split_bounds"] = list(self.plan.bounds)
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
    if model is None:
        model, _ = build_model_and_plan(cfg.replace(privacy={"gamma": 1, "u_shaped": False}), data)
    model = copy.deepcopy(model)
    opt = make_optimizer(model.parameters(), cfg.training)
    bs = cfg.training.batch_size
    epoch_times, t0, acc = [], time.perf_counter(), float("nan")
    for epoch in range(cfg.training.epochs):
        te = time.perf_counter()
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
            loss = F.cross_entropy(model(data.train_x[ids]), data.train_y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(ids)
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


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())
