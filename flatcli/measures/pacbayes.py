r"""Optimised, certified PAC-Bayes bounds (Dziugaite & Roy 2017; Wu et al. 2020, §6 and App. F).

The prior P = N(w₀, λI) is centred on a mean trained by SGD on part of the training set
(data-dependent, the default: Parrado-Hernández et al. 2012; Pérez-Ortiz et al. 2021;
:mod:`flatcli.pacbayes.data_prior`) or on the network's initialisation (data-free). A
Gaussian posterior Q is optimised — ``f-quad`` (Pérez-Ortiz et al. 2021: from the prior's
mean; :mod:`flatcli.pacbayes.fquad`), or Eq. 46 from the trained weights with a covariance
diagonal in the standard basis (``vanilla``) or in each layer's K-FAC eigenbasis
(``approx-hessian`` / ``iterative-hessian``) — and its true error certified on the m examples
the prior never saw (all n for a data-free prior):

1. KL(Q‖P_j) and B_RE(j) of Eq. 45 for the best grid point λ_j = c·exp(−j/b) (the union
   bound over j is what the 2 ln j term pays for);
2. the stochastic network's error ê_n on the m examples from n fresh weight samples, bounded
   above by kl⁻¹(ê_n, ln(2/δ′)/n);
3. bound = kl⁻¹(that, B_RE(j)) (Eq. 43), true with probability ≥ 1 − δ − δ′.

See :mod:`flatcli.pacbayes.bound` for the certificate and :mod:`flatcli.pacbayes.optimize` for
the optimisation.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.configs.pacbayes import PacBayesConfig
from flatcli.distributed import world_size
from flatcli.measures._config import finite_or_none as _finite_or_none
from flatcli.pacbayes.bound import Certificate, best_grid_point, certify
from flatcli.pacbayes.cost import announce_cost
from flatcli.pacbayes.data_prior import (
    indices_sha256,
    prior_start,
    split_indices,
    train_data_prior,
    with_tensors,
)
from flatcli.pacbayes.fquad import optimize_fquad
from flatcli.pacbayes.montecarlo import deterministic_error, snn_errors
from flatcli.pacbayes.optimize import Method, Posterior, optimize_posterior
from flatcli.pacbayes.posterior import Basis, kfac_basis
from flatcli.pacbayes.prior import check_batchnorm, resolve_prior
from flatcli.progress import ProgressFn, no_progress

__all__ = ["PacBayesConfig", "PacBayesResult", "compute_pacbayes", "pacbayes_on_run"]


@dataclass
class PacBayesResult:
    """The certificate, the deterministic errors, and how the posterior was found."""

    certificate: Certificate
    method: str
    train_error: float
    test_error: float | None
    snn_test_error: float | None
    curve: list[dict]
    info: dict = field(default_factory=dict)
    num_examples: int | None = None  # n, the training split (None: the certificate's m)
    prior_examples: int = 0
    posterior_mean_test_error: float | None = None

    def metrics(self) -> dict[str, Any]:
        """The report's flat numbers (keys fixed by flatcli's report contract).

        ``num_train`` is n, the training split's size; ``bound_examples`` is the certificate's
        m (= n for a data-free prior) and ``prior_examples`` the prior's share (0 data-free).
        """
        c = self.certificate
        n = c.num_train if self.num_examples is None else self.num_examples
        return {
            "bound": _finite_or_none(c.bound),
            "kl": _finite_or_none(c.kl),
            "b_re": _finite_or_none(c.b_re),
            "snn_train_error": c.snn_train_error,
            "snn_train_error_upper": c.snn_train_error_upper,
            "snn_test_error": self.snn_test_error,
            "train_error": self.train_error,
            "test_error": self.test_error,
            "prior_variance": c.prior_variance,
            "j": c.j,
            "mc_samples": c.mc_samples,
            "delta": c.delta,
            "delta_prime": c.delta_prime,
            "num_train": n,
            "prior_examples": self.prior_examples,
            "bound_examples": c.num_train,
            "posterior_mean_test_error": self.posterior_mean_test_error,
        }

    def details(self) -> dict[str, Any]:
        """JSON-ready: method, confidence, vacuity, the optimisation curve and provenance."""
        c = self.certificate
        return {
            "method": self.method,
            "confidence": c.confidence,
            "vacuous": c.vacuous,
            "bound_pinsker": c.bound_pinsker,
            "kl_inverse_tolerance": c.tolerance,
            "curve": self.curve,
            **self.info,
        }


def _kfac_subset(x: Tensor, y: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    if x.shape[0] <= n:
        return x, y
    gen = torch.Generator().manual_seed(seed + 0x4B46)
    idx = torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)
    return x[idx], y[idx]


def compute_pacbayes(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior_mean: Mapping[str, Tensor],
    config: PacBayesConfig,
    *,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    bound: tuple[Tensor, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    progress: ProgressFn = no_progress,
) -> PacBayesResult:
    """Optimise a Gaussian posterior and certify its error (Wu et al. 2020, Algorithm 1, Eq. 43).

    Args:
        model: the trained network (eval mode; never mutated): where the Eq. 46 methods start,
            and whose own errors are ``train_error``/``test_error``.
        x, y: the examples the posterior is optimised on (all n training examples).
        prior_mean: w₀, keyed like ``model.named_parameters()``, independent of ``bound``.
        config: see :class:`PacBayesConfig`.
        x_test, y_test: an optional test split for ``test_error`` and ``snn_test_error``.
        bound: the certificate's m examples S (i.i.d., unseen by the prior); default (x, y),
            as for a data-free prior.
        buffers: the buffers every forward of the posterior and the certificate uses (a
            data-dependent prior's BatchNorm statistics); default: ``model``'s.
        progress: ``progress(description, done, total)``.
    """
    method = Method(config.method)
    start = time.perf_counter()
    xs, ys = (x, y) if bound is None else bound
    m = xs.shape[0]
    net = model if buffers is None else with_tensors(model, buffers)
    kx, ky = _kfac_subset(x, y, config.kfac_examples, config.seed)
    shadow: nn.Module | None = None
    basis_seconds = [0.0]

    def basis_fn(mean: Mapping[str, Tensor]) -> Basis:
        nonlocal shadow
        t0 = time.perf_counter()
        if shadow is None:
            shadow = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in shadow.named_parameters():
                if name in mean:
                    p.copy_(mean[name])
        out = kfac_basis(shadow, kx, ky, seed=config.seed)
        basis_seconds[0] += time.perf_counter() - t0
        return out

    if method is Method.F_QUAD:
        net = with_tensors(net, prior_mean)  # parameters outside the posterior: the prior's
        posterior, curve = optimize_fquad(
            net,
            x,
            y,
            prior_mean,
            num_train=m,
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.opt_batch_size,
            sigma0=config.sigma0,
            p_min=config.p_min,
            delta=config.delta,
            b=config.b,
            c=config.c,
            seed=config.seed,
            progress=progress,
        )
    else:
        with torch.enable_grad():
            posterior, curve = optimize_posterior(
                net,
                x,
                y,
                prior_mean,
                method=method,
                epochs=config.epochs,
                lr=config.lr,
                batch_size=config.opt_batch_size,
                schedule=config.schedule,
                delta=config.delta,
                b=config.b,
                c=config.c,
                eta=config.eta,
                rho_init=config.rho_init,
                seed=config.seed,
                basis_fn=None if method is Method.VANILLA else basis_fn,
                compile=config.compile,
                num_train=m,
                progress=progress,
            )
    optimised = time.perf_counter()
    notes = [n for n in (convergence_note(curve),) if n]
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    certificate, mc = _certify(net, posterior, xs, ys, prior_mean, config, progress)
    trained = {k: v.detach() for k, v in model.named_parameters()}
    train_error = deterministic_error(model, trained, x, y)
    with torch.no_grad():
        chance = 1.0 - 1.0 / max(1, model(x[:1]).shape[-1])
    vacuity = vacuity_note(
        certificate, chance, data_dependent=bound is not None, method=method.value
    )
    if vacuity:
        warnings.warn(vacuity, UserWarning, stacklevel=2)
        notes.append(vacuity)
    test_error = snn_test = mean_test = None
    n_test = config.mc_samples if config.test_mc_samples is None else config.test_mc_samples
    if x_test is not None and y_test is not None and x_test.shape[0] > 0:
        test_error = deterministic_error(model, trained, x_test, y_test)
        mean_test = deterministic_error(net, posterior.mean, x_test, y_test)
        if n_test > 0:
            errs = snn_errors(
                net,
                posterior,
                x_test,
                y_test,
                samples=n_test,
                seed=config.seed + 1,
                data_chunk=config.batch_size,
                progress=progress,
                description="MC test",
            )
            snn_test = float(errs.mean())
    j_opt = config.b * math.log(config.c / posterior.prior_variance)
    info = {
        "num_params": posterior.num_params(),
        "chance_error": chance,
        "optimised_prior_variance": posterior.prior_variance,
        "optimised_j": j_opt,
        "mc_train_error_std": mc["std"],
        "test_mc_samples": None if test_error is None else n_test,
        "mean_distance_from_prior": math.sqrt(mc["mean_diff_sq"]),
        "posterior_std_rms": math.sqrt(mc["var_sum"] / max(1, posterior.num_params())),
        "posterior_mean_train_error": deterministic_error(net, posterior.mean, x, y),
        "rotated_layers": sorted(posterior.basis.layers),
        "notes": notes,
        "basis_seconds": basis_seconds[0],
        "optimisation_seconds": optimised - start,
        "certificate_seconds": time.perf_counter() - optimised,
        "bound_statement": (
            f"with probability >= {certificate.confidence:.4g} over the {certificate.num_train} "
            "examples of the bound and the Monte-Carlo weight samples, the stochastic network's "
            f"error is <= {certificate.bound:.6g}"
        ),
    }
    return PacBayesResult(
        certificate=certificate,
        method=method.value,
        train_error=train_error,
        test_error=test_error,
        snn_test_error=snn_test,
        curve=curve,
        info=info,
        num_examples=x.shape[0],
        posterior_mean_test_error=mean_test,
    )


def _certify(
    model: nn.Module,
    posterior: Posterior,
    x: Tensor,
    y: Tensor,
    prior_mean: Mapping[str, Tensor],
    config: PacBayesConfig,
    progress: ProgressFn,
) -> tuple[Certificate, dict]:
    """Best grid point, fresh Monte-Carlo estimate, and the two kl-inverses."""
    m = x.shape[0]
    mds, vs, lvs = posterior.kl_terms(prior_mean)
    j, kl, _ = best_grid_point(
        mds, vs, lvs, posterior.num_params(), m, config.delta, b=config.b, c=config.c
    )
    errs = snn_errors(
        model,
        posterior,
        x,
        y,
        samples=config.mc_samples,
        seed=config.seed,
        data_chunk=config.batch_size,
        progress=progress,
        description="MC train",
    )
    cert = certify(
        kl=kl,
        j=j,
        snn_train_error=float(errs.mean()),
        mc_samples=config.mc_samples,
        num_train=m,
        delta=config.delta,
        delta_prime=config.delta_prime,
        b=config.b,
        c=config.c,
    )
    std = float(errs.std()) if errs.numel() > 1 else 0.0
    return cert, {"std": std, "mean_diff_sq": mds, "var_sum": vs}


def _test_split(run: Any) -> tuple[Tensor | None, Tensor | None]:
    """The run's dataset's test split on the run's device and dtype, unless it is measured."""
    dataset = run.dataset
    if getattr(dataset, "test", None) is None or getattr(run, "split", "train") == "test":
        return None, None
    test = dataset.split("test")
    return test.x.to(device=run.device, dtype=run.dtype), test.y.to(device=run.device)


def pacbayes_on_run(run: Any, config: PacBayesConfig, progress: ProgressFn) -> PacBayesResult:
    """:func:`compute_pacbayes` on a loaded checkpoint (:func:`flatcli.load`).

    Data-dependent prior (the default): :func:`flatcli.pacbayes.data_prior.train_data_prior`
    on a seeded share of the run's examples, from :func:`~flatcli.pacbayes.data_prior.prior_start`;
    the certificate uses only the other examples, and every forward the prior's BatchNorm
    statistics. Data-free: w₀ from ``config.prior_init`` or the initial weights the
    checkpoint records. The test split of the run's dataset (when it has one) gives
    ``test_error``, ``posterior_mean_test_error`` and ``snn_test_error``.

    Raises:
        UsageError: data-free, and the model has BatchNorm running statistics (estimated on
            the certified examples: the bound would not hold) or the prior depends on the data
            (see :func:`flatcli.pacbayes.prior.resolve_prior`); too few examples for the split.
    """
    x_test, y_test = _test_split(run)
    n = run.x.shape[0]
    prior_n = 0
    if config.data_dependent:
        prior_n = int(split_indices(n, config.prior_fraction, config.seed).prior.numel())
    announce_cost(
        run.model,
        run.x,
        prior_examples=prior_n,
        prior_epochs=config.prior_epochs,
        epochs=config.epochs,
        mc_samples=config.mc_samples,
        test_examples=0 if x_test is None else int(x_test.shape[0]),
        test_mc_samples=config.test_mc_samples or 0,
        processes=world_size(),
    )
    if not config.data_dependent:
        check_batchnorm(run.model, Path(run.path).name)
        prior, source = resolve_prior(
            run.model,
            run.checkpoint,
            config.prior_init,
            unsafe=config.unsafe_load,
            data_free=config.prior_is_data_free,
        )
        result = compute_pacbayes(
            run.model, run.x, run.y, prior, config, x_test=x_test, y_test=y_test, progress=progress
        )
        result.info["prior"] = {
            "kind": "data-free",
            "fraction": 0.0,
            "epochs": 0,
            "seed": config.seed,
            "start": source,
            "source": source,
            "prior_examples": 0,
            "bound_examples": n,
            "bound_indices_sha256": indices_sha256(torch.arange(n)),
        }
    else:
        start_net, start = prior_start(
            run.model, run.spec, run.checkpoint, config.prior_start, config.seed
        )
        dp = train_data_prior(
            start_net,
            run.x,
            run.y,
            fraction=config.prior_fraction,
            epochs=config.prior_epochs,
            lr=config.prior_lr,
            batch_size=config.prior_batch_size,
            seed=config.seed,
            start=start,
            progress=progress,
        )
        idx = dp.split.bound.to(run.x.device)
        result = compute_pacbayes(
            run.model,
            run.x,
            run.y,
            dp.mean,
            config,
            x_test=x_test,
            y_test=y_test,
            bound=(run.x[idx], run.y[idx]),
            buffers=dp.buffers,
            progress=progress,
        )
        result.prior_examples = int(dp.split.prior.numel())
        prior_net = with_tensors(run.model, {**dp.buffers, **dp.mean})
        if x_test is not None and y_test is not None and x_test.shape[0] > 0:
            dp.info["prior_test_error"] = deterministic_error(prior_net, dp.mean, x_test, y_test)
        dp.info["distance_to_trained"] = math.sqrt(
            sum(
                float((p.detach().double() - dp.mean[k].double()).square().sum())
                for k, p in run.model.named_parameters()
            )
        )
        result.info["prior"] = dp.info
    result.info["split"] = getattr(run, "split", None)
    for note in _data_notes(run):
        warnings.warn(note, UserWarning, stacklevel=2)
        result.info["notes"].append(note)
    return result


def check_pacbayes(run: Any, config: PacBayesConfig) -> None:
    """Refuse, before any work (exit 2), what cannot give a valid certificate on ``run``.

    Data-free: a model with BatchNorm running statistics (:func:`check_batchnorm`).
    Data-dependent: a split that leaves no prior example or fewer than two bound examples,
    and ``--prior-start recorded`` on a checkpoint that records no initialisation.
    """
    if not config.data_dependent:
        check_batchnorm(run.model, Path(run.path).name)
        return
    split_indices(run.x.shape[0], config.prior_fraction, config.seed)
    if config.prior_start == "recorded":
        resolve_prior(run.model, run.checkpoint)


def convergence_note(curve: list[dict], tolerance: float = 0.02) -> str | None:
    """A warning when the bound's objective still fell over the last tenth of the epochs.

    Compares the mean objective of the last w = max(1, E/10) epochs with that of the w before
    them. A relative drop above ``tolerance`` that also exceeds twice its noise means the
    posterior had not settled, and the certified bound (typically its KL term) would likely
    be tighter with more epochs. The noise is the spread of the epoch-to-epoch changes over the
    second half of the curve (their standard deviation s; a difference of two means of w
    epochs varies by about s/√w): a steady decline has none, an objective that only wobbles
    around its level (one weight sample per step, few steps per epoch) has plenty.
    """
    if len(curve) < 2:
        return None
    values = [float(c["objective"]) for c in curve]
    window = max(1, len(values) // 10)
    last = sum(values[-window:]) / window
    earlier = values[-2 * window : -window] or values[:1]
    before = sum(earlier) / len(earlier)
    drop = (before - last) / abs(before) if before else 0.0
    half = values[len(values) // 2 :]
    steps = [b - a for a, b in zip(half, half[1:], strict=False)]
    if len(steps) >= 2:
        mu = sum(steps) / len(steps)
        spread = math.sqrt(sum((d - mu) ** 2 for d in steps) / (len(steps) - 1))
    else:
        spread = 0.0
    noise = 2.0 * spread / math.sqrt(window) / abs(before) if before else 0.0
    if drop <= max(tolerance, noise):
        return None
    return (
        f"the bound's objective was still falling when the optimisation stopped "
        f"({100 * drop:.0f} % over the last {window} epoch(s), KL {curve[-1]['kl']:.4g}): "
        "more --epochs would likely give a tighter bound"
    )


def vacuity_note(
    certificate: Certificate,
    chance_error: float,
    *,
    data_dependent: bool = False,
    method: str = "f-quad",
) -> str | None:
    """What would make a vacuous bound non-vacuous, or None when the bound says something.

    A bound is vacuous when it is 1 (``Certificate.vacuous``) or no better than guessing: at
    least ``chance_error`` = 1 − 1/K, the error of a uniform guess among K classes (0.5 for two).
    With a data-free prior the KL from the initialisation to the trained weights is large
    against m; what shrinks B_RE is a prior centred nearer them, trained on part of the data
    (data-dependent priors: Dziugaite et al. 2021; Pérez-Ortiz et al. 2021), and a larger m.
    With a data-dependent prior the note names the term that dominates: the stochastic
    network's own error (a better prior: more --prior-epochs or examples) or B_RE (more bound
    examples m, the f-quad posterior that stays near the prior).
    """
    c = certificate
    if not c.vacuous and c.bound < chance_error:
        return None
    what = (
        "is vacuous (1: it says nothing)"
        if c.vacuous
        else f"is no better than guessing (error {chance_error:.3g} among "
        f"{round(1 / (1 - chance_error))} classes)"
    )
    if not data_dependent:
        return (
            f"the bound {c.bound:.4g} {what}: a prior centred on the initialisation is far from "
            f"the trained weights (KL {c.kl:.4g} against m = {c.num_train} examples, B_RE "
            f"{c.b_re:.3g}); what would make it non-vacuous is a data-dependent prior, trained on "
            "part of the training data (--prior data-dependent, the default without --prior-init; "
            "Dziugaite et al. 2021; Pérez-Ortiz et al. 2021) and more training examples m "
            "(B_RE falls like KL/m)"
        )
    near = "a smaller --sigma0" if method == "f-quad" else "--method f-quad"
    if c.snn_train_error >= 0.5 * chance_error:
        cause = (
            f"the stochastic network errs on {c.snn_train_error:.3g} of the bound's examples: "
            "if its labels can be learnt at all, a better prior mean would help (more "
            "--prior-epochs, a larger --prior-fraction, a --prior-lr that trains it) and a "
            f"posterior that stays near it ({near})"
        )
    else:
        cause = (
            f"B_RE {c.b_re:.3g} (KL {c.kl:.4g} against m = {c.num_train} bound examples) "
            "dominates: more bound examples would help (a smaller --prior-fraction, more data)"
            + (
                ""
                if method == "f-quad"
                else ", and a posterior that stays near the prior (--method f-quad)"
            )
        )
    return (
        f"the bound {c.bound:.4g} {what}: {cause}; more --mc-samples shrink the Monte-Carlo "
        f"term ({c.snn_train_error:.3g} -> {c.snn_train_error_upper:.3g} at n = {c.mc_samples})"
    )


def _data_notes(run: Any) -> list[str]:
    """Warnings when the bound's data differ from what the network was trained on."""
    record = getattr(run, "record", None) or {}
    train = record.get("train") or {}
    notes = []
    if getattr(run, "split", "train") == "train" and (
        (train.get("random_labels") or 0) > 0
        or train.get("train_subset")
        or (train.get("confusion_size") or 0) > 0
    ):
        notes.append(
            "the network was trained on a subset, random labels or a confusion set but the bound "
            "is computed on the dataset's train split; --split trained uses its training data"
        )
    return notes


# --- registration (flatcli.measures.registry) -------------------------------------------------
from flatcli.measures import registry as _registry  # noqa: E402 - registers the finished module

_DR = "Dziugaite & Roy 2017"
_WU = "Wu et al. 2020"
_PH = "Parrado-Hernández et al. 2012"
_PO = "Pérez-Ortiz et al. 2021"
_S, _N = _registry.Direction.SHARPER, _registry.Direction.NEUTRAL
_PACBAYES_METRICS = (
    _registry.Metric(
        "bound",
        _S,
        f"{_WU}, Eq. 43 (after {_DR})",
        "certified upper bound on the stochastic network's true error (>= 1: vacuous)",
    ),
    _registry.Metric("kl", _S, f"{_WU}, Eqs. 44-45", "KL(Q‖P_j) of the optimised posterior"),
    _registry.Metric("b_re", _S, f"{_WU}, Eq. 45", "B_RE(j): the right side of the kl bound"),
    _registry.Metric(
        "snn_train_error", _N, f"{_DR}, §3", "Monte-Carlo training error of the stochastic network"
    ),
    _registry.Metric(
        "snn_train_error_upper",
        _N,
        f"{_DR}, §3",
        "kl⁻¹(snn_train_error, ln(2/δ′)/n): its upper bound",
    ),
    _registry.Metric(
        "snn_test_error", _N, f"{_DR}, §3", "Monte-Carlo test error of the stochastic network"
    ),
    _registry.Metric("train_error", _N, f"{_WU}, Eq. 42", "0-1 error of the trained network"),
    _registry.Metric("test_error", _N, f"{_WU}, Eq. 42", "0-1 test error of the trained network"),
    _registry.Metric("prior_variance", _N, f"{_WU}, §F", "λ_j = c·exp(−j/b) of the certificate"),
    _registry.Metric("j", _N, f"{_WU}, Eq. 45", "grid point of the prior variance"),
    _registry.Metric("mc_samples", _N, f"{_DR}, §3", "n, weight samples of the Monte-Carlo step"),
    _registry.Metric("delta", _N, f"{_WU}, Eq. 43", "δ of the PAC-Bayes step"),
    _registry.Metric("delta_prime", _N, f"{_DR}, §3", "δ′ of the Monte-Carlo step"),
    _registry.Metric("num_train", _N, f"{_WU}, Eq. 43", "n, the training split's examples"),
    _registry.Metric(
        "prior_examples",
        _N,
        _PH,
        "examples that trained the data-dependent prior's mean (0: data-free prior)",
    ),
    _registry.Metric(
        "bound_examples", _N, f"{_WU}, Eq. 45", "m: the examples the certificate is computed on"
    ),
    _registry.Metric(
        "posterior_mean_test_error",
        _N,
        _PO,
        "0-1 test error of the posterior's mean (the network the certificate is about)",
    ),
)
_registry.register_measure(
    "pacbayes",
    PacBayesConfig,
    pacbayes_on_run,
    metrics=_PACBAYES_METRICS,
    cost="data-dependent prior: prior-epochs·F·n/B SGD steps; then epochs·n/B "
    "forward+backward passes at one weight sample each (Hessian methods: plus two per-layer "
    "rotations a step and K-FAC factors per basis), then mc-samples·(m + m_test) forwards for "
    "the Monte-Carlo errors",
    check=check_pacbayes,
)
