"""What each process of a test world runs to check that only rank 0 writes files."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from flatcli.cli.app import app


def write_outputs(rank: int, world: int, folder: str) -> None:
    """Run ``spectrum --save-eigenvectors``, ``reparam`` and ``train`` in this process of the
    world, each pointed at a folder or file named after this rank; exit codes in ``codes-r*``."""
    tmp = Path(folder)
    common = ["--model", f"{tmp}/nets.py:make", "--dataset", f"tensors:{tmp}/data.safetensors"]
    runs = {
        "spectrum": [
            "spectrum",
            str(tmp / "m.pt"),
            "--top-k",
            "2",
            "--dtype",
            "float64",
            "--save-eigenvectors",
            str(tmp / f"eig-r{rank}"),
            "-q",
            *common,
        ],
        "reparam": [
            "reparam",
            str(tmp / "m.pt"),
            "--transform",
            "layer-scale",
            "-o",
            str(tmp / f"reparam-r{rank}.safetensors"),
            "-q",
            *common,
        ],
        "train": [
            "train",
            "--model",
            "mlp",
            "--dataset",
            f"tensors:{tmp}/data.safetensors",
            "--epochs",
            "1",
            "-o",
            str(tmp / f"train-r{rank}.safetensors"),
            "--quiet",
            "--device",
            "cpu",
            "--json",
            str(tmp / f"train-r{rank}.json"),
        ],
    }
    codes = []
    for name, args in runs.items():
        res = CliRunner().invoke(app, args)
        codes.append(f"{name}={res.exit_code}")
        if res.exit_code != 0:
            print(name, res.output, repr(res.exception))
    (tmp / f"codes-r{rank}").write_text(" ".join(codes))
