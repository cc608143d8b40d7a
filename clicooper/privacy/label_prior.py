"""A learned prior for label DP (RRWithPrior's multi-stage training, Ghazi et al., NeurIPS 2021).

Randomized response with a uniform prior keeps a label with probability e^eps / (e^eps + K - 1):
0.45 at epsilon 2 with 10 classes. RRWithPrior keeps it with e^eps / (e^eps + k - 1) when it lies
among the k classes a prior ranks first, and the prior may be anything that does not depend on
that label. Two stages give one:
1. the first part of the training set (a seeded, public split) is released with the uniform prior;
   the data owner pre-trains its head and probe on four fifths of those noisy labels;
2. the probe's class probabilities on the *other* samples are their priors, at a temperature
   fitted to the remaining fifth's released labels (`fit_temperature`). They depend on those samples'
   inputs and on the first part's released labels, never on the second part's own labels, so each
   label is still released once, epsilon-DP.

The priors are kept in the data owner's folder (`label_prior.safetensors`, mode 0600): a resumed
run must re-release exactly the same labels, and re-derived priors could differ in the last bits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from clicooper.checkpoint import atomic_write_bytes
from clicooper.seeding import generator

FIRST_STAGE_FRACTION = 0.5  # share of the training set released with the uniform prior
PRIOR_FILE = "label_prior.safetensors"


def calibration_split(first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, calibrate): four fifths of the first stage train the probe, one fifth fits its temperature."""
    held = torch.arange(len(first)) % 5 == 0
    return first[~held], first[held]


def prior_stages(
    seed: int, n: int, first_fraction: float = FIRST_STAGE_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second): sorted dataset indices of the two stages, a seeded (public) split."""
    if not 0 < first_fraction < 1:
        raise ValueError(f"the first stage's fraction must lie in (0, 1), got {first_fraction}")
    order = torch.randperm(n, generator=generator(seed, "label-prior-stages"))
    cut = max(1, min(n - 1, round(first_fraction * n)))
    return order[:cut].sort().values, order[cut:].sort().values


def cosine_logits(
    head: nn.Module, directions: torch.Tensor, x: torch.Tensor, batch: int = 2048
) -> torch.Tensor:
    """(N, K) cosines between the head's features of `x` and the probe's class directions."""
    head.eval()
    w = F.normalize(directions.detach(), dim=1)
    with torch.no_grad():
        return torch.cat(
            [F.normalize(head(x[i : i + batch]).flatten(1), dim=1) @ w.T for i in range(0, len(x), batch)]
        ).double()


def fit_temperature(cosines: torch.Tensor, noisy: torch.Tensor, transition: torch.Tensor) -> float:
    """The temperature t whose class probabilities softmax(t * cosine) best explain released (noisy)
    labels of samples the probe was not trained on, through the noise's transition matrix
    (forward-corrected likelihood), on a log grid of temperatures.

    Why: RRWithPrior picks how many top classes to keep from the prior's probabilities; an
    overconfident prior keeps too few and drops the true class more often than it should (on the
    probe's own training samples the fit would be overconfident too). Released labels only:
    post-processing.
    """
    T = transition.double()
    grid = torch.logspace(0, 2, 41, dtype=torch.float64)  # 1 .. 100

    def nll(t: float) -> float:
        p = torch.softmax(t * cosines, dim=1) @ T
        return float(-torch.log(p.gather(1, noisy[:, None]).clamp_min(1e-12)).mean())

    return float(min(grid.tolist(), key=nll))


def probe_priors(cosines: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, K) float64 class probabilities softmax(temperature * cosine): the second stage's priors."""
    return torch.softmax(temperature * cosines.double(), dim=1)


def save_priors(path: Path, ids: torch.Tensor, priors: torch.Tensor) -> None:
    tensors = {"ids": ids.long().contiguous(), "priors": priors.double().contiguous()}
    atomic_write_bytes(path, save(tensors), mode=0o600)


def load_priors(path: Path, ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The saved priors of `ids`; refuses a file made for other samples or classes."""
    t = load_file(str(path))
    if set(t) != {"ids", "priors"} or not torch.equal(t["ids"], ids.long()):
        raise ValueError(f"{path} holds priors for other samples than this run's second stage")
    if t["priors"].shape != (len(ids), num_classes) or not torch.isfinite(t["priors"]).all():
        raise ValueError(
            f"{path}: priors of shape {tuple(t['priors'].shape)}, expected ({len(ids)}, {num_classes})"
        )
    return t["priors"]
