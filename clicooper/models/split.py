"""Cut a sequential model into a data-owner head and trainer segments.

Cuts are given by hand (block indices) or computed from the trainers' declared
capacities so that each trainer's share of measured cost (FLOPs or parameters)
follows its capacity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

CostMetric = Literal["flops", "params"]


@dataclass(frozen=True)
class SplitPlan:
    """Block boundaries: segment i holds blocks bounds[i]:bounds[i+1].

    Segment 0 is the data owner's head. With `u_shaped`, the last segment is the
    data owner's tail (its output layer) and the trainers hold the ones between.
    """

    bounds: tuple[int, ...]
    u_shaped: bool = False

    @property
    def n_trainers(self) -> int:
        return len(self.bounds) - 2 - int(self.u_shaped)


def _validate_cuts(cuts: Sequence[int], n_blocks: int) -> None:
    if any(type(c) is not int for c in cuts):
        raise ValueError(f"cut points must be integers, got {list(cuts)}")
    if list(cuts) != sorted(set(cuts)):
        raise ValueError(f"cut points must be strictly increasing, got {list(cuts)}")
    if cuts and (cuts[0] < 1 or cuts[-1] > n_blocks - 1):
        raise ValueError(
            f"cut points must lie in 1..{n_blocks - 1} for a model of {n_blocks} blocks, got {list(cuts)}"
        )


def plan_from_cuts(cuts: Sequence[int], n_blocks: int, *, u_shaped: bool = False) -> SplitPlan:
    """A plan from explicit cut points (block indices where a new segment starts)."""
    _validate_cuts(cuts, n_blocks)
    need = 2 if u_shaped else 1
    if len(cuts) < need:
        raise ValueError(f"need at least {need} cut point(s) for one trainer, got {list(cuts)}")
    return SplitPlan((0, *cuts, n_blocks), u_shaped)


def split_model(model: nn.Sequential, plan: SplitPlan) -> list[nn.Sequential]:
    """Return the segments as `nn.Sequential`s sharing the model's modules (no copy)."""
    blocks = list(model.children())
    if plan.bounds[-1] != len(blocks):
        raise ValueError(f"plan covers {plan.bounds[-1]} blocks but the model has {len(blocks)}")
    return [nn.Sequential(*blocks[a:b]) for a, b in zip(plan.bounds[:-1], plan.bounds[1:], strict=True)]


def block_costs(
    model: nn.Sequential, input_shape: Sequence[int], metric: CostMetric = "flops"
) -> list[float]:
    """Measured cost per block: multiply-accumulates of conv/linear layers for one sample, or parameters."""
    blocks = list(model.children())
    if metric == "params":
        return [float(sum(p.numel() for p in b.parameters())) for b in blocks]
    costs = [0.0] * len(blocks)
    hooks = []

    def make_hook(i: int):
        def hook(mod: nn.Module, inp, out) -> None:
            if isinstance(mod, nn.Conv2d):
                k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
                costs[i] += float(out[0].numel() * k)
            elif isinstance(mod, nn.Linear):
                costs[i] += float(mod.in_features * mod.out_features)
            else:
                costs[i] += float(out[0].numel())  # elementwise ops: one op per output element

        return hook

    for i, b in enumerate(blocks):
        for m in b.modules():
            if not list(m.children()):
                hooks.append(m.register_forward_hook(make_hook(i)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return costs


def balanced_cuts(costs: Sequence[float], capacities: Sequence[float], start: int, end: int) -> list[int]:
    """Contiguous partition of blocks[start:end] into len(capacities) parts minimising the
    largest cost/capacity ratio (exact dynamic programme; models have few blocks)."""
    n, m = len(capacities), end - start
    if any(c <= 0 for c in capacities):
        raise ValueError(f"capacities must be positive, got {list(capacities)}")
    if m < n:
        raise ValueError(f"cannot give {n} trainers at least one block each from {m} blocks")
    prefix = [0.0]
    for c in costs[start:end]:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: minimal max ratio using the first j trainers for the first i blocks
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    arg = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for i in range(j, m - (n - j) + 1):
            for k in range(j - 1, i):
                v = max(best[j - 1][k], (prefix[i] - prefix[k]) / capacities[j - 1])
                if v < best[j][i]:
                    best[j][i], arg[j][i] = v, k
    cuts, i = [], m
    for j in range(n, 0, -1):
        cuts.append(i)
        i = arg[j][i]
    return [start + c for c in reversed(cuts)][:-1]


def plan_from_capacities(
    model: nn.Sequential,
    input_shape: Sequence[int],
    capacities: Sequence[float],
    *,
    head_blocks: int = 1,
    metric: CostMetric = "flops",
    u_shaped: bool = False,
) -> SplitPlan:
    """Keep `head_blocks` blocks at the data owner (it is resource-constrained), then cut the
    rest across trainers so that each one's measured cost share follows its capacity."""
    n_blocks = len(list(model.children()))
    tail = 1 if u_shaped else 0
    if head_blocks < 1 or head_blocks + len(capacities) + tail > n_blocks:
        raise ValueError(
            f"a model of {n_blocks} blocks cannot hold a {head_blocks}-block head, "
            f"{len(capacities)} trainer(s){' and a tail' if u_shaped else ''}"
        )
    costs = block_costs(model, input_shape, metric)
    inner = balanced_cuts(costs, capacities, head_blocks, n_blocks - tail)
    cuts = [head_blocks, *inner] + ([n_blocks - 1] if u_shaped else [])
    return plan_from_cuts(cuts, n_blocks, u_shaped=u_shaped)
