"""``flatcli train``: train a model and write a self-describing safetensors checkpoint."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import torch
import typer

import flatcli
from flatcli import distributed
from flatcli.cli.errors import handle_errors
from flatcli.cli.output import Output
from flatcli.errors import UsageError
from flatcli.io.checkpoint import save_checkpoint
from flatcli.io.report import build_report, environment_info, result_entry
from flatcli.io.spec import build_model, fill_data_kwargs, parse_model_option

SUMMARY = [
    ("train_acc", "train acc"),
    ("test_acc", "test acc"),
    ("train_loss", "train loss"),
    ("test_loss", "test loss"),
    ("gap_acc", "acc gap"),
    ("epochs", "epochs"),
    ("seconds", "seconds"),
]


def _milestones(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(
            f"--milestones takes comma-separated epochs, e.g. 30,45; got '{text}'"
        ) from None


def register(app: typer.Typer) -> None:
    """Add ``train`` to the app."""

    @app.command(
        "train", help="Train a model and write a .safetensors checkpoint that records everything."
    )
    def train(
        model: Annotated[
            str,
            typer.Option(
                "--model",
                help="Zoo name, YAML spec, pkg.module:callable, file.py:callable or torchvision:NAME.",
            ),
        ],
        output: Annotated[
            Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")
        ],
        dataset: Annotated[
            str | None,
            typer.Option("--dataset", help="Dataset name (mnist5k, fashion-mnist, cifar10, tensors:PATH, ...: the README's Datasets); default: the spec's."),
        ] = None,
        data_dir: Annotated[
            Path | None, typer.Option("--data-dir", help="Where dataset files live.")
        ] = None,
        download: Annotated[
            bool, typer.Option("--download", help="Let torchvision download a missing dataset.")
        ] = False,
        optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adam.")] = "sgd",
        lr: Annotated[
            float | None,
            typer.Option("--lr", help="Learning rate. Default: 0.05 for sgd, 1e-3 for adam."),
        ] = None,
        momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
        nesterov: Annotated[
            bool, typer.Option("--nesterov", help="Nesterov momentum (SGD).")
        ] = False,
        weight_decay: Annotated[
            float, typer.Option("--weight-decay", help="L2 coefficient.")
        ] = 0.0,
        schedule: Annotated[
            str, typer.Option("--schedule", help="constant, step or cosine.")
        ] = "constant",
        milestones: Annotated[
            str | None,
            typer.Option(
                "--milestones",
                help="Epochs where a step schedule multiplies the lr by --lr-gamma, e.g. 30,45.",
            ),
        ] = None,
        lr_gamma: Annotated[
            float, typer.Option("--lr-gamma", help="Factor of a step schedule.")
        ] = 0.1,
        epochs: Annotated[
            int, typer.Option("--epochs", help="Epochs (an upper bound with --target-train-acc).")
        ] = 30,
        batch_size: Annotated[
            int,
            typer.Option(
                "--batch-size", help="Mini-batch size (large values: the large-batch scenario)."
            ),
        ] = 64,
        augment: Annotated[
            str, typer.Option("--augment", help="none, flip, crop1-flip or crop4-flip.")
        ] = "none",
        random_labels: Annotated[
            float,
            typer.Option(
                "--random-labels",
                help="Fraction of training labels replaced at random (fixed by the seed).",
            ),
        ] = 0.0,
        train_subset: Annotated[
            int | None,
            typer.Option("--train-subset", help="Train on N examples of the training split."),
        ] = None,
        confusion_size: Annotated[
            int,
            typer.Option(
                "--confusion-size",
                help="N extra training examples with random labels (Fisher paper, Scenario I).",
            ),
        ] = 0,
        label_smoothing: Annotated[
            float, typer.Option("--label-smoothing", help="Label smoothing ε.")
        ] = 0.0,
        fisher_reg: Annotated[
            bool,
            typer.Option(
                "--fisher-reg", help="Add the Fisher-trace regulariser of Algorithm 1 / Eq. 6."
            ),
        ] = False,
        reg_beta: Annotated[float, typer.Option("--reg-beta", help="β of Eq. 6.")] = 10.0,
        reg_alpha: Annotated[float, typer.Option("--reg-alpha", help="α of Eq. 6.")] = 1e-4,
        reg_subbatches: Annotated[
            int, typer.Option("--reg-subbatches", help="M sub-batches of Eq. 6.")
        ] = 4,
        clip: Annotated[
            float | None, typer.Option("--clip", help="Clip the gradient to this global norm τ.")
        ] = None,
        target_train_acc: Annotated[
            float | None,
            typer.Option(
                "--target-train-acc",
                help="Stop once the training accuracy reaches this (e.g. 1.0).",
            ),
        ] = None,
        seed: Annotated[
            int,
            typer.Option(
                "--seed", help="Seed for initialisation, batches, labels and augmentation."
            ),
        ] = 0,
        device: Annotated[
            str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
        ] = "auto",
        dtype: Annotated[str, typer.Option("--dtype", help="float32 or float64.")] = "float32",
        json_out: Annotated[
            str | None,
            typer.Option("--json", help="Write the summary report to PATH ('-' for stdout)."),
        ] = None,
        quiet: Annotated[
            bool, typer.Option("--quiet", "-q", help="No table, no progress bar.")
        ] = False,
        debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    ) -> None:
        from flatcli.data import load_dataset
        from flatcli.io.load import resolve_device
        from flatcli.train import TrainConfig, black_fill, fit, prepare_train_split

        with handle_errors(debug):
            # Training is not data-parallel: under torchrun every process trains the same seeded
            # model identically on its own device and only rank 0 prints and writes.
            distributed.init(resolve_device(device))
            main = distributed.is_main()
            out = Output(json_out if main else None, quiet or not main)
            if output.suffix.lower() != ".safetensors":
                raise UsageError(f"-o must name a .safetensors file; got {output}")
            out.check()
            spec = parse_model_option(model)
            name = dataset or spec.dataset
            if name is None:
                raise UsageError("no dataset: pass --dataset (e.g. --dataset mnist5k)")
            dev = distributed.device_for(resolve_device(device))
            config = TrainConfig(
                optimizer=optimizer,
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=weight_decay,
                schedule=schedule,
                milestones=_milestones(milestones),
                gamma=lr_gamma,
                epochs=epochs,
                batch_size=batch_size,
                augment=augment,
                random_labels=random_labels,
                train_subset=train_subset,
                confusion_size=confusion_size,
                label_smoothing=label_smoothing,
                fisher_reg=fisher_reg,
                reg_beta=reg_beta,
                reg_alpha=reg_alpha,
                reg_subbatches=reg_subbatches,
                clip=clip,
                seed=seed,
                device=str(dev),
                dtype=dtype,
                target_train_acc=target_train_acc,
            )
            data = load_dataset(name, data_dir=data_dir, download=download)
            spec = fill_data_kwargs(spec, data.num_classes, tuple(data.input_shape))
            torch.manual_seed(seed)
            net = build_model(spec)
            init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            train_split, info = prepare_train_split(data.train, data.num_classes, config, seed)
            start = time.perf_counter()
            with out.progress() as bar:
                task = bar.add_task("training", total=config.epochs) if bar else None

                def on_epoch(stats) -> None:
                    if bar is not None:
                        bar.update(
                            task,
                            completed=stats.epoch,
                            description=(
                                f"epoch {stats.epoch}  loss {stats.train_loss:.4f}  "
                                f"acc {stats.train_acc:.4f}"
                            ),
                        )

                result = fit(
                    net,
                    train_split,
                    data.test,
                    data.num_classes,
                    config,
                    on_epoch=on_epoch,
                    pad_fill=black_fill(data.normalization),
                )
            seconds = time.perf_counter() - start
            summary = {
                "train_loss": result.train_loss,
                "train_acc": result.train_acc,
                "test_loss": result.test_loss,
                "test_acc": result.test_acc,
                "gap_acc": None if result.test_acc is None else result.train_acc - result.test_acc,
                "gap_loss": None
                if result.test_loss is None
                else result.test_loss - result.train_loss,
                "epochs": result.epochs,
                "seconds": round(seconds, 3),
            }
            spec_record = spec.to_dict()
            spec_record.setdefault("dataset", name)
            meta = {
                "flatcli_version": flatcli.__version__,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "torch": torch.__version__,
                "dataset": name,
                "normalization": data.normalization,
                "num_classes": data.num_classes,
                "input_shape": list(data.input_shape),
                "train": config.to_dict(),
                "seed": seed,
                "data_info": info,
                "results": summary,
                "history": [_epoch_dict(s) for s in result.history],
            }
            if not main:
                return
            save_checkpoint(output, net.state_dict(), spec_record, meta, init_state_dict=init_state)
            row = {"checkpoint": output.name, **summary}
            out.table("flatcli train", [("checkpoint", "checkpoint"), *SUMMARY], [row])
            out.message(f"wrote {output}")
            if json_out:
                num_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
                entry = result_entry(
                    str(output),
                    sha256=None,
                    num_params=num_params,
                    metrics=summary,
                    details={"history": meta["history"], "data_info": info},
                    seconds=seconds,
                )
                from flatcli.io.checkpoint import file_sha256

                entry["sha256"] = file_sha256(output)
                report = build_report(
                    "train",
                    {"model": model, "dataset": name, **config.to_dict()},
                    environment_info(dev, dtype),
                    [entry],
                )
                out.report(report)


def _epoch_dict(stats) -> dict:
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    return {k: getattr(stats, k) for k in vars(stats)}
