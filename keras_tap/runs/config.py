"""Typed, validated configs for `kt.train` and the `keras-tap` command.

A config is a YAML or JSON mapping with the sections `model`, `teacher`,
`taps`, `compile`, `data`, `fit`, `callbacks`, `run` and `distribution`, and
the key `backend` (see `docs/config.md`). Keras objects in it are
identifiers (`"adam"`, `"mse"`, `"activity_l1"`) or Keras's serialization
form `{"class_name": ..., "config": {...}}`, and each is checked by
deserializing it. YAML is read with `yaml.safe_load`; nothing in a config
is evaluated.

Every problem raises `ConfigError`, a `ValueError` whose message starts with
the key path of the offending value: `taps.early.weight: expected a
non-negative number or a schedule, got -1`. Tap names holding `.` or `/` are
quoted: `taps["resnet50/conv3_block1_out"].weight`.

This module only checks, section by section: key paths and `--set`
overrides are in `keras_tap.runs.keypaths`, the value checks in
`keras_tap.runs.checks`, the `model`/`teacher` sources in
`keras_tap.runs.sources`, the `data` section in `keras_tap.runs.data` and
the `distribution` section in `keras_tap.runs.distribute`;
models are built and trained by `keras_tap.runs.train`.
"""

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from keras_tap.runs import backends, data, sources
from keras_tap.runs.checks import (
    KERAS_FORM,
    KERAS_MODULES,
    boolean,
    check_keys,
    expected,
    field,
    identifier,
    identifiers,
    integer,
    mapping,
    one_of,
    read_section,
    resolve,
    resolve_callback,
    text,
    with_module,
)
from keras_tap.runs.distribute import DistributionConfig
from keras_tap.runs.keypaths import (
    ConfigError,
    apply_override,
    hint,
    key_path,
    message_of,
    parse_key_path,
)
from keras_tap.runs.sources import MODEL_SOURCES, ModelConfig

__all__ = [
    "CallbackConfig",
    "CompileConfig",
    "Config",
    "ConfigError",
    "DistributionConfig",
    "KEYS",
    "FitConfig",
    "MODEL_SOURCES",
    "ModelConfig",
    "RunConfig",
    "SECTIONS",
    "TapConfig",
    "apply_override",
    "check_keys",
    "hint",
    "key_path",
    "load",
    "message_of",
    "parse_key_path",
    "read",
    "resolve",
    "resolve_callback",
    "with_module",
]

SECTIONS = ("model", "teacher", "taps", "compile", "data", "fit")
SECTIONS += ("callbacks", "run", "distribution")
# The top-level keys: the sections, and the Keras backend to run on
# (`keras_tap.runs.backends`).
KEYS = SECTIONS + ("backend",)


# ----------------------------------------------------------------- sections


def _as_dict(section):
    return {
        f.name: getattr(section, f.name) for f in dataclasses.fields(section)
    }


@dataclasses.dataclass(frozen=True)
class TapConfig:
    """One tap: the arguments of `kt.Tap`, as identifiers or dicts."""

    layer: str = field(None, text)
    loss: Any = field(None, identifier("loss"))
    regularizer: Any = field(None, identifier("regularizer"))
    weight: Any = field(1.0)
    target: str = field("data", one_of("data", "predictions"))
    teacher: Any = field(None, text)
    adapter: Any = field(None)
    metrics: Any = field(None, identifiers("metric"))

    to_dict = _as_dict


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    optimizer: Any = field("adam", identifier("optimizer"))
    loss: Any = field(None, identifier("loss"))
    metrics: list = field([], identifiers("metric"))
    jit_compile: Any = field("auto", one_of("auto", True, False))

    to_dict = _as_dict


@dataclasses.dataclass(frozen=True)
class FitConfig:
    epochs: int = field(10, integer(1))
    steps_per_epoch: Any = field(None, integer(1))
    verbose: Any = field("auto", one_of("auto", 0, 1, 2))

    to_dict = _as_dict


