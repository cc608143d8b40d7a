"""Typed job configuration, loaded from TOML and validated by pydantic.

Unknown keys are errors (a typo must not silently fall back to a default), and
every error names the offending field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobSection(_Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    seed: int = Field(0, ge=0)
    run_root: Path = Path("runs")


class DataSection(_Section):
    dataset: str = "fashion-mnist"
    path: Path | None = None
    train_subset: int | None = Field(None, gt=0)
    test_subset: int | None = Field(None, gt=0)


class ModelSection(_Section):
    arch: str = "small-cnn"
    n_trainers: int = Field(3, ge=1, le=32)
    cut_points: list[int] | None = None
    capacities: list[float] | None = None
    balance_by: Literal["flops", "params"] = "flops"
    head_blocks: int = Field(1, ge=1)
    head_pretrain_epochs: int = Field(0, ge=0)
    freeze_head: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ModelSection:
        if self.capacities is not None and len(self.capacities) != self.n_trainers:
            raise ValueError(
                f"capacities has {len(self.capacities)} entries but n_trainers is {self.n_trainers}"
            )
        if self.capacities is not None and any(c <= 0 for c in self.capacities):
            raise ValueError("capacities must be positive")
        return self


class TrainingSection(_Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    sampling: Literal["shuffle", "poisson"] = "shuffle"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class PrivacySection(_Section):
    """Data-owner defences. All off: the plain (undefended) chain."""

    dp: bool = False
    epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(None, ge=0)
    clip: float = Field(1.0, gt=0)
    release: Literal["per-step", "one-shot"] = "per-step"
    accountant: Literal["pld", "rdp"] = "pld"
    budget_epsilon: float | None = Field(None, gt=0)
    noise_at_inference: bool = False
    secret_seed: int | None = None
    gamma: int = Field(1, ge=1, le=64)
    label_policy: Literal["fixed", "per-epoch"] = "fixed"
    u_shaped: bool = False
    # Which guarantee the printed epsilon is. "activation": per-sample DP of the release given the
    # head. "end-to-end": the head is trained with DP-SGD on the private data and composed with the
    # release in one accountant; `epsilon` is then the total target, split by head_budget_fraction.
    guarantee: Literal["activation", "end-to-end"] = "activation"
    head_dp_epochs: int = Field(5, ge=1)
    head_dp_batch_size: int = Field(1024, ge=1)  # expected Poisson batch size: q = batch / n_train
    head_dp_clip: float = Field(1.0, gt=0)  # per-sample gradient L2 clip
    head_dp_lr: float = Field(2.0, gt=0)  # SGD with momentum, on the clipped gradients' mean
    head_dp_momentum: float = Field(0.9, ge=0, lt=1)
    head_budget_fraction: float = Field(0.8, gt=0, lt=1)  # share of the total (Gaussian-DP mu^2)
    head_dp_probe: Literal["cosine", "linear"] = "cosine"  # the throw-away probe trained with the head
    head_dp_noise_multiplier: float | None = Field(None, gt=0)  # with noise_multiplier, not epsilon

    @model_validator(mode="after")
    def _dp_params(self) -> PrivacySection:
        if self.dp and (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("with dp = true give exactly one of epsilon (to calibrate) or noise_multiplier")
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
        return self


class WatermarkSection(_Section):
    enabled: bool = False
    n_bits: int = Field(128, ge=16, le=4096)
    strength: float = Field(0.05, ge=0)
    fp_bound: float = Field(1e-6, gt=0, lt=1)


class JobConfig(_Section):
    job: JobSection = JobSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    privacy: PrivacySection = PrivacySection()
    watermark: WatermarkSection = WatermarkSection()

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
        return JobConfig.model_validate(data)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<config>") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_config(path: str | Path) -> JobConfig:
    """Load and validate a TOML job configuration."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return parse_config(data, str(path))
