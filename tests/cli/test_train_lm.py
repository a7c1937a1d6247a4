"""``flatcli train`` beyond classifiers: a causal LM on a ``text:`` file (token-ce), regression
(mse) and multi-label (bce) nets on ``tensors:`` files; each checkpoint records its loss (and
seq-len) so that the analysis commands need no extra arguments."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flatcli.io.checkpoint import load_checkpoint
from flatcli.io.load import load
from tests.cli.helpers import invoke
from tests.io.test_report import validate_report

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness. "
) * 3  # 690 bytes: 40 windows of 17 at --seq-len 16, 4 of them the test split


def _text(tmp_path: Path, text: str | bytes = TEXT) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _train_lm(tmp_path: Path, *args: object) -> tuple[Path, dict]:
    """gpt-tiny trained one epoch on the corpus at --seq-len 16: (checkpoint, JSON report)."""
    corpus, out, report = _text(tmp_path), tmp_path / "lm.safetensors", tmp_path / "train.json"
    res = invoke(
        "train", "--model", "gpt-tiny", "--dataset", f"text:{corpus}", "--seq-len", 16,
        "--epochs", 1, "--batch-size", 8, "--optimizer", "adam", "--lr", "3e-3",
        "-o", out, "--json", report, "--quiet", *args,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out, json.loads(report.read_text())


def _token_numbers(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Mean token cross-entropy and token accuracy, written out position by position."""
    with torch.no_grad():
        logits = model(x)
    losses, hits = [], []
    for n in range(x.shape[0]):
        for t in range(x.shape[1]):
            log_p = logits[n, t].double().log_softmax(-1)
            losses.append(-float(log_p[y[n, t]]))
            hits.append(int(logits[n, t].argmax()) == int(y[n, t]))
    return sum(losses) / len(losses), sum(hits) / len(hits)


