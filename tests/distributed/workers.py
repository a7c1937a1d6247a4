"""What each process of a test world computes (importable, for the spawn start method)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flatcli import distributed
from flatcli.curvature.diagonal import ggn_diagonal
from flatcli.curvature.kfac import kfac_factors
from flatcli.curvature.lanczos import lanczos
from flatcli.curvature.operators import make_operator
from flatcli.curvature.trace import hutchpp
from tests.distributed.launch import result_path

N = 7


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny tanh MLP (3 -> 4 -> 3, float64) and 7 examples, the same in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def operators(rank: int, world: int, folder: str) -> None:
    """Dense matrices, MC labels and replicated solver results of this process."""
    model, x, y = problem()
    out: dict = {"world_size": distributed.world_size(), "examples_per_rank": None}
    settings = {
        "hessian": dict(kind="hessian"),
        "hessian_fwd": dict(kind="hessian", hvp_method="forward-over-reverse"),
        "ggn": dict(kind="ggn"),
        "ggn_dbl": dict(kind="ggn", hvp_method="double-backward"),
        "fisher_mc": dict(kind="fisher", mc_samples=3, seed=5),
        "fisher_exact": dict(kind="fisher", fisher_type="exact"),
    }
    for name, kw in settings.items():
        op = make_operator(model=model, x=x, y=y, batch_size=2, **kw)
        out[name] = op.to_dense()
        out["examples_per_rank"] = op.examples_per_rank
        out["shard"] = op.shard
        if name == "fisher_mc":
            out["mc_labels"] = op.mc_labels.clone()
        if name == "hessian":
            res = lanczos(op, k=3, tol=1e-10)
            out["lanczos"] = res.eigenvalues
            out["hutchpp"] = hutchpp(op, probes=30, seed=3).value
    for fisher in ("exact", "mc"):
        factors = kfac_factors(model, x, y, fisher=fisher, mc_samples=2, batch_size=2, seed=4)
        out[f"kfac_{fisher}"] = {
            name: (f.em, f.exx, f.mean_x, f.positions) for name, f in factors.items()
        }
    out["ggn_diagonal"] = torch.cat([v.flatten() for v in ggn_diagonal(model, x, y).values()])
    big = make_operator("hessian", model, x, y, batch_size=2)
    distributed.reset_comm_stats()
    big.matmat(torch.randn(big.dim, 4, dtype=torch.float64))
    stats = distributed.comm_stats()
    out["comm"] = (stats.collectives, stats.elements, big.dim)
    torch.save(out, result_path(Path(folder), "operators", world, rank))


def failing(rank: int, world: int, folder: str) -> None:
    """Rank 1 fails before the synchronisation point; every rank must learn of it, none hang."""
    error = RuntimeError("bad checkpoint on rank 1") if rank == 1 else None
    try:
        distributed.agree(error, "loading")
        outcome = "no error"
    except distributed.PeerError as e:
        outcome = f"peer: {e}"
    except RuntimeError as e:
        outcome = f"own: {e}"
    # the world is still usable afterwards: one more collective completes
    total = distributed.all_reduce_sum([torch.ones(2)])[0]
    torch.save((outcome, total), result_path(Path(folder), "failing", world, rank))
