"""Analysis commands on Hugging Face ``save_pretrained`` directories, end to end."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("transformers")

from tests.cli.helpers import invoke  # noqa: E402
from tests.io.test_hf import write_bert, write_gpt2, write_tokens  # noqa: E402
from tests.io.test_report import validate_report  # noqa: E402


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_hf")
    write_gpt2(tmp / "gpt2")
    write_bert(tmp / "bert")
    write_tokens(tmp / "lm.safetensors", "lm")
    write_tokens(tmp / "cls.safetensors", "cls")
    return tmp


@pytest.mark.parametrize(
    ("name", "data", "loss"), [("gpt2", "lm", "token-ce"), ("bert", "cls", "ce")]
)
def test_spectrum_of_a_directory(tmp, name, data, loss):
    out = tmp / f"{name}.json"
    args = ["--dataset", f"tensors:{tmp / data}.safetensors", "--dtype", "float64"]
    res = invoke("spectrum", tmp / name, *args, "--top-k", "2", "--json", out, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    validate_report(report, "spectrum")
    assert report["config"]["loss"] == loss
    entry = report["results"][0]
    assert entry["checkpoint"] == str(tmp / name) and entry["error"] is None
    assert len(entry["details"]["eigenvalues"]) == 2
    assert entry["metrics"]["top_eigenvalue"] == entry["details"]["eigenvalues"][0]


def test_gamma_of_a_language_model(tmp):
    args = ["--dataset", f"tensors:{tmp / 'lm'}.safetensors", "--samples", "4", "--trials", "2"]
    res = invoke("gamma", tmp / "gpt2", *args, "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["config"]["loss"] == "token-ce"
    assert report["results"][0]["metrics"]["gamma_hat"] is not None


def test_config_without_weights_is_exit_2(tmp):
    folder = tmp / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((tmp / "gpt2" / "config.json").read_text())
    res = invoke("spectrum", folder, "--dataset", f"tensors:{tmp / 'lm'}.safetensors")
    assert res.exit_code == 2, res.output
    assert "no weights" in res.output and "model.safetensors" in res.output


def test_missing_transformers_is_exit_2_naming_the_extra(tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    res = invoke("spectrum", tmp / "gpt2", "--dataset", f"tensors:{tmp / 'lm'}.safetensors")
    assert res.exit_code == 2, res.output
    assert "pip install 'flatcli[hf]'" in res.output
