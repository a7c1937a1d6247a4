"""A tiny learnable problem for the PAC-Bayes tests: data, a trained MLP and its initialisation."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from flatcli.io.checkpoint import save_checkpoint
from model_zoo.registry import get_model

# the metric keys of a pacbayes report, fixed by the report contract
REPORT_KEYS = {
    "bound",
    "kl",
    "b_re",
    "snn_train_error",
    "snn_train_error_upper",
    "snn_test_error",
    "train_error",
    "test_error",
    "prior_variance",
    "j",
    "mc_samples",
    "delta",
    "delta_prime",
    "num_train",
    "prior_examples",
    "bound_examples",
    "posterior_mean_test_error",
}

SPEC = {"arch": "mlp", "kwargs": {"in_features": 6, "hidden": [8], "num_classes": 2}}


def make_data(n_train: int = 240, n_test: int = 120, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two Gaussian-ish classes in 6 dimensions: y = 1[x·v > 0], with a few flipped labels."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(6, generator=g)
    x = torch.randn(n_train + n_test, 6, generator=g)
    y = (x @ v > 0).long()
    flip = torch.rand(n_train + n_test, generator=g) < 0.05
    y = torch.where(flip, 1 - y, y)
    return {
        "x_train": x[:n_train],
        "y_train": y[:n_train],
        "x_test": x[n_train:],
        "y_test": y[n_train:],
    }


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_model("mlp", **SPEC["kwargs"])


def write_problem(folder: Path, *, steps: int = 300, seed: int = 0) -> dict[str, Path]:
    """Write ``data.safetensors`` (a ``tensors:`` dataset), ``trained.safetensors`` (with its
    recorded initialisation), ``noinit.safetensors`` and ``noinit.pt`` (without), ``init.pt``."""
    folder = Path(folder)
    data = make_data(seed=seed)
    save_file({k: v.contiguous() for k, v in data.items()}, str(folder / "data.safetensors"))
    net = build(seed)
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(data["x_train"]), data["y_train"]).backward()
        opt.step()
    dataset = f"tensors:{folder / 'data.safetensors'}"
    meta = {"dataset": dataset}
    paths = {
        "data": folder / "data.safetensors",
        "trained": folder / "trained.safetensors",
        "noinit": folder / "noinit.safetensors",
        "noinit_pt": folder / "noinit.pt",
        "init_pt": folder / "init.pt",
    }
    save_checkpoint(paths["trained"], net.state_dict(), SPEC, meta, init_state_dict=init)
    save_checkpoint(paths["noinit"], net.state_dict(), SPEC, meta)
    torch.save(net.state_dict(), paths["noinit_pt"])
    torch.save(init, paths["init_pt"])
    return paths


BN_SPEC = {"arch": "mlp", "kwargs": {**SPEC["kwargs"], "batchnorm": True}}


def write_batchnorm(folder: Path, *, steps: int = 20, seed: int = 0) -> Path:
    """``bn.safetensors``: an MLP with BatchNorm1d, trained in train mode (so its running
    statistics come from the training examples), with its initialisation recorded."""
    folder = Path(folder)
    data = make_data(seed=seed)
    if not (folder / "data.safetensors").exists():
        save_file({k: v.contiguous() for k, v in data.items()}, str(folder / "data.safetensors"))
    torch.manual_seed(seed)
    net = get_model("mlp", **BN_SPEC["kwargs"])
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(data["x_train"]), data["y_train"]).backward()
        opt.step()
    path = folder / "bn.safetensors"
    meta = {"dataset": f"tensors:{folder / 'data.safetensors'}"}
    save_checkpoint(path, net.state_dict(), BN_SPEC, meta, init_state_dict=init)
    return path


def write_trained_prior(folder: Path, source: Path, *, epochs: int = 3) -> Path:
    """``prior_trained.safetensors``: the weights of ``source`` nudged, with a flatcli training
    record (``train``, ``results``), as ``flatcli train`` writes one."""
    from flatcli.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source)
    state = {k: v + 0.01 for k, v in ckpt.state_dict.items()}
    meta = {**(ckpt.meta or {}), "train": {"epochs": epochs}, "results": {"epochs": epochs}}
    path = Path(folder) / "prior_trained.safetensors"
    save_checkpoint(path, state, SPEC, meta)
    return path