@dataclasses.dataclass(frozen=True)
class CallbackConfig:
    class_name: str
    config: dict = dataclasses.field(default_factory=dict)

    to_dict = _as_dict


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = field(None, text)
    seed: int = field(0, integer(0))
    deterministic: bool = field(True, boolean)
    tensorboard: bool = field(True, boolean)
    plots: bool = field(True, boolean)
    keep_checkpoints: int = field(1, integer(1))

    to_dict = _as_dict


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated config: one typed dataclass per section.

    `data` is a `keras_tap.data.DataConfig`. `backend` is `"tensorflow"`,
    `"jax"`, `"torch"` or `None` (whichever backend Keras runs on).
    `to_dict()` is the resolved form (defaults filled in, paths absolute),
    which `load` reads back to an equal `Config`.
    """

    model: ModelConfig
    taps: dict
    data: Any
    run: RunConfig
    teacher: Any = None
    compile: CompileConfig = CompileConfig()
    fit: FitConfig = FitConfig()
    callbacks: tuple = ()
    distribution: DistributionConfig = DistributionConfig()
    backend: Any = None
    source: Any = dataclasses.field(default=None, compare=False)

    def to_dict(self):
        return {
            "model": self.model.to_dict(),
            "teacher": self.teacher.to_dict() if self.teacher else None,
            "taps": {name: tap.to_dict() for name, tap in self.taps.items()},
            "compile": self.compile.to_dict(),
            "data": self.data.to_dict(),
            "fit": self.fit.to_dict(),
            "callbacks": [callback.to_dict() for callback in self.callbacks],
            "run": self.run.to_dict(),
            "distribution": self.distribution.to_dict(),
            "backend": self.backend,
        }

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------ loading


def read(path):
    """Reads a YAML or JSON config file into a dict (safe loader only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"no such file: {str(path)!r}")
    try:
        with open(path, encoding="utf-8") as file:
            raw = yaml.safe_load(file)
    except yaml.YAMLError as error:
        message = f"{str(path)!r} is not valid YAML: {message_of(error)}"
        raise ConfigError("config", message) from None
    if not isinstance(raw, (dict, type(None))):
        raise expected("config", "a mapping of sections", raw)
    return raw or {}


def load(path_or_dict, overrides=(), *, base_dir=None):
    """Reads and validates a config.

    Args:
        path_or_dict: a `.yaml`/`.yml`/`.json` path, a dict or a `Config`.
        overrides: `key.path=value` strings applied before validation, as
            `keras-tap train --set` does (see `apply_override`). Relative
            paths they set are relative to the current directory.
        base_dir: the directory that relative paths written in the config
            are relative to. Defaults to the config file's directory, or
            the current one for a dict. The default `run.dir`,
            `runs/<config file name>`, is in the current directory.

    Returns:
        A `Config`.

    Raises:
        ConfigError: naming the key path of the first problem found.

    Example:

    >>> cfg = load({"model": {"application": {"name": "MobileNetV2",
    ...     "weights": None, "input_shape": [32, 32, 3]}},
    ...     "taps": ["block_1_expand_relu"]})
    >>> cfg.model.kind, list(cfg.taps), cfg.data.value
    ('application', ['block_1_expand_relu'], 'sklearn_digits')
    """
    source = None
    if isinstance(path_or_dict, Config):
        if not overrides and base_dir is None:
            return path_or_dict
        source = path_or_dict.source and Path(path_or_dict.source)
        raw = path_or_dict.to_dict()
    elif isinstance(path_or_dict, dict):
        raw = json.loads(json.dumps(path_or_dict))
    elif isinstance(path_or_dict, (str, os.PathLike)):
        raw = read(path_or_dict)
        source = Path(path_or_dict).resolve()
    else:
        raise expected("config", "a path, dict or Config", path_or_dict)
    overridden = []
    for assignment in overrides or ():
        apply_override(raw, assignment)
        overridden.append(parse_key_path(assignment.partition("=")[0].strip()))
    for parts in overridden:
        _paths_from_cwd(raw, parts)
    base = Path(base_dir or (source.parent if source else Path.cwd())).resolve()
    check_keys(raw, "", KEYS)
    backend = backends.check(raw.get("backend"))
    teacher = raw.get("teacher")
    if teacher is not None:
        teacher = sources.read_model(teacher, "teacher", base)
    taps = _taps(raw.get("taps"), teacher is not None)
    return Config(
        model=sources.read_model(raw.get("model"), "model", base),
        taps=taps,
        teacher=teacher,
        compile=CompileConfig(**_section(CompileConfig, raw, "compile")),
        data=data.DataConfig.from_config(raw.get("data"), taps, base),
        fit=FitConfig(**_section(FitConfig, raw, "fit")),
        callbacks=_callbacks(raw.get("callbacks")),
        run=_run(raw.get("run"), base, source),
        distribution=DistributionConfig.from_config(raw.get("distribution")),
        backend=backend,
        source=str(source) if source else None,
    )


