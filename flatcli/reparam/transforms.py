"""Function-preserving reparametrisations of a chain of layers.

Each transform returns a NEW model (a deep copy) that computes the same function as the input:

- :func:`layer_scale`: Dinh et al. 2017's ``T_α`` (supplementary material, App. B and E):
  weight layer k is multiplied by α_k and its bias by ``Π_{j<=k} α_j`` (the scale its output
  carries), across positively homogeneous operations (ReLU, LeakyReLU, PReLU, max/avg pooling,
  Flatten, Dropout, Identity). The running product must be 1 at every other operation (BatchNorm,
  tanh, softmax, ...) and at the output, so ``Π α_k = 1`` over each homogeneous stretch.
- :func:`neuron_scale`: Tsuzuku et al. 2020, Eqs. 15-16: row i of one layer (its output unit
  or conv output channel, and its bias) is divided by α, column i of the next weight layer (its
  input unit or conv input channel; after a Flatten, the block of columns that channel became) is
  multiplied by α. If a BatchNorm sits between the two layers, the row side is the BatchNorm's
  affine weight and bias for channel i instead (its output is what the activation sees).
- :func:`bn_scale`: the weight and bias of the layer feeding a BatchNorm are multiplied by α, and
  the BatchNorm's running mean by α and its running variance set to ``α²(var + eps) − eps``
  (``eps`` kept, so a checkpoint stores the result), so its eval-mode output is unchanged.

The model must be a chain (:func:`flatcli.reparam.chain.trace_chain`); an operation the
transform cannot pass is refused with a :class:`~flatcli.errors.UsageError` (a tanh between two
layers that are scaled, a BatchNorm inside a layer-scaled stretch, grouped convolutions for
neuron scaling, a module used twice). :func:`max_logit_difference` checks a transform.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.configs.reparam import Transform
from flatcli.curvature.data import iter_chunks, move_inputs
from flatcli.errors import UsageError
from flatcli.reparam.chain import ChainOp, trace_chain

__all__ = [
    "Transform",
    "layer_scale",
    "neuron_scale",
    "bn_scale",
    "default_layer_alphas",
    "apply_transform",
    "max_logit_difference",
]


def _check_alpha(alpha: float, what: str = "alpha") -> float:
    alpha = float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise UsageError(f"{what} must be a positive finite number. Got {alpha}.")
    return alpha


def _resolve_alphas(
    layers: list[str], alphas: Sequence[float] | Mapping[str, float]
) -> dict[str, float]:
    if isinstance(alphas, Mapping):
        unknown = [k for k in alphas if k not in layers]
        if unknown:
            raise UsageError(f"Unknown layers {unknown}; the chain's weight layers are {layers}.")
        return {k: _check_alpha(alphas.get(k, 1.0), f"alpha of {k}") for k in layers}
    alphas = list(alphas)
    if len(alphas) != len(layers):
        raise UsageError(
            f"Got {len(alphas)} alphas for {len(layers)} weight layers {layers}; "
            "give one per layer."
        )
    return {k: _check_alpha(a, f"alpha of {k}") for k, a in zip(layers, alphas, strict=True)}


@torch.no_grad()
def layer_scale(
    model: nn.Module, alphas: Sequence[float] | Mapping[str, float], *, rtol: float = 1e-9
) -> nn.Module:
    """Dinh et al.'s ``T_α``: weight layer k times α_k, its bias times ``Π_{j<=k} α_j``.

    Args:
        model: a chain (see the module docstring).
        alphas: one positive factor per weight layer (a sequence in chain order, or a mapping
            from layer name to factor, missing layers 1).
        rtol: how far from 1 the running product may be where it must be 1.

    Returns:
        A deep copy computing the same function.

    Raises:
        UsageError: a non-homogeneous operation (BatchNorm, tanh, ...) or the output sees a
            running product other than 1, or the model is not a chain.
    """
    new = copy.deepcopy(model)
    chain = trace_chain(new)
    scales = _resolve_alphas([op.name for op in chain if op.kind == "layer"], alphas)
    c = 1.0
    for op in chain:
        if op.kind == "layer":
            a = scales[op.name]
            op.module.weight.mul_(a)
            c *= a
            if op.module.bias is not None:
                op.module.bias.mul_(c)
        elif op.kind in ("homogeneous", "flatten"):
            continue
        elif abs(c - 1.0) > rtol:
            what = "a BatchNorm" if op.kind == "bn" else "not positively homogeneous"
            raise UsageError(
                f"layer_scale: {op.name!r} ({what}) sees its input scaled by {c:.6g}; "
                "the alphas of "
                "the layers before it (since the last such operation) must multiply to 1."
            )
    if abs(c - 1.0) > rtol:
        raise UsageError(
            f"layer_scale: the output would be scaled by {c:.6g}; the alphas of the last layers "
            "(after the last non-homogeneous operation) must multiply to 1."
        )
    return new


def _channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def neuron_scale(
    model: nn.Module,
    alpha: float | Sequence[float],
    *,
    layer: str | int | None = None,
    neurons: Sequence[int] | int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Eqs. 15-16: unit i of ``layer`` divided by α, the next layer's input i multiplied by α.

    Args:
        model: a chain (see the module docstring).
        alpha: the factor (one for all chosen neurons, or one per chosen neuron).
        layer: the weight layer whose output units are rescaled: name or index among the chain's
            weight layers; default the first one followed by another weight layer through
            supported operations.
        neurons: unit indices; an int ``k`` draws k distinct units at random (seeded); default
            a random half (at least one) of the layer's units.
        seed: seeds the random choice of units.

    Returns:
        A deep copy computing the same function.

    Raises:
        UsageError: the operations between the two layers do not commute with per-unit positive
            scaling (tanh, softplus, LayerNorm, a residual, ...), grouped convolutions, bad indices.
    """
    new = copy.deepcopy(model)
    chain = trace_chain(new)
    layer_pos = [i for i, op in enumerate(chain) if op.kind == "layer"]
    names = [chain[i].name for i in layer_pos]
    if len(layer_pos) < 2:
        raise UsageError("neuron_scale needs two weight layers in a chain; the model has fewer.")

    def pair(start: int) -> tuple[int, list[ChainOp]]:
        between: list[ChainOp] = []
        for j in range(start + 1, len(chain)):
            op = chain[j]
            if op.kind == "layer":
                return j, between
            if op.kind not in ("homogeneous", "flatten", "bn"):
                raise UsageError(
                    f"neuron_scale: {op.name!r} between {chain[start].name!r} and the next weight "
                    "layer is not positively homogeneous per unit; cannot move a scale across it."
                )
            between.append(op)
        raise UsageError(f"neuron_scale: no weight layer follows {chain[start].name!r}.")

    if layer is None:
        start = next((p for p in layer_pos[:-1] if _try(pair, p)), None)
        if start is None:
            raise UsageError(
                "neuron_scale: no two consecutive weight layers are joined by positively "
                "homogeneous operations only (ReLU, pooling, Flatten, BatchNorm)."
            )
    else:
        if isinstance(layer, int):
            if not 0 <= layer < len(layer_pos) - 1:
                raise UsageError(
                    f"layer index {layer} out of range for weight layers {names[:-1]}."
                )
            start = layer_pos[layer]
        else:
            if layer not in names[:-1]:
                raise UsageError(f"Unknown layer {layer!r}; choose one of {names[:-1]}.")
            start = layer_pos[names.index(layer)]
    nxt, between = pair(start)
    first, second = chain[start].module, chain[nxt].module
    for m in (first, second):
        if not isinstance(m, nn.Linear) and m.groups != 1:
            raise UsageError("neuron_scale does not support grouped convolutions.")
    units = _channels(first)
    idx = _choose_units(units, neurons, seed)
    factors = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    if (
        factors.numel() not in (1, len(idx))
        or not bool((factors > 0).all())
        or not bool(factors.isfinite().all())
    ):
        raise UsageError(f"alpha must be positive: one value or one per chosen unit ({len(idx)}).")
    factors = factors.expand(len(idx)) if factors.numel() == 1 else factors
    bns = [op for op in between if op.kind == "bn"]
    row = bns[-1].module if bns else first
    if bns and not row.affine:
        raise UsageError(
            f"neuron_scale: BatchNorm {bns[-1].name!r} has no affine parameters to rescale."
        )
    if bns and row.num_features != units:
        raise UsageError(
            f"neuron_scale: BatchNorm {bns[-1].name!r} has {row.num_features} features, not the "
            f"{units} units of {chain[start].name!r} (a BatchNorm after a Flatten is not "
            "supported)."
        )
    w_row = row.weight
    idx_t = torch.as_tensor(idx)
    f_row = factors.to(w_row.dtype).to(w_row.device)
    w_row[idx_t] /= f_row.view(-1, *([1] * (w_row.dim() - 1)))
    if row.bias is not None:
        row.bias[idx_t] /= f_row
    w2 = second.weight
    f2 = factors.to(w2.dtype).to(w2.device)
    in2 = second.in_features if isinstance(second, nn.Linear) else second.in_channels
    if any(op.kind == "flatten" for op in between):
        if not isinstance(second, nn.Linear) or in2 % units:
            raise UsageError(
                f"neuron_scale: after a Flatten, {chain[nxt].name!r} must be a Linear whose inputs "
                f"are a multiple of {units} channels; got {in2}."
            )
        per = in2 // units
        cols = (idx_t[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
        w2[:, cols] *= f2.repeat_interleave(per)
    else:
        if in2 != units:
            raise UsageError(
                f"neuron_scale: {chain[nxt].name!r} has {in2} inputs, expected {units}."
            )
        w2[:, idx_t] *= f2.view(1, -1, *([1] * (w2.dim() - 2)))
    return new


def _try(fn: Callable[[int], Any], arg: int) -> bool:
    try:
        fn(arg)
        return True
    except UsageError:
        return False


def _choose_units(units: int, neurons: Sequence[int] | int | None, seed: int) -> list[int]:
    if neurons is None or isinstance(neurons, int):
        k = max(1, units // 2) if neurons is None else int(neurons)
        if not 1 <= k <= units:
            raise UsageError(f"Cannot choose {k} of {units} units.")
        gen = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(units, generator=gen)[:k].tolist())
    idx = [int(i) for i in neurons]
    if not idx or any(not 0 <= i < units for i in idx) or len(set(idx)) != len(idx):
        raise UsageError(f"neurons must be distinct indices in [0, {units}); got {idx}.")
    return idx


@torch.no_grad()
def bn_scale(model: nn.Module, alpha: float, *, bn: str | Sequence[str] | None = None) -> nn.Module:
    """Scale the layer feeding each (or the named) BatchNorm by α and its statistics to match.

    Weight and bias of the Linear/Conv right before the BatchNorm times α; ``running_mean`` times α,
    ``running_var`` becomes ``α²(running_var + eps) − eps`` with ``eps`` unchanged, so that
    ``sqrt(var' + eps) = α sqrt(var + eps)`` and ``BN(α z)`` equals the old ``BN(z)`` in eval
    mode. (Train mode, which uses batch statistics and the fixed ``eps``, differs by O(eps).)

    Raises:
        UsageError: no BatchNorm follows a weight layer directly, a named module is not such a
            BatchNorm, a BatchNorm keeps no running statistics, or (α < 1 with a tiny running
            variance) the new running variance would be negative.
    """
    alpha = _check_alpha(alpha)
    new = copy.deepcopy(model)
    chain = trace_chain(new)
    pairs = {
        chain[i].name: (chain[i - 1], chain[i])
        for i in range(1, len(chain))
        if chain[i].kind == "bn" and chain[i - 1].kind == "layer"
    }
    if bn is None:
        chosen = list(pairs)
        if not chosen:
            raise UsageError(
                "bn_scale: no BatchNorm directly follows a Linear/Conv layer in this model."
            )
    else:
        chosen = [bn] if isinstance(bn, str) else list(bn)
        bad = [b for b in chosen if b not in pairs]
        if bad:
            raise UsageError(
                f"bn_scale: {bad} are not BatchNorms directly after a Linear/Conv; "
                f"choose from {list(pairs)}."
            )
    for name in chosen:
        layer, norm = pairs[name]
        mod = norm.module
        if mod.running_mean is None or mod.running_var is None:
            raise UsageError(f"bn_scale: BatchNorm {name!r} keeps no running statistics.")
        new_var = alpha**2 * (mod.running_var.double() + mod.eps) - mod.eps
        if bool((new_var < 0).any()):
            raise UsageError(
                f"bn_scale: α={alpha:g} would make BatchNorm {name!r}'s running variance "
                f"negative (α² (var + eps) − eps < 0 for {int((new_var < 0).sum())} channels, "
                f"smallest var {float(mod.running_var.min()):.3g}, eps {mod.eps:g}); "
                "use a larger α."
            )
        layer.module.weight.mul_(alpha)
        if layer.module.bias is not None:
            layer.module.bias.mul_(alpha)
        mod.running_mean.mul_(alpha)
        mod.running_var.copy_(new_var.to(mod.running_var.dtype))
    return new


def default_layer_alphas(model: nn.Module, alpha: float) -> dict[str, float]:
    """α on the first weight layer and 1/α on the last one of its homogeneous stretch.

    The stretch is the run of weight layers joined by positively homogeneous operations only;
    the first such run with at least two layers is used.
    """
    alpha = _check_alpha(alpha)
    chain = trace_chain(model)
    runs: list[list[str]] = [[]]
    for op in chain:
        if op.kind == "layer":
            runs[-1].append(op.name)
        elif op.kind not in ("homogeneous", "flatten"):
            runs.append([])
    run = next((r for r in runs if len(r) >= 2), None)
    if run is None:
        raise UsageError(
            "layer_scale: no two weight layers are joined by positively homogeneous operations "
            "only (ReLU, pooling, Flatten); a BatchNorm or a smooth activation stands between them."
        )
    return {run[0]: alpha, run[-1]: 1.0 / alpha}


def apply_transform(
    model: nn.Module,
    transform: Transform | str | Callable[[nn.Module], nn.Module],
    alpha: float,
    seed: int = 0,
    *,
    layer: str | int | None = None,
    neurons: Sequence[int] | int | None = None,
) -> nn.Module:
    """A transformed copy, by name or by any callable ``model -> model``.

    By name (``-`` and ``_`` alike): "layer_scale" puts α on the first weight layer and 1/α on
    the last of its homogeneous stretch (:func:`default_layer_alphas`); "neuron_scale" divides
    ``neurons`` (default a random half) of ``layer`` (default the first that allows it) by α;
    "bn_scale" scales the layer before the BatchNorm ``layer`` (default every one) by α.
    """
    if callable(transform) and not isinstance(transform, str):
        return transform(model)
    try:
        t = Transform(str(getattr(transform, "value", transform)).replace("-", "_"))
    except ValueError:
        raise UsageError(
            f"Unknown transform {transform!r}; choose one of {[t.value for t in Transform]}."
        ) from None
    if t == Transform.LAYER_SCALE:
        return layer_scale(model, default_layer_alphas(model, alpha))
    if t == Transform.NEURON_SCALE:
        return neuron_scale(model, alpha, layer=layer, neurons=neurons, seed=seed)
    return bn_scale(model, alpha, bn=None if layer is None else str(layer))


@torch.no_grad()
def max_logit_difference(
    model_a: nn.Module, model_b: nn.Module, x: Tensor, batch_size: int = 1024
) -> float:
    """``max |f_a(x) − f_b(x)|`` over the examples and logits (models in their current modes)."""
    worst = 0.0
    pa = next(model_a.parameters())
    pb = next(model_b.parameters())
    for chunk in iter_chunks(x, None, batch_size, pa.device, pa.dtype):
        za = model_a(chunk.x)
        zb = model_b(move_inputs(x[chunk.start : chunk.stop], pb.device, pb.dtype))
        worst = max(worst, float((za.double() - zb.double().to(za.device)).abs().max()))
    return worst
