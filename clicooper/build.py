"""Build a job's parties from its public manifest and each party's own keys.

The in-process simulation (`ChainJob`) and the separate party programs (`clicooper serve`,
`clicooper run MANIFEST`) both go through these functions, so a trainer or verifier is the same
object whether its neighbours live in the same process or across the network. Everything a party
needs that is not its own secret comes from the manifest: each party builds the public architecture
itself (seeded, so every party gets the same initial weights) and finds its segment's input shape
by a dummy forward pass; nobody runs another party's segment on real data.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from clicooper.config import JobConfig, TrainingSection
from clicooper.manifest import DATA_OWNER, JobManifest, PartyKeys
from clicooper.models import SplitPlan, build_model, plan_from_capacities, plan_from_cuts, split_model
from clicooper.parties import Trainer, Verifier
from clicooper.provenance import WatermarkSpec
from clicooper.provenance.stage import StageProvenance
from clicooper.schedule import RoundLr, schedule
from clicooper.seeding import derive_seed
from clicooper.transport.base import Transport
from clicooper.transport.precision import WIRE_DTYPES


def make_optimizer(params, cfg: TrainingSection) -> torch.optim.Optimizer:
    """SGD or Adam over the trainable `params`, fused (one kernel for all of them) where torch has a
    fused kernel for them: an unfused step costs about 70 us a call and 11 us a parameter in Python,
    and a chain steps one optimiser a party where centralized training steps one (BENCHMARKS.md)."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type == "cpu" and p.dtype in _FUSED_DTYPES for p in params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None
    )


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def output_dim(cfg: JobConfig, num_classes: int) -> int:
    """Pseudo-classes for the last trainer, or true classes when the data owner keeps the tail."""
    return num_classes if cfg.privacy.u_shaped else cfg.privacy.gamma * num_classes


def lr_schedule(cfg: TrainingSection) -> RoundLr | None:
    return (
        schedule(cfg.lr, cfg.epochs, cfg.lr_schedule, cfg.lr_floor) if cfg.lr_schedule != "constant" else None
    )


def arch_options(cfg: JobConfig) -> dict[str, object]:
    """Settings of the zoo architecture that follow from the job: the release width (`model.embed`)
    and, under label DP, no biases in `small-cnn-dp`'s read-out (why: `models.zoo.small_cnn_dp`)."""
    options: dict[str, object] = {}
    if cfg.model.embed is not None:
        options["embed"] = cfg.model.embed
    if cfg.model.arch == "small-cnn-dp" and cfg.privacy.label_epsilon is not None:
        options["readout_bias"] = False
    return options


def model_and_plan(
    cfg: JobConfig,
    input_shape: Sequence[int],
    num_classes: int,
    model: nn.Sequential | None = None,
) -> tuple[nn.Sequential, SplitPlan]:
    """The full model (seeded initial weights from the job seed, or the user's own) and its cuts.

    Seeds the global torch generator, as the data owner's job always has."""
    if model is None:
        torch.manual_seed(derive_seed(cfg.job.seed, "init"))
        model = build_model(
            cfg.model.arch, tuple(input_shape), output_dim(cfg, num_classes), **arch_options(cfg)
        )
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
            tuple(input_shape),
            caps,
            head_blocks=cfg.model.head_blocks,
            metric=cfg.model.balance_by,
            u_shaped=u,
        )
    return model, plan


def public_segments(manifest: JobManifest) -> tuple[list[nn.Sequential], SplitPlan]:
    """Every segment of the public architecture with its initial weights, built by whoever asks
    (leaves the global torch generator as it was)."""
    with torch.random.fork_rng(devices=[]):
        model, plan = model_and_plan(manifest.config, manifest.input_shape, manifest.num_classes)
    return split_model(model, plan), plan


