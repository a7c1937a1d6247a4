"""Private helpers: a model as a pure function of a dict of selected parameters.

Non-selected parameters are held fixed (detached); buffers are snapshotted (cloned) so a model in
training mode cannot have its BatchNorm running statistics changed by a curvature product.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatcli.errors import UsageError


def is_oom(err: BaseException) -> bool:
    """True for out-of-memory errors, which must never trigger a silent fallback."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or "out of memory" in str(err).lower()


@contextmanager
def quiet_jit_warning() -> Iterator[None]:
    """Silence torch's ``torch.jit.script`` FutureWarning, which the first forward-mode AD call
    of a process emits while loading its decompositions (not the user's doing)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (for the reports that say why a fallback happened)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class FunctionalModel:
    """``model`` as ``f(params: dict[name, Tensor], x) -> logits`` over the selected parameters.

    Attributes:
        params: ``{name: detached parameter}`` of the selected names (share storage with the model).
        fixed: the other parameters (detached) and cloned buffers.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        named = dict(model.named_parameters())
        unknown = [n for n in names if n not in named]
        if unknown:
            raise UsageError(f"Unknown parameter names {unknown}.")
        if not names:
            raise UsageError("No parameters selected: the curvature operator would be empty.")
        self.model = model
        self.names = list(names)
        chosen = set(self.names)
        self.params: dict[str, Tensor] = {n: named[n].detach() for n in self.names}
        self.fixed: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if n not in chosen}
        self.fixed.update({n: b.detach().clone() for n, b in model.named_buffers()})
        dtypes = {p.dtype for p in self.params.values()}
        if len(dtypes) != 1:
            raise UsageError(f"Selected parameters have mixed dtypes {sorted(map(str, dtypes))}.")
        self.dtype: torch.dtype = dtypes.pop()
        self.device: torch.device = next(iter(self.params.values())).device

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, {**self.fixed, **params}, (x,))

    def leaves(self) -> dict[str, Tensor]:
        """Fresh leaf tensors (sharing storage) that require grad, for the autograd paths."""
        return {n: p.detach().requires_grad_(True) for n, p in self.params.items()}


@contextmanager
def attention_kernel(kind: str) -> Iterator[None]:
    """``"math"``: ``scaled_dot_product_attention`` (and so ``nn.MultiheadAttention``) runs its
    math kernel, built of matmul and softmax, whose derivatives of every order and forward mode
    exist (the fused flash and memory-efficient kernels have first-order backward only), and
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` skip their fused inference fast
    path (no forward-mode derivative either); ``"default"``: torch's choice."""
    if kind != "math":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def head_loss(
    loss_fn: Callable[..., Tensor], head_dtype: torch.dtype | None
) -> Callable[[Tensor, Tensor], Tensor]:
    """``(logits, labels) -> per-example losses``, with logits cast to ``head_dtype`` first."""

    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        if head_dtype is not None:
            logits = logits.to(head_dtype)
        return loss_fn(logits, labels)

    return loss
