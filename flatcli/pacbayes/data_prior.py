r"""A data-dependent prior: part of the training set trains the prior's mean.

A PAC-Bayes bound holds for any prior chosen independently of the examples it is computed on
(Wu et al. 2020, Theorem F.1). Parrado-Hernández et al. 2012 (and Dziugaite et al. 2021;
Pérez-Ortiz et al. 2021) therefore split the training set: a seeded permutation of the n
examples gives the first ⌊F·n⌋ to the prior, whose mean is trained on them by SGD; the other
m = n − ⌊F·n⌋ examples are the sample S of the bound. B_RE (Wu et al. 2020, Eq. 45) is then
written with that m, and the Monte-Carlo estimate of the stochastic network's error uses
only those m examples. The posterior may depend on all n (it is any data-dependent
distribution), the prior only on its own examples and the seed, so conditionally on the
prior's examples the bound holds over the draw of S, with the same probability ≥ 1 − δ − δ′.

BatchNorm running statistics are part of the function f_w that a weight vector w computes.
They are recomputed here at the trained prior mean on the prior's examples only, and every
later forward (the posterior's optimisation, the Monte-Carlo errors, the prior's own errors)
uses those fixed buffers, so the map w ↦ f_w is fixed before S is seen.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from flatcli.errors import MeasureError, UsageError
from flatcli.io.checkpoint import Checkpoint
from flatcli.io.spec import ModelSpec
from flatcli.pacbayes.montecarlo import deterministic_error
from flatcli.pacbayes.prior import resolve_prior
from flatcli.progress import ProgressFn, no_progress

__all__ = [
    "PRIOR_MOMENTUM",
    "DataPrior",
    "PriorSplit",
    "indices_sha256",
    "recompute_batchnorm",
    "split_indices",
    "prior_start",
    "train_data_prior",
    "with_tensors",
]

PRIOR_MOMENTUM = 0.9
"""SGD momentum of the prior's training (Pérez-Ortiz et al. 2021 train their priors with SGD
and momentum 0.95; 0.9 is what the recipe of flatcli's default was measured with)."""

_SPLIT_SALT = 0x5B117
_TRAIN_SALT = 0x7A1B
_FRESH_SALT = 0xF8E5


@dataclass(frozen=True)
class PriorSplit:
    """Disjoint index sets of the training examples: the prior's and the bound's (int64, CPU)."""

    prior: Tensor
    bound: Tensor

    @property
    def bound_sha256(self) -> str:
        """SHA-256 of the sorted bound indices (:func:`indices_sha256`)."""
        return indices_sha256(self.bound)


def split_indices(n: int, fraction: float, seed: int) -> PriorSplit:
    """The first ⌊F·n⌋ of a seeded permutation of range(n) for the prior, the rest for the bound.

    Disjoint and covering by construction (one permutation, cut once). Needs at least one prior
    example and two bound examples (B_RE divides by m − 1).

    >>> s = split_indices(10, 0.5, seed=0)
    >>> len(s.prior), len(s.bound), sorted(s.prior.tolist() + s.bound.tolist()) == list(range(10))
    (5, 5, True)

    Raises:
        UsageError: fewer than one prior or two bound examples (exit 2).
    """
    k = math.floor(fraction * n)
    if k < 1 or n - k < 2:
        raise UsageError(
            f"--prior-fraction {fraction} of {n} training examples leaves {k} for the prior and "
            f"{n - k} for the bound; the prior needs at least 1 and the bound at least 2"
        )
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + _SPLIT_SALT)
    perm = torch.randperm(n, generator=gen)
    return PriorSplit(prior=perm[:k].clone(), bound=perm[k:].clone())


def indices_sha256(indices: Tensor) -> str:
    """SHA-256 of the sorted indices as little-endian int64 bytes.

    The same as ``hashlib.sha256(numpy.sort(idx).astype("<i8").tobytes()).hexdigest()``, so a
    reader can check which examples a bound used.
    """
    ordered = torch.sort(indices.detach().to("cpu", torch.int64)).values
    data = ordered.numpy().astype("<i8", copy=False).tobytes()
    return hashlib.sha256(data).hexdigest()


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm modules of ``model`` that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: Tensor, batch_size: int = 256) -> int:
    """Reset every BatchNorm layer's running statistics and re-estimate them on ``x`` only.

    With ``momentum=None`` PyTorch keeps the cumulative average of the batches' statistics
    (the mean of each batch's mean and of its unbiased variance). Only the BatchNorm modules
    run in training mode (dropout and the rest stay in eval mode); the model is left in eval
    mode. Returns the number of BatchNorm layers (0: nothing to do).
    """
    layers = batchnorm_modules(model)
    if not layers:
        return 0
    saved = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for a in range(0, x.shape[0], batch_size):
            model(x[a : a + batch_size])
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return len(layers)


@dataclass
class DataPrior:
    """The trained prior: its mean, the buffers every forward uses, the split and provenance.

    ``mean`` is keyed like ``net.named_parameters()``; ``buffers`` like ``net.named_buffers()``
    (BatchNorm statistics recomputed on the prior's examples). ``info`` is ``details.prior``.
    """

    mean: dict[str, Tensor]
    buffers: dict[str, Tensor]
    split: PriorSplit
    info: dict = field(default_factory=dict)


