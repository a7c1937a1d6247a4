"""The shared layer capture: registry, one recorded forward, one (batched) backward to outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatcli.curvature import capture, kfac
from flatcli.curvature.capture import (
    LAYER_TYPES,
    CaptureUnsupported,
    Recorder,
    backward_to_outputs,
    layer_kind,
    layer_tokens,
    output_tokens,
    plan,
    record_forward,
    register_layer_type,
    unfold,
)
from flatcli.curvature.kfac import kfac_factors

F64 = torch.float64


class OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class SameForward(nn.Linear):
    pass


def test_registry_kinds():
    assert layer_kind(nn.Linear(2, 3)) == "linear"
    assert layer_kind(nn.Conv1d(2, 3, 3)) == "conv"
    assert layer_kind(nn.Conv2d(2, 3, 3)) == "conv"
    assert layer_kind(nn.BatchNorm2d(3)) == "batchnorm"
    assert layer_kind(SameForward(2, 3)) == "linear"  # a subclass that keeps the forward
    assert layer_kind(OwnForward(2, 3)) == "generic"  # ... or not
    assert layer_kind(nn.LayerNorm(3)) == "generic"


def test_register_a_new_layer_type():
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight, self.bias)

    assert layer_kind(Scaled(2, 3)) == "generic"
    register_layer_type(Scaled, "linear", LAYER_TYPES[nn.Linear].tokens)
    try:
        assert layer_kind(Scaled(2, 3)) == "linear"
    finally:
        del LAYER_TYPES[Scaled]


@pytest.mark.parametrize("conv", [nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Conv1d(2, 3, 3)])
def test_unfold_reproduces_the_convolution(conv):
    conv = conv.double()
    shape = (4, 2, 7, 7) if isinstance(conv, nn.Conv2d) else (4, 2, 9)
    x = torch.randn(shape, dtype=F64)
    X = unfold(conv, x)  # (N, C·k, P): Eq. 30, Z = W X + B
    Z = conv.weight.reshape(conv.out_channels, -1) @ X + conv.bias[:, None]
    assert torch.allclose(Z, conv(x).flatten(2), atol=1e-12)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8, 3)
    ).double()


def test_one_forward_and_batched_backward_equal_separate_backwards():
    model = _net()
    x = torch.randn(5, 1, 4, 4, dtype=F64)
    targets = plan(model, [n for n, _ in model.named_parameters()])
    assert [t.kind for t in targets] == ["conv", "linear"]
    cot = torch.randn(3, 5, 3, dtype=F64)
    with Recorder(targets) as rec:
        z = record_forward(model, rec, x)
        grads = backward_to_outputs(z, targets, cot, batched=True)
        inputs = [t.calls[0][0][0] for t in targets]
    # reference: plain autograd per cotangent, through hooks that keep the outputs, on the
    # same layers without the in-place ReLU
    ref_model = nn.Sequential(model[0], nn.ReLU(), model[2], model[3])
    outs = {}
    hs = [
        m.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
        for i, m in enumerate([model[0], model[3]])
    ]
    z2 = ref_model(x)
    for h in hs:
        h.remove()
    for b in range(3):
        ref = torch.autograd.grad(z2, [outs[0], outs[1]], cot[b], retain_graph=True)
        assert torch.allclose(grads[0][0][b], ref[0], atol=1e-12)
        assert torch.allclose(grads[1][0][b], ref[1], atol=1e-12)
    # the in-place ReLU after the conv did not corrupt the recorded conv output's gradient,
    # and the tokens have the layouts the engines expect
    assert layer_tokens(model[0], [inputs[0]]).shape == (5, 9, 4)
    assert output_tokens(model[0], grads[0], batch_dims=1).shape == (3, 5, 2, 4)
    assert output_tokens(model[3], grads[1], batch_dims=1).shape == (3, 5, 3, 1)


def test_shared_parameter_is_refused():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 3))
    model[2].weight = lin.weight
    with pytest.raises(CaptureUnsupported, match="same tensor"):
        plan(model, [n for n, _ in model.named_parameters()])


def test_kfac_stacked_fallback_equals_vmapped(monkeypatch):
    model = _net()
    x = torch.randn(6, 1, 4, 4, dtype=F64)
    y = torch.randint(0, 3, (6,))
    want = kfac_factors(model, x, y)
    real = capture.backward_to_outputs

    def no_vmap(z, targets, cot, *, batched=False):
        if batched:
            raise RuntimeError("vmap: no batching rule implemented for this op")
        return real(z, targets, cot)

    monkeypatch.setattr(kfac, "backward_to_outputs", no_vmap)
    got = kfac_factors(model, x, y, batch_size=4)
    for k in want:
        assert torch.allclose(got[k].em, want[k].em, atol=1e-13)
        assert torch.allclose(got[k].exx, want[k].exx, atol=1e-13)
