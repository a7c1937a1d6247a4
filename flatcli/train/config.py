"""The training configuration: one dataclass, validated on construction, JSON-serialisable.

Choices that are a fixed set are ``str`` Enums, so they print as plain strings in JSON and can
be offered as choices on the command line. Every default says why it is what it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import torch

from flatcli.devices import auto_device
from flatcli.dtypes import DTYPES
from flatcli.errors import UsageError
from flatcli.options import option


class Optimizer(str, Enum):
    """Optimisers ``fit`` can build."""

    SGD = "sgd"
    ADAM = "adam"


class Schedule(str, Enum):
    """Learning-rate schedules, applied per epoch (see :func:`flatcli.train.schedule.lr_at`)."""

    CONSTANT = "constant"
    STEP = "step"
    COSINE = "cosine"


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
    label_smoothing: float = option(0.0, "--label-smoothing", "Label smoothing ε.")
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
        self.optimizer = _enum(Optimizer, self.optimizer, "optimizer")
        self.schedule = _enum(Schedule, self.schedule, "schedule")
        self.augment = _enum(Augment, self.augment, "augment")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        _check(_is_real(self.lr) and self.lr > 0, f"lr must be a positive number. Got {self.lr!r}.")
        self.lr = float(self.lr)
        _check(
            _is_real(self.momentum) and 0 <= self.momentum < 1,
            f"momentum must be in [0, 1). Got {self.momentum!r}.",
        )
        _check(
            isinstance(self.nesterov, bool),
            f"nesterov must be true or false. Got {self.nesterov!r}.",
        )
        _check(
            not (self.nesterov and self.momentum == 0),
            "nesterov needs a momentum > 0. Got momentum=0.",
        )
        _check(
            _is_real(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0. Got {self.weight_decay!r}.",
        )
        self.milestones = list(self.milestones)
        _check(
            all(_is_int(m) and m > 0 for m in self.milestones),
            f"milestones must be positive whole epochs. Got {self.milestones!r}.",
        )
        _check(
            self.milestones == sorted(set(self.milestones)),
            f"milestones must be strictly increasing. Got {self.milestones!r}.",
        )
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
        _check(
            _is_real(self.gamma) and 0 < self.gamma <= 1,
            f"gamma must be in (0, 1]. Got {self.gamma!r}.",
        )
        _check(
            _is_int(self.epochs) and self.epochs >= 1, f"epochs must be >= 1. Got {self.epochs!r}."
        )
        _check(
            _is_int(self.batch_size) and self.batch_size >= 1,
            f"batch_size must be >= 1. Got {self.batch_size!r}.",
        )
        _check(
            _is_real(self.random_labels) and 0 <= self.random_labels <= 1,
            f"random_labels must be a fraction in [0, 1]. Got {self.random_labels!r}.",
        )
        _check(
            self.train_subset is None or (_is_int(self.train_subset) and self.train_subset >= 1),
            f"train_subset must be a number of examples >= 1. Got {self.train_subset!r}.",
        )
        _check(
            _is_int(self.confusion_size) and self.confusion_size >= 0,
            f"confusion_size must be a number of examples >= 0. Got {self.confusion_size!r}.",
        )
        _check(
            _is_real(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            f"label_smoothing must be in [0, 1). Got {self.label_smoothing!r}.",
        )
        _check(
            isinstance(self.fisher_reg, bool),
            f"fisher_reg must be true or false. Got {self.fisher_reg!r}.",
        )
        _check(
            _is_real(self.reg_beta) and self.reg_beta >= 0,
            f"reg_beta must be >= 0. Got {self.reg_beta!r}.",
        )
        _check(
            _is_real(self.reg_alpha) and self.reg_alpha > 0,
            f"reg_alpha must be > 0. Got {self.reg_alpha!r}.",
        )
        _check(
            _is_int(self.reg_subbatches) and self.reg_subbatches >= 1,
            f"reg_subbatches must be >= 1. Got {self.reg_subbatches!r}.",
        )
        _check(
            not self.fisher_reg or self.reg_subbatches <= self.batch_size,
            f"reg_subbatches ({self.reg_subbatches}) cannot exceed batch_size ({self.batch_size}): "
            "each sub-batch needs at least one example.",
        )
        _check(
            self.clip is None or (_is_real(self.clip) and self.clip > 0),
            f"clip must be a positive gradient norm, or None for no clipping. Got {self.clip!r}.",
        )
        _check(
            _is_int(self.seed) and self.seed >= 0,
            f"seed must be a whole number >= 0. Got {self.seed!r}.",
        )
        _check(
            self.dtype in DTYPES,
            f"dtype must be one of {', '.join(repr(d) for d in DTYPES)}. Got {self.dtype!r}.",
        )
        if self.device == "auto":
            self.device = str(auto_device(mps=False))
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise UsageError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'. Got {self.device!r}."
            ) from None
        _check(
            self.target_train_acc is None
            or (_is_real(self.target_train_acc) and 0 < self.target_train_acc <= 1),
            "target_train_acc must be an accuracy in (0, 1], or None. "
            f"Got {self.target_train_acc!r}.",
        )
        _check(
            _is_int(self.log_every) and self.log_every >= 1,
            f"log_every must be >= 1. Got {self.log_every!r}.",
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype the model and inputs are trained in."""
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
