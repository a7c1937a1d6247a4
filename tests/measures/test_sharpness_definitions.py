"""The sharpness definitions: one module each, registered with their metrics; a new one: a file."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap

import pytest

from flatcli.errors import UsageError
from flatcli.measures import registry
from flatcli.measures.sharpness import (
    SharpnessConfig,
    SharpnessMeasure,
    compute_sharpness,
    definitions,
    sharpness_metric_keys,
    table_columns,
)
from flatcli.measures.sharpness import _definition as defs
from flatcli.options import flags_of
from tests.cases import make_case

PACKAGE = "flatcli.measures.sharpness"


def _all_measures() -> tuple[str, ...]:
    return importlib.import_module(PACKAGE).ALL_MEASURES


def test_the_definitions_in_order() -> None:
    names = [d.name for d in definitions()]
    assert names == [
        "normalized_sharpness",
        "matrix_normalized_sharpness",
        "hessian_trace",
        "eps_sharpness",
        "adaptive_sharpness",
    ]
    assert _all_measures() == tuple(names)
    assert [m.value for m in SharpnessMeasure] == names
    assert SharpnessMeasure.NORMALIZED == "normalized_sharpness"
    assert SharpnessConfig().measures == tuple(names)


@pytest.mark.parametrize("definition", definitions(), ids=lambda d: d.name)
def test_each_definition_is_registered_with_its_metrics(definition) -> None:
    measure = registry.get_measure(definition.name)
    assert measure.command == "sharpness"
    assert measure.config_type is SharpnessConfig
    assert measure.metrics == definition.metrics
    assert measure.cost == definition.cost
    assert measure.metrics[0].direction == registry.Direction.SHARPER
    cited = re.split("[,;]", definition.source)[0]  # e.g. "Tsuzuku et al. 2020"
    assert cited in sys.modules[definition.compute.__module__].__doc__
    config = SharpnessConfig(measures=(definition.name,))
    assert registry.reported_keys(measure, config) == sharpness_metric_keys(config)


@pytest.mark.parametrize(
    ("diag_method", "stderrs"),
    [
        ("ggn", ["hessian_trace_stderr"]),
        (
            "hutchinson",
            [
                "normalized_sharpness_stderr",
                "matrix_normalized_sharpness_stderr",
                "hessian_trace_stderr",
            ],
        ),
        ("exact", []),
    ],
)
def test_table_columns_and_keys(diag_method, stderrs) -> None:
    config = SharpnessConfig(diag_method=diag_method)
    headers = {
        "normalized_sharpness": "normalized",
        "matrix_normalized_sharpness": "matrix-norm.",
        "hessian_trace": "tr(H)",
        "eps_sharpness": "ε-sharpness %",
        "adaptive_sharpness": "adaptive",
    }
    expected = []
    for name, header in headers.items():
        expected.append((name, header))
        if f"{name}_stderr" in stderrs:
            expected.append((f"{name}_stderr", "± stderr"))
        if name == "normalized_sharpness":
            expected.append(("normalized_sharpness_gap", "gap"))
    assert table_columns(config) == expected
    assert sharpness_metric_keys(config) == [key for key, _ in expected]
    reordered = SharpnessConfig(
        diag_method=diag_method, measures=("hessian_trace", "eps_sharpness")
    )
    assert [k for k, _ in table_columns(reordered)][0] == "hessian_trace"


def test_config_flags() -> None:
    flags = {f.name: flag for f, flag in flags_of(SharpnessConfig)}
    assert flags["measures"].flag == "--measure" and flags["measures"].repeatable
    assert flags["measures"].choices is None  # checked against the definitions on construction
    with pytest.raises(UsageError, match="Unknown measure 'sharpest'; choose one of"):
        SharpnessConfig(measures=("sharpest",))
    assert flags["adaptive_rho"].flag == "--rho" and flags["adaptive_p"].flag == "--p"
    assert {k: flags[k].min for k in ("probes", "probe_groups", "trace_probes")} == {
        "probes": 2,
        "probe_groups": 1,
        "trace_probes": 2,
    }
    assert {"seed", "batch_size", "solver_max_iter"}.isdisjoint(flags)
    assert SharpnessConfig().to_dict()["measures"] == list(_all_measures())


def test_a_definition_is_defined_once() -> None:
    with pytest.raises(ValueError, match="twice"):
        defs.define(definitions()[0])


DUMMY = '''
"""Squared Frobenius norm of the weight matrices (a test's definition)."""

from flatcli.measures.sharpness._definition import Definition, Outcome, define

NAME = "weight_norm_test"


def compute(shared):
    params = dict(shared.model.named_parameters())
    terms = {k: float(params[k].detach().pow(2).sum()) for k in shared.names}
    return Outcome(value=sum(terms.values()), settings={"p": 2}, stderr=0.0, per_layer=terms)


define(
    Definition(
        name=NAME,
        order=35,
        header="‖W‖²",
        label="weight norm",
        source="a test",
        description="Σ ‖W‖_F²",
        cost="none",
        compute=compute,
        stderr=lambda config: config.diag_method == "hutchinson",
        weight_matrices=True,
    )
)
'''


def test_a_new_definition_is_one_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "weight_norm_test.py").write_text(textwrap.dedent(DUMMY))
    package = importlib.import_module(PACKAGE)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(defs, "_DEFINITIONS", dict(defs._DEFINITIONS))
    monkeypatch.setattr(registry, "_MEASURES", dict(registry._MEASURES))
    try:
        defs.discover()
        name = "weight_norm_test"
        assert _all_measures()[3] == name  # order 35: after hessian_trace
        assert registry.get_measure(name).keys == (name, f"{name}_stderr")
        config = SharpnessConfig(diag_method="hutchinson", trace_probes=4)
        assert (name, "‖W‖²") in table_columns(config)
        keys = sharpness_metric_keys(config)
        assert keys[keys.index(name) + 1] == f"{name}_stderr"
        model, x, y = make_case("mlp_tanh")
        res = compute_sharpness(model, x, y, SharpnessConfig(measures=(name, "hessian_trace")))
        assert list(res.metrics()) == [
            name,
            f"{name}_stderr",
            "hessian_trace",
            "hessian_trace_stderr",
        ]
        assert res.metrics()[name] == pytest.approx(sum(res.details()["per_layer"][name].values()))
    finally:
        sys.modules.pop(f"{PACKAGE}.weight_norm_test", None)
    monkeypatch.undo()
    assert "weight_norm_test" not in _all_measures()
    with pytest.raises(UsageError, match="Unknown measure"):
        SharpnessConfig(measures=("weight_norm_test",))
