"""Input shapes and small helpers shared by the model-zoo tests."""

from __future__ import annotations

import torch

# Models whose architecture cannot take a 28x28 input (five 2x2 poolings): MNIST is padded to 32.
NEEDS_32 = {"vgg11"}


def mnist_shape(name: str) -> tuple[int, int, int]:
    """One MNIST-like example for ``name``: 1x28x28, or 1x32x32 where the model needs 32."""
    return (1, 32, 32) if name in NEEDS_32 else (1, 28, 28)


CIFAR_SHAPE = (3, 32, 32)

# Models whose input size is fixed by the architecture (flattening heads).
FIXED_SIZE = {"lenet5", "lenet5-bn", "mlp"}


def small_shape(name: str) -> tuple[int, int, int]:
    """The smallest cheap 1-channel input ``name`` takes: 8x8 for the size-agnostic models."""
    return mnist_shape(name) if name in FIXED_SIZE | NEEDS_32 else (1, 8, 8)


def batch(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> torch.Tensor:
    """``n`` seeded standard-normal inputs of ``shape``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
