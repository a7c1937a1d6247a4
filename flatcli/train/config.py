"""The training configuration: :mod:`flatcli.configs.train`, where ``flatcli train``'s options are
declared (this module keeps the import path of the library's modules and of earlier versions)."""

from flatcli.configs.train import (
    DEFAULT_LR,
    Augment,
    Optimizer,
    Schedule,
    TrainConfig,
    parse_milestones,
)

__all__ = ["Optimizer", "Schedule", "Augment", "DEFAULT_LR", "parse_milestones", "TrainConfig"]
