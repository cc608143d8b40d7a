"""Secret label expansion: K true classes -> gamma*K pseudo-labels through a secret codebook.

The codebook is a secret permutation of range(gamma*K) derived from the data owner's secret;
class c owns pseudo-labels perm[c*gamma:(c+1)*gamma]. Each sample's pseudo-label within its
class's group is chosen by a keyed hash (HMAC-SHA256) of its index (and, for the per-epoch
policy, the epoch), so no RNG state needs saving and a resumed run draws the same labels.
Trainers see pseudo-labels only; without the secret they cannot tell which pseudo-labels belong
to the same class, nor which class a group is. This is secrecy, not differential privacy.

Everything is derived with HMAC from the secret (never torch/numpy RNGs), so the codebook is
the same across library versions and machines: a run resumed elsewhere decodes correctly.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Literal

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from clicooper.checkpoint import atomic_write_bytes

LabelPolicy = Literal["fixed", "per-epoch"]
DecodeMethod = Literal["logsumexp", "sum-prob"]

_DOMAIN = b"clicooper/label-codebook/v1"
MIN_SECRET_BYTES = 16


def generate_secret() -> bytes:
    """32 fresh random bytes from the OS: the data owner's label secret."""
    return os.urandom(32)


def _prf(secret: bytes, *parts: object) -> bytes:
    """HMAC-SHA256 of a canonical (JSON) encoding of `parts`, domain-separated."""
    msg = _DOMAIN + b"|" + json.dumps(list(parts), separators=(",", ":")).encode()
    return hmac.digest(secret, msg, "sha256")


def check_sample_ids(ids: torch.Tensor) -> None:
    """Sample ids index the training set: refuse negative ones (they would index tables from the end)."""
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("sample ids must be non-negative dataset indices")


