"""Label DP mechanism: randomized response with a prior (Ghazi et al., NeurIPS 2021, "RRWithPrior").

Given a sample's true label y among K classes, a prior p over the classes that does not depend on y
(uniform by default), and epsilon:
1. sort the classes by prior (ties by class index) and pick the k that maximises
   `sum(top-k prior) * e^eps / (e^eps + k - 1)`, the probability of outputting y under the prior;
2. if y is among those top-k classes Y_k, output y with probability e^eps / (e^eps + k - 1) and
   each other class of Y_k with probability 1 / (e^eps + k - 1);
3. otherwise output a class of Y_k uniformly at random.
For any fixed prior this is epsilon-DP with respect to the label (every output has probability
between q and e^eps * q for every y, with q = 1 / (e^eps + k - 1) or 0 for every y alike). With
the uniform prior, k = K and it is K-ary randomized response.

Randomness: each sample's draw is keyed by its dataset index under a 32-byte key from the OS
(`new_label_key`), as HMAC-SHA256 -> two uniform numbers. So the noisy label of a sample is drawn
once per job (every epoch re-sends the same release: epsilon is paid once), a resumed run redraws
exactly the same labels from the stored key, and nothing is derived from the job seed or any
other public value. Accounting and attacker-success bounds are in `label_accounting.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os

import numpy as np
import torch

from clicooper.privacy.labels import check_sample_ids, covering

_DOMAIN = b"clicooper/label-dp/rr-with-prior/v1"
KEY_BYTES = 32


def new_label_key() -> bytes:
    """A fresh 32-byte key from the OS CSPRNG: the data owner's label-DP randomness."""
    return os.urandom(KEY_BYTES)


def keyed_uniforms(key: bytes, ids: torch.Tensor) -> torch.Tensor:
    """(N, 2) float64 uniforms in [0, 1) per sample index, from HMAC-SHA256(key, index) (53 bits each)."""
    if not isinstance(key, bytes | bytearray) or len(key) < 16:
        raise ValueError("the label-DP key must be at least 16 bytes")
    key, prefix = bytes(key), _DOMAIN + b"|"
    ids = torch.as_tensor(ids).reshape(-1).tolist()
    # hmac.digest: the one-shot C path, several times faster per sample than hmac.new(...).digest()
    words = np.frombuffer(
        b"".join(hmac.digest(key, prefix + str(int(i)).encode(), "sha256")[:16] for i in ids), dtype=">u8"
    ).reshape(len(ids), 2)
    return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) / 2.0**53)


def keep_probability(epsilon: float, k: int) -> float:
    """P(output = y | y among the k candidates) = e^eps / (e^eps + k - 1), overflow-safe."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 1.0 / (1.0 + (k - 1) * math.exp(-epsilon))


def _check_epsilon(epsilon: float) -> None:
    if not epsilon > 0 or math.isnan(epsilon):
        raise ValueError(f"label epsilon must be > 0, got {epsilon}")


def _priors(prior: torch.Tensor | None, n: int, num_classes: int) -> torch.Tensor:
    if prior is None:
        return torch.full((n, num_classes), 1.0 / num_classes, dtype=torch.float64)
    p = torch.as_tensor(prior, dtype=torch.float64)
    if p.dim() == 1:
        p = p.expand(n, -1)
    if p.shape != (n, num_classes):
        raise ValueError(
            f"prior must have shape ({num_classes},) or ({n}, {num_classes}), got {tuple(p.shape)}"
        )
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-6):
        raise ValueError("each prior must be a probability vector over the classes")
    return p


def top_k(prior: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the classes sorted by prior (N, K) and the optimal k (N,) of RRWithPrior."""
    _check_epsilon(epsilon)
    n, num_classes = prior.shape
    # stable descending sort: equal priors keep class order, so the choice is deterministic
    order = torch.sort(-prior, dim=1, stable=True).indices
    mass = torch.gather(prior, 1, order).cumsum(1)
    ks = torch.arange(1, num_classes + 1, dtype=torch.float64)
    score = mass / (1.0 + (ks - 1) * math.exp(-epsilon))  # = mass * e^eps / (e^eps + k - 1)
    # ties resolve to the largest k (uniform prior -> k = K, plain randomized response)
    near_best = torch.flip(score, [1]) >= score.max(1, keepdim=True).values - 1e-12
    best = num_classes - 1 - torch.argmax(near_best.long(), 1)
    return order, best + 1


