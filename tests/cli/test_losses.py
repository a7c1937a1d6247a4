"""``--loss`` end to end (CONTRACTS.md, Losses): the default inferred from a ``tensors:`` file's
targets, ``config.loss`` naming the loss used, numbers equal to the library's on torch's loss, and
every measure that cannot take a loss refusing it before any work (exit 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.cli.helpers import invoke

NETS = """
import torch
from torch import nn

def regressor():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 6)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))

def tokens():
    return Tokens()
"""


def _problem(tmp: Path, kind: str) -> list[str]:
    """A checkpoint, ``nets.py`` and a ``tensors:`` file; the arguments that measure them."""
    (tmp / "nets.py").write_text(NETS)
    namespace: dict = {}
    exec(NETS, namespace)
    g = torch.Generator().manual_seed(1)
    if kind == "tokens":
        model = namespace["tokens"]()
        x = torch.randint(0, 6, (8, 5), generator=g)
        y = x.roll(-1, dims=1)
        y[:, -1] = -100
        factory = "tokens"
    else:
        model = namespace["regressor"]()
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        y = torch.randn(8, 2, generator=g, dtype=torch.float64)
        if kind == "classes":
            y = torch.randint(0, 2, (8,), generator=g)
        factory = "regressor"
    torch.save(model.state_dict(), tmp / "m.pt")
    save_file({"x": x, "y": y}, str(tmp / "data.safetensors"))
    return [
        str(tmp / "m.pt"),
        "--model",
        f"{tmp}/nets.py:{factory}",
        "--dataset",
        f"tensors:{tmp}/data.safetensors",
        "--dtype",
        "float64",
    ]


def _ggn_top(tmp: Path, loss) -> float:
    """The top GGN eigenvalue of ``loss`` (torch's) on the regression problem, densely."""
    namespace: dict = {}
    exec(NETS, namespace)
    model = namespace["regressor"]().double()
    model.load_state_dict(torch.load(tmp / "m.pt"))
    from safetensors.torch import load_file

    data = load_file(str(tmp / "data.safetensors"))
    x, y = data["x"], data["y"]
    params = list(model.parameters())
    J = torch.autograd.functional.jacobian(
        lambda *p: torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], p, strict=True)), (x,)
        ),
        tuple(params),
    )
    J = torch.cat([j.reshape(x.shape[0] * 2, -1) for j in J], dim=1)
    z = model(x).detach()
    Hz = torch.autograd.functional.hessian(lambda zz: loss(zz.view(z.shape), y), z.flatten())
    return float(torch.linalg.eigvalsh(J.T @ Hz @ J)[-1])


def test_regression_end_to_end_with_inferred_mse(tmp_path: Path) -> None:
    args = _problem(tmp_path, "regression")
    out = tmp_path / "r.json"
    res = invoke("spectrum", *args, "--matrix", "ggn", "--top-k", "1", "--json", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["config"]["loss"] == "mse"
    top = report["results"][0]["metrics"]["top_eigenvalue"]
    assert top == pytest.approx(_ggn_top(tmp_path, F.mse_loss), rel=1e-6)
    # --loss bce on the same net: another number, and the config names it
    y = torch.rand(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    save_file(
        {"x": torch.randn(8, 3, dtype=torch.float64), "y": y}, str(tmp_path / "b.safetensors")
    )
    args_b = [*args[:4], f"tensors:{tmp_path}/b.safetensors", *args[5:]]
    res = invoke("spectrum", *args_b, "--loss", "bce", "--top-k", "1", "--json", out)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["config"]["loss"] == "bce"


def test_gamma_and_kfac_take_mse(tmp_path: Path) -> None:
    args = _problem(tmp_path, "regression")
    out = tmp_path / "g.json"
    res = invoke("gamma", *args, "--samples", "4", "--trials", "2", "--json", out)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["config"]["loss"] == "mse"
    res = invoke("kfac", *args, "--top-k", "2", "--probes", "2", "--json", out)
    assert res.exit_code == 0, res.output


def test_token_model_end_to_end(tmp_path: Path) -> None:
    args = _problem(tmp_path, "tokens")
    out = tmp_path / "t.json"
    res = invoke("spectrum", *args, "--top-k", "1", "--json", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["config"]["loss"] == "token-ce"
    assert report["results"][0]["error"] is None
    res = invoke("sharpness", *args, "--measure", "hessian_trace", "--json", out)
    assert res.exit_code == 0, res.output
    settings = json.loads(out.read_text())["results"][0]["details"]["settings"]
    assert settings["hessian_trace"]["loss"] == "token-ce"


@pytest.mark.parametrize(
    ("kind", "command", "extra", "loss", "match"),
    [
        ("regression", "gamma", ["--baselines"], None, "gamma --baselines cannot take loss mse"),
        ("classes", "kfac", [], "nsce", "kfac cannot take loss nsce"),
        ("regression", "spectrum", ["--matrix", "fisher"], None, "--matrix fisher"),
        ("regression", "spectrum", [], "ce", "loss ce needs logits"),
        ("tokens", "gamma", [], "mse", "loss mse needs outputs"),
    ],
)
def test_refusals_before_work(
    tmp_path: Path, kind: str, command: str, extra: list[str], loss: str | None, match: str
) -> None:
    args = _problem(tmp_path, kind)
    more = ["--loss", loss] if loss else []
    res = invoke(command, *args, *extra, *more)
    assert res.exit_code == 2, res.output
    assert match in res.output


def test_measures_lists_losses() -> None:
    res = invoke("measures", "--json", "-")
    assert res.exit_code == 0, res.output
    listing = json.loads(res.stdout)
    losses = {m["name"]: m["losses"] for m in listing["measures"]}
    assert losses["spectrum"] == ["ce", "nsce", "token-ce", "mse", "bce"]
    assert losses["kfac"] == ["ce", "token-ce", "mse", "bce"]
    assert "mse" not in losses["pacbayes"]


def test_unknown_loss_is_exit_2(tmp_path: Path) -> None:
    res = invoke("spectrum", *_problem(tmp_path, "regression"), "--loss", "hinge")
    assert res.exit_code == 2
