"""Rough memory model of a curvature product, and a batch size that fits.

A Hessian-vector product by forward-over-reverse keeps the activations of the forward pass, their
tangents, and the backward pass's buffers: about 3x what a plain forward keeps for autograd. The
activations of one example are measured by running a forward on one (two, for BatchNorm in training
mode) example(s) and summing the bytes autograd saves for backward; the batch scales them linearly.
This is an estimate to choose a chunk size, not a guarantee.

The loss head is counted apart, in ITS dtype (float64 by default in the commands): a sequence
model's head sees N·T·V logits (GPT-2's vocabulary of 50,257 over 1,024 tokens: 412 MB per
float64 copy), and a double-backward product keeps several such copies (the cast logits, the
softmax terms and their derivatives: :data:`HEAD_COPIES`), more than the network's own
activations. For a head over positions (token logits (N, T, V)) no V x V matrix is ever formed.

>>> from torch import nn
>>> import torch
>>> model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
>>> estimate_memory(model, (10,), 3, batch_size=100, dtype=torch.float32) > 0
True
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatcli.curvature.data import iter_chunks

__all__ = [
    "estimate_memory",
    "activation_bytes_per_example",
    "available_memory",
    "auto_batch_size",
    "memory_budget",
    "cpu_chunk",
]

ACTIVATION_FACTOR = 3.0
"""Forward-over-reverse keeps primal activations, tangents and backward buffers (~3x a forward)."""

PARAM_COPIES = 5
"""Parameters, gradient, tangent of the gradient, input vector, output vector."""

CPU_TENSOR_BYTES = 4 * 2**20
"""Largest activation a CPU chunk may save (:func:`cpu_chunk`): well below glibc's mmap
threshold."""

HEAD_COPIES = 8
"""Output-sized tensors (N x outputs, in the head dtype) a loss head needs at the peak of a
double-backward product: the cast logits, the shifted and masked logits, the log-sum-exp terms
and their derivatives. Measured on the float64 token-ce head of one 256-token sequence over
GPT-2's 50,257-token vocabulary (float32 logits): 3 copies saved for the second backward, a
peak of 6.8 copies above the logits (``tests/curvature/test_memory.py`` checks the saved
part for the ce and token-ce heads)."""

BUDGET_FRACTION_CUDA = 0.5
BUDGET_FRACTION_CPU = 0.25


def _saved_bytes(
    model: nn.Module, x_shape: tuple[int, ...], x_dtype: torch.dtype | None = None
) -> tuple[dict[int, int], int]:
    """Bytes of each storage autograd saves in a forward of TWO zero examples (parameters
    excluded), and the output's bytes. Integer inputs (token ids) keep ``x_dtype``."""
    p0 = next(iter(model.parameters()), None)
    device = p0.device if p0 is not None else torch.device("cpu")
    dtype = p0.dtype if p0 is not None else torch.get_default_dtype()
    if x_dtype is not None and not x_dtype.is_floating_point:
        dtype = x_dtype
    x = torch.zeros((2, *x_shape), dtype=dtype, device=device)
    state = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    state.update({n: b.detach().clone() for n, b in model.named_buffers()})
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = functional_call(model, state, (x,))
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return {k: b for k, b in seen.items() if k not in param_ptrs}, out.numel() * out.element_size()