def rr_with_prior(
    labels: torch.Tensor,
    num_classes: int,
    epsilon: float,
    uniforms: torch.Tensor,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noisy labels (int64) by RRWithPrior, driven by `uniforms` (N, 2) in [0, 1).

    `prior`: None (uniform: K-ary randomized response), a (K,) vector shared by all samples, or (N, K)
    per sample; it must not depend on the samples' own labels.
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    n = len(labels)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    u = torch.as_tensor(uniforms, dtype=torch.float64)
    if u.shape != (n, 2) or (n and (u.min() < 0 or u.max() >= 1)):
        raise ValueError(f"uniforms must have shape ({n}, 2) and lie in [0, 1)")
    if prior is None:  # uniform: every class ties, so the stable order is 0..K-1 and k = K (see top_k)
        _check_epsilon(epsilon)
        order = torch.arange(num_classes).expand(n, num_classes)
        k = torch.full((n,), num_classes, dtype=torch.int64)
    else:
        order, k = top_k(_priors(prior, n, num_classes), epsilon)
    rank = torch.argmax((order == labels[:, None]).long(), 1)  # position of y in the sorted classes
    inside = rank < k
    keep = u[:, 0] < 1.0 / (1.0 + (k - 1).double() * math.exp(-epsilon))
    # y in Y_k and not kept: a uniform other member of Y_k (skip y's own rank)
    other = torch.clamp((u[:, 1] * (k - 1).double()).long(), max=(k - 2).clamp_min(0))
    other = other + (other >= rank).long()
    # y outside Y_k: a uniform member of Y_k
    anyone = torch.clamp((u[:, 1] * k.double()).long(), max=k - 1)
    pick = torch.where(inside, torch.where(keep, rank, other), anyone)
    return torch.gather(order, 1, pick[:, None]).squeeze(1)


def output_distribution(
    label: int, num_classes: int, epsilon: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact output distribution (K,) of RRWithPrior for one label and prior (for tests and docs)."""
    order, k = top_k(
        _priors(None if prior is None else torch.as_tensor(prior)[None], 1, num_classes), epsilon
    )
    order, k = order[0], int(k[0])
    cand = order[:k]
    out = torch.zeros(num_classes, dtype=torch.float64)
    if label in cand.tolist():
        q = 1.0 / (math.exp(epsilon) + k - 1) if epsilon < 700 else 0.0
        out[cand] = q
        out[label] = keep_probability(epsilon, k)
    else:
        out[cand] = 1.0 / k
    return out


def transition_matrix(num_classes: int, epsilon: float) -> torch.Tensor:
    """T[y, j] = P(noisy label = j | true label = y) under the uniform prior (K-ary randomized
    response): public, since it depends only on epsilon and K. Learners use it to correct for the
    noise (`job.pretrain_head`)."""
    return torch.stack([output_distribution(y, num_classes, epsilon) for y in range(num_classes)])


class LabelRandomizer:
    """The data owner's label-DP release: each training sample's label randomised once, keyed by its index.

    Holds the OS-random key (store it like the codebook secret, never in a checkpoint); noisy labels
    are cached per index so every epoch re-sends the same release.
    """

    def __init__(
        self, key: bytes, num_classes: int, epsilon: float, prior: torch.Tensor | None = None
    ) -> None:
        _check_epsilon(epsilon)
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self._key = bytes(key)
        keyed_uniforms(self._key, torch.zeros(0, dtype=torch.long))  # validates the key
        self.num_classes, self.epsilon = int(num_classes), float(epsilon)
        self.prior = prior
        # The release so far, per dataset index: the noisy label (-1: not released) and the true label
        # it was drawn for. Tensors, not a dict: a batch's lookup is one indexing op.
        self._noisy = torch.empty(0, dtype=torch.int64)
        self._drawn_for = torch.empty(0, dtype=torch.int64)
        self._sample_priors: dict[int, torch.Tensor] = {}  # per dataset index (`set_priors`)

    def set_priors(self, ids: torch.Tensor, priors: torch.Tensor) -> None:
        """Per-sample priors (N, K) for the samples `ids`, before any of their labels is released.

        RRWithPrior stays epsilon-DP for each label only if that label's prior does not depend on
        it: a learned prior must come from other samples' released labels (`label_prior.py`).
        """
        ids = torch.as_tensor(ids).long().reshape(-1)
        p = _priors(priors, len(ids), self.num_classes)
        check_sample_ids(ids)
        known = ids[ids < len(self._noisy)]
        released = int((self._noisy[known] >= 0).sum()) if known.numel() else 0
        if released:
            raise ValueError(f"{released} of these samples' labels were already released without the prior")
        self._sample_priors.update(zip(ids.tolist(), p, strict=True))

    def _prior_for(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Priors of `ids`: per sample where `set_priors` gave one, else the shared prior (None: uniform)."""
        shared = None if self.prior is None else torch.as_tensor(self.prior, dtype=torch.float64)
        if shared is not None and shared.dim() == 2:
            shared = shared[ids]
        if not self._sample_priors:
            return shared
        base = _priors(shared, len(ids), self.num_classes)
        return torch.stack([self._sample_priors.get(i, base[j]) for j, i in enumerate(ids.tolist())])

    def transition(self) -> torch.Tensor | None:
        """The noise's transition matrix (`transition_matrix`); None with a non-uniform prior, whose
        noise depends on each sample's prior."""
        if self.prior is None and not self._sample_priors:
            return transition_matrix(self.num_classes, self.epsilon)
        return None

    def fingerprint(self) -> str:
        """Public identifier of the key (to check on resume that the same key is in use)."""
        return hmac.new(self._key, _DOMAIN + b"|fingerprint", hashlib.sha256).hexdigest()[:32]

    def privatize(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Noisy labels for the samples with dataset indices `ids` (the same every time it is asked)."""
        labels, ids = torch.as_tensor(labels).long().reshape(-1), torch.as_tensor(ids).long().reshape(-1)
        if labels.shape != ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and ids {tuple(ids.shape)} differ in shape")
        check_sample_ids(ids)
        self._noisy, self._drawn_for = covering(self._noisy, ids), covering(self._drawn_for, ids)
        out = self._noisy[ids]
        todo = (out < 0) | (self._drawn_for[ids] != labels)
        if bool(todo.any()):
            sel = ids[todo]
            noisy = rr_with_prior(
                labels[todo],
                self.num_classes,
                self.epsilon,
                keyed_uniforms(self._key, sel),
                self._prior_for(sel),
            )
            out[todo] = noisy
            # First release of an index is kept; an index asked again with another label (a caller's
            # mistake, or a subset's own numbering) gets its own deterministic draw, not stored.
            # (The draw is a function of the key, index, label and prior, and an index's prior cannot
            # change once released, so a recomputed draw equals the first.)
            fresh = self._noisy[sel] < 0
            self._noisy[sel[fresh]] = noisy[fresh]
            self._drawn_for[sel[fresh]] = labels[todo][fresh]
        return out
