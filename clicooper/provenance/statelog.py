"""The verifier's signed, append-only state log.

Everything the verifier learns or decides during a job is one entry of a hash-linked list,
each entry signed with the verifier's Ed25519 key:

- `genesis`: the job, the roster (trainer names in chain order), the watermark spec, the
  planned number of rounds and the verifier's public key;
- `register`: one trainer's public identity, position and escrowed watermark key;
- `nonce`: a round's nonce, which is the SHA-256 of the verifier's signature over
  (job, round, fresh random seed); trainers sign records that contain it, so a log
  re-signed with another key cannot reproduce the nonces the trainers signed;
- `record`: a stage record the verifier accepted, with its transcript attestations;
- `plan`: a new planned number of rounds (a resumed job that was given more epochs);
- `rewind`: rounds >= r are dropped (a resumed job re-runs them under fresh nonces).

Each entry carries its sequence number and the SHA-256 of the previous entry, so an entry
cannot be removed, reordered or edited without the verifier's private key; the genesis
entry's planned round count and roster make a truncated log (a round or trainer dropped from
the end) incomplete rather than valid. `read_log` checks all of it and raises `LogError`
naming the first entry that fails.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from clicooper.checkpoint import atomic_write_bytes
from clicooper.provenance.identity import Identity, fingerprint_of, verify_signature
from clicooper.provenance.records import canonical_json

_ENTRY_DOMAIN = b"clicooper/verifier-log/v1\0"
_NONCE_DOMAIN = b"clicooper/verifier-nonce/v1\0"
GENESIS_PREV = "0" * 64
ENTRY_TYPES = ("genesis", "register", "nonce", "record", "plan", "rewind")
MAX_LOG_BYTES = 256 * 1024 * 1024


class LogError(ValueError):
    """The verifier's log is missing, unreadable, unsigned or altered; the message says where."""


def _signed_bytes(seq: int, prev: str, kind: str, body: Any) -> bytes:
    return _ENTRY_DOMAIN + canonical_json({"seq": seq, "prev": prev, "type": kind, "body": body})


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical_json(entry)).hexdigest()


def signed_nonce(identity: Identity, job_id: str, rnd: int) -> dict:
    """A fresh round nonce bound to the verifier's key: nonce = SHA-256(signature over a random seed)."""
    seed = secrets.token_bytes(16)
    sig = identity.sign(_NONCE_DOMAIN + canonical_json({"job_id": job_id, "round": rnd, "seed": seed.hex()}))
    return {
        "round": rnd,
        "seed": seed.hex(),
        "signature": sig.hex(),
        "nonce": hashlib.sha256(sig).hexdigest(),
    }


def check_nonce(public_key: bytes, job_id: str, body: dict) -> bool:
    """The nonce entry's signature is the verifier's, and the nonce is derived from it."""
    try:
        sig = bytes.fromhex(body["signature"])
        msg = _NONCE_DOMAIN + canonical_json({"job_id": job_id, "round": body["round"], "seed": body["seed"]})
    except (KeyError, TypeError, ValueError):
        return False
    return verify_signature(public_key, sig, msg) and hashlib.sha256(sig).hexdigest() == body.get("nonce")


class StateLog:
    """An in-memory log that its owner appends to; `save` writes it atomically as JSON lines."""

    def __init__(self, identity: Identity, entries: list[dict] | None = None) -> None:
        self.identity = identity
        self.entries: list[dict] = list(entries or [])

    def append(self, kind: str, body: Any) -> dict:
        if kind not in ENTRY_TYPES:
            raise ValueError(f"unknown log entry type {kind!r}")
        seq = len(self.entries)
        prev = entry_hash(self.entries[-1]) if self.entries else GENESIS_PREV
        sig = self.identity.sign(_signed_bytes(seq, prev, kind, body)).hex()
        entry = {"seq": seq, "prev": prev, "type": kind, "body": body, "sig": sig}
        self.entries.append(entry)
        return entry

    def save(self, path: Path) -> None:
        data = "".join(canonical_json(e).decode() + "\n" for e in self.entries)
        atomic_write_bytes(path, data.encode(), mode=0o600)  # escrowed keys inside: private


def read_log(path: Path, public_key: bytes | None = None) -> list[dict]:
    """Parse and check a log: every entry signed by the genesis key, hash-linked, in sequence.

    With `public_key`, the genesis key must also be that key (the verifier's pinned key)."""
    if not path.is_file():
        raise LogError(f"{path} not found: was the job run with watermarking enabled?")
    try:
        if path.stat().st_size > MAX_LOG_BYTES:
            raise LogError(f"{path} is larger than {MAX_LOG_BYTES} bytes")
        lines = path.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"{path} cannot be read: {e}") from None
    entries: list[dict] = []
    key: bytes | None = None
    prev = GENESIS_PREV
    for i, line in enumerate(lines):
        where = f"verifier log entry {i}"
        try:
            e = json.loads(line)
        except (ValueError, RecursionError):  # ValueError: bad JSON, or an integer of 4,300+ digits
            raise LogError(f"{where} is not valid JSON") from None
        if not isinstance(e, dict) or set(e) != {"seq", "prev", "type", "body", "sig"}:
            raise LogError(f"{where} is malformed")
        if e["seq"] != i or e["type"] not in ENTRY_TYPES:
            raise LogError(f"{where} has sequence number {e['seq']!r} (entries removed or reordered)")
        if e["prev"] != prev:
            raise LogError(f"{where} does not link to the entry before it (entries removed or altered)")
        if i == 0:
            if e["type"] != "genesis" or not isinstance(e["body"], dict):
                raise LogError("the verifier log does not start with its signed genesis entry")
            try:
                key = bytes.fromhex(e["body"]["verifier_public_key"])
            except (KeyError, TypeError, ValueError):
                raise LogError("the genesis entry names no verifier key") from None
            if public_key is not None and key != bytes(public_key):
                raise LogError(
                    f"the log was signed by key {fingerprint_of(key)[:16]}..., not by the verifier's key "
                    f"{fingerprint_of(public_key)[:16]}... (verifier key replaced)"
                )
        elif e["type"] == "genesis":
            raise LogError(f"{where} is a second genesis entry")
        try:
            sig = bytes.fromhex(e["sig"])
            ok = verify_signature(key, sig, _signed_bytes(e["seq"], e["prev"], e["type"], e["body"]))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise LogError(f"{where} ({e['type']}) has no valid verifier signature (altered or forged)")
        entries.append(e)
        prev = entry_hash(e)
    if not entries:
        raise LogError(f"{path} is empty")
    return entries
