"""Which device a computation runs on: ``auto`` and the names a user can give.

``auto`` picks CUDA when torch sees a CUDA device, else Apple MPS (measuring only: training
keeps to CUDA or the CPU), else the CPU. An explicit name that this machine cannot serve is a
usage error that says what to pass instead.
"""

from __future__ import annotations

import torch

from flatcli.errors import UsageError

__all__ = ["auto_device", "resolve_device"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def auto_device(*, mps: bool = True) -> torch.device:
    """The device ``auto`` names: CUDA if available, else MPS (when ``mps``), else the CPU.

    Args:
        mps: whether Apple MPS may be chosen. Training passes False: ``TrainConfig`` has always
            resolved ``auto`` to CUDA or the CPU (MPS has no float64).
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps and _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (:func:`auto_device`), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a device.

    Raises:
        UsageError: an unknown name, or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return auto_device()
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps; got '{name}'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name} asked for CUDA but torch sees no CUDA device; use --device cpu"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise UsageError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(
            "--device mps asked for Apple MPS, which is not available here; use --device cpu"
        )
    return device
