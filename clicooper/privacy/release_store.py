"""The data owner's saved one-shot release: what trainers were sent, kept so a resume resends it.

Resending the very same noised activations gives trainers nothing new; drawing fresh noise
would be a second release of every sample. The release is an ordinary checkpoint
(`checkpoint.save_state`: atomic, mode 0600 from its temporary file, SHA-256 of the tensors in its
JSON) in the data owner's private folder, so a damaged file is refused, not reused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clicooper.checkpoint import CheckpointError, load_state, save_state

RELEASE_FILE = "one_shot_release.safetensors"


class ReleaseStoreError(RuntimeError):
    """The saved release is missing, damaged or of the wrong shape."""


def save_release(path: Path, released: torch.Tensor) -> None:
    save_state(path.with_suffix(""), {"release": released}, {})


def load_release(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """The saved release, checked against its SHA-256 and the expected shape."""
    try:
        tensors, _ = load_state(path.with_suffix(""))
    except CheckpointError as e:
        raise ReleaseStoreError(f"saved release {path} is unusable: {e}") from None
    t = tensors.get("release")
    if t is None or tuple(t.shape) != tuple(shape):
        got = None if t is None else tuple(t.shape)
        raise ReleaseStoreError(f"saved release {path} has shape {got}, expected {tuple(shape)}")
    return t
