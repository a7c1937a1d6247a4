"""``flatcli landscape``: loss-landscape slices θ* + α d₁ + β d₂ (Li et al. 2018, §3-4)."""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.landscape import LandscapeConfig
from flatcli.errors import UsageError
from flatcli.options import option

COLUMNS = [
    ("center_loss", "L(θ*)"),
    ("min_loss", "min loss"),
    ("max_loss", "max loss"),
    ("basin_width", "basin width"),
    ("num_params", "params"),
]


@dataclass(frozen=True)
class LandscapeFiles:
    """What ``landscape`` writes besides the report, and where it keeps finished grid points."""

    plot: Path | None = option(
        None,
        "--plot",
        "Write a figure (PNG; .pdf/.svg by suffix): a line's loss and accuracy, or a plane's "
        "contours. Needs matplotlib: pip install 'flatcli\\[plot]'.",
    )
    save_directions: Path | None = option(
        None,
        "--save-directions",
        "Write d1 (and d2) to this .safetensors file (keys d1.<name>, d2.<name>).",
    )
    cache_dir: Path | None = option(
        None,
        "--cache-dir",
        "Where finished grid points are kept, so a killed run resumes. Default: "
        "$FLATCLI_CACHE/landscape, else ~/.cache/flatcli/landscape.",
    )
    no_cache: bool = option(False, "--no-cache", "Keep no finished grid points; read none.")

    def cache_root(self) -> Path | None:
        """The folder of the grid cache (None with ``--no-cache``)."""
        if self.no_cache:
            return None
        from flatcli.configs.rank import default_cache_dir

        return self.cache_dir or default_cache_dir().parent / "landscape"

    def check(self, checkpoints: Paths) -> None:
        """Refuse, before any work, files that cannot be written or drawn."""
        from flatcli.io.writable import check_writable

        if self.plot is not None:
            from flatcli.io.plot import plot_format, require_matplotlib

            plot_format(self.plot)
            require_matplotlib()
            check_writable(self.plot, "--plot")
        path = self.save_directions
        if path is not None:
            if path.suffix != ".safetensors":
                raise UsageError(f"--save-directions must end in .safetensors; got {path}")
            if len(checkpoints) != 1 or Path(checkpoints[0]).is_dir():
                raise UsageError("--save-directions writes one file: give one checkpoint file")
            check_writable(path, "--save-directions")


class _Store:
    """The grid's finished blocks in the result cache (:class:`~flatcli.rank.cache.ResultCache`),
    keyed by checkpoint, options, examples, device and dtype."""

    def __init__(self, root: Path, ctx: Any, config: LandscapeConfig) -> None:
        from flatcli.rank.cache import ResultCache, data_fingerprint

        self.cache, self.ctx, self.config = ResultCache(root), ctx, config
        self.data = data_fingerprint(ctx.x, ctx.y, ctx.split)

    def _key(self, key: dict[str, Any]) -> dict[str, Any]:
        config = {**self.config.to_dict(), **key}
        ctx = self.ctx
        sha = ctx.checkpoint.sha256
        return self.cache.key(sha, "landscape", config, self.data, str(ctx.device), ctx.dtype)

    def get(self, key: dict[str, Any]) -> Any:
        return self.cache.get(self._key(key))

    def put(self, key: dict[str, Any], value: Any) -> None:
        self.cache.put(self._key(key), value)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


@command(
    "landscape",
    help="Loss (and accuracy) on a 1-D or 2-D slice θ* + α d₁ + β d₂: filter-normalised random, "
    "Hessian or gradient directions, or the line to another checkpoint (Li et al. 2018).",
)
def landscape(
    checkpoints: Paths, config: LandscapeConfig, files: LandscapeFiles, common: Common
) -> None:
    """Evaluate the slice around every checkpoint."""
    files.check(checkpoints)
    from flatcli import distributed
    from flatcli.cli.render import analyse
    from flatcli.measures.landscape import check_landscape, compute_landscape, save_directions
    from flatcli.measures.registry import BEFORE_WORK, get_measure, reported_keys
    from flatcli.run import Context

    registered = get_measure("landscape")
    root = files.cache_root()

    def measure(ctx: Context) -> Any:
        loss = config.loss or ctx.loss  # --loss, else the record's, else inferred
        cfg = replace(config, seed=ctx.seed, batch_size=ctx.batch_size, loss=loss)
        try:  # refused before any work: exit 2 (registry.check, with --unsafe-load for --to)
            check_landscape(ctx.model, cfg, unsafe=common.unsafe_load, y=ctx.y)
        except UsageError as e:
            setattr(e, BEFORE_WORK, True)
            raise
        store = _Store(root, ctx, cfg) if root is not None else None
        unsafe = common.unsafe_load
        result = compute_landscape(
            ctx.model, ctx.x, ctx.y, cfg, progress=ctx.progress, store=store, unsafe=unsafe
        )
        if files.save_directions is not None:
            if distributed.is_main():
                save_directions(result, files.save_directions)
            result = replace(result, directions_file=str(files.save_directions))
        return result

    def draw(entries: list[dict[str, Any]]) -> None:
        from flatcli.io.plot_landscape import plot_landscape

        plot_landscape(entries, files.plot)

    analyse(
        "landscape",
        checkpoints,
        measure,
        COLUMNS,
        common=common,
        config={**config.to_dict(), **{k: _plain(v) for k, v in vars(files).items()}},
        metrics=reported_keys(registered, config),
        after=draw if files.plot is not None else None,
    )
