"""Cost of each protection alone and all together, against the plain chain on the same job.

Each variant is a `[privacy]`/`[watermark]` override of the plain job (`config.NO_DEFENCES` is the
plain one); one training epoch each, built fresh and interleaved. DP uses a fixed noise multiplier
(calibrating an epsilon is set-up, not training) and per-step release, so the head trains and every
step really clips and noises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clicooper.bench.common import interleaved, median
from clicooper.bench.relay import chain_epoch
from clicooper.config import NO_DEFENCES, JobConfig
from clicooper.data import DatasetSplits

DP = {"dp": True, "noise_multiplier": 1.0, "release": "per-step"}
VARIANTS: dict[str, dict[str, dict]] = {
    "plain": {"privacy": NO_DEFENCES, "watermark": {"enabled": False}},
    "activation DP": {"privacy": {**NO_DEFENCES, **DP}},
    "label expansion (gamma 2)": {"privacy": {**NO_DEFENCES, "gamma": 2}},
    "label DP (epsilon 2)": {"privacy": {**NO_DEFENCES, "label_epsilon": 2.0}},
    "watermark + verifier": {"privacy": NO_DEFENCES, "watermark": {"enabled": True}},
    "all together": {
        "privacy": {**NO_DEFENCES, **DP, "gamma": 2, "label_epsilon": 2.0},
        "watermark": {"enabled": True},
    },
}


@dataclass
class ProtectionsBench:
    epoch_s: dict[str, list[float]]
    n_train: int
    batch_size: int
    name: str = field(default="protections")

    def ratio(self, variant: str) -> float:
        return median(self.epoch_s[variant]) / median(self.epoch_s["plain"])

    def title(self) -> str:
        return f"protections: one epoch, {self.n_train} samples, batch {self.batch_size}"

    def columns(self) -> list[str]:
        return ["variant", "epoch times (s)", "median (s)", "/ plain"]

    def rows(self) -> list[list[str]]:
        return [
            [v, ", ".join(f"{x:.2f}" for x in ts), f"{median(ts):.2f}", f"{self.ratio(v):.3f}"]
            for v, ts in self.epoch_s.items()
        ]

    def notes(self) -> list[str]:
        return [f"all together / plain: {self.ratio('all together'):.3f} (target <= 1.20)"]


def variant_config(cfg: JobConfig, variant: str) -> JobConfig:
    over = VARIANTS[variant]
    return cfg.replace(
        privacy={**NO_DEFENCES, **over["privacy"]},
        watermark=over.get("watermark", {"enabled": False}),
        training={"epochs": 1},
    )


def bench_protections(cfg: JobConfig, data: DatasetSplits, repeats: int = 3) -> ProtectionsBench:
    cfgs = {v: variant_config(cfg, v) for v in VARIANTS}
    times = interleaved({v: (lambda c=c: chain_epoch(c, data)) for v, c in cfgs.items()}, repeats)
    return ProtectionsBench(times, len(data.train_x), cfg.training.batch_size)
