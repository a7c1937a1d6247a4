"""The library behind ``flatcli train``: configuration, data preparation, the training loop.

Typical use (what the CLI does)::

    config = TrainConfig(optimizer="sgd", lr=0.05, epochs=60, target_train_acc=1.0)
    train, info = prepare_train_split(dataset.train, dataset.num_classes, config)
    result = fit(model, train, dataset.test, dataset.num_classes, config, on_epoch=report)

``info`` and ``config.to_dict()`` and ``result.to_dict()`` are JSON-ready for the checkpoint
record.
"""

from flatcli.evaluation import evaluate
from flatcli.train.augment import augment_batch, black_fill, random_crop, random_flip
from flatcli.train.config import DEFAULT_LR, Augment, Optimizer, Schedule, TrainConfig
from flatcli.train.fisher_reg import FisherPenalty, fisher_penalty
from flatcli.train.loop import EpochStats, TrainResult, build_optimizer, fit
from flatcli.train.objective import evaluate_loss, objective, resolve_train_loss
from flatcli.train.prepare import CONFUSION_SOURCE, prepare_train_split
from flatcli.train.schedule import lr_at

__all__ = [
    # configuration
    "TrainConfig",
    "Optimizer",
    "Schedule",
    "Augment",
    "DEFAULT_LR",
    # data
    "prepare_train_split",
    "CONFUSION_SOURCE",
    "augment_batch",
    "random_crop",
    "random_flip",
    "black_fill",
    # training
    "fit",
    "EpochStats",
    "TrainResult",
    "build_optimizer",
    "evaluate",
    # losses beyond cross-entropy
    "objective",
    "evaluate_loss",
    "resolve_train_loss",
    "lr_at",
    # regulariser
    "fisher_penalty",
    "FisherPenalty",
]
