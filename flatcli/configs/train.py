"""The options of ``flatcli train``: the training configuration (one dataclass, validated on
construction, JSON-serialisable) and the job (what to train, on which data, where to write).

Choices that are a fixed set are ``str`` Enums, so they print as plain strings in JSON and can
be offered as choices on the command line. Every default says why it is what it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatcli.configs.choices import LossName
from flatcli.errors import UsageError
from flatcli.options import choices, option

if TYPE_CHECKING:
    import torch

__all__ = [
    "Optimizer",
    "Schedule",
    "Augment",
    "DEFAULT_LR",
    "parse_milestones",
    "TrainConfig",
    "TrainJob",
]


Optimizer = choices("Optimizer", "sgd adam", "Optimisers ``fit`` can build.")


Schedule = choices(
    "Schedule",
    "constant step cosine",
    "Learning-rate schedules, applied per epoch (see :func:`flatcli.train.schedule.lr_at`).",
)


class Augment(str, Enum):
    """Data augmentations of fisher-gamma-local-minima.md §7.1, Scenario II.

    ``none`` is the paper's no-aug, ``flip`` its flip-only, ``crop1-flip`` its 1-crop-f (random
    crop from the image zero-padded by 1 pixel on each side, plus a random horizontal flip) and
    ``crop4-flip`` its 4-crop-f (padding 4, plus flip).
    """

    NONE = "none"
    FLIP = "flip"
    CROP1_FLIP = "crop1-flip"
    CROP4_FLIP = "crop4-flip"

    @property
    def padding(self) -> int:
        """Pixels of zero padding on each side before the random crop (0 = no crop)."""
        return {"none": 0, "flip": 0, "crop1-flip": 1, "crop4-flip": 4}[self.value]

    @property
    def flip(self) -> bool:
        """Whether a random half of each batch is mirrored left-right."""
        return self is not Augment.NONE


DEFAULT_LR = {Optimizer.SGD: 0.05, Optimizer.ADAM: 1e-3}
"""Learning rate used when ``lr`` is left as None (measured on mlp/mnist5k; see the README part)."""


def _enum(cls: type[Enum], value: Any, name: str) -> Any:
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise UsageError(f"{name} must be one of {valid}. Got {value!r}.") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_milestones(text: str) -> list[int]:
    """``"30,45"`` as ``[30, 45]``; UsageError when it is not comma-separated epochs."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(
            f"--milestones takes comma-separated epochs, e.g. 30,45; got '{text}'"
        ) from None


