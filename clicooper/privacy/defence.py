"""The data owner's defences in force during a job: activation DP and secret label expansion.

Implements the `DataOwnerDefence` protocol of parties/data_owner.py. Mechanisms and
accounting live in activation_dp.py / accounting.py / labels.py; this class only
decides what is applied when, and keeps the privacy ledger.

The ledger: before any activation of a round leaves the data owner, the release is
recorded and the accountant's state is written to `privacy_ledger.json` (atomically).
A resumed run takes the larger of the checkpointed and the ledgered release counts, so
a crash mid-round can never make the reported epsilon smaller than what was released.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clicooper.checkpoint import atomic_write_json
from clicooper.config import PrivacySection
from clicooper.privacy.accounting import ActivationAccountant, calibrate_noise_multiplier, check_budget
from clicooper.privacy.activation_dp import clip_and_noise, clip_per_sample
from clicooper.privacy.label_accounting import LabelAccountant
from clicooper.privacy.label_dp import LabelRandomizer, new_label_key
from clicooper.privacy.labels import LabelCodebook

LEDGER = "privacy_ledger.json"


def releases_per_run(cfg: PrivacySection, epochs: int, steps_per_epoch: int, poisson: bool) -> int:
    """How many accounting events a full run makes: 1 (one-shot), `epochs` full passes, or Poisson steps."""
    if cfg.release == "one-shot":
        return 1
    return epochs * steps_per_epoch if poisson else epochs


class DataOwnerDefences:
    def __init__(
        self,
        cfg: PrivacySection,
        *,
        num_classes: int,
        epochs: int,
        n_train: int,
        batch_size: int,
        poisson: bool,
        secret: bytes,
        ledger_dir: Path | None = None,
        label_key: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        self.one_shot = cfg.dp and cfg.release == "one-shot"
        self.delta = cfg.delta
        self.steps_per_epoch = max(n_train // batch_size, 1) if poisson else 1
        self.sampling_rate = batch_size / n_train if (poisson and not self.one_shot) else None
        self.ledger_dir = ledger_dir
        self.accountant: ActivationAccountant | None = None
        if cfg.dp:
            total = releases_per_run(cfg, epochs, self.steps_per_epoch, poisson and not self.one_shot)
            sigma = cfg.noise_multiplier
            if sigma is None:
                sigma = calibrate_noise_multiplier(
                    cfg.epsilon, cfg.delta, total, accountant=cfg.accountant, sampling_rate=self.sampling_rate
                )
            self.accountant = ActivationAccountant(
                sigma, cfg.delta, accountant=cfg.accountant, sampling_rate=self.sampling_rate
            )
        self.codebook = LabelCodebook.from_secret(secret, num_classes, cfg.gamma) if cfg.gamma > 1 else None
        # label DP: OS-random key (never the job seed or the codebook secret); one release per sample
        self.label_dp: LabelRandomizer | None = None
        self.label_accountant: LabelAccountant | None = None
        if cfg.label_epsilon is not None:
            key = label_key if label_key is not None else new_label_key()
            self.label_dp = LabelRandomizer(key, num_classes, cfg.label_epsilon)
            self.label_accountant = LabelAccountant(cfg.label_epsilon)

    @property
    def noise_multiplier(self) -> float | None:
        return self.accountant.noise_multiplier if self.accountant else None

    @property
    def names(self) -> list[str]:
        out = []
        if self.accountant is not None:
            mode = (
                "one-shot" if self.one_shot else ("per-step, Poisson" if self.sampling_rate else "per-step")
            )
            out.append(
                f"activation DP ({mode}, sigma={self.accountant.noise_multiplier:.3f}, C={self.cfg.clip})"
            )
        if self.codebook is not None:
            out.append(f"secret label expansion (gamma={self.cfg.gamma}, {self.cfg.label_policy})")
        if self.label_dp is not None:
            out.append(f"label DP (randomized response with prior, epsilon={self.label_dp.epsilon:g})")
        if self.cfg.u_shaped:
            out.append("U-shaped (labels stay with the data owner)")
        return out

    # -- DataOwnerDefence -------------------------------------------------
    def begin_round(self, rnd: int) -> None:
        """Account for this round's releases before any of them happens (stop if over budget)."""
        if self.accountant is None or (self.one_shot and self.accountant.releases >= 1):
            return
        events = 1 if self.one_shot else self.steps_per_epoch
        check_budget(self.accountant, self.cfg.budget_epsilon, events)
        self.accountant.record_release(events)
        self._write_ledger()

    def release(self, a: torch.Tensor, gen: torch.Generator, *, train: bool) -> torch.Tensor:
        if self.accountant is None:
            return a
        if train or self.cfg.noise_at_inference:
            return clip_and_noise(a, self.cfg.clip, self.accountant.noise_multiplier, gen)
        return clip_per_sample(a, self.cfg.clip)  # the model always sees clipped activations

    def privatize_labels(self, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The labels as the label-DP release has them (the true ones without label DP)."""
        return self.label_dp.privatize(y, ids) if self.label_dp is not None else y

    def encode_labels(self, y: torch.Tensor, ids: torch.Tensor, rnd: int) -> torch.Tensor:
        y = self.privatize_labels(y, ids)
        if self.codebook is None:
            return y
        return self.codebook.encode(y, ids, policy=self.cfg.label_policy, epoch=rnd)

    def decode_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.codebook.decode_logits(logits) if self.codebook is not None else logits

    def epsilon(self) -> float | None:
        return self.accountant.epsilon() if self.accountant is not None else None

    def label_epsilon(self) -> float | None:
        """Label DP spent (pure DP, paid once per sample), None without label DP."""
        return self.label_accountant.epsilon if self.label_accountant is not None else None

    # -- state (the codebook secret is stored separately, never here) ------
    def state_dict(self) -> dict:
        out: dict = {"accountant": self.accountant.state_dict() if self.accountant else None}
        if self.label_accountant is not None:
            out["label_dp"] = {**self.label_accountant.state_dict(), "key": self.label_dp.fingerprint()}
        return out

    def load_state_dict(self, state: dict) -> None:
        if self.label_accountant is not None and state.get("label_dp") is not None:
            saved = dict(state["label_dp"])
            if saved.pop("key") != self.label_dp.fingerprint():
                raise ValueError("label DP key differs from the checkpoint's: the labels would be redrawn")
            self.label_accountant.check_state(saved)
        if self.accountant is None:
            return
        self.accountant.load_state_dict(state["accountant"])
        ledger = self._read_ledger()
        if ledger is not None and ledger["releases"] > self.accountant.releases:
            self.accountant.load_state_dict(ledger)  # releases made after the checkpoint still count

    def _write_ledger(self) -> None:
        if self.ledger_dir is not None and self.accountant is not None:
            atomic_write_json(self.ledger_dir / LEDGER, self.accountant.state_dict())

    def _read_ledger(self) -> dict | None:
        if self.ledger_dir is None or not (self.ledger_dir / LEDGER).exists():
            return None
        return json.loads((self.ledger_dir / LEDGER).read_text())
