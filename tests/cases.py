"""Tiny problems shared by the tests: small enough to form dense Hessians and Jacobians in float64.

Each case builds a model and data from a seed; ``make_case(name)`` returns (model, x, y) in
float64. Tests of one module may add their own cases; add here what several modules need.
"""

from __future__ import annotations

import torch
from torch import nn

CASE_NAMES = ("mlp_tanh", "mlp_relu", "cnn", "cnn_bn")


def _mlp(act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)
    )


def _cnn(bn: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(2, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.Softplus(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)]
    return nn.Sequential(*layers)


def randomize_batchnorm(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> None:
    """Give ``bn`` non-trivial running statistics and affine parameters, drawn from ``g``."""
    bn.running_mean.uniform_(-0.5, 0.5, generator=g)
    bn.running_var.uniform_(0.5, 2.0, generator=g)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.5, 0.5, generator=g)


class TiedLM(nn.Module):
    """Token ids (N, T) -> logits (N, T, vocab): an embedding, a tanh layer, a causal mix of
    positions and the embedding reused as the head (tied weights)."""

    def __init__(self, vocab: int = 6, width: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(self.emb(x)))
        h = h + torch.cumsum(h, dim=1) / 3
        return nn.functional.linear(h, self.emb.weight)


def make_case(
    name: str, n: int = 12, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 model in eval mode, inputs (n, ...) and int64 labels (n,) for ``name``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp_tanh":
        model, shape = _mlp(nn.Tanh), (6,)
    elif name == "mlp_relu":
        model, shape = _mlp(nn.ReLU), (6,)
    elif name == "cnn":
        model, shape = _cnn(bn=False), (2, 4, 4)
    elif name == "cnn_bn":
        model, shape = _cnn(bn=True), (2, 4, 4)
    else:
        raise KeyError(name)
    model = model.double()
    if name == "cnn_bn":
        randomize_batchnorm(model[1], g)
    model.eval()
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


TANH_MLP_FACTORY = """
from torch import nn
def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
"""
"""A ``nets.py`` source whose ``make()`` builds a tiny tanh MLP for 6 inputs and 3 classes."""


def write_cli_problem(folder, n: int, factory: str = TANH_MLP_FACTORY, seed: int = 0) -> dict:
    """Write what a CLI test needs into ``folder``: ``nets.py`` and ``data.safetensors``.

    ``data.safetensors`` holds ``x`` (n, 6) float64 and ``y`` (n,) in 0..2, drawn from ``seed``.
    Returns the namespace of the executed factory source (its builders by name).
    """
    from safetensors.torch import save_file

    (folder / "nets.py").write_text(factory)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    save_file({"x": x, "y": y}, str(folder / "data.safetensors"))
    namespace: dict = {}
    exec(factory, namespace)
    return namespace