def _train(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: ProgressFn,
) -> list[dict]:
    """SGD with momentum on the mean cross-entropy, seeded batches; ``net`` trained in place."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=PRIOR_MOMENTUM)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + _TRAIN_SALT)
    n = x.shape[0]
    curve = []
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(int(seed) + _TRAIN_SALT)  # dropout and other in-model noise
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(n, generator=gen).to(x.device)
            total, wrong = 0.0, 0
            for a in range(0, n, batch_size):
                idx = perm[a : a + batch_size]
                opt.zero_grad(set_to_none=True)
                logits = net(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                if not torch.isfinite(loss):
                    raise MeasureError(
                        f"the prior's SGD diverged (loss {float(loss)} at epoch {epoch + 1}); "
                        "lower --prior-lr"
                    )
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
                wrong += int((logits.detach().argmax(-1) != y[idx]).sum())
            curve.append({"epoch": epoch + 1, "loss": total / n, "error": wrong / n})
            progress(f"prior epoch {epoch + 1}", epoch + 1, epochs)
    net.eval()
    return curve


def train_data_prior(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    fraction: float = 0.5,
    epochs: int = 20,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    start: str = "given",
    progress: ProgressFn = no_progress,
) -> DataPrior:
    """Train the prior's mean on the prior's share of (x, y) (Parrado-Hernández et al. 2012).

    Args:
        net: a network holding the start weights (the recorded or a fresh seeded
            initialisation); a copy is trained, ``net`` is not changed.
        x, y: the n training examples; :func:`split_indices` splits them.
        fraction: F, the prior's share.
        epochs, lr, batch_size: SGD with momentum :data:`PRIOR_MOMENTUM` on the cross-entropy.
        seed: seeds the split, the batches and any in-model noise.
        start: a description of the start weights, for the report.
        progress: ``progress(description, done, total)`` per epoch.

    Returns:
        the :class:`DataPrior`; ``info`` holds the kind, fraction, epochs, seed, start, the
        SHA-256 of the sorted bound indices, the SGD settings, the BatchNorm note, the prior's
        error on its own examples and the seconds taken.
    """
    t0 = time.perf_counter()
    split = split_indices(x.shape[0], fraction, seed)
    p_idx = split.prior.to(x.device)
    xp, yp = x[p_idx], y[p_idx]
    prior_net = copy.deepcopy(net)
    for m in batchnorm_modules(prior_net):  # nothing from the start's statistics survives
        m.reset_running_stats()
    curve = _train(
        prior_net,
        xp,
        yp,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    bn_layers = recompute_batchnorm(prior_net, xp)
    mean = {k: v.detach().clone() for k, v in prior_net.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in prior_net.named_buffers()}
    info = {
        "kind": "data-dependent",
        "fraction": fraction,
        "epochs": epochs,
        "seed": seed,
        "start": start,
        "prior_examples": int(split.prior.numel()),
        "bound_examples": int(split.bound.numel()),
        "bound_indices_sha256": split.bound_sha256,
        "sgd": {"lr": lr, "momentum": PRIOR_MOMENTUM, "batch_size": batch_size},
        "batchnorm": (
            f"running statistics of {bn_layers} BatchNorm layer(s) recomputed at the prior's "
            f"mean on the {int(split.prior.numel())} prior examples only; every forward of the "
            "posterior and the certificate uses them"
            if bn_layers
            else None
        ),
        "prior_train_error": deterministic_error(prior_net, mean, xp, yp),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }
    return DataPrior(mean=mean, buffers=buffers, split=split, info=info)


def with_tensors(model: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` in eval mode whose parameters and buffers named in ``tensors`` hold
    those values (the others keep ``model``'s)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in [*out.named_parameters(), *out.named_buffers()]:
            if name in tensors:
                t.copy_(tensors[name])
    return out.eval()


def prior_start(
    model: nn.Module, spec: ModelSpec, checkpoint: Checkpoint, start: str, seed: int
) -> tuple[nn.Module, str]:
    """The network the data-dependent prior's SGD starts from, and where its weights came from.

    ``recorded``: the initial weights ``flatcli train`` recorded (a UsageError, exit 2, when
    there are none); ``fresh``: a new initialisation of ``spec`` under ``torch.manual_seed``
    derived from ``seed`` (CPU, then ``model``'s device and dtype); ``auto``: recorded when
    there is one, else fresh. Either is data-independent.
    """
    if start != "fresh":
        try:
            init, source = resolve_prior(model, checkpoint)
        except UsageError:
            if start == "recorded":
                raise
        else:
            return with_tensors(model, init), f"recorded initialisation ({source})"
    from flatcli.io.spec import build_model

    ref = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) * 1_000_003 + _FRESH_SALT)
        net = build_model(spec)
    return net.to(device=ref.device, dtype=ref.dtype).eval(), f"fresh initialisation (seed {seed})"
