"""Secret label expansion: K true classes -> gamma*K pseudo-labels through a secret codebook.

The codebook is a secret permutation of range(gamma*K) derived from the data owner's secret;
class c owns pseudo-labels perm[c*gamma:(c+1)*gamma]. Each sample's pseudo-label within its
group is chosen by a keyed hash of (sample index[, epoch]), so no RNG state needs saving and
a resumed run draws the same labels. Trainers see pseudo-labels only; without the secret they
do not know which pseudo-labels belong to the same class.
"""

from __future__ import annotations

import hashlib
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


def generate_secret() -> bytes:
    return os.urandom(32)


def _prf(secret: bytes, *parts: object) -> int:
    msg = "|".join(map(str, parts)).encode()
    return int.from_bytes(hmac.new(secret, msg, hashlib.sha256).digest()[:8], "big")


class LabelCodebook:
    def __init__(self, perm: torch.Tensor, num_classes: int, gamma: int, secret: bytes) -> None:
        if sorted(perm.tolist()) != list(range(num_classes * gamma)):
            raise ValueError("codebook permutation must cover every pseudo-label exactly once")
        self.perm, self.num_classes, self.gamma, self._secret = perm, num_classes, gamma, secret
        self._decode = torch.empty_like(perm)
        self._decode[perm] = torch.arange(len(perm)) // gamma  # pseudo-label -> class
        self._choice_cache: dict[tuple[str, int], dict[int, int]] = {}

    @classmethod
    def from_secret(cls, secret: bytes, num_classes: int, gamma: int) -> LabelCodebook:
        if gamma < 1 or num_classes < 2:
            raise ValueError("need gamma >= 1 and at least 2 classes")
        gen = torch.Generator().manual_seed(_prf(secret, "codebook", num_classes, gamma) & (2**63 - 1))
        return cls(torch.randperm(num_classes * gamma, generator=gen), num_classes, gamma, secret)

    @property
    def num_pseudo(self) -> int:
        return self.num_classes * self.gamma

    def groups(self) -> torch.Tensor:
        """(K, gamma): the pseudo-labels each class owns."""
        return self.perm.reshape(self.num_classes, self.gamma)

    def _choices(self, ids: torch.Tensor, policy: LabelPolicy, epoch: int) -> torch.Tensor:
        key = (policy, epoch if policy == "per-epoch" else 0)
        cache = self._choice_cache.setdefault(key, {})
        out = []
        for i in ids.tolist():
            if i not in cache:
                cache[i] = (
                    _prf(self._secret, "choice", i, key[1] if policy == "per-epoch" else "fixed") % self.gamma
                )
            out.append(cache[i])
        return torch.tensor(out, dtype=torch.int64)

    def encode(
        self, labels: torch.Tensor, sample_ids: torch.Tensor, *, policy: LabelPolicy = "fixed", epoch: int = 0
    ) -> torch.Tensor:
        """Pseudo-labels for true `labels` of the samples with indices `sample_ids`."""
        if labels.shape != sample_ids.shape:
            raise ValueError("labels and sample_ids must have the same shape")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        if self.gamma == 1:
            return self.perm[labels]
        return self.groups()[labels, self._choices(sample_ids, policy, epoch)]

    def decode_labels(self, pseudo: torch.Tensor) -> torch.Tensor:
        return self._decode[pseudo]

    def decode_logits(
        self, pseudo_logits: torch.Tensor, *, method: Literal["logsumexp", "sum-prob"] = "logsumexp"
    ) -> torch.Tensor:
        """(B, gamma*K) pseudo-logits -> (B, K) class scores by pooling each class's group."""
        grouped = pseudo_logits[:, self.groups()]  # (B, K, gamma)
        if method == "logsumexp":
            return torch.logsumexp(grouped, dim=2)
        probs = torch.softmax(pseudo_logits, dim=1)[:, self.groups()].sum(2)
        return torch.log(probs.clamp_min(1e-30))

    def state_dict(self) -> dict:
        return {"perm": self.perm.tolist(), "num_classes": self.num_classes, "gamma": self.gamma}


# -- the data owner's secret, stored apart from everything shared ------------


def _kdf(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(passphrase)


def save_secret_encrypted(path: str | Path, secret: bytes, passphrase: bytes | None) -> None:
    """AES-GCM under a scrypt key when a passphrase is given, else hex; file mode 0600, atomic."""
    path = Path(path)
    if passphrase is None:
        doc = {"format": "plain", "secret": secret.hex()}
    else:
        salt, nonce = os.urandom(16), os.urandom(12)
        ct = AESGCM(_kdf(passphrase, salt)).encrypt(nonce, secret, b"clicooper-secret")
        doc = {"format": "aes-gcm-scrypt", "salt": salt.hex(), "nonce": nonce.hex(), "ciphertext": ct.hex()}
    atomic_write_bytes(path, json.dumps(doc).encode(), mode=0o600)


def load_secret(path: str | Path, passphrase: bytes | None) -> bytes:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") == "plain":
        return bytes.fromhex(doc["secret"])
    if passphrase is None:
        raise ValueError(f"{path} is encrypted: a passphrase is needed")
    try:
        key = _kdf(passphrase, bytes.fromhex(doc["salt"]))
        return AESGCM(key).decrypt(
            bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["ciphertext"]), b"clicooper-secret"
        )
    except InvalidTag:
        raise ValueError(f"{path}: wrong passphrase or tampered secret file") from None
