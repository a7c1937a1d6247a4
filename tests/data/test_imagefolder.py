"""imagefolder:PATH with a few tiny PNGs written by PIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flatcli.data import load_dataset
from flatcli.errors import DataError


def _png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _rgb_tree(root, rng, classes=("cat", "dog"), per_class=2, size=(4, 5)):
    """root/<class>/<i>.png, RGB (H, W) = size; returns {class: [array (H, W, 3)]}."""
    out = {}
    for c in classes:
        out[c] = []
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            _png(root / c / f"{i}.png", arr, "RGB")
            out[c].append(arr)
    return out


def test_single_root_rgb(tmp_path):
    rng = np.random.default_rng(0)
    arrays = _rgb_tree(tmp_path / "imgs", rng)
    name = f"imagefolder:{tmp_path / 'imgs'}"
    ds = load_dataset(name, normalization=None)
    assert ds.name == name and ds.test is None and ds.num_classes == 2
    assert ds.input_shape == (3, 4, 5)
    assert ds.train.y.tolist() == [0, 0, 1, 1]  # sorted class folders: cat 0, dog 1
    expect = np.stack(arrays["cat"] + arrays["dog"]).transpose(0, 3, 1, 2) / 255.0
    torch.testing.assert_close(ds.train.x, torch.from_numpy(expect).float())


def test_default_normalisation_is_train_stats(tmp_path):
    rng = np.random.default_rng(1)
    _rgb_tree(tmp_path, rng)
    raw = load_dataset(f"imagefolder:{tmp_path}", normalization=None)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    mean = raw.train.x.double().mean(dim=(0, 2, 3))
    std = raw.train.x.double().std(dim=(0, 2, 3), correction=0)
    np.testing.assert_allclose(ds.normalization["mean"], mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ds.normalization["std"], std.numpy(), rtol=1e-12)
    per_channel = ds.train.x.double().mean(dim=(0, 2, 3))
    assert per_channel.abs().max() < 1e-5
    fixed = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    again = load_dataset(f"imagefolder:{tmp_path}", normalization=fixed)
    assert again.normalization == fixed
    torch.testing.assert_close(again.train.x, (raw.train.x - 0.5) / 0.5)


def test_train_test_layout_and_class_mapping(tmp_path):
    rng = np.random.default_rng(2)
    _rgb_tree(tmp_path / "train", rng, classes=("a", "b", "c"), per_class=1)
    _rgb_tree(tmp_path / "test", rng, classes=("c",), per_class=2)  # test lacks a and b
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.num_classes == 3 and len(ds.train) == 3 and len(ds.test) == 2
    assert ds.test.y.tolist() == [2, 2]  # mapped through the train folder's classes
    assert ds.split("test") is ds.test


def test_test_class_unknown_to_train(tmp_path):
    rng = np.random.default_rng(3)
    _rgb_tree(tmp_path / "train", rng, classes=("a",), per_class=1)
    _rgb_tree(tmp_path / "test", rng, classes=("z",), per_class=1)
    with pytest.raises(DataError, match=r"classes the train folder lacks: \['z'\]"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_grayscale_has_one_channel(tmp_path):
    for c, value in (("x", 10), ("y", 200)):
        _png(tmp_path / c / "0.png", np.full((3, 3), value, dtype=np.uint8), "L")
        _png(tmp_path / c / "1.png", np.full((3, 3), value + 20, dtype=np.uint8), "L")
    ds = load_dataset(f"imagefolder:{tmp_path}", normalization=None)
    assert ds.input_shape == (1, 3, 3)
    assert ds.train.x[:, 0, 0, 0].mul(255).round().tolist() == [10, 30, 200, 220]
    assert len(load_dataset(f"imagefolder:{tmp_path}").normalization["mean"]) == 1


def test_sizes_must_match(tmp_path):
    rng = np.random.default_rng(4)
    _rgb_tree(tmp_path, rng, classes=("a",), size=(4, 4))
    _rgb_tree(tmp_path, rng, classes=("b",), size=(4, 6))
    with pytest.raises(DataError, match="same size"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_not_a_folder_of_classes(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")


def test_constant_channel_needs_no_normalisation(tmp_path):
    _png(tmp_path / "a" / "0.png", np.zeros((2, 2), dtype=np.uint8), "L")
    with pytest.raises(DataError, match="constant"):
        load_dataset(f"imagefolder:{tmp_path}")
    assert load_dataset(f"imagefolder:{tmp_path}", normalization=None).train.x.sum() == 0
