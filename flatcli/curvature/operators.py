"""Matrix-free curvature operators of the mean loss: Hessian, generalized Gauss-Newton, Fisher.

Every operator is EXACT for the mean loss over the N examples it was built on,

    L(theta) = 1/N sum_n loss(f(x_n; theta), y_n),

over the flat concatenation of the selected parameters (model order). With z_n = f(x_n; theta)
the logits and J_n = dz_n/dtheta:

- ``"hessian"`` (:class:`~flatcli.curvature.hessian.HessianOperator`): H = d^2 L / dtheta^2, by
  double backward (``torch.autograd.grad`` with ``create_graph=True``) or forward-over-reverse
  (``torch.func.jvp`` of ``torch.func.grad``); see ``hvp_method`` below.
- ``"ggn"`` (:class:`~flatcli.curvature.gauss_newton.GGNOperator`): G = 1/N sum_n J_n^T H_n J_n,
  with H_n = d^2 loss / dz^2 at z_n, the Hessian of the loss head with respect to the logits (for
  softmax cross-entropy diag(p) - p p^T, Wu et al. 2020, Eq. 18; for the NSCE head of Tsuzuku et
  al. 2020, Eq. 20, something else). Computed as J^T (H_n (J v)): J v by a jvp of the logits,
  H_n (J v) by an HVP of the loss head alone, J^T by a vjp. The Hessian is G plus the residual
  term 1/N sum_n sum_k (dloss/dz_k) d^2 z_k / dtheta^2 (the Hessian chain rule, Wu et al. 2020,
  Eq. 12 for one layer and Eq. 29 for all parameters).
- ``"fisher"`` (:class:`~flatcli.curvature.gauss_newton.FisherOperator`): the Fisher of the
  model's predictive distribution p(c|x) = exp(-loss(z, c)),
  F = 1/N sum_n E_{c ~ p(.|x_n)} g_{n,c} g_{n,c}^T with g_{n,c} = d loss(z_n, c) / dtheta
  (Jia & Su 2020, Eq. 1 relates it to the Hessian at a minimum).

  * ``fisher_type="mc"`` (the default): "labels sampled from the model". ``mc_samples`` labels
    per example are drawn ONCE, at construction, from p(.|x_n) with ``seed``, so the operator is
    a fixed symmetric PSD matrix F = 1/(N S) sum_{n,s} g_{n,c_ns} g_{n,c_ns}^T and Lanczos sees a
    consistent operator. Its rank is at most N*S, like the matrix whose log-determinant gamma
    uses; this is why the sampled form is the default.
  * ``fisher_type="exact"``: the expectation over c taken in closed form,
    F = 1/N sum_n J_n^T (sum_c p_c r_c r_c^T) J_n, r_c = dloss(z_n, c)/dz. For softmax
    cross-entropy the head matrix is diag(p) - p p^T, so the exact Fisher EQUALS the GGN there
    (it differs for NSCE and other heads).

One data loop. Every kind shares :class:`CurvatureOperator`, which owns the only loop over the
examples: chunks of ``batch_size`` examples from :func:`flatcli.curvature.data.iter_chunks`
(moved to the model's device and dtype), each chunk's contribution computed by the kind as a SUM
over its examples, the chunk sums added, reduced by :meth:`CurvatureOperator.reduce` (the
identity in one process: the single place a data-parallel all-reduce goes) and divided by the
true example count N. Chunking therefore changes nothing but rounding. Under ``torchrun``
(:mod:`flatcli.distributed`) the loop runs over this process's contiguous shard of the examples
and :meth:`~CurvatureOperator.reduce` all-reduces the product's sums once (one buffer), so the
result equals the one-process result up to the order of the floating-point additions. The
base class also counts products (``matvecs``) and keeps the double-backward graph cache.

Blocks. :meth:`CurvatureOperator.restrict` gives the diagonal block of the matrix for a subset of
its parameters (the layer-wise Hessian of Wu et al. 2020, §3) as an operator of its own that
shares the data loop and the cached graph: one operator per model and loss serves every measure.

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
  one). The preferred method is tried once on two examples (one when chunks hold one); if it
  raises (a module without forward-mode AD, or an op without double backward) the other is used
  and ``fallback_reason`` says why. ``hvp_method`` records the method used.

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
>>> H.dim, H.hvp_method, type(H).__name__
(26, 'double-backward', 'HessianOperator')
>>> v = torch.randn(H.dim, dtype=torch.float64)
>>> Hv = H.matvec(v)
>>> bool(torch.allclose(H.matvec(v), H.matmat(v[:, None])[:, 0]))
True
>>> B = H.restrict(["2.weight"])  # the block of the last layer's weights
>>> s = H.slices["2.weight"]
>>> B.dim, bool(torch.allclose(B.to_dense(), H.to_dense()[s, s]))
(8, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flatcli import distributed
from flatcli.configs.spectrum import HvpMethod, Kind
from flatcli.curvature._autodiff import FALLBACK_ERRORS, num_columns
from flatcli.curvature._functional import (
    FunctionalModel,
    attention_kernel,
    first_line,
    head_loss,
    is_oom,
    quiet_jit_warning,
)
from flatcli.curvature.data import Chunk, iter_chunks
from flatcli.curvature.losses import LossName, cross_entropy, sample_loss
from flatcli.curvature.memory import auto_batch_size, cpu_chunk
from flatcli.curvature.params import (
    flatten_columns,
    param_slices,
    select_parameters,
    unflatten_columns,
)
from flatcli.dtypes import dtype_name
from flatcli.errors import UsageError
from flatcli.errors import choice as _choice

__all__ = [
    "Kind",
    "HvpMethod",
    "FisherType",
    "CurvatureOperator",
    "OperatorBlock",
    "OperatorCache",
    "make_operator",
    "eval_mode",
]

# HessianOperator, GGNOperator and FisherOperator live in flatcli.curvature.hessian and
# flatcli.curvature.gauss_newton (they import this module) and are exported by flatcli.curvature.

Params = dict[str, Tensor]
"""``{parameter name: tensor}``; as columns, each tensor is ``(k, *shape)``."""


class FisherType(str, Enum):
    """Monte-Carlo (labels sampled from the model) or exact-expectation Fisher."""

    MC = "mc"
    EXACT = "exact"


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


class _Products:
    """The ``LinearOperator`` protocol (matvec, matmat, ``@``, to_dense) over flat vectors.

    Subclasses set ``dim``, ``dtype``, ``device``, ``param_shapes``, ``num_examples`` and
    ``matvecs`` and implement :meth:`_columns_product` on ``{name: (k, *shape)}`` columns: the
    SUMS over the examples, which :meth:`matmat` divides by ``num_examples``.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    matvecs: int
    num_examples: int
    param_shapes: dict[str, torch.Size]

    def _columns_product(self, cols: Params) -> Params:
        """``sum_n A_n V`` (block of this operator) for columns ``{name: (k, *shape)}``."""
        raise NotImplementedError

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
        sums = self._columns_product(unflatten_columns(V, self.param_shapes))
        self.matvecs += k
        # the sums are copied into one fresh (dim, k) tensor, which is divided in place
        return _flatten_consuming(sums, k, self.dim).div_(self.num_examples)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def to_dense(self, block: int = 64) -> Tensor:
        """The full ``(dim, dim)`` matrix in the operator's dtype (for small models and tests)."""
        from flatcli.curvature.linop import to_dense

        return to_dense(self, block).to(self.dtype)


