"""One training job, end to end: spec + dataset + config → a self-describing checkpoint.

:func:`train_checkpoint` is what ``flatcli train`` does: build the model from its spec, prepare
the training split, :func:`~flatcli.train.loop.fit`, and write one ``.safetensors`` that records
the spec, the dataset and its normalisation, the loss (``loss``: what the measures take by
default), the training configuration, the initial weights and the final train/test loss and
accuracy, so every analysis command can read it alone. A text dataset also records its
``seq_len`` and ``text`` (the tokenizer, the text's sha256, token and window counts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
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
    spec_file: Path | None = None
    """``<stem>.yaml`` beside the checkpoint, for a model from a factory (later commands build
    the model from it without --model)."""
    spec_written: bool = False
    """Whether this job wrote ``spec_file`` (False: an existing one builds the same model)."""

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
    from flatcli.train.objective import check_train_options, resolve_train_loss
    from flatcli.train.prepare import prepare_train_split

    model, output = job.check()
    spec = parse_model_option(model)
    name = job.dataset or spec.dataset
    if name is None:
        raise UsageError("no dataset: pass --dataset (e.g. --dataset mnist5k)")
    data = load_dataset(
        name, data_dir=job.data_dir, download=job.download, **_text_options(name, job, output)
    )
    loss = resolve_train_loss(config.loss, data.train.y)
    config.loss = loss  # the record holds the loss trained with, not None
    check_train_options(config, loss, data.train.y)
    spec = fill_data_kwargs(spec, data.num_classes, tuple(data.input_shape))
    spec_file = _spec_beside(spec, output, name, data.input_shape)  # before any training
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
        "gap_acc": result.gap_acc,
        "gap_loss": result.gap_loss,
        "epochs": result.epochs,
        "seconds": round(seconds, 3),
    }
    if loss == "token-ce":  # the usual figure of a language model, beside its token accuracy
        summary["train_perplexity"] = _perplexity(result.train_loss)
        summary["test_perplexity"] = _perplexity(result.test_loss)
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
        "loss": loss,
        "train": config.to_dict(),
        "seed": config.seed,
        "data_info": info,
        "results": summary,
        "history": [_epoch_dict(s) for s in result.history],
    }
    if data.text is not None:
        meta["seq_len"] = data.text["seq_len"]
        meta["text"] = data.text
    if write:
        save_checkpoint(output, net.state_dict(), spec_record, meta, init_state_dict=init_state)
        if spec_file is not None:
            from flatcli.io.atomic import write_text_atomic

            if spec_file[1] is not None:
                write_text_atomic(spec_file[0], spec_file[1])
    done = Trained(summary, meta, info, net, seconds, name)
    if spec_file is not None:
        done.spec_file, done.spec_written = spec_file[0], spec_file[1] is not None
    return done


def _text_options(name: str, job: TrainJob, output: Path) -> dict[str, Any]:
    """``seq_len`` and ``tokenizer`` of a text dataset ({} for another dataset, which refuses
    ``--seq-len``): the tokenizer is the checkpoint's, the ``tokenizer.json`` in the folder of
    ``-o``, when there is one (later commands find it there), else bytes."""
    from flatcli.data.text import DEFAULT_SEQ_LEN, find_tokenizer, is_text_dataset

    if not is_text_dataset(name):
        return {} if job.seq_len is None else {"seq_len": job.seq_len}
    seq_len = DEFAULT_SEQ_LEN if job.seq_len is None else job.seq_len
    return {"seq_len": seq_len, "tokenizer": find_tokenizer(output)}


def _perplexity(loss: float | None) -> float | None:
    """``exp(loss)`` of a mean token cross-entropy; None without one or past float range."""
    import math

    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return math.exp(loss)


def _spec_beside(spec: Any, output: Path, dataset: str, shape: Any) -> tuple[Path, Any] | None:
    """``(<stem>.yaml beside output, its text, or None to keep it)`` for a model from a file or
    module factory, whose spec a checkpoint alone cannot build safely; None for a zoo or
    torchvision model.

    Its ``factory`` names a file relative to the YAML's folder. An existing ``<stem>.yaml`` that
    builds the same model (same factory and kwargs) is kept as it is.

    Raises:
        UsageError: an existing ``<stem>.yaml`` describes another model (exit 2, before
            training).
    """
    import os

    import yaml

    from flatcli.data.paths import record_dataset
    from flatcli.io.writable import check_writable

    if spec.factory is None:
        return None
    target, _, fn = spec.factory.rpartition(":")
    folder = output.parent.resolve()
    if target.endswith(".py"):
        file = (
            Path(target) if Path(target).is_absolute() else (spec.base_dir or Path.cwd()) / target
        )
        target = Path(os.path.relpath(file.resolve(), folder)).as_posix()
    mine = {
        "factory": f"{target}:{fn}",
        "kwargs": dict(spec.kwargs),
        "input_shape": list(spec.input_shape or shape),
        "dataset": record_dataset(dataset, output.parent)[0],
    }
    path = output.with_suffix(".yaml")
    if path.exists():
        try:
            theirs = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            theirs = None
        if not (isinstance(theirs, dict) and _same_model(theirs, mine, folder)):
            raise UsageError(
                f"{path} exists beside -o and describes another model; later commands would "
                "build that one for this checkpoint: remove it or choose another -o"
            )
        return path, None  # kept: it builds this model
    check_writable(path, "-o")
    return path, yaml.safe_dump(mine, sort_keys=False)


def _same_model(theirs: dict, mine: dict, folder: Path) -> bool:
    """Whether two spec mappings name the same factory (files resolved from ``folder``) and
    kwargs."""

    def where(factory: Any) -> Any:
        target, _, fn = str(factory).rpartition(":")
        return f"{(folder / target).resolve()}:{fn}" if target.endswith(".py") else factory

    same = where(theirs.get("factory")) == where(mine["factory"])
    return same and (theirs.get("kwargs") or {}) == mine["kwargs"]


def _epoch_dict(stats: Any) -> dict:
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    return {k: getattr(stats, k) for k in vars(stats)}
