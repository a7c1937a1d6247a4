"""Loading a checkpoint for measuring: checkpoint + spec + dataset -> model, examples, record.

:func:`load` is the one recipe every analysis command uses (and the entry point of the Python
API): read the checkpoint, resolve its model spec, fetch the dataset it was trained on (or the
one asked for), build and fill the model on the device and in the dtype, and take the split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.configs.common import SPLITS
from flatcli.devices import resolve_device
from flatcli.dtypes import DTYPES, dtype_of
from flatcli.errors import CheckpointError, UsageError
from flatcli.io.checkpoint import Checkpoint, check_finite, load_checkpoint, match_state_dict
from flatcli.io.spec import (
    HF_PREFIX,
    ModelSpec,
    build_model,
    fill_data_kwargs,
    parse_model_option,
    resolve_spec,
)

__all__ = [
    "SPLITS",
    "DTYPES",
    "Run",
    "DatasetCache",
    "load",
    "check_fits",
    "max_positions",
    "model_inputs",
    "resolve_device",
    "resolve_dtype",
    "resolve_loss",
]


@dataclass
class Run:
    """One checkpoint ready to measure: model in eval mode and examples, on the device and dtype.

    ``record`` is the training record flatcli stored in the checkpoint (``{}`` when none).
    ``batch_size`` is the examples per forward/backward the measures use (None: chosen to fit
    memory). ``loss`` is the loss every measure takes (docs, "Your model"): the one asked for,
    else the one the checkpoint records, else inferred from the targets
    (:func:`resolve_loss`).
    """

    path: Path
    checkpoint: Checkpoint
    spec: ModelSpec
    record: dict
    model: nn.Module
    dataset: Any
    split: str
    x: Tensor
    y: Tensor
    num_classes: int
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    batch_size: int | None = None
    loss: str = "ce"

    @property
    def num_params(self) -> int:
        """The number of trainable parameters of the model."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def inputs(self, x: Tensor) -> Tensor:
        """Inputs ``x`` of this run's dataset (another split, say) as the model takes them, as
        :func:`load` made ``self.x``: on the run's device, float inputs in its dtype, token ids
        as integers (int64 for a Hugging Face model, :func:`model_inputs`)."""
        hf = str(self.spec.arch or "").startswith(HF_PREFIX)
        return model_inputs(x, hf, str(self.dataset.name), self.path, self.device, self.dtype)


resolve_dtype = dtype_of
"""``"float32"``/``"float64"`` (or that torch dtype) as a torch dtype; else a UsageError
(:func:`flatcli.dtypes.dtype_of`, importable from here as before)."""


