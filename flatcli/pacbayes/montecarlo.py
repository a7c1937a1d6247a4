r"""Monte-Carlo errors of the stochastic network: n weight samples w ~ Q, each over the data.

ê_n = (1/n) Σ_k ê(w_k), with ê(w) the 0-1 error 1[argmax f_w(x) ≠ y] averaged over the examples
(Wu et al. 2020, Eq. 42; Dziugaite & Roy 2017, §3). Sample k's noise comes from its own
generator seeded by (seed, k), so the numbers do not depend on how the work is chunked.
Samples are batched with ``torch.func.vmap`` over ``functional_call`` (one batched forward for a
chunk of samples), and the data are chunked. Under ``torchrun`` the samples are split into
contiguous shards across the processes and one all-reduce of the per-sample errors joins them,
so the estimate is the same whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatcli import distributed
from flatcli.pacbayes.optimize import Posterior
from flatcli.progress import ProgressFn, no_progress

__all__ = ["chunk_sizes", "deterministic_error", "sample_weights", "snn_errors"]

_BUDGET_ELEMENTS = 1 << 25
"""Elements (weights of the sample chunk + its activations) one batched forward may hold."""
_BUDGET_ELEMENTS_CPU = 1 << 23
"""The same on a CPU, where a smaller chunk stays in cache: at 2**25 a chunk of T-600 samples
(19 of them) ran 0.80x a loop of single forwards, at 2**23 (4 samples) 0.99x."""


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


def chunk_sizes(
    model: nn.Module,
    num_params: int,
    num_examples: int,
    samples: int,
    data_chunk: int | None = None,
) -> tuple[int, int]:
    """(samples per batched forward, examples per chunk) within a fixed element budget."""
    data_chunk = min(num_examples, data_chunk or 1024)
    width = sum(mod.out_features for mod in model.modules() if isinstance(mod, nn.Linear)) or 1024
    per_sample = num_params + 2 * width * data_chunk
    first = next(model.parameters(), None)
    on_cpu = first is None or first.device.type == "cpu"
    budget = _BUDGET_ELEMENTS_CPU if on_cpu else _BUDGET_ELEMENTS
    return max(1, min(samples, budget // per_sample)), max(1, data_chunk)


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
    chunk of ``data_chunk`` examples (defaults: a fixed memory budget).

    Under ``torchrun`` (every process holding the same posterior) each process draws and
    evaluates only its contiguous shard of the sample indices (``distributed.shard_bounds``;
    sample k keeps its seed) and one all-reduce of the per-sample error vector, zero outside
    each shard, gives every process all n errors, exactly as one process computes them.
    """
    buffers = dict(model.named_buffers())
    auto_s, auto_d = chunk_sizes(model, posterior.num_params(), x.shape[0], samples, data_chunk)
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
        for a in range(0, x.shape[0], d_chunk):
            logits = batched(weights, x[a : a + d_chunk])  # (S, B, K)
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
