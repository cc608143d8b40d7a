"""Clustering label inference (Liu & Lyu 2022, "Clustering label inference attack against practical split
learning"), as defined in docs/attacks.md.

The attack exploits that, in plain split learning, samples of one class produce similar cut-layer
activations and (especially) similar gradients, so an unsupervised clustering of what a curious trainer
sees already partitions the training set by label. Clusters are anonymous; to name them the attacker uses
a small, stated set of known labelled samples (`known_per_class` per class).

Attacker knows/holds: the per-sample tensors it legitimately received for the training set (the noised
activations from its predecessor, or the gradients from its successor) in the last epoch, aligned by
sample; the number of classes K; and the true labels of `known_per_class` samples per class. It does not
hold the codebook, the other labels, or any model but its own. `true_labels` is passed to the function
only to pick and label the known subset and to score the attack; predictions never use the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, MiniBatchKMeans

from clicooper.attacks.metrics import chance_advantage

MINIBATCH_ABOVE = 100_000  # full k-means (O(n k d) a pass) up to this many samples; mini-batches beyond


@dataclass(frozen=True)
class ClusteringResult:
    accuracy: float  # over every sample except the known labelled ones
    success: float  # chance_advantage(accuracy, num_classes)
    k: int
    num_classes: int
    n_samples: int
    n_known: int


def _prepare(features: torch.Tensor, normalize: bool) -> np.ndarray:
    """Flatten to (N, D) float64 and L2-normalise per sample (the paper's cosine-similarity view)."""
    x = features.detach().reshape(features.shape[0], -1).to(torch.float64).cpu().numpy()
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _known_indices(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Pick up to `per_class` samples of each class at random (seeded): the attacker's known labels."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
        for c in range(num_classes)
    ]
    return np.sort(np.concatenate(picks).astype(np.int64)) if picks else np.zeros(0, np.int64)


def _cluster(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means assignments and centroids (MiniBatchKMeans for very large N)."""
    if len(x) > MINIBATCH_ABOVE:
        km = MiniBatchKMeans(n_clusters=k, n_init=10, random_state=seed, batch_size=4096)
    else:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    assign = km.fit_predict(x)
    return assign, km.cluster_centers_


def _hungarian_mapping(counts: np.ndarray) -> np.ndarray:
    """One-to-one cluster->class map maximising agreement with the known labels (k <= K).

    With k < K some classes get no cluster; with no known labels (all counts 0) the map is an arbitrary
    fixed one, i.e. an uninformed guess.
    """
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.zeros(counts.shape[0], dtype=np.int64)
    mapping[rows] = cols
    return mapping


def _majority_mapping(
    counts: np.ndarray, centroids: np.ndarray, x_known: np.ndarray, y_known: np.ndarray, num_classes: int
) -> np.ndarray:
    """Many-to-one cluster->class map for k > K, where one-to-one Hungarian matching cannot apply.

    Each cluster takes the majority known class among its known members; clusters with no known member
    take the class whose known-sample mean is nearest (cosine) to the centroid. Without any known labels
    the fallback is the fixed uninformed guess `cluster mod K`.
    """
    mapping = np.arange(counts.shape[0], dtype=np.int64) % num_classes
    present = np.unique(y_known)
    if len(present):
        means = np.stack([x_known[y_known == c].mean(axis=0) for c in present])
        sims = _unit(centroids) @ _unit(means).T
        mapping = present[sims.argmax(axis=1)]
    has_known = counts.sum(axis=1) > 0
    mapping[has_known] = counts[has_known].argmax(axis=1)
    return mapping


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _validate(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, per_class: int) -> None:
    n = features.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"true_labels must have shape ({n},) to match features, got {tuple(labels.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n} (number of samples), got {k}")
    if per_class < 0:
        raise ValueError(f"known_per_class must be >= 0, got {per_class}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"true_labels must lie in 0..{num_classes - 1}")


def clustering_label_attack(
    features: torch.Tensor,
    true_labels: torch.Tensor,
    num_classes: int,
    *,
    k: int | None = None,
    known_per_class: int = 5,
    seed: int = 0,
    normalize: bool = True,
) -> ClusteringResult:
    """Infer every training label from what a trainer saw, by clustering (Liu & Lyu 2022).

    features: (N, ...) tensors the attacker received for N training samples (activations or gradients).
    Steps: flatten, L2-normalise, k-means with k clusters (default k = K; use gamma*K for the expanded
    label space), name clusters from the `known_per_class` known labels per class (Hungarian matching
    for k <= K, majority vote for k > K), predict all labels. Accuracy excludes the known samples.
    """
    return clustering_label_attacks(
        features,
        true_labels,
        num_classes,
        k=k,
        known_per_class=(known_per_class,),
        seed=seed,
        normalize=normalize,
    )[0]


def clustering_label_attacks(
    features: torch.Tensor,
    true_labels: torch.Tensor,
    num_classes: int,
    *,
    k: int | None = None,
    known_per_class: tuple[int, ...] = (1, 5),
    seed: int = 0,
    normalize: bool = True,
) -> list[ClusteringResult]:
    """The same attack for several sizes of the known labelled set, sharing one clustering (k-means does
    not use the labels): one result per entry of `known_per_class`, in order."""
    k = num_classes if k is None else k
    for per_class in known_per_class:
        _validate(features, true_labels, num_classes, k, per_class)
    x = _prepare(features, normalize)
    y = true_labels.detach().cpu().numpy().astype(np.int64)
    assign, centroids = _cluster(x, k, seed)
    return [
        _name_clusters(
            x, y, assign, centroids, k, num_classes, _known_indices(y, num_classes, per_class, seed)
        )
        for per_class in known_per_class
    ]


def _name_clusters(
    x: np.ndarray,
    y: np.ndarray,
    assign: np.ndarray,
    centroids: np.ndarray,
    k: int,
    num_classes: int,
    known: np.ndarray,
) -> ClusteringResult:
    counts = np.zeros((k, num_classes), dtype=np.int64)
    np.add.at(counts, (assign[known], y[known]), 1)
    if k <= num_classes:
        mapping = _hungarian_mapping(counts)
    else:
        mapping = _majority_mapping(counts, centroids, x[known], y[known], num_classes)

    unknown = np.ones(len(y), dtype=bool)
    unknown[known] = False
    if not unknown.any():
        raise ValueError("every sample is in the known set; nothing left to infer")
    acc = float((mapping[assign][unknown] == y[unknown]).mean())
    return ClusteringResult(acc, chance_advantage(acc, num_classes), k, num_classes, len(y), len(known))