def segment_input_shapes(segments: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Each segment's input shape (without the batch dimension)."""
    return segment_shapes(segments, input_shape)[:-1]


def segment_shapes(segments: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Each segment's input shape, then the last one's output shape (without the batch dimension),
    by a dummy forward pass of zeros through copies of the segments (their weights and buffers are
    left untouched)."""
    shapes, x = [], torch.zeros(2, *input_shape)
    with torch.no_grad():
        for s in segments:
            shapes.append(tuple(x.shape[1:]))
            x = copy.deepcopy(s).eval()(x)
    return [*shapes, tuple(x.shape[1:])]


def trainer_segments(segments: Sequence[nn.Sequential], plan: SplitPlan) -> list[nn.Sequential]:
    return list(segments[1 : len(segments) - int(plan.u_shaped)])


def watermark_spec(cfg: JobConfig) -> WatermarkSpec | None:
    if not cfg.watermark.enabled:
        return None
    return WatermarkSpec(**cfg.watermark.model_dump(exclude={"enabled"}))


def build_trainer(
    manifest: JobManifest,
    keys: PartyKeys,
    transport: Transport,
    *,
    checkpoint_dir: Path | None,
    segment: nn.Sequential | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Trainer:
    """A trainer from the manifest and its own keys. Without `segment`, it builds the public
    architecture and takes its own segment (the initial weights every party agrees on)."""
    cfg, names = manifest.config, manifest.trainer_names
    i = names.index(keys.name)
    if segment is None or input_shape is None:
        segs, plan = public_segments(manifest)
        own = trainer_segments(segs, plan)
        shape = segment_input_shapes(segs, manifest.input_shape)[i + 1]
        segment = own[i] if segment is None else segment
        input_shape = shape if input_shape is None else input_shape
    spec = watermark_spec(cfg)
    prev = names[i - 1] if i else DATA_OWNER
    nxt = names[i + 1] if i + 1 < len(names) else None
    hooks = None
    if spec is not None:
        if keys.identity is None or keys.wm_key is None:
            raise ValueError(f"{keys.name}: a watermarked job needs its signing and watermark keys")
        hooks = StageProvenance(
            identity=keys.identity,
            wm_key=keys.wm_key,
            spec=spec,
            job_id=manifest.job_id,
            position=i + 1,
            prev=prev,
            next=nxt,
            n_positions=len(names),
        )
    return Trainer(
        name=keys.name,
        position=i + 1,
        job_id=manifest.job_id,
        transport=transport,
        segment=segment,
        optimizer=make_optimizer(segment.parameters(), cfg.training),
        prev=prev,
        next=nxt,
        data_owner=DATA_OWNER,
        input_shape=tuple(input_shape),
        num_outputs=output_dim(cfg, manifest.num_classes),
        u_shaped=cfg.privacy.u_shaped,
        hooks=hooks,
        verifier=manifest.verifier if spec is not None else None,
        checkpoint_dir=checkpoint_dir,
        lr_schedule=lr_schedule(cfg.training),
        rounds=cfg.training.epochs if spec is not None else None,
        wire_dtype=WIRE_DTYPES[cfg.training.wire_dtype],
        upstream_grad_first=cfg.upstream_grad_first(concurrent=transport.concurrent),
    )


def build_verifier(
    manifest: JobManifest, keys: PartyKeys, transport: Transport, *, state_dir: Path | None
) -> Verifier:
    """The verifier from the manifest and its own key; it accepts a trainer's registration only
    under the public key the manifest names for that trainer."""
    spec = watermark_spec(manifest.config)
    if spec is None or keys.identity is None:
        raise ValueError("the verifier needs a watermarked job and its own signing key")
    pub = manifest.public_keys()
    return Verifier(
        job_id=manifest.job_id,
        transport=transport,
        trainers=manifest.trainer_names,
        spec=spec,
        identity=keys.identity,
        state_dir=state_dir,
        rounds=manifest.config.training.epochs,
        expected_keys={t: pub[t] for t in manifest.trainer_names},
        name=keys.name,
    )
