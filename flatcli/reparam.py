"""Function-preserving reparametrisations, and an audit of which sharpness measures they change.

Each transform returns a NEW model (a deep copy) that computes the same function as the input:

- :func:`layer_scale`: Dinh et al.'s ``T_α`` (sharp-minima-can-generalize-supplement.md App. B, E):
  weight layer k is multiplied by α_k and its bias by ``Π_{j<=k} α_j`` (the scale its output
  carries), across positively homogeneous operations (ReLU, LeakyReLU, PReLU, max/avg pooling,
  Flatten, Dropout, Identity). The running product must be 1 at every other operation (BatchNorm,
  tanh, softmax, ...) and at the output, so ``Π α_k = 1`` over each homogeneous stretch.
- :func:`neuron_scale`: normalized-flat-minima.md Eqs. 15-16: row i of one layer (its output unit
  or conv output channel, and its bias) is divided by α, column i of the next weight layer (its
  input unit or conv input channel; after a Flatten, the block of columns that channel became) is
  multiplied by α. If a BatchNorm sits between the two layers, the row side is the BatchNorm's
  affine weight and bias for channel i instead (its output is what the activation sees).
- :func:`bn_scale`: the weight and bias of the layer feeding a BatchNorm are multiplied by α, and
  the BatchNorm's running mean by α and its running variance set to ``α²(var + eps) − eps``
  (``eps`` kept, so a checkpoint stores the result), so its eval-mode output is unchanged.

Supported models: a chain. The model is traced with ``torch.fx.symbolic_trace``; every operation
must take its tensor input from the one before (shape queries such as ``x.size(0)`` aside). An
``nn.Sequential`` (or subclass) that fx cannot trace (say, its forward checks the input shape) is
read as its children in order, nested Sequentials flattened. A
residual connection, a concatenation or any other branching is refused with a
:class:`~flatcli.errors.UsageError`, as is an operation the transform cannot pass (a tanh between
two layers that are scaled, a BatchNorm inside a layer-scaled stretch, grouped convolutions for
neuron scaling, a module used twice).

:func:`max_logit_difference` checks a transform; :func:`audit_invariance` measures a model and its
transform with :func:`flatcli.measures.sharpness.compute_sharpness` and tells which measures moved.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from flatcli.errors import UsageError

__all__ = [
    "Transform",
    "ChainOp",
    "trace_chain",
    "weight_layers",
    "layer_scale",
    "neuron_scale",
    "bn_scale",
    "apply_transform",
    "max_logit_difference",
    "AuditRow",
    "InvarianceAudit",
    "audit_invariance",
]


class Transform(str, Enum):
    """The function-preserving transforms :func:`apply_transform` knows by name."""

    LAYER_SCALE = "layer_scale"
    NEURON_SCALE = "neuron_scale"
    BN_SCALE = "bn_scale"


# ----------------------------------------------------------------------------- tracing

_LAYER = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"view", "reshape", "flatten"}
_SHAPE_METHODS = {"size", "dim", "numel"}


@dataclass(frozen=True)
class ChainOp:
    """One operation of a traced chain.

    Attributes:
        kind: "layer" (Linear/Conv), "homogeneous", "flatten", "bn" or "other".
        name: module path (call_module) or the function/method name.
        module: the module for call_module operations, else None.
    """

    kind: str
    name: str
    module: nn.Module | None = None


def _is_shape_node(node: fx.Node, shape_nodes: set[fx.Node]) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in ("shape", "ndim")
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0] in shape_nodes
    return False


def _classify_module(mod: nn.Module, name: str) -> ChainOp:
    if isinstance(mod, _LAYER):
        kind = "layer"
    elif isinstance(mod, _BN):
        kind = "bn"
    elif isinstance(mod, nn.Flatten):
        kind = "flatten"
    elif isinstance(mod, _HOMOGENEOUS_MODULES):
        kind = "homogeneous"
    else:
        kind = "other"
    return ChainOp(kind, name, mod)


def _classify(node: fx.Node, root: nn.Module) -> ChainOp:
    if node.op == "call_module":
        return _classify_module(root.get_submodule(str(node.target)), str(node.target))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in _HOMOGENEOUS_FUNCTIONS:
            return ChainOp("homogeneous", name)
        if node.target in _FLATTEN_FUNCTIONS:
            return ChainOp("flatten", name)
        return ChainOp("other", name)
    if node.op == "call_method":
        if node.target in _HOMOGENEOUS_METHODS:
            return ChainOp("homogeneous", str(node.target))
        if node.target in _FLATTEN_METHODS:
            return ChainOp("flatten", str(node.target))
        return ChainOp("other", str(node.target))
    return ChainOp("other", f"{node.op}:{node.target}")


def trace_chain(model: nn.Module) -> list[ChainOp]:
    """The model's operations in execution order, checked to form a single chain.

    Raises:
        UsageError: the model cannot be traced by torch.fx, has several inputs, or branches
            (a residual connection, a concatenation, a tensor used twice).
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types for untraceable code
        if isinstance(model, nn.Sequential):
            return _sequential_chain(model)
        raise UsageError(
            f"Cannot trace the model with torch.fx ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); "
            "reparametrisations support models whose forward is a plain chain of modules."
        ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UsageError(f"The model's forward takes {len(placeholders)} inputs; expected one.")
    tail = placeholders[0]
    main = {tail}
    shape_nodes: set[fx.Node] = set()
    chain: list[ChainOp] = []
    seen_modules: set[int] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            if node.args[0] is not tail:
                raise UsageError(
                    "The model's output is not the end of a single chain of operations."
                )
            break
        inputs = [a for a in node.all_input_nodes if a in main]
        if _is_shape_node(node, shape_nodes) or not inputs:
            shape_nodes.add(node)
            continue
        if len(inputs) > 1 or inputs[0] is not tail:
            raise UsageError(
                f"The model is not a single chain: operation {node.name!r} combines or reuses "
                "tensors (a residual connection or a branch). Reparametrisations support chains "
                "only."
            )
        op = _classify(node, model)
        if op.module is not None:
            if id(op.module) in seen_modules:
                raise UsageError(
                    f"Module {op.name!r} is applied twice; cannot rescale it for one use."
                )
            seen_modules.add(id(op.module))
        chain.append(op)
        main.add(node)
        tail = node
    return chain


def _sequential_chain(model: nn.Sequential, prefix: str = "") -> list[ChainOp]:
    """The children of an ``nn.Sequential`` (nested ones flattened) as the chain.

    Used when torch.fx cannot trace the model (e.g. a Sequential subclass whose forward checks
    the input shape before calling ``Sequential.forward``).
    """
    chain: list[ChainOp] = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            chain.extend(_sequential_chain(child, f"{path}."))
        elif any(True for _ in child.children()):
            raise UsageError(
                f"Cannot trace the model with torch.fx, and its child {path!r} is a container "
                f"({type(child).__name__}) whose order of operations is unknown."
            )
        else:
            chain.append(_classify_module(child, path))
    if len({id(op.module) for op in chain}) != len(chain):
        raise UsageError(
            "A module is applied twice in the Sequential; cannot rescale it for one use."
        )
    return chain


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv modules of the model's chain, in execution order."""
    return [op.name for op in trace_chain(model) if op.kind == "layer"]


# ----------------------------------------------------------------------------- transforms


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
    for a in range(0, int(x.shape[0]), batch_size):
        xb = x[a : a + batch_size]
        za = model_a(xb.to(pa.device, pa.dtype if xb.is_floating_point() else xb.dtype))
        zb = model_b(xb.to(pb.device, pb.dtype if xb.is_floating_point() else xb.dtype))
        worst = max(worst, float((za.double() - zb.double().to(za.device)).abs().max()))
    return worst


# ----------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class AuditRow:
    """One measure before and after a function-preserving transform.

    Attributes:
        measure: the metric name.
        original, transformed: its values.
        rel_change: ``|transformed − original| / max(|original|, tiny)``.
        invariant: whether the change is within ``threshold``.
        threshold: the rule used, in words (relative tolerance, or k combined standard errors
            for a stochastic estimate).
    """

    measure: str
    original: float
    transformed: float
    rel_change: float
    invariant: bool
    threshold: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "original": self.original,
            "transformed": self.transformed,
            "rel_change": self.rel_change,
            "invariant": self.invariant,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class InvarianceAudit:
    """The rows of an invariance audit, and how well the transform preserved the function."""

    transform: str
    alpha: float
    rows: list[AuditRow]
    max_logit_difference: float
    original: Any = field(repr=False, default=None)
    transformed: Any = field(repr=False, default=None)

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"max_logit_difference": self.max_logit_difference}
        for r in self.rows:
            out[f"{r.measure}_rel_change"] = r.rel_change
        return out

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "transform": self.transform,
            "alpha": self.alpha,
            "rows": [r.to_dict() for r in self.rows],
        }
        for key, res in (("original", self.original), ("transformed", self.transformed)):
            if res is not None:
                out[key] = {
                    "metrics": res.metrics(),
                    "per_layer": res.details().get("per_layer", {}),
                }
        return out