def activation_bytes_per_example(
    model: nn.Module, x_shape: tuple[int, ...], x_dtype: torch.dtype | None = None
) -> int:
    """Bytes autograd saves for backward in a forward of one example of shape ``x_shape``.

    Runs the model functionally (cloned buffers, so BatchNorm running statistics are untouched)
    on two zero examples (of ``x_dtype`` when it is an integer type, else of the model's dtype)
    and halves the count. The output is counted too.
    """
    saved, out = _saved_bytes(model, x_shape, x_dtype)
    return int((sum(saved.values()) + out) // 2)


def cpu_chunk(model: nn.Module, x: Tensor) -> int:
    """Examples per chunk on the CPU whose largest saved activation stays within
    :data:`CPU_TENSOR_BYTES` (at least 1, at most ``len(x)``).

    glibc serves allocations above its mmap threshold (at most 32 MiB) by mapping fresh pages,
    which the kernel faults in and zeroes on every use, and unmaps them when freed: a product
    over one large chunk spent as much time in the kernel as in its arithmetic
    (``benchmarks/bench_hvp.py``). Smaller chunks reuse heap memory.
    """
    saved, out = _saved_bytes(model, tuple(x.shape[1:]), x.dtype)
    largest = max([out, *saved.values()]) // 2
    return int(max(1, min(int(x.shape[0]), CPU_TENSOR_BYTES // max(1, largest))))


def estimate_memory(
    model: nn.Module,
    x_shape: tuple[int, ...],
    num_outputs: int,
    batch_size: int,
    dtype: torch.dtype | None = None,
    x_dtype: torch.dtype | None = None,
    *,
    positions: int = 1,
    head_dtype: torch.dtype | None = None,
) -> int:
    """Rough peak bytes of one curvature-vector product on a chunk of ``batch_size`` examples.

    ``5 params + batch_size * (3 activations(1 example) + head(1 example))``, the activations
    rescaled to ``dtype`` (default: the model's parameter dtype). The head of one example is
    :data:`HEAD_COPIES` copies of its ``num_outputs`` outputs in ``head_dtype`` (default
    ``dtype``), plus, for a head over classes (``positions == 1``, logits (N, K)), 4 K x K head
    matrices; a head over ``positions`` (token logits (N, T, V): T positions of V classes,
    ``num_outputs = T V``) forms no V x V matrix.

    Args:
        model: the network (its current mode is used for the traced forward).
        x_shape: the shape of ONE example (no batch dimension).
        num_outputs: outputs per example (K logits, D outputs, T·V token logits).
        batch_size: examples per chunk.
        dtype: the dtype the product runs in.
        x_dtype: the inputs' dtype when it is an integer type (token ids); else the model's.
        positions: positions per example the outputs are spread over (T for token logits
            (N, T, V); 1 for (N, K) or (N, D) outputs).
        head_dtype: the dtype the loss head is evaluated in (default ``dtype``).

    >>> from torch import nn
    >>> gpt_head = nn.Embedding(50257, 8)  # stand-in: only the head term matters here
    >>> per_sequence = estimate_memory(gpt_head, (256,), 256 * 50257, 1, torch.float32,
    ...     torch.int64, positions=256, head_dtype=torch.float64) - estimate_memory(
    ...     gpt_head, (256,), 256 * 50257, 0, torch.float32, torch.int64, positions=256)
    >>> per_sequence > HEAD_COPIES * 256 * 50257 * 8  # the float64 head of a 256-token sequence
    True
    """
    params = list(model.parameters())
    model_dtype = params[0].dtype if params else torch.get_default_dtype()
    dtype = dtype or model_dtype
    scale = (
        torch.empty((), dtype=dtype).element_size()
        / torch.empty((), dtype=model_dtype).element_size()
    )
    param_bytes = sum(p.numel() for p in params) * torch.empty((), dtype=dtype).element_size()
    if batch_size <= 0:
        return int(PARAM_COPIES * param_bytes)
    act = activation_bytes_per_example(model, tuple(x_shape), x_dtype) * scale
    head_size = torch.empty((), dtype=head_dtype or dtype).element_size()
    head = HEAD_COPIES * num_outputs * head_size
    if positions <= 1:
        head += 4 * num_outputs * num_outputs * torch.empty((), dtype=dtype).element_size()
    return int(PARAM_COPIES * param_bytes + batch_size * (ACTIVATION_FACTOR * act + head))


def available_memory(device: torch.device | str) -> int:
    """Free bytes on ``device``: free CUDA memory (``torch.cuda.mem_get_info``), or on CPU the
    RAM available without swapping (``MemAvailable`` of ``/proc/meminfo`` where it can be read,
    which counts reclaimable caches; else the free pages of ``os.sysconf``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = _meminfo_available()
    if meminfo is not None:
        return meminfo
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 4 GiB
        return 4 * 2**30


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of ``path`` in bytes, or None where it cannot be read (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, *unit = line.split()[1:]
                    return int(value) * (1024 if unit[:1] == ["kB"] else 1)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def memory_budget(device: torch.device | str) -> int:
    """Bytes a computation on ``device`` may plan to use: half of the free CUDA memory, a
    quarter of the available RAM on the CPU (:func:`available_memory`)."""
    device = torch.device(device)
    frac = BUDGET_FRACTION_CUDA if device.type == "cuda" else BUDGET_FRACTION_CPU
    return int(frac * available_memory(device))


def auto_batch_size(
    model: nn.Module,
    x: Tensor,
    budget_bytes: int | None = None,
    num_outputs: int | None = None,
    *,
    positions: int = 1,
    head_dtype: torch.dtype | None = None,
    reserve_bytes: int = 0,
) -> int:
    """The largest chunk of the examples ``x`` (N, ...) whose product fits ``budget_bytes``.

    Args:
        model: the network.
        x: the examples (only the shape ``x.shape[1:]`` and ``len(x)`` are used).
        budget_bytes: default :func:`memory_budget` of the model's device (half of free
            CUDA memory; a quarter of available RAM on CPU).
        num_outputs: outputs per example (default: measured by a forward on two examples).
        positions: positions the outputs are spread over (T for token logits (N, T, V)).
        head_dtype: the dtype of the loss head (default the model's): see
            :func:`estimate_memory`.
        reserve_bytes: bytes of the budget something else needs (kept graphs, vectors).

    Returns:
        An integer in ``[1, len(x)]``.
    """
    n = int(x.shape[0])
    p0 = next(iter(model.parameters()), None)
    device = p0.device if p0 is not None else torch.device("cpu")
    if budget_bytes is None:
        budget_bytes = memory_budget(device)
    if num_outputs is None:
        with torch.no_grad():
            state = {k: v.detach() for k, v in model.named_parameters()}
            state.update({k: b.detach().clone() for k, b in model.named_buffers()})
            xb = next(iter_chunks(x, None, 2, device, None)).x
            out = functional_call(model, state, (xb,))
            num_outputs = int(out.reshape(len(xb), -1).shape[1])
            positions = int(out[0].numel() // out.shape[-1]) if out.dim() > 2 else 1
    shape, xd = tuple(x.shape[1:]), x.dtype
    extra = {"positions": positions, "head_dtype": head_dtype}
    fixed = estimate_memory(model, shape, num_outputs, 0, x_dtype=xd, **extra)
    per_example = estimate_memory(model, shape, num_outputs, 1, x_dtype=xd, **extra) - fixed
    room = budget_bytes - int(reserve_bytes) - fixed
    if per_example <= 0:
        return max(1, n)
    return int(max(1, min(n, room // per_example)))
