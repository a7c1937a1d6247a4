"""Tiny models and data for the landscape tests of the losses token-ce, mse and bce.

:class:`TinyGPT` is a causal transformer language model (token and position embeddings, one
causal self-attention through ``F.scaled_dot_product_attention``, LayerNorm, a Linear head over
the vocabulary). Its targets have -100 (not counted) positions, and its sequences count different
numbers of positions (one none at all), so the sample loss (the mean over ALL counted positions)
differs from the mean of the per-sequence means. ``SOURCE`` is the same model as a ``nets.py``
for the CLI tests.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

F64 = torch.float64
VOCAB = 6
T = 5
N = 7
COUNTED = (5, 3, 0, 1, 4, 5, 2)
"""Counted positions (targets != -100) of the seven sequences."""

SOURCE = '''
import torch
from torch import nn
from torch.nn import functional as F


class TinyGPT(nn.Module):
    """Causal self-attention language model: (N, T) token ids -> (N, T, vocab) logits."""

    def __init__(self, vocab=6, width=4, heads=2, block=5):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        b, t = idx.shape
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        c = h.shape[-1]
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return self.head(torch.tanh(self.norm(h)))


def make():
    return TinyGPT()
'''

_NAMESPACE: dict = {}
exec(SOURCE, _NAMESPACE)
TinyGPT = _NAMESPACE["TinyGPT"]


class OneHotLM(nn.Module):
    """Integer tokens one-hot encoded inside the model, then Linear, tanh, Linear: its input
    layer is a ``Linear`` on floats the model makes itself, so the slice factors it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(VOCAB, 4)
        self.out = nn.Linear(4, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        onehot = nn.functional.one_hot(idx, VOCAB).to(self.inp.weight.dtype)
        return self.out(torch.tanh(self.inp(onehot)))


def token_data(seed: int = 1) -> tuple[Tensor, Tensor]:
    """(x, y): N sequences of T token ids and their targets, -100 where not counted."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (N, T), generator=g)
    y = torch.randint(0, VOCAB, (N, T), generator=g)
    for n, counted in enumerate(COUNTED):
        y[n, counted:] = -100
    y[1] = y[1].roll(1)  # an ignored position before counted ones, not only at the end
    return x, y


def token_problem(kind: str = "gpt") -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 eval-mode token model (``gpt``: :class:`TinyGPT`; ``onehot``: :class:`OneHotLM`)
    and :func:`token_data`."""
    torch.manual_seed(0)
    model = (TinyGPT() if kind == "gpt" else OneHotLM()).to(F64).eval()
    x, y = token_data()
    return model, x, y


def mlp_problem(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 tanh MLP on 9 examples of 3 inputs, with targets for ``kind``:

    ``mse`` (N, 2) float, ``mse-1d`` (N,) float (the model returns (N,)), ``bce`` (N, 2) all 0 or
    1, ``bce-soft`` (N, 2) in [0, 1].
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    out = 1 if kind == "mse-1d" else 2
    layers: list[nn.Module] = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)]
    if kind == "mse-1d":
        layers.append(nn.Flatten(0))  # (N, 1) -> (N,)
    model = nn.Sequential(*layers).to(F64).eval()
    x = torch.randn(9, 3, generator=g, dtype=F64)
    if kind == "mse":
        y = torch.randn(9, 2, generator=g, dtype=F64)
    elif kind == "mse-1d":
        y = torch.randn(9, generator=g, dtype=F64)
    elif kind == "bce":
        y = (torch.rand(9, 2, generator=g, dtype=F64) > 0.5).to(F64)
    else:
        y = torch.rand(9, 2, generator=g, dtype=F64)
    return model, x, y
