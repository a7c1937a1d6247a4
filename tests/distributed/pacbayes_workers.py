"""What each process of a test world computes for the PAC-Bayes Monte-Carlo error."""

from __future__ import annotations

from pathlib import Path

import torch

from flatcli import distributed
from flatcli.pacbayes.montecarlo import snn_errors
from flatcli.pacbayes.optimize import Basis, Posterior
from tests.distributed.launch import result_path
from tests.pacbayes.problem import build, make_data

SAMPLES = 7


def mc_errors(rank: int, world: int, folder: str) -> None:
    """The per-sample errors of 7 weight samples and the collectives it took, saved."""
    model = build()
    data = make_data()
    g = torch.Generator().manual_seed(5)
    mean = {k: v.detach().clone() for k, v in model.named_parameters()}
    log_std = {k: -1.5 + 0.3 * torch.randn(v.shape, generator=g) for k, v in mean.items()}
    post = Posterior(mean, log_std, -3.0, Basis())
    distributed.reset_comm_stats()
    errs = snn_errors(
        model, post, data["x_train"], data["y_train"], samples=SAMPLES, seed=3, sample_chunk=2
    )
    out = {"errors": errs, "collectives": distributed.comm_stats().collectives}
    torch.save(out, result_path(Path(folder), "mc", world, rank))
