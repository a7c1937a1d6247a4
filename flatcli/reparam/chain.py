"""Tracing a model as a chain of operations, for the function-preserving transforms.

Supported models: a chain. The model is traced with ``torch.fx.symbolic_trace``; every operation
must take its tensor input from the one before (shape queries such as ``x.size(0)`` aside). An
``nn.Sequential`` (or subclass) that fx cannot trace (say, its forward checks the input shape) is
read as its children in order, nested Sequentials flattened. A residual connection, a
concatenation or any other branching is refused with a :class:`~flatcli.errors.UsageError`.

Each operation is classified as a weight layer (Linear/Conv), a positively homogeneous
operation (ReLU, LeakyReLU, PReLU, max/avg pooling, Dropout, Identity), a flatten, a BatchNorm,
or anything else; :mod:`flatcli.reparam.transforms` decides from these kinds what it can move a
scale across.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from flatcli.errors import UsageError

__all__ = ["ChainOp", "trace_chain", "weight_layers"]

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


def _refuse_tied(model: nn.Module) -> None:
    """A UsageError naming the first parameter that two module attributes share."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            raise UsageError(
                f"the model ties {name} to {first[id(p)]}: a reparametrisation that scales one "
                "layer would scale the other, so none preserves the function; untie the weights "
                "to transform this model"
            )
        first[id(p)] = name


def trace_chain(model: nn.Module) -> list[ChainOp]:
    """The model's operations in execution order, checked to form a single chain.

    Raises:
        UsageError: the model ties a parameter to two places (scaling one layer would scale
            the other), cannot be traced by torch.fx, has several inputs, or branches (a
            residual connection, a concatenation, a tensor used twice).
    """
    _refuse_tied(model)
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
