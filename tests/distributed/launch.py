"""Start a small gloo world on 127.0.0.1 with ``torch.multiprocessing`` (spawn) for the tests."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        FLATCLI_DIST_TIMEOUT="60",
    )
    import torch

    torch.set_num_threads(1)
    from flatcli import distributed

    finished = False
    try:
        distributed.init("cpu")
        fn(rank, world, *args)
        finished = True
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        # a process that tears its gloo pairs down while a peer still uses them can abort
        # ("terminate called without an active exception"): finished ranks wait for the rest
        distributed.shutdown(synchronize=finished)


def run_world(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0) -> list[int]:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by gloo; their exit codes.

    A process still alive after ``timeout`` seconds (a hang) is killed and reported as None.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args)) for r in range(world)]
    for p in procs:
        p.start()
    codes = []
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def result_path(folder: Path, name: str, world: int, rank: int) -> Path:
    """Where a worker saves what it measured."""
    return Path(folder) / f"{name}-w{world}-r{rank}.pt"
