"""Gaps and hyperparameters: training records, user tables, axes."""

from __future__ import annotations

import pytest

from flatcli.errors import UsageError
from flatcli.rank.sweep import detect_axes, gap_of, read_table, record_hyperparameters


def test_gap_kinds():
    gen = {"train_acc": 1.0, "test_acc": 0.9, "train_loss": 0.1, "test_loss": 0.5}
    assert gap_of(gen, "acc") == pytest.approx(0.1)
    assert gap_of(gen, "loss") == pytest.approx(0.4)
    assert gap_of({"train_acc": 1.0}, "acc") is None
    assert gap_of({"gap": 0.3, "train_acc": 1.0, "test_acc": 0.0}, "acc") == 0.3
    with pytest.raises(UsageError, match="--gap"):
        gap_of(gen, "error")


def test_record_hyperparameters_flatten_training_config_and_spec_kwargs():
    from flatcli.io.spec import ModelSpec

    record = {"dataset": "mnist5k", "train": {"lr": 0.1, "milestones": [3, 5], "device": "cpu"}}
    spec = ModelSpec(arch="mlp", kwargs={"hidden": [32, 32], "num_classes": 10, "lr": 7})
    h = record_hyperparameters(record, spec)
    assert h == {
        "lr": 0.1,
        "milestones": (3, 5),
        "dataset": "mnist5k",
        "model": "mlp",
        "hidden": (32, 32),
        "model.lr": 7,
    }


def test_detect_axes_treats_seed_as_a_repeat_unless_asked():
    hs = [{"lr": lr, "seed": s, "wd": 0.0} for lr in (0.1, 0.2) for s in (0, 1)]
    axes, notes = detect_axes(hs)
    assert axes == ["lr"] and "repeat" in notes["seed"]
    axes, notes = detect_axes(hs, ["lr", "seed", "wd"])
    assert axes == ["lr", "seed"] and notes["wd"] == "takes one value only"
    with pytest.raises(UsageError, match="no checkpoint has hyperparameter"):
        detect_axes(hs, ["width"])
    axes, notes = detect_axes([{"lr": 0.1}, {"lr": 0.2, "width": 3}])
    assert axes == ["lr"] and notes["width"] == "missing on some checkpoints"


def test_read_table(tmp_path):
    (tmp_path / "runs").mkdir()
    csv = tmp_path / "runs.csv"
    csv.write_text(
        "checkpoint,train_acc,test_acc,lr,opt\nruns/a.pt,1.0,0.9,0.1,sgd\nruns/b.pt,0.95,0.9,0.2,\n"
    )
    t = read_table(csv)
    assert t.gap_columns == ("train_acc", "test_acc") and t.hyperparameter_columns == ("lr", "opt")
    row = t.find(tmp_path / "runs" / "a.pt")
    assert row["generalization"] == {"train_acc": 1.0, "test_acc": 0.9}
    assert row["hyperparameters"] == {"lr": 0.1, "opt": "sgd"}
    assert t.find(tmp_path / "elsewhere" / "b.pt")["hyperparameters"]["opt"] is None  # by name
    assert t.find(tmp_path / "c.pt") is None  # no row: no gap, not an error
    (tmp_path / "bad.csv").write_text("file,lr\na.pt,0.1\n")
    with pytest.raises(UsageError, match="needs a 'gap' column"):
        read_table(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("name,gap\na.pt,0.1\n")
    with pytest.raises(UsageError, match="needs a 'checkpoint' column"):
        read_table(tmp_path / "bad2.csv")
    with pytest.raises(UsageError, match="cannot read --table"):
        read_table(tmp_path / "missing.csv")
