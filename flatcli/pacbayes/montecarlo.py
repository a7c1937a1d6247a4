r"""Monte-Carlo errors of the stochastic network: n weight samples w ~ Q, each over the data.

ê_n = (1/n) Σ_k ê(w_k), with ê(w) the 0-1 error 1[argmax f_w(x) ≠ y] averaged over the examples
(Wu et al. 2020, Eq. 42; Dziugaite & Roy 2017, §3). Sample k's noise comes from its own
generator seeded by (seed, k), so the weights, and hence the numbers, do not depend on how the
work is chunked. A chunk of samples shares one batched forward per data chunk
(``torch.func.vmap`` over ``functional_call`` of the stacked sampled parameter sets); a chunk
of one sample is a plain ``functional_call``. The chunk sizes follow a fixed element budget
and the model's measured activation size per example (:func:`chunk_sizes`); on a CPU one
sample at a time at the best data batch was fastest (benchmarks/bench_pacbayes.py: stacking
LeNet-5 samples turns its convolutions into grouped ones, 1.1-1.4x slower), on a GPU stacking
fills the device. Under ``torchrun`` the samples are split into contiguous shards across the
processes and one all-reduce of the per-sample errors joins them, so the estimate is the same
whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatcli import distributed
from flatcli.curvature._functional import attention_kernel
from flatcli.pacbayes.optimize import Posterior
from flatcli.progress import ProgressFn, no_progress

__all__ = ["chunk_sizes", "deterministic_error", "sample_weights", "snn_errors"]

_BUDGET_ELEMENTS = 1 << 25
"""Elements (weights of the sample chunk + its activations) one batched forward may hold."""
_CPU_ACTIVATION_ELEMENTS = 1 << 22
"""Activation elements of one forward on a CPU: LeNet-5 (about 13k a digit) ran 2,000 digits
fastest in batches of 128-500 (87 ms; 142 ms at 1,000, where fresh pages are zeroed)."""
_MAX_DATA_CHUNK = 1024
_MIN_DATA_CHUNK = 16


def sample_seed(seed: int, k: int) -> int:
    """The seed of weight sample k (its own stream; independent of the optimisation's)."""
    return (int(seed) * 1_000_003 + 7_919 * (k + 1) + 0x5EED) % (2**63 - 1)


def sample_weights(posterior: Posterior, ks: range, *, seed: int) -> dict[str, Tensor]:
    """Weight samples w_k = w + ToStandard(ξ_k ⊙ exp(ς)) for k in ``ks``, stacked on dim 0.

    (Wu et al. 2020, Algorithm 1, line 11.) Each ξ_k is drawn from a generator seeded by
    ``sample_seed(seed, k)``, tensor by tensor in the posterior's parameter order.
    """
    first = next(iter(posterior.mean.values()))
    dtype, device = first.dtype, first.device
    work = posterior.basis.to(dtype, device)
    stds = {k: v.exp() for k, v in posterior.log_std.items()}
    draws: dict[str, list[Tensor]] = {k: [] for k in posterior.mean}
    for i in ks:
        gen = torch.Generator(device=device).manual_seed(sample_seed(seed, i))
        for k, s in stds.items():
            draws[k].append(torch.randn(s.shape, generator=gen, device=device, dtype=dtype))
    noise = {k: torch.stack(v) * stds[k] for k, v in draws.items()}
    noise = work.to_standard(noise)
    return {k: posterior.mean[k] + noise[k] for k in posterior.mean}


def _activation_elements(model: nn.Module, x: Tensor) -> int:
    """Elements a forward holds per example (measured once on a zero example)."""
    from flatcli.curvature.memory import activation_bytes_per_example

    size = max(1, x.element_size())
    try:
        return max(1, activation_bytes_per_example(model, tuple(x.shape[1:])) // size)
    except Exception:  # noqa: BLE001 - a model the probe cannot run: fall back on its widths
        width = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
        return 2 * (width or 1024)


def chunk_sizes(
    model: nn.Module,
    num_params: int,
    num_examples: int,
    samples: int,
    data_chunk: int | None = None,
    *,
    activations: int | None = None,
) -> tuple[int, int]:
    """(samples per batched forward, examples per chunk) within a fixed element budget.

    ``activations``: elements per example of one forward (default: measured). On a CPU one
    sample per forward and as many examples as keep the activations within
    ``_CPU_ACTIVATION_ELEMENTS`` (16-1,024); elsewhere up to 1,024 examples and as many samples
    as fit ``_BUDGET_ELEMENTS`` with their weights.
    """
    first = next(model.parameters(), None)
    on_cpu = first is None or first.device.type == "cpu"
    act = max(1, activations or 1024)
    if data_chunk is None:
        fit = _CPU_ACTIVATION_ELEMENTS // act if on_cpu else _MAX_DATA_CHUNK
        data_chunk = max(_MIN_DATA_CHUNK, min(_MAX_DATA_CHUNK, fit))
    data_chunk = max(1, min(num_examples, data_chunk))
    if on_cpu:
        return 1, data_chunk
    per_sample = num_params + act * data_chunk
    return max(1, min(samples, _BUDGET_ELEMENTS // per_sample)), data_chunk


@torch.no_grad()
def snn_errors(
    model: nn.Module,
    posterior: Posterior,
    x: Tensor,
    y: Tensor,
    *,
    samples: int,
    seed: int,
    sample_chunk: int | None = None,
    data_chunk: int | None = None,
    progress: ProgressFn = no_progress,
    description: str = "Monte-Carlo",
) -> Tensor:
    """Per-sample 0-1 errors ê(w_k), k = 0..n−1, of weight samples w_k ~ Q on (x, y), float64.

    The mean of the result is the Monte-Carlo estimate ê_n of the stochastic network's error
    (Dziugaite & Roy 2017, §3). ``sample_chunk`` samples share one vmapped forward per data
    chunk of ``data_chunk`` examples (defaults: :func:`chunk_sizes`). The weights of sample k
    are the same whatever the chunking (:func:`sample_weights`).

    Under ``torchrun`` (every process holding the same posterior) each process draws and
    evaluates only its contiguous shard of the sample indices (``distributed.shard_bounds``;
    sample k keeps its seed) and one all-reduce of the per-sample error vector, zero outside
    each shard, gives every process all n errors, exactly as one process computes them.
    """
    buffers = dict(model.named_buffers())
    if sample_chunk is None or data_chunk is None:
        act = _activation_elements(model, x[:1])
        auto_s, auto_d = chunk_sizes(
            model, posterior.num_params(), x.shape[0], samples, data_chunk, activations=act
        )
    s_chunk = sample_chunk or auto_s
    d_chunk = data_chunk or auto_d

    def forward(params: Mapping[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(model, {**buffers, **params}, (xb,))

    batched = vmap(forward, in_dims=(0, None))
    wrong = torch.zeros(samples, dtype=torch.float64, device=x.device)
    first, stop = distributed.shard_bounds(samples)  # (0, samples) in one process
    for start in range(first, stop, s_chunk):
        ks = range(start, min(stop, start + s_chunk))
        weights = sample_weights(posterior, ks, seed=seed)
        single = {k: v[0] for k, v in weights.items()} if len(ks) == 1 else None
        for a in range(0, x.shape[0], d_chunk):
            xb = x[a : a + d_chunk]
            if single is not None:
                logits = forward(single, xb).unsqueeze(0)  # (1, B, K)
            else:
                with attention_kernel("math"):  # fused CPU kernels: no vmap rule
                    logits = batched(weights, xb)  # (S, B, K)
            miss = logits.argmax(dim=-1) != y[a : a + d_chunk]
            wrong[ks.start : ks.stop] += miss.sum(dim=1).double()
        progress(description, ks.stop - first, stop - first)
    (wrong,) = distributed.all_reduce_sum([wrong])  # a no-op in one process
    return wrong / x.shape[0]


@torch.no_grad()
def deterministic_error(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, chunk: int = 4096
) -> float:
    """The 0-1 error of the network at weights ``params`` on (x, y) (Wu et al. 2020, Eq. 42)."""
    buffers = dict(model.named_buffers())
    wrong = 0
    for a in range(0, x.shape[0], chunk):
        logits = functional_call(model, {**buffers, **params}, (x[a : a + chunk],))
        wrong += int((logits.argmax(dim=-1) != y[a : a + chunk]).sum())
    return wrong / max(1, x.shape[0])
