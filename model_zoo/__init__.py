"""A small zoo of the networks the flatness papers measure, torchvision.models style.

Build a model by name; the keyword arguments are the builder's (see its docstring):

>>> import model_zoo
>>> model = model_zoo.get_model("lenet5", num_classes=10, in_channels=1)
>>> sum(p.numel() for p in model.parameters())
61706
>>> "resnet20" in model_zoo.list_models()
True
>>> model_zoo.get_model("lenet")
Traceback (most recent call last):
...
model_zoo.registry.UnknownModelError: unknown model 'lenet'; valid names: ...

Every model uses non-in-place activations, so ``torch.func`` transforms (``vmap``, ``grad``,
``jvp``, ``functional_call``) work on each of them in eval mode.
"""

from __future__ import annotations

from . import cnn6, densenet, gpt, lenet, mlp, resnet, vgg, wrn  # noqa: F401  (registers the models)
from ._common import Activation
from .registry import (
    UnknownModelError,
    get_model,
    get_model_builder,
    list_models,
    model_kwargs,
    register_model,
)

__all__ = [
    # building models
    "get_model",
    "list_models",
    "UnknownModelError",
    # inspecting and extending the registry
    "get_model_builder",
    "model_kwargs",
    "register_model",
    # choices
    "Activation",
]
