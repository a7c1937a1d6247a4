"""The prior's centre w₀: the data-independent initial weights of the trained network.

A PAC-Bayes prior must be chosen before seeing the training set (Wu et al. 2020, Theorem F.1;
Dziugaite & Roy 2017 centre it at the random initialisation). ``flatcli train`` records the
initial weights in the checkpoint (key prefix ``flatcli.init.``, or a file beside it that the
record's ``init_weights`` names); ``--prior-init CKPT`` names them explicitly. Anything else
is refused: centring the prior on weights chosen from the data voids the bound.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from flatcli.errors import UsageError
from flatcli.io.checkpoint import INIT_PREFIX, Checkpoint, load_checkpoint, match_state_dict

__all__ = ["NO_PRIOR_MESSAGE", "check_prior_available", "resolve_prior"]

NO_PRIOR_MESSAGE = (
    "{path} records no initial weights, and a PAC-Bayes prior must not be chosen from the "
    "training data (centring it on the trained weights would void the bound); train with "
    "`flatcli train` (it records them) or pass --prior-init CKPT with the network's "
    "initialisation"
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


def resolve_prior(
    model: nn.Module,
    checkpoint: Checkpoint,
    prior_init: str | Path | None = None,
    *,
    unsafe: bool = False,
) -> tuple[dict[str, Tensor], str]:
    """w₀ as a dict keyed like ``model.named_parameters()``, and a description of its source.

    Order: ``prior_init`` (the weights of that checkpoint file), else the initial weights
    recorded inside ``checkpoint``, else the file its record's ``init_weights`` names (beside
    it).

    Raises:
        UsageError: no data-independent w₀ (exit 2), or ``prior_init`` is the trained
            checkpoint itself.
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
    return {k: matched[k].detach() for k in params}, source
