"""One layer-capture mechanism: every parameterised layer's inputs and output gradients.

Both the per-example Gram engine (:mod:`flatcli.curvature._ghost`, Jia & Su 2020, Eq. 5) and the
Kronecker factors (:mod:`flatcli.curvature.kfac`, Wu et al. 2020, Eqs. 5-6 and 30-37) need the
same two things of each layer ``out = W a (+ b)``: its inputs ``a`` in the forward and the
gradients ``g`` of some cotangent of the logits at its output. This module records them:

- :func:`plan` lists the modules holding the selected parameters (:class:`Target`); what a module
  is, is decided by the registry :data:`LAYER_TYPES`, keyed by module type
  (:func:`register_layer_type`): ``"linear"`` (nn.Linear), ``"conv"`` (nn.Conv1d, nn.Conv2d),
  ``"batchnorm"`` (nn.BatchNorm1d/2d/3d with running statistics); anything else is
  ``"generic"``. A subclass counts as its registered base only if it keeps the base's forward.
- :class:`Recorder` installs forward hooks; :func:`record_forward` runs ONE batched forward with
  them active and returns the logits (a recorded tensor that a later in-place op changes,
  ``ReLU(inplace=True)``, is detected by its version counter and the forward is run again with
  the recorded tensors cloned). On the first forward a ``TorchFunctionMode`` checks that each
  selected parameter is used only inside its own module's forward.
- :func:`backward_to_outputs` runs ONE ``torch.autograd.grad`` from the logits to every recorded
  output, for one cotangent (N, K) or, with ``batched=True``, a stack of them (B, N, K) through
  ``is_grads_batched`` (vmap over the backward): no parameter gradient is ever formed.
- :func:`layer_tokens` turns a Linear's or convolution's recorded inputs into token columns
  ``(N, din, T)`` (a convolution's unfolded patches, Wu et al. 2020, Eq. 30; rows in the order of
  ``weight.view(out, -1)``) and :func:`output_tokens` its output gradients into ``(..., N, dout,
  T)``.

Valid only when examples do not interact in the forward (no BatchNorm with batch statistics):
:func:`plan` raises :class:`CaptureUnsupported` otherwise (and for a parameter shared by two
modules), and the callers fall back or refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "CaptureUnsupported",
    "LayerType",
    "LAYER_TYPES",
    "register_layer_type",
    "layer_kind",
    "Target",
    "plan",
    "has_batch_statistics",
    "Recorder",
    "record_forward",
    "backward_to_outputs",
    "unfold",
    "layer_tokens",
    "output_tokens",
]


class CaptureUnsupported(Exception):
    """The model has a feature the layer capture cannot handle; the message says which."""


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class LayerType:
    """What the capture knows about a module type.

    Attributes:
        kind: ``"linear"``, ``"conv"`` or ``"batchnorm"``.
        tokens: ``tokens(module, x) -> (N, din, T)``: the layer's recorded input ``x`` as the T
            input columns that the weight ``(dout, din)`` multiplies (None for BatchNorm).
    """

    kind: str
    tokens: Callable[[nn.Module, Tensor], Tensor] | None = None


LAYER_TYPES: dict[type[nn.Module], LayerType] = {}
"""Module type -> :class:`LayerType`. Types not in it (or subclasses with their own forward)
are ``"generic"``: the Gram engine vmaps their vjp, K-FAC skips them."""


def register_layer_type(
    module_type: type[nn.Module],
    kind: str,
    tokens: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> None:
    """Register ``module_type`` as a layer of ``kind`` whose inputs become tokens by ``tokens``."""
    LAYER_TYPES[module_type] = LayerType(kind, tokens)


def layer_kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv"``, ``"batchnorm"`` or ``"generic"`` for ``module``.

    A registered type, or a subclass of one that does not override its forward.
    """
    return _layer_type(module).kind


def _layer_type(module: nn.Module) -> LayerType:
    forward = type(module).forward
    for cls in type(module).__mro__:
        entry = LAYER_TYPES.get(cls)
        if entry is not None:
            return entry if forward is cls.forward else _GENERIC
    return _GENERIC


_GENERIC = LayerType("generic")


def _linear_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """(N, ..., in) -> (N, in, T): T = the positions the Linear is applied at (1 for (N, in))."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)


def unfold(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches ``(N, C_in·k, P)`` of a Conv1d/Conv2d, rows as ``weight.view(out, -1)``.

    The unfolded input of Wu et al. 2020, Eq. 30 (``X`` of shape ``n K1 K2 × P``): the
    convolution is ``Z = W X + B`` per example.
    """
    zero_pad = module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if zero_pad and all(k == 1 for k in module.kernel_size) and not any(module.padding):
        # a 1x1 convolution: the patches are the (strided) input pixels themselves
        sub = x[(..., *(slice(None, None, st) for st in module.stride))]
        return sub.reshape(x.shape[0], x.shape[1], -1)
    if not zero_pad:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        dilation, padding = (1, *module.dilation), (0, module.padding[0] if zero_pad else 0)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = module.padding if zero_pad else (0, 0)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


