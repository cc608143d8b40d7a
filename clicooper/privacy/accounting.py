"""Privacy accounting for released activations, with Google's `dp-accounting` (PLD by default).

The mechanism (see activation_dp.py and docs/privacy.md): each released activation is clipped to
L2 norm C, then gets N(0, (sigma*C)^2 I) noise. Neighbouring relation: replace-one, so one
sample's release moves by at most `sensitivity_factor * C` = 2C, and one release is a Gaussian
mechanism with noise multiplier `sigma / sensitivity_factor` relative to that distance.

dp-accounting convention (checked against dp-accounting 0.6): a `GaussianDpEvent(z)` under the
ADD_OR_REMOVE_ONE relation is exactly the pair N(0, z^2) vs N(1, z^2), in both the PLD and the
RDP accountant. Its REPLACE_ONE relation instead reads the sensitivity as a per-record norm bound
and doubles it internally in the PLD accountant, but not in the RDP one. We therefore pass the
distance-normalised multiplier `sigma / sensitivity_factor` ourselves and compose under
ADD_OR_REMOVE_ONE, so the factor 2 of replace-one is applied exactly once by either accountant.

What one accounting event (`record_release(1)`) is:
- full pass (batches are a shuffled partition): every training sample is released once. Disjoint
  batches compose in parallel, so an epoch costs each sample one Gaussian mechanism. The order is
  not secret from the analysis' point of view, so no amplification is claimed.
- one-shot release: a single event for the whole job (the activations are released once).
- Poisson-sampled batches (`sampling_rate=q`): one event = one step, in which each sample is
  released with probability q. The released activations are per-sample rows, not a noisy sum, so
  a worst-case adversary can single out the target's row when present: amplification by
  subsampling (dp-accounting's `PoissonSampledDpEvent`, which models a noisy *sum*) does not
  apply. The sound bound is the observed-inclusion mixture: after T steps the target has been
  released K ~ Binomial(T, q) times, and delta(eps) = sum_k P(K=k) * delta_Gauss_k(eps), each
  k-fold Gaussian term evaluated by dp-accounting (`GaussianPrivacyLoss`). It is never smaller
  than the sum-model value and, at equal expected releases, slightly above the full-pass value.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import dp_accounting as dpa
import numpy as np
import scipy.optimize
import scipy.stats
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from dp_accounting.rdp import RdpAccountant

AccountantKind = Literal["pld", "rdp"]

# The relation under which a GaussianDpEvent(z) means exactly N(0, z^2) vs N(1, z^2) (see module doc).
_UNIT_DISTANCE_RELATION = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
# Poisson mode truncates the Binomial count at a tail mass of this fraction of delta, added to delta.
_TAIL_FRACTION = 1e-3


class BudgetExceeded(RuntimeError):
    """The next release would take the spent epsilon past the configured budget."""


def _validate(
    noise_multiplier: float,
    delta: float,
    accountant: str,
    sampling_rate: float | None,
    sensitivity_factor: float,
) -> None:
    if not noise_multiplier >= 0 or math.isnan(noise_multiplier):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if accountant not in ("pld", "rdp"):
        raise ValueError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")
    if not sensitivity_factor > 0 or math.isinf(sensitivity_factor):
        raise ValueError(f"sensitivity_factor must be positive and finite, got {sensitivity_factor}")
    if sampling_rate is not None:
        if not 0 <= sampling_rate <= 1:
            raise ValueError(f"sampling_rate must lie in [0, 1], got {sampling_rate}")
        if accountant != "pld":
            raise ValueError(
                "Poisson-sampled per-sample releases are accounted with the 'pld' accountant only"
            )


def _full_pass_epsilon(z: float, releases: int, delta: float, accountant: AccountantKind) -> float:
    """`releases` compositions of the unit-distance Gaussian with multiplier z, by dp-accounting."""
    acc = (
        PLDAccountant(neighboring_relation=_UNIT_DISTANCE_RELATION)
        if accountant == "pld"
        else RdpAccountant(neighboring_relation=_UNIT_DISTANCE_RELATION)
    )
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), releases))
    return float(acc.get_epsilon(delta))


def _poisson_rows_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """Epsilon after `steps` Poisson steps of per-sample (row) releases: see the module docstring."""
    if q == 0:
        return 0.0
    count = scipy.stats.binom(steps, q)
    tail = _TAIL_FRACTION * delta
    kmax = int(min(steps, count.isf(tail)))  # P(K > kmax) <= tail
    ks = np.arange(1, kmax + 1)
    weights = count.pmf(ks)
    rest = float(count.sf(kmax))  # counted as delta = 1 (pessimistic)
    losses = [GaussianPrivacyLoss(standard_deviation=z / math.sqrt(k), sensitivity=1.0) for k in ks]

    def excess(eps: float) -> float:
        mixed = sum(
            w * float(loss.get_delta_for_epsilon(eps)) for w, loss in zip(weights, losses, strict=True)
        )
        return mixed + rest - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
        if hi > 1e6:
            return math.inf
    eps = scipy.optimize.brentq(excess, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-9)
    return float(eps) + 1e-9  # the upper end of the root bracket: delta(eps) <= delta holds


@functools.lru_cache(maxsize=4096)
def compute_epsilon(
    noise_multiplier: float,
    delta: float,
    releases: int,
    *,
    accountant: AccountantKind = "pld",
    sampling_rate: float | None = None,
    sensitivity_factor: float = 2.0,
) -> float:
    """Epsilon (at `delta`) after `releases` events of the mechanism; 0 before any, inf without noise.

    `noise_multiplier` is sigma (noise std relative to the clip norm C); the event's multiplier
    relative to the replace-one distance is `sigma / sensitivity_factor`. Cached: pure function.
    """
    _validate(noise_multiplier, delta, accountant, sampling_rate, sensitivity_factor)
    if releases < 0:
        raise ValueError(f"releases must be >= 0, got {releases}")
    if releases == 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    z = noise_multiplier / sensitivity_factor
    if sampling_rate is None:
        return _full_pass_epsilon(z, releases, delta, accountant)
    return _poisson_rows_epsilon(z, sampling_rate, releases, delta)


class ActivationAccountant:
    """Counts releases of the training set's activations and reports the spent epsilon.

    The state is a handful of JSON scalars, so it is checkpointed with the data owner and
    restored on resume; the mechanism parameters are checked on restore so a resumed run can
    never silently account a different mechanism.
    """

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        *,
        accountant: AccountantKind = "pld",
        sampling_rate: float | None = None,
        sensitivity_factor: float = 2.0,
    ) -> None:
        _validate(noise_multiplier, delta, accountant, sampling_rate, sensitivity_factor)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.kind: AccountantKind = accountant
        self.sampling_rate = None if sampling_rate is None else float(sampling_rate)
        self.sensitivity_factor = float(sensitivity_factor)
        self._releases = 0

    @property
    def releases(self) -> int:
        """Events recorded so far: full passes, or Poisson steps when `sampling_rate` is set."""
        return self._releases

    def record_release(self, count: int = 1) -> None:
        """Record `count` events; call it before the activations leave the data owner."""
        if count < 0:
            raise ValueError(f"release count must be >= 0, got {count}")
        self._releases += int(count)

    def _eps(self, releases: int, delta: float) -> float:
        return compute_epsilon(
            self.noise_multiplier,
            delta,
            releases,
            accountant=self.kind,
            sampling_rate=self.sampling_rate,
            sensitivity_factor=self.sensitivity_factor,
        )

    def epsilon(self, delta: float | None = None) -> float:
        """Spent epsilon for the releases recorded so far (at `delta`, default the configured one)."""
        return self._eps(self._releases, self.delta if delta is None else float(delta))

    def epsilon_after(self, extra_releases: int) -> float:
        """What epsilon would be after `extra_releases` more events: for checks before releasing."""
        if extra_releases < 0:
            raise ValueError(f"extra_releases must be >= 0, got {extra_releases}")
        return self._eps(self._releases + extra_releases, self.delta)

    def _params(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "accountant": self.kind,
            "sampling_rate": self.sampling_rate,
            "sensitivity_factor": self.sensitivity_factor,
        }

    def state_dict(self) -> dict:
        return {**self._params(), "releases": self._releases}

    def load_state_dict(self, state: dict) -> None:
        """Restore the release count; ValueError if the state is for another mechanism."""
        mine = self._params()
        missing = [k for k in (*mine, "releases") if k not in state]
        if missing:
            raise ValueError(f"accountant state lacks {missing}")
        theirs = {k: state[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"accountant state is for a different mechanism: {theirs} != {mine}")
        releases = state["releases"]
        if not isinstance(releases, int) or isinstance(releases, bool) or releases < 0:
            raise ValueError(f"accountant state has an invalid release count: {releases!r}")
        self._releases = releases

    def __repr__(self) -> str:
        return f"ActivationAccountant({self.state_dict()})"


def check_budget(
    accountant: ActivationAccountant, budget_epsilon: float | None, extra_releases: int = 1
) -> None:
    """Raise BudgetExceeded if `extra_releases` more events would exceed the budget (None: no budget).

    Called before releasing, so the release that would exceed the budget is never made.
    """
    if budget_epsilon is None:
        return
    after = accountant.epsilon_after(extra_releases)
    if after > budget_epsilon:
        raise BudgetExceeded(
            f"privacy budget: {extra_releases} more release(s) would bring epsilon from "
            f"{accountant.epsilon():.4f} (spent) to {after:.4f} at delta={accountant.delta:g}, "
            f"over the budget of {budget_epsilon:g}; stopped before releasing"
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
    """The smallest sigma (within `tol`) whose epsilon after `releases` events is <= target.

    Bisection over sigma with the same accountant as the run, so the calibrated run's own
    reported epsilon is guaranteed to be within the target. Infinite target (or no release): 0.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")
    if math.isinf(target_epsilon) or releases == 0 or sampling_rate == 0:
        return 0.0

    def eps(sigma: float) -> float:
        return compute_epsilon(
            sigma,
            delta,
            releases,
            accountant=accountant,
            sampling_rate=sampling_rate,
            sensitivity_factor=sensitivity_factor,
        )

    # Bracket around the exact single-Gaussian answer (k-fold Gaussian = one with sigma/sqrt(k)),
    # which is the answer itself for full passes; bisection then only refines within a few percent.
    expected = releases * (1.0 if sampling_rate is None else sampling_rate)
    guess = sensitivity_factor * dpa.get_sigma_gaussian(target_epsilon, delta) * math.sqrt(max(expected, 1.0))
    lo, hi = 0.98 * guess, 1.02 * guess
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 1.25
        if hi > 1e6:
            raise ValueError(f"cannot reach epsilon={target_epsilon} at delta={delta} with finite noise")
    while lo > tol and eps(lo) <= target_epsilon:
        lo, hi = lo * 0.8, lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# -- end-to-end: the head's DP-SGD and the activation release in one accountant ---------------
