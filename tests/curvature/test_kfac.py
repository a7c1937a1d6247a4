"""K-FAC factors and structure against dense float64 truths (Wu et al. 2020, Eqs. 5-37)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn import functional as F

from flatcli.curvature.kfac import (
    correspondence,
    decoupling_error,
    eigenbasis_coefficients,
    input_structure,
    kfac_factors,
    kron_eigenvectors,
    kron_matvec,
    kron_top,
    outlier_gap,
    overlap_curve,
    rank1_scores,
)
from flatcli.curvature.losses import cross_entropy, output_hessian
from flatcli.curvature.operators import make_operator
from flatcli.errors import UsageError

F64 = torch.float64


# --------------------------------------------------------------------------- dense references


def dense_param_hessian(model: nn.Module, x, y, name: str) -> torch.Tensor:
    """Hessian (numel, numel) of the mean CE with respect to one parameter, by autograd."""
    params = dict(model.named_parameters())
    p0 = params[name].detach()

    def loss(flat):
        p = {**{k: v.detach() for k, v in params.items()}, name: flat.reshape(p0.shape)}
        return cross_entropy(functional_call(model, p, (x,)), y).mean()

    return torch.autograd.functional.hessian(loss, p0.reshape(-1))


def logit_jacobian(model: nn.Module, x, name: str) -> torch.Tensor:
    """Per-example Jacobian (N, c, numel) of the logits with respect to one parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(xn, p):
        out = functional_call(model, {**params, name: p}, (xn.unsqueeze(0),))[0]
        return out

    J = vmap(jacrev(one, argnums=1), in_dims=(0, None))(x, params[name])
    return J.reshape(x.shape[0], J.shape[1], -1)


def layer_inputs(model: nn.Module, x, module_name: str) -> torch.Tensor:
    """The input the module sees for every example (a plain forward hook)."""
    seen = []
    mod = dict(model.named_modules())[module_name]
    h = mod.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def dense_em_linear(model, x, layer: str) -> torch.Tensor:
    """E[M] = E[G^T A G] with G the logit Jacobian w.r.t. the layer output = w.r.t. its bias."""
    G = logit_jacobian(model, x, f"{layer}.bias")  # (N, c, m)
    with torch.no_grad():
        A = output_hessian(model(x))  # (N, c, c)
    return torch.einsum("nci,ncd,ndj->ij", G, A, G) / x.shape[0]


def relu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
        .double()
        .eval()
    )


def tanh_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 2, 2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        .double()
        .eval()
    )


def data(n: int, shape: tuple[int, ...], classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g, dtype=F64), torch.randint(
        0, classes, (n,), generator=g
    )


def confident_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A bias-free 3x3 Linear on 100 examples: 95 along e1, classified with p ≈ 1 (M ≈ 0), and
    5 uncertain ones along e2, which carry the curvature. E[xxᵀ] points along e1, the true
    block along e2: K-FAC's decoupling conjecture fails there."""
    model = nn.Sequential(nn.Linear(3, 3, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, -0.3, 0.1]]))
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    e2 = torch.tensor([0.0, 1.0, 0.2], dtype=F64)
    x = torch.cat([6 * e1.expand(95, 3), e2.expand(5, 3)])
    y = torch.zeros(100, dtype=torch.long)
    return model, x, y


def conv_head_net(seed: int = 0) -> nn.Module:
    """Conv2d(1→2, 3x3) on 5x5 inputs (P = 9 positions), ReLU, then a Linear head to 3 classes."""
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).double().eval()
    )


