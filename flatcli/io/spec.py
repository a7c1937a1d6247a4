"""Model specs: how to build the ``nn.Module`` whose weights a checkpoint holds.

The README's "Checkpoints and model specs" section documents the forms.

A spec is a zoo name, a YAML file, ``package.module:callable``, ``path/to/file.py:callable`` or
``torchvision:NAME``. Importing a factory runs user code, so :func:`build_model` imports one only
from a spec the user named (``--model``) or placed beside the checkpoint; a factory recorded inside
a checkpoint must be confirmed by naming it with ``--model``. A Hugging Face directory is its own
spec, recorded as the arch ``hf:DIR`` (its ``config.json``; no code from it is run).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from torch import nn

from flatcli.errors import CheckpointError, SpecError, UsageError

_SPEC_KEYS = {"arch", "factory", "kwargs", "input_shape", "dataset"}
HF_PREFIX = "hf:"
"""``arch: hf:DIR``: the architecture of the Hugging Face directory DIR's ``config.json``, with
fresh weights (what a run on such a directory records as its spec; :mod:`flatcli.io.hf`)."""
_FILE_MODULES: dict[tuple[str, int], object] = {}
"""``file.py`` factories imported so far, by (resolved path, modification time): each runs once."""


@dataclass
class ModelSpec:
    """How to build a model: one of ``arch`` (zoo or ``torchvision:NAME``) or ``factory``."""

    arch: str | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    dataset: str | None = None
    base_dir: Path | None = None
    """Folder that a relative ``file.py:callable`` factory is resolved against."""
    trusted: bool = True
    """False for a spec read from inside a checkpoint: its factory is not imported."""
    source: str = "--model"

    def to_dict(self) -> dict:
        """The spec as stored in a checkpoint's ``flatcli.spec`` metadata."""
        out: dict = {}
        if self.arch is not None:
            out["arch"] = self.arch
        if self.factory is not None:
            factory = self.factory
            path, _, fn = factory.rpartition(":")
            if path.endswith(".py") and self.base_dir is not None:
                factory = f"{(self.base_dir / path).resolve()}:{fn}"
            out["factory"] = factory
        out["kwargs"] = dict(self.kwargs)
        if self.input_shape is not None:
            out["input_shape"] = list(self.input_shape)
        if self.dataset is not None:
            out["dataset"] = self.dataset
        return out


def spec_from_dict(data: dict, *, source: str, base_dir: Path | None, trusted: bool) -> ModelSpec:
    """Validate a spec mapping (from YAML or checkpoint metadata) into a :class:`ModelSpec`.

    Raises:
        SpecError: unknown keys, both or neither of ``arch``/``factory``, bad types.
    """
    if not isinstance(data, dict):
        raise SpecError(f"spec {source} must be a mapping with 'arch' or 'factory'; got {data!r}")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise SpecError(
            f"spec {source} has unknown key(s) {unknown}; allowed: {sorted(_SPEC_KEYS)}"
        )
    arch, factory = data.get("arch"), data.get("factory")
    if (arch is None) == (factory is None):
        raise SpecError(f"spec {source} needs exactly one of 'arch' or 'factory'")
    kwargs = data.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SpecError(f"spec {source}: 'kwargs' must be a mapping; got {kwargs!r}")
    shape = data.get("input_shape")
    if shape is not None:
        if not (isinstance(shape, list | tuple) and all(isinstance(s, int) for s in shape)):
            raise SpecError(f"spec {source}: 'input_shape' must be a list of ints; got {shape!r}")
        shape = tuple(shape)
    return ModelSpec(
        arch=arch,
        factory=factory,
        kwargs=kwargs,
        input_shape=shape,
        dataset=data.get("dataset"),
        base_dir=base_dir,
        trusted=trusted,
        source=source,
    )


def parse_model_option(value: str) -> ModelSpec:
    """Interpret ``--model``: YAML, ``torchvision:NAME``, ``file.py:fn``, ``pkg.mod:fn``, zoo name.

    The spec is checked before any work: the zoo or torchvision name must exist, and a factory
    is imported (the user named it) so that a missing file, module or callable is reported now.

    Raises:
        SpecError: an unreadable or invalid YAML spec, or a factory that cannot be imported
            (exit 2).
        UsageError: an unknown zoo or torchvision name (exit 2).
    """
    if value.endswith((".yaml", ".yml")):
        return read_spec_file(Path(value), source=value)
    if value.startswith("torchvision:"):
        spec = ModelSpec(arch=value, source="--model")
    elif ":" in value:
        spec = ModelSpec(factory=value, base_dir=Path.cwd(), source="--model")
    else:
        spec = ModelSpec(arch=value, source="--model")
    check_spec(spec)
    return spec