#
# Neighbouring relation: replace-one, as for the release alone. dp-accounting's PLD accountant
# under REPLACE_ONE reads a GaussianDpEvent(s) as the pair N(-1, s^2) vs N(1, s^2), i.e. a per-record
# norm bound of 1 (distance 2), and a PoissonSampledDpEvent(q, GaussianDpEvent(s)) as
# q N(-1, s^2) + (1-q) N(0, s^2) vs q N(1, s^2) + (1-q) N(0, s^2): the target record is in the batch
# with probability q in both data sets, and contributes a vector of norm <= 1 in either. Both are
# exactly our mechanisms with noise multipliers relative to the clip norm (release: activation
# clipped to C, noise sigma*C; DP-SGD: per-sample gradient clipped to C_g, noise sigma_sgd*C_g on
# the sum), so under REPLACE_ONE both events take the multipliers as they are (no factor 2 by
# hand), and the release event is the same one `compute_epsilon` accounts (a test checks this).

E2E_RELATION = dpa.NeighboringRelation.REPLACE_ONE


def head_dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dpa.DpEvent:
    """`steps` DP-SGD steps with Poisson sampling at rate q and noise multiplier sigma_sgd."""
    return dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier)), steps
    )


def release_event(noise_multiplier: float, releases: int = 1) -> dpa.DpEvent:
    """`releases` full releases of the clipped activations with noise multiplier sigma (REPLACE_ONE)."""
    return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier), releases)


