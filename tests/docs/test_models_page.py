"""The model files docs/models.md shows (``# vit.py``, ``# lm.py``, ``# nets.py``) build and run
as the page says, and the support matrix names the K-FAC reasons the code gives."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _file(name: str) -> dict:
    """The namespace of the page's Python block that starts with ``# name``."""
    blocks = re.findall(r"```python\n# " + re.escape(name) + r"\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) == 1, name
    namespace: dict = {"__name__": name.removesuffix(".py")}
    exec(compile(blocks[0], name, "exec"), namespace)  # noqa: S102 - the page's own code
    return namespace


def test_the_vision_transformer_has_the_parameters_the_page_says():
    model = _file("vit.py")["make"]()
    assert sum(p.numel() for p in model.parameters()) == 3482
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_the_sequence_model_returns_token_logits():
    model = _file("lm.py")["make"]()
    assert model(torch.randint(0, 32, (2, 32))).shape == (2, 32, 32)


def test_the_regression_net_returns_two_outputs():
    assert _file("nets.py")["make"]()(torch.randn(4, 3)).shape == (4, 2)


def test_the_kfac_reasons_on_the_page_are_the_codes():
    from torch import nn

    from flatcli.curvature.kfac import _tied_layers

    text = " ".join(PAGE.read_text().split())  # the page wraps its lines
    emb, head = nn.Embedding(4, 4), nn.Linear(4, 4, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    reason = _tied_layers(model, ["head"])["head"]
    assert f'"{reason}"' in text
    assert "(nn.MultiheadAttention reads out_proj.weight in its own forward)" in text