for _t in (nn.Linear,):
    register_layer_type(_t, "linear", _linear_inputs)
for _t in (nn.Conv1d, nn.Conv2d):
    register_layer_type(_t, "conv", unfold)
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.modules.batchnorm._BatchNorm):
    register_layer_type(_t, "batchnorm")  # plan() admits only running statistics


def layer_tokens(module: nn.Module, inputs: list[Tensor]) -> Tensor:
    """The recorded inputs of a Linear/convolution (one tensor per call) as ``(N, din, T)``.

    Several calls of the same module are concatenated along the token axis (a layer applied
    twice sees both inputs: its weight gradient is the sum over all its positions).
    """
    entry = _layer_type(module)
    if entry.tokens is None:
        raise CaptureUnsupported(f"a {type(module).__name__} has no input tokens")
    parts = [entry.tokens(module, x) for x in inputs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def output_tokens(module: nn.Module, grads: list[Tensor], batch_dims: int = 0) -> Tensor:
    """Output gradients (one per call, ``(*B, N, ...)``) as ``(*B, N, dout, T)``.

    ``batch_dims`` leading dimensions (a stack of cotangents) are kept as they are.
    """
    kind = layer_kind(module)
    parts = []
    for g in grads:
        lead = g.shape[: batch_dims + 1]
        if kind == "conv":  # (*B, N, out, *spatial)
            parts.append(g.reshape(*lead, g.shape[batch_dims + 1], -1))
        else:  # (*B, N, ..., out)
            parts.append(g.reshape(*lead, -1, g.shape[-1]).transpose(-1, -2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# --------------------------------------------------------------------------- planning


@dataclass
class Target:
    """A module that holds selected parameters directly.

    Attributes:
        name: module name in ``model.named_modules()`` (``""`` for the root).
        module: the module.
        kind: ``"linear"``, ``"conv"`` (Conv1d/Conv2d), ``"batchnorm"`` (running statistics)
            or ``"generic"`` (:func:`layer_kind`).
        params: ``{attribute name: parameter}`` of its selected direct parameters.
        strategy: how the last Gram call formed its Gram ("ghost", "materialise" or "vmap").
        calls: what the last recorded forward saw: ``(args, kwargs, output, versions)`` per call.
    """

    name: str
    module: nn.Module
    kind: str
    params: dict[str, nn.Parameter]
    strategy: str = ""
    checked: bool = False  # its parameters' use was watched through one recorded forward
    calls: list[tuple[tuple, dict, Tensor, list[int]]] = field(default_factory=list, repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


def has_batch_statistics(model: nn.Module) -> bool:
    """True when a BatchNorm normalises with the statistics of the batch (train mode, or no
    running statistics): then an example's output depends on the other examples of the batch."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def plan(model: nn.Module, names: list[str]) -> list[Target]:
    """The modules of ``model`` that hold the selected parameters ``names`` directly.

    Raises:
        CaptureUnsupported: a BatchNorm with batch statistics, or a parameter held by two
            modules.
    """
    if has_batch_statistics(model):
        raise CaptureUnsupported(
            "a BatchNorm uses batch statistics (train mode or track_running_stats=False), so "
            "per-example gradients are coupled through the batch"
        )
    named = dict(model.named_parameters())
    selected = {id(named[n]) for n in names}
    owners: dict[int, str] = {}
    targets: list[Target] = []
    for mod_name, module in model.named_modules():
        direct: dict[str, nn.Parameter] = {}
        for attr, p in module._parameters.items():
            if p is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            if id(p) in owners and id(p) in selected:
                raise CaptureUnsupported(f"parameter {full} is the same tensor as {owners[id(p)]}")
            owners.setdefault(id(p), full)
            if id(p) in selected:
                direct[attr] = p
        if direct:
            targets.append(Target(mod_name, module, layer_kind(module), direct))
    return targets


# --------------------------------------------------------------------------- recording


class Recorder:
    """Forward hooks that record (args, kwargs, output, versions) of every target while active.

    ``strict=False``: a parameter read outside its module's forward does not raise; the module's
    name and the reason go to :attr:`misused` (the caller drops those targets).
    """

    def __init__(self, targets: list[Target], *, strict: bool = True) -> None:
        self.targets = targets
        self.strict = strict
        self.misused: dict[str, str] = {}  # target name -> why (when not strict)
        self.active = False
        self.clone = False
        self.stack: list[Target] = []  # targets whose forward is running, innermost last
        self.owner = {id(p): t for t in targets for p in t.params.values()}
        self.handles = []
        for t in targets:
            self.handles.append(t.module.register_forward_pre_hook(self._enter(t)))
            self.handles.append(t.module.register_forward_hook(self._hook(t), with_kwargs=True))

    def _enter(self, target: Target) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if self.active:
                self.stack.append(target)

        return pre_hook

    def _hook(self, target: Target) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            if not self.active:
                return None
            if self.stack and self.stack[-1] is target:
                self.stack.pop()
            if not isinstance(output, Tensor):
                raise CaptureUnsupported(
                    f"module {target.name or '<root>'} returns a {type(output).__name__}, "
                    "not a tensor"
                )
            if self.clone:  # keep the recorded tensors out of reach of later in-place ops
                args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
                target.calls.append((args, kwargs, output, _versions_of(args, output)))
                return output.clone()
            target.calls.append((args, kwargs, output, _versions_of(args, output)))
            return None

        return hook

    def check(self, values: object) -> None:
        """Raise if a recorded parameter is read outside its own module's forward."""
        if isinstance(values, (list, tuple)):
            for v in values:
                self.check(v)
        elif isinstance(values, dict):
            for v in values.values():
                self.check(v)
        elif isinstance(values, Tensor) and id(values) in self.owner:
            t = self.owner[id(values)]
            if t not in self.stack or (t.kind != "generic" and self.stack[-1] is not t):
                where = f"in {self.stack[-1].name or '<root>'}'s forward" if self.stack else ""
                why = f"parameter of {t.name or '<root>'} is used outside that module's own forward"
                if self.strict:
                    raise CaptureUnsupported(why)
                self.misused.setdefault(t.name, f"{why} {where}".strip())

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _Guard(TorchFunctionMode):
    """During the recorded forward: every torch call's tensor arguments go through ``check``."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.recorder.check(args)
        self.recorder.check(kwargs)
        return func(*args, **kwargs)


def _versions_of(args: tuple, output: Tensor) -> list[int]:
    return [a._version for a in args if isinstance(a, Tensor)] + [output._version]


def _changed(targets: list[Target]) -> bool:
    return any(
        _versions_of(args, out) != versions for t in targets for args, _, out, versions in t.calls
    )


def record_forward(model: nn.Module, recorder: Recorder, x: Tensor) -> Tensor:
    """One batched forward of ``x`` with the hooks active; the logits (N, K), with a graph.

    Afterwards each target's ``calls`` hold what it saw. Parameter use is watched on a
    target's first recorded forward only (the code path of a forward does not change between
    chunks of the same model).

    Raises:
        CaptureUnsupported: a recorded tensor is changed in place even after cloning, a
            parameter is used outside its module, or the output is not (N, K) logits.
    """
    targets = recorder.targets
    for clone in (False, True):
        for t in targets:
            t.calls = []
        recorder.active, recorder.clone, recorder.stack = True, clone, []
        try:
            guard = _Guard(recorder) if not all(t.checked for t in targets) else nullcontext()
            with torch.enable_grad(), guard:
                z = model(x)
        finally:
            recorder.active = False
        if not _changed(targets):
            break
        if clone:
            raise CaptureUnsupported("a recorded layer input or output is modified in place")
    if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[0] != x.shape[0]:
        raise CaptureUnsupported("the model's output is not a (N, ...) tensor")
    for t in targets:
        t.checked = True
    return z


def backward_to_outputs(
    z: Tensor,
    targets: list[Target],
    cotangent: Tensor,
    *,
    batched: bool = False,
    retain_graph: bool = False,
) -> list[list[Tensor]]:
    """Gradients of ``<z, cotangent>`` at every recorded output: per target, one per call.

    Args:
        z: the logits returned by :func:`record_forward`.
        targets: the recorder's targets (their ``calls`` from that forward).
        cotangent: (N, K), or with ``batched`` a stack (B, N, K) whose B backward passes run as
            one vmapped backward (``is_grads_batched``).
        retain_graph: keep the forward's graph for another backward (with other cotangents).

    Returns:
        ``grads[i][j]``: detached gradient at call j's output of target i, shaped like the output
        (with the leading B when batched); zeros where the output does not reach the logits.
    """
    outputs = [out for t in targets for (_, _, out, _) in t.calls if out.requires_grad]
    got = (
        torch.autograd.grad(
            z,
            outputs,
            cotangent,
            allow_unused=True,
            is_grads_batched=batched,
            retain_graph=retain_graph,
        )
        if outputs
        else []
    )
    it = iter(got)
    result: list[list[Tensor]] = []
    for t in targets:
        gs = []
        for _, _, out, _ in t.calls:
            g = next(it) if out.requires_grad else None
            if g is None:
                shape = (cotangent.shape[0], *out.shape) if batched else out.shape
                g = torch.zeros(shape, dtype=out.dtype, device=out.device)
            gs.append(g.detach())
        result.append(gs)
    return result
