"""Label DP accounting, and the attacker-success bounds that the epsilons imply.

The mechanism is `label_dp.py` (RRWithPrior). Each training sample's label is randomised once per
job (keyed by its index) and every epoch re-sends the same noisy label, so the label release costs
each sample `label_epsilon` once, with delta = 0 (pure DP). Pseudo-labels (the codebook maps the
noisy class to a pseudo-label by a keyed function of the class and the sample index) and everything
computed from them are post-processing.

Bound on label inference. Let a mechanism be (eps, delta)-DP for the relation under which sample i's
label may change, let labels be balanced over K classes (uniform class prior), and let an attacker
output a guess g for y_i from everything it sees. For labels y != y', P(g = y | y) <= e^eps P(g = y | y')
+ delta; summing over y != y' and then over y' gives

    P(g = y_i) <= (e^eps + (K - 1) delta) / (e^eps + K - 1),

i.e. a success (advantage over chance, `max(0, (acc - 1/K) / (1 - 1/K))`) of at most
`(e^eps - 1 + K delta) / (e^eps + K - 1)`. K-ary randomized response meets it with equality.
This is an expectation over the mechanism's randomness; a measured accuracy may exceed it by
sampling error (`binomial_margin`).

Which epsilon applies (see docs/privacy.md):
- an attacker who sees only the pseudo-labels (the last trainer's clustering on pseudo-labels):
  the label epsilon alone, when the RR prior does not depend on the sample (the default uniform
  prior); the label is then released independently of the features.
- an attacker who sees the traffic (activations and gradients): gradients mix features and noisy
  labels, so the sample-level bound composes both releases, eps_act + eps_label with the activation
  delta, and holds only when activation DP is on (and, like the activation epsilon, given the head).
  Without activation DP no label bound holds for it: features predict labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _exp(eps: float) -> float:
    return math.inf if eps > 700 else math.exp(eps)


def accuracy_bound(epsilon: float | None, num_classes: int, delta: float = 0.0) -> float:
    """Upper bound on any attacker's label-inference accuracy under (epsilon, delta)-DP, balanced classes.

    `epsilon=None` or inf means no DP: the bound is 1.
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    if epsilon is None or math.isinf(epsilon):
        return 1.0
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    e = _exp(epsilon)
    if math.isinf(e):
        return 1.0
    return min(1.0, (e + (num_classes - 1) * delta) / (e + num_classes - 1))


def success_bound(epsilon: float | None, num_classes: int, delta: float = 0.0) -> float:
    """The same bound as advantage over chance (the clustering attack's `success`)."""
    acc = accuracy_bound(epsilon, num_classes, delta)
    chance = 1.0 / num_classes
    return max(0.0, (acc - chance) / (1.0 - chance))


def binomial_margin(p: float, n: int, z: float = 2.0) -> float:
    """z standard errors of an accuracy measured on n samples with true rate p (sampling tolerance)."""
    return z * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def composed(
    eps_act: float | None, delta_act: float | None, eps_label: float | None
) -> tuple[float | None, float]:
    """Sample-level (epsilon, delta) of activations and labels together (basic composition).

    None when activation DP is off (no bound for attacks that use features), or when label DP is
    off (labels are released as they are).
    """
    if eps_act is None or eps_label is None:
        return None, 0.0
    return eps_act + eps_label, float(delta_act or 0.0)


@dataclass(frozen=True)
class LabelAccountant:
    """Label DP spent: one RRWithPrior release per training sample, pure DP."""

    epsilon: float
    mechanism: str = "rr-with-prior"
    prior: str = "uniform"
    releases: int = 1

    @property
    def delta(self) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {"epsilon": self.epsilon, "mechanism": self.mechanism, "prior": self.prior, "releases": 1}

    def check_state(self, state: dict) -> None:
        """A resumed run must use the same label mechanism (the noisy labels are re-derived from the key)."""
        if state != self.state_dict():
            raise ValueError(f"label DP state does not match: checkpoint {state}, here {self.state_dict()}")
