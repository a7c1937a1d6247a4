"""Learning-rate schedules: a pure function of the epoch, so a test can check every value."""

from __future__ import annotations

import math
from bisect import bisect_right

from flatcli.train.config import Schedule, TrainConfig


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate used throughout the 0-based ``epoch``.

    - ``constant``: ``lr``.
    - ``step``: ``lr * gamma**k`` with k the number of milestones ``<= epoch`` (so
      ``milestones=[100, 150]`` trains epochs 0-99 at ``lr``, 100-149 at ``lr*gamma`` and the
      rest at ``lr*gamma**2``: fisher-gamma Appendix E's "divided by 10 at epoch 100 and 150",
      and ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch).
    - ``cosine``: ``lr * (1 + cos(pi * epoch / epochs)) / 2``, from ``lr`` at epoch 0 towards 0
      (``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch).

    >>> config = TrainConfig(lr=1.0, schedule="step", milestones=[2], gamma=0.5)
    >>> [lr_at(config, e) for e in range(4)]
    [1.0, 1.0, 0.5, 0.5]
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0. Got {epoch}.")
    lr = float(config.lr)  # type: ignore[arg-type]
    if config.schedule is Schedule.STEP:
        return lr * config.gamma ** bisect_right(config.milestones, epoch)
    if config.schedule is Schedule.COSINE:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return lr
