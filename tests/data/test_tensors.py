"""tensors:PATH -- examples used exactly as stored."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flatcli.data import load_dataset
from flatcli.errors import DataError, UsageError


def _save(path, tensors):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return f"tensors:{path}"


@pytest.fixture(params=[".safetensors", ".pt"])
def suffix(request):
    return request.param


def _data(n=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def test_train_and_test_exactly_as_stored(tmp_path, suffix):
    (x, y), (xt, yt) = _data(6, seed=0), _data(3, seed=1)
    y[0] = 3
    name = _save(tmp_path / f"d{suffix}", {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt})
    ds = load_dataset(name)
    assert ds.name == name
    assert torch.equal(ds.train.x, x) and torch.equal(ds.train.y, y)
    assert torch.equal(ds.test.x, xt) and torch.equal(ds.test.y, yt)
    assert ds.normalization is None
    assert ds.input_shape == (3, 2, 2)
    assert ds.num_classes == int(max(y.max(), yt.max())) + 1


def test_x_y_only_is_train(tmp_path, suffix):
    x, y = _data()
    ds = load_dataset(_save(tmp_path / f"d{suffix}", {"x": x, "y": y}))
    assert torch.equal(ds.train.x, x) and ds.test is None
    with pytest.raises(DataError, match="no test split"):
        ds.split("test")


def test_float64_preserved_and_labels_int64(tmp_path, suffix):
    x, _ = _data(dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2], dtype=torch.int32)
    ds = load_dataset(_save(tmp_path / f"d{suffix}", {"x": x, "y": y}))
    assert ds.train.x.dtype == torch.float64 and torch.equal(ds.train.x, x)
    assert ds.train.y.dtype == torch.int64 and ds.train.y.tolist() == y.tolist()


def test_integral_float_labels_and_uint8_inputs(tmp_path, suffix):
    x = torch.arange(12, dtype=torch.uint8).reshape(4, 3)
    y = torch.tensor([0.0, 1.0, 2.0, 1.0])
    ds = load_dataset(_save(tmp_path / f"d{suffix}", {"x": x, "y": y}))
    assert ds.train.x.dtype == torch.float32 and ds.train.x.tolist() == x.float().tolist()
    assert ds.train.y.tolist() == [0, 1, 2, 1]


def test_stored_num_classes(tmp_path, suffix):
    x, y = _data()
    stored = {"x": x, "y": y, "num_classes": torch.tensor(10)}
    ds = load_dataset(_save(tmp_path / f"d{suffix}", stored))
    assert ds.num_classes == 10
    too_few = {"x": x, "y": y, "num_classes": torch.tensor(2)}
    with pytest.raises(DataError, match="num_classes"):
        load_dataset(_save(tmp_path / f"e{suffix}", too_few))


@pytest.mark.parametrize(
    "content,match",
    [
        ({"x_train": torch.zeros(2, 1)}, "has 'x_train' but no 'y_train'"),
        ({"y": torch.zeros(2, dtype=torch.long)}, "has 'y' but no 'x'"),
        ({"inputs": torch.zeros(2, 1)}, "must hold x_train and y_train"),
        (
            {"x": torch.zeros(3, 1), "y": torch.zeros(2, dtype=torch.long)},
            "3 examples but 'y' holds 2",
        ),
        ({"x": torch.zeros(2, 1), "y": torch.tensor([0.5, float("nan")])}, "not finite"),
        ({"x": torch.zeros(2, 1), "y": torch.tensor([0, -1])}, "negative label"),
        ({"x": torch.zeros(2, 1), "y": torch.zeros(2, 3, 2)}, r"shape \(N,\) or \(N, D\)"),
        ({"x": torch.zeros(2, 1), "y": torch.zeros(2, 3, 2, dtype=torch.long)}, "token"),
        ({"x": torch.zeros(2), "y": torch.zeros(2, dtype=torch.long)}, r"shape \(N, ...\)"),
        (
            {
                "x_train": torch.zeros(2, 1),
                "y_train": torch.zeros(2, dtype=torch.long),
                "x_test": torch.zeros(2, 1),
            },
            "has 'x_test' but no 'y_test'",
        ),
        (
            {
                "x_train": torch.zeros(2, 1),
                "y_train": torch.zeros(2, dtype=torch.long),
                "x_test": torch.zeros(2, 2),
                "y_test": torch.zeros(2, dtype=torch.long),
            },
            "test inputs have shape",
        ),
    ],
)
def test_bad_contents(tmp_path, suffix, content, match):
    with pytest.raises(DataError, match=match):
        load_dataset(_save(tmp_path / f"d{suffix}", content))


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(f"tensors:{tmp_path / 'nothing.pt'}")
    (tmp_path / "d.npz").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset(f"tensors:{tmp_path / 'd.npz'}")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(DataError, match="not a dict"):
        load_dataset(f"tensors:{tmp_path / 'list.pt'}")


class _Custom:  # an arbitrary object: weights_only=True refuses to unpickle it
    pass


def test_weights_only_refusal(tmp_path):
    torch.save(
        {"x": torch.zeros(2, 1), "y": torch.zeros(2, dtype=torch.long), "o": _Custom()},
        tmp_path / "d.pt",
    )
    with pytest.raises(DataError, match="weights_only=True"):
        load_dataset(f"tensors:{tmp_path / 'd.pt'}")


def test_never_normalised(tmp_path):
    x, y = _data()
    name = _save(tmp_path / "d.pt", {"x": x, "y": y})
    assert load_dataset(name, normalization=None).normalization is None
    with pytest.raises(UsageError, match="never normalised"):
        load_dataset(name, normalization={"mean": [0.0], "std": [1.0]})


def test_float_and_token_targets(tmp_path, suffix):
    """Float targets stay float (regression, multi-label); (N, T) int targets keep token ids."""
    x = torch.randn(4, 3)
    y = torch.tensor([0.5, 1.0, -2.0, 3.25])
    ds = load_dataset(_save(tmp_path / f"r{suffix}", {"x": x, "y": y}))
    assert ds.train.y.dtype == torch.float32 and ds.train.y.tolist() == y.tolist()
    assert ds.num_classes == 1
    ds = load_dataset(_save(tmp_path / f"m{suffix}", {"x": x, "y": torch.rand(4, 5)}))
    assert tuple(ds.train.y.shape) == (4, 5) and ds.num_classes == 5
    tokens = torch.randint(0, 9, (4, 6))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    ds = load_dataset(_save(tmp_path / f"t{suffix}", {"x": tokens, "y": targets}))
    assert ds.train.x.dtype == torch.int64 and torch.equal(ds.train.x, tokens)
    assert torch.equal(ds.train.y, targets) and ds.num_classes == int(targets.max()) + 1
    assert ds.train.to("cpu", torch.float64).x.dtype == torch.int64
