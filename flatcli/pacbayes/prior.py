"""A data-free prior's centre w₀: the data-independent initial weights of the trained network.

A PAC-Bayes prior must be chosen before seeing the examples the bound is computed on (Wu et
al. 2020, Theorem F.1; Dziugaite & Roy 2017 centre it at the random initialisation).
``flatcli train`` records the initial weights in the checkpoint (key prefix ``flatcli.init.``,
or a file beside it that the record's ``init_weights`` names); ``--prior-init CKPT`` names them
explicitly. Anything else is refused: centring the prior on weights chosen from the data voids
the bound. So is a ``--prior-init`` checkpoint that was trained, or whose weights are the
certified network's, unless the user says it never saw the data (``--prior-is-data-free``),
and any model with BatchNorm running statistics: they were estimated on the examples the bound
certifies and are neither in the prior nor in the KL. A data-dependent prior
(:mod:`flatcli.pacbayes.data_prior`, ``--prior data-dependent``) recomputes them on its own
examples, outside the bound.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatcli.configs.pacbayes import PacBayesConfig
from flatcli.errors import UsageError
from flatcli.io.checkpoint import INIT_PREFIX, Checkpoint, load_checkpoint, match_state_dict

__all__ = [
    "BATCHNORM_MESSAGE",
    "DATA_FREE_FLAG",
    "NO_PRIOR_MESSAGE",
    "batchnorm_layers",
    "check_batchnorm",
    "check_before_work",
    "check_data_free",
    "check_prior_available",
    "check_prior_init",
    "resolve_prior",
]

NO_PRIOR_MESSAGE = (
    "{path} records no initial weights, and a PAC-Bayes prior must not be chosen from the "
    "training data (centring it on the trained weights would void the bound); train with "
    "`flatcli train` (it records them) or pass --prior-init CKPT with the network's "
    "initialisation"
)

DATA_FREE_FLAG = "--prior-is-data-free"
"""The flag by which the user vouches that a ``--prior-init`` checkpoint never saw the data."""

BATCHNORM_MESSAGE = (
    "{name} has BatchNorm layers with running statistics ({layers}), estimated on the training "
    "examples this bound certifies and counted neither in the prior nor in the KL, so a "
    "data-free certificate for it would not hold; a valid one needs the statistics from "
    "examples outside the bound: use --prior data-dependent (the default without "
    "--prior-init), which recomputes them on the prior's examples"
)

TRAINED_PRIOR_MESSAGE = (
    "--prior-init {prior}: {reason}; a data-free prior must not depend on the training data "
    "(the bound is invalid if the prior saw the examples it certifies): pass the network's "
    "initialisation, or add " + DATA_FREE_FLAG + " if this prior never saw these examples "
    "(e.g. it was trained on other data)"
)


def _recorded_file(path: Path, record: dict | None) -> Path | None:
    value = (record or {}).get("init_weights")
    if not isinstance(value, str) or not value or value.startswith("inline:"):
        return None
    return (path.parent / value).resolve()


def check_prior_available(
    path: str | Path, prior_init: str | Path | None = None, *, unsafe: bool = False
) -> str:
    """Where w₀ for the checkpoint at ``path`` comes from; a UsageError (exit 2) when nowhere.

    Cheap for ``.safetensors`` (reads the header only): the command line calls it for every
    checkpoint before any work, so a missing prior is a usage error, not a failed measurement.
    """
    path = Path(path)
    if prior_init is not None:
        p = Path(prior_init)
        if not p.exists():
            raise UsageError(f"--prior-init {p}: no such file")
        return f"--prior-init {p}"
    if path.suffix.lower() == ".safetensors" and path.exists():
        import json

        from safetensors import safe_open

        from flatcli.io.checkpoint import META_KEY

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                meta_text = (f.metadata() or {}).get(META_KEY)
        except Exception:  # noqa: BLE001 - the loader reports an unreadable file properly later
            return "unknown (unreadable checkpoint)"
        if any(k.startswith(INIT_PREFIX) for k in keys):
            return f"recorded in {path.name} ({INIT_PREFIX}*)"
        try:
            record = json.loads(meta_text) if meta_text else None
        except json.JSONDecodeError:
            record = None
        beside = _recorded_file(path, record)
        if beside is not None and beside.exists():
            return f"recorded beside {path.name}: {beside.name}"
        raise UsageError(NO_PRIOR_MESSAGE.format(path=path))
    if not path.exists():
        return "unknown (missing checkpoint)"
    ckpt = load_checkpoint(path, unsafe=unsafe)
    if ckpt.init_state_dict or _recorded_file(path, ckpt.meta) is not None:
        return f"recorded in {path.name}"
    raise UsageError(NO_PRIOR_MESSAGE.format(path=path))


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules of ``model`` that keep running statistics."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and (m.running_mean is not None or m.running_var is not None)
    ]


def _batchnorm_error(name: str, layers: list[str]) -> UsageError:
    shown = ", ".join(layers[:4]) + (f", … ({len(layers)} in all)" if len(layers) > 4 else "")
    return UsageError(BATCHNORM_MESSAGE.format(name=name, layers=shown))


def check_batchnorm(model: nn.Module, name: str = "the model") -> None:
    """Refuse (UsageError, exit 2) a data-free bound on a model with BatchNorm running statistics.

    They were estimated on the training examples the bound is about, yet are neither part of
    the prior nor of the KL: the certificate would not hold.
    """
    layers = batchnorm_layers(model)
    if layers:
        raise _batchnorm_error(name, layers)


def _built_batchnorm(path: Path, ckpt: Checkpoint, model_option: str | None) -> list[str]:
    """BatchNorm layers of the model the loader would build for ``ckpt``, built on the meta
    device (no memory, no weights); from the state dict's ``running_var`` keys when the model
    cannot be built here (the loader then reports why)."""
    from flatcli.io.spec import build_model, fill_data_kwargs, parse_model_option, resolve_spec

    try:
        spec = resolve_spec(
            path, parse_model_option(model_option) if model_option else None, ckpt.spec
        )
        meta = ckpt.meta or {}
        if meta.get("num_classes") and meta.get("input_shape"):
            spec = fill_data_kwargs(spec, int(meta["num_classes"]), tuple(meta["input_shape"]))
        with torch.device("meta"):
            return batchnorm_layers(build_model(spec))
    except Exception:  # noqa: BLE001 - a spec that cannot be built is the loader's error to report
        return sorted({k.rsplit(".", 1)[0] for k in ckpt.state_dict if k.endswith(".running_var")})


def _trained_reason(prior: Checkpoint) -> str | None:
    """Why the record of checkpoint ``prior`` says it was trained, or None."""
    meta = prior.meta or {}
    results = meta.get("results") if isinstance(meta.get("results"), dict) else {}
    epochs = results.get("epochs")
    if epochs == 0:
        return None
    if any(meta.get(k) for k in ("train", "results", "history", "reparam")):
        what = f"{epochs} epochs" if epochs is not None else "a training run"
        on = f" on {meta['dataset']}" if meta.get("dataset") else ""
        return f"its record says it was trained ({what}{on})"
    return None


def _same_weights(prior: dict[str, Tensor], posterior: dict[str, Tensor]) -> bool:
    """True when every floating-point tensor of ``posterior`` is in ``prior``, equal."""
    keys = [k for k, v in posterior.items() if v.is_floating_point()]
    return bool(keys) and all(
        k in prior
        and prior[k].shape == posterior[k].shape
        and torch.equal(prior[k].to(posterior[k]), posterior[k].detach())
        for k in keys
    )


def check_prior_init(
    posterior: Checkpoint, prior_init: str | Path, *, unsafe: bool = False, data_free: bool = False
) -> None:
    """Refuse (UsageError, exit 2) a ``--prior-init`` checkpoint that depends on the data.

    It depends on the data when it is the certified checkpoint itself (always refused), when
    its record says it was trained (a flatcli training record with more than 0 epochs), or
    when its weights equal the certified network's; ``data_free`` (``--prior-is-data-free``)
    is the user's word that it never saw these examples, and lifts the last two.
    """
    prior = load_checkpoint(prior_init, unsafe=unsafe)
    if posterior.sha256 and prior.sha256 == posterior.sha256:
        raise UsageError(
            f"--prior-init {prior_init} is the trained checkpoint itself: a prior centred on "
            "the trained weights depends on the data and voids the bound"
        )
    if data_free:
        return
    reason = _trained_reason(prior)
    if reason is None and _same_weights(prior.state_dict, posterior.state_dict):
        reason = f"its weights equal those of {Path(posterior.path).name}, the checkpoint certified"
    if reason is not None:
        raise UsageError(TRAINED_PRIOR_MESSAGE.format(prior=prior_init, reason=reason))


def check_data_free(
    path: str | Path,
    prior_init: str | Path | None = None,
    *,
    model: str | None = None,
    unsafe: bool = False,
    data_free: bool = False,
) -> str:
    """Everything a data-free bound on the checkpoint at ``path`` needs, before any work.

    A w₀ (:func:`check_prior_available`); a ``--prior-init`` that did not see the data
    (:func:`check_prior_init`; ``data_free`` is ``--prior-is-data-free``); no BatchNorm running
    statistics in the model (``model`` is ``--model``; built on the meta device). Returns where
    w₀ comes from.

    Raises:
        UsageError: any of them fails (exit 2).
    """
    path = Path(path)
    source = check_prior_available(path, prior_init, unsafe=unsafe)
    try:
        ckpt = load_checkpoint(path, unsafe=unsafe)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is the loader's error to report
        return source
    layers = _built_batchnorm(path, ckpt, model)
    if layers:
        raise _batchnorm_error(path.name, layers)
    if prior_init is not None:
        check_prior_init(ckpt, prior_init, unsafe=unsafe, data_free=data_free)
    return source


def resolve_prior(
    model: nn.Module,
    checkpoint: Checkpoint,
    prior_init: str | Path | None = None,
    *,
    unsafe: bool = False,
    data_free: bool = False,
) -> tuple[dict[str, Tensor], str]:
    """w₀ as a dict keyed like ``model.named_parameters()``, and a description of its source.

    Order: ``prior_init`` (the weights of that checkpoint file), else the initial weights
    recorded inside ``checkpoint``, else the file its record's ``init_weights`` names (beside
    it).

    Raises:
        UsageError: no data-independent w₀ (exit 2), or ``prior_init`` is the trained
            checkpoint itself, was trained or has the trained weights (the last two unless
            ``data_free``, ``--prior-is-data-free``).
        CheckpointError: the w₀ file is unreadable or does not fit the model.
    """
    path = Path(checkpoint.path)
    if prior_init is not None:
        ck = load_checkpoint(prior_init, unsafe=unsafe)
        if checkpoint.sha256 and ck.sha256 == checkpoint.sha256:
            raise UsageError(
                f"--prior-init {prior_init} is the trained checkpoint itself: a prior centred on "
                "the trained weights depends on the data and voids the bound"
            )
        reason = None if data_free else _trained_reason(ck)
        if reason is not None:
            raise UsageError(TRAINED_PRIOR_MESSAGE.format(prior=prior_init, reason=reason))
        state, source = ck.state_dict, f"--prior-init {prior_init}"
    elif checkpoint.init_state_dict:
        state, source = checkpoint.init_state_dict, f"recorded in {path.name}"
    else:
        beside = _recorded_file(path, checkpoint.meta)
        if beside is None:
            raise UsageError(NO_PRIOR_MESSAGE.format(path=path))
        if not beside.exists():
            raise UsageError(
                f"{path.name} names its initial weights {beside.name}, which is missing; put it "
                "back beside the checkpoint or pass --prior-init CKPT"
            )
        state, source = load_checkpoint(beside, unsafe=unsafe).state_dict, f"file {beside.name}"
    params = dict(model.named_parameters())
    # Buffers (e.g. BatchNorm statistics) are not part of the prior: fill only those, so a
    # missing parameter is still an error rather than silently taken from the trained model.
    buffers = {k: v for k, v in model.state_dict().items() if k not in params}
    matched = match_state_dict(model, {**buffers, **state}, source=source)
    prior = {k: matched[k].detach() for k in params}
    if prior_init is not None and not data_free and _same_weights(prior, params):
        reason = f"its weights equal those of {path.name}, the checkpoint certified"
        raise UsageError(TRAINED_PRIOR_MESSAGE.format(prior=prior_init, reason=reason))
    return prior, source


def check_before_work(
    path: str | Path,
    config: PacBayesConfig,
    *,
    model: str | None = None,
    unsafe: bool = False,
) -> None:
    """What ``flatcli pacbayes`` checks for each checkpoint before any work (exit 2).

    Data-free: :func:`check_data_free` (a w₀, a ``--prior-init`` that did not see the data,
    no BatchNorm). Data-dependent: with ``--prior-start recorded``, that the checkpoint records
    its initialisation.
    """
    if not config.data_dependent:
        check_data_free(
            path, config.prior_init, model=model, unsafe=unsafe, data_free=config.prior_is_data_free
        )
    elif config.prior_start == "recorded":
        check_prior_available(path, unsafe=unsafe)