class DatasetCache:
    """Datasets loaded once per (name, normalisation), shared by the checkpoints of one run."""

    def __init__(self, data_dir: str | Path | None = None, download: bool = False) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.download = download
        self._cache: dict[str, Any] = {}

    def get(self, name: str, normalization: Any = "default", **text: Any) -> Any:
        """The dataset ``name`` with ``normalization``, loaded on first use; ``text``: a text
        dataset's ``seq_len`` and ``tokenizer`` (:func:`flatcli.data.load_dataset`)."""
        from flatcli.data import load_dataset

        text = {k: v for k, v in text.items() if v is not None}
        key = json.dumps([name, normalization, text], sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = load_dataset(
                name,
                data_dir=self.data_dir,
                download=self.download,
                normalization=normalization,
                **text,
            )
        return self._cache[key]


def load(
    checkpoint: str | Path,
    model: str | ModelSpec | None = None,
    dataset: str | None = None,
    split: str = "train",
    max_examples: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    data_dir: str | Path | None = None,
    download: bool = False,
    unsafe_load: bool = False,
    *,
    batch_size: int | None = None,
    datasets: DatasetCache | None = None,
    loss: str | None = None,
    seq_len: int | None = None,
) -> Run:
    """Load one checkpoint with its model and examples, ready for the measures.

    Args:
        checkpoint: a checkpoint file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``),
            or a Hugging Face ``save_pretrained`` directory (``config.json`` and its weights;
            :mod:`flatcli.io.hf`), whose config is its spec.
        model: a model spec (zoo name, YAML file, ``pkg.module:callable``, ``file.py:callable``,
            ``torchvision:NAME``, or a :class:`~flatcli.io.spec.ModelSpec`). Default: the spec
            stored in the checkpoint, else ``<stem>.yaml`` / ``model.yaml`` beside it. Not for
            a Hugging Face directory.
        dataset: a dataset name. Default: the dataset the checkpoint was trained on.
        split: ``train``, ``test``, ``trained`` (the training data exactly as ``flatcli train``
            used them: subset, random labels and confusion set) or ``trained-clean`` (the same
            without the confusion set).
        max_examples: keep only the first N examples of the split after a seeded shuffle.
        seed: the seed of that shuffle, and of every random draw of the measures.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        dtype: ``float32`` or ``float64``.
        data_dir: where dataset files live. Default: ``$FLATCLI_DATA``, else
            ``~/.cache/flatcli/data``.
        download: let torchvision download a missing dataset.
        unsafe_load: unpickle arbitrary objects from ``.pt`` files (runs code from the file).
        batch_size: examples per forward/backward for the measures (None: chosen to fit memory).
        datasets: a :class:`DatasetCache` shared between calls, so that a batch of checkpoints
            loads each dataset once (its ``data_dir``/``download`` then apply).
        loss: ``ce``, ``nsce``, ``token-ce``, ``mse`` or ``bce``; default the loss the
            checkpoint records (``loss`` in its record), else inferred from the targets
            (:func:`resolve_loss`); for a Hugging Face directory ``token-ce`` (causal LM) or
            ``ce`` (sequence classifier).
        seq_len: tokens per example of a text dataset (``text:PATH``); default the one the
            checkpoint records, else 128. A text dataset is tokenised with the checkpoint's
            ``tokenizer.json`` (in a Hugging Face directory, or beside a checkpoint file) when
            there is one, else as UTF-8 bytes.

    Raises:
        UsageError: a bad argument value, unknown dataset or unreadable spec (exit 2).
        CheckpointError: an unreadable checkpoint, or weights or data that do not fit the model.
    """
    from flatcli.data import subset
    from flatcli.data.text import text_options

    if split not in SPLITS:
        raise UsageError(f"--split must be train, test, trained or trained-clean; got '{split}'")
    torch_dtype = dtype_of(dtype)
    torch_device = resolve_device(device)
    if datasets is None:
        datasets = DatasetCache(data_dir, download)
    if isinstance(model, str):
        model = parse_model_option(model)
    path = Path(checkpoint)

    pretrained = _load_hf(path, model, torch_device, torch_dtype)
    if pretrained is not None:
        ckpt, spec, net, default_loss = pretrained
    else:
        ckpt = load_checkpoint(path, unsafe=unsafe_load)
        spec = resolve_spec(path, model, ckpt.spec)
        net, default_loss = None, None
    meta = ckpt.meta or {}
    name = dataset or meta.get("dataset") or spec.dataset
    if name is None:
        raise CheckpointError(f"no dataset recorded for {path}: pass --dataset")
    normalization = (
        meta.get("normalization", "default") if name == meta.get("dataset") else "default"
    )
    # a text dataset: its seq_len, and the checkpoint's tokenizer.json (in a Hugging Face
    # directory, or beside a checkpoint file) when there is one
    text = text_options(name, meta, path, seq_len)
    data = datasets.get(name, normalization, **text)
    if net is None:
        spec = fill_data_kwargs(spec, data.num_classes, tuple(data.input_shape))
        # cast the empty model first, then load: float64 weights stay exact
        net = build_model(spec).to(device=torch_device, dtype=torch_dtype)
        state = match_state_dict(net, ckpt.state_dict, source=str(path))
        check_finite(state, source=str(path))
        net.load_state_dict(state)
    net.eval()
    if split in ("trained", "trained-clean"):
        from flatcli.train.prepare import rebuild_train_split

        if name != meta.get("dataset"):
            raise CheckpointError(
                f"--split trained rebuilds the data {path.name} was trained on, from dataset "
                f"{meta.get('dataset')!r}; drop --dataset {name} or use --split train"
            )
        examples = rebuild_train_split(
            data.train, data.num_classes, meta, clean=split == "trained-clean"
        )
    else:
        examples = data.split(split)
    examples = subset(examples, max_examples, seed)
    x = model_inputs(examples.x, pretrained is not None, name, path, torch_device, torch_dtype)
    y = examples.y.to(device=torch_device)
    chosen = resolve_loss(loss, {"loss": default_loss} if default_loss else meta, y)
    check_fits(net, x, y, data.num_classes, spec, name, path, chosen, text=bool(text))
    return Run(
        path=path,
        checkpoint=ckpt,
        spec=spec,
        record=meta,
        model=net,
        dataset=data,
        split=split,
        x=x,
        y=y,
        num_classes=data.num_classes,
        device=torch_device,
        dtype=torch_dtype,
        seed=seed,
        batch_size=batch_size,
        loss=chosen,
    )


def _load_hf(
    path: Path, model: ModelSpec | None, device: torch.device, dtype: torch.dtype
) -> tuple[Checkpoint, ModelSpec, nn.Module, str] | None:
    """A Hugging Face directory as (checkpoint, spec, model, default loss); None for any other
    path.

    Raises:
        UsageError: ``--model`` given for it, no weights, or ``transformers`` missing (exit 2).
        CheckpointError: weights or a config that ``transformers`` cannot read.
    """
    from flatcli.io import hf

    if not hf.is_hf_directory(path):
        return None
    spec = ModelSpec(arch=f"{HF_PREFIX}{path.resolve()}", source=str(path))
    if model is not None and model.arch != spec.arch:
        raise UsageError(
            f"{path} is a Hugging Face checkpoint: its config.json says how to build the model; "
            "drop --model"
        )
    loaded = hf.load_pretrained(path, device=device, dtype=dtype)
    check_finite(loaded.state_dict, source=str(path))
    ckpt = Checkpoint(
        path,
        loaded.state_dict,
        sha256=hf.directory_sha256(path),
        extra={"hf": {"architecture": loaded.architecture, "kind": loaded.kind}},
    )
    return ckpt, spec, loaded.model, loaded.loss


def model_inputs(
    x: Tensor, hf: bool, name: str, path: Path, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Inputs ``x`` of dataset ``name`` as the model of checkpoint ``path`` takes them: on
    ``device``; float inputs in ``dtype``, integer inputs (token ids) as they are, and for a
    Hugging Face model (``hf``) int64 token ids (:func:`_token_ids`)."""
    if hf:
        x = _token_ids(x, name, path)
    return x.to(device=device, dtype=dtype if x.is_floating_point() else None)


def _token_ids(x: Tensor, name: str, path: Path) -> Tensor:
    """The inputs of a Hugging Face model as int64 token ids: a ``tensors:`` file's integer
    ``x`` beside class labels (N,) is read as float32 with the same values, cast back here.

    Raises:
        UsageError: inputs that are not whole numbers (exit 2).
    """
    if not x.is_floating_point():
        return x.to(torch.int64)
    if x.numel() and not bool((x == x.round()).all() and (x >= 0).all()):
        raise UsageError(
            f"the Hugging Face model {path.name} takes token ids, but dataset {name} holds "
            "inputs that are not whole numbers >= 0; store int64 input_ids (N, T)"
        )
    return x.to(torch.int64)


def resolve_loss(loss: str | None, record: dict, y: Tensor) -> str:
    """The loss a run takes: ``loss`` if given, else the record's ``loss``, else inferred from
    the targets ``y`` (:func:`flatcli.curvature.losses.infer_loss`: ``token-ce`` for int (N, T),
    ``mse`` for float, ``ce`` otherwise). UsageError for an unknown name."""
    from flatcli.configs.choices import LossName
    from flatcli.curvature.losses import infer_loss
    from flatcli.errors import choice

    if loss is not None:
        return choice(LossName, loss, "loss")
    recorded = record.get("loss")
    if isinstance(recorded, str) and recorded in {m.value for m in LossName}:
        return recorded
    return infer_loss(y)


_POSITION_LIMITS = ("block_size", "n_positions", "max_position_embeddings")
"""Attributes of a model's ``config`` that may say how many positions it has learned: the zoo's
``gpt`` (``block_size``), GPT-2 (``n_positions``), BERT and others (``max_position_embeddings``)."""


def max_positions(model: nn.Module) -> tuple[int, str] | None:
    """The longest sequence ``model`` takes, and the config attribute that says so, when the
    model learned one embedding per position; None when it says nothing of the kind.

    A limit counts only where the model has an ``nn.Embedding`` (not its input embedding) with
    that many rows: rotary positions (Llama's ``max_position_embeddings``) are computed for any
    length, and are not refused here.

    >>> from model_zoo import get_model
    >>> max_positions(get_model("gpt-tiny", num_classes=256, input_shape=(16,)))
    (16, 'block_size')
    >>> max_positions(nn.Linear(2, 2)) is None
    True
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    inputs = getattr(model, "get_input_embeddings", None)
    tokens = inputs() if callable(inputs) else None
    rows = {
        m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding) and m is not tokens
    }
    for attr in _POSITION_LIMITS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value in rows:
            return value, attr
    return None


def check_fits(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    spec: ModelSpec,
    name: str,
    path: Path,
    loss: str = "ce",
    *,
    text: bool = False,
) -> None:
    """Check that the examples of dataset ``name`` fit the model and its outputs fit ``loss``.

    ``text``: the dataset is a ``text:`` dataset, whose sequence length ``--seq-len`` sets.

    Raises:
        CheckpointError: the input shape does not fit (the model's forward raises), or the
            output of a ce model is not (batch, classes).
        UsageError: sequences of token ids longer than the model's learned positions
            (:func:`max_positions`), labels beyond the model's outputs (more classes than
            outputs), or outputs and targets that ``loss`` cannot take
            (:func:`flatcli.curvature.losses.check_targets`).
    """
    shape = tuple(x.shape[1:])
    if spec.input_shape is not None and tuple(spec.input_shape) != shape:
        raise CheckpointError(
            f"dataset {name} has inputs of shape {list(shape)} but the spec of {path.name} "
            f"expects {list(spec.input_shape)}; pick the matching --dataset or --model"
        )
    limit = max_positions(model) if x.ndim == 2 and not x.is_floating_point() else None
    if limit is not None and x.shape[1] > limit[0]:
        # bad usage (exit 2), before any forward: an index past the position table is a
        # device-side assert on CUDA
        change = f"pass --seq-len {limit[0]} or less" if text else "store shorter sequences"
        raise UsageError(
            f"the model of {path.name} takes at most {limit[0]} positions ({limit[1]}), but "
            f"dataset {name} has sequences of {x.shape[1]} tokens: {change}"
        )
    try:
        with torch.no_grad():
            out = model(x[:2])
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"inputs of shape {list(shape)} from dataset {name} do not fit the model of "
            f"{path.name} "
            f"({first}); pick the matching --dataset or --model"
        ) from e
    from flatcli.curvature.losses import CLASS_LOSSES, check_targets

    if loss not in CLASS_LOSSES:
        check_targets(loss, out, y)
        if loss == "token-ce" and y.numel() and int(y.max()) >= out.shape[-1]:
            raise UsageError(
                f"the model of {path.name} has {out.shape[-1]} token logits but a target of "
                f"dataset {name} is {int(y.max())}; pick the matching --dataset or --model"
            )
        return
    if out.ndim != 2:
        raise CheckpointError(
            f"the model of {path.name} returns outputs of shape {list(out.shape)}; loss {loss} "
            "needs logits of shape (batch, classes) (another loss: --loss)"
        )
    check_targets(loss, None, y)
    if out.shape[1] < num_classes or (y.numel() and int(y.max()) >= out.shape[1]):
        # bad usage (exit 2): the data or the spec must change, not the checkpoint
        raise UsageError(
            f"the model of {path.name} has {out.shape[1]} outputs but dataset {name} has "
            f"{num_classes} classes; set num_classes in the spec or pick the matching --dataset"
        )