class CurvatureOperator(_Products):
    """A symmetric ``dim x dim`` curvature matrix of the mean loss, applied without forming it.

    Build it with :func:`make_operator` (or ``CurvatureOperator(kind, model, x, y, ...)``, which
    returns the subclass of that kind: :class:`HessianOperator`, :class:`GGNOperator`,
    :class:`FisherOperator`). Satisfies the ``LinearOperator`` protocol of
    ``flatcli.curvature.linop``: ``dim``, ``dtype``, ``device``, ``matvecs``, ``matvec``,
    ``matmat``.

    This class owns the loop over the examples (:meth:`chunks`, :meth:`reduce`), the
    normalisation by N, the product count and the double-backward graph cache; a subclass says
    what one chunk contributes, as a sum over its examples, by each AD method
    (``_chunk_forward``, ``_build_graph`` + ``_chunk_double_backward``).

    Attributes:
        kind: "hessian", "ggn" or "fisher".
        param_names: the selected parameter names, in model order (the flat vector's order).
        param_shapes: ``{name: shape}``.
        slices: ``{name: slice}`` into the flat vector.
        hvp_method: "forward-over-reverse" or "double-backward" (what was actually used).
        matmat_method: "vmap" or "loop" (how the k columns of a matmat are processed; double
            backward loops over the columns through one retained graph per chunk).
        fallback_reason: why a fallback was taken (``None`` when none was).
        num_examples, num_outputs, batch_size: N, outputs per example (K logits, D outputs, T·V
            token logits), examples per chunk.
        loss_name: the loss's name when given by name (or a head carrying ``loss_name``).
        fisher_type, mc_samples, mc_labels: for kind "fisher" (``mc_labels`` is (N, S) int64,
            every example's labels on every process).
        data_parallel, world_size, shard, examples_per_rank: whether the examples are split
            over ``torchrun`` processes, how many, this process's ``(start, stop)`` and every
            rank's share (``(0, N)`` and ``[N]`` in one process).
        matvecs: products so far (a matmat of k columns counts k; products of blocks from
            :meth:`restrict` are counted by the block).
    """

    kind: ClassVar[str] = ""  # "hessian", "ggn" or "fisher": set by each subclass
    preferred_methods: ClassVar[tuple[str, str]] = (
        HvpMethod.FORWARD_OVER_REVERSE.value,
        HvpMethod.DOUBLE_BACKWARD.value,
    )
    """The order ``hvp_method="auto"`` tries the two methods in."""

    _classes: ClassVar[dict[str, type[CurvatureOperator]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            CurvatureOperator._classes[cls.kind] = cls

    def __new__(cls, kind: Kind | str, *args: Any, **kwargs: Any) -> CurvatureOperator:
        if cls is CurvatureOperator:
            # every kind's module is imported by flatcli/curvature/__init__.py, which Python
            # runs before this module: the subclass of each kind is registered by now
            cls = CurvatureOperator._classes[_choice(Kind, kind, "kind")]
        return super().__new__(cls)

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
        data_parallel: bool | None = None,
    ) -> None:
        if _choice(Kind, kind, "kind") != type(self).kind:
            raise UsageError(
                f"{type(self).__name__} is the {type(self).kind!r} operator; got kind {kind!r}."
            )
        requested = _choice(HvpMethod, hvp_method, "hvp_method")
        ftype = _choice(FisherType, fisher_type, "fisher_type")
        self.loss_name: str | None = (
            LossName(loss_fn).value
            if isinstance(loss_fn, str)
            else getattr(loss_fn, "loss_name", None)
        )
        if isinstance(loss_fn, str):
            loss_fn = sample_loss(loss_fn, y)
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
        self._index = {name: i for i, name in enumerate(names)}
        self.data_parallel: bool = (
            distributed.active()
            if data_parallel is None
            else bool(data_parallel and distributed.active())
        )
        self.world_size: int = distributed.world_size() if self.data_parallel else 1
        self.shard: tuple[int, int] = distributed.shard_bounds(n) if self.data_parallel else (0, n)
        self.examples_per_rank: list[int] = (
            distributed.examples_per_rank(n) if self.data_parallel else [n]
        )

        # the probe's examples are the same on every process (the first two of the set, or the
        # first batch_size when chunks are smaller: the probe never needs more memory)
        first = next(iter_chunks(x, y, min(n, 2), self.device, self.dtype))
        with torch.no_grad():
            z = self._fm(self._fm.params, first.x)
        if z.dim() < 1 or z.shape[0] != first.x.shape[0]:
            raise UsageError(f"The model must return outputs (N, ...); got {tuple(z.shape)}.")
        self.num_outputs: int = int(z[0].numel())  # K logits, D outputs, or T * V
        # token logits (N, T, V): the head's outputs are spread over T positions of V classes
        positions = int(z[0].numel() // z.shape[-1]) if z.dim() > 2 else 1

        self._auto_batch = batch_size is None
        self._cache_every_chunk = False
        if batch_size is None:
            sizing: dict[str, Any] = {
                "num_outputs": self.num_outputs,
                "positions": positions,
                "head_dtype": head_dtype,
            }
            batch_size = auto_batch_size(model, x, **sizing)
            if self.device.type == "cpu":
                # Whole-set tensors above glibc's mmap threshold (32 MiB at most) are mapped and
                # unmapped on every product (LeNet-5, 4,000 digits: 425k page faults and 0.8 s of
                # system time per HVP); chunks below it reuse heap memory. Their graphs are all
                # kept when the whole set would have been one chunk AND the gradient every kept
                # graph holds (one per chunk, ``dim`` numbers each) fits as well.
                shard = self.shard[1] - self.shard[0]
                small = min(batch_size, cpu_chunk(model, x))
                if batch_size >= shard > small:
                    chunks = -(-shard // small)
                    size = torch.empty((), dtype=self.dtype).element_size()
                    reserve = (chunks - 1) * self.dim * size
                    fit = auto_batch_size(model, x, reserve_bytes=reserve, **sizing)
                    self._cache_every_chunk = fit >= shard
                else:
                    self._cache_every_chunk = batch_size >= shard
                batch_size = small
        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be a positive integer. Got {batch_size}.")
        self.batch_size: int = min(int(batch_size), n)
        if first.size > self.batch_size:
            first = next(iter_chunks(x, y, self.batch_size, self.device, self.dtype))

        self.fisher_type: str | None = None
        self.mc_samples: int | None = None
        self.mc_labels: Tensor | None = None
        self._init_kind(z, ftype, mc_samples)

        self.fallback_reason: str | None = None
        self.attention: str = "default"
        self.hvp_method: str = requested
        self.matmat_method: str = "vmap"
        with quiet_jit_warning():  # torch's first jvp loads decompositions via jit.script
            self._probe(requested, first)

    def _init_kind(self, z: Tensor, fisher_type: str, mc_samples: int) -> None:
        """Kind-specific setup after the shapes and chunk size are known (``z``: first logits)."""

    # ------------------------------------------------------------------ public protocol

    def describe(self) -> dict[str, Any]:
        """What a report should say about how the products were formed (JSON-ready)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "num_examples": self.num_examples,
            "num_outputs": self.num_outputs,
            "batch_size": self.batch_size,
            "dtype": dtype_name(self.dtype),
            "head_dtype": None if self.head_dtype is None else dtype_name(self.head_dtype),
            "hvp_method": self.hvp_method,
            "matmat_method": self.matmat_method,
            "fallback_reason": self.fallback_reason,
            "attention_kernel": self.attention,
            "fisher_type": self.fisher_type,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
            "params": list(self.param_names),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, dim={self.dim}, N={self.num_examples}, "
            f"batch_size={self.batch_size}, hvp_method={self.hvp_method!r}, "
            f"matmat_method={self.matmat_method!r})"
        )

    def restrict(self, params: Sequence[str] | str | None) -> OperatorBlock:
        """The diagonal block of this matrix for a subset of its parameters, as an operator.

        The block shares this operator's examples, method, chunking and cached graph (a
        product costs about one product of the full operator, or less with double backward,
        which differentiates the selected parameters only), and counts its own ``matvecs``.

        Args:
            params: parameter names, module names or globs
                (:func:`flatcli.curvature.params.select_parameters`); None: all of this
                operator's parameters.

        Raises:
            UsageError: a pattern matches nothing, or names a parameter this operator lacks.
        """
        if params is None:
            names = list(self.param_names)
        else:
            names = select_parameters(self._fm.model, params)
            missing = [name for name in names if name not in self._index]
            if missing:
                raise UsageError(
                    f"Parameters {missing} are not among this operator's {self.param_names}."
                )
        return OperatorBlock(self, names)

    def release(self) -> None:
        """Free the cached autograd graph (it is rebuilt on the next product if needed)."""
        self._graphs.clear()

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss ``L(theta)`` of the operator's examples and its flat gradient.

        ``L`` is the mean over the N examples of the operator's loss head: for a loss given by
        name the sample loss of the docs ("Your model") (``token-ce``: the mean over ALL counted
        positions). Walks the same data loop as the products (this process's shard in chunks,
        each a sum over its examples), reduces the sums over processes (two all-reduces under
        ``torchrun``: the gradient in the model's dtype, the loss in float64) and divides by the
        global N, so it does not depend on the chunking or on how many processes share the
        examples (up to rounding).

        Returns:
            ``(loss, gradient)``: a float (summed in float64) and a ``(dim,)`` tensor in the
            operator's dtype, in the order of :attr:`param_names`.
        """
        grads = self._zeros(1, self.param_names)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for chunk in self.chunks():
            leaves = self._fm.leaves()
            inputs = list(leaves.values())
            with torch.enable_grad(), attention_kernel(self.attention):
                part = self._loss(self._fm(leaves, chunk.x), chunk.y).sum()
                parts = torch.autograd.grad(part, inputs, allow_unused=True)
            loss += part.detach().to(torch.float64)
            for name, g in zip(self.param_names, parts, strict=True):
                if g is not None:
                    grads[name][0] += g
        grads = self.reduce(grads)
        (total,) = self.reduce({"loss": loss}).values()
        flat = flatten_columns(grads)[:, 0] / self.num_examples
        return float(total) / self.num_examples, flat

    # ------------------------------------------------------------------ the data loop

    def chunks(self, batch_size: int | None = None) -> Iterator[Chunk]:
        """This process's examples in chunks of ``batch_size`` (default the operator's), on its
        device and in its dtype: :func:`flatcli.curvature.data.iter_chunks` over :attr:`shard`
        (all N examples in one process; a contiguous share of them when data-parallel).
        Chunk ``start``/``stop`` are indices into the global example set."""
        a, b = self.shard
        return iter_chunks(
            self._x,
            self._y,
            batch_size or self.batch_size,
            self.device,
            self.dtype,
            start=a,
            stop=b,
        )

    def reduce(self, sums: Params) -> Params:
        """Combine one product's sums over this process's chunks into the sum over all examples.

        The identity in one process. Data-parallel (under ``torchrun``), one all-reduce (sum)
        of every tensor of the product, flattened into one buffer
        (:func:`flatcli.distributed.all_reduce_sum`): about ``k * dim`` floats for a product
        with ``k`` columns. The caller divides by the GLOBAL example count ``num_examples``.
        """
        if not self.data_parallel:
            return sums
        return distributed.all_reduce_sum(sums)

    def _zeros(self, k: int, names: list[str]) -> Params:
        """Zero sums ``{name: (k, *shape)}`` (the contribution of an empty shard)."""
        return {
            name: torch.zeros((k, *self.param_shapes[name]), dtype=self.dtype, device=self.device)
            for name in names
        }

    def _chunk_size(self, k: int) -> int:
        if not self._auto_batch or k <= 1 or self.matmat_method != "vmap":
            return self.batch_size
        # the auto size is for one product (~3x the activations); k tangents add ~2x each
        return max(1, min(self.batch_size, self.batch_size * 3 // (1 + 2 * k)))

    def _columns_product(self, cols: Params) -> Params:
        return self._product(cols, self.param_names)

    def _product(self, cols: Params, names: list[str]) -> Params:
        """``N A V`` (block ``names``) for columns ``{name: (k, *shape)}``: the only example
        loop.

        Each chunk's contribution is a sum over its examples; the sums are added and reduced
        (:meth:`reduce`); the caller (:meth:`matmat`) divides by the true example count N.
        Beyond autograd's result, a product holds the running sum (the first chunk's result,
        not a copy of it, when it may be written into: :func:`_owned`) and one chunk's result.
        """
        k = num_columns(cols)
        batched = k > 1 and self.matmat_method == "vmap"
        # storages a chunk's result may alias (autograd can hand a cotangent back as it is):
        # a result on one of them is copied before anything is added into it or divided
        protected = _storages(cols.values()) | _storages(self._fm.params.values())
        total: Params = {}
        for chunk in self.chunks(self._chunk_size(k)):
            part = self._chunk(chunk, cols, names, self.hvp_method, batched)
            if not total:  # the first chunk's result becomes the sum, owned and writable
                total = _owned(part, protected)
            else:
                for name in total:
                    total[name] += part[name]
            del part  # one chunk's product at a time
        if not total:  # an empty shard (fewer examples than processes)
            total = self._zeros(k, names)
        return dict(self.reduce({name: total[name] for name in names}))

    def _chunk(
        self, chunk: Chunk, cols: Params, names: list[str], method: str, batched: bool
    ) -> Params:
        """Sum over the examples of ``chunk`` of their contributions to block ``names`` of A V."""
        with attention_kernel(self.attention):
            if method == HvpMethod.DOUBLE_BACKWARD:
                graph = self._graph(chunk)
                return self._chunk_double_backward(graph, chunk, cols, names, batched)
            return self._chunk_forward(chunk, cols, names, batched)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self._fm.params.values(), *self._fm.fixed.values()))

    def _graph(self, chunk: Chunk) -> tuple[Any, ...]:
        """The autograd graph of ``chunk`` for double backward.

        When all N examples form one chunk the graph is kept and reused by later products (each
        then costs one backward pass through it); so are the graphs of every chunk when the CPU
        split an automatic chunk (:func:`~flatcli.curvature.memory.cpu_chunk`). A graph is
        rebuilt if a parameter changes in place.
        """
        key = (chunk.start, chunk.stop)
        versions = self._versions()
        hit = self._graphs.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1]
        if not self._cache_every_chunk or any(v != versions for v, _ in self._graphs.values()):
            self._graphs.clear()
        with torch.enable_grad():
            graph = self._build_graph(chunk)
        whole = chunk.size == self.shard[1] - self.shard[0]
        if self._cache_enabled and (whole or self._cache_every_chunk):
            self._graphs[key] = (versions, graph)
        return graph

    def _subset(self, names: list[str]) -> Params:
        """The current values of parameters ``names`` (the primal point of a block)."""
        return {name: self._fm.params[name] for name in names}

    def _call(self, p: Params, x: Tensor) -> Tensor:
        """Logits with the parameters in ``p`` and the operator's other parameters as they are."""
        if len(p) != len(self._fm.params):
            p = {**self._fm.params, **p}
        return self._fm(p, x)

    # ------------------------------------------------------------------ per kind

    def _chunk_forward(self, chunk: Chunk, cols: Params, names: list[str], batched: bool) -> Params:
        """Forward-over-reverse: the chunk's summed contribution to block ``names`` of A V."""
        raise NotImplementedError

    def _build_graph(self, chunk: Chunk) -> tuple[Any, ...]:
        """Double backward: the retained graph of ``chunk`` (built under enable_grad)."""
        raise NotImplementedError

    def _chunk_double_backward(
        self, graph: tuple[Any, ...], chunk: Chunk, cols: Params, names: list[str], batched: bool
    ) -> Params:
        """Double backward: the chunk's summed contribution to block ``names`` of A V."""
        raise NotImplementedError

    # ------------------------------------------------------------------ method detection

    def _probe(self, requested: str, first: Chunk) -> None:
        """Try the preferred method once on a couple of examples; fall back if it fails.

        ``auto`` tries :attr:`preferred_methods` in order (double backward first for the
        Hessian, forward mode for the GGN/Fisher: the faster in bench_hvp.py); a method that
        raises is replaced by the other.
        """
        gen = torch.Generator().manual_seed(self.seed)

        def random_cols(k: int) -> Params:
            return {
                n: torch.randn((k, *s), generator=gen, dtype=torch.float64)
                .to(self.dtype)
                .to(self.device)
                for n, s in self.param_shapes.items()
            }

        dbl = HvpMethod.DOUBLE_BACKWARD.value
        order = list(self.preferred_methods) if requested == HvpMethod.AUTO else [requested]
        reasons: list[str] = []
        tries = [(method, False) for method in order] + [(method, True) for method in order]
        for i, (method, math_attention) in enumerate(tries):
            self.attention = "math" if math_attention else "default"
            try:
                self._chunk(first, random_cols(1), self.param_names, method, False)
            except FALLBACK_ERRORS as err:
                self._graphs.clear()  # a graph built before the failure holds the failing op
                if is_oom(err) or i == len(tries) - 1:
                    raise
                if not math_attention:
                    reasons.append(f"{method} failed ({first_line(err)})")
                continue
            self.hvp_method = method
            break
        if self.attention == "math":
            reasons.append(
                "attention runs its math kernel without the fused fast path: the fused kernels "
                "have no forward-mode or double-backward derivative"
            )
        self.fallback_reason = "; ".join(reasons) or None
        self._graphs.clear()
        if self.hvp_method == dbl:
            self.matmat_method = "loop"  # one graph per chunk, reused by every column
            return
        try:
            self._chunk(first, random_cols(2), self.param_names, self.hvp_method, True)
        except FALLBACK_ERRORS as err:
            if is_oom(err):
                raise
            self.matmat_method = "loop"
            reason = f"vmap over columns failed ({first_line(err)})"
            self.fallback_reason = (
                reason if self.fallback_reason is None else f"{self.fallback_reason}; {reason}"
            )


class OperatorBlock(_Products):
    """The diagonal block of a :class:`CurvatureOperator` for a subset of its parameters.

    Made by :meth:`CurvatureOperator.restrict`. A ``LinearOperator`` of its own (``dim``,
    ``matvec``, ``matmat``, ``param_names``, ``slices`` into ITS flat vector, its own
    ``matvecs``) whose products run through the parent's data loop and cached graph.
    """

    def __init__(self, parent: CurvatureOperator, names: list[str]) -> None:
        if not names:
            raise UsageError("No parameters selected: the block would be empty.")
        self.parent = parent
        self.kind = parent.kind
        self.param_names = list(names)
        self.param_shapes = {name: parent.param_shapes[name] for name in names}
        self.slices = param_slices(self.param_shapes)
        self.dim = sum(s.numel() for s in self.param_shapes.values())
        self.dtype = parent.dtype
        self.device = parent.device
        self.matvecs = 0

    def __getattr__(self, name: str) -> Any:
        # everything else (hvp_method, num_examples, batch_size, seed, ...) is the parent's
        if name == "parent":
            raise AttributeError(name)
        return getattr(self.parent, name)

    def _columns_product(self, cols: Params) -> Params:
        return self.parent._product(cols, self.param_names)

    def restrict(self, params: Sequence[str] | str | None) -> OperatorBlock:
        """A block of this block (see :meth:`CurvatureOperator.restrict`)."""
        block = self.parent.restrict(self.param_names if params is None else params)
        outside = [name for name in block.param_names if name not in self.param_shapes]
        if outside:
            raise UsageError(f"Parameters {outside} are not in this block {self.param_names}.")
        return block

    def describe(self) -> dict[str, Any]:
        """The parent's description with this block's size and parameters."""
        return {
            **self.parent.describe(),
            "dim": self.dim,
            "params": list(self.param_names),
            "block_of": self.parent.dim,
        }

    def __repr__(self) -> str:
        return f"OperatorBlock(dim={self.dim} of {self.parent!r}, params={self.param_names})"


def _storages(tensors: Any) -> set[int]:
    """The storage addresses of ``tensors`` (an iterable of tensors)."""
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _owned(part: Params, protected: set[int]) -> Params:
    """``part`` with every tensor safe to update in place: a tensor is kept as it is when it is
    dense (no stride-0 expansion), the only one on its storage, and on none of the
    ``protected`` storages; otherwise it is copied. Autograd may return an input's cotangent,
    one gradient for two inputs, or an expanded view: copying every result instead (as a
    chunk sum once did) cost a parameter-sized tensor per product."""
    seen = set(protected)
    out: Params = {}
    for name, t in part.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and (ptr in seen or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def _flatten_consuming(cols: Params, k: int, dim: int) -> Tensor:
    """``(dim, k)`` from columns ``{name: (k, *shape)}`` (as
    :func:`~flatcli.curvature.params.flatten_columns`), taking the tensors out of ``cols`` one
    by one: each is released once copied, so the peak is the result plus the columns not yet
    copied, not twice the columns. The result is uninitialised until written (its pages are
    touched as the columns arrive)."""
    first = next(iter(cols.values()))
    flat = torch.empty((k, dim), dtype=first.dtype, device=first.device)
    start = 0
    for name in list(cols):
        t = cols.pop(name)
        n = t[0].numel() if k else 0
        flat[:, start : start + n] = t.reshape(k, n)
        start += n
        del t
    if start != dim:
        raise RuntimeError(f"columns of {start} numbers for an operator of dimension {dim}")
    return flat.T


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
    kind: Kind | str, model: nn.Module, x: Tensor, y: Tensor, **options: Any
) -> CurvatureOperator:
    """A matrix-free curvature operator of the mean loss over the examples ``(x, y)``.

    ``make_operator(kind, ...)`` is ``CurvatureOperator(kind, ...)``: the class picks the kind's
    subclass.

    Args:
        kind: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (see the module docstring for the maths).
        model: any ``nn.Module`` mapping ``x`` (B, ...) to outputs (B, ...) the loss takes
            (logits (B, K), token logits (B, T, V), regression outputs), in the mode it should
            be differentiated in (normally eval: see :func:`eval_mode`).
        x: inputs (N, ...), on any device (chunks are moved to the model's device).
        y: targets (N, ...): int64 labels (N,) or token targets (N, T), float targets.
        **options: the keyword options below (their defaults: the signature of
            :class:`CurvatureOperator`).

    Keyword Args:
        loss_fn: per-example loss head ``(outputs, targets) -> (N,)`` (e.g.
            ``flatcli.curvature.losses.cross_entropy``) or a loss name ("ce", "nsce",
            "token-ce", "mse", "bce"). A name stands for
            :func:`flatcli.curvature.losses.sample_loss` of the targets: the operator is then
            the curvature of the sample loss (docs, "Your model"; ``token-ce``: mean over all
            counted positions of the examples). Outputs may have any shape (N, ...) the loss
            takes: logits (N, K), token logits (N, T, V), regression outputs (N,) / (N, D).
        params: parameter names (or module names / globs, resolved by
            :func:`flatcli.curvature.params.select_parameters`); None = every parameter with
            ``requires_grad``. The flat vector follows ``model.named_parameters()`` order.
            (For several blocks of one matrix, build it once and use
            :meth:`CurvatureOperator.restrict`.)
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
        data_parallel: split the examples over the ``torchrun`` processes (each sums its
            contiguous shard, one all-reduce per product completes the sum; every process must
            then make the same products in the same order). None (default): whenever a process
            group of more than one process is initialised (:mod:`flatcli.distributed`);
            False: this process alone holds every example. Pass the SAME ``x, y`` (every
            example, same order) on every process.

    Returns:
        A :class:`CurvatureOperator` of the kind's subclass (``dim``, ``dtype``, ``device``,
        ``matvecs``, ``matvec``, ``matmat``, ``restrict``, ``param_names``, ``param_shapes``,
        ``slices``, ``hvp_method``, ...).

    Raises:
        UsageError: unknown kind/method, a parameter pattern that matches nothing, mismatched
            x/y, a model whose output is not (N, ...), or a Fisher of a loss that is not a
            likelihood over classes (``token-ce``, ``mse``, ``bce``: use the GGN).
    """
    return CurvatureOperator(kind, model, x, y, **options)


class OperatorCache:
    """Curvature operators of one model on one example set, each built once and shared.

    :meth:`get` returns the operator of a kind, loss head and head dtype, over every trainable
    parameter, building it on first use; a measure that needs a block takes
    :meth:`CurvatureOperator.restrict` of it. Several measures of one checkpoint therefore pay
    for one probe, one set of sampled labels and (when all examples fit in one chunk) one
    cached graph per matrix. Fetching an operator releases the cached graphs of the others, so
    only one graph is held at a time.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> ops = OperatorCache(model, x, y)
    >>> ops.get("hessian", loss_fn="ce") is ops.get("hessian", loss_fn="ce"), len(ops)
    (True, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.batch_size, self.seed = batch_size, seed
        self._ops: dict[tuple[Any, ...], CurvatureOperator] = {}

    def get(
        self,
        kind: Kind | str,
        *,
        loss_fn: Callable[..., Tensor] | str = "ce",
        head_dtype: torch.dtype | None = None,
        hvp_method: HvpMethod | str = HvpMethod.AUTO,
        fisher_type: FisherType | str = FisherType.MC,
        mc_samples: int = 1,
        params: Sequence[str] | None = None,
    ) -> CurvatureOperator:
        """The operator for these settings (built with :func:`make_operator` on first use).

        ``params`` (parameter names) is for the rare operator that must include parameters
        without ``requires_grad``; by default it is every trainable parameter, and a block is
        :meth:`CurvatureOperator.restrict` of that.
        """
        kind = _choice(Kind, kind, "kind")
        key = (
            None if params is None else tuple(params),
            kind,
            loss_fn if isinstance(loss_fn, str) else id(loss_fn),
            head_dtype,
            _choice(HvpMethod, hvp_method, "hvp_method"),
            _choice(FisherType, fisher_type, "fisher_type") if kind == Kind.FISHER else None,
            int(mc_samples) if kind == Kind.FISHER else None,
        )
        for other_key, other in self._ops.items():
            if other_key != key:
                other.release()
        op = self._ops.get(key)
        if op is None:
            op = make_operator(
                kind,
                self.model,
                self.x,
                self.y,
                loss_fn=loss_fn,
                params=None if params is None else list(params),
                batch_size=self.batch_size,
                head_dtype=head_dtype,
                seed=self.seed,
                hvp_method=hvp_method,
                fisher_type=fisher_type,
                mc_samples=mc_samples,
            )
            self._ops[key] = op
        return op

    def __len__(self) -> int:
        return len(self._ops)

    def release(self) -> None:
        """Free every cached graph (the operators stay usable)."""
        for op in self._ops.values():
            op.release()
