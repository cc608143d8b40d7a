"""Python API example: a custom model on tabular data (scikit-learn's breast-cancer set).

A user-defined `nn.Sequential` of blocks is cut across a data owner and two trainers of
unequal capacity, trained through the in-process chain, and compared with centralized
training of the same model. Run: `python examples/tabular_custom_model.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from clicooper.config import parse_config
from clicooper.data import load_dataset
from clicooper.job import ChainJob, train_centralized


def custom_model(n_features: int, n_classes: int) -> nn.Sequential:
    """Blocks are the units a cut may fall between."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(n_features, 16), nn.ReLU()),  # data owner's small head
        nn.Sequential(nn.Linear(16, 64), nn.ReLU()),
        nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
        nn.Sequential(nn.Linear(64, n_classes)),
    )


def main() -> None:
    data = load_dataset("breast-cancer")
    cfg = parse_config(
        {
            "job": {"name": "tabular", "seed": 1},
            "model": {"n_trainers": 2, "cut_points": [1, 3]},
            "training": {"epochs": 20, "batch_size": 32, "optimizer": "adam", "lr": 1e-3},
        }
    )
    torch.manual_seed(cfg.job.seed)
    model = custom_model(data.input_shape[0], data.num_classes)
    job = ChainJob(cfg, data, None, model=model)
    chain = job.run()
    central, _ = train_centralized(cfg, data, model=model)
    print(f"chain of {len(job.trainers)} trainers: test accuracy {chain.test_accuracy:.4f}")
    print(f"centralized, same model and seed:   test accuracy {central.test_accuracy:.4f}")
    print(f"bytes per step and hop: {chain.bytes_per_step}")


if __name__ == "__main__":
    main()
