"""Every registered image model, on MNIST- and CIFAR-shaped inputs: the tests torchvision runs on
its zoo.

Parametrised over ``list_models()`` (the language models' versions of these tests are in
``test_gpt.py``), so a newly registered model is tested for free.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import model_zoo

from .shapes import CIFAR_SHAPE, IMAGE_MODELS, LANGUAGE_MODELS, batch, mnist_shape, small_shape

NAMES = IMAGE_MODELS


def build(name: str, shape: tuple[int, ...], seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return model_zoo.get_model(name, in_channels=shape[0], **kwargs)


def shapes(name: str) -> list[tuple[int, int, int]]:
    return [mnist_shape(name), CIFAR_SHAPE]


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape(name: str) -> None:
    for shape, classes in zip(shapes(name), (7, 10), strict=True):
        model = build(name, shape, num_classes=classes).eval()
        with torch.no_grad():
            out = model(batch(shape))
        assert out.shape == (2, classes), (name, shape)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    shape = small_shape(name)
    model = build(name, shape).train()  # BatchNorm on batch statistics: the training path
    x, y = batch(shape), torch.tensor([3, 5])
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    shape = small_shape(name)
    x = batch(shape, n=4)
    a = build(name, shape, seed=0).train()
    with torch.no_grad():
        a(x)  # move the BatchNorm running statistics away from their initial values
    a.eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build(name, shape, seed=1)
    b.load_state_dict(torch.load(buf, weights_only=True))
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", NAMES)
def test_torch_func_per_example_gradients(name: str) -> None:
    """functional_call + vmap(grad) over 2 examples in eval mode equals a loop of backward().

    In float64, so that the comparison is tight even for the 100-layer DenseNet.
    """
    shape = small_shape(name)
    model = build(name, shape).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x, y = batch(shape).double(), torch.tensor([1, 4])

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_example[k][i], p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_no_inplace_modules(name: str) -> None:
    model = build(name, CIFAR_SHAPE)
    inplace = [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    assert not inplace, f"{name} has in-place modules {inplace}"


# (name, kwargs, count we build, figure the paper quotes, relative tolerance, source)
# A quoted figure of None means the count is exact arithmetic from the paper's layer table.
PARAM_COUNTS = [
    ("lenet5", {"in_channels": 1}, 61_706, 61_706, 0.0, "LeNet-5 on MNIST"),
    ("lenet5-bn", {"in_channels": 1}, 61_706, 61_706, 0.0, "BN without affine adds none"),
    ("lenet5", {"in_channels": 3}, 62_006, None, 0.0, "K-FAC paper Table 4 (CIFAR-10)"),
    ("lenet5-bn", {"in_channels": 3}, 62_006, None, 0.0, "K-FAC paper Table 5 (CIFAR-10)"),
    ("mlp", {}, 199_210, None, 0.0, "K-FAC paper Table 3: F-200^2 on MNIST"),
    ("mlp", {"hidden": [32, 32]}, 26_506, 26_506, 0.0, "784-32-32-10 MLP"),
    ("cnn6", {"in_channels": 3}, 815_434, None, 0.0, "gamma paper App. E (no count quoted)"),
    ("resnet20", {"in_channels": 3}, 269_722, 270_000, 0.02, "He et al. 2016: 0.27M"),
    ("wrn", {"in_channels": 3}, 1_467_610, 1_470_000, 0.02, "WRN-28-2: 1.47M"),
    ("wrn", {"depth": 16, "widen_factor": 4}, 2_748_890, 2_750_000, 0.02, "WRN-16-4: 2.75M"),
    # The DenseNet paper quotes "0.8M" (one significant digit): the count must round to it.
    ("densenet-bc", {"in_channels": 3}, 769_162, 800_000, 0.0625, "Huang et al. Table 2: 0.8M"),
    ("vgg11", {"in_channels": 3}, 9_231_114, 9_200_000, 0.02, "CIFAR VGG-11-BN: 9.2M"),
    ("vgg11", {"batchnorm": False}, 9_225_610, 9_200_000, 0.02, "K-FAC paper VGG11: 9.2M"),
    # GPT: (V + block) C embeddings + L (12 C^2 + 13 C) blocks + 2 C final LayerNorm, tied head
    ("gpt-tiny", {}, 124_672, None, 0.0, "(256+128)*64 + 2*(12*64^2 + 13*64) + 2*64"),
    ("gpt-tiny", {"input_shape": [32]}, 118_528, None, 0.0, "block_size from the data: 32"),
    ("gpt-small", {}, 842_496, None, 0.0, "(256+128)*128 + 4*(12*128^2 + 13*128) + 2*128"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "count", "quoted", "tol", "source"),
    PARAM_COUNTS,
    ids=[
        f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}-{c}"
        for n, kw, c, *_ in PARAM_COUNTS
    ],
)
def test_parameter_count(name, kwargs, count, quoted, tol, source) -> None:
    got = sum(p.numel() for p in model_zoo.get_model(name, **kwargs).parameters())
    assert got == count, f"{name} {kwargs}: {got:,} parameters, expected {count:,} ({source})"
    if quoted is not None:
        assert abs(got - quoted) <= tol * quoted, f"{got:,} vs quoted {quoted:,} ({source})"


def test_every_model_has_a_count() -> None:
    assert {n for n, *_ in PARAM_COUNTS} == set(NAMES) | set(LANGUAGE_MODELS)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's own
@pytest.mark.parametrize("name", NAMES)
def test_forward_over_reverse_hvp(name: str) -> None:
    """torch.func.jvp(grad(loss)) (the curvature operators' fast HVP) runs in eval mode and
    agrees with double backward."""
    shape = small_shape(name)
    model = build(name, shape).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x, y = batch(shape), torch.tensor([1, 4])

    def loss(p: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=gen) for k, t in params.items()}
    _, hvp = jvp(grad(loss), (params,), (v,))
    leaves = [t.clone().requires_grad_() for t in params.values()]
    g = torch.autograd.grad(loss(dict(zip(params, leaves, strict=True))), leaves, create_graph=True)
    dot = sum((gi * v[k]).sum() for gi, k in zip(g, params, strict=True))
    reference = torch.autograd.grad(dot, leaves)
    scale = max(r.abs().max() for r in reference)
    for k, r in zip(params, reference, strict=True):
        torch.testing.assert_close(hvp[k], r, rtol=1e-3, atol=1e-4 * float(scale), msg=k)
