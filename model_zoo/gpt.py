"""Small GPT-shaped causal language models: next-token logits (N, T, V) from token ids (N, T).

The architecture of GPT-2 (Radford et al. 2019) at toy sizes, as Karpathy's nanoGPT trains it
on character-level text: token plus learned position embeddings, pre-LayerNorm transformer
blocks (causal multi-head self-attention, then a 4x GELU MLP, each added to the residual
stream), a final LayerNorm and an output head tied to the token embedding (Press & Wolf 2017),
so the logits are ``h @ E^T``. Attention is ``F.scaled_dot_product_attention(is_causal=True)``:
position t attends to positions <= t only, so the logits at t never depend on later tokens.

The default vocabulary, 256, is that of flatcli's byte-level ``text:`` datasets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ._common import check_int, check_prob
from .registry import register_model

__all__ = ["GPTConfig", "GPT", "gpt_tiny", "gpt_small"]


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`GPT`."""

    vocab_size: int = 256  # UTF-8 bytes: any text is tokenised without a tokenizer
    block_size: int = 128  # longest sequence (position embeddings); flatcli's default --seq-len
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64  # residual width; each head has n_embd // n_head dimensions
    dropout: float = 0.0  # 0: training is deterministic, and measures run in eval mode anyway

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(name, getattr(self, name))
        check_prob("dropout", self.dropout)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd must be a multiple of n_head. Got n_embd={self.n_embd}, "
                f"n_head={self.n_head}."
            )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions 0..t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # queries, keys, values at once
        self.out = nn.Linear(config.n_embd, config.n_embd)
        self.out_drop = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        b, t, c = h.shape
        q, k, v = self.qkv(h).split(c, dim=-1)  # 3 x (B, T, C)
        heads = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        a = a.transpose(1, 2).reshape(b, t, c)  # heads side by side again: (B, T, C)
        return self.out_drop(self.out(a))


class FeedForward(nn.Module):
    """The position-wise MLP: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.drop(self.proj(self.act(self.fc(h))))


class Block(nn.Module):
    """A pre-LN transformer block: ``h + attn(ln1(h))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = FeedForward(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class GPT(nn.Module):
    """A causal language model: token ids (N, T) -> next-token logits (N, T, V).

    Parameters: ``tok_emb`` (V, C), ``pos_emb`` (block_size, C), ``blocks.{i}.*``, ``ln_f``. The
    head has no weight of its own: the logits are ``F.linear(h, tok_emb.weight)``, so the tied
    weight is one parameter (and one entry of the state dict).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights and embeddings, zero biases, and the two
        projections that write into the residual stream scaled by 1/sqrt(2 n_layer)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (N, T), integers in [0, V), T <= block_size -> logits (N, T, V)."""
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise ValueError(
                f"gpt expects integer token ids of shape (N, T); got {idx.dtype} of shape "
                f"{tuple(idx.shape)}"
            )
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(
                f"gpt was built for sequences of at most block_size={self.config.block_size} "
                f"tokens; got T={t} (build it with a larger block_size, or a smaller --seq-len)"
            )
        positions = torch.arange(t, device=idx.device)
        h = self.drop(self.tok_emb(idx) + self.pos_emb(positions))  # (N, T, C)
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_f(h), self.tok_emb.weight)  # tied head: (N, T, V)


def _build(
    num_classes: int,
    input_shape: Sequence[int] | None,
    block_size: int | None,
    n_layer: int,
    n_head: int,
    n_embd: int,
    dropout: float,
) -> GPT:
    if block_size is None:
        if input_shape is not None:
            shape = tuple(input_shape)
            if len(shape) != 1:
                raise ValueError(
                    f"gpt takes token sequences: input_shape must be (T,). Got {shape!r}."
                )
            block_size = check_int("input_shape entries", shape[0])
        else:
            block_size = GPTConfig.block_size
    config = GPTConfig(
        vocab_size=num_classes,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
    )
    return GPT(config)


@register_model("gpt-tiny")
def gpt_tiny(
    *,
    num_classes: int = 256,
    input_shape: Sequence[int] | None = None,
    block_size: int | None = None,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    dropout: float = 0.0,
) -> GPT:
    """A 2-layer, 64-wide, 4-head GPT: 124,672 parameters with 256 bytes and 128 positions.

    The architecture of GPT-2 (Radford et al. 2019, "Language Models are Unsupervised
    Multitask Learners") at the size of a character-level toy model: pre-LN blocks with causal
    self-attention and a GELU MLP, a final LayerNorm and a head tied to the token embedding.

    Args:
        num_classes: vocabulary size V (the logits of each position); 256 for UTF-8 bytes.
        input_shape: ``(T,)``, the data's sequence length; sets ``block_size`` when that is
            not given (flatcli fills it from the dataset).
        block_size: the longest sequence (rows of the position embedding). Default: T of
            ``input_shape``, else 128.
        n_layer: transformer blocks.
        n_head: attention heads per block (``n_embd`` must be a multiple of it).
        n_embd: residual width C.
        dropout: dropout after the embeddings, inside attention and after each block's
            projections, in training mode only.
    """
    return _build(num_classes, input_shape, block_size, n_layer, n_head, n_embd, dropout)


@register_model("gpt-small")
def gpt_small(
    *,
    num_classes: int = 256,
    input_shape: Sequence[int] | None = None,
    block_size: int | None = None,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
) -> GPT:
    """A 4-layer, 128-wide, 4-head GPT: 842,496 parameters with 256 bytes and 128 positions.

    :func:`gpt_tiny`'s architecture (GPT-2, Radford et al. 2019) twice as deep and wide.

    Args:
        num_classes: vocabulary size V (the logits of each position); 256 for UTF-8 bytes.
        input_shape: ``(T,)``, the data's sequence length; sets ``block_size`` when that is
            not given (flatcli fills it from the dataset).
        block_size: the longest sequence (rows of the position embedding). Default: T of
            ``input_shape``, else 128.
        n_layer: transformer blocks.
        n_head: attention heads per block (``n_embd`` must be a multiple of it).
        n_embd: residual width C.
        dropout: dropout after the embeddings, inside attention and after each block's
            projections, in training mode only.
    """
    return _build(num_classes, input_shape, block_size, n_layer, n_head, n_embd, dropout)
