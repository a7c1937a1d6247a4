"""Batched augmentation: exact mirrors, shifted crops with zero padding, seeded."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from flatcli.errors import UsageError
from flatcli.train import augment_batch, black_fill, random_crop, random_flip
from flatcli.train.augment import check_augmentable


def _batch(b=64, c=3, h=5, w=7, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip_mirrors_exactly_the_flipped_subset():
    x = _batch()
    out, mask = random_flip(x, _gen())
    assert out.shape == x.shape
    assert torch.equal(out[mask], x[mask].flip(-1))
    assert torch.equal(out[~mask], x[~mask])
    assert 0 < int(mask.sum()) < len(x)  # about half of 64
    out2, mask2 = random_flip(x, _gen())
    assert torch.equal(out, out2) and torch.equal(mask, mask2)
    _, mask3 = random_flip(x, _gen(1))
    assert not torch.equal(mask, mask3)


def test_flip_probability():
    x = torch.zeros(20000, 1, 1, 2)
    _, mask = random_flip(x, _gen())
    assert abs(float(mask.float().mean()) - 0.5) < 0.02


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_is_the_shifted_content_with_zero_padding(padding):
    x = _batch()
    out, offsets = random_crop(x, padding, _gen())
    assert out.shape == x.shape
    assert (
        offsets.shape == (64, 2) and int(offsets.min()) >= 0 and int(offsets.max()) <= 2 * padding
    )
    padded = F.pad(x, (padding,) * 4)
    _, _, h, w = x.shape
    for b in range(len(x)):  # reference, one example at a time
        dy, dx = offsets[b].tolist()
        assert torch.equal(out[b], padded[b, :, dy : dy + h, dx : dx + w])
    # every offset occurs
    assert len({tuple(o) for o in offsets.tolist()}) == (2 * padding + 1) ** 2 or padding == 4


def test_crop_shift_by_hand():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    g = _gen()
    while True:  # find a draw that shifts right by one and down by one: offsets (0, 0)
        out, offsets = random_crop(x, 1, g)
        if offsets.tolist() == [[0, 0]]:
            break
    expected = torch.tensor([[0.0, 0, 0], [0, 1, 2], [0, 4, 5]]).view(1, 1, 3, 3)
    assert torch.equal(out, expected)


def test_crop_per_channel_fill_and_black_fill():
    x = torch.zeros(8, 2, 3, 3)
    out, offsets = random_crop(x, 2, _gen(), fill=[5.0, -1.0])
    for b in range(8):
        dy, dx = offsets[b].tolist()
        border = torch.ones(7, 7, dtype=torch.bool)
        border[2:5, 2:5] = False
        crop_border = border[dy : dy + 3, dx : dx + 3]
        assert torch.all(out[b, 0][crop_border] == 5.0) and torch.all(
            out[b, 1][crop_border] == -1.0
        )
        assert torch.all(out[b, :, ~crop_border] == 0.0)
    assert black_fill(None) == 0.0
    assert black_fill({"mean": [0.5, 0.25], "std": [0.5, 0.25]}) == [-1.0, -1.0]


def test_crop_with_zero_padding_is_the_identity():
    x = _batch()
    out, _ = random_crop(x, 0, _gen())
    assert torch.equal(out, x)


@pytest.mark.parametrize("scheme", ["none", "flip", "crop1-flip", "crop4-flip"])
def test_schemes_keep_shapes_and_are_seeded(scheme):
    x = _batch()
    a = augment_batch(x, scheme, _gen(7))
    b = augment_batch(x, scheme, _gen(7))
    assert a.shape == x.shape and torch.equal(a, b)
    if scheme == "none":
        assert a is x
    else:
        assert not torch.equal(a, x)
        assert not torch.equal(a, augment_batch(x, scheme, _gen(8)))


def test_crop_flip_output_is_a_possibly_mirrored_crop():
    x = _batch(b=32)
    out = augment_batch(x, "crop1-flip", _gen(3))
    padded = F.pad(x, (1,) * 4)
    _, _, h, w = x.shape
    for b in range(len(x)):
        crops = [padded[b, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)


def test_augment_needs_images():
    check_augmentable((1, 28, 28), "crop4-flip")
    check_augmentable((784,), "none")
    with pytest.raises(UsageError, match="needs image inputs of shape \\(C, H, W\\).*\\(784,\\)"):
        check_augmentable((784,), "flip")
