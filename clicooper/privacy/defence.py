"""The data owner's defences in force during a job: activation DP and secret label expansion.

Implements the `DataOwnerDefence` protocol of parties/data_owner.py. Mechanisms and
accounting live in activation_dp.py / accounting.py / labels.py; this class only
decides what is applied when, and keeps the privacy ledger.

The ledger: before any activation of a round leaves the data owner, the release is
recorded and the accountant's state is written to `privacy_ledger.json` (atomically).
A resumed run takes the larger of the checkpointed and the ledgered release counts, so
a crash mid-round can never make the reported epsilon smaller than what was released.

The ledger is keyed by the mechanism's parameters: noise multiplier, clip norm, delta,
accountant, sampling rate, release mode, and a digest of the training samples released.
A job whose mechanism differs from the one the ledger counted (a resume with another clip,
seed or training subset, say) is refused before it releases anything, so no release can
happen that the ledger does not count.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import dp_accounting as dpa
import torch

from clicooper.checkpoint import atomic_write_json
from clicooper.config import PrivacySection, ResumeError
from clicooper.privacy.accounting import (
    ActivationAccountant,
    BudgetExceeded,
    calibrate_end_to_end,
    calibrate_noise_multiplier,
    check_budget,
    event_epsilon,
    head_dp_sgd_event,
    release_event,
)
from clicooper.privacy.activation_dp import clip_and_noise, clip_per_sample
from clicooper.privacy.dp_sgd import DpSgdPlan
from clicooper.privacy.label_accounting import LabelAccountant
from clicooper.privacy.label_dp import LabelRandomizer, new_label_key
from clicooper.privacy.labels import LabelCodebook
from clicooper.privacy.secure_noise import NormalReserve

LEDGER = "privacy_ledger.json"

# What the printed epsilon covers (config value -> the name every summary and report prints).
GUARANTEES = {"activation": "activation-level (given the head)", "end-to-end": "end-to-end"}


def guarantee_name(cfg: PrivacySection) -> str | None:
    """The guarantee a job with this [privacy] section prints; None without activation DP."""
    return GUARANTEES[cfg.guarantee] if cfg.dp else None


@functools.lru_cache(maxsize=256)
def end_to_end_epsilon(
    sgd_sigma: float, sampling_rate: float, steps: int, release_sigma: float, releases: int, delta: float
) -> float:
    """Composed epsilon of `steps` DP-SGD steps and `releases` releases (PLD, replace-one); cached."""
    events = []
    if steps:
        events.append(head_dp_sgd_event(sgd_sigma, sampling_rate, steps))
    if releases:
        events.append(release_event(release_sigma, releases))
    if not events:
        return 0.0
    return event_epsilon(events[0] if len(events) == 1 else dpa.ComposedDpEvent(events), delta)


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
        data_digest: str | None = None,
        label_key: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        self.one_shot = cfg.dp and cfg.release == "one-shot"
        self.delta = cfg.delta
        self.steps_per_epoch = max(n_train // batch_size, 1) if poisson else 1
        self.sampling_rate = batch_size / n_train if (poisson and not self.one_shot) else None
        self.ledger_dir = ledger_dir
        self.accountant: ActivationAccountant | None = None
        self.head_plan: DpSgdPlan | None = None  # end-to-end: the head's DP-SGD run
        self.head_steps = 0  # DP-SGD steps taken so far (accounted)
        self._noise = NormalReserve()  # per-step release noise, drawn one step ahead
        if cfg.dp:
            total = releases_per_run(cfg, epochs, self.steps_per_epoch, poisson and not self.one_shot)
            sigma = cfg.noise_multiplier
            if cfg.guarantee == "end-to-end":
                if self.sampling_rate is not None:
                    raise ValueError("end-to-end accounting needs one-shot or shuffled per-step release")
                plan = DpSgdPlan.for_epochs(
                    n_train, min(cfg.head_dp_batch_size, n_train), cfg.head_dp_epochs, 0.0, cfg.head_dp_clip
                )
                sgd_sigma = cfg.head_dp_noise_multiplier
                if sigma is None:
                    sgd_sigma, sigma = calibrate_end_to_end(
                        cfg.epsilon,
                        cfg.delta,
                        sampling_rate=plan.sampling_rate,
                        steps=plan.steps,
                        head_fraction=cfg.head_budget_fraction,
                        releases=total,
                    )
                self.head_plan = DpSgdPlan(sgd_sigma, plan.clip, plan.sampling_rate, plan.steps)
            elif sigma is None:
                sigma = calibrate_noise_multiplier(
                    cfg.epsilon, cfg.delta, total, accountant=cfg.accountant, sampling_rate=self.sampling_rate
                )
            self.accountant = ActivationAccountant(
                sigma, cfg.delta, accountant=cfg.accountant, sampling_rate=self.sampling_rate
            )
        self.codebook = LabelCodebook.from_secret(secret, num_classes, cfg.gamma) if cfg.gamma > 1 else None
        self.mechanism = (
            {
                **{k: v for k, v in self.accountant.state_dict().items() if k != "releases"},
                "clip": cfg.clip,
                "release": cfg.release,
                "n_train": n_train,
                "data_sha256": data_digest,
            }
            if self.accountant is not None
            else None
        )
        self._check_ledger_mechanism()
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
    def guarantee(self) -> str | None:
        """What the printed epsilon covers: "activation-level (given the head)" or "end-to-end"."""
        return guarantee_name(self.cfg)

    def record_head_steps(self, steps: int) -> None:
        """Account `steps` DP-SGD steps of the head (end-to-end only); call as they are taken."""
        if self.head_plan is None:
            raise ValueError("no DP-SGD head in this job (guarantee is not end-to-end)")
        if steps < 0 or self.head_steps + steps > self.head_plan.steps:
            raise ValueError(
                f"DP-SGD steps {self.head_steps}+{steps} outside the plan's {self.head_plan.steps}"
            )
        self.head_steps += int(steps)
        self._write_ledger()

    def _e2e_epsilon(self, releases: int) -> float:
        p = self.head_plan
        assert p is not None and self.accountant is not None
        return end_to_end_epsilon(
            p.noise_multiplier,
            p.sampling_rate,
            self.head_steps,
            self.accountant.noise_multiplier,
            releases,
            self.delta,
        )

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
            if self.head_plan is not None:
                p = self.head_plan
                out.append(
                    f"DP-SGD head (sigma={p.noise_multiplier:.3f}, q={p.sampling_rate:.4f}, "
                    f"steps={p.steps}, C_g={p.clip})"
                )
            out.append(f"guarantee: {self.guarantee}")
        if self.codebook is not None:
            out.append(f"secret label expansion (gamma={self.cfg.gamma}, {self.cfg.label_policy})")
        if self.label_dp is not None:
            out.append(f"label DP (randomized response with prior, epsilon={self.label_dp.epsilon:g})")
        if self.cfg.u_shaped:
            out.append("U-shaped (labels stay with the data owner)")
        return out

    # -- DataOwnerDefence -------------------------------------------------
    def check_round(self, rnd: int) -> None:
        """Stop (BudgetExceeded) if this round's per-step releases would exceed the budget; counts
        nothing, so a round that then fails to open (the verifier unreachable) costs nothing."""
        if self.accountant is not None and not self.one_shot:
            self._check(self.steps_per_epoch)

    def begin_round(self, rnd: int) -> None:
        """Account for this round's per-step releases before any of them happens (stop if over budget).

        One-shot releases are counted by `record_one_shot_release`, each time one is drawn."""
        if self.accountant is None or self.one_shot:
            return
        self._record(self.steps_per_epoch)

    def record_one_shot_release(self) -> None:
        """Count a one-shot release before its noise is drawn. A resumed job that lost its saved
        release draws (and pays for) a new one: every draw of fresh noise is counted."""
        if self.accountant is not None:
            self._record(1)

    def _record(self, events: int) -> None:
        """Check the budget for `events` more releases under this job's guarantee, then count them."""
        self._check(events)
        self.accountant.record_release(events)
        self._write_ledger()

    def _check(self, events: int) -> None:
        """Raise BudgetExceeded if `events` more releases would exceed the budget; counts nothing."""
        if self.head_plan is not None:
            after = self._e2e_epsilon(self.accountant.releases + events)
            budget = self.cfg.budget_epsilon
            if budget is not None and after > budget:
                raise BudgetExceeded(
                    f"privacy budget: the next release would bring the end-to-end epsilon to {after:.4f} "
                    f"at delta={self.delta:g}, over the budget of {budget:g}; stopped before releasing"
                )
        else:
            check_budget(self.accountant, self.cfg.budget_epsilon, events)

    def release(self, a: torch.Tensor, gen: torch.Generator | None = None, *, train: bool) -> torch.Tensor:
        """Clip and noise `a`. The noise comes from the OS CSPRNG; `gen` is only for attack
        simulations that stand in for the data owner and need no secrecy."""
        if self.accountant is None:
            return a
        if train or self.cfg.noise_at_inference:
            reserve = self._noise if train and not self.one_shot else None  # the same size every step
            return clip_and_noise(a, self.cfg.clip, self.accountant.noise_multiplier, gen, reserve)
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
        """Spent epsilon under `self.guarantee`: the release alone, or DP-SGD head + releases composed."""
        if self.accountant is None:
            return None
        if self.head_plan is not None:
            return self._e2e_epsilon(self.accountant.releases)
        return self.accountant.epsilon()

    def label_epsilon(self) -> float | None:
        """Label DP spent (pure DP, paid once per sample), None without label DP."""
        return self.label_accountant.epsilon if self.label_accountant is not None else None

    # -- state (the codebook secret is stored separately, never here) ------
    def _head_state(self) -> dict | None:
        if self.head_plan is None:
            return None
        p = self.head_plan
        return {
            "noise_multiplier": p.noise_multiplier,
            "sampling_rate": p.sampling_rate,
            "clip": p.clip,
            "planned_steps": p.steps,
            "steps": self.head_steps,
        }

    def state_dict(self) -> dict:
        state: dict = {"accountant": self.accountant.state_dict() if self.accountant else None}
        if self.head_plan is not None:
            state["head_dp_sgd"] = self._head_state()
        if self.label_accountant is not None:
            state["label_dp"] = {**self.label_accountant.state_dict(), "key": self.label_dp.fingerprint()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.label_accountant is not None and state.get("label_dp") is not None:
            saved = dict(state["label_dp"])
            if saved.pop("key") != self.label_dp.fingerprint():
                raise ValueError("label DP key differs from the checkpoint's: the labels would be redrawn")
            self.label_accountant.check_state(saved)
        if self.accountant is None:
            return
        self.accountant.load_state_dict(state["accountant"])
        if self.head_plan is not None:
            head = state.get("head_dp_sgd")
            mine = self._head_state()
            assert mine is not None
            if head is None or {k: head.get(k) for k in mine if k != "steps"} != {
                k: v for k, v in mine.items() if k != "steps"
            }:
                raise ValueError(f"checkpoint's DP-SGD head state {head} is for a different mechanism")
            self.head_steps = max(self.head_steps, int(head["steps"]))
        ledger = self._read_ledger()
        if ledger is not None and ledger["releases"] > self.accountant.releases:
            self.accountant.load_state_dict(ledger)  # releases made after the checkpoint still count

    def _write_ledger(self) -> None:
        if self.ledger_dir is not None and self.accountant is not None:
            doc = {**self.accountant.state_dict(), "mechanism": self.mechanism}
            if self.head_plan is not None:
                doc["head_dp_sgd"] = self._head_state()
            atomic_write_json(self.ledger_dir / LEDGER, doc)

    def _read_ledger(self) -> dict | None:
        path = self.ledger_dir / LEDGER if self.ledger_dir is not None else None
        if path is None or not path.exists():
            return None
        try:
            ledger = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise ResumeError(
                f"{path} (the privacy ledger) is unreadable: {e}; refusing to release"
            ) from None
        if not isinstance(ledger, dict) or not isinstance(ledger.get("releases"), int):
            raise ResumeError(f"{path} (the privacy ledger) is malformed; refusing to release")
        return ledger

    def _check_ledger_mechanism(self) -> None:
        """Refuse a mechanism other than the one whose releases the ledger already counts."""
        ledger = self._read_ledger()
        if ledger is None or ledger["releases"] == 0:
            return
        if self.mechanism is None:
            raise ResumeError(
                f"the privacy ledger counts {ledger['releases']} DP release(s) but this job has DP off; "
                "refusing to release activations without noise"
            )
        theirs = ledger.get("mechanism") or {}
        diff = [k for k in self.mechanism if theirs.get(k) != self.mechanism[k]]
        if diff:
            detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {self.mechanism[k]!r}" for k in diff)
            raise ResumeError(
                f"the privacy ledger counts {ledger['releases']} release(s) under another mechanism "
                f"({detail}); a release under this one would not be counted. Start a new run."
            )
