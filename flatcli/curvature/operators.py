"""Matrix-free curvature operators of the mean loss: Hessian, generalized Gauss-Newton, Fisher.

Every operator is EXACT for the mean loss over the N examples it was built on,

    L(theta) = 1/N sum_n loss(f(x_n; theta), y_n),

over the flat concatenation of the selected parameters (model order). Products are computed
chunk by chunk (``batch_size`` examples at a time) and summed with weight n_b/N, so the chunking
changes nothing but rounding. With z_n = f(x_n; theta) the logits and J_n = dz_n/dtheta:

- ``"hessian"``: H = d^2 L / dtheta^2, by double backward (``torch.autograd.grad`` with
  ``create_graph=True``) or forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``);
  see ``hvp_method`` below.
- ``"ggn"``: G = 1/N sum_n J_n^T H_n J_n, with H_n = d^2 loss / dz^2 at z_n, the Hessian of the loss
  head with respect to the logits (for softmax cross-entropy diag(p) - p p^T; for the NSCE head
  of normalized-flat-minima.md Eq. 20 something else). Computed as J^T (H_n (J v)): J v by a
  jvp of the logits, H_n (J v) by an HVP of the loss head alone, J^T by a vjp. The Hessian is G
  plus the term sum_n sum_k (dloss/dz_k) d^2 z_k / dtheta^2 (dissecting-hessian-kfac.md
  Eqs. 3, 10-11).
- ``"fisher"``: the Fisher of the model's predictive distribution p(c|x) = exp(-loss(z, c)),
  F = 1/N sum_n E_{c ~ p(.|x_n)} g_{n,c} g_{n,c}^T with g_{n,c} = d loss(z_n, c) / dtheta
  (fisher-gamma-local-minima.md Eq. 1 relates it to the Hessian at a minimum).

  * ``fisher_type="mc"`` (the default): "labels sampled from the model". ``mc_samples`` labels
    per example are drawn ONCE, at construction, from p(.|x_n) with ``seed``, so the operator is
    a fixed symmetric PSD matrix F = 1/(N S) sum_{n,s} g_{n,c_ns} g_{n,c_ns}^T and Lanczos sees a
    consistent operator. Its rank is at most N*S, like the matrix whose log-determinant gamma
    uses; this is why the sampled form is the default.
  * ``fisher_type="exact"``: the expectation over c taken in closed form,
    F = 1/N sum_n J_n^T (sum_c p_c r_c r_c^T) J_n, r_c = dloss(z_n, c)/dz. For softmax
    cross-entropy the head matrix is diag(p) - p p^T, so the exact Fisher EQUALS the GGN there
    (it differs for NSCE and other heads).

``hvp_method`` says how products are formed:

- ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` (Hessian), or a jvp of the
  logits (GGN/Fisher), over ``torch.func.functional_call``. ``matmat`` vmaps over the k columns
  (the primal forward/backward runs once per chunk, the tangents are batched); if vmap fails
  the columns are looped over, recorded in ``matmat_method="loop"``.
- ``"double-backward"``: ``torch.autograd.grad(..., create_graph=True)`` once per chunk, then one
  more backward pass through that graph per column (for the GGN/Fisher, J v comes from the
  double-vjp trick J v = d/du <J^T u, v>). The graph is reused by every column of a ``matmat``
  (``matmat_method="loop"``: measured faster than vmapping the backward) and, when all N examples
  fit in one chunk, by every later product (``cache=True``): a Lanczos run then pays one
  backward pass per product. The cached graph is rebuilt if a parameter changes in place.
- ``"auto"`` (default): the Hessian prefers double backward, the GGN/Fisher forward-over-reverse
  -- the faster of the two in ``benchmarks/bench_hvp.py`` on PyTorch 2.x, where forward-mode AD
  multiplies zero tangents (a matmul or convolution of an input that has no tangent costs a full
  one). The preferred method is tried once on two examples; if it raises (a module without
  forward-mode AD, or an op without double backward) the other is used and ``fallback_reason``
  says why. ``hvp_method`` records the method used.

BatchNorm and Dropout: the operator differentiates the model in whatever mode it is in. Use
:func:`eval_mode` (or ``model.eval()``): in training mode BatchNorm's batch statistics make the
loss depend on the chunking, and Dropout makes every product random. A warning says so.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
>>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
>>> H = make_operator("hessian", model, x, y)
>>> H.dim, H.hvp_method
(26, 'double-backward')
>>> v = torch.randn(H.dim, dtype=torch.float64)
>>> Hv = H.matvec(v)
>>> bool(torch.allclose(H.matvec(v), H.matmat(v[:, None])[:, 0]))
True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from flatcli.curvature._functional import FunctionalModel, first_line, head_loss, is_oom
from flatcli.curvature.losses import cross_entropy, get_loss
from flatcli.curvature.memory import auto_batch_size
from flatcli.curvature.params import (
    flatten_columns,
    param_slices,
    select_parameters,
    unflatten_columns,
)
from flatcli.errors import UsageError

__all__ = [
    "Kind",
    "HvpMethod",
    "FisherType",
    "CurvatureOperator",
    "make_operator",
    "eval_mode",
]


class Kind(str, Enum):
    """Which curvature matrix."""

    HESSIAN = "hessian"
    GGN = "ggn"
    FISHER = "fisher"


class HvpMethod(str, Enum):
    """How curvature-vector products are differentiated."""

    AUTO = "auto"
    FORWARD_OVER_REVERSE = "forward-over-reverse"
    DOUBLE_BACKWARD = "double-backward"


class FisherType(str, Enum):
    """Monte-Carlo (labels sampled from the model) or exact-expectation Fisher."""

    MC = "mc"
    EXACT = "exact"


_FALLBACK_ERRORS = (NotImplementedError, RuntimeError)
_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every module's training flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def _stack(cols: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    if len(cols) == 1:
        return {n: t.unsqueeze(0) for n, t in cols[0].items()}
    return {n: torch.stack([c[n] for c in cols]) for n in cols[0]}


def _column(cols: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    return {n: c[i] for n, c in cols.items()}


def _backward_products(
    outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    batched: bool,
) -> list[Tensor]:
    """``[(k, *input.shape)]``: k vector-Jacobian products of ``outputs`` wrt ``inputs``.

    ``grad_outputs[i]`` has shape ``(k, *outputs[i].shape)``. Outputs that do not depend on the
    inputs (None or no graph) contribute zero. ``batched`` uses ``is_grads_batched`` (vmap).
    """
    k = grad_outputs[0].shape[0]
    keep = [i for i, o in enumerate(outputs) if o is not None and o.requires_grad]
    zeros = [torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) for t in inputs]
    if not keep:
        return zeros
    outs = [outputs[i] for i in keep]
    gos = [grad_outputs[i].to(outputs[i].dtype) for i in keep]
    if batched:
        res = list(
            torch.autograd.grad(
                outs,
                inputs,
                grad_outputs=gos,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    else:
        per = [
            torch.autograd.grad(
                outs,
                inputs,
                grad_outputs=[g[j] for g in gos],
                retain_graph=True,
                allow_unused=True,
            )
            for j in range(k)
        ]
        res = [
            None if per[0][i] is None else torch.stack([p[i] for p in per])
            for i in range(len(inputs))
        ]
    return [z if r is None else r for r, z in zip(res, zeros, strict=True)]


class CurvatureOperator:
    """A symmetric ``dim x dim`` curvature matrix of the mean loss, applied without forming it.

    Build it with :func:`make_operator`. Satisfies the ``LinearOperator`` protocol of
    ``flatcli.curvature.linop``: ``dim``, ``dtype``, ``device``, ``matvecs``, ``matvec``,
    ``matmat``.

    Attributes:
        kind: "hessian", "ggn" or "fisher".
        param_names: the selected parameter names, in model order (the flat vector's order).
        param_shapes: ``{name: shape}``.
        slices: ``{name: slice}`` into the flat vector.
        hvp_method: "forward-over-reverse" or "double-backward" (what was actually used).
        matmat_method: "vmap" or "loop" (how the k columns of a matmat are processed; double
            backward loops over the columns through one retained graph per chunk).
        fallback_reason: why a fallback was taken (``None`` when none was).
        num_examples, num_outputs, batch_size: N, K (logits per example), examples per chunk.
        fisher_type, mc_samples, mc_labels: for kind "fisher" (``mc_labels`` is (N, S) int64).
        matvecs: products so far (a matmat of k columns counts k).
    """

    def __init__(
        self,
        kind: Kind | str,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: Callable[..., Tensor] | str = cross_entropy,
        params: Sequence[str] | str | None = None,
        batch_size: int | None = None,
        head_dtype: torch.dtype | None = None,
        seed: int = 0,
        hvp_method: HvpMethod | str = HvpMethod.AUTO,
        fisher_type: FisherType | str = FisherType.MC,
        mc_samples: int = 1,
        cache: bool = True,
    ) -> None:
        self.kind = _choice(Kind, kind, "kind").value
        requested = _choice(HvpMethod, hvp_method, "hvp_method")
        self.fisher_type: str | None = _choice(FisherType, fisher_type, "fisher_type").value
        if isinstance(loss_fn, str):
            loss_fn = get_loss(loss_fn)
        n = int(x.shape[0])
        if n == 0:
            raise UsageError("No examples: a curvature operator needs at least one (x, y) pair.")
        if int(y.shape[0]) != n:
            raise UsageError(f"x has {n} examples but y has {int(y.shape[0])}.")
        _warn_if_training(model)

        names = select_parameters(model, params)
        self._fm = FunctionalModel(model, names)
        self.param_names: list[str] = names
        self.param_shapes: dict[str, torch.Size] = {k: v.shape for k, v in self._fm.params.items()}
        self.slices: dict[str, slice] = param_slices(self.param_shapes)
        self.dim: int = sum(v.numel() for v in self._fm.params.values())
        self.dtype: torch.dtype = self._fm.dtype
        self.device: torch.device = self._fm.device
        self.matvecs: int = 0
        self.num_examples: int = n
        self.head_dtype = head_dtype
        self.seed = seed
        self._x, self._y = x, y
        self._loss = head_loss(loss_fn, head_dtype)
        self._cache_enabled = bool(cache)
        self._graphs: dict[tuple[int, int], tuple[tuple[int, ...], tuple[Any, ...]]] = {}

        xb, _ = self._batch(0, min(n, 2))
        with torch.no_grad():
            z = self._fm(self._fm.params, xb)
        if z.dim() != 2:
            raise UsageError(f"The model must return logits of shape (N, K); got {tuple(z.shape)}.")
        self.num_outputs: int = int(z.shape[1])

        self._auto_batch = batch_size is None
        if batch_size is None:
            batch_size = auto_batch_size(model, x, num_outputs=self.num_outputs)
        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be a positive integer. Got {batch_size}.")
        self.batch_size: int = min(int(batch_size), n)

        self.mc_samples: int | None = None
        self.mc_labels: Tensor | None = None
        if self.kind != Kind.FISHER:
            self.fisher_type = None
        elif self.fisher_type == FisherType.MC:
            if int(mc_samples) < 1:
                raise UsageError(f"mc_samples must be a positive integer. Got {mc_samples}.")
            self.mc_samples = int(mc_samples)
            self.mc_labels = self._sample_labels()
        else:
            self._check_likelihood(self._probabilities(z))

        self.fallback_reason: str | None = None
        self.hvp_method: str = requested.value
        self.matmat_method: str = "vmap"
        with warnings.catch_warnings():  # torch's first jvp loads decompositions via jit.script
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.script.*", category=FutureWarning
            )
            self._probe(requested)

    # ------------------------------------------------------------------ public protocol

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector ``v`` of shape ``(dim,)``."""
        if v.dim() != 1 or v.shape[0] != self.dim:
            raise ValueError(
                f"Expected a vector of shape ({self.dim},). Got shape {tuple(v.shape)}."
            )
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(dim, k)``; adds k to ``matvecs``."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(
                f"Expected a matrix of shape ({self.dim}, k). Got shape {tuple(V.shape)}."
            )
        k = int(V.shape[1])
        if k == 0:
            return V.new_zeros((self.dim, 0), dtype=self.dtype, device=self.device)
        V = V.to(dtype=self.dtype, device=self.device)
        cols = unflatten_columns(V, self.param_shapes)
        out = self._product(cols, batched=k > 1 and self.matmat_method == "vmap")
        self.matvecs += k
        return flatten_columns(out)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def to_dense(self, block: int = 64) -> Tensor:
        """The full ``(dim, dim)`` matrix in the operator's dtype (for small models and tests)."""
        from flatcli.curvature.linop import to_dense

        return to_dense(self, block).to(self.dtype)

    def describe(self) -> dict[str, Any]:
        """What a report should say about how the products were formed (JSON-ready)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "num_examples": self.num_examples,
            "num_outputs": self.num_outputs,
            "batch_size": self.batch_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "head_dtype": None
            if self.head_dtype is None
            else str(self.head_dtype).removeprefix("torch."),
            "hvp_method": self.hvp_method,
            "matmat_method": self.matmat_method,
            "fallback_reason": self.fallback_reason,
            "fisher_type": self.fisher_type,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
            "params": list(self.param_names),
        }

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator(kind={self.kind!r}, dim={self.dim}, N={self.num_examples}, "
            f"batch_size={self.batch_size}, hvp_method={self.hvp_method!r}, "
            f"matmat_method={self.matmat_method!r})"
        )

    # ------------------------------------------------------------------ chunking

    def _batch(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        xb = self._x[a:b].to(self.device, non_blocking=True)
        if xb.is_floating_point() and xb.dtype != self.dtype:
            xb = xb.to(self.dtype)
        return xb, self._y[a:b].to(self.device, non_blocking=True)

    def _chunk_size(self, k: int) -> int:
        if not self._auto_batch or k <= 1 or self.matmat_method != "vmap":
            return self.batch_size
        # the auto size is for one product (~3x the activations); k tangents add ~2x each
        return max(1, min(self.batch_size, self.batch_size * 3 // (1 + 2 * k)))

    def _product(self, cols: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
        k = next(iter(cols.values())).shape[0]
        out: dict[str, Tensor] = {}
        step = self._chunk_size(k)
        for a in range(0, self.num_examples, step):
            b = min(self.num_examples, a + step)
            part = self._chunk(a, b, cols, self.hvp_method, batched)
            if not out:  # a copy, never a view of an input, since later chunks add into it
                out = part if b == self.num_examples else {n: t.clone() for n, t in part.items()}
            else:
                for n in out:
                    out[n] += part[n]
        return out

    def _chunk(
        self, a: int, b: int, cols: dict[str, Tensor], method: str, batched: bool
    ) -> dict[str, Tensor]:
        """Contribution of examples ``a:b`` (already weighted by 1/N) to ``A V``."""
        if method == HvpMethod.DOUBLE_BACKWARD:
            graph = self._graph(a, b)
            if self.kind == Kind.HESSIAN:
                return self._hessian_db(graph, cols, batched)
            return self._ggn_db(graph, slice(a, b), cols, batched)
        xb, yb = self._batch(a, b)
        fn = self._hessian_for if self.kind == Kind.HESSIAN else self._ggn_for
        return fn(xb, yb, slice(a, b), cols, batched)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self._fm.params.values(), *self._fm.fixed.values()))

    def _graph(self, a: int, b: int) -> tuple[Any, ...]:
        """The autograd graph of examples ``a:b`` for double backward.

        When all N examples form one chunk the graph is kept and reused by later products (each
        then costs one backward pass through it); it is rebuilt if a parameter changes in place.
        """
        versions = self._versions()
        hit = self._graphs.get((a, b))
        if hit is not None and hit[0] == versions:
            return hit[1]
        self._graphs.clear()
        xb, yb = self._batch(a, b)
        leaves = self._fm.leaves()
        inputs = list(leaves.values())
        with torch.enable_grad():
            if self.kind == Kind.HESSIAN:
                loss = self._loss(self._fm(leaves, xb), yb).sum() / self.num_examples
                grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
                graph: tuple[Any, ...] = (inputs, grads)
            else:
                z = self._fm(leaves, xb)
                u = torch.zeros_like(z, requires_grad=True)
                jtu = torch.autograd.grad(
                    z, inputs, grad_outputs=u, create_graph=True, allow_unused=True
                )
                graph = (inputs, z, u, jtu, yb)
        if self._cache_enabled and b - a == self.num_examples:
            self._graphs[(a, b)] = (versions, graph)
        return graph

    # ------------------------------------------------------------------ Hessian

    def _hessian_for(
        self, xb: Tensor, yb: Tensor, sl: slice, cols: dict[str, Tensor], batched: bool
    ) -> dict[str, Tensor]:
        fm, n = self._fm, self.num_examples

        def total(p: dict[str, Tensor]) -> Tensor:
            return self._loss(fm(p, xb), yb).sum() / n

        g = grad(total)

        def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(g, (fm.params,), (v,))[1]

        if batched:
            return vmap(one)(cols)
        k = next(iter(cols.values())).shape[0]
        return _stack([one(_column(cols, i)) for i in range(k)])

    def _hessian_db(
        self, graph: tuple[Any, ...], cols: dict[str, Tensor], batched: bool
    ) -> dict[str, Tensor]:
        inputs, grads = graph
        res = _backward_products(grads, inputs, [cols[k] for k in self.param_names], batched)
        return dict(zip(self.param_names, res, strict=True))

    # ------------------------------------------------------------------ GGN and Fisher

    def _ggn_for(
        self, xb: Tensor, yb: Tensor, sl: slice, cols: dict[str, Tensor], batched: bool
    ) -> dict[str, Tensor]:
        fm = self._fm

        def f(p: dict[str, Tensor]) -> Tensor:
            return fm(p, xb)

        z, vjp_fn = vjp(f, fm.params)

        def jv(v: dict[str, Tensor]) -> Tensor:
            return jvp(f, (fm.params,), (v,))[1]

        k = next(iter(cols.values())).shape[0]
        if batched:
            JV = vmap(jv)(cols)  # (k, B, K)
        else:
            JV = torch.stack([jv(_column(cols, i)) for i in range(k)])
        U = self._head_apply(z.detach(), yb, sl, JV)  # (k, B, K), weighted by 1/N
        if batched:
            return vmap(vjp_fn)(U)[0]
        return _stack([vjp_fn(U[i])[0] for i in range(k)])

    def _ggn_db(
        self, graph: tuple[Any, ...], sl: slice, cols: dict[str, Tensor], batched: bool
    ) -> dict[str, Tensor]:
        inputs, z, u, jtu, yb = graph
        # J v = d/du <J^T u, v>  (double-vjp trick: reverse mode only)
        (JV,) = _backward_products(jtu, [u], [cols[k] for k in self.param_names], batched)
        U = self._head_apply(z.detach(), yb, sl, JV)
        res = _backward_products([z], inputs, [U], batched)
        return dict(zip(self.param_names, res, strict=True))

    def _head_apply(self, z: Tensor, yb: Tensor, sl: slice, U: Tensor) -> Tensor:
        """``M_n u`` for each column u (k, B, K) with the head matrix of this kind, divided by N."""
        hd = self.head_dtype or z.dtype
        zh, Uh = z.to(hd), U.to(hd)
        if self.kind == Kind.GGN:
            out = self._head_hvp(zh, yb, Uh)
        elif self.fisher_type == FisherType.EXACT:
            G, p = self._class_gradients(zh)  # (B, K, K): G[b, c] = dloss(z_b, c)/dz; p (B, K)
            s = torch.einsum("bck,nbk->nbc", G, Uh) * p
            out = torch.einsum("bck,nbc->nbk", G, s)
        else:
            assert self.mc_labels is not None and self.mc_samples is not None
            R = self._label_gradients(zh, self.mc_labels[sl])  # (B, S, K)
            s = torch.einsum("bsk,nbk->nbs", R, Uh)
            out = torch.einsum("bsk,nbs->nbk", R, s) / self.mc_samples
        return (out / self.num_examples).to(z.dtype)

    def _head_hvp(self, zh: Tensor, yb: Tensor, Uh: Tensor) -> Tensor:
        """``H_n u``: the Hessian of the loss wrt the logits times each column (k, B, K)."""

        def total(zz: Tensor) -> Tensor:
            return self._loss(zz, yb).sum()

        gz = grad(total)
        try:
            return vmap(lambda u: jvp(gz, (zh,), (u,))[1])(Uh)
        except _FALLBACK_ERRORS as err:  # a loss head without forward AD or batching rules
            if is_oom(err):
                raise
        with torch.enable_grad():
            zz = zh.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(total(zz), zz, create_graph=True)
            return torch.stack(
                [torch.autograd.grad(g, zz, grad_outputs=u, retain_graph=True)[0] for u in Uh]
            )

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
        """Draw ``mc_samples`` labels per example from the model, once, with ``seed``: (N, S)."""
        probs = []
        with torch.no_grad():
            for a in range(0, self.num_examples, self.batch_size):
                xb, _ = self._batch(a, min(self.num_examples, a + self.batch_size))
                probs.append(self._probabilities(self._fm(self._fm.params, xb)).cpu().double())
        p = torch.cat(probs)
        self._check_likelihood(p)
        gen = torch.Generator().manual_seed(self.seed)
        labels = torch.multinomial(
            p / p.sum(dim=1, keepdim=True), self.mc_samples, replacement=True, generator=gen
        )
        return labels.to(self.device)

    # ------------------------------------------------------------------ method detection

    def _probe(self, requested: HvpMethod) -> None:
        """Try the preferred method once on a couple of examples; fall back if it fails.

        ``auto`` prefers double backward for the Hessian and forward mode for the GGN/Fisher
        (the faster of the two in bench_hvp.py); a method that raises is replaced by the other.
        """
        b = min(self.num_examples, 2)
        gen = torch.Generator().manual_seed(self.seed)

        def random_cols(k: int) -> dict[str, Tensor]:
            return {
                n: torch.randn((k, *s), generator=gen, dtype=torch.float64)
                .to(self.dtype)
                .to(self.device)
                for n, s in self.param_shapes.items()
            }

        fwd, dbl = HvpMethod.FORWARD_OVER_REVERSE.value, HvpMethod.DOUBLE_BACKWARD.value
        if requested == HvpMethod.AUTO:
            order = [dbl, fwd] if self.kind == Kind.HESSIAN else [fwd, dbl]
        else:
            order = [requested.value]
        for i, method in enumerate(order):
            try:
                self._chunk(0, b, random_cols(1), method, False)
            except _FALLBACK_ERRORS as err:
                if is_oom(err) or i == len(order) - 1:
                    raise
                self.fallback_reason = f"{method} failed ({first_line(err)})"
                continue
            self.hvp_method = method
            break
        self._graphs.clear()
        if self.hvp_method == dbl:
            self.matmat_method = "loop"  # one graph per chunk, reused by every column
            return
        try:
            self._chunk(0, b, random_cols(2), self.hvp_method, True)
        except _FALLBACK_ERRORS as err:
            if is_oom(err):
                raise
            self.matmat_method = "loop"
            reason = f"vmap over columns failed ({first_line(err)})"
            self.fallback_reason = (
                reason if self.fallback_reason is None else f"{self.fallback_reason}; {reason}"
            )

    def release(self) -> None:
        """Free the cached autograd graph (it is rebuilt on the next product if needed)."""
        self._graphs.clear()


def _choice(enum: type[Enum], value: Any, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(repr(e.value) for e in enum)
        raise UsageError(f"Unknown {what} {value!r}; choose one of {valid}.") from None


def _warn_if_training(model: nn.Module) -> None:
    modes = sorted(
        {type(m).__name__ for m in model.modules() if isinstance(m, _STOCHASTIC) and m.training}
    )
    if modes:
        warnings.warn(
            f"The model has {', '.join(modes)} in training mode: BatchNorm batch statistics make "
            "the curvature depend on the chunking and Dropout makes it random. Use "
            "flatcli.curvature.operators.eval_mode(model) or model.eval().",
            stacklevel=4,
        )


def make_operator(
    kind: Kind | str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[..., Tensor] | str = cross_entropy,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    head_dtype: torch.dtype | None = None,
    seed: int = 0,
    hvp_method: HvpMethod | str = HvpMethod.AUTO,
    fisher_type: FisherType | str = FisherType.MC,
    mc_samples: int = 1,
    cache: bool = True,
) -> CurvatureOperator:
    """A matrix-free curvature operator of the mean loss over the examples ``(x, y)``.

    Args:
        kind: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (see the module docstring for the maths).
        model: any ``nn.Module`` mapping ``x`` (B, ...) to logits (B, K), in the mode it should
            be differentiated in (normally eval: see :func:`eval_mode`).
        x: inputs (N, ...), on any device (chunks are moved to the model's device).
        y: int64 labels (N,).
        loss_fn: per-example loss head ``(logits, labels) -> (N,)`` (e.g.
            ``flatcli.curvature.losses.cross_entropy`` or ``normalized_cross_entropy``) or its
            name ("ce", "nsce").
        params: parameter names (or module names / globs, resolved by
            :func:`flatcli.curvature.params.select_parameters`); None = every parameter with
            ``requires_grad``. The flat vector follows ``model.named_parameters()`` order.
        batch_size: examples per chunk; None picks one that fits memory
            (:func:`flatcli.curvature.memory.auto_batch_size`). The result does not depend on it
            (up to rounding) unless BatchNorm is in training mode.
        head_dtype: dtype for the loss head (e.g. ``torch.float64`` with a float32 network).
        seed: seeds the Monte-Carlo Fisher labels and the method probe.
        hvp_method: ``"auto"``, ``"forward-over-reverse"`` or ``"double-backward"`` (module
            docstring: auto prefers double backward for the Hessian, forward mode otherwise, and
            falls back to the other if the preferred one raises).
        fisher_type: ``"mc"`` (default; ``mc_samples`` labels per example drawn once from the
            model) or ``"exact"`` (closed-form expectation; equals the GGN for cross-entropy).
        mc_samples: sampled labels per example for the MC Fisher.
        cache: keep the double-backward graph between products when all N examples form one
            chunk (memory: one chunk's activations and backward graph; :meth:`release` frees it).

    Returns:
        A :class:`CurvatureOperator` (``dim``, ``dtype``, ``device``, ``matvecs``, ``matvec``,
        ``matmat``, ``param_names``, ``param_shapes``, ``slices``, ``hvp_method``, ...).

    Raises:
        UsageError: unknown kind/method, a parameter pattern that matches nothing, mismatched
            x/y, a model whose output is not (N, K), or a Fisher of a non-likelihood loss.
    """
    return CurvatureOperator(
        kind,
        model,
        x,
        y,
        loss_fn=loss_fn,
        params=params,
        batch_size=batch_size,
        head_dtype=head_dtype,
        seed=seed,
        hvp_method=hvp_method,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        cache=cache,
    )
