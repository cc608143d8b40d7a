"""Atomic party checkpoints: safetensors for tensors, JSON for everything else.

Each save writes temporary files and renames them into place, so a crash or a
rejected message mid-save never damages a checkpoint already on disk. The JSON
records the SHA-256 of the tensor file; `load_state` checks it and raises
`CheckpointError` (never a parser's own exception) for a damaged, truncated or
mismatched checkpoint, so a resume can fall back to an intact round.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

TENSORS_SHA256 = "tensors_sha256"
MAX_CHECKPOINT_JSON_BYTES = 64 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not match its recorded SHA-256."""


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def save_state(prefix: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save `prefix.safetensors` then `prefix.json` (with the tensor file's SHA-256); the JSON is
    written last and marks completeness."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=prefix.parent, prefix=f".{prefix.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, prefix.with_suffix(".safetensors"))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(prefix.with_suffix(".json"), {**meta, TENSORS_SHA256: digest})


def load_state(prefix: Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint after checking the tensor file against the SHA-256 its JSON records
    (`verify=False`: a reader with its own, stronger check, such as the verifier's signed digest)."""
    meta_path, tensor_path = prefix.with_suffix(".json"), prefix.with_suffix(".safetensors")
    if not meta_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"no complete checkpoint at {prefix} (.json and .safetensors)")
    try:
        if meta_path.stat().st_size > MAX_CHECKPOINT_JSON_BYTES:
            raise CheckpointError(f"{meta_path} is implausibly large")
        meta = json.loads(meta_path.read_bytes())
        raw = tensor_path.read_bytes()
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, huge integers
        raise CheckpointError(f"{meta_path} is damaged: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get(TENSORS_SHA256), str):
        raise CheckpointError(f"{meta_path} records no SHA-256 of its tensors")
    if hashlib.sha256(raw).hexdigest() != meta.pop(TENSORS_SHA256) and verify:
        raise CheckpointError(f"{tensor_path} does not match the SHA-256 recorded in {meta_path.name}")
    try:
        tensors = load_safetensors(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        raise CheckpointError(f"{tensor_path} is not a valid safetensors file: {e}") from None
    return tensors, meta


def module_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer | None, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten a module's and its optimiser's state into tensors + JSON metadata."""
    tensors = {f"{prefix}model.{k}": v for k, v in module.state_dict().items()}
    meta: dict[str, Any] = {}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for name, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"{prefix}optim.{idx}.{name}"] = val
                else:
                    scalars.setdefault(str(idx), {})[name] = val
        meta[f"{prefix}optim"] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def load_module_optimizer_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    prefix: str = "",
) -> None:
    mp = f"{prefix}model."
    module.load_state_dict({k[len(mp) :]: v for k, v in tensors.items() if k.startswith(mp)})
    if optimizer is None:
        return
    om = meta[f"{prefix}optim"]
    state: dict[int, dict[str, Any]] = {}
    op = f"{prefix}optim."
    for k, v in tensors.items():
        if k.startswith(op):
            idx, name = k[len(op) :].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in om["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    live = [{k: g[k] for k in _IMPLEMENTATION if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": om["param_groups"]})
    for group, kept in zip(optimizer.param_groups, live, strict=True):
        group.update(kept)


# How an optimiser computes its step, not what it computes: kept as this process built it when a
# checkpoint is loaded (a checkpoint written unfused, or by a torch without fused CPU kernels, would
# otherwise switch a fused optimiser off, or on where it cannot run).
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def rng_state() -> torch.Tensor:
    return torch.get_rng_state()


def saved_rounds(party_dir: Path) -> list[int]:
    """Rounds with both checkpoint files in a party's folder (intact or not), newest first."""
    rounds = []
    for p in party_dir.glob("round_*.json"):
        tail = p.stem.split("_", 1)[1]
        if tail.isdigit() and p.with_suffix(".safetensors").exists():
            rounds.append(int(tail))
    return sorted(rounds, reverse=True)


def latest_round(party_dir: Path) -> int | None:
    """The highest round with a complete checkpoint in a party's folder, if any."""
    rounds = saved_rounds(party_dir)
    return rounds[0] if rounds else None


def round_prefix(party_dir: Path, rnd: int) -> Path:
    return party_dir / f"round_{rnd:04d}"
