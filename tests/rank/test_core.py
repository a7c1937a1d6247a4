"""rank_checkpoints: gaps and hyperparameters, the cache, resuming, error rows, signs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flatcli.errors import UsageError
from flatcli.rank import stats
from flatcli.rank.cache import ResultCache
from flatcli.rank.core import LoadOptions, RankConfig, plan_measures, rank_checkpoints
from tests.rank.helpers import Counter, install, weight_norm, write_sweep

OPTS = LoadOptions(dtype="float64", device="cpu")


@pytest.fixture()
def toy(monkeypatch):
    counter = Counter()
    install(monkeypatch, counter)
    return counter


def _strip_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _as_json(result):
    from flatcli.io.report import _jsonable

    return json.dumps(_jsonable([result.rows, result.statistics, result.sweep]), sort_keys=True)


def test_rows_statistics_and_signs(tmp_path, toy):
    paths = write_sweep(tmp_path)
    res = rank_checkpoints(paths, RankConfig(metrics=("toy_norm", "toy_flat")), OPTS)
    assert len(toy.calls) == 4  # one call per checkpoint for both metrics of the measure
    norms = [weight_norm(p) for p in paths]
    gaps = [r["gap"] for r in res.rows]
    assert gaps == pytest.approx([0.05, 0.15, 0.25, 0.35])
    assert [r["metrics"]["toy_norm"] for r in res.rows] == pytest.approx(norms, rel=1e-12)
    expected = stats.kendall_tau(norms, gaps)[0]
    st = res.statistics
    assert st["toy_norm"]["kendall_tau"] == pytest.approx(expected)
    # toy_flat = -toy_norm is "flatter": flipped back by its sign, the same τ
    assert st["toy_flat"]["sign"] == -1 and st["toy_norm"]["sign"] == 1
    assert st["toy_flat"]["kendall_tau"] == pytest.approx(expected)
    assert st["toy_norm"]["n"] == 4 and st["toy_norm"]["excluded"] == 0
    assert res.sweep["axes"] == ["lr", "hidden"]
    h = res.rows[0]["hyperparameters"]
    assert h["hidden"] == (3,) and h["lr"] == 0.1 and h["batch_size"] == 16 and h["seed"] == 0
    assert "device" not in h and "log_every" not in h
    assert res.rows[0]["details"]["generalization"]["source"] == "record"
    assert set(st["toy_norm"]) >= {
        "kendall_tau",
        "kendall_tau_ci",
        "spearman",
        "psi",
        "psi_axes",
        "n",
        "excluded",
    }


def test_a_measure_that_ranks_backwards_shows_a_negative_tau(tmp_path, toy):
    paths = write_sweep(tmp_path)
    res = rank_checkpoints(paths, RankConfig(metrics=("toy_norm",)), OPTS)
    norms = [weight_norm(p) for p in paths]
    # rewrite the records so that the gap falls as the norm rises
    order = sorted(range(4), key=lambda i: norms[i])
    gaps = {paths[i].name: 0.4 - 0.1 * rank for rank, i in enumerate(order)}
    table = tmp_path / "runs.csv"
    table.write_text(
        "checkpoint,gap,width\n"
        + "".join(f"{n},{g},{i % 2}\n" for i, (n, g) in enumerate(gaps.items()))
    )
    res = rank_checkpoints(paths, RankConfig(metrics=("toy_norm",), table=table), OPTS)
    assert res.statistics["toy_norm"]["kendall_tau"] == -1.0
    assert res.rows[0]["details"]["generalization"]["source"] == "table"
    assert res.sweep["axes"] == ["width"]


def test_cache_hits_compute_nothing_and_changes_invalidate(tmp_path, toy):
    paths = write_sweep(tmp_path)
    cache_dir = tmp_path / "cache"
    cfg = RankConfig(metrics=("toy_norm",))
    first = rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(cache_dir))
    assert len(toy.calls) == 4
    again = rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(cache_dir))
    assert len(toy.calls) == 4 and again.cache_hits == 4
    assert _as_json(first) == _as_json(again)
    # a changed option of the measure: every checkpoint again
    scaled = RankConfig(metrics=("toy_norm",), options={"toy": {"scale": 2.0}})
    res = rank_checkpoints(paths, scaled, OPTS, cache=ResultCache(cache_dir))
    assert len(toy.calls) == 8
    assert res.rows[0]["metrics"]["toy_norm"] == pytest.approx(
        2 * first.rows[0]["metrics"]["toy_norm"]
    )
    # other examples (another --max-examples): a miss
    rank_checkpoints(
        paths, cfg, LoadOptions(dtype="float64", max_examples=10), cache=ResultCache(cache_dir)
    )
    assert len(toy.calls) == 12
    # a changed file: only that checkpoint
    from flatcli.io.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(paths[0])
    state = {k: v + 1 for k, v in ck.state_dict.items()}
    save_checkpoint(paths[0], state, ck.spec, ck.meta)
    rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(cache_dir))
    assert toy.calls[12:] == [paths[0].name]
    # no cache: everything is computed, nothing written
    n_files = len(list(cache_dir.rglob("*.json")))
    rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(None))
    assert len(toy.calls) == 17 and len(list(cache_dir.rglob("*.json"))) == n_files
    assert not list(cache_dir.rglob(".tmp-*"))


def test_an_interrupted_sweep_resumes_to_the_identical_report(tmp_path, toy):
    paths = write_sweep(tmp_path, repeats=2)  # 8 checkpoints
    cfg = RankConfig(metrics=("toy_norm",), bootstrap=200)
    reference = rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(tmp_path / "ref"))
    toy.calls.clear()
    toy.interrupt_after = 3  # Ctrl-C while measuring the fourth checkpoint
    cache = tmp_path / "cache"
    part = rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(cache))
    assert part.interrupted and len(part.rows) == 3 and len(toy.calls) == 3
    toy.interrupt_after = None
    resumed = rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(cache))
    assert toy.calls[3:] == [p.name for p in paths[3:]]  # only what was missing
    assert not resumed.interrupted
    assert _strip_seconds(resumed.rows) == _strip_seconds(reference.rows)
    assert json.dumps(resumed.statistics, default=str) == json.dumps(
        reference.statistics, default=str
    )
    # and an extended sweep computes only the new checkpoint
    extra = tmp_path / "extra.safetensors"
    shutil.copy(paths[0], extra)  # same file hash: a hit, although a new path
    rank_checkpoints([*paths, extra], cfg, OPTS, cache=ResultCache(cache))
    assert len(toy.calls) == 8
    final = rank_checkpoints(paths, cfg, OPTS, cache=ResultCache(cache))
    assert _as_json(final) == _as_json(resumed)


def test_one_bad_checkpoint_is_an_error_row_and_excluded(tmp_path, toy):
    paths = write_sweep(tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    toy.fail_on = {paths[1].name}
    res = rank_checkpoints([broken, *paths], RankConfig(metrics=("toy_norm",)), OPTS)
    errors = [r for r in res.rows if r["error"] is not None]
    assert [r["checkpoint"] for r in errors] == [str(broken), str(paths[1])]
    assert all(r["metrics"] == {} for r in errors)
    assert errors[1]["gap"] == pytest.approx(0.15)  # known before the measure failed
    st = res.statistics["toy_norm"]
    assert st["n"] == 3 and st["excluded"] == 2
    assert st["reasons"]["excluded"] == "2 failed to load or measure"
    assert res.sweep["failed"] == 2


def test_a_checkpoint_without_record_needs_evaluate_or_table(tmp_path, toy):
    from tests.rank.helpers import write_checkpoint, write_data

    ds = write_data(tmp_path)
    pt = write_checkpoint(
        tmp_path / "a", ds, hidden=3, lr=0.1, batch_size=8, seed=0, gap=0.1, record=False
    )
    opts = LoadOptions(dtype="float64", model=str(tmp_path / "m.yaml"), dataset=ds)
    (tmp_path / "m.yaml").write_text(
        "arch: mlp\nkwargs: {in_features: 6, num_classes: 3, hidden: [3]}\n"
    )
    res = rank_checkpoints([pt], RankConfig(metrics=("toy_norm",)), opts)
    assert "pass --evaluate" in res.rows[0]["error"]["message"]
    res = rank_checkpoints([pt], RankConfig(metrics=("toy_norm",), evaluate=True), opts)
    gen = res.rows[0]["details"]["generalization"]
    assert res.rows[0]["error"] is None and gen["source"] == "evaluate"
    # the numbers evaluate_generalization reports, recomputed here
    from flatcli.data import load_dataset
    from model_zoo import get_model

    model = get_model("mlp", in_features=6, num_classes=3, hidden=[3]).double()
    model.load_state_dict(torch.load(pt))
    data = load_dataset(ds)
    with torch.no_grad():
        acc = [
            (model(s.x).argmax(1) == s.y).double().mean().item() for s in (data.train, data.test)
        ]
    assert gen["train_acc"] == pytest.approx(acc[0]) and gen["test_acc"] == pytest.approx(acc[1])
    assert res.rows[0]["gap"] == pytest.approx(acc[0] - acc[1])
    assert gen["test_size"] == 30


def test_usage_errors_before_any_work(toy):
    with pytest.raises(UsageError, match="unknown metric 'nope'"):
        plan_measures(["nope"])
    with pytest.raises(UsageError, match="has no option 'bogus'"):
        plan_measures(["toy_norm"], {"toy": {"bogus": 1}})
    with pytest.raises(UsageError, match="scale must be > 0"):
        plan_measures(["toy_norm"], {"toy": {"scale": -1}})
    with pytest.raises(UsageError, match="computes none of --measures"):
        plan_measures(["toy_norm"], {"gamma": {"samples": 3}})
    with pytest.raises(UsageError, match="--gap must be"):
        RankConfig(metrics=("toy_norm",), gap="error")
    assert toy.calls == []


def test_registry_measures_are_tailored_to_the_keys_asked():
    plans, directions = plan_measures(["hessian_trace", "top_eigenvalue", "trace"])
    by_name = {p.measure.name: p for p in plans}
    assert by_name["hessian_trace"].options["measures"] == ("hessian_trace",)
    assert by_name["spectrum"].options["top_k"] == 1 and by_name["spectrum"].options["trace"]
    assert directions["top_eigenvalue"].value == "sharper"
    (only_trace,), _ = plan_measures(["trace"])
    assert only_trace.options["top_k"] == 0


def test_loss_gap_and_tau_b(tmp_path, toy):
    paths = write_sweep(tmp_path)
    res = rank_checkpoints(paths, RankConfig(metrics=("toy_norm",), gap="loss", tau="b"), OPTS)
    assert [r["gap"] for r in res.rows] == pytest.approx([0.1, 0.3, 0.5, 0.7])  # 2 x acc gap
    assert (
        res.sweep["test_size"] is None
        and "no Monte-Carlo noise filter" in res.sweep["noise_filter"]
    )
    st = res.statistics["toy_norm"]
    norms = [weight_norm(p) for p in paths]
    assert st["tau_variant"] == "b"
    assert st["kendall_tau"] == pytest.approx(
        stats.kendall_tau(norms, [0.1, 0.3, 0.5, 0.7], "b")[0]
    )
    assert st["robust_sign_error"] is not None  # every pair weighs 1 without the filter
