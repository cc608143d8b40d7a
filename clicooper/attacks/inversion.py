"""Input reconstruction at the first trainer (He, Zhang & Lee 2019, "Model inversion attacks against
collaborative inference"), as defined in docs/attacks.md.

Two settings of the paper, both aimed at the activation the data owner releases to T1:
- white-box (regularised maximum likelihood, rMLE): the attacker knows the head's architecture and
  weights and searches for the input whose activation matches the released one, with a total-variation
  prior: `argmin_x ||f(x) - a~||^2 + lambda * TV(x)`, x in [0, 1].
- black-box (inverse network): the attacker can only query the head on inputs of its own choosing —
  auxiliary data of the same distribution, disjoint from the private training set — and learns a
  decoder from released activations back to images, then applies it to the private activations.

When the defence is on, the released activation is clipped and noised; the attacker is granted the
defence's parameters (the clipping bound C for white-box; the same noisy query interface for black-box).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

Init = Literal["uniform", "zeros", "mean"]


# --------------------------------------------------------------------------- shared helpers
@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for module initialisation without leaking the seed to the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Evaluate `module` in eval mode with no parameter gradients, restoring its state afterwards."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield
    finally:
        module.train(was_training)
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


def _fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> None:
    """Plain seeded mini-batch Adam training (shared by the decoder and the extraction surrogates)."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    if len(inputs) == 0 or epochs <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(inputs), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(inputs[idx]), targets[idx]).backward()
            opt.step()
    model.eval()


def clip_per_sample(a: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each sample's activation to L2 norm <= `clip`: the defence's clipping, known to the attacker."""
    norms = a.reshape(a.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    scale = (clip / norms).clamp(max=1.0)
    return a * scale.view(-1, *([1] * (a.dim() - 1)))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per sample, sum |dx| + |dy| over channels (the rMLE image prior); shape (N,)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)
    return dh + dw


# --------------------------------------------------------------------------- white-box (rMLE)
def _initial_images(n: int, shape: tuple[int, ...], init: Init, seed: int) -> torch.Tensor:
    if init == "uniform":
        return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))
    if init == "zeros":
        return torch.zeros((n, *shape))
    if init == "mean":  # the attacker knows nothing of the data: a flat mid-grey image
        return torch.full((n, *shape), 0.5)
    raise ValueError(f"init must be 'uniform', 'zeros' or 'mean', got {init!r}")


def whitebox_inversion(
    head: nn.Module,
    target: torch.Tensor,
    input_shape: tuple[int, ...],
    *,
    steps: int = 300,
    lr: float = 0.05,
    tv_weight: float = 0.05,
    clip: float | None = None,
    init: Init = "uniform",
    seed: int = 0,
) -> torch.Tensor:
    """rMLE reconstruction of the inputs behind released activations (He et al. 2019, white-box).

    Attacker knows/holds: the head's architecture and weights (white-box), the released activations
    `target` (N, ...) — clipped and noised if the defence is on — the per-sample input shape
    `input_shape` (e.g. (C, H, W)) and the valid pixel range [0, 1]; if `clip` is given, also the
    defender's clipping bound C, applied to f(x) before the comparison (the stronger attacker). It never
    sees the inputs. Minimises `||clip(f(x)) - target||^2 + tv_weight * TV(x)` per sample with Adam over
    all N at once, projecting x onto [0, 1] after each step. Returns x (N, *input_shape).
    """
    if steps < 0 or lr <= 0 or tv_weight < 0:
        raise ValueError(f"need steps >= 0, lr > 0, tv_weight >= 0; got {steps}, {lr}, {tv_weight}")
    target = target.detach()
    x = _initial_images(target.shape[0], tuple(input_shape), init, seed).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    with _frozen(head):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            a = head(x)
            if clip is not None:
                a = clip_per_sample(a, clip)
            if a.shape != target.shape:
                raise ValueError(f"head output {tuple(a.shape)} does not match target {tuple(target.shape)}")
            fit = (a - target).pow(2).flatten(1).sum(1)
            (fit + tv_weight * total_variation(x)).mean().backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
    return x.detach()


# --------------------------------------------------------------------------- black-box (inverse network)
def _upsampling_decoder(act_shape: tuple[int, ...], img_shape: tuple[int, ...], width: int) -> nn.Module:
    """Spatial activation (C, h, w) -> image (C', H, W): stride-2 transposed convs, then resize."""
    (c, h, w), (ci, hi, wi) = act_shape, img_shape
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
    while h * 2 <= hi and w * 2 <= wi:
        layers += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU()]
        h, w = h * 2, w * 2
    if (h, w) != (hi, wi):
        layers.append(nn.Upsample(size=(hi, wi), mode="bilinear", align_corners=False))
    layers += [
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, ci, 3, padding=1),
        nn.Sigmoid(),
    ]
    return nn.Sequential(*layers)


def default_decoder(act_shape: Sequence[int], img_shape: Sequence[int], *, width: int = 64) -> nn.Module:
    """An inverse network sized from the shapes: convolutional for (C, H, W) activations and images,
    otherwise an MLP; a sigmoid output keeps reconstructions in [0, 1]."""
    act_shape, img_shape = tuple(act_shape), tuple(img_shape)
    if len(act_shape) == 3 and len(img_shape) == 3:
        return _upsampling_decoder(act_shape, img_shape, width)
    d_in, d_out = math.prod(act_shape), math.prod(img_shape)
    hidden = max(4 * width, min(1024, 2 * d_out))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, d_out),
        nn.Sigmoid(),
        nn.Unflatten(1, img_shape),
    )


def _query(
    head_query: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int
) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([head_query(b).detach() for b in x.split(batch_size)])


def train_inverse_decoder(
    head_query: Callable[[torch.Tensor], torch.Tensor],
    aux_x: torch.Tensor,
    *,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    decoder: nn.Module | None = None,
    queries_per_sample: int = 1,
) -> nn.Module:
    """Learn an inverse network activation -> image from black-box queries (He et al. 2019, black-box).

    Attacker knows/holds: query access to the released-activation interface `head_query` (the same one
    the data owner exposes, so with the defence on each answer is clipped and freshly noised), and its
    own auxiliary images `aux_x` (N, *image_shape) in [0, 1] from the training distribution but disjoint
    from the private set. It does not know the head's weights. Each aux image is queried
    `queries_per_sample` times (the query budget; repeated noisy answers help a denoising decoder); the
    decoder is trained with MSE on (answer, image) pairs. Returns the decoder in eval mode.
    """
    if len(aux_x) == 0:
        raise ValueError("the black-box attack needs auxiliary images to query with")
    if queries_per_sample < 1:
        raise ValueError(f"queries_per_sample must be >= 1, got {queries_per_sample}")
    images = aux_x.detach().repeat(queries_per_sample, *([1] * (aux_x.dim() - 1)))
    acts = _query(head_query, images, batch_size)
    with _seeded(seed):
        decoder = decoder if decoder is not None else default_decoder(acts.shape[1:], aux_x.shape[1:])
    _fit(
        decoder,
        list(decoder.parameters()),
        acts,
        images,
        nn.functional.mse_loss,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    return decoder


def blackbox_inversion(decoder: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """Apply a trained inverse network to the released private activations; returns images in [0, 1]."""
    decoder.eval()
    with torch.no_grad():
        return decoder(target.detach()).clamp(0.0, 1.0)
