"""Function-preserving reparametrisations: chain tracing and the transforms.

- :mod:`flatcli.reparam.chain`: :func:`trace_chain` reads a model as a single chain of
  operations (torch.fx, or the children of an ``nn.Sequential``), refusing branches.
- :mod:`flatcli.reparam.transforms`: :func:`layer_scale` (Dinh et al. 2017's ``T_α``),
  :func:`neuron_scale` (Tsuzuku et al. 2020, Eqs. 15-16), :func:`bn_scale`,
  :func:`apply_transform` by name and :func:`max_logit_difference` to check one.

Which sharpness measures such a transform changes is a measure of its own, built on this
package: :func:`flatcli.measures.invariance.audit_invariance` (``flatcli sharpness
--invariance``). This package imports no measure.
"""

from __future__ import annotations

from flatcli.reparam.chain import ChainOp, trace_chain, weight_layers
from flatcli.reparam.transforms import (
    Transform,
    apply_transform,
    bn_scale,
    default_layer_alphas,
    layer_scale,
    max_logit_difference,
    neuron_scale,
)

__all__ = [
    # a model as a chain of operations
    "ChainOp",
    "trace_chain",
    "weight_layers",
    # a transform by name, and the check that it preserved the function
    "Transform",
    "apply_transform",
    "max_logit_difference",
    # the transforms
    "layer_scale",
    "neuron_scale",
    "bn_scale",
    "default_layer_alphas",
]
