"""``KfacConfig``: the options of the K-FAC analysis (:func:`flatcli.measures.kfac.compute_kfac`)
and how E[M] is formed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from flatcli.configs._checks import require
from flatcli.configs.choices import LossName
from flatcli.errors import UsageError, choice
from flatcli.options import choices, option

__all__ = ["FisherMode", "KfacConfig"]


FisherMode = choices(
    "FisherMode",
    "exact mc",
    "How E[M] is formed: ``exact`` (all c rows of Q) or ``mc`` (sampled labels).",
)


@dataclass(frozen=True)
class KfacConfig:
    """What :func:`flatcli.measures.kfac.compute_kfac` computes.

    Attributes:
        layers: module names or globs of the Linear/Conv2d layers (None: all of them).
        top_k: K, the eigenpairs of each exact block (Lanczos) and of the Kronecker product.
        fisher: ``"exact"`` (E[M] from all c rows of Q) or ``"mc"`` (sampled labels; loss ce).
        loss: ``ce``, ``mse``, ``bce`` or ``token-ce`` (E[M] from the closed-form output
            Hessian; ``nsce`` has none and is refused); None: the run's, else inferred.
        mc_samples: labels per example for ``"mc"``.
        matrix: the exact block's matrix, ``"hessian"`` (default) or ``"ggn"``.
        tol: Lanczos residual tolerance relative to |λ_max|.
        lanczos_steps: Lanczos budget per block (default ``min(dim, max(3K + 20, 60))``).
        probes: Rademacher probes of the decoupling error (each one block product).
        corr_rows: factor eigenvectors shown in each correspondence matrix.
        compare: a second checkpoint (path) to compare each layer's top eigenspace with.
        seed: seeds Lanczos, the probes and the MC labels.
        batch_size: examples per forward/backward (None: chosen to fit memory).
    """

    layers: tuple[str, ...] | None = option(
        None,
        "--layer",
        "Linear/Conv2d module name or glob to analyse. Repeatable.",
        repeatable=True,
    )
    top_k: int = option(
        10, "--top-k", "K: eigenpairs of each exact block and overlaps k = 1..K.", min=1
    )
    fisher: str = option(
        "exact",
        "--fisher",
        "E[M]: exact (all c rows of the output-Hessian root) or mc (sampled).",
        choices=FisherMode,
    )
    mc_samples: int = option(
        1, "--mc-samples", "Sampled labels per example with --fisher mc.", min=1
    )
    matrix: str = option("hessian", "--matrix", "Exact block of the hessian (default) or the ggn.")
    tol: float = option(1e-4, "--tol", "Lanczos tolerance, relative to |λ_max|.")
    lanczos_steps: int | None = option(
        None, "--lanczos-steps", "Lanczos budget per layer (default 3K + 20).", min=1
    )
    probes: int = option(
        10, "--probes", "Rademacher probes of the decoupling error (per layer).", min=2
    )
    corr_rows: int = option(
        20, "--corr-rows", "Factor eigenvectors in each correspondence matrix.", min=1
    )
    compare: str | None = option(
        None,
        "--compare",
        "A second checkpoint: per layer, the overlap of the two top-k eigenspaces (Fig. 5 "
        "of Wu et al. 2020) on the same examples.",
    )
    seed: int = 0
    batch_size: int | None = None
    loss: str | None = None  # not a flag: the common --loss (None: the run's, else inferred)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "fisher", choice(FisherMode, self.fisher, "fisher"))
        if self.loss is not None:
            set_(self, "loss", choice(LossName, self.loss, "loss"))
        if self.matrix not in ("hessian", "ggn"):
            raise UsageError(f"Unknown matrix {self.matrix!r}; choose one of 'hessian', 'ggn'.")
        if isinstance(self.layers, str):
            set_(self, "layers", (self.layers,))
        elif self.layers is not None:
            set_(self, "layers", tuple(self.layers))
        if self.compare is not None:
            set_(self, "compare", str(self.compare))
        require(
            [
                (self.top_k >= 1, f"top_k must be >= 1. Got {self.top_k}."),
                (self.mc_samples >= 1, f"mc_samples must be >= 1. Got {self.mc_samples}."),
                (0 < self.tol < 1, f"tol must be in (0, 1). Got {self.tol}."),
                (
                    self.lanczos_steps is None or self.lanczos_steps >= self.top_k,
                    f"lanczos_steps must be >= top_k. Got {self.lanczos_steps}.",
                ),
                (self.probes >= 2, f"probes must be >= 2. Got {self.probes}."),
                (self.corr_rows >= 1, f"corr_rows must be >= 1. Got {self.corr_rows}."),
                (
                    self.batch_size is None or self.batch_size >= 1,
                    f"batch_size must be >= 1. Got {self.batch_size}.",
                ),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready."""
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d
