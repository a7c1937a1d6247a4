"""The memory model and the automatic chunk size."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from flatcli.curvature.memory import (
    activation_bytes_per_example,
    auto_batch_size,
    available_memory,
    estimate_memory,
)
from flatcli.curvature.operators import make_operator
from tests.cases import make_case


def test_activation_bytes_scale_with_width():
    small = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    wide = nn.Sequential(nn.Linear(10, 2000), nn.Tanh(), nn.Linear(2000, 3))
    a, b = activation_bytes_per_example(small, (10,)), activation_bytes_per_example(wide, (10,))
    assert 0 < a < b
    assert b >= 2000 * 4  # at least the hidden activation in float32


def test_estimate_grows_with_batch_and_dtype():
    model, _, _ = make_case("cnn_bn")
    m1 = estimate_memory(model, (2, 4, 4), 3, 1, torch.float64)
    m100 = estimate_memory(model, (2, 4, 4), 3, 100, torch.float64)
    m100_32 = estimate_memory(model, (2, 4, 4), 3, 100, torch.float32)
    assert 0 < m1 < m100 and m100_32 < m100
    params = sum(p.numel() for p in model.parameters()) * 8
    assert m1 >= params


def test_auto_batch_size_respects_budget():
    model, x, _ = make_case("cnn", n=1000)
    assert auto_batch_size(model, x, budget_bytes=10**12) == 1000
    assert auto_batch_size(model, x, budget_bytes=1) == 1
    mid = auto_batch_size(model, x, budget_bytes=estimate_memory(model, (2, 4, 4), 3, 100))
    assert 90 <= mid <= 100
    assert available_memory("cpu") > 0


def test_model_mode_and_buffers_untouched():
    model, x, _ = make_case("cnn_bn")
    model.train()
    before = model[1].running_mean.clone()
    auto_batch_size(model, x)
    assert torch.equal(model[1].running_mean, before) and model.training


def test_make_operator_uses_auto_batch_size(monkeypatch):
    import flatcli.curvature.operators as ops

    model, x, y = make_case("mlp_tanh")
    monkeypatch.setattr(ops, "auto_batch_size", lambda *a, **k: 4)
    op = ops.make_operator("ggn", model, x, y)
    assert op.batch_size == 4
    ref = make_operator("ggn", model, x, y, batch_size=12)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), ref.matvec(v), rtol=1e-12, atol=1e-14)
    V = torch.randn(op.dim, 5, dtype=torch.float64)  # k columns shrink the auto chunk
    assert op._chunk_size(5) == 1
    assert torch.allclose(op.matmat(V), ref.matmat(V), rtol=1e-12, atol=1e-14)


# ---- the Lanczos estimate: what the spectrum checks before it allocates (issue #22) ---------


def test_lanczos_memory_covers_the_basis_lanczos_allocates(monkeypatch):
    from flatcli.curvature.lanczos import lanczos_memory
    from flatcli.curvature.linop import DenseOperator

    lanczos_module = importlib.import_module("flatcli.curvature.lanczos")  # not the function
    n, k = 2000, 5
    # cap the basis at 30 rows, so the 100 steps thick-restart and keep Ritz vectors
    monkeypatch.setattr(lanczos_module, "BASIS_MEMORY_BYTES", 8 * (n + 1) * 30)
    rows = []
    init = lanczos_module._Lanczos.__init__

    def spy(self, op, capacity, *args):
        init(self, op, capacity, *args)
        rows.append(self.V.shape[0])

    monkeypatch.setattr(lanczos_module._Lanczos, "__init__", spy)
    A = torch.diag(torch.linspace(0.0, 1.0, n, dtype=torch.float64))
    # a restart forms its 17 Ritz vectors in place, 10 columns at a time: nothing as large as
    # one basis row is allocated while it runs (the largest: its 17 x 30 coefficients)
    monkeypatch.setattr(lanczos_module, "BLOCK_BYTES", 8 * 31 * 10)
    largest: list[int] = []
    restart = lanczos_module._Lanczos.restart

    def watched(self, *args):
        with torch.profiler.profile(profile_memory=True) as prof:
            restart(self, *args)
        largest.append(max(e.cpu_memory_usage for e in prof.events()))

    monkeypatch.setattr(lanczos_module._Lanczos, "restart", watched)
    res = lanczos_module.lanczos(DenseOperator(A), k, tol=1e-12)
    assert largest and max(largest) < 8 * n
    # each Ritz value lies within its residual of the true eigenvalue (the restarts kept the
    # right vectors)
    error = (res.eigenvalues - A.diagonal().flip(0)[:k]).abs()
    assert bool((error <= res.residuals + 1e-12).all())
    est = lanczos_memory(n, k)
    assert rows == [31] and est.vectors == 31 and est.dim == n  # the basis rows, nothing more
    assert est.bytes == est.vectors * n * 8


def test_lanczos_memory_adds_the_model_eigenvectors_and_density():
    from flatcli.curvature.lanczos import lanczos_memory
    from flatcli.curvature.memory import PARAM_COPIES

    base = lanczos_memory(1000, 10)
    assert base.vectors == 201  # min(dim, max(20 k, 100)) steps, all kept, plus the next one
    with_model = lanczos_memory(1000, 10, model_params=1000, dtype=torch.float64)
    assert with_model.bytes == base.bytes + PARAM_COPIES * 1000 * 8
    vectors = lanczos_memory(1000, 10, return_vectors=True, dtype=torch.float32)
    assert vectors.vectors == 211 and vectors.bytes == 211 * 1000 * 8 + 10 * 1000 * 4
    assert lanczos_memory(1000, 0, density_steps=90).vectors == 91
    assert lanczos_memory(50, 0, density_steps=90).vectors == 51  # capped at the dimension
    assert lanczos_memory(1000, 10, density_steps=500).vectors == 501  # the larger run counts
    # the run: LeNet-5 (61,706 parameters), --top-k 5000: 10,011 float64 rows, 4.9 GB
    assert lanczos_memory(61_706, 5000).bytes == 10_011 * 61_706 * 8


def test_available_memory_reads_memavailable(tmp_path):
    from flatcli.curvature.memory import _meminfo_available

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       8000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n")
    assert _meminfo_available(str(info)) == 2048 * 1024
    assert _meminfo_available(str(tmp_path / "absent")) is None
    assert available_memory("cpu") > 0


# ---- sequence models: the head over N·T·V logits, kept graphs, the probe (issue #23) ----------


class _TokenNet(nn.Module):
    """(N, T) ids -> (N, T, V) logits: embedding, tanh, a Linear head over a large vocabulary."""

    def __init__(self, vocab: int = 3000, width: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))


def _saved_head_bytes(name: str, shape: tuple[int, ...], head_dtype: torch.dtype) -> int:
    """Bytes the sample head of ``name`` saves for a double-backward product on float32
    outputs of ``shape``: its forward and its backward with ``create_graph=True`` (storages
    counted once)."""
    from flatcli.curvature.losses import sample_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g).requires_grad_(True)
    if name == "token-ce":
        y = torch.randint(0, shape[-1], shape[:-1], generator=g)
        y[0, 0] = -100
    else:
        y = torch.randint(0, shape[-1], shape[:1], generator=g)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    head = sample_loss(name, y)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head(z.to(head_dtype), y).sum()
        (gz,) = torch.autograd.grad(loss, z, create_graph=True)
    big = z.numel() * torch.empty((), dtype=head_dtype).element_size()
    return sum(b for b in seen.values() if b >= big // 4)


@pytest.mark.parametrize(("name", "shape"), [("token-ce", (2, 16, 1000)), ("ce", (32, 1000))])
def test_head_copies_cover_what_the_float64_head_saves(name, shape):
    from flatcli.curvature.memory import HEAD_COPIES

    saved = _saved_head_bytes(name, shape, torch.float64)
    copy = math.prod(shape) * 8
    assert copy < saved <= HEAD_COPIES * copy


def test_token_head_is_counted_per_output_in_its_dtype_without_vocab_squared():
    from flatcli.curvature.memory import HEAD_COPIES

    model = _TokenNet()
    T, V = 64, 3000
    args = (model, (T,), T * V)
    kw = {"x_dtype": torch.int64, "positions": T}
    one64 = estimate_memory(*args, 1, head_dtype=torch.float64, **kw)
    one32 = estimate_memory(*args, 1, head_dtype=torch.float32, **kw)
    none = estimate_memory(*args, 0, **kw)
    assert one64 - one32 == HEAD_COPIES * T * V * 4  # the float64 head: twice the bytes
    assert one64 - none < 10 * HEAD_COPIES * T * V * 8  # no (T V)^2 nor V^2 head matrix
    # a classifier over K classes keeps its K x K head matrices
    mlp = nn.Sequential(nn.Linear(3, 10))
    assert estimate_memory(mlp, (3,), 10, 1) - estimate_memory(mlp, (3,), 10, 0) >= 4 * 100 * 4


def test_auto_batch_size_of_a_token_model_follows_the_head():
    model = _TokenNet()
    x = torch.randint(0, 3000, (64, 64))
    budget = 5 * 10**8
    f32 = auto_batch_size(model, x, budget_bytes=budget)  # positions measured by a forward
    f64 = auto_batch_size(model, x, budget_bytes=budget, head_dtype=torch.float64)
    assert 1 < f64 < f32 <= 64
    per = estimate_memory(
        model, (64,), 64 * 3000, 1, x_dtype=torch.int64, positions=64, head_dtype=torch.float64
    ) - estimate_memory(model, (64,), 64 * 3000, 0, x_dtype=torch.int64, positions=64)
    assert f64 == pytest.approx(budget / per, abs=1.5)
    assert auto_batch_size(model, x, budget_bytes=budget, reserve_bytes=budget) == 1


def test_every_chunk_graph_is_kept_only_when_their_gradients_fit(monkeypatch):
    """On the CPU an automatic chunk is split into heap-sized ones; keeping all their graphs
    keeps one gradient (dim numbers) per chunk, which must fit beside the activations."""
    import flatcli.curvature.operators as ops

    model, x, y = make_case("mlp_tanh")
    n = int(x.shape[0])
    monkeypatch.setattr(ops, "cpu_chunk", lambda model, x: 2)
    reserves = []

    def fits(model, x, budget_bytes=None, num_outputs=None, *, reserve_bytes=0, **kw):
        reserves.append(reserve_bytes)
        return n if reserve_bytes == 0 else n - 1

    monkeypatch.setattr(ops, "auto_batch_size", fits)
    op = ops.make_operator("hessian", model, x, y)
    assert op.batch_size == 2 and not op._cache_every_chunk
    dim = sum(p.numel() for p in model.parameters())
    assert reserves == [0, (-(-n // 2) - 1) * dim * 8]
    monkeypatch.setattr(ops, "auto_batch_size", lambda *a, **k: n)
    assert ops.make_operator("hessian", model, x, y)._cache_every_chunk


def test_the_probe_runs_no_larger_chunk_than_the_products(monkeypatch):
    from flatcli.curvature.hessian import HessianOperator

    model, x, y = make_case("mlp_tanh")
    sizes = []
    chunk = HessianOperator._chunk

    def spy(self, c, *args, **kwargs):
        sizes.append(c.size)
        return chunk(self, c, *args, **kwargs)

    monkeypatch.setattr(HessianOperator, "_chunk", spy)
    make_operator("hessian", model, x, y, batch_size=1)
    assert sizes and set(sizes) == {1}
    sizes.clear()
    make_operator("hessian", model, x, y, batch_size=5)
    assert set(sizes) == {2}  # two examples, as before


def test_lanczos_reads_only_basis_rows_it_wrote(monkeypatch):
    """The Krylov basis is allocated uninitialised (a few steps on a 10^8-parameter model touch
    a few float64 rows, not the capacity): rows filled with NaN beforehand change nothing, through
    breakdowns (a rank-3 matrix) and thick restarts."""
    from flatcli.curvature.linop import DenseOperator

    lanczos_module = importlib.import_module("flatcli.curvature.lanczos")
    init = lanczos_module._Lanczos.__init__

    def poisoned(self, op, capacity, *args):
        init(self, op, capacity, *args)
        self.V.fill_(float("nan"))

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    low_rank = (
        Q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ Q[:, :3].T
    )
    wide = Q @ torch.diag(torch.linspace(0.0, 1.0, 60, dtype=torch.float64)) @ Q.T
    cases = [(low_rank, 5, None), (wide, 4, 12)]
    expected = [lanczos_module.lanczos(DenseOperator(A), k, max_basis=b) for A, k, b in cases]
    monkeypatch.setattr(lanczos_module._Lanczos, "__init__", poisoned)
    for (A, k, b), ref in zip(cases, expected, strict=True):
        got = lanczos_module.lanczos(DenseOperator(A), k, max_basis=b)
        assert torch.isfinite(got.eigenvalues).all()
        assert torch.allclose(got.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-12)


def test_lanczos_leaves_an_identity_operators_input_alone():
    """Orthogonalisation works in place; an operator that returns its input (a view of the
    basis row) must not have the basis overwritten."""
    from flatcli.curvature.lanczos import lanczos

    class Identity:
        dim, dtype, device, matvecs = 30, torch.float64, torch.device("cpu"), 0

        def matvec(self, v):
            self.matvecs += 1
            return v

        def matmat(self, V):
            self.matvecs += V.shape[1]
            return V

    res = lanczos(Identity(), 3)
    assert torch.allclose(res.eigenvalues, torch.ones(3, dtype=torch.float64))
