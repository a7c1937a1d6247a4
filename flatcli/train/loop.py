"""The training loop: seeded batches sliced from device tensors, batched augmentation, the
optional Fisher-trace regulariser, gradient clipping, per-epoch evaluation and early stopping.
The loss minimised and reported is ``config.loss`` (default inferred from the targets;
:mod:`flatcli.train.objective`).

No DataLoader and no per-example Python: each epoch draws one ``randperm`` on the device from a
generator seeded by ``config.seed`` and slices it into batches; augmentation is batched tensor
work (:mod:`flatcli.train.augment`). The library is silent: progress goes to ``on_epoch``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.data import Split
from flatcli.errors import FlatcliError, UsageError
from flatcli.train.augment import augment_batch, check_augmentable
from flatcli.train.config import Augment, Optimizer, TrainConfig
from flatcli.train.fisher_reg import fisher_penalty
from flatcli.train.objective import (
    check_train_options,
    check_train_targets,
    evaluate_loss,
    resolve_train_loss,
)
from flatcli.train.objective import objective as batch_objective
from flatcli.train.schedule import lr_at


@dataclass(frozen=True)
class EpochStats:
    """Metrics after an evaluated epoch (every ``log_every`` epochs and the last one).

    Attributes:
        epoch: epochs completed so far (1-based).
        train_loss: mean loss (``config.loss``; cross-entropy by default) on the training split,
            eval mode, no augmentation, on the labels trained on (random labels and confusion
            set included), no label smoothing.
        train_acc: accuracy on the same (token accuracy for ``token-ce``); None where the loss
            has none (``mse``; ``bce`` on targets that are not all 0 or 1).
        test_loss: mean loss on the test split (None without one).
        test_acc: accuracy on the test split (None without one, or without an accuracy).
        lr: learning rate used during this epoch.
        seconds: wall time since ``fit`` started (training and evaluation).
        objective: mean over this epoch's batches of the minimised objective (with augmentation,
            label smoothing and ``reg_beta * R``), as seen by the optimiser in train mode.
        reg: mean over this epoch's batches of the regulariser value R_alpha (None without it).
    """

    epoch: int
    train_loss: float
    train_acc: float | None
    test_loss: float | None
    test_acc: float | None
    lr: float
    seconds: float
    objective: float
    reg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (non-finite floats become None)."""
        return {k: _finite(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class TrainResult:
    """What ``fit`` did and where it ended.

    ``train_*`` are on the training split as trained on (its labels may be random, see
    :class:`EpochStats`); the generalization gaps are ``gap_acc = train_acc - test_acc`` and
    ``gap_loss = test_loss - train_loss`` (None without a test split).
    """

    train_loss: float
    train_acc: float | None
    test_loss: float | None
    test_acc: float | None
    gap_acc: float | None
    gap_loss: float | None
    epochs: int
    steps: int
    seconds: float
    reached_target: bool
    history: list[EpochStats] = field(default_factory=list)

    @classmethod
    def after(
        cls, history: list[EpochStats], *, steps: int, seconds: float, reached_target: bool
    ) -> TrainResult:
        """The result of a run that ended at its last evaluated epoch, ``history[-1]``."""
        last = history[-1]
        return cls(
            train_loss=last.train_loss,
            train_acc=last.train_acc,
            test_loss=last.test_loss,
            test_acc=last.test_acc,
            gap_acc=None
            if last.test_acc is None or last.train_acc is None
            else last.train_acc - last.test_acc,
            gap_loss=None if last.test_loss is None else last.test_loss - last.train_loss,
            epochs=last.epoch,
            steps=steps,
            seconds=seconds,
            reached_target=reached_target,
            history=history,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``history`` as a list of dicts."""
        out = {k: _finite(v) for k, v in asdict(self).items() if k != "history"}
        out["history"] = [h.to_dict() for h in self.history]
        return out


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def build_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (with ``momentum``/``nesterov``) or Adam, both with coupled L2 ``weight_decay``."""
    if config.optimizer is Optimizer.SGD:
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _check_labels(y: Tensor, num_classes: int, which: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UsageError(
            f"{which} labels must lie in [0, {num_classes}); got values from {int(y.min())} "
            f"to {int(y.max())}. Check num_classes."
        )


def fit(
    model: nn.Module,
    train: Split,
    test: Split | None,
    num_classes: int,
    config: TrainConfig,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
    pad_fill: float | Sequence[float] = 0.0,
) -> TrainResult:
    """Train ``model`` in place on ``train`` as ``config`` says; evaluate on ``test``.

    Each step: slice a batch from a seeded permutation, augment it, minimise the batch's loss
    ``config.loss`` (inferred from the targets when None; see
    :func:`flatcli.train.objective.objective`: for class labels the cross-entropy with
    ``label_smoothing``), plus ``reg_beta`` times the Fisher-trace regulariser of Jia & Su 2020,
    Eq. 6, in its first-order form, when ``fisher_reg``; clip the gradient to global norm
    ``clip``, step the optimiser. The learning rate follows ``config.schedule`` per epoch. Every
    ``log_every`` epochs and after the last, the model is evaluated (eval mode, no augmentation)
    on the training split, with the labels it was trained on, and on ``test``; ``on_epoch`` gets
    the :class:`EpochStats`, and training stops once ``train_acc`` reaches
    ``target_train_acc``.

    Same seed, same model initialisation, same data: bit-identical weights on CPU. The global
    torch RNG (dropout) is seeded from ``config.seed`` inside ``fit`` and restored afterwards.

    Args:
        model: the network; moved to ``config.device`` and ``config.dtype``; left in eval mode.
        train: training split (already prepared by :func:`prepare_train_split`).
        test: test split, or None.
        num_classes: K; class labels must lie in ``[0, K)`` (token targets below the model's
            V logits; float targets must have the outputs' shape).
        config: the :class:`TrainConfig`.
        on_epoch: called with each evaluated epoch's stats (progress reporting).
        pad_fill: padding value of the random crops, a number or one per channel (0 = zero
            padding; :func:`flatcli.train.augment.black_fill` gives the value of black pixels
            in normalised inputs, as torchvision's RandomCrop-before-Normalize pads).

    Returns:
        A :class:`TrainResult` with the final metrics and the history.
    """
    start_time = time.perf_counter()
    device = torch.device(config.device)
    dtype = config.torch_dtype
    if len(train) == 0:
        raise UsageError("the training split is empty.")
    check_augmentable(tuple(train.x.shape[1:]), config.augment)
    x, y = _on(train, device, dtype)
    loss_name = resolve_train_loss(config.loss, y)
    check_train_options(config, loss_name, y)
    class_labels = loss_name in ("ce", "nsce")
    if class_labels:
        _check_labels(y, num_classes, "training")
    if test is not None:
        x_test, y_test = _on(test, device, dtype)
        if class_labels:
            _check_labels(y_test, num_classes, "test")
    model.to(device=device, dtype=dtype)
    check_train_targets(model, x, y, loss_name, "training")
    if test is not None:
        check_train_targets(model, x_test, y_test, loss_name, "test")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters.")
    optimizer = build_optimizer(params, config)

    n = x.shape[0]
    bs = min(config.batch_size, n)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    history: list[EpochStats] = []
    steps = 0
    epochs_run = 0
    reached = False
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        for epoch in range(config.epochs):
            lr = lr_at(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            objective_sum = torch.zeros((), dtype=torch.float64, device=device)
            reg_sum = torch.zeros((), dtype=torch.float64, device=device)
            batches = 0
            perm = torch.randperm(n, generator=generator, device=device)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                xb = x.index_select(0, idx)
                yb = y.index_select(0, idx)
                if config.augment is not Augment.NONE:
                    xb = augment_batch(xb, config.augment, generator, pad_fill)
                logits = model(xb)
                loss = batch_objective(loss_name, logits, yb, config.label_smoothing)
                if config.fisher_reg and yb.shape[0] >= config.reg_subbatches:
                    penalty = fisher_penalty(
                        model,
                        xb,
                        yb,
                        alpha=config.reg_alpha,
                        subbatches=config.reg_subbatches,
                    )
                    loss = loss + config.reg_beta * penalty.value
                    reg_sum += penalty.value.detach().double()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip)
                optimizer.step()
                objective_sum += loss.detach().double()
                batches += 1
                steps += 1
            epochs_run = epoch + 1
            objective = float(objective_sum) / batches
            if not math.isfinite(objective):
                raise FlatcliError(
                    f"training diverged: the objective is {objective} in epoch {epochs_run} "
                    f"(lr {lr:g}). Lower lr, or set clip."
                )
            if epochs_run % config.log_every and epochs_run != config.epochs:
                continue
            stats = _evaluate_epoch(
                model,
                loss_name,
                x,
                y,
                (x_test, y_test) if test is not None else None,
                epochs_run,
                lr,
                start_time,
                objective,
                float(reg_sum) / batches if config.fisher_reg else None,
            )
            history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
            target = config.target_train_acc
            if target is not None and stats.train_acc is not None and stats.train_acc >= target:
                reached = True
                break
    model.eval()
    seconds = time.perf_counter() - start_time
    # the last epoch is always evaluated: history[-1] is where the run ended
    return TrainResult.after(history, steps=steps, seconds=seconds, reached_target=reached)


def _on(split: Split, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A split's tensors on ``device``: float inputs and float targets in ``dtype``; integer
    token ids and labels keep their dtype."""
    x = split.x.to(device=device, dtype=dtype if split.x.is_floating_point() else None)
    y = split.y.to(device=device, dtype=dtype if split.y.is_floating_point() else None)
    return x, y


def _evaluate_epoch(
    model: nn.Module,
    loss: str,
    x: Tensor,
    y: Tensor,
    test: tuple[Tensor, Tensor] | None,
    epoch: int,
    lr: float,
    start_time: float,
    objective: float,
    reg: float | None,
) -> EpochStats:
    train_loss, train_acc = evaluate_loss(model, x, y, loss)
    test_loss = test_acc = None
    if test is not None:
        test_loss, test_acc = evaluate_loss(model, *test, loss)
    return EpochStats(
        epoch=epoch,
        train_loss=train_loss,
        train_acc=train_acc,
        test_loss=test_loss,
        test_acc=test_acc,
        lr=lr,
        seconds=time.perf_counter() - start_time,
        objective=objective,
        reg=reg,
    )
