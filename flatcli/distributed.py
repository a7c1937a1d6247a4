"""Running flatcli under ``torchrun``: the process group, data shards and the few collectives.

flatcli uses PyTorch's own ``torch.distributed`` (gloo on CPU, NCCL on CUDA) and nothing else.
Under ``torchrun`` (one node or many; SLURM launches it the same way) every process runs the
same command on the same seeded examples; the curvature operators then split the examples into
contiguous shards (:func:`shard_bounds`, uneven shards allowed), each process sums its shard's
contributions to a product, and ONE all-reduce per product (:func:`all_reduce_sum`, every
tensor of the product flattened into one buffer) completes the sum, which is then divided by
the global example count. A loss normalised by something other than the example count takes
that count from ALL the targets, which every process holds: ``token-ce``'s sample loss (mean
over every counted position, targets != -100) is built by
:func:`flatcli.curvature.losses.sample_loss` from all N sequences, so each sequence's term is
already weighted by N / C with C the counted positions of the whole set, and a shard's sum is
its exact share of the global mean; never an average of per-rank averages, which would weigh
the positions of a rank with fewer counted tokens more. ``mse`` and ``bce`` average over the
outputs of each example, the same on every rank, and then over the global N. Iterative solvers
(Lanczos, Hutch++, stochastic Lanczos quadrature) run replicated on every process with identical
seeds, their start vectors broadcast from rank 0 (:func:`broadcast`). Only rank 0 prints and
writes (:func:`is_main`).

Everything here is a no-op in one process: with no process group (or a world of size 1)
:func:`all_reduce_sum` and :func:`broadcast` return their input, :func:`gather_objects` returns
``[obj]``, :func:`shard_bounds` returns ``(0, n)``.

>>> [shard_bounds(7, rank=r, world=3) for r in range(3)]
[(0, 3), (3, 5), (5, 7)]
>>> examples_per_rank(7, world=3)
[3, 2, 2]
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

from flatcli.devices import auto_device

__all__ = [
    "Launch",
    "CommStats",
    "launch_env",
    "init",
    "shutdown",
    "active",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "device_for",
    "shard_bounds",
    "examples_per_rank",
    "split_items",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast",
    "broadcast_for",
    "gather_objects",
    "agree",
    "local_work",
    "gather_work",
    "PeerError",
    "environment",
    "comm_stats",
    "reset_comm_stats",
]

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective waits for the other processes before it fails (seconds); override
with the environment variable ``FLATCLI_DIST_TIMEOUT``."""

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """What ``torchrun`` put in the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``."""

    rank: int
    world_size: int
    local_rank: int


@dataclass
class CommStats:
    """Communication so far: collectives issued and tensor elements all-reduced or broadcast."""

    collectives: int = 0
    elements: int = 0


_STATS = CommStats()
_OWNED = False  # True when init() created the process group (shutdown() then destroys it)


class PeerError(RuntimeError):
    """Another process of the run failed at a synchronisation point; the message says which.

    ``usage`` is True when the peer's error was a :class:`flatcli.errors.UsageError` (so every
    process can choose the same exit code).
    """

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def launch_env() -> Launch | None:
    """The ``torchrun`` launch read from the environment, or None when not launched by it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return Launch(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def _dist() -> Any:
    import torch.distributed as dist

    return dist


_LOCAL_DEPTH = 0  # > 0 inside local_work(): this process works alone


def active() -> bool:
    """True when a process group with more than one process is initialised (and this process
    is not inside :func:`local_work`)."""
    if _LOCAL_DEPTH:
        return False
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


@contextmanager
def local_work() -> Iterator[None]:
    """Inside the block this process computes alone: operators built there are not
    data-parallel and every collective here is a no-op (for a sweep sharded by checkpoint:
    each process measures its own checkpoints, then the results are gathered)."""
    global _LOCAL_DEPTH
    _LOCAL_DEPTH += 1
    try:
        yield
    finally:
        _LOCAL_DEPTH -= 1


def init(device: torch.device | str | None = None, *, timeout_s: float | None = None) -> bool:
    """Join the ``torchrun`` process group once (idempotent); True when running data-parallel.

    Does nothing (returns False) outside ``torchrun`` or with ``WORLD_SIZE=1``. The backend is
    NCCL when ``device`` is CUDA (None: :func:`flatcli.devices.auto_device`), gloo otherwise;
    with NCCL the process's CUDA device is set to ``cuda:LOCAL_RANK``. A process group someone
    else created is used as it is.
    """
    global _OWNED
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    launch = launch_env()
    if launch is None or launch.world_size <= 1 or not dist.is_available():
        return False
    dev = torch.device(device) if device is not None else auto_device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    timeout = timeout_s or float(os.environ.get("FLATCLI_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    _OWNED = True
    atexit.register(shutdown)
    return launch.world_size > 1


def shutdown(*, synchronize: bool = False) -> None:
    """Destroy the process group if :func:`init` created it (a no-op otherwise).

    ``synchronize``: first wait (at most ``SHUTDOWN_BARRIER_S``) until every process got here,
    so no process tears down its connections while a peer is still using them.
    """
    global _OWNED
    dist = _dist()
    if _OWNED and dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            with contextlib.suppress(Exception):  # a peer that died: just leave
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=timedelta(seconds=SHUTDOWN_BARRIER_S))
                else:
                    dist.barrier()
        dist.destroy_process_group()
    _OWNED = False


SHUTDOWN_BARRIER_S = 60.0
"""How long a finishing process waits for its peers before it leaves the process group."""


def _joined() -> bool:
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank (0 in one process; the launch rank inside :func:`local_work` too)."""
    return _dist().get_rank() if _joined() else 0


