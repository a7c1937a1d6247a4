"""The one data loop: chunk iterator, subclasses per kind, reduction hook, blocks, the cache."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import hessian as dense_hessian

from flatcli.curvature.data import Chunk, iter_chunks, move_inputs
from flatcli.curvature.operators import (
    CurvatureOperator,
    OperatorBlock,
    OperatorCache,
    make_operator,
)
from flatcli.curvature.params import flatten_params, unflatten
from flatcli.errors import UsageError
from tests.cases import make_case

METHODS = ["forward-over-reverse", "double-backward"]


def _dense_hessian(model, x, y, names):
    """Dense float64 Hessian of the mean CE loss over the parameters ``names``."""
    from torch.func import functional_call

    params = dict(model.named_parameters())
    shapes = {n: params[n].shape for n in names}
    flat0 = flatten_params([params[n].detach() for n in names])

    def loss(flat):
        p = {**{k: v.detach() for k, v in params.items()}, **unflatten(flat, shapes)}
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    return dense_hessian(loss, flat0)


# ---------------------------------------------------------------------------- iter_chunks


def test_iter_chunks_covers_examples_and_casts_floats_only() -> None:
    x = torch.arange(14.0, dtype=torch.float32).view(7, 2)
    y = torch.arange(7)
    chunks = list(iter_chunks(x, y, 3, "cpu", torch.float64))
    assert [(c.start, c.stop, c.size) for c in chunks] == [(0, 3, 3), (3, 6, 3), (6, 7, 1)]
    assert all(isinstance(c, Chunk) and c.x.dtype == torch.float64 for c in chunks)
    assert torch.equal(torch.cat([c.x for c in chunks]), x.double())
    assert torch.equal(torch.cat([c.y for c in chunks]), y)
    tokens = torch.arange(7).view(7, 1)  # integer inputs keep their dtype
    assert all(c.x.dtype == torch.int64 for c in iter_chunks(tokens, None, 2, "cpu", torch.float32))
    assert [c.y for c in iter_chunks(x, None, 4, "cpu", None)] == [None, None]
    part = list(iter_chunks(x, y, 2, "cpu", None, start=2, stop=5))
    assert [(c.start, c.stop) for c in part] == [(2, 4), (4, 5)]
    assert move_inputs(x, "cpu", None).dtype == torch.float32
    with pytest.raises(UsageError, match="batch_size"):
        list(iter_chunks(x, y, 0, "cpu", None))


# ---------------------------------------------------------------------------- subclasses


def test_one_subclass_per_kind() -> None:
    from flatcli.curvature import FisherOperator, GGNOperator, HessianOperator

    model, x, y = make_case("mlp_tanh")
    expected = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}
    for kind, cls in expected.items():
        op = make_operator(kind, model, x, y)
        assert type(op) is cls and isinstance(op, CurvatureOperator) and op.kind == kind
        assert type(CurvatureOperator(kind, model, x, y)) is cls
    assert issubclass(FisherOperator, GGNOperator)
    with pytest.raises(UsageError, match="'hessian' operator"):
        HessianOperator("ggn", model, x, y)
    with pytest.raises(UsageError, match="Unknown kind"):
        CurvatureOperator("laplacian", model, x, y)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_loop_visits_each_chunk_once_and_normalises_after_the_reduction(kind, monkeypatch) -> None:
    """One call per chunk per product; the chunk sums pass through reduce() once, then / N."""
    model, x, y = make_case("mlp_tanh", n=11)
    op = make_operator(kind, model, x, y, batch_size=4)
    visited, reduced = [], []
    chunk_fn, reduce_fn = op._chunk, op.reduce

    def spy_chunk(chunk, *args, **kwargs):
        visited.append((chunk.start, chunk.stop))
        return chunk_fn(chunk, *args, **kwargs)

    def spy_reduce(sums):
        reduced.append({k: v.clone() for k, v in sums.items()})
        return reduce_fn(sums)

    monkeypatch.setattr(op, "_chunk", spy_chunk)
    monkeypatch.setattr(op, "reduce", spy_reduce)
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    out = op.matmat(V)
    assert visited == [(0, 4), (4, 8), (8, 11)]
    assert len(reduced) == 1
    sums = torch.cat([t.reshape(3, -1) for t in reduced[0].values()], dim=1).T
    assert torch.allclose(out * op.num_examples, sums, rtol=1e-13, atol=1e-15)
    assert op.matvecs == 3


def test_reduce_is_where_a_data_parallel_sum_goes() -> None:
    """Two "ranks" holding half the examples each: adding their chunk sums in reduce() and
    dividing by the global count gives the full operator's product."""
    model, x, y = make_case("mlp_tanh", n=10)
    full = make_operator("ggn", model, x, y, batch_size=3)

    class Rank:
        def __init__(self, lo: int, hi: int) -> None:
            self.op = make_operator("ggn", model, x[lo:hi], y[lo:hi], batch_size=3)
            self.sums: dict = {}
            self.op.reduce = self._record  # type: ignore[method-assign]

        def _record(self, sums):
            self.sums = sums
            return sums

    ranks = [Rank(0, 5), Rank(5, 10)]
    v = torch.randn(full.dim, dtype=torch.float64)
    for r in ranks:
        r.op.matvec(v)
    total = {k: ranks[0].sums[k] + ranks[1].sums[k] for k in ranks[0].sums}
    flat = torch.cat([t.reshape(-1) for t in total.values()]) / len(x)
    assert torch.allclose(flat, full.matvec(v), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_size", [12, 5])
def test_restrict_is_the_dense_diagonal_block(method, batch_size) -> None:
    model, x, y = make_case("mlp_tanh")
    names = [n for n, _ in model.named_parameters()]
    subset = [names[0], names[-1]]  # not contiguous in the flat vector
    op = make_operator("hessian", model, x, y, hvp_method=method, batch_size=batch_size)
    block = op.restrict(subset)
    assert isinstance(block, OperatorBlock) and block.param_names == subset
    ref = _dense_hessian(model, x, y, subset)
    assert torch.allclose(block.to_dense(), ref, rtol=1e-10, atol=1e-12)
    assert block.matvecs == block.dim and op.matvecs == 0  # the block counts its own
    assert block.hvp_method == op.hvp_method and block.num_examples == len(x)
    d = block.describe()
    assert d["dim"] == block.dim and d["block_of"] == op.dim and d["params"] == subset


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("method", METHODS)
def test_restrict_ggn_and_fisher_blocks_match_separate_operators(kind, method) -> None:
    model, x, y = make_case("cnn")
    subset = ["0.weight", "4.bias"] if kind == "ggn" else ["4.weight"]
    op = make_operator(kind, model, x, y, hvp_method=method, batch_size=5)
    alone = make_operator(kind, model, x, y, params=subset, hvp_method=method, batch_size=5)
    V = torch.randn(alone.dim, 3, dtype=torch.float64)
    assert torch.allclose(op.restrict(subset).matmat(V), alone.matmat(V), rtol=1e-10, atol=1e-13)


def test_restrict_errors_and_nesting() -> None:
    model, x, y = make_case("mlp_tanh")
    op = make_operator("ggn", model, x, y, params=["1.weight", "1.bias"])
    with pytest.raises(UsageError, match="not among"):
        op.restrict(["3.weight"])
    with pytest.raises(UsageError):
        op.restrict(["no_such_layer"])
    block = op.restrict(["1.weight", "1.bias"])
    inner = block.restrict(["1.bias"])
    assert inner.parent is op and inner.dim == model[1].bias.numel()
    assert op.restrict(None).dim == op.dim
    with pytest.raises(UsageError, match="not in this block"):
        op.restrict(["1.bias"]).restrict(["1.weight"])


def test_blocks_share_the_cached_graph() -> None:
    model, x, y = make_case("mlp_tanh")
    op = make_operator("hessian", model, x, y, hvp_method="double-backward")
    v = torch.randn(op.dim, dtype=torch.float64)
    op.matvec(v)
    graph = next(iter(op._graphs.values()))[1]
    block = op.restrict(["3.weight"])
    block.matvec(torch.randn(block.dim, dtype=torch.float64))
    assert next(iter(op._graphs.values()))[1] is graph  # reused, not rebuilt


# ---------------------------------------------------------------------------- OperatorCache


def test_operator_cache_builds_each_matrix_once(monkeypatch) -> None:
    import flatcli.curvature.operators as ops

    model, x, y = make_case("mlp_tanh")
    built = []
    real = ops.make_operator

    def counting(*args, **kwargs):
        built.append((args[0], kwargs.get("loss_fn")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "make_operator", counting)
    cache = OperatorCache(model, x, y, batch_size=len(x), seed=3)
    a = cache.get("hessian", loss_fn="ce")
    assert cache.get("hessian", loss_fn="ce") is a and a.seed == 3
    b = cache.get("hessian", loss_fn="nsce")
    c = cache.get("ggn")
    assert len({id(a), id(b), id(c)}) == 3 and len(cache) == 3 and len(built) == 3
    a.matvec(torch.randn(a.dim, dtype=torch.float64))
    assert a._graphs
    cache.get("ggn")  # fetching another operator frees this one's graph
    assert not a._graphs
