"""DP-SGD mechanism for the data owner's head: Poisson-sampled batches, per-sample gradient clipping,
Gaussian noise on the sum of clipped gradients (Abadi et al. 2016). Accounting lives in accounting.py.

Per-sample gradients are computed with `torch.func` (vmap of grad), so the model must treat samples
independently: no BatchNorm (use GroupNorm or no normalisation), no dropout across the batch.

One step, with expected batch size B = q*N, clip norm C and noise multiplier sigma:
    g_i   = grad of loss(x_i, y_i)                     (per sample, all trainable parameters)
    g~_i  = g_i * min(1, C / ||g_i||)                  (||g~_i|| <= C: each sample's contribution)
    g     = (sum_{i in batch} g~_i + N(0, (sigma*C)^2 I)) / B
Replacing one sample moves the noisy sum by at most 2C (replace-one): see accounting.py for how
this is composed with the activation release.

Randomness: the batch sampling and the noise come from `secure_generator()`, a torch.Generator
seeded from 63 bits of OS entropy (`secrets`), held only in memory: never derived from the job
seed, never written anywhere. (The sampling must be secret too: amplification by subsampling
assumes the adversary does not learn which samples a step used.)
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from OS entropy (`secrets.randbits`); the seed is not kept anywhere.

    The single place DP-SGD draws its randomness from, so it can be pointed at the project's
    common secure noise source once there is one.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _check(clip: float, noise_multiplier: float, sampling_rate: float) -> None:
    if not clip > 0 or math.isinf(clip):
        raise ValueError(f"gradient clip norm must be positive and finite, got {clip}")
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must lie in (0, 1], got {sampling_rate}")


def _reject_batch_coupling(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"DP-SGD needs per-sample gradients; {type(m).__name__} mixes samples (use GroupNorm)"
            )


def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{name: (B, *param.shape)}: the gradient of each sample's own loss, for trainable parameters."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)


def clip_grads(grads: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each sample's whole gradient (all parameters together) to L2 norm <= clip.

    Returns the clipped per-sample gradients and the per-sample norms before clipping.
    """
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    scale = torch.clamp(clip / (norms + 1e-6), max=1.0)
    shaped = {k: g * scale.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}
    return shaped, norms


def noisy_clipped_sum(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
    chunk: int = 512,
) -> dict[str, torch.Tensor]:
    """sum_i clip(g_i) + N(0, (noise_multiplier*clip)^2 I), per trainable parameter (not averaged)."""
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(0, len(x), chunk):
        clipped, _ = clip_grads(per_sample_grads(model, loss_fn, x[i : i + chunk], y[i : i + chunk]), clip)
        for k, g in clipped.items():
            total[k] += g.sum(0)
    if noise_multiplier > 0:
        std = noise_multiplier * clip
        for v in total.values():
            v += torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device) * std
    return total


def poisson_batches(n: int, sampling_rate: float, steps: int, generator: torch.Generator):
    """`steps` index tensors, each sample in each independently with probability `sampling_rate`."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator) < sampling_rate).flatten()


@dataclass(frozen=True)
class DpSgdPlan:
    """What the accountant needs to know about a DP-SGD run (and what the trainer needs to do)."""

    noise_multiplier: float
    clip: float
    sampling_rate: float
    steps: int

    @classmethod
    def for_epochs(cls, n: int, batch_size: int, epochs: int, noise_multiplier: float, clip: float):
        """Expected batch size `batch_size` (q = batch_size/n), epochs*n/batch_size steps (rounded up)."""
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch size must lie in [1, n={n}], got {batch_size}")
        q = batch_size / n
        return cls(float(noise_multiplier), float(clip), q, max(1, math.ceil(epochs / q)))


def dp_sgd_train(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: DpSgdPlan,
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> int:
    """Run `plan.steps` DP-SGD steps on `model` (all its trainable parameters); return steps taken.

    Each step's gradient is the noisy clipped sum divided by the *expected* batch size q*n (so the
    normalisation reveals nothing about the sampled batch's size). An empty batch still takes a
    step on pure noise, as the analysis assumes.
    """
    _check(plan.clip, plan.noise_multiplier, plan.sampling_rate)
    _reject_batch_coupling(model)
    gen = generator if generator is not None else secure_generator()
    expected = plan.sampling_rate * len(x)
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    model.train()
    for step, ids in enumerate(poisson_batches(len(x), plan.sampling_rate, plan.steps, gen)):
        total = noisy_clipped_sum(
            model,
            loss_fn,
            x[ids],
            y[ids],
            clip=plan.clip,
            noise_multiplier=plan.noise_multiplier,
            generator=gen,
        )
        for k, p in params.items():
            p.grad = total[k] / expected
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, plan.steps)
    return plan.steps
