"""Typed job configuration, loaded from TOML and validated by pydantic.

Unknown keys are errors (a typo must not silently fall back to a default), and
every error names the offending field. Everything is checked at parse time: strict
booleans and integers, finite numbers, a known dataset and model, cut points and head
size that fit the model, a reachable watermark false-positive bound, a budget that the
target epsilon fits in, and a run root outside the system's folders. `parse_config` and
`load_config` raise only `ConfigError`.
"""

from __future__ import annotations

import functools
import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_validator,
)

MAX_CONFIG_BYTES = 1024 * 1024
# A run folder holds keys and checkpoints: never inside the operating system's own folders.
SYSTEM_DIRS = (
    "/etc",
    "/bin",
    "/sbin",
    "/boot",
    "/dev",
    "/proc",
    "/sys",
    "/usr",
    "/lib",
    "/lib64",
    "/var/lib",
)
TABULAR_DATASETS = frozenset({"breast-cancer", "csv"})
EMBEDDING_ARCHS = frozenset({"small-cnn-dp", "small-cnn-e2e"})  # heads ending in `embed` numbers
Bool = StrictBool


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class JobSection(_Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    seed: StrictInt = Field(0, ge=0, lt=2**63)
    run_root: Path = Path("runs")
    # torch intra-op threads per party process (None: the machine's cores shared among the party
    # processes on it; in-process, torch's default). Not part of the job: a resume may change it.
    threads: StrictInt | None = Field(None, ge=1, le=1024)
    # gRPC frames a party may have in flight on one link (GrpcOptions.ack_window): 1 = each send
    # waits for its acknowledgement; more lets a pipelined relay stream micro-batches over slow
    # links. None: `JobConfig.link_window()`. A deployment setting, like `threads`: a resume may
    # change it.
    ack_window: StrictInt | None = Field(None, ge=1, le=1024)
    # keep freed memory in each party process for reuse instead of returning it to the kernel
    # (glibc's mmap and trim thresholds raised: `clicooper/allocator.py`); off gives memory back
    # between steps at the cost of page faults. A deployment setting: a resume may change it.
    keep_freed_memory: StrictBool = True
    # each trainer sends the gradient for its upstream neighbour as soon as it has it, and only then
    # computes its own weight gradients and steps: the upstream parties' work overlaps its own, at
    # the cost of a second pass over the segment's graph. None: on wherever the parties run
    # concurrently (any transport but the in-process one; every party program), off in one
    # thread, where it would only add work. The weights are the same either way (docs/transport.md).
    # A deployment setting: a resume may change it.
    upstream_grad_first: StrictBool | None = None

    @model_validator(mode="after")
    def _safe_root(self) -> JobSection:
        try:
            root = self.run_root.expanduser().absolute()
        except (RuntimeError, OSError) as e:  # "~nosuchuser/...", or no working directory
            raise ValueError(f"run_root {str(self.run_root)[:80]!r}: {e}") from None
        for d in SYSTEM_DIRS:
            if root == Path(d) or Path(d) in root.parents:
                raise ValueError(f"run_root {str(self.run_root)!r} is inside the system folder {d}")
        return self


class DataSection(_Section):
    dataset: str = "fashion-mnist"
    path: Path | None = None
    train_subset: StrictInt | None = Field(None, gt=0, le=10**9)
    test_subset: StrictInt | None = Field(None, gt=0, le=10**9)
    max_classes: StrictInt = Field(1000, ge=2, le=100_000)
    max_input_elements: StrictInt = Field(3 * 512 * 512, ge=1, le=2**28)
    max_samples: StrictInt = Field(10_000_000, ge=1, le=2**31)

    @model_validator(mode="after")
    def _known(self) -> DataSection:
        from clicooper.data.registry import available_datasets

        names = [d.name for d in available_datasets()]
        if self.dataset.strip().lower().replace("_", "-") not in names:
            raise ValueError(f"unknown dataset {self.dataset!r}; available: {', '.join(names)}")
        return self


@functools.cache
def model_blocks(arch: str) -> int | None:
    """How many blocks a zoo model has (None: not a zoo model). Cheap: the models are small."""
    from clicooper.models.zoo import MODELS, build_model

    if arch not in MODELS:
        return None
    for shape in ((1, 28, 28), (3, 32, 32), (8,)):
        try:
            return len(list(build_model(arch, shape, 10).children()))
        except Exception:  # noqa: BLE001, S112 - try the next kind of input
            continue
    return None


class ModelSection(_Section):
    arch: str = "small-cnn"
    n_trainers: StrictInt = Field(3, ge=1, le=32)
    cut_points: list[StrictInt] | None = Field(None, max_length=64)
    capacities: list[float] | None = Field(None, max_length=64)
    balance_by: Literal["flops", "params"] = "flops"
    head_blocks: StrictInt = Field(1, ge=1, le=1024)
    head_pretrain_epochs: StrictInt = Field(0, ge=0, le=10_000)
    freeze_head: Bool = False
    # Width of the released embedding of the DP models (small-cnn-dp, small-cnn-e2e); None: 16.
    # Fewer numbers carry less release noise (the same noise per number, fewer numbers).
    embed: StrictInt | None = Field(None, ge=2, le=4096)

    @model_validator(mode="after")
    def _consistent(self) -> ModelSection:
        if self.capacities is not None and len(self.capacities) != self.n_trainers:
            raise ValueError(
                f"capacities has {len(self.capacities)} entries but n_trainers is {self.n_trainers}"
            )
        if self.capacities is not None and any(c <= 0 for c in self.capacities):
            raise ValueError("capacities must be positive")
        if self.cut_points is not None:
            cuts = self.cut_points
            if not cuts or cuts[0] < 1 or cuts != sorted(set(cuts)):
                raise ValueError(f"cut_points must be strictly increasing block indices >= 1, got {cuts}")
        return self


# Cosine decay's default end, as a fraction of the base rate: a round at a near-zero rate cannot move
# the weights that carry its fresh watermark bits.
COSINE_FLOOR = 0.1


class TrainingSection(_Section):
    epochs: StrictInt = Field(3, ge=1, le=100_000)
    batch_size: StrictInt = Field(64, ge=1, le=2**20)
    eval_batch_size: StrictInt = Field(1000, ge=1, le=2**20)
    sampling: Literal["shuffle", "poisson"] = "shuffle"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=1e3)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Where cosine decay ends, as a fraction of lr (`schedule.round_lr`). The default keeps every round
    # able to embed its fresh watermark bits; 0 lets a read-out learned from a noised release settle
    # (end-to-end job without watermarks: 0.806 -> 0.821 mean, EXPERIMENTS.md section 21), but with
    # watermarks on the last rounds' marks are then set by completion, which costs accuracy (0.77 there).
    lr_floor: float = Field(COSINE_FLOOR, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    # Pipelined relay: each batch is sent as this many micro-batches before the data owner waits for
    # their gradients (GPipe fill and drain); every party accumulates and steps once per batch, so the
    # result equals the unpipelined one up to float rounding (for models without batch norm).
    micro_batches: StrictInt = Field(1, ge=1, le=1024)
    # Precision of the activations, gradients and outputs on the wire (transport/precision.py):
    # bfloat16 or float16 halve the bytes on every link, for chains whose links set the pace; parties
    # compute in float32 either way. Changes the result slightly (BENCHMARKS.md measures how much).
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class PrivacySection(_Section):
    """Data-owner defences. All off: the plain (undefended) chain."""

    dp: Bool = False
    epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(None, gt=0)
    clip: float = Field(1.0, gt=0)
    release: Literal["per-step", "one-shot"] = "per-step"
    accountant: Literal["pld", "rdp"] = "pld"
    budget_epsilon: float | None = Field(None, gt=0)
    noise_at_inference: Bool = False
    secret_seed: StrictInt | None = None
    gamma: StrictInt = Field(1, ge=1, le=64)
    label_policy: Literal["fixed", "per-epoch"] = "fixed"
    u_shaped: Bool = False
    # Which guarantee the printed epsilon is. "activation": per-sample DP of the release given the
    # head. "end-to-end": the head is trained with DP-SGD on the private data and composed with the
    # release in one accountant; `epsilon` is then the total target, split by head_budget_fraction.
    guarantee: Literal["activation", "end-to-end"] = "activation"
    head_dp_epochs: StrictInt = Field(5, ge=1, le=10_000)
    head_dp_batch_size: StrictInt = Field(1024, ge=1, le=2**24)  # expected Poisson batch: q = batch / n
    head_dp_clip: float = Field(1.0, gt=0, le=1e6)  # per-sample gradient L2 clip
    head_dp_lr: float = Field(2.0, gt=0, le=1e3)  # SGD with momentum, on the clipped gradients' mean
    head_dp_momentum: float = Field(0.9, ge=0, lt=1)
    head_budget_fraction: float = Field(0.8, gt=0, lt=1)  # share of the total (Gaussian-DP mu^2)
    head_dp_probe: Literal["cosine", "linear"] = "cosine"  # the throw-away probe trained with the head
    head_dp_noise_multiplier: float | None = Field(None, gt=0, le=1e6)  # with noise_multiplier, not epsilon
    # label DP: randomized response with a prior (Ghazi et al. 2021) on every label before it leaves
    # the data owner (and, in U-shaped mode, on the labels of its own loss); None = off
    label_epsilon: float | None = Field(None, gt=0)
    # the prior of label DP: "uniform" (K-ary randomized response) or "learned" (two stages: the
    # head's probe, trained on the first half's noisy labels, is the second half's prior)
    label_prior: Literal["uniform", "learned"] = "uniform"

    @model_validator(mode="after")
    def _dp_params(self) -> PrivacySection:
        if self.dp and (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("with dp = true give exactly one of epsilon (to calibrate) or noise_multiplier")
        budget, eps = self.budget_epsilon, self.epsilon
        if self.dp and eps is not None and budget is not None and budget < eps:
            raise ValueError(
                f"budget_epsilon {budget} is below the target epsilon {eps}: the configured run would "
                "exceed its own budget"
            )
        if self.guarantee == "end-to-end":
            if not self.dp:
                raise ValueError('guarantee = "end-to-end" needs dp = true')
            if (self.noise_multiplier is None) != (self.head_dp_noise_multiplier is None):
                raise ValueError(
                    'guarantee = "end-to-end": give epsilon (both noises calibrated), or both '
                    "noise_multiplier and head_dp_noise_multiplier"
                )
        elif self.head_dp_noise_multiplier is not None:
            raise ValueError('head_dp_noise_multiplier is only used with guarantee = "end-to-end"')
        if self.label_prior == "learned" and self.dp:
            raise ValueError(
                'label_prior = "learned" needs dp = false: the learned prior is computed '
                "from each sample's clean input, so its noisy label also tells the trainers what the "
                "data owner's probe predicts for that input, which no activation epsilon covers (label DP "
                "alone treats inputs as known to the trainers; see docs/privacy.md)"
            )
        return self


# [privacy] overrides that switch every defence off (the undefended chain); a new defence adds its field here
NO_DEFENCES: dict = {
    "dp": False,
    "epsilon": None,
    "noise_multiplier": None,
    "gamma": 1,
    "u_shaped": False,
    "label_epsilon": None,
}


class WatermarkSection(_Section):
    enabled: Bool = False
    n_bits: StrictInt = Field(128, ge=16, le=4096)
    strength: float = Field(0.05, ge=0, le=1e6)
    fp_bound: float = Field(1e-6, gt=0, lt=1)

    @model_validator(mode="after")
    def _reachable(self) -> WatermarkSection:
        # Even a perfect extraction (0 bit errors) has chance probability 2^-n_bits.
        if self.n_bits * math.log10(2) < -math.log10(self.fp_bound):
            raise ValueError(
                f"fp_bound {self.fp_bound:g} is unreachable with {self.n_bits} bits (the best possible "
                f"p-value is 2^-{self.n_bits}); raise n_bits or fp_bound"
            )
        return self


class JobConfig(_Section):
    job: JobSection = JobSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    privacy: PrivacySection = PrivacySection()
    watermark: WatermarkSection = WatermarkSection()

    def link_window(self) -> int:
        """gRPC frames a party may have awaiting acknowledgement on one link: `job.ack_window`, or
        by default twice a pipelined step's micro-batches (a trainer then streams a whole step
        without waiting a round trip for each); without pipelining 2 when trainers send their
        upstream gradient first (a trainer's own weight gradients are then computed while the
        gradient travels, not after its acknowledgement is back), else 1."""
        if self.job.ack_window is not None:
            return self.job.ack_window
        m = self.training.micro_batches
        if m > 1:
            return 2 * m
        return 2 if self.upstream_grad_first(concurrent=True) else 1

    def upstream_grad_first(self, *, concurrent: bool) -> bool:
        """Whether trainers send the gradient for their upstream neighbour before computing their own
        weight gradients (`job.upstream_grad_first`; by default when the parties run concurrently)."""
        flag = self.job.upstream_grad_first
        return concurrent if flag is None else flag

    @model_validator(mode="after")
    def _model_fits(self, info: ValidationInfo) -> JobConfig:
        if info.context and info.context.get("programmatic"):
            return self  # `replace` in code re-cuts models itself; files are always checked in full
        m, u = self.model, self.privacy.u_shaped
        need = m.n_trainers + int(u)  # cut points: one per trainer segment, plus the U-shaped tail
        if m.cut_points is not None and len(m.cut_points) != need:
            raise ValueError(
                f"model.cut_points {m.cut_points} give {len(m.cut_points) - int(u)} trainer segment(s) "
                f"but model.n_trainers is {m.n_trainers}"
                + (" (U-shaped: one more cut for the tail)" if u else "")
            )
        n_blocks = model_blocks(m.arch)
        if n_blocks is None:
            from clicooper.models.zoo import MODELS

            raise ValueError(f"model.arch: unknown model {m.arch!r}; available: {', '.join(sorted(MODELS))}")
        if m.cut_points is not None and m.cut_points[-1] > n_blocks - 1:
            raise ValueError(
                f"model.cut_points {m.cut_points} must lie in 1..{n_blocks - 1} "
                f"for {m.arch} ({n_blocks} blocks)"
            )
        if m.cut_points is None and m.head_blocks + m.n_trainers + int(u) > n_blocks:
            raise ValueError(
                f"model.head_blocks = {m.head_blocks} leaves too few of {m.arch}'s {n_blocks} blocks for "
                f"{m.n_trainers} trainer(s)" + (" and the U-shaped tail" if u else "")
            )
        if u and self.training.micro_batches > 1:
            raise ValueError("training.micro_batches > 1 is not supported with privacy.u_shaped = true")
        if m.embed is not None and m.arch not in EMBEDDING_ARCHS:
            raise ValueError(
                f"model.embed sets the release width of {', '.join(sorted(EMBEDDING_ARCHS))}; "
                f"{m.arch!r} has none"
            )
        dataset = self.data.dataset.strip().lower().replace("_", "-")
        if dataset in TABULAR_DATASETS and m.arch != "mlp":
            raise ValueError(f"model.arch = {m.arch!r} is an image model; {dataset} is tabular (use mlp)")
        return self

    @model_validator(mode="after")
    def _end_to_end(self) -> JobConfig:
        """End-to-end DP holds only if nothing un-noised about the training set reaches the trainers."""
        if self.privacy.guarantee != "end-to-end":
            return self
        if self.model.head_pretrain_epochs:
            raise ValueError(
                'guarantee = "end-to-end" trains the head with DP-SGD: model.head_pretrain_epochs must be 0'
            )
        if self.privacy.release == "per-step" and not self.model.freeze_head:
            raise ValueError(
                'guarantee = "end-to-end" with per-step release needs model.freeze_head = true '
                "(un-noised head updates would leak through later releases); or use one-shot release"
            )
        if self.privacy.release == "per-step" and self.training.sampling == "poisson":
            raise ValueError(
                'guarantee = "end-to-end" with per-step release needs training.sampling = "shuffle"'
            )
        return self

    def replace(self, **sections: dict) -> JobConfig:
        """A copy with some fields of some sections replaced, re-validated."""
        data = self.model_dump()
        for section, fields in sections.items():
            data[section] = {**data[section], **fields}
        try:
            return JobConfig.model_validate(data, context={"programmatic": True})
        except ValidationError as e:
            raise ConfigError(_format_error(e, "the adjusted configuration")) from None


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "<config>", *, allow_empty: bool = False) -> JobConfig:
    """Validate a configuration mapping; raises ConfigError (and nothing else) naming the field.

    An empty configuration is refused unless `allow_empty`: an empty or truncated file must not
    silently start the full default job."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: expected a table of sections")
    if not data and not allow_empty:
        raise ConfigError(
            f'{source} is empty; give at least one section (e.g. [job] name = "..."), or use `clicooper demo`'
        )
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
    except (ValueError, TypeError, RecursionError, OverflowError) as e:
        raise ConfigError(f"invalid configuration in {source}: {e}") from None


def load_config(path: str | Path) -> JobConfig:
    """Load and validate a TOML job configuration; raises ConfigError (and nothing else)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a TOML config file")
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; not a job config")
        data = tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8); expected a TOML config") from None
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return parse_config(data, str(path))


