"""Gauss-Newton-type operators: the GGN and the Fisher, ``1/N sum_n J_n^T M_n J_n``.

Both are :class:`~flatcli.curvature.operators.CurvatureOperator` subclasses whose chunk
contribution is ``sum_n J_n^T (M_n (J_n V))`` over the chunk's examples, with ``M_n`` the head
matrix of the kind (the base class adds the chunks and divides by N):

- :class:`GGNOperator`: ``M_n`` = the Hessian of the loss head wrt the logits (for softmax
  cross-entropy diag(p) - p p^T, Wu et al. 2020, Eq. 18), applied by an HVP of the head alone.
- :class:`FisherOperator`: ``M_n = E_{c ~ p(.|x_n)} r_c r_c^T`` with ``r_c = d loss(z_n, c)/dz``,
  in closed form (``fisher_type="exact"``) or over labels sampled once from the model
  (``"mc"``).

Build them with ``flatcli.curvature.operators.make_operator("ggn" | "fisher", ...)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from flatcli import distributed
from flatcli.curvature._autodiff import (
    FALLBACK_ERRORS,
    backward_products,
    column,
    num_columns,
    stack_columns,
)
from flatcli.curvature._functional import is_oom
from flatcli.curvature.data import Chunk
from flatcli.curvature.operators import CurvatureOperator, FisherType, Params
from flatcli.errors import UsageError

__all__ = ["GGNOperator", "FisherOperator", "sample_labels", "counter_uniforms"]


class GGNOperator(CurvatureOperator):
    """``G = 1/N sum_n J_n^T H_n J_n``, H_n the Hessian of the loss head wrt the logits.

    The Hessian minus its residual term ``1/N sum_n sum_k (dloss/dz_k) d^2 z_k / dtheta^2``
    (Wu et al. 2020, Eqs. 12 and 29). ``hvp_method="auto"`` prefers forward-over-reverse.
    """

    kind: ClassVar[str] = "ggn"

    def _chunk_forward(self, chunk: Chunk, cols: Params, names: list[str], batched: bool) -> Params:
        """``J V`` by jvp of the logits, the head matrix, ``J^T`` by a vjp."""

        def f(p: Params) -> Tensor:
            return self._call(p, chunk.x)

        primal = self._subset(names)
        z, vjp_fn = vjp(f, primal)

        def jv(v: Params) -> Tensor:
            return jvp(f, (primal,), (v,))[1]

        k = num_columns(cols)
        if batched:
            JV = vmap(jv)(cols)  # (k, B, K)
        else:
            JV = torch.stack([jv(column(cols, i)) for i in range(k)])
        U = self._head_apply(z.detach(), chunk, JV)  # (k, B, K)
        if batched:
            return vmap(vjp_fn)(U)[0]
        return stack_columns([vjp_fn(U[i])[0] for i in range(k)])

    def _build_graph(self, chunk: Chunk) -> tuple[Any, ...]:
        """Logits z and ``J^T u`` with ``create_graph=True`` (u a zero dummy that requires grad)."""
        leaves = self._fm.leaves()
        inputs = list(leaves.values())
        z = self._fm(leaves, chunk.x)
        u = torch.zeros_like(z, requires_grad=True)
        jtu = torch.autograd.grad(z, inputs, grad_outputs=u, create_graph=True, allow_unused=True)
        return (inputs, z, u, jtu)

    def _chunk_double_backward(
        self, graph: tuple[Any, ...], chunk: Chunk, cols: Params, names: list[str], batched: bool
    ) -> Params:
        """``J v = d/du <J^T u, v>`` (double-vjp trick: reverse mode only), head, then ``J^T``."""
        inputs, z, u, jtu = graph
        idx = [self._index[name] for name in names]
        (JV,) = backward_products([jtu[i] for i in idx], [u], [cols[n] for n in names], batched)
        U = self._head_apply(z.detach(), chunk, JV)
        res = backward_products([z], [inputs[i] for i in idx], [U], batched)
        return dict(zip(names, res, strict=True))

    def _head_apply(self, z: Tensor, chunk: Chunk, U: Tensor) -> Tensor:
        """``M_n u`` for each column u (k, B, K), evaluated in the head dtype."""
        hd = self.head_dtype or z.dtype
        return self._head_matrix(z.to(hd), chunk, U.to(hd)).to(z.dtype)

    def _head_matrix(self, zh: Tensor, chunk: Chunk, Uh: Tensor) -> Tensor:
        """``H_n u``: the Hessian of the loss wrt the logits times each column (k, B, K)."""
        yb = chunk.y

        def total(zz: Tensor) -> Tensor:
            return self._loss(zz, yb).sum()

        gz = grad(total)
        try:
            return vmap(lambda u: jvp(gz, (zh,), (u,))[1])(Uh)
        except FALLBACK_ERRORS as err:  # a loss head without forward AD or batching rules
            if is_oom(err):
                raise
        with torch.enable_grad():
            zz = zh.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(total(zz), zz, create_graph=True)
            return torch.stack(
                [torch.autograd.grad(g, zz, grad_outputs=u, retain_graph=True)[0] for u in Uh]
            )


class FisherOperator(GGNOperator):
    """The Fisher ``1/N sum_n E_{c ~ p(.|x_n)} g_{n,c} g_{n,c}^T`` (exact or Monte-Carlo).

    For softmax cross-entropy the exact Fisher equals the GGN; the MC Fisher (the default) uses
    ``mc_samples`` labels per example drawn once, at construction, with ``seed``.

    Defined for the class losses ``ce`` and ``nsce`` only. ``token-ce``, ``mse`` and ``bce`` are
    REFUSED (UsageError): for ``bce`` and ``token-ce`` (Bernoulli and categorical likelihoods in
    their natural parameters) the exact Fisher equals the GGN, and for ``mse`` the Fisher of the
    unit-variance Gaussian likelihood exp(-||z - y||^2 / 2) has head matrix I, which is D / 2
    times MSELoss's output Hessian 2/D I: D/2 times the GGN. Ask for ``"ggn"``.
    """

    kind: ClassVar[str] = "fisher"

    def _init_kind(self, z: Tensor, fisher_type: str, mc_samples: int) -> None:
        if z.dim() != 2 or self.loss_name in ("token-ce", "mse", "bce"):
            raise UsageError(
                f"kind='fisher' is the Fisher of a predictive distribution over classes (N, K) "
                f"(losses ce, nsce); loss {self.loss_name or 'given'} with outputs "
                f"{tuple(z.shape)} is refused: use kind='ggn' (for bce and token-ce the "
                "exact Fisher equals the GGN; for mse the unit-variance Gaussian Fisher is "
                "D/2 times the GGN)"
            )
        self.fisher_type = fisher_type
        if fisher_type == FisherType.MC:
            if int(mc_samples) < 1:
                raise UsageError(f"mc_samples must be a positive integer. Got {mc_samples}.")
            self.mc_samples = int(mc_samples)
            self.mc_labels = self._sample_labels()
        else:
            self._check_likelihood(self._probabilities(z))

    def _head_matrix(self, zh: Tensor, chunk: Chunk, Uh: Tensor) -> Tensor:
        """``sum_c p_c r_c (r_c . u)`` (exact) or ``1/S sum_s r_s (r_s . u)`` (MC), per column."""
        if self.fisher_type == FisherType.EXACT:
            G, p = self._class_gradients(zh)  # (B, K, K): G[b, c] = dloss(z_b, c)/dz; p (B, K)
            s = torch.einsum("bck,nbk->nbc", G, Uh) * p
            return torch.einsum("bck,nbc->nbk", G, s)
        assert self.mc_labels is not None and self.mc_samples is not None
        R = self._label_gradients(zh, self.mc_labels[chunk.start : chunk.stop])  # (B, S, K)
        s = torch.einsum("bsk,nbk->nbs", R, Uh)
        return torch.einsum("bsk,nbs->nbk", R, s) / self.mc_samples

    def _class_gradients(self, zh: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients wrt z of loss(z_b, c) for every class c (B, K, K), and p(c|x_b) (B, K)."""
        B, K = zh.shape
        with torch.enable_grad():
            zr = zh.detach().repeat_interleave(K, dim=0).requires_grad_(True)
            labels = torch.arange(K, device=zh.device).repeat(B)
            losses = self._loss(zr, labels)
            (g,) = torch.autograd.grad(losses.sum(), zr)
        return g.view(B, K, K), torch.exp(-losses.detach()).view(B, K)

    def _label_gradients(self, zh: Tensor, labels: Tensor) -> Tensor:
        """Gradients wrt z of loss(z_b, c_bs) for the sampled labels (B, S) -> (B, S, K)."""
        B, S = labels.shape
        with torch.enable_grad():
            zr = zh.detach().repeat_interleave(S, dim=0).requires_grad_(True)
            losses = self._loss(zr, labels.reshape(-1).to(zh.device))
            (g,) = torch.autograd.grad(losses.sum(), zr)
        return g.view(B, S, -1)

    def _probabilities(self, z: Tensor) -> Tensor:
        """p(c|x) = exp(-loss(z, c)) for every class, (B, K), in the head dtype."""
        B, K = z.shape
        hd = self.head_dtype or z.dtype
        zr = z.detach().to(hd).repeat_interleave(K, dim=0)
        labels = torch.arange(K, device=z.device).repeat(B)
        return torch.exp(-self._loss(zr, labels)).view(B, K)

    @staticmethod
    def _check_likelihood(p: Tensor) -> None:
        err = float((p.sum(dim=1) - 1).abs().max())
        if not err < 1e-3:
            raise UsageError(
                "kind='fisher' needs a loss that is a negative log-likelihood over the classes "
                f"(exp(-loss(z, c)) summed over c is off 1 by {err:.3g}); use kind='ggn'."
            )

    def _sample_labels(self) -> Tensor:
        """Draw ``mc_samples`` labels per example from the model, once: (N, S).

        Label ``s`` of example ``n`` is a function of ``(seed, n, s)`` and p(.|x_n) only
        (:func:`sample_labels`), so the labels do not depend on the chunking or on how many
        processes share the examples. Data-parallel, each process draws its shard's labels
        and one all-reduce assembles all N rows on every process.
        """
        assert self.mc_samples is not None
        a, b = self.shard
        probs = []
        with torch.no_grad():
            for chunk in self.chunks():
                logits = self._fm(self._fm.params, chunk.x)
                probs.append(self._probabilities(logits).cpu().double())
        if probs:
            p = torch.cat(probs)
            self._check_likelihood(p)
            own = sample_labels(p, self.mc_samples, self.seed, start=a)
        else:
            own = torch.zeros((0, self.mc_samples), dtype=torch.int64)
        if not self.data_parallel:
            return own.to(self.device)
        labels = torch.zeros((self.num_examples, self.mc_samples), dtype=torch.int64)
        labels[a:b] = own
        (labels,) = distributed.all_reduce_sum([labels])
        return labels.to(self.device)


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: Tensor) -> Tensor:
    """The SplitMix64 output function (Steele, Lea & Flood 2014) on int64 tensors, wrapping."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    return z ^ _shift_right(z, 31)


def counter_uniforms(seed: int, index: Tensor, samples: int) -> Tensor:
    """Uniforms in [0, 1) for examples ``index`` (int64, (B,)) and draws ``0..samples-1``: (B, S).

    Counter-based (SplitMix64 of ``(seed, index, s)``, Steele, Lea & Flood 2014): draw ``s`` of
    example ``n`` is the same whatever other examples are drawn with it, in whatever order or
    process.
    """
    key = _splitmix64(torch.tensor([_signed(int(seed))], dtype=torch.int64))
    per_example = _splitmix64(key ^ index.to(torch.int64).reshape(-1, 1))
    draws = torch.arange(int(samples), dtype=torch.int64).reshape(1, -1)
    bits = _splitmix64(per_example + draws)
    return _shift_right(bits, 11).double() * 2.0**-53


def sample_labels(p: Tensor, samples: int, seed: int, *, start: int = 0) -> Tensor:
    """``samples`` labels per row of the class probabilities ``p`` (B, K) by inversion: (B, S).

    Row ``i`` is example ``start + i`` of the global set; its labels depend only on
    ``(seed, start + i)`` and its probabilities (:func:`counter_uniforms`). Classes of
    probability 0 are never drawn.
    """
    p = p.double().cpu()
    cdf = torch.cumsum(p, dim=1)
    cdf = cdf / cdf[:, -1:]
    index = torch.arange(start, start + p.shape[0], dtype=torch.int64)
    u = counter_uniforms(seed, index, samples)
    labels = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    return labels.clamp_(max=p.shape[1] - 1)
