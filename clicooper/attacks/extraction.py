"""Model extraction / completion by trainers (docs/attacks.md).

A trainer (or a coalition of trainers) walks away with its segment(s) and tries to turn them into a
working classifier for the data owner's task. What it lacks: the data owner's head (and, for a single
trainer, the segments after its own), the true-label semantics of the output layer (the secret codebook
maps true classes to pseudo-labels), and labelled data. With a stated amount of auxiliary labelled data
it can train the missing parts around its frozen segments; the fair bar is a model trained from scratch
on the same labels alone — the segments are only worth something if they beat it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clicooper.attacks.inversion import _fit, _seeded


@dataclass(frozen=True)
class ExtractionResult:
    accuracy: float  # surrogate accuracy on the test set's true labels
    chance: float  # 1/K
    n_aux_labels: int
    attacker: str  # who built it, e.g. "T1" or "T1+T2+T3"
    mode: str  # "trained" (fitted on aux labels) or "direct" (outputs used with a guessed mapping)


class _Surrogate(nn.Module):
    """fresh head -> held segments -> fresh missing layers -> output; frozen segments stay in eval mode."""

    def __init__(self, head: nn.Module, segments: nn.Sequential, rest: nn.Module, frozen: bool) -> None:
        super().__init__()
        self.head, self.segments, self.rest, self.frozen = head, segments, rest, frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.segments(self.head(x)))

    def train(self, mode: bool = True) -> _Surrogate:
        super().train(mode)
        if self.frozen:
            self.segments.eval()  # frozen BatchNorm statistics must not drift either
        return self


def _attacker_seed(seed: int) -> int:
    """The attacker's own initialisation seed, derived so that it never equals a job seed.

    Seeding the fresh head with the same integer as the job would rebuild the data owner's *initial*
    head weights exactly (same architecture, same RNG stream) — information a real attacker lacks.
    """
    return (seed * 1_000_003 + 0xA77AC) % (2**63)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on (x, y), evaluated in eval mode without gradients."""
    if len(x) == 0:
        raise ValueError("cannot score on an empty test set")
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(batch_size)])
    return float((pred == y).float().mean())


def _guess_decode(logits: torch.Tensor, mapping: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class scores from pseudo-logits: log-sum-exp over the pseudo indices each class is mapped to."""
    scores = torch.full((logits.shape[0], num_classes), float("-inf"))
    for c in range(num_classes):
        cols = (mapping == c).nonzero().flatten()
        if len(cols):
            scores[:, c] = logits[:, cols].logsumexp(1)
    return scores


def _uninformed_mapping(width: int, num_classes: int) -> torch.Tensor:
    """The attacker's fixed guess without the codebook: pseudo index p -> class p mod K."""
    return torch.arange(width) % num_classes


def complete_model(
    attacker_segments: Sequence[nn.Module],
    make_head: Callable[[], nn.Module],
    make_missing: Callable[[], nn.Module] | None,
    out_dim: int,
    num_classes: int,
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    fine_tune_segments: bool = False,
    epochs: int = 100,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    attacker: str = "attacker",
) -> ExtractionResult:
    """Build and score a surrogate from the attacker's segments plus its own head, missing layers and decoder.

    Attacker knows/holds: its own trained segment(s) `attacker_segments`, in chain order (a coalition
    holds several); the architecture of the data owner's head (`make_head`, fresh random weights — never
    the trained head) and of any layers after its segments that it lacks (`make_missing`, which may
    be None or return None when nothing is missing); K; and
    `len(aux_y)` labelled auxiliary samples of its own (may be zero). It does not hold the codebook.
    The surrogate is fresh head -> segments (frozen unless `fine_tune_segments`) -> fresh missing layers
    -> fresh Linear(out_dim, K), trained with cross-entropy on the aux labels only. With no aux labels
    nothing can be trained, so the attacker uses its outputs directly with the uninformed pseudo-index
    -> class guess `p mod K` (mode "direct"). `test_x, test_y` are used only for scoring.
    """
    if len(aux_x) != len(aux_y):
        raise ValueError(f"aux_x has {len(aux_x)} samples but aux_y has {len(aux_y)}")
    if not attacker_segments:
        raise ValueError("the attacker must hold at least one segment")
    with _seeded(_attacker_seed(seed)):
        head = make_head()
        missing = (make_missing() if make_missing is not None else None) or nn.Identity()
        output = nn.Linear(out_dim, num_classes)
    segments = nn.Sequential(*(copy.deepcopy(s) for s in attacker_segments))
    segments.requires_grad_(fine_tune_segments)
    chance = 1.0 / num_classes

    if len(aux_y) == 0:
        chain = _Surrogate(head, segments, missing, frozen=True).eval()
        with torch.no_grad():
            logits = torch.cat([chain(b) for b in test_x.split(512)])
        acc = float(
            (
                _guess_decode(logits, _uninformed_mapping(logits.shape[1], num_classes), num_classes).argmax(
                    1
                )
                == test_y
            )
            .float()
            .mean()
        )
        return ExtractionResult(acc, chance, 0, attacker, "direct")

    model = _Surrogate(head, segments, nn.Sequential(missing, output), frozen=not fine_tune_segments)
    params = [p for p in model.parameters() if p.requires_grad]
    _fit(
        model,
        params,
        aux_x,
        aux_y,
        nn.functional.cross_entropy,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    return ExtractionResult(accuracy(model, test_x, test_y), chance, len(aux_y), attacker, "trained")


def scratch_baseline(
    make_model: Callable[[], nn.Module],
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int = 100,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """The fair bar: test accuracy of a model trained from scratch on the same aux labels alone.

    Holds only what every attacker holds anyway (the architecture and the aux labelled data), so a
    surrogate that does not beat it has gained nothing from the stolen segments.
    """
    with _seeded(_attacker_seed(seed)):
        model = make_model()
    _fit(
        model,
        list(model.parameters()),
        aux_x,
        aux_y,
        nn.functional.cross_entropy,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    return accuracy(model, test_x, test_y)


def label_free_output_attack(
    pseudo_logits_test: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    gamma: int,
    *,
    known_mapping: torch.Tensor | None = None,
) -> float:
    """Direct use of the last trainer's outputs, with no labelled data at all.

    Attacker knows/holds: the pseudo-logits (N, gamma*K) its segment(s) produce on test inputs and K and
    gamma; `known_mapping` (pseudo index -> class, shape (gamma*K,)) only where it really knows it — in an
    undefended chain the last trainer sees true labels, so gamma=1 and the mapping is the identity and
    this returns the model's own accuracy. Without it, the best uninformed guess is the fixed `p mod K`.
    Classes are decoded by log-sum-exp over their pseudo indices, as the data owner decodes.
    """
    width = gamma * num_classes
    if pseudo_logits_test.dim() != 2 or pseudo_logits_test.shape[1] != width:
        raise ValueError(
            f"expected pseudo-logits of shape (N, {width}), got {tuple(pseudo_logits_test.shape)}"
        )
    mapping = _uninformed_mapping(width, num_classes) if known_mapping is None else known_mapping.long()
    if mapping.shape != (width,):
        raise ValueError(f"known_mapping must have shape ({width},), got {tuple(mapping.shape)}")
    pred = _guess_decode(pseudo_logits_test.detach().float(), mapping, num_classes).argmax(1)
    return float((pred == test_y).float().mean())
