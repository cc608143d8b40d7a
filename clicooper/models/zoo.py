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


def small_cnn_dp(
    input_shape: tuple[int, ...], num_outputs: int, width: int = 16, embed: int = 16
) -> nn.Sequential:
    """A small CNN whose head ends in a low-dimensional embedding, for activation DP.

    Noise of per-coordinate std sigma*C on a d-dimensional release buries a signal of norm C
    ever deeper as d grows (the error of any class statistic a trainer can learn grows like
    sigma*sqrt(d/n)), so the data owner's head releases `embed` numbers per sample, not a
    feature map. The price: the convolutions stay with the data owner.
    """
    c, h, w = input_shape
    flat = 2 * width * (h // 4) * (w // 4)
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
        ),
        nn.Sequential(nn.Linear(embed, 256), nn.ReLU()),
        nn.Sequential(nn.Linear(256, 256), nn.ReLU()),
        nn.Sequential(nn.Linear(256, num_outputs)),
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


ModelFactory = Callable[[tuple[int, ...], int], nn.Sequential]

MODELS: dict[str, ModelFactory] = {
    "small-cnn": small_cnn,
    "small-cnn-dp": small_cnn_dp,
    "small-cnn-e2e": small_cnn_e2e,
    "resnet-cifar": resnet_cifar,
    "mlp": mlp,
}


def build_model(arch: str, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    """Build a zoo model by name; the error lists the available architectures."""
    try:
        factory = MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown model architecture {arch!r}; available: {sorted(MODELS)}") from None
    return factory(tuple(input_shape), num_outputs)
