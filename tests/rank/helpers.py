"""A tiny sweep of checkpoints with training records, and a cheap test measure that counts calls."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flatcli.io.checkpoint import save_checkpoint
from flatcli.measures.registry import Direction, Measure, Metric
from flatcli.rank import core


def write_data(folder: Path, n: int = 30, seed: int = 0) -> str:
    """``data.safetensors`` with 6 features, 3 classes, train and test splits; its dataset name."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "x_train": torch.randn(n, 6, generator=g, dtype=torch.float64),
        "y_train": torch.randint(0, 3, (n,), generator=g),
        "x_test": torch.randn(n, 6, generator=g, dtype=torch.float64),
        "y_test": torch.randint(0, 3, (n,), generator=g),
    }
    (folder / "data").mkdir(parents=True, exist_ok=True)  # not beside the checkpoints
    save_file(tensors, str(folder / "data" / "data.safetensors"))
    return f"tensors:{folder / 'data' / 'data.safetensors'}"


def write_checkpoint(
    path: Path,
    dataset: str,
    *,
    hidden: int,
    lr: float,
    batch_size: int,
    seed: int,
    gap: float,
    record: bool = True,
) -> Path:
    """A ``flatcli train``-shaped checkpoint of an ``mlp`` (6 -> hidden -> 3) with a record."""
    from model_zoo import get_model

    torch.manual_seed(seed + 100 * hidden + int(1000 * lr) + batch_size)
    model = get_model("mlp", in_features=6, num_classes=3, hidden=[hidden])
    spec = {"arch": "mlp", "kwargs": {"in_features": 6, "num_classes": 3, "hidden": [hidden]}}
    meta = {
        "dataset": dataset,
        "train": {
            "optimizer": "sgd",
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "device": "cpu",
            "log_every": 1,
        },
        "results": {
            "train_acc": 1.0,
            "test_acc": 1.0 - gap,
            "train_loss": 0.01,
            "test_loss": 0.01 + 2 * gap,
        },
    }
    if not record:
        path = path.with_suffix(".pt")
        torch.save(model.state_dict(), path)
        return path
    return save_checkpoint(path, model.state_dict(), spec, meta)


def write_sweep(folder: Path, *, repeats: int = 1) -> list[Path]:
    """A 2 x 2 grid over (hidden, lr) at batch size 16, ``repeats`` seeds each; gaps differ."""
    dataset = write_data(folder)
    paths = []
    for i, (h, lr, s) in enumerate(itertools.product((3, 5), (0.1, 0.2), range(repeats))):
        gap = 0.05 + 0.1 * i
        name = f"h{h}-lr{lr}-s{s}.safetensors"
        paths.append(
            write_checkpoint(
                folder / name, dataset, hidden=h, lr=lr, batch_size=16, seed=s, gap=gap
            )
        )
    return paths


@dataclass(frozen=True)
class ToyConfig:
    """Config of the test measure: a scale, and the seed and batch size every measure has."""

    scale: float = 1.0
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            from flatcli.errors import UsageError

            raise UsageError(f"scale must be > 0. Got {self.scale!r}.")


@dataclass(frozen=True)
class ToyResult:
    value: float

    def metrics(self) -> dict[str, Any]:
        return {"toy_norm": self.value, "toy_flat": -self.value}

    def details(self) -> dict[str, Any]:
        return {"note": "squared weight norm"}


class Counter:
    """The test measure (scale × squared weight norm): counts its calls, can fail on demand."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_on: set[str] = set()
        self.interrupt_after: int | None = None

    def compute(self, run: Any, config: ToyConfig, progress: Any) -> ToyResult:
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append(Path(run.path).name)
        if Path(run.path).name in self.fail_on:
            raise RuntimeError("toy measure failed on purpose")
        norm = sum(float((p.detach().double() ** 2).sum()) for p in run.model.parameters())
        return ToyResult(config.scale * norm)

    def measure(self) -> Measure:
        return Measure(
            name="toy",
            command="toy",
            config_type=ToyConfig,
            compute=self.compute,
            metrics=(
                Metric("toy_norm", Direction.SHARPER, "-", "scale × squared weight norm"),
                Metric("toy_flat", Direction.FLATTER, "-", "minus toy_norm"),
            ),
            cost="one pass over the weights",
        )


def install(monkeypatch, counter: Counter, losses: tuple[str, ...] | None = None) -> None:
    """Make the rank code find the toy measure's metrics (the global registry is untouched);
    ``losses``: the losses it declares instead of its own."""
    measure = counter.measure()
    if losses is not None:
        measure = dataclasses.replace(measure, losses=losses)
    real = core.find_metric

    def find(key: str):
        for m in measure.metrics:
            if m.key == key:
                return measure, m
        return real(key)

    monkeypatch.setattr(core, "find_metric", find)


def weight_norm(path: Path) -> float:
    """The toy measure's value for a checkpoint, computed directly from the file."""
    from flatcli.io.checkpoint import load_checkpoint

    state = load_checkpoint(path).state_dict
    return sum(float((t.double() ** 2).sum()) for k, t in state.items() if "init" not in k)
