"""Atomic party checkpoints: safetensors for tensors, JSON for everything else.

Each save writes temporary files and renames them into place, so a crash or a
rejected message mid-save never damages a checkpoint already on disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


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
    """Save `prefix.safetensors` then `prefix.json`; the JSON is written last and marks completeness."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=prefix.parent, prefix=f".{prefix.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, prefix.with_suffix(".safetensors"))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(prefix.with_suffix(".json"), meta)


def load_state(prefix: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta_path, tensor_path = prefix.with_suffix(".json"), prefix.with_suffix(".safetensors")
    if not meta_path.exists() or not tensor_path.exists():
        raise FileNotFoundError(f"no complete checkpoint at {prefix} (.json and .safetensors)")
    return load_file(str(tensor_path)), json.loads(meta_path.read_text())


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
    optimizer.load_state_dict({"state": state, "param_groups": om["param_groups"]})


def rng_state() -> torch.Tensor:
    return torch.get_rng_state()


def latest_round(party_dir: Path) -> int | None:
    """The highest round with a complete checkpoint in a party's folder, if any."""
    rounds = [
        int(p.stem.split("_")[1])
        for p in party_dir.glob("round_*.json")
        if p.with_suffix(".safetensors").exists()
    ]
    return max(rounds) if rounds else None


def round_prefix(party_dir: Path, rnd: int) -> Path:
    return party_dir / f"round_{rnd:04d}"
