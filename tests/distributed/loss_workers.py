"""What each process of a test world computes for the losses token-ce, mse and bce (importable,
for the spawn start method).

Seven examples, so worlds of 2 and 3 processes get uneven shards ([4, 3] and [3, 2, 2]); the
token targets have a different number of counted positions in every sequence (one sequence
none at all), so an average of per-rank (or per-chunk) averages would differ from the sample
loss, the mean over every counted position.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flatcli import distributed
from flatcli.curvature.lanczos import lanczos
from flatcli.curvature.operators import make_operator
from tests.distributed.launch import result_path

N = 7
T = 5
V = 4
LOSSES = ("token-ce", "mse", "bce")
COUNTED = (5, 3, 0, 1, 4, 5, 2)
"""Counted positions (targets != -100) of the seven sequences: shards of 3 ranks hold 8, 5, 7."""


class CausalTokenModel(nn.Module):
    """Embedding, a causal running mean over positions (so a position's logits depend on the
    earlier tokens), tanh and a Linear head: (N, T) ids -> (N, T, V) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.mix = nn.Linear(3, 3)
        self.out = nn.Linear(3, V)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        steps = torch.arange(1, x.shape[1] + 1, dtype=h.dtype, device=h.device)
        h = torch.cumsum(h, dim=1) / steps.view(1, -1, 1)
        return self.out(torch.tanh(self.mix(h)))


def problem(loss: str) -> tuple[nn.Module, Tensor, Tensor]:
    """The model (float64, eval) and the seven examples of ``loss``, the same in every process."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if loss == "token-ce":
        model = CausalTokenModel().double().eval()
        x = torch.randint(0, 6, (N, T), generator=g)
        y = torch.randint(0, V, (N, T), generator=g)
        for n, counted in enumerate(COUNTED):
            y[n, counted:] = -100
        y[1] = y[1].roll(1)  # an ignored position before counted ones, not only at the end
        return model, x, y
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    if loss == "mse":
        return model, x, torch.randn(N, 2, generator=g, dtype=torch.float64)
    return model, x, torch.rand(N, 2, generator=g, dtype=torch.float64)


def new_losses(rank: int, world: int, folder: str) -> None:
    """Per loss: dense Hessian and GGN (both AD methods, different chunk sizes), loss, gradient
    (two chunk sizes) and the top eigenvalue of the Hessian by Lanczos."""
    out: dict = {"world_size": distributed.world_size()}
    for loss in LOSSES:
        model, x, y = problem(loss)
        res: dict = {}
        settings = {
            "hessian": dict(kind="hessian", batch_size=2),
            "hessian_fwd": dict(kind="hessian", hvp_method="forward-over-reverse", batch_size=3),
            "ggn": dict(kind="ggn", batch_size=1),
            "ggn_dbl": dict(kind="ggn", hvp_method="double-backward", batch_size=N),
        }
        for name, kw in settings.items():
            op = make_operator(model=model, x=x, y=y, loss_fn=loss, **kw)
            res[name] = op.to_dense()
            res["shard"] = op.shard
            res["examples_per_rank"] = op.examples_per_rank
            if name == "hessian":
                res["loss"], res["gradient"] = op.loss_and_gradient()
                res["top"] = lanczos(op, k=1, tol=1e-12).eigenvalues
            if name == "ggn":  # one sequence per chunk
                res["loss_b1"], res["gradient_b1"] = op.loss_and_gradient()
        out[loss] = res
    torch.save(out, result_path(Path(folder), "new_losses", world, rank))
