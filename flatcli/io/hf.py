"""Hugging Face checkpoints: a ``save_pretrained`` directory read as one checkpoint.

A directory holding ``config.json`` is one Hugging Face checkpoint, not a folder of checkpoints.
Its weights are ``model.safetensors`` or ``pytorch_model.bin`` (read with ``weights_only=True``),
or the sharded forms of either (``*.index.json``). :func:`load_pretrained` reads it with
``transformers`` from the local files alone (``local_files_only=True`` with the Hub's offline
mode on: nothing is downloaded, no code from the checkpoint runs) as

- a causal language model when ``config.architectures`` names one (``...ForCausalLM``,
  ``...LMHeadModel``): outputs token logits (N, T, V), default loss ``token-ce``;
- else a sequence classifier (``AutoModelForSequenceClassification``): logits (N, K), default
  loss ``ce``.

The model flatcli measures is the ``transformers`` model itself, in eval mode (dropout off),
with the key-value cache off and a forward hook that returns the output's ``.logits`` tensor
(:func:`logits_only`), so its parameter names are the checkpoint's own
(``transformer.h.0.attn.c_attn.weight``) and every curvature product and
``torch.func.functional_call`` sees a function of the inputs to a tensor. Tied parameters (GPT-2's
``lm_head.weight`` is ``transformer.wte.weight``) are one parameter, counted once, under their
first name. Inputs are token ids (N, T), int64. A causal LM sees no attention mask: its targets are
already the next tokens (``text:`` windows, or a ``tensors:`` file's ``y``), positions that must
not count carry the target -100. A sequence classifier whose config sets ``pad_token_id`` gets
the attention mask ``input_ids != pad_token_id``; without a pad token every position is attended.

A ``text:PATH`` dataset measured on such a directory is tokenised with its ``tokenizer.json``
when it has one (:func:`flatcli.data.text.find_tokenizer`), else as UTF-8 bytes.

Attention runs as ``attn_implementation="sdpa"`` (torch's ``scaled_dot_product_attention``): the
curvature operators fall back to its math kernel when a fused kernel lacks a derivative they need.

The ``transformers`` package is the optional extra ``flatcli[hf]``; without it, reading such a
directory is a usage error (exit 2) that names the extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.errors import CheckpointError, UsageError, listing
from flatcli.io.digest import file_sha256

__all__ = [
    "CONFIG_FILE",
    "WEIGHT_FILES",
    "EXTRA_HINT",
    "HFModel",
    "is_hf_directory",
    "weight_files",
    "check_directory",
    "model_kind",
    "default_loss",
    "import_transformers",
    "load_pretrained",
    "build_from_config",
    "logits_only",
    "directory_sha256",
]

CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files ``save_pretrained`` writes, in order of preference (an index: sharded)."""
EXTRA_HINT = "pip install 'flatcli[hf]' (in a clone of flatcli: pip install -e '.[hf]')"
CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFIER = "sequence-classifier"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass
class HFModel:
    """A Hugging Face directory as flatcli measures it.

    Attributes:
        model: the ``transformers`` model in eval mode whose call returns logits
            (:func:`logits_only`), on the device and in the dtype asked for.
        kind: ``"causal-lm"`` or ``"sequence-classifier"``.
        loss: the default loss of that kind (``token-ce`` or ``ce``).
        state_dict: the weights as read (CPU, the dtype they were stored in).
        architecture: the ``transformers`` class that was built.
        weights: the weight file (or shard index) that was read.
    """

    model: nn.Module
    kind: str
    loss: str
    state_dict: dict[str, Tensor]
    architecture: str
    weights: Path