def audit_invariance(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: Any,
    transform: Transform | str | Callable[[nn.Module], nn.Module] = Transform.LAYER_SCALE,
    alpha: float = 10.0,
    seed: int = 0,
    *,
    rtol: float = 1e-6,
    k_stderr: float = 3.0,
    layer: str | int | None = None,
    neurons: Sequence[int] | int | None = None,
) -> InvarianceAudit:
    """Measure ``model`` and its transform with the same config; which measures stayed put?

    A measure counts as invariant when ``rel_change <= rtol``, or, when both values carry a
    standard error (a stochastic estimate: the transformed model's probes see a different
    matrix), when ``|Δ| <= k_stderr · sqrt(se_a² + se_b²)``.

    Args:
        model, x, y: network (eval mode) and examples.
        config: a :class:`flatcli.measures.sharpness.SharpnessConfig`.
        transform: "layer_scale", "neuron_scale", "bn_scale" or a callable ``model -> model``.
        alpha: the transform's factor.
        seed: seeds the transform's random choices (neuron_scale).
        rtol, k_stderr: the invariance thresholds.
        layer, neurons: passed to :func:`apply_transform` for a transform given by name.

    Returns:
        An :class:`InvarianceAudit` (``rows``, ``max_logit_difference``).
    """
    from flatcli.measures.sharpness import compute_sharpness

    other = apply_transform(model, transform, alpha, seed, layer=layer, neurons=neurons)
    diff = max_logit_difference(model, other, x)
    res_a = compute_sharpness(model, x, y, config)
    res_b = compute_sharpness(other, x, y, config)
    ma, mb = res_a.metrics(), res_b.metrics()
    rows = []
    for name in res_a.measure_names():
        va, vb = ma.get(name), mb.get(name)
        if va is None or vb is None:
            continue
        rel = abs(vb - va) / max(abs(va), 1e-300)
        sa, sb = ma.get(f"{name}_stderr"), mb.get(f"{name}_stderr")
        if sa is not None and sb is not None and math.isfinite(sa) and math.isfinite(sb):
            bound = k_stderr * math.hypot(sa, sb)
            ok = rel <= rtol or abs(vb - va) <= bound
            rule = f"rel_change <= {rtol:g} or |diff| <= {k_stderr:g} combined stderr ({bound:.3g})"
        else:
            ok = rel <= rtol
            rule = f"rel_change <= {rtol:g}"
        rows.append(AuditRow(name, va, vb, rel, ok, rule))
    if isinstance(transform, str):
        name = str(getattr(transform, "value", transform)).replace("-", "_")
    else:
        name = getattr(transform, "__name__", "custom")
    return InvarianceAudit(name, float(alpha), rows, diff, res_a, res_b)