class ResumeError(ConfigError):
    """A run cannot be resumed as asked (a pinned field changed, a secret is missing, ...)."""


# What a resumed run may change: nothing that affects the model, the data, the privacy mechanism
# or the protocol. Everything else is pinned to the configuration the run started with.
RESUME_MUTABLE = frozenset(
    {
        "job.name",
        "job.run_root",
        "job.threads",
        "job.ack_window",
        "job.keep_freed_memory",
        "job.upstream_grad_first",
        "training.epochs",
        "training.eval_batch_size",
    }
)
_PINNED_WHY = {
    "job": "the data order and seeds",
    "data": "the data",
    "model": "the model",
    "training": "the training protocol",
    "privacy": "the privacy mechanism",
    "watermark": "the provenance protocol",
}


def _flatten(cfg: JobConfig) -> dict[str, object]:
    return {f"{s}.{k}": v for s, fields in cfg.model_dump(mode="json").items() for k, v in fields.items()}


def resume_changes(started: JobConfig, now: JobConfig) -> list[dict]:
    """The fields a resumed run changes, as {field, from, to}; raises ResumeError (naming the field)
    if any of them is pinned."""
    a, b = _flatten(started), _flatten(now)
    changes = [{"field": k, "from": a[k], "to": b[k]} for k in sorted(a) if a[k] != b[k]]
    for c in changes:
        if c["field"] == "training.epochs" and c["to"] < c["from"]:
            raise ResumeError(
                f"cannot resume with training.epochs lowered ({c['from']} -> {c['to']}): rounds already "
                "planned with the verifier and the accountant may only be added to"
            )
        p = started.privacy
        if c["field"] == "training.epochs" and p.dp and p.release == "per-step" and p.epsilon is not None:
            raise ResumeError(
                f"cannot resume with training.epochs changed ({c['from']} -> {c['to']}): with per-step DP "
                "calibrated to privacy.epsilon, the epoch count sets the noise of every release"
            )
        if c["field"] not in RESUME_MUTABLE:
            why = _PINNED_WHY[c["field"].split(".", 1)[0]]
            raise ResumeError(
                f"cannot resume with {c['field']} changed ({c['from']!r} -> {c['to']!r}): it changes "
                f"{why} of a run already under way; start a new run instead (resumable changes: "
                f"{', '.join(sorted(RESUME_MUTABLE))})"
            )
    return changes
