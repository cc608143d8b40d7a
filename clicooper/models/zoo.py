"""Model zoo. Every model is an `nn.Sequential` of blocks; cut points index blocks.

Blocks are the smallest units a model may be cut between, so a cut never splits a
layer from its activation function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


def small_cnn(input_shape: tuple[int, ...], num_outputs: int, width: int = 16) -> nn.Sequential:
    """A compact CNN for 28x28 (or any HxW) greyscale images; block 0 is a cheap head."""
    c, h, w = input_shape
    flat = 4 * width * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU()),
        nn.Sequential(nn.Linear(128, num_outputs)),
    )


class L2Normalize(nn.Module):
    """Scale each sample (flattened) to unit L2 norm.

    Ending the data owner's head with it makes every release use the whole clipping budget C
    (clipping to C >= 1 is then a no-op): the signal is as large as the sensitivity allows.
    """

    def forward(self, x):  # noqa: D102
        flat = x.flatten(1)
        return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(x.shape)


READOUT_INIT_STD = 0.02


def small_cnn_dp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    width: int = 32,
    embed: int = 16,
    hidden: int = 128,
    readout_bias: bool = True,
) -> nn.Sequential:
    """A small CNN for activation DP: the head releases a unit-norm `embed`-number embedding, and
    the trainers' segments are linear maps.

    Why (measured in EXPERIMENTS.md, "learning from the release"): noise of per-coordinate std
    sigma*C buries a signal of norm C ever deeper as the release grows, so the head releases 16
    numbers, not a feature map. Trainers learn from releases whose norm is about sigma*C*sqrt(d)
    (~16 at epsilon 2) and are used on clean activations of norm C: ReLU layers fit the noise on
    that shell and do not carry over to the clean ball (55-63% on Fashion-MNIST), while linear
    segments extrapolate exactly (86%, the same as a nearest-class-mean read-out). The three
    trainer blocks therefore compose to a (low-rank) affine read-out of the released embedding.
    The first trainer standardises its input with running statistics (a fixed affine map at
    inference, so it extrapolates too): without it the release's large norm makes that trainer's
    weight gradients so noisy that its watermark does not embed.

    Clean inference activations sit within radius C of the centre while the release spreads to
    radius ~sigma*C*sqrt(d), so a small error in the centring moves every clean activation across
    decision boundaries. Hence the standardisation keeps a cumulative average over all training
    batches (`momentum=None`): the default momentum 0.1 tracks the last ~10 batches, whose noisy
    mean is off by about sigma*C/sqrt(batch) per coordinate, and the read-out's test accuracy then
    swung by a point from epoch to epoch (EXPERIMENTS.md, section 11).

    `readout_bias=False` (what the job builds under label DP, `build.arch_options`): a read-out
    trained on releases of norm ~16 and used on clean activations of norm <= 1 sees its weights'
    contribution shrink 16-fold at inference while its biases stay; when the release's class
    signal is weak (label DP shrinks it by the keep rate's margin), the biases' training noise then
    decides every prediction: one class for all test images at label epsilon 2. Without biases the
    read-out (after the centring standardisation) is linear, so its argmax does not depend on the
    input's scale (20,000 images, label epsilon 2: 0.68 instead of 0.27). Without label DP the
    biases are worth about a point (0.827 vs 0.816), so they stay (EXPERIMENTS.md, section 13).
    """
    c, h, w = input_shape
    flat = 2 * width * (h // 4) * (w // 4)
    readout = [
        nn.Linear(embed, hidden, bias=readout_bias),
        nn.Linear(hidden, hidden, bias=readout_bias),
        nn.Linear(hidden, num_outputs, bias=readout_bias),
    ]
    for layer in readout:  # small weights: each round's watermark must move them only a little
        nn.init.normal_(layer.weight, std=READOUT_INIT_STD)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, embed),
            L2Normalize(),
        ),
        nn.Sequential(nn.BatchNorm1d(embed, affine=False, momentum=None), readout[0]),
        nn.Sequential(readout[1]),
        nn.Sequential(readout[2]),
    )


def small_cnn_e2e(
    input_shape: tuple[int, ...], num_outputs: int, embed: int = 16, act: type[nn.Module] = nn.Tanh
) -> nn.Sequential:
    """`small_cnn_dp` with a head made for DP-SGD (end-to-end DP): the Fashion-MNIST CNN of Tramer &
    Boneh (ICLR 2021) - strided 8x8 and 4x4 convolutions, tanh (bounded activations keep clipped
    gradients informative) - ending in the same `embed`-number release. ~17k head parameters, no
    normalisation layer that mixes samples (per-sample gradients need none)."""
    c, h, w = input_shape
    h1, w1 = (h + 6 - 8) // 2 + 1 - 1, (w + 6 - 8) // 2 + 1 - 1  # conv 8/2 pad 3, maxpool 2/1
    h2, w2 = (h1 - 4) // 2 + 1 - 1, (w1 - 4) // 2 + 1 - 1  # conv 4/2, maxpool 2/1
    if h2 < 1 or w2 < 1:
        raise ValueError(f"small-cnn-e2e needs images of at least 16x16, got {h}x{w}")
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(c, 16, 8, stride=2, padding=3),
            act(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            act(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(32 * h2 * w2, embed),
        ),
        nn.Sequential(nn.Linear(embed, 256), nn.ReLU()),
        nn.Sequential(nn.Linear(256, 256), nn.ReLU()),
        nn.Sequential(nn.Linear(256, num_outputs)),
    )


class ResidualBlock(nn.Module):
    """The basic two-convolution residual block of ResNet (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU()

    def forward(self, x):  # noqa: D102
        return self.act(self.body(x) + self.shortcut(x))


def resnet_cifar(input_shape: tuple[int, ...], num_outputs: int, width: int = 32) -> nn.Sequential:
    """A ResNet-style CNN for 32x32 colour images (CIFAR-10/100)."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
        ResidualBlock(width, width),
        ResidualBlock(width, 2 * width, stride=2),
        ResidualBlock(2 * width, 4 * width, stride=2),
        ResidualBlock(4 * width, 8 * width, stride=2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * width, num_outputs)),
    )


def mlp(input_shape: tuple[int, ...], num_outputs: int, hidden: int = 128, depth: int = 3) -> nn.Sequential:
    """An MLP for tabular data (or flattened images); one block per hidden layer."""
    d = math.prod(input_shape)
    blocks: list[nn.Module] = [nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(depth - 1)]
    blocks.append(nn.Sequential(nn.Linear(hidden, num_outputs)))
    return nn.Sequential(*blocks)


ModelFactory = Callable[..., nn.Sequential]  # (input_shape, num_outputs, **options)

MODELS: dict[str, ModelFactory] = {
    "small-cnn": small_cnn,
    "small-cnn-dp": small_cnn_dp,
    "small-cnn-e2e": small_cnn_e2e,
    "resnet-cifar": resnet_cifar,
    "mlp": mlp,
}


def build_model(
    arch: str, input_shape: tuple[int, ...], num_outputs: int, **options: object
) -> nn.Sequential:
    """Build a zoo model by name (`options`: the factory's keyword arguments); the error lists the
    available architectures."""
    try:
        factory = MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown model architecture {arch!r}; available: {sorted(MODELS)}") from None
    return factory(tuple(input_shape), num_outputs, **options)
