"""Input shapes and small helpers shared by the model-zoo tests."""

from __future__ import annotations

import torch

import model_zoo

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


def is_language_model(name: str) -> bool:
    """Whether the zoo model ``name`` takes token ids (N, T) rather than images: its builder has
    no ``in_channels`` (the GPTs)."""
    return "in_channels" not in model_zoo.model_kwargs(name)


LANGUAGE_MODELS = [n for n in model_zoo.list_models() if is_language_model(n)]
IMAGE_MODELS = [n for n in model_zoo.list_models() if not is_language_model(n)]


def tokens(n: int = 2, t: int = 8, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """``n`` seeded sequences of ``t`` token ids below ``vocab``, int64 (n, t)."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