def conv_head_data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 1, 5, 5) with mean 0.5 (so E[x] is not small) and labels (n,) in 0..2."""
    x, y = data(n, (1, 5, 5), seed=seed)
    return x + 0.5, y


def conv_head_truth(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """The conv layer's factors of :func:`conv_head_net` written out position by position.

    Wu et al. 2020, App. A.2: patch p of example n is column p of the unfolded input X (Eq. 30);
    the output gradient at position p is the c × m matrix G_p = ∂z/∂Z[:, p], here
    head.weight[k, o·P + p]·1[Z[o, p] > 0] (Flatten is channel-major), and with
    A = diag(p) − ppᵀ, Ñᵀ Ñ = Σ_p G_pᵀ A G_p (Eq. 35 with any QᵀQ = A). So
    E[M̃] = E[(1/P) Σ_p G_pᵀ A G_p], E[XXᵀ] = E[Σ_p x_p x_pᵀ] (Eq. 37), the mean input is the
    mean patch over examples and positions, and the input structure (Eq. 8, Table 7) is that of
    the patch at a uniformly drawn position.
    """
    conv, head = model[0], model[3]
    with torch.no_grad():
        X = F.unfold(x, conv.kernel_size)  # (N, n, P): Eq. 30
        N, n, P = X.shape
        m = conv.out_channels
        Wc = conv.weight.reshape(m, n)
        Z = torch.einsum("on,bnp->bop", Wc, X)
        Z = Z + conv.bias.view(1, m, 1)  # (N, m, P): the conv output, by hand
        assert torch.allclose(Z.reshape(N, m, 3, 3), conv(x), atol=1e-13)
        z = model(x)
        c = z.shape[1]
        G = head.weight.reshape(1, c, m, P) * (Z > 0).unsqueeze(1)  # (N, c, m, P): G_p
        p = torch.softmax(z, dim=1)
        A = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, c, c)
        em = torch.einsum("bkop,bkl,blqp->oq", G, A, G) / (N * P)  # E[(1/P) Σ_p G_pᵀ A G_p]
        exx = torch.einsum("bip,bjp->ij", X, X) / N  # E[Σ_p x_p x_pᵀ]
        Gs = G.sum(-1)  # (N, c, m): Σ_p G_p
        bias = torch.einsum("bko,bkl,blq->oq", Gs, A, Gs) / N
        patches = X.transpose(1, 2).reshape(N * P, n)  # every (example, position) patch
        mean = patches.mean(0)
        sigma = torch.cov(patches.T, correction=0)
        ratio = float(mean @ mean / torch.linalg.eigvalsh(sigma)[-1])
        v1 = torch.linalg.eigh(patches.T @ patches)[1][:, -1]
        align = abs(float(mean @ v1)) / float(mean.norm())
    return {
        "P": P,
        "em": em,
        "exx": exx,
        "mean_x": mean,
        "bias_block": bias,
        "spectral_ratio": ratio,
        "mean_alignment": align,
    }


# --------------------------------------------------------------------------- exactness


def test_single_example_linear_block_is_exact():
    model = relu_mlp()
    x, y = data(1, (5,))
    f = kfac_factors(model, x, y)
    for layer in ("0", "2", "4"):
        H = dense_param_hessian(model, x, y, f"{layer}.weight")
        assert torch.allclose(f[layer].dense(), H, atol=1e-12, rtol=1e-10)


def test_relu_mlp_block_is_mean_of_kronecker_products():
    model = relu_mlp()
    x, y = data(12, (5,))
    f = kfac_factors(model, x, y, batch_size=5)  # several batches: sums, not means, per batch
    for layer in ("0", "2", "4"):
        G = logit_jacobian(model, x, f"{layer}.bias")
        with torch.no_grad():
            A = output_hessian(model(x))
        Ms = torch.einsum("nci,ncd,ndj->nij", G, A, G)
        xs = layer_inputs(model, x, layer)
        dense = torch.stack(
            [torch.kron(M.contiguous(), torch.outer(a, a)) for M, a in zip(Ms, xs, strict=True)]
        ).mean(0)
        H = dense_param_hessian(model, x, y, f"{layer}.weight")
        assert torch.allclose(H, dense, atol=1e-12)  # Eq. 5: the block is E[M ⊗ xxᵀ]
        assert torch.allclose(f[layer].em, Ms.mean(0), atol=1e-13)
        assert torch.allclose(f[layer].exx, (xs.T @ xs) / 12, atol=1e-13)
        assert torch.allclose(f[layer].mean_x, xs.mean(0), atol=1e-13)
        # Eq. 26: the bias block of a ReLU net is E[M]
        Hb = dense_param_hessian(model, x, y, f"{layer}.bias")
        assert torch.allclose(f[layer].bias_block, Hb, atol=1e-12)
        assert torch.allclose(f[layer].em, Hb, atol=1e-12)
        assert f[layer].positions == 1 and f[layer].kind == "linear"


def test_tanh_net_em_is_the_gauss_newton_form():
    model = tanh_mlp()
    x, y = data(9, (5,))
    f = kfac_factors(model, x, y)
    assert torch.allclose(f["0"].em, dense_em_linear(model, x, "0"), atol=1e-13)


def test_conv_factors_follow_eqs_35_and_37():
    model = tiny_cnn()
    x, y = data(7, (2, 6, 6))
    f = kfac_factors(model, x, y, batch_size=3)
    for layer in ("0", "3"):
        conv = dict(model.named_modules())[layer]
        a = layer_inputs(model, x, layer)
        X = F.unfold(a, conv.kernel_size, padding=conv.padding)  # (N, n, P), Eq. 30
        # G_x = dz/dZ (c × mP) by one backward per class of a zero offset added to Z
        holder: dict[str, torch.Tensor] = {}

        def hook(m, args, out, holder=holder):
            holder["d"] = torch.zeros_like(out, requires_grad=True)
            return out + holder["d"]

        h = conv.register_forward_hook(hook)
        z = model(x)
        h.remove()
        c = z.shape[1]
        rows = [
            torch.autograd.grad(z[:, k].sum(), holder["d"], retain_graph=True)[0] for k in range(c)
        ]
        G = torch.stack(rows, 1).flatten(3)  # (N, c, m, P)
        # N_x = Q_x G_x (Eq. 34) with any square root of A_x: here the symmetric one
        A = output_hessian(z.detach())
        evals, evecs = torch.linalg.eigh(A)
        Qs = evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.mT  # (N, c, c)
        Nx = torch.einsum("ncd,ndmp->ncmp", Qs, G)  # (N, c, m, P)
        P = Nx.shape[-1]
        Nt = Nx.permute(0, 1, 3, 2).reshape(x.shape[0], c * P, -1)  # (N, cP, m): Ñ
        em = (Nt.mT @ Nt / P).mean(0)  # Eq. 35
        exx = (X @ X.mT).mean(0)  # Eq. 37: summed over positions
        assert f[layer].positions == P and f[layer].kind == "conv2d"
        assert f[layer].shape == (conv.out_channels, X.shape[1])
        assert torch.allclose(f[layer].em, em, atol=1e-12)
        assert torch.allclose(f[layer].exx, exx, atol=1e-12)
        # the conv bias block is E[(Σ_p n_p)(Σ_p n_p)ᵀ], which is the exact bias Hessian here
        Hb = dense_param_hessian(model, x, y, f"{layer}.bias")
        assert torch.allclose(f[layer].bias_block, Hb, atol=1e-12)


def test_conv_one_over_p_in_factors_mean_and_input_structure():
    """Where P enters a convolution's factors (Eq. 35: 1/P on E[M̃]; Eq. 37: E[XXᵀ] summed over
    positions; the mean input and Eq. 8 per position), against a position-by-position float64
    construction: moving or dropping any 1/P fails here (P = 9)."""
    model = conv_head_net()
    x, y = conv_head_data()
    want = conv_head_truth(model, x)
    f = kfac_factors(model, x, y, batch_size=4)["0"]
    assert f.positions == want["P"] == 9 and f.kind == "conv2d" and f.shape == (2, 9)
    assert torch.allclose(f.em, want["em"], rtol=1e-12, atol=1e-15)
    assert torch.allclose(f.exx, want["exx"], rtol=1e-12, atol=1e-15)
    assert torch.allclose(f.mean_x, want["mean_x"], rtol=1e-12, atol=1e-15)
    assert torch.allclose(f.bias_block, want["bias_block"], rtol=1e-12, atol=1e-15)
    ratio, align = input_structure(f)
    assert math.isclose(ratio, want["spectral_ratio"], rel_tol=1e-10)
    assert math.isclose(align, want["mean_alignment"], rel_tol=1e-10)
    assert 0.05 < ratio < 20 and align > 0.5  # a meaningful structure, not a degenerate one


def test_layer_selection_and_errors():
    model = relu_mlp()
    x, y = data(4, (5,))
    assert list(kfac_factors(model, x, y, layers=["4"])) == ["4"]
    with pytest.raises(UsageError, match="matches no"):
        kfac_factors(model, x, y, layers=["nope"])
    with pytest.raises(UsageError, match="fisher"):
        kfac_factors(model, x, y, fisher="bogus")
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().train()
    with pytest.raises(UsageError, match="eval mode"):
        kfac_factors(bn, x, y)


def test_float32_network_matches_float64():
    model = relu_mlp()
    x, y = data(20, (5,))
    f64 = kfac_factors(model, x, y)
    f32 = kfac_factors(model.float(), x.float(), y)
    for k in f64:
        assert torch.allclose(
            f32[k].em, f64[k].em, rtol=1e-4, atol=1e-6 * float(f64[k].em.abs().max())
        )


def test_mc_em_converges_to_exact():
    model = relu_mlp()
    x, y = data(10, (5,))
    exact = kfac_factors(model, x, y)["2"].em
    errs = []
    for S in (16, 1600):
        mc = kfac_factors(model, x, y, fisher="mc", mc_samples=S, seed=1)["2"].em
        errs.append(float(torch.linalg.norm(mc - exact) / torch.linalg.norm(exact)))
    assert errs[1] < 0.05
    assert errs[1] < errs[0] / 4  # ~ 1/sqrt(S): 10x fewer errors for 100x the samples


# --------------------------------------------------------------------------- eigenpairs, overlaps


def test_kron_eigenpairs_equal_dense_kronecker():
    model = relu_mlp()
    x, y = data(12, (5,))
    f = kfac_factors(model, x, y)["2"]
    lam, U, mu, V = f.eig()
    vals, i, j = kron_top(lam, mu, 16)
    dense = torch.linalg.eigvalsh(f.dense()).flip(0)
    assert torch.allclose(vals, dense[:16], atol=1e-12)
    vecs = kron_eigenvectors(U, V, i, j)
    K = f.dense()
    assert torch.allclose(K @ vecs, vecs * vals, atol=1e-12)
    assert torch.allclose(vecs.T @ vecs, torch.eye(16, dtype=F64), atol=1e-12)
    v = torch.randn(f.shape[0] * f.shape[1], 3, dtype=F64)
    assert torch.allclose(kron_matvec(f.em, f.exx, v), K @ v, atol=1e-12)


def test_overlap_correspondence_rank1_match_definitions():
    g = torch.Generator().manual_seed(0)
    m, n, K = 3, 4, 6
    A, _ = torch.linalg.qr(torch.randn(m * n, K, generator=g, dtype=F64))
    B, _ = torch.linalg.qr(torch.randn(m * n, K, generator=g, dtype=F64))
    curve = overlap_curve(A.T @ B)
    for k in range(1, K + 1):
        want = float(torch.linalg.matrix_norm(A[:, :k].T @ B[:, :k]) ** 2) / k
        assert math.isclose(float(curve[k - 1]), want, rel_tol=1e-12)
    assert torch.allclose(overlap_curve(A.T @ A), torch.ones(K, dtype=F64))
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    coeff = eigenbasis_coefficients(A, U, V, (m, n))
    cu, cv = correspondence(coeff)
    for ell in range(K):
        Mat = A[:, ell].reshape(m, n)  # Def. 4.2: index (i−1)n + j
        for i in range(m):
            assert math.isclose(
                float(cu[i, ell]), float((Mat.T @ U[:, i]).square().sum()), rel_tol=1e-10
            )
        for i in range(n):
            assert math.isclose(
                float(cv[i, ell]), float((Mat @ V[:, i]).square().sum()), rel_tol=1e-10
            )
    r1 = rank1_scores(A, (m, n))
    for ell in range(K):
        s = torch.linalg.svdvals(A[:, ell].reshape(m, n))
        assert math.isclose(float(r1[ell]), float(s[0] / s.norm()), rel_tol=1e-12)
    rank_one = torch.outer(U[:, 0], V[:, 1]).reshape(-1, 1)
    assert math.isclose(float(rank1_scores(rank_one, (m, n))[0]), 1.0, rel_tol=1e-12)


def test_input_structure_and_gap():
    model = relu_mlp()
    x, y = data(50, (5,))
    f = kfac_factors(model, x, y)["2"]
    xs = layer_inputs(model, x, "2")
    mu = xs.mean(0)
    sigma = torch.cov(xs.T, correction=0)
    ratio, align = input_structure(f)
    assert math.isclose(ratio, float(mu @ mu / torch.linalg.eigvalsh(sigma)[-1]), rel_tol=1e-9)
    v1 = torch.linalg.eigh(xs.T @ xs)[1][:, -1]
    assert math.isclose(align, abs(float(mu @ v1)) / float(mu.norm()), rel_tol=1e-9)
    assert outlier_gap(torch.tensor([10.0, 9.0, 8.0, 0.1, 0.09], dtype=F64)) == 3
    assert outlier_gap(torch.tensor([1.0], dtype=F64)) is None


def test_decoupling_error_within_stderr_of_dense():
    model = tanh_mlp()
    x, y = data(30, (5,))
    f = kfac_factors(model, x, y)["0"]
    H = dense_param_hessian(model, x, y, "0.weight")
    dense = float(torch.linalg.matrix_norm(H - f.dense()) / torch.linalg.matrix_norm(H))
    block = make_operator("hessian", model, x, y, params=["0.weight"])
    err, se, probes = decoupling_error(block, f, probes=200, seed=3)
    assert probes == 200 and se > 0
    assert abs(err - dense) < 4 * se
    assert se < 0.2 * dense  # the standard error is informative


def test_confident_net_breaks_the_conjecture():
    """Examples that carry curvature need not have typical activations (NOTES: very confident
    nets): most inputs lie along e1 and are classified with p ≈ 1 (M ≈ 0); a few uncertain ones
    lie along e2. E[xxᵀ] points along e1, the true block along e2."""
    model, x, y = confident_problem()
    f = kfac_factors(model, x, y)["0"]
    H = dense_param_hessian(model, x, y, "0.weight")
    lam, U, mu, V = f.eig()
    vals, i, j = kron_top(lam, mu, 2)
    kron_vecs = kron_eigenvectors(U, V, i, j)
    exact_vecs = torch.linalg.eigh(H)[1].flip(1)[:, :2]
    curve = overlap_curve(exact_vecs.T @ kron_vecs)
    assert float(curve[0]) < 0.05
    block = make_operator("hessian", model, x, y, params=["0.weight"])
    err, se, _ = decoupling_error(block, f, probes=64)
    dense = float(torch.linalg.matrix_norm(H - f.dense()) / torch.linalg.matrix_norm(H))
    assert dense > 0.9 and err > 0.8


class _SeqLinear(nn.Module):
    """A Linear over 4 positions of width 3, tanh, then a head on the flattened sequence."""

    def __init__(self, conv: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.mix = nn.Conv1d(3, 5, 1) if conv else nn.Linear(3, 5)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 4, 3)
        if self.conv:
            h = self.mix(x.transpose(1, 2))  # (N, 5, 4)
        else:
            h = self.mix(x).transpose(1, 2)  # (N, 5, 4)
        return self.head(torch.tanh(h).flatten(1))


def test_a_linear_over_positions_is_a_one_by_one_convolution() -> None:
    """Wu et al. 2020, App. A.2 for sequences: a Linear applied at T positions has the factors
    of the 1x1 convolution that computes the same function (P = T, Ẽ[M] with 1/P, E[xxᵀ] summed
    over positions)."""
    torch.manual_seed(0)
    lin = _SeqLinear().double().eval()
    conv = _SeqLinear(conv=True).double().eval()
    with torch.no_grad():
        conv.mix.weight.copy_(lin.mix.weight[:, :, None])
        conv.mix.bias.copy_(lin.mix.bias)
        conv.head.load_state_dict(lin.head.state_dict())
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    torch.testing.assert_close(lin(x), conv(x))
    a, b = kfac_factors(lin, x, y)["mix"], kfac_factors(conv, x, y)["mix"]
    assert a.positions == b.positions == 4 and a.shape == b.shape == (5, 3)
    for field in ("em", "exx", "mean_x", "bias_block"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-12, atol=1e-14)


class _Attention(nn.Module):
    """Attention (its out_proj read by the attention's own forward), a tied embedding/head pair,
    a layer the forward never calls, and two layers K-FAC can follow."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.ff = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.embed.weight
        self.cls = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.cls(self.out(torch.tanh(self.ff(h))).mean(1))


def test_layers_it_cannot_follow_are_skipped_with_why() -> None:
    torch.manual_seed(0)
    model = _Attention().double().eval()
    x = torch.randint(0, 5, (6, 3))
    y = torch.randint(0, 3, (6,))
    f = kfac_factors(model, x, y)
    assert list(f) == ["ff", "cls"]
    assert f.skipped == {
        "attn.out_proj": "parameter of attn.out_proj is used outside that module's own forward "
        "(nn.MultiheadAttention reads out_proj.weight in its own forward)",
        "unused": "the forward never calls it",
        "out": "its weight is tied to embed.weight",
    }
    assert f["ff"].positions == 3  # the sequence's positions (App. A.2)
    with pytest.raises(UsageError, match="K-FAC can follow no layer.*unused: the forward never"):
        kfac_factors(model, x, y, layers=["unused", "out"])
