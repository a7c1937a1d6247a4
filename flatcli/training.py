"""One training job, end to end: spec + dataset + config → a self-describing checkpoint.

:func:`train_checkpoint` is what ``flatcli train`` does: build the model from its spec, prepare
the training split, :func:`~flatcli.train.loop.fit`, and write one ``.safetensors`` that records
the spec, the dataset and its normalisation, the training configuration, the initial weights
and the final train/test loss and accuracy, so every analysis command can read it alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from flatcli._version import __version__
from flatcli.configs.train import TrainConfig, TrainJob
from flatcli.errors import UsageError
from flatcli.train.loop import EpochStats

__all__ = ["TrainJob", "Trained", "train_checkpoint"]


@dataclass
class Trained:
    """A finished job: the summary numbers, the record written, the network."""

    summary: dict[str, Any]
    meta: dict[str, Any]
    data_info: dict[str, Any]
    net: torch.nn.Module
    seconds: float
    dataset: str

    @property
    def num_params(self) -> int:
        """Trainable parameters of the network."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)


def train_checkpoint(
    job: TrainJob,
    config: TrainConfig,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
    write: bool = True,
) -> Trained:
    """Train ``job``'s model as ``config`` says and (when ``write``) save its checkpoint.

    Raises:
        UsageError: no dataset named anywhere, or a spec or dataset that cannot be used.
    """
    from flatcli.data import load_dataset
    from flatcli.io.checkpoint import save_checkpoint
    from flatcli.io.spec import build_model, fill_data_kwargs, parse_model_option
    from flatcli.train.augment import black_fill
    from flatcli.train.loop import fit
    from flatcli.train.prepare import prepare_train_split

    model, output = job.check()
    spec = parse_model_option(model)
    name = job.dataset or spec.dataset
    if name is None:
        raise UsageError("no dataset: pass --dataset (e.g. --dataset mnist5k)")
    data = load_dataset(name, data_dir=job.data_dir, download=job.download)
    spec = fill_data_kwargs(spec, data.num_classes, tuple(data.input_shape))
    torch.manual_seed(config.seed)
    net = build_model(spec)
    init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    train_split, info = prepare_train_split(data.train, data.num_classes, config, config.seed)
    start = time.perf_counter()
    result = fit(
        net,
        train_split,
        data.test,
        data.num_classes,
        config,
        on_epoch=on_epoch,
        pad_fill=black_fill(data.normalization),
    )
    seconds = time.perf_counter() - start
    summary = {
        "train_loss": result.train_loss,
        "train_acc": result.train_acc,
        "test_loss": result.test_loss,
        "test_acc": result.test_acc,
        "gap_acc": None if result.test_acc is None else result.train_acc - result.test_acc,
        "gap_loss": None if result.test_loss is None else result.test_loss - result.train_loss,
        "epochs": result.epochs,
        "seconds": round(seconds, 3),
    }
    spec_record = spec.to_dict()
    spec_record.setdefault("dataset", name)
    meta = {
        "flatcli_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "dataset": name,
        "normalization": data.normalization,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "train": config.to_dict(),
        "seed": config.seed,
        "data_info": info,
        "results": summary,
        "history": [_epoch_dict(s) for s in result.history],
    }
    if write:
        save_checkpoint(output, net.state_dict(), spec_record, meta, init_state_dict=init_state)
    return Trained(summary, meta, info, net, seconds, name)


def _epoch_dict(stats: Any) -> dict:
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    return {k: getattr(stats, k) for k in vars(stats)}
