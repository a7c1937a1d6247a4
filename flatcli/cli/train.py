"""``flatcli train``: train a model and write a self-describing safetensors checkpoint
(:func:`flatcli.training.train_checkpoint`)."""

from flatcli.cli.options import OutputOptions, command
from flatcli.configs.train import TrainConfig, TrainJob

SUMMARY = [
    ("train_acc", "train acc"),
    ("test_acc", "test acc"),
    ("train_loss", "train loss"),
    ("test_loss", "test loss"),
    ("gap_acc", "acc gap"),
    ("test_perplexity", "test ppl"),
    ("epochs", "epochs"),
    ("seconds", "seconds"),
]
"""Summary columns; one whose value the run has not (no accuracy for mse, perplexity only for
token-ce) is left out."""


@command("train", help="Train a model and write a .safetensors checkpoint that records everything.")
def train(job: TrainJob, config: TrainConfig, output: OutputOptions) -> None:
    """Train, write the checkpoint, show its summary."""
    from flatcli import distributed
    from flatcli.cli.output import Output
    from flatcli.io.digest import file_sha256
    from flatcli.io.report import build_report, environment_info, result_entry
    from flatcli.io.writable import check_writable
    from flatcli.run import setup_device
    from flatcli.training import train_checkpoint

    # Training is not data-parallel: under torchrun every process trains the same seeded
    # model identically on its own device and only rank 0 prints and writes.
    device = setup_device(job.device)
    out = Output.of(output)
    model, path = job.check()
    check_writable(path, "-o")  # before the training, not after it
    config.device = str(device)
    with out.progress() as bar:
        task = bar.add_task("training", total=config.epochs) if bar else None

        def on_epoch(stats) -> None:
            if bar is not None:
                acc = "" if stats.train_acc is None else f"  acc {stats.train_acc:.4f}"
                description = f"epoch {stats.epoch}  loss {stats.train_loss:.4f}{acc}"
                bar.update(task, completed=stats.epoch, description=description)

        done = train_checkpoint(job, config, on_epoch=on_epoch, write=distributed.is_main())
    if not distributed.is_main():
        return
    columns = [(k, label) for k, label in SUMMARY if done.summary.get(k) is not None]
    out.table(
        "flatcli train",
        [("checkpoint", "checkpoint"), *columns],
        [{"checkpoint": path.name, **done.summary}],
    )
    out.message(f"wrote {path}")
    if done.spec_file is not None:  # a factory's model: later commands need no --model
        did = f"wrote {done.spec_file}" if done.spec_written else f"kept {done.spec_file}"
        out.message(f"{did} beside it: later commands build the model from it")
    if output.json:
        entry = result_entry(
            str(path),
            sha256=file_sha256(path),
            num_params=done.num_params,
            metrics=done.summary,
            details={
                "history": done.meta["history"],
                "data_info": done.data_info,
                **({"text": done.meta["text"]} if "text" in done.meta else {}),
            },
            seconds=done.seconds,
        )
        report = build_report(
            "train",
            {
                "model": model,
                "dataset": done.dataset,
                "seq_len": done.meta.get("seq_len"),
                **config.to_dict(),
            },
            environment_info(device, config.dtype),
            [entry],
        )
        out.report(report)
