"""The curvature core: matrix-free operators and the estimators built on them.

Every curvature measure in flatcli is composed from these pieces, each written once:

- operators: Hessian, generalized Gauss-Newton and Fisher products of the mean loss (the base
  class and factory in ``operators``, each kind in ``hessian`` / ``gauss_newton``; importing
  this package registers every kind with the factory);
- lanczos / trace / density: eigenvalues, trace (Hutchinson, Hutch++) and spectral density
  of any :class:`LinearOperator`;
- gram: per-example-gradient Gram matrices (ghost or materialised);
- diagonal: Hessian / GGN diagonals;
- kfac: Kronecker factors E[M] and E[xx^T] of each layer's Hessian block (Wu et al. 2020).
"""

from flatcli.curvature.density import Density, spectral_density
from flatcli.curvature.diagonal import curvature_diagonal, ggn_diagonal
from flatcli.curvature.gauss_newton import FisherOperator, GGNOperator
from flatcli.curvature.gram import gram_spectrum, per_example_gram, per_example_sq_norms
from flatcli.curvature.hessian import HessianOperator
from flatcli.curvature.kfac import LayerFactors, kfac_factors
from flatcli.curvature.lanczos import EigenResult, lanczos
from flatcli.curvature.linop import DenseOperator, LinearOperator, to_dense
from flatcli.curvature.losses import (
    binary_cross_entropy,
    check_targets,
    class_residuals,
    cross_entropy,
    get_loss,
    infer_loss,
    mean_squared_error,
    normalized_cross_entropy,
    output_hessian,
    output_hessian_factor,
    output_hessian_sqrt,
    sample_loss,
    token_cross_entropy,
)
from flatcli.curvature.memory import auto_batch_size, estimate_memory
from flatcli.curvature.operators import CurvatureOperator, eval_mode, make_operator
from flatcli.curvature.params import select_parameters
from flatcli.curvature.trace import TraceEstimate, hutchinson, hutchinson_diagonal, hutchpp

__all__ = [
    # operators
    "make_operator",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "eval_mode",
    "select_parameters",
    "LinearOperator",
    "DenseOperator",
    "to_dense",
    # loss heads
    "cross_entropy",
    "normalized_cross_entropy",
    "token_cross_entropy",
    "mean_squared_error",
    "binary_cross_entropy",
    "get_loss",
    "sample_loss",
    "infer_loss",
    "check_targets",
    "class_residuals",
    "output_hessian",
    "output_hessian_sqrt",
    "output_hessian_factor",
    # spectra
    "lanczos",
    "EigenResult",
    "spectral_density",
    "Density",
    # traces and diagonals
    "hutchinson",
    "hutchpp",
    "hutchinson_diagonal",
    "TraceEstimate",
    "curvature_diagonal",
    "ggn_diagonal",
    # per-example Gram
    "per_example_gram",
    "per_example_sq_norms",
    "gram_spectrum",
    # memory
    "estimate_memory",
    "auto_batch_size",
    # Kronecker factors
    "kfac_factors",
    "LayerFactors",
]
