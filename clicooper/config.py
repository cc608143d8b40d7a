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
    # label DP: randomized response with a prior (Ghazi et al. 2021) on every label before it leaves
    # the data owner (and, in U-shaped mode, on the labels of its own loss); None = off
    label_epsilon: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _dp_params(self) -> PrivacySection:
        if self.dp and (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("with dp = true give exactly one of epsilon (to calibrate) or noise_multiplier")
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
