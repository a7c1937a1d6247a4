"""``rank --evaluate`` for every loss: token accuracy and loss over the counted positions for
``token-ce``, the loss gap for ``mse`` (which has no accuracy gap), as ``flatcli train`` records
them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from flatcli.errors import UsageError
from flatcli.evaluation import evaluate_loss
from flatcli.io.checkpoint import save_checkpoint
from flatcli.rank.core import LoadOptions, RankConfig, rank_checkpoints
from flatcli.rank.sweep import check_gap_kind
from tests.rank.helpers import Counter, install

VOCAB, T = 12, 6
EVERY_LOSS = ("ce", "nsce", "token-ce", "mse", "bce")


@pytest.fixture()
def toy(monkeypatch):
    """The helpers' toy measure, taking every loss."""
    counter = Counter()
    install(monkeypatch, counter, losses=EVERY_LOSS)
    return counter


def _token_sweep(tmp_path):
    """Two gpt-tiny checkpoints and a tensors: file of token targets with uncounted positions."""
    from model_zoo import get_model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (20, T + 1), generator=g)
    y = ids[:, 1:].clone()
    y[::3, :2] = -100  # positions that do not count
    data = tmp_path / "tokens.safetensors"
    save_file(
        {
            "x_train": ids[:14, :-1].contiguous(),
            "y_train": y[:14].contiguous(),
            "x_test": ids[14:, :-1].contiguous(),
            "y_test": y[14:].contiguous(),
        },
        str(data),
    )
    spec = {"arch": "gpt-tiny", "kwargs": {"num_classes": VOCAB, "input_shape": [T]}}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = get_model("gpt-tiny", num_classes=VOCAB, input_shape=(T,))
        meta = {"dataset": f"tensors:{data}", "loss": "token-ce"}
        paths.append(
            save_checkpoint(tmp_path / f"lm{seed}.safetensors", model.state_dict(), spec, meta)
        )
    return paths, data


def _expected_tokens(path, data):
    """Token accuracy and mean loss over the counted positions, written out here."""
    from safetensors.torch import load_file

    from flatcli.io.checkpoint import load_checkpoint
    from model_zoo import get_model

    model = get_model("gpt-tiny", num_classes=VOCAB, input_shape=(T,)).double().eval()
    model.load_state_dict(load_checkpoint(path).state_dict)
    tensors = load_file(str(data))
    out = {}
    for split in ("train", "test"):
        x, y = tensors[f"x_{split}"], tensors[f"y_{split}"]
        with torch.no_grad():
            logits = model(x).reshape(-1, VOCAB)
        flat, counted = y.reshape(-1), y.reshape(-1) != -100
        loss = F.cross_entropy(logits[counted], flat[counted], reduction="sum")
        out[f"{split}_loss"] = float(loss) / int(counted.sum())
        hits = (logits.argmax(-1) == flat) & counted
        out[f"{split}_acc"] = int(hits.sum()) / int(counted.sum())
    return out


def test_evaluate_measures_token_accuracy_and_loss_over_counted_positions(tmp_path, toy):
    paths, data = _token_sweep(tmp_path)
    res = rank_checkpoints(
        paths,
        RankConfig(metrics=("toy_norm",), evaluate=True, bootstrap=0),
        LoadOptions(dtype="float64", device="cpu"),
    )
    for path, row in zip(paths, res.rows, strict=True):
        assert row["error"] is None, row["error"]
        gen = row["details"]["generalization"]
        assert gen["source"] == "evaluate" and gen["loss"] == "token-ce"
        expected = _expected_tokens(path, data)
        for key, value in expected.items():
            assert gen[key] == pytest.approx(value, rel=1e-12), key
        assert row["gap"] == pytest.approx(expected["train_acc"] - expected["test_acc"])


def _regression_sweep(tmp_path):
    """Two mlp checkpoints (4 -> 5 -> 2) and a tensors: file of float targets."""
    from model_zoo import get_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(4, 2, generator=g, dtype=torch.float64))
    data = tmp_path / "reg.safetensors"
    save_file({"x_train": x[:20], "y_train": y[:20], "x_test": x[20:], "y_test": y[20:]}, str(data))
    spec = {"arch": "mlp", "kwargs": {"in_features": 4, "num_classes": 2, "hidden": [5]}}
    paths, models = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = get_model("mlp", in_features=4, num_classes=2, hidden=[5])
        meta = {"dataset": f"tensors:{data}", "loss": "mse"}
        paths.append(
            save_checkpoint(tmp_path / f"reg{seed}.safetensors", model.state_dict(), spec, meta)
        )
        models.append(model.double().eval())
    return paths, models, (x[:20], y[:20], x[20:], y[20:])


def test_an_accuracy_gap_of_mse_is_refused_before_work(tmp_path, toy):
    paths, _, _ = _regression_sweep(tmp_path)
    opts = LoadOptions(dtype="float64", device="cpu")
    for evaluate in (True, False):
        res = rank_checkpoints(
            paths, RankConfig(metrics=("toy_norm",), evaluate=evaluate, bootstrap=0), opts
        )
        assert res.outcome.failure == 2
        assert not toy.calls
        message = res.rows[0]["error"]["message"]
        assert message == (
            "--gap acc needs an accuracy, and loss mse has none: pass --gap loss "
            "(test loss - train loss)"
        )


def test_the_loss_gap_of_mse_is_test_minus_train_mse(tmp_path, toy):
    paths, models, (xtr, ytr, xte, yte) = _regression_sweep(tmp_path)
    res = rank_checkpoints(
        paths,
        RankConfig(metrics=("toy_norm",), evaluate=True, gap="loss", bootstrap=0),
        LoadOptions(dtype="float64", device="cpu"),
    )
    for model, row in zip(models, res.rows, strict=True):
        assert row["error"] is None, row["error"]
        gen = row["details"]["generalization"]
        with torch.no_grad():
            train, test = F.mse_loss(model(xtr), ytr).item(), F.mse_loss(model(xte), yte).item()
        assert gen["train_acc"] is None and gen["test_acc"] is None
        assert gen["train_loss"] == pytest.approx(train, rel=1e-12)
        assert gen["test_loss"] == pytest.approx(test, rel=1e-12)
        assert row["gap"] == pytest.approx(test - train, rel=1e-9)


def test_check_gap_kind():
    labels, floats = torch.tensor([0, 1]), torch.tensor([[0.0, 1.0]])
    check_gap_kind("acc", "ce", labels)
    check_gap_kind("acc", "bce", floats)  # targets all 0 or 1: an accuracy
    check_gap_kind("loss", "mse", floats)
    with pytest.raises(UsageError, match="loss mse has none: pass --gap loss"):
        check_gap_kind("acc", "mse", floats)
    with pytest.raises(UsageError, match="bce has one only for targets that are all 0 or 1"):
        check_gap_kind("acc", "bce", floats / 2)


def test_evaluate_loss_casts_the_head_and_leaves_no_hook():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([[0.0, 1.0]] * 5)
    loss, acc = evaluate_loss(model, x, y, "bce", batch_size=2, head_dtype=torch.float64)
    with torch.no_grad():
        out = model(x).double()
    assert loss == pytest.approx(F.binary_cross_entropy_with_logits(out, y.double()).item())
    assert acc == pytest.approx(((out > 0) == (y > 0.5)).double().mean().item())
    assert not model._forward_hooks and model.training
