"""Curvature operators against dense float64 truth built with torch.func on tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from flatcli.curvature import memory
from flatcli.curvature.losses import normalized_cross_entropy
from flatcli.curvature.operators import eval_mode, make_operator
from flatcli.curvature.params import select_parameters
from flatcli.errors import UsageError
from tests.cases import CASE_NAMES, make_case
from tests.references import dense_exact_fisher, dense_ggn, dense_hessian, dense_mc_fisher

METHODS = ("forward-over-reverse", "double-backward")
SUBSETS = {"mlp_tanh": "3", "mlp_relu": "5.*", "cnn": "0", "cnn_bn": "1"}  # a layer each


def assert_close(A, B, rtol=1e-10):
    scale = torch.linalg.matrix_norm(B).item()
    err = torch.linalg.matrix_norm(A - B).item()
    assert err <= rtol * max(scale, 1e-30), f"relative error {err / scale:.3g} (norm {scale:.3g})"


def _names(model, subset):
    return select_parameters(model, subset)


# ---------------------------------------------------------------- Hessian


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_hessian_equals_dense(case, method):
    model, x, y = make_case(case)
    op = make_operator("hessian", model, x, y, hvp_method=method, batch_size=12)
    assert op.hvp_method == method
    assert_close(op.to_dense(), dense_hessian(model, x, y, op.param_names))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hessian_layer_block_is_dense_subblock(case):
    model, x, y = make_case(case)
    full = make_operator("hessian", model, x, y)
    sub = make_operator("hessian", model, x, y, params=SUBSETS[case])
    assert 0 < sub.dim < full.dim
    idx = torch.cat([torch.arange(full.dim)[full.slices[n]] for n in sub.param_names])
    H = dense_hessian(model, x, y, full.param_names)
    assert_close(sub.to_dense(), H[idx][:, idx])


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_full_batch(kind, method):
    model, x, y = make_case("cnn_bn")
    full = make_operator(kind, model, x, y, batch_size=12, hvp_method=method)
    chunked = make_operator(kind, model, x, y, batch_size=5, hvp_method=method)
    assert_close(chunked.to_dense(), full.to_dense(), rtol=1e-12)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("method", METHODS)
def test_matmat_equals_columnwise_matvec(kind, method):
    model, x, y = make_case("mlp_tanh")
    op = make_operator(kind, model, x, y, hvp_method=method, batch_size=5)
    V = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = op.matvecs
    AV = op.matmat(V)
    assert op.matvecs == before + 4
    cols = torch.stack([op.matvec(V[:, j]) for j in range(4)], dim=1)
    assert op.matvecs == before + 8
    assert_close(AV, cols, rtol=1e-12)
    assert op.matmat_method == ("vmap" if method == "forward-over-reverse" else "loop")


# ---------------------------------------------------------------- GGN and Fisher


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_ggn_equals_dense(case, method):
    model, x, y = make_case(case)
    op = make_operator("ggn", model, x, y, hvp_method=method)
    assert_close(op.to_dense(), dense_ggn(model, x, y, op.param_names))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_ggn_layer_block_is_dense_subblock(case):
    model, x, y = make_case(case)
    sub = make_operator("ggn", model, x, y, params=SUBSETS[case])
    assert_close(sub.to_dense(), dense_ggn(model, x, y, sub.param_names))


@pytest.mark.parametrize("method", METHODS)
def test_nsce_ggn_equals_dense(method):
    model, x, y = make_case("mlp_tanh")
    op = make_operator("ggn", model, x, y, loss_fn=normalized_cross_entropy, hvp_method=method)
    G = dense_ggn(model, x, y, op.param_names, normalized_cross_entropy)
    assert_close(op.to_dense(), G)
    # NSCE's head Hessian is not diag(p) - pp^T: its GGN differs from its exact Fisher
    F = make_operator("fisher", model, x, y, loss_fn="nsce", fisher_type="exact").to_dense()
    assert torch.linalg.matrix_norm(F - G) > 1e-3 * torch.linalg.matrix_norm(G)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_exact_fisher_equals_ggn_for_cross_entropy(case):
    model, x, y = make_case(case)
    F = make_operator("fisher", model, x, y, fisher_type="exact").to_dense()
    assert_close(F, dense_ggn(model, x, y, select_parameters(model, None)))


def test_exact_fisher_nsce_equals_dense():
    model, x, y = make_case("cnn")
    op = make_operator("fisher", model, x, y, loss_fn=normalized_cross_entropy, fisher_type="exact")
    assert_close(
        op.to_dense(), dense_exact_fisher(model, x, y, op.param_names, normalized_cross_entropy)
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_mc_fisher_equals_dense_with_same_labels(case, method):
    model, x, y = make_case(case)
    op = make_operator("fisher", model, x, y, mc_samples=3, seed=7, hvp_method=method, batch_size=5)
    assert op.fisher_type == "mc" and op.mc_labels.shape == (12, 3)
    F = op.to_dense()
    assert_close(F, dense_mc_fisher(model, x, op.mc_labels, op.param_names))
    assert_close(F, F.T, rtol=1e-14)


def test_mc_fisher_is_default_seeded_and_converges_to_exact():
    model, x, y = make_case("mlp_tanh")
    a = make_operator("fisher", model, x, y, seed=3)
    b = make_operator("fisher", model, x, y, seed=3)
    c = make_operator("fisher", model, x, y, seed=4)
    assert a.fisher_type == "mc" and a.mc_samples == 1
    assert torch.equal(a.mc_labels, b.mc_labels)
    assert not torch.equal(a.mc_labels, c.mc_labels)
    exact = make_operator("fisher", model, x, y, fisher_type="exact").to_dense()
    many = make_operator("fisher", model, x, y, mc_samples=4000, seed=0).to_dense()
    rel = torch.linalg.matrix_norm(many - exact) / torch.linalg.matrix_norm(exact)
    assert rel < 0.1


def test_fisher_of_non_likelihood_loss_is_refused():
    model, x, y = make_case("mlp_tanh")

    def squared(z, labels):
        onehot = (labels[..., None] == torch.arange(z.shape[-1])).to(z.dtype)
        return ((z - onehot) ** 2).sum(-1)

    with pytest.raises(UsageError, match="negative log-likelihood"):
        make_operator("fisher", model, x, y, loss_fn=squared)
    # but the Hessian and GGN of any loss are fine
    op = make_operator("ggn", model, x, y, loss_fn=squared)
    assert_close(op.to_dense(), dense_ggn(model, x, y, op.param_names, squared))


# ---------------------------------------------------------------- Hessian vs GGN (measured)


def test_relu_hessian_and_ggn_share_the_diagonal_but_tanh_does_not():
    model, x, y = make_case("mlp_relu")
    H = make_operator("hessian", model, x, y).to_dense()
    G = make_operator("ggn", model, x, y).to_dense()
    assert torch.allclose(torch.diagonal(H), torch.diagonal(G), rtol=1e-10, atol=1e-14)
    assert abs(H.trace() - G.trace()) <= 1e-10 * abs(G.trace())
    assert torch.linalg.matrix_norm(H - G) > 1e-3 * torch.linalg.matrix_norm(G)  # off-diagonal

    model, x, y = make_case("mlp_tanh")
    H = make_operator("hessian", model, x, y).to_dense()
    G = make_operator("ggn", model, x, y).to_dense()
    assert abs(H.trace() - G.trace()) > 1e-3 * abs(G.trace())


# ---------------------------------------------------------------- dtypes, fallbacks, modes


def test_float32_with_float64_head_matches_float64():
    model, x, y = make_case("cnn")
    ref = make_operator("ggn", model, x, y).to_dense()
    model32 = model.float()
    op = make_operator("ggn", model32, x.float(), y, head_dtype=torch.float64)
    assert op.dtype == torch.float32
    A = op.to_dense()
    assert A.dtype == torch.float32
    assert_close(A.double(), ref, rtol=1e-5)
    H = make_operator("hessian", model32, x, y, head_dtype=torch.float64)  # x cast to float32
    assert H.matvec(torch.ones(H.dim)).dtype == torch.float32


class _NoForwardTanh(torch.autograd.Function):
    """tanh with a reverse-mode rule only (old style: no forward AD, no torch.func support)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)  # differentiable: double backward works


