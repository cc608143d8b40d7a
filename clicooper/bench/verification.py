"""Verification time against training time: `verify job` on a freshly trained watermarked job.

The job is the plain default job with watermarks on (every trainer embeds its mark and signs its
records); training is timed as the run's epochs, verification as `verify_run` on its folder
(signed log, signatures, links, nonces, weight digests, transcripts, watermark extraction).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from clicooper.bench.common import median
from clicooper.config import JobConfig
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob
from clicooper.parties.verifier import verify_run

DEFAULT_JOB_SAMPLE_EPOCHS = 3 * 60_000


@dataclass
class VerificationBench:
    train_s: list[float]
    verify_s: list[float]
    verdicts: list[bool]
    epochs: int
    n_train: int
    name: str = field(default="verification")

    @property
    def ratio(self) -> float:
        return median(self.verify_s) / median(self.train_s)

    def title(self) -> str:
        return f"verification: {self.epochs} epoch(s) of {self.n_train} samples, watermarks on"

    def columns(self) -> list[str]:
        return ["training (s)", "verify job (s)", "verify / train", "verdicts"]

    def rows(self) -> list[list[str]]:
        v = ", ".join("VERIFIED" if ok else "REJECTED" for ok in self.verdicts)
        return [[f"{median(self.train_s):.2f}", f"{median(self.verify_s):.3f}", f"{self.ratio:.4%}", v]]

    @property
    def default_job_ratio(self) -> float:
        """Against the default job's training (3 epochs of 60,000 samples) at the measured rate:
        verification checks the final segments' watermarks once per job and each round's records
        (signatures and digests, milliseconds), so it barely grows with the training it verifies."""
        per_sample_epoch = median(self.train_s) / (self.epochs * self.n_train)
        return median(self.verify_s) / (per_sample_epoch * DEFAULT_JOB_SAMPLE_EPOCHS)

    def notes(self) -> list[str]:
        return [
            f"verification / training of this run: {self.ratio:.3%}; against the default job's 3 epochs "
            f"of 60,000 samples at the same rate: {self.default_job_ratio:.3%} (target < 1%)"
        ]


def bench_verification(cfg: JobConfig, data: DatasetSplits, repeats: int = 1) -> VerificationBench:
    cfg = cfg.replace(watermark={"enabled": True})
    train, verify, verdicts = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="clicooper-bench-") as tmp:
            run_dir = Path(tmp) / "job"
            job = ChainJob(cfg, data, run_dir)
            train.append(sum(job.run().epoch_times_s))
            t0 = time.perf_counter()
            verdict, _ = verify_run(run_dir, issue=False)
            verify.append(time.perf_counter() - t0)
            verdicts.append(verdict.ok)
    return VerificationBench(train, verify, verdicts, cfg.training.epochs, len(data.train_x))
