"""The memory model and the automatic chunk size."""

from __future__ import annotations

import importlib

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
    from flatcli.curvature.linop import DenseOperator
    from flatcli.curvature.memory import lanczos_memory

    lanczos_module = importlib.import_module("flatcli.curvature.lanczos")  # not the function
    n, k = 300, 5
    # cap the basis at 30 rows, so the 100 steps thick-restart and keep Ritz vectors
    monkeypatch.setattr(lanczos_module, "BASIS_MEMORY_BYTES", 8 * (n + 1) * 30)
    rows = []
    init = lanczos_module._Lanczos.__init__

    def spy(self, op, capacity):
        init(self, op, capacity)
        rows.append(self.V.shape[0])

    monkeypatch.setattr(lanczos_module._Lanczos, "__init__", spy)
    A = torch.diag(torch.linspace(0.0, 1.0, n, dtype=torch.float64))
    lanczos_module.lanczos(DenseOperator(A), k, tol=1e-12)
    est = lanczos_memory(n, k)
    # 31 basis rows and the 17 Ritz vectors a restart keeps
    assert rows == [31] and est.vectors == 31 + 17 and est.dim == n
    assert est.bytes == est.vectors * n * 8


def test_lanczos_memory_adds_the_model_eigenvectors_and_density():
    from flatcli.curvature.memory import PARAM_COPIES, lanczos_memory

    base = lanczos_memory(1000, 10)
    assert base.vectors == 201  # min(dim, max(20 k, 100)) steps, all kept, plus the next one
    with_model = lanczos_memory(1000, 10, model_params=1000, dtype=torch.float64)
    assert with_model.bytes == base.bytes + PARAM_COPIES * 1000 * 8
    vectors = lanczos_memory(1000, 10, return_vectors=True, dtype=torch.float32)
    assert vectors.vectors == 211 and vectors.bytes == 211 * 1000 * 8 + 10 * 1000 * 4
    assert lanczos_memory(1000, 0, density_steps=90).vectors == 91
    assert lanczos_memory(50, 0, density_steps=90).vectors == 51  # capped at the dimension
    assert lanczos_memory(1000, 10, density_steps=500).vectors == 501  # the larger run counts
    # the run: LeNet-5 (61,706 parameters), --top-k 5000: about 8.6 GB of vectors
    assert lanczos_memory(61_706, 5000).bytes > 8e9


def test_available_memory_reads_memavailable(tmp_path):
    from flatcli.curvature.memory import _meminfo_available

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       8000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n")
    assert _meminfo_available(str(info)) == 2048 * 1024
    assert _meminfo_available(str(tmp_path / "absent")) is None
    assert available_memory("cpu") > 0
