"""Privacy accounting for released activations, with Google's `dp-accounting` (PLD by default).

Neighbouring relation: replace-one. Each release of a sample's activation is a Gaussian
mechanism with L2 sensitivity 2C and noise std sigma*C, i.e. noise multiplier sigma/2
relative to the sensitivity. What one accounting event is:
- full passes (shuffled batches partition the data): one event = every sample released once,
  disjoint batches composing in parallel; no amplification is claimed;
- Poisson-sampled batches: one event = one step, each sample included with probability q,
  accounted as a Poisson-subsampled Gaussian (amplification by subsampling);
- one-shot release: a single event for the whole job.
"""

from __future__ import annotations

import math
from typing import Literal

import dp_accounting as dpa
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

AccountantKind = Literal["pld", "rdp"]


class BudgetExceeded(RuntimeError):
    """The next release would take the spent epsilon past the configured budget."""


def _event(noise_multiplier: float, sensitivity_factor: float, sampling_rate: float | None, count: int):
    base = dpa.GaussianDpEvent(noise_multiplier / sensitivity_factor)
    if sampling_rate is not None:
        base = dpa.PoissonSampledDpEvent(sampling_rate, base)
    return dpa.SelfComposedDpEvent(base, count)


def compute_epsilon(
    noise_multiplier: float,
    delta: float,
    releases: int,
    *,
    accountant: AccountantKind = "pld",
    sampling_rate: float | None = None,
    sensitivity_factor: float = 2.0,
) -> float:
    """Epsilon after `releases` events, from dp-accounting (replace-one relation)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant == "pld":
        acc = PLDAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    else:
        if sampling_rate is not None:
            raise ValueError(
                "the RDP accountant does not support Poisson sampling under replace-one; use pld"
            )
        acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(_event(noise_multiplier, sensitivity_factor, sampling_rate, releases))
    return float(acc.get_epsilon(delta))


class ActivationAccountant:
    """Counts releases and reports epsilon; JSON state_dict like Opacus' accountants."""

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        *,
        accountant: AccountantKind = "pld",
        sampling_rate: float | None = None,
        sensitivity_factor: float = 2.0,
    ) -> None:
        self.noise_multiplier, self.delta, self.kind = float(noise_multiplier), float(delta), accountant
        self.sampling_rate, self.sensitivity_factor = sampling_rate, sensitivity_factor
        self.releases = 0
        self._cache: dict[tuple[int, float], float] = {}

    def record_release(self, count: int = 1) -> None:
        if count < 0:
            raise ValueError("release count must be >= 0")
        self.releases += count

    def _eps(self, releases: int, delta: float) -> float:
        key = (releases, delta)
        if key not in self._cache:
            self._cache[key] = compute_epsilon(
                self.noise_multiplier,
                delta,
                releases,
                accountant=self.kind,
                sampling_rate=self.sampling_rate,
                sensitivity_factor=self.sensitivity_factor,
            )
        return self._cache[key]

    def epsilon(self, delta: float | None = None) -> float:
        return self._eps(self.releases, self.delta if delta is None else delta)

    def epsilon_after(self, extra_releases: int) -> float:
        return self._eps(self.releases + extra_releases, self.delta)

    def _params(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "accountant": self.kind,
            "sampling_rate": self.sampling_rate,
            "sensitivity_factor": self.sensitivity_factor,
        }

    def state_dict(self) -> dict:
        return {**self._params(), "releases": self.releases}

    def load_state_dict(self, state: dict) -> None:
        mine = self._params()
        theirs = {k: state[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"accountant state is for a different mechanism: {theirs} != {mine}")
        self.releases = int(state["releases"])


def check_budget(acc: ActivationAccountant, budget_epsilon: float | None, extra_releases: int = 1) -> None:
    """Raise before a release that would exceed the budget."""
    if budget_epsilon is None:
        return
    after = acc.epsilon_after(extra_releases)
    if after > budget_epsilon:
        raise BudgetExceeded(
            f"privacy budget: the next release would bring epsilon from {acc.epsilon():.3f} to {after:.3f} "
            f"(delta={acc.delta:g}), over the budget of {budget_epsilon:g}; stopped before releasing"
        )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    releases: int,
    *,
    accountant: AccountantKind = "pld",
    sampling_rate: float | None = None,
    sensitivity_factor: float = 2.0,
    tol: float = 1e-3,
) -> float:
    """The smallest sigma (to `tol`) whose epsilon after `releases` events is <= target."""
    if math.isinf(target_epsilon):
        return 0.0

    def eps(s: float) -> float:
        return compute_epsilon(
            s,
            delta,
            releases,
            accountant=accountant,
            sampling_rate=sampling_rate,
            sensitivity_factor=sensitivity_factor,
        )

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"cannot reach epsilon={target_epsilon} with delta={delta}")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