def is_hf_directory(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding ``config.json``: one Hugging Face checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of ``directory`` that :data:`WEIGHT_FILES` names, in that order."""
    directory = Path(directory)
    return [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]


def check_directory(directory: str | Path) -> None:
    """Check, before any work, that a Hugging Face directory can be read.

    Raises:
        UsageError: no weight file beside ``config.json`` (the message lists the names looked
            for), or ``transformers`` is not installed (the message names the extra).
    """
    directory = Path(directory)
    if not weight_files(directory):
        raise UsageError(
            f"{directory} holds {CONFIG_FILE} but no weights: a Hugging Face checkpoint needs "
            f"{' or '.join(WEIGHT_FILES)} beside it (as save_pretrained writes them)"
        )
    import_transformers(directory)


def model_kind(architectures: list[str] | None) -> str:
    """``"causal-lm"`` when ``config.architectures`` names a causal LM, else
    ``"sequence-classifier"``.

    >>> model_kind(["GPT2LMHeadModel"]), model_kind(["LlamaForCausalLM"])
    ('causal-lm', 'causal-lm')
    >>> model_kind(["BertForSequenceClassification"]), model_kind(None)
    ('sequence-classifier', 'sequence-classifier')
    """
    names = architectures or []
    if any(str(name).endswith(_CAUSAL_SUFFIXES) for name in names):
        return CAUSAL_LM
    return SEQUENCE_CLASSIFIER


def default_loss(kind: str) -> str:
    """The loss a run on a model of ``kind`` takes unless ``--loss`` says otherwise."""
    return "token-ce" if kind == CAUSAL_LM else "ce"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hugging Face Hub's offline mode for the block: no request leaves this process.

    The environment variables are set for the block (so that a first import of
    ``huggingface_hub`` reads them) and ``huggingface_hub``'s own switch is turned on while it
    lasts (an earlier import has read the environment already); both are restored after it.
    """
    saved = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    constants, switch = None, None
    try:
        with contextlib.suppress(ImportError):
            from huggingface_hub import constants

            switch = getattr(constants, "HF_HUB_OFFLINE", None)
            if switch is not None:
                constants.HF_HUB_OFFLINE = True
        yield
    finally:
        if constants is not None and switch is not None:
            constants.HF_HUB_OFFLINE = switch
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def import_transformers(directory: str | Path | None = None) -> Any:
    """The ``transformers`` module, imported offline.

    Raises:
        UsageError: ``transformers`` is not installed; the one-line message names the extra.
    """
    try:
        with _offline():
            import transformers
    except ImportError as e:
        what = (
            f"{directory} is a Hugging Face checkpoint ({CONFIG_FILE}); reading it"
            if (directory is not None)
            else "reading a Hugging Face checkpoint"
        )
        raise UsageError(f"{what} needs transformers: {EXTRA_HINT}") from e
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """``transformers``' logging at errors only and no progress bars, for the block."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _read_config(transformers: Any, directory: Path) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # noqa: BLE001 - unreadable JSON, unknown model_type, custom code
        raise CheckpointError(
            f"cannot read {directory / CONFIG_FILE} with transformers "
            f"{transformers.__version__} ({_first_line(e)}); flatcli reads the architectures "
            "transformers ships and never runs code from a checkpoint"
        ) from e


def _auto_class(transformers: Any, kind: str) -> Any:
    if kind == CAUSAL_LM:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForSequenceClassification


def load_pretrained(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HFModel:
    """Read a ``save_pretrained`` directory from its local files into a model that returns logits.

    Args:
        directory: a directory with ``config.json`` and its weights.
        device: where the model goes.
        dtype: the dtype of its floating-point parameters and buffers (the weights are read
            in their stored dtype first, then cast).

    Returns:
        The :class:`HFModel`: model (eval mode, logits out), kind, default loss and weights.

    Raises:
        UsageError: no weight file, or ``transformers`` missing (exit 2).
        CheckpointError: a config or weights that ``transformers`` cannot read, or weights that
            do not fit the architecture (missing, unexpected or mismatched keys, listed).
    """
    directory = Path(directory)
    check_directory(directory)
    transformers = import_transformers(directory)
    with _offline(), _quiet(transformers):
        config = _read_config(transformers, directory)
        kind = model_kind(getattr(config, "architectures", None))
        auto = _auto_class(transformers, kind)
        try:
            model, info = auto.from_pretrained(
                str(directory),
                config=config,
                local_files_only=True,
                trust_remote_code=False,
                weights_only=True,
                attn_implementation="sdpa",
                output_loading_info=True,
            )
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds for bad weights
            raise CheckpointError(
                f"transformers cannot load {directory} as a "
                f"{kind.replace('-', ' ')} ({_first_line(e)})"
            ) from e
    _check_loading(directory, info, kind, getattr(config, "architectures", None))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    model = logits_only(model, kind)
    model.to(device=device, dtype=dtype)
    return HFModel(
        model=model,
        kind=kind,
        loss=default_loss(kind),
        state_dict=state,
        architecture=type(model).__name__,
        weights=weight_files(directory)[0],
    )


def build_from_config(directory: str | Path) -> nn.Module:
    """The architecture of a Hugging Face directory with fresh weights (CPU, float32), returning
    logits like :func:`load_pretrained`'s model; nothing but ``config.json`` is read.

    Raises:
        UsageError: ``transformers`` missing (exit 2).
        CheckpointError: a config ``transformers`` cannot read or build.
    """
    directory = Path(directory)
    transformers = import_transformers(directory)
    with _offline(), _quiet(transformers):
        config = _read_config(transformers, directory)
        kind = model_kind(getattr(config, "architectures", None))
        config._attn_implementation = "sdpa"
        try:
            model = _auto_class(transformers, kind).from_config(config, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - an architecture this transformers cannot build
            raise CheckpointError(
                f"transformers cannot build the model of {directory / CONFIG_FILE} "
                f"({_first_line(e)})"
            ) from e
    return logits_only(model.float(), kind)


def _check_loading(directory: Path, info: dict, kind: str, architectures: list[str] | None) -> None:
    """Missing, unexpected or mismatched weights are errors that list the keys."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys {listing(sorted(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys {listing(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        shapes = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in info["mismatched_keys"]]
        problems.append(f"shape mismatches {listing(sorted(shapes))}")
    if problems:
        named = ", ".join(map(str, architectures or [])) or "no architecture"
        raise CheckpointError(
            f"the weights of {directory} do not fit a {kind.replace('-', ' ')} "
            f"({'; '.join(problems)}); its config.json names {named}: flatcli reads causal "
            "language models (...ForCausalLM, ...LMHeadModel) and sequence classifiers"
        )


def logits_only(model: nn.Module, kind: str) -> nn.Module:
    """Make ``model`` (a ``transformers`` model) a function of token ids to its logits, in place.

    Eval mode (dropout off) and no key-value cache; a forward hook replaces an output that is
    not a tensor by its ``.logits``. For a sequence classifier whose config sets
    ``pad_token_id``, a forward pre-hook passes the attention mask ``input_ids != pad_token_id``
    (unless the call gives one). The parameters and their names are left as they are.

    Returns:
        ``model`` itself.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    model.eval()
    pad = getattr(config, "pad_token_id", None) if kind == SEQUENCE_CLASSIFIER else None
    if pad is not None:
        model.register_forward_pre_hook(_PadMask(int(pad)), with_kwargs=True)
    model.register_forward_hook(_read_logits)
    return model


class _PadMask:
    """Forward pre-hook: attention mask 1 where the token is not ``pad_token_id``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None or kwargs.get("attention_mask") is not None:
            return None
        return args, {**kwargs, "attention_mask": (ids != self.pad_token_id).long()}


def _read_logits(module: nn.Module, args: tuple, output: Any) -> Tensor:
    """Forward hook: the output's ``.logits`` when the output is not a tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise CheckpointError(
            f"{type(module).__name__} returned {type(output).__name__} without a logits tensor"
        )
    return logits


def directory_sha256(directory: str | Path) -> str:
    """SHA-256 of a Hugging Face directory's config and weights: the digest of the lines
    ``<sha256 of the file>  <name>`` of ``config.json`` and of every file of the weights
    (shards included), sorted by name."""
    directory = Path(directory)
    files = {directory / CONFIG_FILE, *weight_files(directory)}
    for index in [f for f in files if f.name.endswith(".index.json")]:
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the shard index {index} ({e})") from e
        files |= {directory / name for name in shards}
    lines = [f"{file_sha256(f)}  {f.name}\n" for f in sorted(files, key=lambda p: p.name)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