# The keys whose values are paths; `data.y` and `data.targets` only with an
# `npy` source (with `npz` they name arrays).
_PATH_KEYS = (
    ("model", "file"),
    ("model", "python_path"),
    ("teacher", "file"),
    ("teacher", "python_path"),
    ("data", "npz"),
    ("data", "npy"),
    ("data", "directory"),
    ("data", "y"),
    ("data", "targets"),
    ("run", "dir"),
)


def _paths_from_cwd(raw, parts):
    """Makes the relative paths that the override of `parts` set absolute,
    relative to the current directory, as a path typed on a command line
    is."""
    for key in _PATH_KEYS:
        depth = min(len(key), len(parts))
        if tuple(parts[:depth]) != key[:depth]:
            continue
        data = raw.get("data")
        if key[1] in ("y", "targets") and not (
            isinstance(data, dict) and "npy" in data
        ):
            continue
        *steps, last = parts if len(parts) > len(key) else key
        node = raw
        for step in steps:
            if not isinstance(node, (dict, list)):
                break
            node = node.get(step) if isinstance(node, dict) else node[step]
        else:
            if isinstance(node, dict) and last in node:
                node[last] = _absolute(node[last])
            elif isinstance(node, list) and isinstance(last, int):
                node[last] = _absolute(node[last])


def _absolute(value):
    if isinstance(value, list):
        return [_absolute(item) for item in value]
    if isinstance(value, dict):
        return {key: _absolute(item) for key, item in value.items()}
    if isinstance(value, str) and value:
        return str(Path.cwd() / os.path.expanduser(value))
    return value


def _section(cls, raw, name):
    return read_section(cls, raw.get(name), name)


def _taps(raw, has_teacher):
    if isinstance(raw, (str, list)):
        items = [raw] if isinstance(raw, str) else raw
        for i, item in enumerate(items):
            text(item, f"taps[{i}]")
        raw = {item: item for item in items}
    if not isinstance(raw, dict) or not raw:
        what = "a mapping {name: layer path or tap settings}, at least one tap"
        raise expected("taps", what, raw)
    taps = {}
    for name, value in raw.items():
        name = str(name)
        where = key_path("taps", name)
        if name == "predictions":
            raise ConfigError(where, "a tap may not be named 'predictions'")
        value = {"layer": value} if isinstance(value, str) else value or {}
        tap = TapConfig(**read_section(TapConfig, value, where))
        if tap.layer is None:
            tap = dataclasses.replace(tap, layer=name)
        weight = tap.weight
        if isinstance(weight, (str, dict)):
            resolve("schedule", weight, f"{where}.weight")
        elif type(weight) not in (int, float) or not 0 <= weight < math.inf:
            what = "a non-negative number or a schedule"
            raise expected(f"{where}.weight", what, weight)
        adapter = tap.adapter
        if adapter is not None and not (
            isinstance(adapter, dict)
            and isinstance(adapter.get("class_name"), str)
        ):
            raise expected(f"{where}.adapter", "{class_name, config}", adapter)
        if tap.teacher is not None and not has_teacher:
            message = "names a teacher layer, but the config has no teacher"
            raise ConfigError(f"{where}.teacher", message)
        _check_tap(tap, where)
        taps[name] = tap
    return taps


def _callbacks(raw):
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise expected("callbacks", "a list", raw)
    result = []
    for i, item in enumerate(raw):
        where = f"callbacks[{i}]"
        item = {"class_name": item} if isinstance(item, str) else item
        check_keys(item, where, KERAS_FORM)
        config = mapping(item.get("config") or {}, f"{where}.config")
        spec = CallbackConfig(item.get("class_name"), config)
        resolve_callback(spec, where)
        result.append(spec)
    return tuple(result)


def _run(raw, base, source):
    values = read_section(RunConfig, raw, "run")
    directory = values["dir"]
    if directory is None:
        directory = Path.cwd() / "runs" / (source.stem if source else "run")
    else:
        directory = Path(base) / os.path.expanduser(directory)
    values["dir"] = str(Path(directory).resolve())
    return RunConfig(**values)


def _check_tap(tap, where):
    """Lets `kt.Tap` itself check how the tap's settings combine."""
    from keras_tap import Tap

    config = tap.to_dict()
    for key in ("loss", "regularizer"):
        if isinstance(config[key], dict):
            config[key] = with_module(config[key], KERAS_MODULES[key])
    config["adapter"] = None
    try:
        Tap(**config)
    except Exception as error:
        raise ConfigError(where, message_of(error)) from None
