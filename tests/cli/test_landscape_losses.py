"""``flatcli landscape`` with the losses beyond ``ce``: a causal transformer language model on a
``tensors:`` file of token ids (``token-ce``, inferred from the (N, T) int targets), a regression
net (``mse``, no accuracy) and a multi-label net (``bce``, recorded in the checkpoint); and the
run's loss (``--loss``, else the checkpoint's record) is the slice's loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flatcli.curvature.losses import normalized_cross_entropy
from tests.cases import write_cli_problem
from tests.cli.helpers import invoke, report_of
from tests.io.test_report import validate_report
from tests.landscape.nets import COUNTED, SOURCE, mlp_problem, token_problem
from tests.landscape.reference import flat, reference_loss_slice

METRICS = {"center_loss", "min_loss", "max_loss", "basin_width", "num_params"}


def _directions(model: nn.Module, path) -> list[dict[str, torch.Tensor]]:
    """d₁ and d₂ of a ``--save-directions`` file, by the model's parameter names."""
    saved = load_file(str(path))
    names = [n for n, _ in model.named_parameters()]
    return [{n: saved[f"d{k}.{n}"] for n in names} for k in (1, 2)]


@pytest.mark.filterwarnings("ignore:.*batching rule:UserWarning")
def test_a_language_model_reports_the_documented_keys_and_the_token_ce_slice(tmp_path):
    (tmp_path / "nets.py").write_text(SOURCE)
    model, x, y = token_problem("gpt")
    torch.save(model.state_dict(), tmp_path / "lm.pt")
    save_file({"x": x, "y": y}, str(tmp_path / "tokens.safetensors"))
    dirs = tmp_path / "dirs.safetensors"
    out = tmp_path / "r.json"
    res = invoke(
        "landscape",
        tmp_path / "lm.pt",
        "--model",
        f"{tmp_path}/nets.py:make",
        "--dataset",
        f"tensors:{tmp_path}/tokens.safetensors",
        "--dtype",
        "float64",
        "-q",
        "--no-cache",
        "--dims",
        "2",
        "--steps",
        "3",
        "--range",
        "0.5",
        "--save-directions",
        dirs,
        "--json",
        out,
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    validate_report(report, "landscape")
    assert report["config"]["loss"] == "token-ce"  # inferred from the (N, T) int targets
    entry = report["results"][0]
    assert entry["error"] is None and set(entry["metrics"]) == METRICS
    d = entry["details"]
    assert d["alphas"] == d["betas"] == [-0.5, 0.0, 0.5]
    assert len(d["loss"]) == 3 and all(len(row) == 3 for row in d["loss"])
    assert len(d["accuracy"]) == 3 and all(len(row) == 3 for row in d["accuracy"])
    assert d["evaluation"]["loss"] == "token-ce" and d["evaluation"]["positions"] == sum(COUNTED)
    assert d["evaluation"]["accuracy"].startswith("token")
    assert d["evaluation"]["first_layer"] is None
    points = [(a, b) for a in d["alphas"] for b in d["betas"]]
    loss, acc = reference_loss_slice(model, x, y, _directions(model, dirs), points, "token-ce")
    assert flat(d["loss"]) == pytest.approx(loss, rel=1e-12)
    assert flat(d["accuracy"]) == pytest.approx(acc, rel=1e-15)
    assert entry["metrics"]["center_loss"] == pytest.approx(loss[4], rel=1e-12)


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_regression_and_multi_label_nets(tmp_path, kind):
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))\n"
    )
    model, x, y = mlp_problem(kind)
    # float targets: mse by default; bce as the checkpoint's record says (no --loss)
    meta = {"flatcli.meta": json.dumps({"loss": "bce"})} if kind == "bce" else None
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"), metadata=meta)
    save_file({"x": x, "y": y}, str(tmp_path / "data.safetensors"))
    out = tmp_path / "r.json"
    res = invoke(
        "landscape",
        tmp_path / "m.safetensors",
        "--model",
        f"{tmp_path}/nets.py:make",
        "--dataset",
        f"tensors:{tmp_path}/data.safetensors",
        "--dtype",
        "float64",
        "-q",
        "--no-cache",
        "--steps",
        "5",
        "--save-directions",
        tmp_path / "d.safetensors",
        "--json",
        out,
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    validate_report(report, "landscape")
    assert report["config"]["loss"] == kind
    d = report["results"][0]["details"]
    saved = load_file(str(tmp_path / "d.safetensors"))
    d1 = {n: saved[f"d1.{n}"] for n, _ in model.named_parameters()}
    loss, acc = reference_loss_slice(model, x, y, [d1], [(a,) for a in d["alphas"]], kind)
    assert d["loss"] == pytest.approx(loss, rel=1e-12)
    if kind == "mse":
        assert d["accuracy"] is None and d["center_accuracy"] is None
        assert d["reasons"]["accuracy"] == "mse has no accuracy"
    else:
        assert d["accuracy"] == pytest.approx(acc, rel=1e-15)


@pytest.mark.parametrize("how", ["option", "record"])
def test_the_runs_loss_is_the_loss_of_the_slice(tmp_path, how):
    """``--loss nsce``, or ``nsce`` recorded in the checkpoint (no ``--loss``)."""
    ns = write_cli_problem(tmp_path, 12)
    torch.manual_seed(0)
    model = ns["make"]().double().eval()
    meta = {"flatcli.meta": json.dumps({"loss": "nsce"})}
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"), metadata=meta)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    args = ["-q", "--no-cache", "--steps", "1"]
    if how == "option":
        args += ["--loss", "nsce"]
    ckpt = "m.pt" if how == "option" else "m.safetensors"
    _, report = report_of("landscape", tmp_path, tmp_path / "r.json", *args, ckpt=ckpt)
    assert report["config"]["loss"] == "nsce"
    assert report["results"][0]["details"]["evaluation"]["loss"] == "nsce"
    data = load_file(str(tmp_path / "data.safetensors"))
    with torch.no_grad():
        nsce = float(normalized_cross_entropy(model(data["x"]), data["y"]).mean())
    assert report["results"][0]["metrics"]["center_loss"] == pytest.approx(nsce, rel=1e-12)
