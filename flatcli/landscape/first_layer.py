"""The input layer of a slice, computed once per batch: it is linear in its own weights.

The first layer a network applies to its input (a ``Linear`` or a convolution, with only
parameter-free modules such as ``Flatten`` before it) computes z = W u + b from an input u that
no parameter changes. Along a slice its weights are W* + α D₁ + β D₂ (and the bias likewise), so

    z(α, β) = (W* u + b*) + α (D₁ u + d₁) + β (D₂ u + d₂) = z₀ + α z₁ + β z₂

exactly (up to rounding). :func:`evaluate_points <flatcli.landscape.evaluate.evaluate_points>`
computes z₀, z₁, z₂ once per batch of examples and each point's z as their combination, instead
of one application of the layer per point: on LeNet-5 the first convolution, at full resolution,
is about a third of a forward pass. At the centre (α = β = 0) the combination is z₀ itself.

:func:`find_first_layer` recognises such a layer on a probe forward, and refuses (returns None)
whenever the factoring could be wrong: a root module holding parameters or buffers itself, a
module with parameters or buffers before the layer, a layer called more than once, weights
shared with another module, or a layer of another kind. A language model's first layer is its
token embedding (an ``nn.Embedding`` of integer token ids, another kind), so a transformer LM is
not factored and every point computes its whole forward; a model that turns integer inputs into
floats itself (a one-hot, say) before a ``Linear`` is factored like any other, since the layer's
input u is captured from the model's own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

__all__ = ["FirstLayer", "find_first_layer"]


class _Stop(Exception):
    """Ends a forward once the first layer's input is known."""


@dataclass(frozen=True)
class FirstLayer:
    """The input layer ``module`` (named ``name``) and its parameters' names."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None

    def capture(self, model: nn.Module, state: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The layer's input u for the examples ``x`` (only the modules before it run)."""
        seen: list[Tensor] = []

        def hook(_module: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise _Stop

        handle = self.module.register_forward_pre_hook(hook)
        try:
            functional_call(model, dict(state), (x,))
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0]

    def apply(self, u: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """W u + b with the weight and bias of ``params`` (θ* or a direction)."""
        w = params[self.weight]
        b = params[self.bias] if self.bias is not None else None
        if isinstance(self.module, nn.Linear):
            return nn.functional.linear(u, w, b)
        return self.module._conv_forward(u, w, b)

    def outputs(
        self, u: Tensor, theta: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]]
    ) -> list[Tensor]:
        """[z₀ = W* u + b*, then z_k = D_k u + d_k for each direction], each (B, ...).

        A 2-D convolution's input is put in channels-last order on a CPU first, so its outputs,
        and the rest of the network after them, run in that order (faster there for the
        convolutions and poolings that follow: 22% for the rest of LeNet-5).
        """
        if isinstance(self.module, nn.Conv2d) and u.dim() == 4 and u.device.type == "cpu":
            u = u.contiguous(memory_format=torch.channels_last)
        return [self.apply(u, p) for p in (theta, *directions)]

    @contextlib.contextmanager
    def replaced(self, slot: dict[str, Any]) -> Iterator[None]:
        """Within the block the layer returns ``slot["z"]`` instead of computing its output."""
        module = self.module
        had = "forward" in vars(module)
        previous = vars(module).get("forward")
        module.forward = lambda *args, **kwargs: slot["z"]
        try:
            yield
        finally:
            if had:
                module.forward = previous
            else:
                del module.forward


def find_first_layer(model: nn.Module, x: Tensor) -> FirstLayer | None:
    """The input layer of ``model`` that may be factored (module docstring), or None.

    A forward of one example records the modules in the order they are called.
    """
    if any(True for _ in model.named_parameters(recurse=False)) or any(
        True for _ in model.named_buffers(recurse=False)
    ):
        return None
    names = {m: n for n, m in model.named_modules()}
    calls: list[nn.Module] = []
    handles = [
        m.register_forward_pre_hook(lambda m, a: calls.append(m)) for m in names if m is not model
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    except Exception:  # noqa: BLE001 - a model the probe cannot run is simply not factored
        return None
    finally:
        for h in handles:
            h.remove()
    first = None
    for module in calls:
        own = list(module.named_parameters(recurse=False))
        if own:
            first = module
            break
        if any(True for _ in module.named_buffers(recurse=False)):
            return None
    if first is None or calls.count(first) != 1 or any(True for _ in first.children()):
        return None
    if not isinstance(first, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return None
    if isinstance(first, _ConvNd) and first.padding_mode != "zeros":
        return None
    name = names[first]
    weight = f"{name}.weight"
    bias = f"{name}.bias" if first.bias is not None else None
    owned = {id(first.weight), id(first.bias)}
    shared = [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if id(p) in owned and n not in (weight, bias)
    ]
    if shared:
        return None
    return FirstLayer(name, first, weight, bias)