def world_size() -> int:
    """The number of processes (1 without a process group; the launch's inside
    :func:`local_work` too)."""
    return _dist().get_world_size() if _joined() else 1


def local_rank() -> int:
    """The rank on this node (``LOCAL_RANK``; 0 outside ``torchrun``)."""
    launch = launch_env()
    return launch.local_rank if launch is not None else 0


def is_main() -> bool:
    """True on rank 0, the only process that prints and writes."""
    return rank() == 0


def device_for(device: torch.device | str) -> torch.device:
    """``device`` as this process should use it: ``cuda`` becomes ``cuda:LOCAL_RANK`` under
    ``torchrun`` (an explicit index is kept); any other device is returned unchanged."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and launch_env() is not None:
        return torch.device("cuda", local_rank())
    return dev


def shard_bounds(n: int, *, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous shard ``start:stop`` of ``n`` items that ``rank`` of ``world`` owns.

    The first ``n % world`` ranks get one item more; with ``n < world`` the last ranks get
    none. Defaults: this process and the current world (``(0, n)`` in one process).
    """
    w = (world_size() if active() else 1) if world is None else int(world)
    r = (_this_rank() if active() else 0) if rank is None else int(rank)
    base, extra = divmod(int(n), w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def _this_rank() -> int:
    return rank()


def examples_per_rank(n: int, *, world: int | None = None) -> list[int]:
    """How many of ``n`` examples each rank holds (:func:`shard_bounds`), in rank order."""
    w = (world_size() if active() else 1) if world is None else int(world)
    return [b - a for a, b in (shard_bounds(n, rank=r, world=w) for r in range(w))]


def split_items(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of ``items`` (checkpoints of a sweep, gamma's trials)."""
    a, b = shard_bounds(len(items), rank=rank(), world=world_size())
    return list(items[a:b])


def _comm_device(t: Tensor) -> torch.device:
    """Where a collective's buffer must live: CUDA for NCCL, the CPU for gloo."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Any:
    """Sum every tensor over all processes in ONE collective per dtype; returns the same shape.

    The tensors are flattened into one buffer (per dtype), all-reduced and split back, so a
    curvature product of many parameter tensors costs one all-reduce. A mapping comes back as a
    dict with the same keys, a sequence as a list. In one process the input is returned.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(enumerate(tensors))
    if not active() or not items:
        return dict(items) if isinstance(tensors, Mapping) else [t for _, t in items]
    dist = _dist()
    out: dict[Any, Tensor] = {}
    by_dtype: dict[torch.dtype, list[tuple[Any, Tensor]]] = {}
    for key, t in items:
        by_dtype.setdefault(t.dtype, []).append((key, t))
    for group in by_dtype.values():
        comm = _comm_device(group[0][1])
        buf = torch.cat([t.reshape(-1).to(comm) for _, t in group])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        _STATS.collectives += 1
        _STATS.elements += buf.numel()
        offset = 0
        for key, t in group:
            out[key] = buf[offset : offset + t.numel()].view(t.shape).to(t.device)
            offset += t.numel()
    if isinstance(tensors, Mapping):
        return {key: out[key] for key, _ in items}
    return [out[key] for key, _ in items]


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over all processes (``value`` itself in one process)."""
    if not active():
        return float(value)
    dist = _dist()
    t = torch.tensor([float(value)], dtype=torch.float64)
    t = t.to(_comm_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    _STATS.collectives += 1
    return float(t.item())


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """``t`` as rank ``src`` holds it, on every process (same device and dtype as ``t``).

    Used for the start vectors of replicated solvers: every process draws them from the same
    seed already, the broadcast makes sure they agree bit for bit.
    """
    if not active():
        return t
    dist = _dist()
    buf = t.detach().contiguous().to(_comm_device(t), copy=True)
    dist.broadcast(buf, src=src)
    _STATS.collectives += 1
    _STATS.elements += buf.numel()
    return buf.to(t.device)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process (``[obj]`` alone)."""
    if not active():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    _STATS.collectives += 1
    return out


def agree(error: BaseException | None, what: str = "") -> None:
    """A synchronisation point: raise on every process if any process reached it with an error.

    Each process passes the exception it caught (or None). The process that failed re-raises
    its own exception; the others raise :class:`PeerError` naming the failed rank and its
    message, so no process goes on to a collective that a failed peer will never join (which
    would hang). A no-op in one process (the caller re-raises its own error itself).
    """
    if not active():
        if error is not None:
            raise error
        return
    from flatcli.errors import UsageError

    report = None
    if error is not None:
        usage = isinstance(error, UsageError) or bool(getattr(error, "usage", False))
        report = (f"{type(error).__name__}: {error}", usage)
    reports = gather_objects(report)
    if error is not None:
        raise error
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if failed:
        r, (msg, usage) = failed[0]
        where = f" while {what}" if what else ""
        raise PeerError(f"rank {r} of {len(reports)} failed{where}: {msg}", usage=usage)


def gather_work(work: Callable[[], T], what: str = "") -> list[T]:
    """Run ``work()`` here and gather every process's result, in rank order, on every process.

    If ``work`` raises on any process, every process raises (its own error, or
    :class:`PeerError` on the others) instead of returning, so the processes stay in step: a
    failed share never leaves the others waiting in a collective of a different kind. In one
    process: ``[work()]``.
    """
    if not active():
        return [work()]
    from flatcli.errors import UsageError

    value, error, report = None, None, None
    try:
        value = work()
    except Exception as e:  # noqa: BLE001 - shared with the peers below, then re-raised
        error = e
        usage = isinstance(e, UsageError) or bool(getattr(e, "usage", False))
        report = (f"{type(e).__name__}: {e}", usage)
    outcomes = gather_objects((report, value))
    if error is not None:
        raise error
    for r, (rep, _) in enumerate(outcomes):
        if rep is not None:
            where = f" while {what}" if what else ""
            raise PeerError(f"rank {r} of {len(outcomes)} failed{where}: {rep[0]}", usage=rep[1])
    return [v for _, v in outcomes]


def environment(num_examples: int | None = None) -> dict[str, Any]:
    """The report ``environment`` fields of the launch: ``world_size`` and, for a data-parallel
    run over ``num_examples`` examples, ``examples_per_rank``."""
    env: dict[str, Any] = {"world_size": world_size()}
    if num_examples is not None and active():
        env["examples_per_rank"] = examples_per_rank(num_examples)
    return env


def comm_stats() -> CommStats:
    """A copy of the communication counters of this process."""
    return CommStats(_STATS.collectives, _STATS.elements)


def reset_comm_stats() -> None:
    """Zero the communication counters."""
    _STATS.collectives = 0
    _STATS.elements = 0


def broadcast_for(op: Any, t: Tensor) -> Tensor:
    """``t`` broadcast from rank 0 when ``op`` is a data-parallel operator, else ``t`` itself.

    The start and probe vectors of the replicated solvers (Lanczos, Hutch++, Hutchinson,
    stochastic Lanczos quadrature) pass through here: drawn from the same seed on every
    process, broadcast as cheap insurance that every process multiplies the same vectors.
    A solver run on one process alone (a dense or non-distributed operator) is left alone.
    """
    if getattr(op, "data_parallel", False):
        return broadcast(t)
    return t
