"""The exact GGN diagonal of a ``token-ce`` language model, in bounded memory (issue #23).

The head Hessian of a sequence is (T·V) x (T·V); it used to be formed (and eigendecomposed) in
full, and every example forwarded T·V times at once, or its (T·V, P) Jacobian formed: a 120k-
parameter GPT on 64-byte windows needed ~23 GB. The closed-form factor gives T·V rows a block
at a time. Checked against dense float64 truth (J^T H_z J by torch.func), on both paths (the
layer capture, and the fallback for a tied head), with blocks that split positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev
from torch.nn import functional as F

from flatcli.curvature import diagonal
from flatcli.curvature.diagonal import ggn_diagonal
from flatcli.curvature.losses import sample_loss
from flatcli.curvature.params import flatten_params
from tests.references import flat_logits, peak_cpu_bytes

V = 5


class TokenModel(nn.Module):
    """Embedding, a Linear over positions, a causal mix and a Linear head (capturable)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.tied = tied
        self.emb = nn.Embedding(V, 3)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, V)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mid(self.emb(x)))
        h = h + torch.cumsum(h, dim=1) / 2  # positions interact (causally)
        if self.tied:  # the embedding reused as the head: the capture refuses, the fallback runs
            return F.linear(h, self.emb.weight) + self.out.bias
        return self.out(h)


def _case(tied: bool) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = TokenModel(tied).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 4), generator=g)
    y = torch.randint(0, V, (3, 4), generator=g)
    y[0, 1] = -100
    y[2, :3] = -100
    return model, x, y


def _dense_ggn_diagonal(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """diag(J^T H_z J) / N of the token-ce sample loss, by torch.func in float64."""
    theta, logits = flat_logits(model, x)

    z = logits(theta).detach()
    J = jacrev(logits)(theta).reshape(z.numel(), -1)

    def ref(zz: Tensor) -> Tensor:
        return F.cross_entropy(zz.view(-1, V), y.reshape(-1), ignore_index=-100)

    Hz = hessian(ref)(z.flatten())
    return (J.T @ Hz @ J).diagonal()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("block", [None, 3, 7])
def test_token_ggn_diagonal_matches_dense(
    tied: bool, block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows in blocks of 3 or 7 (T·V = 20 per sequence: blocks that split positions and a
    padded last block) and all at once give the dense float64 diagonal to 1e-12."""
    model, x, y = _case(tied)
    truth = _dense_ggn_diagonal(model, x, y)
    used = []
    real = diagonal._jacobian_ggn_diagonal
    monkeypatch.setattr(diagonal, "_jacobian_ggn_diagonal", lambda *a: used.append(1) or real(*a))
    if block is not None and tied:  # rows per block of the fallback follow its workspace
        dim = sum(p.numel() for p in model.parameters())
        monkeypatch.setattr(diagonal, "ACTIVATION_FACTOR", 0.0)
        monkeypatch.setattr(diagonal, "GGN_WORKSPACE_BYTES", block * dim * 8)
    got = ggn_diagonal(model, x, y, loss_fn="token-ce", batch_size=None if tied else block)
    torch.testing.assert_close(flatten_params(got), truth, rtol=0, atol=1e-12)
    assert bool(used) == tied


def test_token_rows_are_the_closed_form_head_factor() -> None:
    """The token-ce factor never forms the (T·V)^2 head Hessian: its blocks of rows reassemble
    the autograd head Hessian of each sequence (the sample loss's weight N/C included)."""
    model, x, y = _case(False)
    with torch.no_grad():
        z = model(x)
    head = sample_loss("token-ce", y)
    rows = diagonal._head_factor(head, torch.float64, z[0].numel())(z, y)
    assert isinstance(rows, diagonal._TokenRows) and rows.count == 4 * V
    blocks = [rows.block(r0, min(rows.count, r0 + 6)) for r0 in range(0, rows.count, 6)]
    w = torch.cat([b[0] for b in blocks], dim=1)
    q = torch.cat([b[1] for b in blocks], dim=1).reshape(3, rows.count, -1)
    for n in range(3):
        Hz = hessian(lambda zz, n=n: head(zz.unsqueeze(0), y[n : n + 1])[0])(z[n])
        Hz = Hz.reshape(rows.count, rows.count)
        torch.testing.assert_close(q[n].T @ (w[n, :, None] * q[n]), Hz, rtol=0, atol=1e-14)


@pytest.mark.parametrize("tied", [False, True])
def test_token_ggn_diagonal_memory_does_not_grow_with_t_times_v(
    tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """T = 16 positions of V = 256 tokens: T·V = 4,096 rows per sequence, whose head Hessian
    alone is 134 MB in float64 (and the Jacobian of the tied model 4,096 x P: 33 MB). With the
    blocks' budgets at 4 MiB the diagonal peaks below 24 MB on both paths: the budgets, not
    T·V, bound it."""
    monkeypatch.setattr(diagonal, "CAPTURE_BUDGET", 4 * 2**20)
    monkeypatch.setattr(diagonal, "GGN_WORKSPACE_BYTES", 4 * 2**20)
    torch.manual_seed(0)

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(256, 4)
            self.out = nn.Linear(4, 256)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.emb(x))
            return F.linear(h, self.emb.weight) if tied else self.out(h)

    model = Small().eval()
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    peak = peak_cpu_bytes(lambda: ggn_diagonal(model, x, y, loss_fn="token-ce"))
    assert peak < 24 * 2**20, peak / 2**20