def end_to_end_event(
    sgd_noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    release_noise_multiplier: float,
    releases: int = 1,
) -> dpa.DpEvent:
    """Everything the trainers receive about the training set: the DP-SGD head, then its releases."""
    return dpa.ComposedDpEvent(
        [
            head_dp_sgd_event(sgd_noise_multiplier, sampling_rate, steps),
            release_event(release_noise_multiplier, releases),
        ]
    )


def event_epsilon(event: dpa.DpEvent, delta: float, *, discretization: float = 1e-4) -> float:
    """Epsilon of `event` at `delta`, by dp-accounting's PLD accountant under REPLACE_ONE.

    `discretization` is the PLD's value discretization interval (dp-accounting's default 1e-4;
    the estimate is pessimistic at any interval, coarser is faster and looser).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    acc = PLDAccountant(neighboring_relation=E2E_RELATION, value_discretization_interval=discretization)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _sgd_sigma_for_mu(mu: float, sampling_rate: float, steps: int) -> float:
    """sigma_sgd whose Gaussian-DP (CLT) parameter is mu: q*sqrt(T*(exp((2/sigma)^2)-1)) = mu.

    Only *defines* the budget split (mu^2 adds up under composition); every epsilon is exact PLD.
    """
    ratio = (mu / sampling_rate) ** 2 / steps
    return 2.0 / math.sqrt(math.log1p(ratio))


def split_noise(mu: float, head_fraction: float, sampling_rate: float, steps: int) -> tuple[float, float]:
    """(sigma_sgd, sigma_release) giving the head a fraction `head_fraction` of mu^2, the release the rest.

    mu is a Gaussian-DP-style scale (release: mu_r = 2/sigma, exact; DP-SGD: the CLT mu of
    Dong, Roth & Su 2019). Since mu^2 adds up under composition, `head_fraction` is the share of the
    total privacy loss spent on training the head, in that currency.
    """
    if not 0 < head_fraction < 1:
        raise ValueError(f"head budget fraction must lie in (0, 1), got {head_fraction}")
    mu_h, mu_r = mu * math.sqrt(head_fraction), mu * math.sqrt(1 - head_fraction)
    return _sgd_sigma_for_mu(mu_h, sampling_rate, steps), 2.0 / mu_r


def calibrate_end_to_end(
    target_epsilon: float,
    delta: float,
    *,
    sampling_rate: float,
    steps: int,
    head_fraction: float,
    releases: int = 1,
) -> tuple[float, float]:
    """(sigma_sgd, sigma_release) whose composed end-to-end epsilon is at most `target_epsilon`.

    A 1-D search over mu (the split is fixed by `head_fraction`) with dp-accounting's own
    `calibrate_dp_mechanism` (Brent's method on the composed event, PLD, REPLACE_ONE); the returned
    point is checked (and nudged towards more noise if needed) so the run's own epsilon is <= target.
    """
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"target epsilon must be positive and finite, got {target_epsilon}")
    if not 0 < sampling_rate <= 1 or steps < 1 or releases < 1:
        raise ValueError("need 0 < sampling_rate <= 1, steps >= 1 and releases >= 1")

    def event(mu: float) -> dpa.DpEvent:
        s_sgd, s_rel = split_noise(mu, head_fraction, sampling_rate, steps)
        return end_to_end_event(s_sgd, sampling_rate, steps, s_rel, releases)

    # Search with a coarse (still pessimistic) PLD in a bracket around the Gaussian-DP guess, then
    # check at the default accuracy, which is what the run reports.
    mu0 = 1.0 / dpa.get_sigma_gaussian(target_epsilon, delta)
    mu = dpa.calibrate_dp_mechanism(
        lambda: PLDAccountant(neighboring_relation=E2E_RELATION, value_discretization_interval=1e-3),
        event,
        target_epsilon,
        delta,
        bracket_interval=dpa.LowerEndpointAndGuess(0.05 * mu0, mu0),
        tol=1e-3 * mu0,
    )
    while event_epsilon(event(mu), delta) > target_epsilon:
        mu *= 0.998
    return split_noise(mu, head_fraction, sampling_rate, steps)