def covering(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`table` (int64 per sample id, -1 = not computed yet), extended with -1 so that every id in
    `ids` indexes it: the per-sample caches grow with the largest id seen, not with the dataset."""
    need = int(ids.max()) + 1 if ids.numel() else 0
    if need <= len(table):
        return table
    return torch.cat([table, torch.full((need - len(table),), -1, dtype=torch.int64)])


class LabelCodebook:
    """The data owner's secret map between true classes and groups of pseudo-labels.

    Holds the secret (it keys the per-sample choice); never serialise it: `state_dict` carries
    only the shape and a fingerprint, to check on resume that the same secret is in use.
    """

    def __init__(self, secret: bytes, num_classes: int, gamma: int) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the codebook secret must be at least {MIN_SECRET_BYTES} bytes")
        if num_classes < 2 or gamma < 1:
            raise ValueError(f"need at least 2 classes and gamma >= 1, got K={num_classes}, gamma={gamma}")
        self.num_classes, self.gamma = int(num_classes), int(gamma)
        self._secret = bytes(secret)
        keys = [_prf(self._secret, "perm", self.num_classes, self.gamma, p) for p in range(self.num_pseudo)]
        # Sorting by independent PRF values gives a uniformly random permutation.
        self.perm = torch.tensor(sorted(range(self.num_pseudo), key=keys.__getitem__), dtype=torch.int64)
        self._class_of = torch.empty_like(self.perm)
        self._class_of[self.perm] = torch.arange(self.num_pseudo) // self.gamma
        # choice tables: (policy, epoch) -> int64 tensor indexed by sample id, -1 = not computed yet.
        # Only the fixed table and the latest per-epoch table are kept, so memory stays O(N).
        self._tables: dict[tuple[str, int], torch.Tensor] = {}

    @classmethod
    def from_secret(cls, secret: bytes, num_classes: int, gamma: int) -> LabelCodebook:
        return cls(secret, num_classes, gamma)

    @property
    def num_pseudo(self) -> int:
        return self.num_classes * self.gamma

    def groups(self) -> torch.Tensor:
        """(K, gamma) int64: row c lists the pseudo-labels class c owns."""
        return self.perm.reshape(self.num_classes, self.gamma)

    def fingerprint(self) -> str:
        """A public identifier of the secret and shape (HMAC output; reveals nothing of the codebook)."""
        return _prf(self._secret, "fingerprint", self.num_classes, self.gamma).hex()[:32]

    def __repr__(self) -> str:
        return f"LabelCodebook(K={self.num_classes}, gamma={self.gamma}, fingerprint={self.fingerprint()})"

    # -- encoding ------------------------------------------------------------------
    def _choices(self, ids: torch.Tensor, policy: LabelPolicy, epoch: int) -> torch.Tensor:
        key = ("fixed", 0) if policy == "fixed" else ("per-epoch", int(epoch))
        table = self._tables.get(key)
        if table is None:
            if key[0] == "per-epoch":  # drop earlier epochs' tables
                self._tables = {k: v for k, v in self._tables.items() if k[0] != "per-epoch"}
            table = torch.empty(0, dtype=torch.int64)
        table = self._tables[key] = covering(table, ids)
        missing = ids[table[ids] < 0].unique()
        if missing.numel():
            table[missing] = torch.tensor(self._choice_values(key, missing.tolist()), dtype=torch.int64)
        return table[ids]

    def _choice_values(self, key: tuple[str, int], ids: list[int]) -> list[int]:
        """`_prf(secret, "choice", *key, i)` reduced mod gamma for each i, with the JSON prefix encoded
        once (the same bytes `_prf` hashes; a test checks the two agree)."""
        head = _DOMAIN + b"|" + json.dumps(["choice", *key], separators=(",", ":"))[:-1].encode() + b","
        return [
            int.from_bytes(hmac.digest(self._secret, b"%s%d]" % (head, i), "sha256")[:8], "big") % self.gamma
            for i in ids
        ]

    def encode(
        self, labels: torch.Tensor, sample_ids: torch.Tensor, *, policy: LabelPolicy = "fixed", epoch: int = 0
    ) -> torch.Tensor:
        """Pseudo-labels (int64) for true `labels` of the samples whose dataset indices are `sample_ids`.

        "fixed": a sample keeps its pseudo-label for the whole job; "per-epoch": redrawn (within
        its class's group) every epoch. Deterministic given the secret, so resumes agree.
        """
        if policy not in ("fixed", "per-epoch"):
            raise ValueError(f"label policy must be 'fixed' or 'per-epoch', got {policy!r}")
        labels, sample_ids = torch.as_tensor(labels), torch.as_tensor(sample_ids)
        if labels.shape != sample_ids.shape or labels.dim() != 1:
            raise ValueError(
                f"labels and sample_ids must be 1-D of the same shape, got {tuple(labels.shape)} "
                f"and {tuple(sample_ids.shape)}"
            )
        if labels.dtype.is_floating_point or sample_ids.dtype.is_floating_point:
            raise ValueError("labels and sample_ids must be integer tensors")
        labels, sample_ids = labels.long().cpu(), sample_ids.long().cpu()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        check_sample_ids(sample_ids)
        if self.gamma == 1:
            return self.perm[labels]
        return self.groups()[labels, self._choices(sample_ids, policy, epoch)]

    # -- decoding ------------------------------------------------------------------
    def decode_labels(self, pseudo: torch.Tensor) -> torch.Tensor:
        """True class of each pseudo-label."""
        pseudo = torch.as_tensor(pseudo)
        if pseudo.numel() and (int(pseudo.min()) < 0 or int(pseudo.max()) >= self.num_pseudo):
            raise ValueError(f"pseudo-labels must lie in 0..{self.num_pseudo - 1}")
        return self._class_of.to(pseudo.device)[pseudo.long()]

    def decode_logits(
        self, pseudo_logits: torch.Tensor, *, method: DecodeMethod = "logsumexp"
    ) -> torch.Tensor:
        """(B, gamma*K) pseudo-logits -> (B, K) class scores, pooling each class's group.

        "logsumexp": log-sum-exp of the group's logits (a softmax over them equals the summed
        pseudo-class probabilities); "sum-prob": the log of the summed softmax probabilities,
        i.e. normalised log-probabilities. Both have the same argmax.
        """
        if pseudo_logits.dim() != 2 or pseudo_logits.shape[1] != self.num_pseudo:
            raise ValueError(
                f"expected (B, {self.num_pseudo}) pseudo-logits, got {tuple(pseudo_logits.shape)}"
            )
        groups = self.groups().to(pseudo_logits.device)
        if method == "logsumexp":
            return torch.logsumexp(pseudo_logits[:, groups], dim=2)
        if method == "sum-prob":
            return torch.logsumexp(torch.log_softmax(pseudo_logits, dim=1)[:, groups], dim=2)
        raise ValueError(f"decode method must be 'logsumexp' or 'sum-prob', got {method!r}")

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Shape and secret fingerprint only (JSON): safe in the data owner's checkpoint."""
        return {
            "version": 1,
            "num_classes": self.num_classes,
            "gamma": self.gamma,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Check that `state` was written by a codebook with this secret and shape (ValueError if not).

        The codebook itself is re-derived from the secret, which is stored apart (`load_secret`).
        """
        if state != self.state_dict():
            raise ValueError(
                "label codebook state does not match: a different secret, number of classes or gamma "
                f"(checkpoint K={state.get('num_classes')}, gamma={state.get('gamma')}; "
                f"here K={self.num_classes}, gamma={self.gamma})"
            )


# -- the data owner's secret, stored apart from everything shared -----------------

_AAD = b"clicooper-label-secret/v1"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


def _kdf(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def save_secret_encrypted(path: str | Path, secret: bytes, passphrase: bytes | None) -> None:
    """Write the secret to `path` (mode 0600, atomically: temp file, then rename).

    With a passphrase: AES-256-GCM under a scrypt-derived key (tampering or a wrong passphrase
    is detected on load). Without: plain hex, protected by the file mode only.
    """
    path = Path(path)
    if not secret:
        raise ValueError("refusing to save an empty secret")
    if passphrase is None:
        doc: dict = {"format": "plain", "secret": bytes(secret).hex()}
    else:
        if not passphrase:
            raise ValueError("the passphrase must not be empty (use None for an unencrypted file)")
        salt, nonce = os.urandom(16), os.urandom(12)
        key = _kdf(passphrase, salt, **_SCRYPT)
        ct = AESGCM(key).encrypt(nonce, bytes(secret), _AAD)
        doc = {
            "format": "aes-256-gcm+scrypt",
            "kdf": {"salt": salt.hex(), **_SCRYPT},
            "nonce": nonce.hex(),
            "ciphertext": ct.hex(),
        }
    atomic_write_bytes(path, (json.dumps(doc) + "\n").encode(), mode=0o600)


def load_secret(path: str | Path, passphrase: bytes | None = None) -> bytes:
    """Read a secret written by `save_secret_encrypted`; ValueError on a wrong passphrase or tampering."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        fmt = doc["format"]
        if fmt == "plain":
            return bytes.fromhex(doc["secret"])
        if fmt != "aes-256-gcm+scrypt":
            raise ValueError(f"{path}: unknown secret file format {fmt!r}")
        kdf = doc["kdf"]
        salt, n, r, p = bytes.fromhex(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        nonce, ct = bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["ciphertext"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a valid secret file ({type(e).__name__}: {e})") from None
    if passphrase is None:
        raise ValueError(f"{path} is encrypted: a passphrase is needed")
    if not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):  # a tampered file must not exhaust memory
        raise ValueError(f"{path}: implausible scrypt parameters n={n}, r={r}, p={p}")
    try:
        return AESGCM(_kdf(passphrase, salt, n, r, p)).decrypt(nonce, ct, _AAD)
    except InvalidTag:
        raise ValueError(f"{path}: wrong passphrase, or the secret file was tampered with") from None