class _Act(nn.Module):
    def forward(self, x):
        return _NoForwardTanh.apply(x)


def test_auto_prefers_double_backward_for_hessian_forward_mode_for_ggn():
    model, x, y = make_case("cnn")
    assert make_operator("hessian", model, x, y).hvp_method == "double-backward"
    for kind in ("ggn", "fisher"):
        op = make_operator(kind, model, x, y)
        assert op.hvp_method == "forward-over-reverse" and op.fallback_reason is None


def test_auto_falls_back_to_double_backward_without_forward_mode():
    model, x, y = make_case("mlp_tanh")
    twin = make_case("mlp_tanh")[0]
    twin[2], twin[4] = _Act(), _Act()
    for kind in ("hessian", "ggn"):
        op = make_operator(kind, twin, x, y, hvp_method="auto")
        assert op.hvp_method == "double-backward"
        if kind == "ggn":
            assert "forward-over-reverse failed" in op.fallback_reason
        ref = make_operator(kind, model, x, y).to_dense()
        assert_close(op.to_dense(), ref)
        assert op.describe()["hvp_method"] == "double-backward"
    with pytest.raises(RuntimeError):
        make_operator("ggn", twin, x, y, hvp_method="forward-over-reverse")


class _NoDoubleBackwardTanh(torch.autograd.Function):
    """tanh whose backward is not differentiable, but with a forward-mode rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return _Opaque.apply(g * (1 - out**2))

    @staticmethod
    def jvp(ctx, t):
        (out,) = ctx.saved_tensors
        return t * (1 - out**2)


class _Opaque(torch.autograd.Function):
    """Identity on its first input whose own backward refuses (no double backward)."""

    @staticmethod
    def forward(a):
        return a.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("double backward is not implemented for this op")

    @staticmethod
    def jvp(ctx, ta):
        return ta


def test_auto_falls_back_to_forward_mode_without_double_backward():
    model, x, y = make_case("mlp_tanh")
    twin = make_case("mlp_tanh")[0]
    act = type("Act", (nn.Module,), {"forward": lambda self, t: _NoDoubleBackwardTanh.apply(t)})
    twin[2], twin[4] = act(), act()
    op = make_operator("hessian", twin, x, y)
    assert op.hvp_method == "forward-over-reverse"
    assert "double-backward failed" in op.fallback_reason
    assert_close(op.to_dense(), make_operator("hessian", model, x, y).to_dense())


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_cached_graph_is_reused_and_follows_in_place_changes(kind):
    model, x, y = make_case("mlp_tanh")
    op = make_operator(kind, model, x, y, hvp_method="double-backward")  # one chunk: cached
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = op.matvec(v)
    assert len(op._graphs) == 1
    graph = next(iter(op._graphs.values()))[1]
    assert torch.equal(op.matvec(v), first)
    assert next(iter(op._graphs.values()))[1] is graph  # reused, not rebuilt
    with torch.no_grad():
        model[1].weight.mul_(1.5)
    fresh = make_operator(kind, model, x, y, hvp_method="forward-over-reverse", cache=False)
    assert torch.allclose(op.matvec(v), fresh.matvec(v), rtol=1e-10, atol=1e-13)
    op.release()
    assert not op._graphs
    chunked = make_operator(kind, model, x, y, hvp_method="double-backward", batch_size=5)
    chunked.matvec(v)
    assert not chunked._graphs  # several chunks: nothing is kept
    ref = make_operator(kind, model, x, y).to_dense()
    assert_close(op.to_dense(), ref)
    assert op.describe()["hvp_method"] == "double-backward"


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_cpu_split_chunks_keep_every_graph_and_follow_in_place_changes(kind, monkeypatch):
    """An automatic chunk split on the CPU (small activations per chunk) keeps each chunk's
    graph: later products rebuild nothing, match the dense matrix, and see in-place changes."""
    monkeypatch.setattr(memory, "CPU_TENSOR_BYTES", 4 * 6 * 8)  # 4 examples of the 6 inputs
    model, x, y = make_case("mlp_tanh")
    op = make_operator(kind, model, x, y, hvp_method="double-backward")
    assert op.batch_size == 4 and op._cache_every_chunk
    built = []
    real = op._build_graph
    monkeypatch.setattr(op, "_build_graph", lambda chunk: built.append(chunk.start) or real(chunk))
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = op.matvec(v)
    assert built == [0, 4, 8] and len(op._graphs) == 3
    assert torch.equal(op.matvec(v), first) and built == [0, 4, 8]  # all three reused
    reference = dense_hessian if kind == "hessian" else dense_ggn
    torch.testing.assert_close(first, reference(model, x, y) @ v, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        model[1].weight.mul_(1.5)
    torch.testing.assert_close(op.matvec(v), reference(model, x, y) @ v, rtol=1e-10, atol=1e-13)
    assert built == [0, 4, 8, 0, 4, 8] and len(op._graphs) == 3


def test_cnn_bn_in_eval_mode_uses_running_statistics():
    model, x, y = make_case("cnn_bn")
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        make_operator("hessian", model, x, y, batch_size=12, hvp_method="double-backward")
    with eval_mode(model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            op = make_operator("hessian", model, x, y, batch_size=5)
        A = op.to_dense()
        assert_close(A, dense_hessian(model, x, y, op.param_names))
    assert model.training and model[1].training  # restored
    running = model[1].running_mean.clone()
    with pytest.warns(UserWarning, match="training mode"):
        op = make_operator("hessian", model, x, y, batch_size=6, hvp_method="double-backward")
    op.to_dense()
    assert torch.equal(model[1].running_mean, running)  # products never touch the model's buffers


def test_usage_errors():
    model, x, y = make_case("mlp_tanh")
    with pytest.raises(UsageError, match="Unknown kind 'hessain'; choose one of 'hessian'"):
        make_operator("hessain", model, x, y)
    with pytest.raises(UsageError, match="modules with parameters: 1, 3, 5"):
        make_operator("hessian", model, x, y, params=["layer9"])
    with pytest.raises(UsageError, match="12 examples"):
        make_operator("hessian", model, x, y[:5])
    op = make_operator("hessian", model, x, y)
    with pytest.raises(ValueError, match=r"shape \(74,\)"):
        op.matvec(torch.zeros(3, dtype=torch.float64))


def test_protocol_attributes_and_auto_batch_size():
    from flatcli.curvature.linop import LinearOperator

    model, x, y = make_case("cnn")
    op = make_operator("ggn", model, x, y)  # batch_size=None: chosen to fit memory
    assert isinstance(op, LinearOperator)
    assert 1 <= op.batch_size <= 12
    assert op.dim == sum(p.numel() for p in model.parameters())
    assert op.dtype == torch.float64 and op.device.type == "cpu" and op.matvecs == 0
    assert list(op.slices) == op.param_names == [n for n, _ in model.named_parameters()]
    assert op.param_shapes["0.weight"] == (3, 2, 3, 3)
    d = op.describe()
    assert d["kind"] == "ggn" and d["hvp_method"] == "forward-over-reverse"
    assert d["matmat_method"] == "vmap" and d["fallback_reason"] is None
