"""Dataset names holding a path: recorded relative to a checkpoint, found again from anywhere."""

from __future__ import annotations

import doctest
import os
import shutil
from pathlib import Path

import pytest

import flatcli.data.paths
from flatcli.data.paths import dataset_path, fingerprint, record_dataset, resolve_dataset


def test_doctests():
    assert doctest.testmod(flatcli.data.paths).failed == 0


def test_record_is_relative_to_the_checkpoint_folder(tmp_path, monkeypatch):
    (tmp_path / "data.pt").write_bytes(b"abc")
    monkeypatch.chdir(tmp_path)
    name, source = record_dataset("tensors:data.pt", tmp_path / "runs")
    assert name == "tensors:../data.pt"
    assert source == {
        "kind": "tensors",
        "relative": "../data.pt",
        "absolute": str(tmp_path / "data.pt"),
        "sha256": fingerprint(tmp_path / "data.pt"),
    }
    assert record_dataset("mnist5k", tmp_path) == ("mnist5k", None)
    assert record_dataset("tensors:absent.pt", tmp_path) == ("tensors:absent.pt", None)


def test_resolve_prefers_the_checkpoint_folder_then_absolute_then_cwd(tmp_path, monkeypatch):
    a, b, c = (tmp_path / d for d in ("moved/runs", "original", "cwd"))
    for d in (a, b, c):
        d.mkdir(parents=True)
    (a.parent / "data.pt").write_bytes(b"one")
    (b / "data.pt").write_bytes(b"one")
    (c / "data.pt").write_bytes(b"one")
    monkeypatch.chdir(c)
    source = {"absolute": str(b / "data.pt"), "sha256": fingerprint(b / "data.pt")}
    assert resolve_dataset("tensors:../data.pt", [a], source) == f"tensors:{a.parent / 'data.pt'}"
    (a.parent / "data.pt").unlink()
    assert resolve_dataset("tensors:../data.pt", [a], source) == f"tensors:{b / 'data.pt'}"
    os.remove(b / "data.pt")
    shutil.copy(c / "data.pt", c.parent / "data.pt")  # "../data.pt" from the cwd
    assert resolve_dataset("tensors:../data.pt", [a], source) == f"tensors:{c.parent / 'data.pt'}"


def test_a_matching_fingerprint_wins_and_a_changed_file_warns(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "d.pt").write_bytes(b"edited since")
    (there / "d.pt").write_bytes(b"as trained")
    source = {"absolute": str(there / "d.pt"), "sha256": fingerprint(there / "d.pt")}
    assert resolve_dataset("tensors:d.pt", [here], source) == f"tensors:{there / 'd.pt'}"
    os.remove(there / "d.pt")
    with pytest.warns(UserWarning, match="differs from the data"):
        assert resolve_dataset("tensors:d.pt", [here], source) == f"tensors:{here / 'd.pt'}"


def test_nothing_found_names_the_recorded_place(tmp_path):
    source = {"absolute": "/nowhere/d.pt", "sha256": "0" * 64}
    assert resolve_dataset("tensors:d.pt", [tmp_path], source) == "tensors:/nowhere/d.pt"
    assert resolve_dataset("tensors:d.pt", [tmp_path]) == f"tensors:{tmp_path / 'd.pt'}"
    assert resolve_dataset("mnist5k", [tmp_path], source) == "mnist5k"


def test_imagefolder_fingerprint_follows_the_listing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"12")
    first = fingerprint(tmp_path)
    (tmp_path / "a" / "y.png").write_bytes(b"3")
    assert fingerprint(tmp_path) != first
    assert dataset_path("imagefolder:imgs") == ("imagefolder", Path("imgs"))
    assert dataset_path("tensors:") is None and dataset_path(None) is None
