"""A data-free bound refuses what the data touched: BatchNorm running statistics, a trained prior,
a prior with the certified weights; a vacuous bound says what would make it non-vacuous."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from flatcli.errors import UsageError
from flatcli.io.load import load
from flatcli.measures.pacbayes import PacBayesConfig, pacbayes_on_run, vacuity_note
from flatcli.pacbayes.bound import Certificate
from flatcli.pacbayes.prior import batchnorm_layers, check_data_free, resolve_prior
from tests.pacbayes.problem import write_batchnorm, write_problem, write_trained_prior

FAST = {"prior": "data-free", "epochs": 1, "opt_batch_size": 120, "mc_samples": 8}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_free")
    paths = write_problem(folder, steps=100)
    paths["bn"] = write_batchnorm(folder)
    paths["prior_trained"] = write_trained_prior(folder, paths["noinit"])
    return paths


def test_batchnorm_layers_are_those_with_running_statistics():
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2))
    assert batchnorm_layers(cnn) == ["1", "3"]
    assert batchnorm_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False))) == [
        "1"
    ]
    assert batchnorm_layers(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False))) == []
    assert batchnorm_layers(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == []


def test_batchnorm_checkpoint_is_refused_before_any_work(paths):
    with pytest.raises(UsageError) as info:
        check_data_free(paths["bn"])
    message = str(info.value)
    assert "BatchNorm" in message and "bn.safetensors" in message and "\n" not in message
    assert "--prior data-dependent" in message and "recomputes them on the prior's" in message
    assert "outside the bound" in message and "does not have yet" not in message
    assert "(bn1)" in message  # the MLP's BatchNorm1d


def test_batchnorm_is_found_in_the_built_model_not_only_the_keys(paths):
    from flatcli.io.checkpoint import load_checkpoint
    from flatcli.pacbayes.prior import _built_batchnorm

    ckpt = load_checkpoint(paths["bn"])
    ckpt.state_dict = {}  # nothing to read from the keys: the spec's model, built on meta
    assert _built_batchnorm(paths["bn"], ckpt, None) == ["bn1"]
    assert _built_batchnorm(paths["trained"], load_checkpoint(paths["trained"]), None) == []


def test_batchnorm_is_refused_by_the_library_too(paths):
    run = load(paths["bn"], device="cpu")
    called = []
    with pytest.raises(UsageError, match="BatchNorm"):
        pacbayes_on_run(run, PacBayesConfig(**FAST), lambda *a: called.append(a))
    assert called == []  # refused before the optimisation reported any progress


def test_a_trained_prior_is_refused_unless_vouched_for(paths):
    with pytest.raises(UsageError) as info:
        check_data_free(paths["trained"], paths["prior_trained"])
    message = str(info.value)
    assert "record says it was trained (3 epochs" in message
    assert "--prior-is-data-free" in message and "invalid if the prior saw" in message
    run = load(paths["trained"], device="cpu")
    with pytest.raises(UsageError, match="--prior-is-data-free"):
        resolve_prior(run.model, run.checkpoint, paths["prior_trained"])
    # vouched for: accepted
    check_data_free(paths["trained"], paths["prior_trained"], data_free=True)
    prior, source = resolve_prior(run.model, run.checkpoint, paths["prior_trained"], data_free=True)
    assert (
        source.startswith("--prior-init")
        and set(prior) == dict(run.model.named_parameters()).keys()
    )


def test_a_prior_with_the_certified_weights_is_refused(paths):
    # noinit.pt holds trained.safetensors' weights in another file
    with pytest.raises(UsageError, match="weights equal those of trained.safetensors"):
        check_data_free(paths["trained"], paths["noinit_pt"])
    run = load(paths["trained"], device="cpu")
    with pytest.raises(UsageError, match="--prior-is-data-free"):
        resolve_prior(run.model, run.checkpoint, paths["noinit_pt"])
    resolve_prior(run.model, run.checkpoint, paths["noinit_pt"], data_free=True)
    # the initialisation itself stays accepted
    assert check_data_free(paths["trained"], paths["init_pt"]).startswith("--prior-init")
    assert check_data_free(paths["trained"]).startswith("recorded in")


def _certificate(bound: float, **changes) -> Certificate:
    fields = dict(
        bound=bound, kl=5000.0, b_re=20.0, j=300, prior_variance=1e-3, snn_train_error=0.3,
        snn_train_error_upper=0.35, mc_samples=100, num_train=240, delta=0.025,
        delta_prime=0.01, confidence=0.965, tolerance=1e-10,
    )  # fmt: skip
    fields.update(changes)
    return Certificate(**{f.name: fields[f.name] for f in dataclasses.fields(Certificate)})


def test_vacuity_note_says_what_would_make_it_non_vacuous():
    note = vacuity_note(_certificate(1.0 - 1e-9), 0.9)
    assert note is not None and "is vacuous" in note
    assert "data-dependent prior" in note and "Dziugaite et al. 2021" in note
    assert "Pérez-Ortiz et al. 2021" in note and "more training examples m" in note
    assert "--prior data-dependent" in note and "KL 5000 against m = 240" in note
    assert "not yet in flatcli" not in note
    # no better than guessing among 10 classes (the README checkpoint's 0.951)
    note = vacuity_note(_certificate(0.951), 0.9)
    assert note is not None and "no better than guessing" in note and "10 classes" in note
    # among 2 classes, 0.6 says nothing either; 0.3 does
    assert "2 classes" in vacuity_note(_certificate(0.6), 0.5)
    assert vacuity_note(_certificate(0.3), 0.5) is None
    assert vacuity_note(_certificate(0.85), 0.9) is None


def test_a_vacuous_run_carries_the_note_and_one_warning(paths):
    run = load(paths["trained"], device="cpu")
    config = PacBayesConfig(**{**FAST, "c": 1e-6})  # a tiny prior variance: a huge KL
    with pytest.warns(UserWarning, match="non-vacuous") as record:
        result = pacbayes_on_run(run, config, lambda *a: None)
    assert sum("non-vacuous" in str(w.message) for w in record) == 1
    assert result.details()["chance_error"] == pytest.approx(0.5)
    assert result.metrics()["bound"] >= 0.5
    assert any("data-dependent prior" in n for n in result.details()["notes"])
    assert torch.isfinite(torch.tensor(result.metrics()["kl"]))
