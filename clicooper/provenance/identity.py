"""Party identities: Ed25519 signing keys and their public fingerprints.

Every stage record, transcript attestation and certificate is signed, so a
trainer cannot claim another's work and the verifier's word can be checked by
anyone holding its public key. A fingerprint (hex SHA-256 of the raw 32-byte
public key) names a party in records without carrying the key itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, model_validator

from clicooper.checkpoint import atomic_write_bytes

PUBLIC_KEY_BYTES = 32


def fingerprint_of(public_key: bytes) -> str:
    """Hex SHA-256 of a raw Ed25519 public key: the name a party goes by in records."""
    return hashlib.sha256(public_key).hexdigest()


def verify_signature(public_key: bytes, sig: bytes, data: bytes) -> bool:
    """True iff `sig` is a valid Ed25519 signature of `data` under `public_key`; never raises on bad input."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(sig), bytes(data))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class PublicIdentity(BaseModel):
    """What a party publishes (and the verifier registers): name, raw public key, fingerprint.

    JSON carries the key as hex; the fingerprint is checked against the key on load so a
    registry file cannot pair one name's fingerprint with another's key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="hex", val_json_bytes="hex")

    name: str
    public_key: bytes
    fingerprint: str

    @model_validator(mode="after")
    def _consistent(self) -> PublicIdentity:
        if len(self.public_key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"public key of {self.name!r} has {len(self.public_key)} bytes, expected 32")
        if fingerprint_of(self.public_key) != self.fingerprint:
            raise ValueError(f"fingerprint of {self.name!r} does not match its public key")
        return self

    @classmethod
    def from_key(cls, name: str, public_key: bytes) -> PublicIdentity:
        return cls(name=name, public_key=bytes(public_key), fingerprint=fingerprint_of(public_key))

    def verify(self, sig: bytes, data: bytes) -> bool:
        return verify_signature(self.public_key, sig, data)


class Identity:
    """A party's private Ed25519 key and name. Signing is deterministic (RFC 8032)."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self.name = name
        self._key = private_key

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Identity:
        """A key from 32 seed bytes: reproducible identities for tests and seeded simulations."""
        return cls(name, Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    def public_key_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def fingerprint(self) -> str:
        return fingerprint_of(self.public_key_bytes())

    def public(self) -> PublicIdentity:
        return PublicIdentity.from_key(self.name, self.public_key_bytes())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def save(self, path: str | Path) -> None:
        """Write the private key as PKCS#8 PEM, owner-only (0600), atomically (write then rename)."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write_bytes(Path(path), pem, mode=0o600)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> Identity:
        """Load a PEM private key written by `save`; the name defaults to the file's stem."""
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as e:
            raise ValueError(f"{path} does not hold a PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(name if name is not None else path.stem, key)

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, fingerprint={self.fingerprint()[:16]}...)"