def test_train_gpt_tiny_on_text_then_measure_it_with_no_arguments(tmp_path):
    out, report = _train_lm(tmp_path)
    validate_report(report, "train")
    assert report["config"]["loss"] == "token-ce" and report["config"]["seq_len"] == 16
    ck = load_checkpoint(out)
    assert ck.meta["dataset"] == f"text:{tmp_path / 'corpus.txt'}"  # found from here
    assert ck.meta["dataset_source"]["relative"] == "corpus.txt"  # recorded beside it
    assert ck.meta["loss"] == "token-ce" and ck.meta["train"]["loss"] == "token-ce"
    assert ck.meta["seq_len"] == 16 and ck.meta["num_classes"] == 256
    assert ck.meta["text"]["tokenizer"]["kind"] == "bytes"
    assert (ck.meta["text"]["windows"], ck.meta["text"]["test_windows"]) == (40, 4)
    assert ck.spec["kwargs"]["num_classes"] == 256 and ck.spec["kwargs"]["input_shape"] == [16]

    # the analysis side rebuilds the same windows from the record alone
    run = load(out, device="cpu")
    assert run.loss == "token-ce" and tuple(run.x.shape) == (36, 16) and run.x.dtype == torch.int64
    assert torch.equal(run.x[0], torch.tensor(list(TEXT.encode()[:16])))
    assert torch.equal(run.y[0], torch.tensor(list(TEXT.encode()[1:17])))
    # the reported numbers are the token cross-entropy and token accuracy of each split
    results = report["results"][0]["metrics"]
    loss, acc = _token_numbers(run.model, run.x, run.y)
    assert results["train_loss"] == pytest.approx(loss, rel=1e-4)
    assert results["train_acc"] == pytest.approx(acc, abs=1e-12)
    test = load(out, device="cpu", split="test")
    loss, acc = _token_numbers(test.model, test.x, test.y)
    assert results["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert results["test_acc"] == pytest.approx(acc, abs=1e-12)
    assert results["test_perplexity"] == pytest.approx(math.exp(results["test_loss"]))
    assert 2.0 < results["train_loss"] < math.log(256)  # one epoch learnt something

    measured = tmp_path / "spectrum.json"
    res = invoke("spectrum", out, "--top-k", 1, "--max-examples", 8, "--json", measured, "-q")
    assert res.exit_code == 0, res.output
    spectrum = json.loads(measured.read_text())
    validate_report(spectrum, "spectrum")
    assert spectrum["config"]["loss"] == "token-ce"
    assert spectrum["results"][0]["error"] is None
    assert spectrum["results"][0]["metrics"]["top_eigenvalue"] > 0
    # --seq-len of an analysis command re-cuts the text (up to the model's 16 positions)
    assert tuple(load(out, device="cpu", seq_len=8).x.shape) == (69, 8)  # 76 windows of 9
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:100])  # too short for the default 128, enough at --seq-len 8
    res = invoke(
        "gamma", out, "--dataset", f"text:{short}", "--seq-len", 8, "--samples", 4,
        "--trials", 2, "--json", measured, "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    gamma = json.loads(measured.read_text())
    assert gamma["config"]["seq_len"] == 8 and gamma["config"]["loss"] == "token-ce"
    assert gamma["results"][0]["error"] is None


@pytest.mark.parametrize(
    ("content", "args", "match"),
    [
        (b"", (), "is empty"),
        (b"short text", (), "too few for --seq-len 16"),
        (b"caf\xe9 " * 60, (), "not UTF-8"),
        (TEXT.encode(), ("--seq-len", "0"), "--seq-len"),
        (TEXT.encode(), ("--random-labels", "0.1"), "draw class labels"),
        (TEXT.encode(), ("--loss", "mse"), "loss mse needs"),
        (TEXT.encode(), ("--loss", "bce"), "loss bce needs"),
    ],
)
def test_bad_text_or_options_are_refused_before_training(tmp_path, content, args, match):
    corpus, out = _text(tmp_path, content), tmp_path / "lm.safetensors"
    res = invoke(
        "train", "--model", "gpt-tiny", "--dataset", f"text:{corpus}", "-o", out,
        *(("--seq-len", "16") if "--seq-len" not in args else ()), *args,
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_seq_len_is_refused_for_a_dataset_that_is_not_text(tmp_path):
    res = invoke(
        "train", "--model", "mlp", "--dataset", "mnist5k", "--seq-len", 8,
        "-o", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert res.exit_code == 2 and "--seq-len" in res.output and "text datasets" in res.output


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="needs tokenizers")
def test_a_tokenizer_json_beside_the_checkpoint_tokenises_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    corpus, out = _text(tmp_path), tmp_path / "lm.safetensors"
    res = invoke(
        "train", "--model", "gpt-tiny", "--dataset", f"text:{corpus}", "--seq-len", 4,
        "--epochs", 1, "-o", out, "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    vocab = tok.get_vocab_size()
    assert ck.meta["text"]["tokenizer"]["kind"] == "tokenizer.json"
    assert ck.meta["num_classes"] == vocab and ck.spec["kwargs"]["num_classes"] == vocab
    run = load(out, device="cpu")
    assert run.x[0].tolist() == ids[:4] and run.y[0].tolist() == ids[1:5]


def _tensors(tmp_path: Path, kind: str) -> Path:
    """A float-target ``tensors:`` file: a noisy linear map (mse) or its signs (bce)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    y = x @ torch.randn(5, 3, generator=g) + 0.1 * torch.randn(96, 3, generator=g)
    if kind == "bce":
        y = (y > 0).to(torch.float32)
    path = tmp_path / f"{kind}.safetensors"
    save_file({"x_train": x[:80], "y_train": y[:80], "x_test": x[80:], "y_test": y[80:]}, path)
    return path


def _mlp_numbers(out: Path, split: str, loss: str) -> tuple[float, float | None]:
    run = load(out, device="cpu", split=split)
    with torch.no_grad():
        z = run.model(run.x)
    if loss == "mse":
        return float(((z - run.y) ** 2).mean()), None
    value = float(F.binary_cross_entropy_with_logits(z, run.y))
    return value, float(((z > 0).float() == run.y).float().mean())


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_train_regression_and_multilabel_mlps(tmp_path, loss):
    data, out, report = _tensors(tmp_path, loss), tmp_path / "m.safetensors", tmp_path / "r.json"
    res = invoke(
        "train", "--model", "mlp", "--dataset", f"tensors:{data}", "--epochs", 2,
        "--batch-size", 16, "--optimizer", "adam", "--lr", "1e-2", "-o", out,
        "--json", report, "-q", *(("--loss", "bce") if loss == "bce" else ()),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    assert ck.meta["loss"] == loss and ck.spec["kwargs"]["num_classes"] == 3
    metrics = json.loads(report.read_text())["results"][0]["metrics"]
    for split in ("train", "test"):
        value, acc = _mlp_numbers(out, split, loss)
        assert metrics[f"{split}_loss"] == pytest.approx(value, rel=1e-5)
        assert metrics[f"{split}_acc"] == (None if acc is None else pytest.approx(acc))
    assert (metrics["gap_acc"] is None) == (loss == "mse")  # mse has no accuracy
    assert "test_perplexity" not in metrics
    # the loss fell from its value at the recorded initial weights
    init = load(out, device="cpu")
    init.model.load_state_dict(ck.init_state_dict)
    with torch.no_grad():
        z = init.model(init.x)
    start = (
        F.mse_loss(z, init.y) if loss == "mse" else F.binary_cross_entropy_with_logits(z, init.y)
    )
    assert metrics["train_loss"] < 0.8 * float(start)
    # the analysis commands take the recorded loss with no --loss
    measured = tmp_path / "spectrum.json"
    res = invoke("spectrum", out, "--top-k", 1, "--json", measured, "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(measured.read_text())["config"]["loss"] == loss


def test_float_targets_that_do_not_fit_the_outputs_are_refused(tmp_path):
    x, y = torch.randn(20, 4), torch.randn(20)  # (N,) targets, but the zoo mlp returns (N, 1)
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    res = invoke(
        "train", "--model", "mlp", "--dataset", f"tensors:{tmp_path / 'd.safetensors'}",
        "-o", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert res.exit_code == 2 and "loss mse needs" in res.output
    assert "(2, 1)" in res.output and "Traceback" not in res.output
