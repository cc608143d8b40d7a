"""The data owner's saved one-shot release: what trainers were sent, kept so a resume resends it.

Resending the very same noised activations gives trainers nothing new; drawing fresh noise
would be a second release of every sample. The file lives in the data owner's private folder
(mode 0600) and carries the SHA-256 of its tensor, so a damaged file is refused, not reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clicooper.checkpoint import atomic_write_bytes

RELEASE_FILE = "one_shot_release.safetensors"


class ReleaseStoreError(RuntimeError):
    """The saved release is missing, damaged or of the wrong shape."""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def save_release(path: Path, released: torch.Tensor) -> None:
    t = released.detach().contiguous().cpu()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"release": t}, str(tmp), metadata={"sha256": _digest(t)})
    atomic_write_bytes(path, tmp.read_bytes(), mode=0o600)
    tmp.unlink(missing_ok=True)


def load_release(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """The saved release, checked against its digest and the expected shape."""
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("sha256")
        t = load_file(str(path))["release"]
    except (SafetensorError, OSError, KeyError) as e:
        raise ReleaseStoreError(f"saved release {path} is unreadable: {e}") from None
    if tuple(t.shape) != tuple(shape):
        raise ReleaseStoreError(f"saved release {path} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if digest != _digest(t):
        raise ReleaseStoreError(f"saved release {path} does not match its SHA-256: the file is damaged")
    return t
