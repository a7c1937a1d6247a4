"""Curvature products through attention against dense float64 truth.

torch's fused attention kernels (flash, and ``nn.TransformerEncoderLayer``'s inference fast path)
have a first-order backward only: no forward-mode derivative and no derivative of the backward.
The operators try both of their methods as torch runs the model, then both again with
attention on its math kernel (softmax(QKᵀ/√d)V built of matmul and softmax) and without the fast
path, and say so in ``fallback_reason`` and ``describe()["attention_kernel"]``. The references
differentiate the same functions with ``torch.func`` under the math kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatcli.curvature._functional import attention_kernel
from flatcli.curvature.diagonal import ggn_diagonal
from flatcli.curvature.gram import per_example_gradients
from flatcli.curvature.operators import make_operator
from flatcli.curvature.params import flatten_params
from tests.cases import make_case
from tests.references import dense_exact_fisher, dense_ggn, dense_jacobian, flat_logits


class _Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (multi-head attention, LayerNorm, GELU) and a mean-pooled
    linear head: a vision-transformer-shaped classifier over 3 tokens of width 4."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=6, dropout=0.0, activation="gelu", batch_first=True
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


class _Causal(nn.Module):
    """nanoGPT-style causal self-attention by ``F.scaled_dot_product_attention``, RMS-normalised
    and SiLU-gated, classifying from the last token."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.RMSNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.proj(h.transpose(1, 2).reshape(b, t, c))
        return self.head(F.silu(self.norm(h))[:, -1])


def _problem(build: type[nn.Module]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (6,))


def _hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Hessian of the mean cross-entropy by ``torch.autograd`` double backward, column by
    column on a flat parameter vector, checked symmetric and against central differences of the
    gradient.

    Not ``torch.func.hessian``: through ``nn.TransformerEncoderLayer`` it returns an asymmetric
    matrix (torch 2.14: entry (norm2.weight[3], norm1.weight[3]) is -0.1155 where central
    differences and the transposed entry give -0.0380).
    """
    theta0, logits = flat_logits(model, x)

    def gradient(theta: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        with torch.enable_grad():
            t = theta if create_graph else theta.detach().requires_grad_(True)
            loss = F.cross_entropy(logits(t), y)
            return torch.autograd.grad(loss, t, create_graph=create_graph)[0]

    theta = theta0.detach().requires_grad_(True)
    g = gradient(theta, create_graph=True)
    eye = torch.eye(len(theta0), dtype=theta0.dtype)
    H = torch.stack([torch.autograd.grad(g, theta, e, retain_graph=True)[0] for e in eye])
    assert float((H - H.T).abs().max()) <= 1e-12 * float(H.abs().max())
    h = 1e-5
    for i in range(0, len(theta0), 7):  # every 7th column by central differences
        fd = (gradient(theta0 + h * eye[i]) - gradient(theta0 - h * eye[i])) / (2 * h)
        assert float((fd - H[:, i]).abs().max()) <= 1e-7
    return H


REFERENCES = {"hessian": _hessian, "ggn": dense_ggn}


@pytest.mark.parametrize("build", [_Encoder, _Causal])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_products_through_attention_match_dense_truth(build: type[nn.Module], kind: str) -> None:
    model, x, y = _problem(build)
    extra = {"fisher_type": "exact"} if kind == "fisher" else {}
    op = make_operator(kind, model, x, y, **extra)
    with attention_kernel("math"):
        reference = (dense_exact_fisher if kind == "fisher" else REFERENCES[kind])(model, x, y)
    got = op.to_dense()
    scale = float(reference.abs().max())
    assert float((got - reference).abs().max()) <= 1e-10 * scale
    assert op.describe()["attention_kernel"] == "math"
    assert "math kernel" in op.fallback_reason


def test_the_fused_kernels_really_lack_the_derivatives() -> None:
    """What the fallback is for: torch's default attention fails a Hessian-vector product (if a
    torch release adds the derivatives, this test says the fallback is no longer needed)."""
    model, x, y = _problem(_Causal)
    v = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(torch.func.grad(loss), (params,), (v,))


def test_a_model_without_attention_keeps_torchs_kernels() -> None:
    model, x, y = make_case("mlp_tanh")
    op = make_operator("hessian", model, x, y)
    assert op.describe()["attention_kernel"] == "default" and op.fallback_reason is None


@pytest.mark.parametrize("build", [_Encoder, _Causal])
def test_first_order_rows_and_the_ggn_diagonal_through_attention(build: type[nn.Module]) -> None:
    """Per-example gradients (first order: the fused kernels suffice) and the GGN diagonal (the
    capture, or per-example Jacobians where a parameter is used outside its module)."""
    model, x, y = _problem(build)
    with attention_kernel("math"):
        J = dense_jacobian(model, x, y)
        G = dense_ggn(model, x, y)
    torch.testing.assert_close(per_example_gradients(model, x, y), J, rtol=1e-10, atol=1e-12)
    diag = flatten_params(ggn_diagonal(model, x, y))
    torch.testing.assert_close(diag, G.diagonal(), rtol=1e-10, atol=1e-12)


def test_per_example_rows_do_not_loop_over_a_kernel_vmap_cannot_batch() -> None:
    """The fused CPU attention kernel has no batching rule: under ``vmap`` torch would warn and
    run it example by example. The rows run the math kernel instead: no such warning, and the
    rows of the float32 model agree with the float64 ones to float32 rounding."""
    model, x, y = _problem(_Causal)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = per_example_gradients(model.float(), x.float(), y)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    reference = per_example_gradients(model.double(), x, y)
    torch.testing.assert_close(rows.double(), reference, rtol=1e-4, atol=1e-5)