@dataclass
class TrainConfig:
    """Everything that decides a training run; stored in the checkpoint record via ``to_dict()``.

    Invalid values raise :class:`flatcli.errors.UsageError` on construction, with a message that
    names the option and quotes the value. ``lr=None`` resolves to the optimiser's default
    (:data:`DEFAULT_LR`) on construction, so ``to_dict()`` always records the value used.
    """

    # --- optimiser
    optimizer: Optimizer | str = option(Optimizer.SGD, "--optimizer", "sgd or adam.")
    lr: float | None = option(  # None: DEFAULT_LR of the optimiser
        None, "--lr", "Learning rate. Default: 0.05 for sgd, 1e-3 for adam."
    )
    # SGD only; the papers' SGD+Momentum
    momentum: float = option(0.9, "--momentum", "SGD momentum.")
    # SGD only; fisher-gamma Appendix E trains its plain CNN with Nesterov
    nesterov: bool = option(False, "--nesterov", "Nesterov momentum (SGD).")
    # L2 coefficient added to the gradient (coupled, also for Adam)
    weight_decay: float = option(0.0, "--weight-decay", "L2 coefficient.")
    # --- schedule, per epoch
    schedule: Schedule | str = option(Schedule.CONSTANT, "--schedule", "constant, step or cosine.")
    milestones: list[int] = option(  # "step": 0-based epochs where lr drops
        (),
        "--milestones",
        "Epochs where a step schedule multiplies the lr by --lr-gamma, e.g. 30,45.",
        parse=parse_milestones,
    )
    gamma: float = option(0.1, "--lr-gamma", "Factor of a step schedule.")
    # --- length and batches
    # mlp/mnist5k reaches 100 % train acc in 9-14 (SGD, lr 0.05, batch 64)
    epochs: int = option(30, "--epochs", "Epochs (an upper bound with --target-train-acc).")
    batch_size: int = option(
        64, "--batch-size", "Mini-batch size (large values: the large-batch scenario)."
    )
    # --- data
    augment: Augment | str = option(
        Augment.NONE, "--augment", "none, flip, crop1-flip or crop4-flip."
    )
    random_labels: float = option(
        0.0,
        "--random-labels",
        "Fraction of training labels replaced at random (fixed by the seed).",
    )
    train_subset: int | None = option(
        None, "--train-subset", "Train on N examples of the training split."
    )
    confusion_size: int = option(
        0,
        "--confusion-size",
        "N extra training examples with random labels (Fisher paper, Scenario I).",
    )
    # --- objective
    loss: str | None = option(  # None: inferred from the targets, then recorded as resolved
        None,
        "--loss",
        "Loss to minimise: ce, nsce, token-ce, mse, bce. Default: token-ce for int targets "
        "(N, T) (text), mse for float targets, else ce.",
        choices=LossName,
    )
    label_smoothing: float = option(0.0, "--label-smoothing", "Label smoothing ε (ce, token-ce).")
    fisher_reg: bool = option(  # Jia & Su 2020, Algorithm 1
        False, "--fisher-reg", "Add the Fisher-trace regulariser of Algorithm 1 / Eq. 6."
    )
    # Eq. 6: beta (the paper searched {10, ..., 125}), alpha (its fixed value), M ({4, 8, 16})
    reg_beta: float = option(10.0, "--reg-beta", "β of Eq. 6.")
    reg_alpha: float = option(1e-4, "--reg-alpha", "α of Eq. 6.")
    reg_subbatches: int = option(4, "--reg-subbatches", "M sub-batches of Eq. 6.")
    clip: float | None = option(  # tau; None = no clipping
        None, "--clip", "Clip the gradient to this global norm τ."
    )
    # --- run
    seed: int = option(0, "--seed", "Seed for initialisation, batches, labels and augmentation.")
    device: str = "cpu"  # "auto" resolves on construction: "cuda" if available, else "cpu"
    dtype: str = option("float32", "--dtype", "float32 or float64.")
    target_train_acc: float | None = option(
        None, "--target-train-acc", "Stop once the training accuracy reaches this (e.g. 1.0)."
    )
    log_every: int = 1  # evaluate (and report) every this many epochs, and after the last one

    def __post_init__(self) -> None:
        import torch  # the device and dtype checks need it; the command line's --help does not

        from flatcli.devices import auto_device
        from flatcli.dtypes import DTYPES

        self.optimizer = _enum(Optimizer, self.optimizer, "optimizer")
        self.schedule = _enum(Schedule, self.schedule, "schedule")
        self.augment = _enum(Augment, self.augment, "augment")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        require = self._require
        require("lr", lambda v: _is_real(v) and v > 0, "a positive number")
        self.lr = float(self.lr)
        require("momentum", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)")
        require("nesterov", lambda v: isinstance(v, bool), "true or false")
        _check(
            not (self.nesterov and self.momentum == 0),
            "nesterov needs a momentum > 0. Got momentum=0.",
        )
        require("weight_decay", lambda v: _is_real(v) and v >= 0, ">= 0")
        self.milestones = list(self.milestones)
        require(
            "milestones", lambda v: all(_is_int(m) and m > 0 for m in v), "positive whole epochs"
        )
        require("milestones", lambda v: v == sorted(set(v)), "strictly increasing")
        _check(
            self.schedule is Schedule.STEP or not self.milestones,
            f"milestones only apply to schedule 'step'. Got schedule {self.schedule.value!r} "
            f"with milestones {self.milestones!r}.",
        )
        _check(
            self.schedule is not Schedule.STEP or bool(self.milestones),
            "schedule 'step' needs milestones (epochs where the learning rate drops), "
            "e.g. milestones=[30, 45].",
        )
        require("gamma", lambda v: _is_real(v) and 0 < v <= 1, "in (0, 1]")
        require("epochs", lambda v: _is_int(v) and v >= 1, ">= 1")
        require("batch_size", lambda v: _is_int(v) and v >= 1, ">= 1")
        require("random_labels", lambda v: _is_real(v) and 0 <= v <= 1, "a fraction in [0, 1]")
        require(
            "train_subset",
            lambda v: v is None or (_is_int(v) and v >= 1),
            "a number of examples >= 1",
        )
        require("confusion_size", lambda v: _is_int(v) and v >= 0, "a number of examples >= 0")
        if self.loss is not None:
            self.loss = _enum(LossName, self.loss, "loss").value
        require("label_smoothing", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)")
        require("fisher_reg", lambda v: isinstance(v, bool), "true or false")
        require("reg_beta", lambda v: _is_real(v) and v >= 0, ">= 0")
        require("reg_alpha", lambda v: _is_real(v) and v > 0, "> 0")
        require("reg_subbatches", lambda v: _is_int(v) and v >= 1, ">= 1")
        _check(
            not self.fisher_reg or self.reg_subbatches <= self.batch_size,
            f"reg_subbatches ({self.reg_subbatches}) cannot exceed batch_size ({self.batch_size}): "
            "each sub-batch needs at least one example.",
        )
        require(
            "clip",
            lambda v: v is None or (_is_real(v) and v > 0),
            "a positive gradient norm, or None for no clipping",
        )
        require("seed", lambda v: _is_int(v) and v >= 0, "a whole number >= 0")
        require("dtype", lambda v: v in DTYPES, f"one of {', '.join(repr(d) for d in DTYPES)}")
        if self.device == "auto":
            self.device = str(auto_device(mps=False))
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise UsageError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'. Got {self.device!r}."
            ) from None
        require(
            "target_train_acc",
            lambda v: v is None or (_is_real(v) and 0 < v <= 1),
            "an accuracy in (0, 1], or None",
        )
        require("log_every", lambda v: _is_int(v) and v >= 1, ">= 1")

    def _require(self, name: str, ok: Callable[[Any], bool], what: str) -> None:
        """A UsageError "<name> must be <what>. Got <value>." unless ``ok(value)``."""
        value = getattr(self, name)
        _check(ok(value), f"{name} must be {what}. Got {value!r}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype the model and inputs are trained in."""
        from flatcli.dtypes import DTYPES

        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from ``to_dict()`` output; an unknown key is a UsageError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(
                f"Unknown training option(s) {', '.join(unknown)}. "
                f"Valid: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict: Enums as their strings, lists copied."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Enum):
                out[key] = value.value
        return out


@dataclass(frozen=True)
class TrainJob:
    """What to train, on which data, and where the checkpoint goes."""

    model: str | None = option(
        None,
        "--model",
        "Zoo name, YAML spec, pkg.module:callable, file.py:callable or torchvision:NAME.",
    )
    output: Path | None = option(
        None, "--output", "Checkpoint to write (.safetensors).", short="-o"
    )
    dataset: str | None = option(
        None,
        "--dataset",
        "Dataset name (mnist5k, fashion-mnist, cifar10, tensors:PATH, text:PATH, "
        "python-license, ...); default: the spec's.",
    )
    seq_len: int | None = option(
        None,
        "--seq-len",
        "Tokens T per example of a text dataset (text:PATH, python-license). Default: 128.",
        min=1,
    )
    data_dir: Path | None = option(None, "--data-dir", "Where dataset files live.")
    download: bool = option(False, "--download", "Let torchvision download a missing dataset.")
    device: str = option("auto", "--device", "auto, cpu, cuda, cuda:N or mps.")

    def check(self) -> tuple[str, Path]:
        """(model, output) when both are given and the output is a ``.safetensors`` path."""
        if self.model is None or self.output is None:
            raise UsageError("train needs --model SPEC and -o CKPT.safetensors")
        if self.output.suffix.lower() != ".safetensors":
            raise UsageError(f"-o must name a .safetensors file; got {self.output}")
        if self.seq_len is not None:
            from flatcli.data.text import check_seq_len

            check_seq_len(self.seq_len)
        return self.model, self.output