def check_spec(spec: ModelSpec) -> None:
    """Check, without building anything, that a trusted spec names something that exists.

    A zoo name must be in the zoo, a ``torchvision:NAME`` among torchvision's models, and a
    factory must import and be callable (importing runs the user's module, so only for a
    trusted spec; an untrusted one is left for :func:`build_model` to refuse).

    Raises:
        UsageError: an unknown zoo or torchvision name (exit 2).
        SpecError: a factory file, module or callable that cannot be found (exit 2).
    """
    if spec.arch is not None:
        if spec.arch.startswith("torchvision:"):
            check_torchvision_name(spec.arch.split(":", 1)[1])
        elif spec.arch.startswith(HF_PREFIX):
            _check_hf_directory(spec.arch)
        else:
            check_zoo_name(spec.arch)
    elif spec.factory is not None and spec.trusted:
        _import_factory(spec.factory, spec.base_dir)


def read_spec_file(path: Path, *, source: str | None = None) -> ModelSpec:
    """Read and check a YAML spec file (see :func:`check_spec`).

    A relative factory path is resolved against the file's folder, and so is a ``dataset``
    named by path (``tensors:PATH``, ``imagefolder:PATH``); a dataset path that exists only
    relative to the working directory is still found there.

    Raises:
        SpecError: the file is missing, not YAML, or not a valid spec (exit 2).
        UsageError: an unknown zoo or torchvision name (exit 2).
    """
    from flatcli.data.paths import resolve_dataset

    source = source or str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise SpecError(f"spec file not found: {path}") from e
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"cannot read spec {path}: {str(e).splitlines()[0]}") from e
    spec = spec_from_dict(data, source=source, base_dir=path.parent, trusted=True)
    if spec.dataset is not None:
        spec.dataset = resolve_dataset(spec.dataset, [path.parent], what=str(path))
    check_spec(spec)
    return spec


def check_zoo_name(name: str) -> None:
    """Raise :class:`UsageError` (exit 2), listing the zoo's names, for a name not among them."""
    import model_zoo
    from model_zoo.registry import normalise_name

    if normalise_name(name) not in model_zoo.list_models():
        raise UsageError(
            f"unknown model '{name}'; zoo names: {', '.join(model_zoo.list_models())} "
            "(or give a YAML spec, pkg.module:callable, file.py:callable or torchvision:NAME)"
        )


def resolve_spec(
    checkpoint_path: Path, model_option: ModelSpec | None, stored: dict | None
) -> ModelSpec:
    """The spec for one checkpoint, in the documented order of preference.

    ``--model`` if given, else the spec stored in the checkpoint, else ``<stem>.yaml`` or
    ``model.yaml`` beside the checkpoint. A stored spec that names a factory (user code, which a
    stored spec never runs) gives way to a spec file beside the checkpoint: the user placed it
    there (``flatcli train`` writes ``<stem>.yaml`` for a model from ``file.py:fn``).

    Raises:
        SpecError: no spec can be found for this checkpoint (bad usage, exit 2: the message
            says to pass --model or to put ``<stem>.yaml`` beside the checkpoint).
    """
    if model_option is not None:
        return model_option
    beside = [
        checkpoint_path.parent / name
        for name in (f"{checkpoint_path.stem}.yaml", f"{checkpoint_path.stem}.yml", "model.yaml")
    ]
    if stored is not None:
        spec = spec_from_dict(
            stored, source=f"stored in {checkpoint_path.name}", base_dir=None, trusted=False
        )
        if spec.factory is None:
            return spec
        return next((read_spec_file(c) for c in beside if c.exists()), spec)
    for candidate in beside:
        if candidate.exists():
            return read_spec_file(candidate)
    raise SpecError(
        f"no model spec for {checkpoint_path}: pass --model, or put "
        f"{checkpoint_path.stem}.yaml (or model.yaml) beside the checkpoint"
    )


def fill_data_kwargs(spec: ModelSpec, num_classes: int, input_shape: tuple[int, ...]) -> ModelSpec:
    """A copy of ``spec`` whose zoo or torchvision model takes its data-shaped kwargs from the data.

    Only kwargs the spec leaves unset and the builder accepts are filled: ``num_classes``,
    ``in_channels`` (channels of image inputs), and, for builders that take them, ``input_size``
    (image side) and ``input_shape``. Factories are left alone: their kwargs are the user's.
    """
    if spec.arch is None or spec.arch.startswith(HF_PREFIX):
        return spec
    kwargs = dict(spec.kwargs)
    if spec.arch.startswith("torchvision:"):
        kwargs.setdefault("num_classes", num_classes)
        return replace(spec, kwargs=kwargs)
    import model_zoo

    accepted = model_zoo.model_kwargs(spec.arch)
    fill: dict = {"num_classes": num_classes}
    if len(input_shape) == 3:
        fill["in_channels"] = input_shape[0]
        if input_shape[1] == input_shape[2]:
            fill["input_size"] = input_shape[1]
    if "in_features" not in kwargs:
        fill["input_shape"] = list(input_shape)
    for key, value in fill.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    return replace(spec, kwargs=kwargs)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the module a spec describes (CPU, float32, fresh weights).

    Raises:
        SpecError: the factory cannot be imported or called, or the kwargs do not fit.
        UsageError: unknown zoo name.
    """
    if spec.arch is not None:
        if spec.arch.startswith("torchvision:"):
            return _build_torchvision(spec)
        if spec.arch.startswith(HF_PREFIX):
            from flatcli.io.hf import build_from_config

            return build_from_config(_check_hf_directory(spec.arch))
        check_zoo_name(spec.arch)
        import model_zoo

        return _call(model_zoo.get_model, spec, spec.arch, (spec.arch,))
    assert spec.factory is not None
    if not spec.trusted:
        raise CheckpointError(
            f"the spec {spec.source} names the factory '{spec.factory}', which runs Python code; "
            f"flatcli imports it only when you name it: pass --model {spec.factory}"
        )
    fn = _import_factory(spec.factory, spec.base_dir)
    return _call(fn, spec, spec.factory, ())


def check_torchvision_name(name: str) -> None:
    """Raise :class:`UsageError` (exit 2) for a name not in ``torchvision.models.list_models()``."""
    import torchvision

    if name not in torchvision.models.list_models():
        raise UsageError(
            f"unknown torchvision model '{name}'; see torchvision.models.list_models()"
        )


def _check_hf_directory(arch: str) -> Path:
    """The directory of an ``hf:DIR`` arch; a UsageError (exit 2) unless it holds config.json."""
    from flatcli.io.hf import CONFIG_FILE, is_hf_directory

    directory = Path(arch[len(HF_PREFIX) :]).expanduser()
    if not is_hf_directory(directory):
        raise UsageError(
            f"model '{arch}': {directory} is not a Hugging Face directory (no {CONFIG_FILE})"
        )
    return directory


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    import torchvision

    name = spec.arch.split(":", 1)[1]
    check_torchvision_name(name)
    kwargs = dict(spec.kwargs)
    kwargs.pop("weights", None)  # no downloads: weights always come from the checkpoint
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"torchvision:{name} rejects kwargs {kwargs}: {e}") from e


def _import_factory(factory: str, base_dir: Path | None):
    target, sep, attr = factory.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(
            f"factory '{factory}' must look like pkg.module:callable or file.py:callable"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        if not path.is_file():
            raise SpecError(f"factory file not found: {path} (from '{factory}')")
        key = (str(path.resolve()), path.stat().st_mtime_ns)
        module = _FILE_MODULES.get(key)
        if module is None:
            mod_name = f"flatcli_user_{abs(hash(key[0]))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise SpecError(f"importing {path} failed: {type(e).__name__}: {e}") from e
            _FILE_MODULES[key] = module
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # noqa: BLE001 - ImportError, or any error the module raises
            raise SpecError(f"cannot import module '{target}' (from '{factory}'): {e}") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise SpecError(f"'{attr}' is not a callable in {target} (from '{factory}')")
    return fn


def _call(fn, spec: ModelSpec, what: str, args: tuple) -> nn.Module:
    try:
        model = fn(*args, **spec.kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"cannot build '{what}' with kwargs {spec.kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise SpecError(f"'{what}' returned {type(model).__name__}, not an nn.Module")
    return model
