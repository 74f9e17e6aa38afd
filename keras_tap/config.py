"""Typed, validated configs for `kt.train` and the `keras-tap` command.

A config is a YAML or JSON mapping with the sections `model`, `teacher`,
`taps`, `compile`, `data`, `fit`, `callbacks` and `run` (see the README).
Keras objects in it are identifiers (`"adam"`, `"mse"`, `"activity_l1"`) or
Keras's serialization form `{"class_name": ..., "config": {...}}`, and each
is checked by deserializing it. YAML is read with `yaml.safe_load`; nothing
in a config is evaluated.

Every problem raises `ConfigError`, a `ValueError` whose message starts with
the key path of the offending value: `taps.early.weight: expected a
non-negative number or a schedule, got -1`. Tap names holding `.` or `/` are
quoted: `taps["resnet50/conv3_block1_out"].weight`.

This module only checks: the data section is read by `keras_tap.data`, and
models are built and trained by `keras_tap.training`.
"""

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import keras
import yaml

SECTIONS = ("model", "teacher", "taps", "compile", "data", "fit")
SECTIONS += ("callbacks", "run")
MODEL_SOURCES = ("application", "file", "builder")
KERAS_FORM = ("class_name", "config", "module", "registered_name")
_SOURCES = {
    "model": MODEL_SOURCES,
    "teacher": MODEL_SOURCES,
    "data": ("dataset", "npz", "npy", "directory"),
}
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_TOKEN = re.compile(
    r"""\[\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|(\d+))\s*\]"""
    r"""|(?:^|\.)([A-Za-z0-9_\-@]+)"""
)


class ConfigError(ValueError):
    """A config value is wrong; the message starts with its key path.

    Attributes:
        path: the key path, e.g. `taps.early.weight`.
        message: what was wrong, without the key path.
    """

    def __init__(self, path, message):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


# ---------------------------------------------------------------- key paths


def key_path(*parts, prefix=""):
    """Joins keys and list indices into a key path, quoting odd keys.

    Args:
        *parts: keys (`str`) and list indices (`int`).
        prefix: a key path to extend.

    Example:

    >>> key_path("taps", "a/b", "weight"), key_path(0, prefix="callbacks")
    ('taps["a/b"].weight', 'callbacks[0]')
    """
    text = prefix
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


def parse_key_path(text):
    """Splits a key path such as `taps["a/b"].weight` into its parts."""
    parts, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ConfigError(
                "--set",
                f"cannot parse the key path {text!r} at character {pos + 1}; "
                'expected keys joined by "." and odd names quoted in '
                'brackets: taps["a/b"].weight=0.5',
            )
        double, single, index, name = match.groups()
        if double is not None:
            parts.append(json.loads(f'"{double}"'))
        elif index is not None:
            parts.append(int(index))
        else:
            parts.append(single if single is not None else name)
        pos = match.end()
    if not parts:
        raise ConfigError("--set", "expected key.path=value, got no key path")
    return parts


def apply_override(raw, assignment):
    """Applies one `key.path=value` assignment to a raw config dict.

    The value is parsed with `yaml.safe_load`: `3`, `0.5`, `true`, `[1, 2]`
    and `null` give an int, a float, a bool, a list and `None`. Mappings
    missing on the way are created, and a tap written as a bare layer path
    becomes `{layer: path}`. Modifies and returns `raw`.
    """
    if not isinstance(assignment, str) or "=" not in assignment:
        raise ConfigError(
            "--set", f"expected key.path=value, got {assignment!r} (no '=')"
        )
    text, _, value_text = assignment.partition("=")
    parts = parse_key_path(text.strip())
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as error:
        message = f"cannot parse the --set value: {message_of(error)}"
        raise ConfigError(key_path(*parts), message) from None
    node = raw
    for depth, part in enumerate(parts):
        here = key_path(*parts[: depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                raise ConfigError(here, "no such list item")
        elif not isinstance(node, dict):
            raise ConfigError(here, f"cannot set a key in {_show(node)}")
        if depth == len(parts) - 1:
            if (
                depth == 1
                and value is not None
                and part in _SOURCES.get(parts[0], ())
            ):
                keep = parts[0] == "data"
                for key in list(node):
                    if key != part and (not keep or key in _SOURCES["data"]):
                        del node[key]
            node[part] = value
        elif isinstance(part, str) and node.get(part) is None:
            node[part] = {}
            node = node[part]
        else:
            if (
                parts[0] == "taps"
                and depth == 1
                and isinstance(node[part], str)
            ):
                node[part] = {"layer": node[part]}
            node = node[part]
    return raw


# ------------------------------------------------------------------ checks
# A check is `check(value, where) -> value`, raising `ConfigError`.


def expected(where, what, value):
    return ConfigError(where, f"expected {what}, got {_show(value)}")


def integer(minimum):
    def check(value, where):
        if type(value) is not int or value < minimum:
            raise expected(where, f"an integer >= {minimum}", value)
        return value

    return check


def number(low=None, high=None):
    def check(value, where):
        if (
            type(value) not in (int, float)
            or not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value >= high)
        ):
            if high is not None:
                raise expected(where, f"a number in [{low}, {high})", value)
            raise expected(where, f"a number >= {low}", value)
        return float(value)

    return check


def one_of(*options):
    def check(value, where):
        if not any(value == o and type(value) is type(o) for o in options):
            words = ", ".join(_show(o) for o in options)
            raise expected(where, f"one of {words}", value)
        return value

    return check


def text(value, where):
    if not isinstance(value, str) or not value:
        raise expected(where, "a non-empty string", value)
    return value


def boolean(value, where):
    if not isinstance(value, bool):
        raise expected(where, "true or false", value)
    return value


def mapping(value, where):
    if not isinstance(value, dict):
        raise expected(where, "a mapping", value)
    return dict(value)


def shape(length):
    def check(value, where):
        if (
            not isinstance(value, list)
            or len(value) != length
            or not all(type(v) is int and v > 0 for v in value)
        ):
            raise expected(
                where, f"a list of {length} positive integers", value
            )
        return value

    return check


def identifier(kind):
    def check(value, where):
        resolve(kind, value, where)
        return value

    return check


def identifiers(kind):
    def check(value, where):
        value = [value] if isinstance(value, (str, dict)) else value
        if not isinstance(value, list):
            raise expected(where, f"a list of {kind}s", value)
        for i, item in enumerate(value):
            resolve(kind, item, key_path(i, prefix=where))
        return value

    return check


def field(default, check=None):
    """A dataclass field that `read_section` reads, checked by `check`
    (any value is taken as it is without one)."""
    check = check or (lambda value, where: value)
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default),
            metadata={"check": check},
        )
    return dataclasses.field(default=default, metadata={"check": check})


def read_section(cls, raw, where, extra_keys=()):
    """Checks a raw section against the fields of dataclass `cls`.

    Returns `{field: value}` for every field with a check; a missing or
    `null` value gives the field's default.
    """
    raw = {} if raw is None else raw
    fields = dataclasses.fields(cls)
    check_keys(raw, where, [f.name for f in fields] + list(extra_keys))
    values = {}
    for f in fields:
        check = f.metadata.get("check")
        if check is None:
            continue
        value = raw.get(f.name)
        if value is None:
            has_factory = f.default is dataclasses.MISSING
            value = f.default_factory() if has_factory else f.default
        else:
            value = check(value, key_path(f.name, prefix=where))
        values[f.name] = value
    return values


# ----------------------------------------------------------------- sections


def _as_dict(section):
    return {
        f.name: getattr(section, f.name) for f in dataclasses.fields(section)
    }


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from.

    `kind` is `"application"` (`value` a `keras.applications` name, `kwargs`
    its arguments), `"file"` (`value` an absolute `.keras` path, loaded in
    safe mode), `"builder"` (`value` `"module:function"`, called with
    `kwargs`, imported with `python_path` and the cwd on `sys.path`) or
    `"keras"` (`value` a Keras serialization of a model).
    """

    kind: str
    value: Any
    kwargs: dict = dataclasses.field(default_factory=dict)
    python_path: tuple = ()

    def to_dict(self):
        if self.kind == "application":
            return {"application": {"name": self.value, **self.kwargs}}
        if self.kind == "builder":
            paths = list(self.python_path)
            return {
                "builder": self.value,
                "kwargs": self.kwargs,
                "python_path": paths,
            }
        return {"file": self.value} if self.kind == "file" else self.value


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

    `data` is a `keras_tap.data.DataConfig`. `to_dict()` is the resolved
    form (defaults filled in, paths absolute), which `load` reads back to an
    equal `Config`.
    """

    model: ModelConfig
    taps: dict
    data: Any
    run: RunConfig
    teacher: Any = None
    compile: CompileConfig = CompileConfig()
    fit: FitConfig = FitConfig()
    callbacks: tuple = ()
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
            `keras-tap train --set` does (see `apply_override`).
        base_dir: the directory relative paths are relative to. Defaults to
            the config file's directory, or the current one for a dict.

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
    from keras_tap import data

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
    for assignment in overrides or ():
        apply_override(raw, assignment)
    base = Path(base_dir or (source.parent if source else Path.cwd())).resolve()
    check_keys(raw, "", SECTIONS)
    teacher = raw.get("teacher")
    teacher = (
        None if teacher is None else _model(raw["teacher"], "teacher", base)
    )
    taps = _taps(raw.get("taps"), teacher is not None)
    return Config(
        model=_model(raw.get("model"), "model", base),
        taps=taps,
        teacher=teacher,
        compile=CompileConfig(**_section(CompileConfig, raw, "compile")),
        data=data.DataConfig.from_config(raw.get("data"), taps, base),
        fit=FitConfig(**_section(FitConfig, raw, "fit")),
        callbacks=_callbacks(raw.get("callbacks")),
        run=_run(raw.get("run"), base, source),
        source=str(source) if source else None,
    )


def _section(cls, raw, name):
    return read_section(cls, raw.get(name), name)


def path(value, where, base, *, suffix=None, directory=False):
    """Checks that `value` names an existing file (or directory) relative
    to `base`, and returns its absolute path."""
    if not isinstance(value, str) or not value:
        raise expected(where, "a path", value)
    result = (Path(base) / os.path.expanduser(value)).resolve()
    if not (result.is_dir() if directory else result.is_file()):
        kind = "directory" if directory else "file"
        raise ConfigError(where, f"no such {kind}: {str(result)!r}")
    if suffix and result.suffix.lower() != suffix:
        raise expected(where, f"a {suffix} file", value)
    return str(result)


def _model(raw, where, base):
    if isinstance(raw, dict) and "class_name" in raw:
        check_keys(raw, where, KERAS_FORM)
        mapping(raw.get("config", {}), f"{where}.config")
        return ModelConfig("keras", raw)
    given = [
        key for key in MODEL_SOURCES if isinstance(raw, dict) and key in raw
    ]
    if len(given) != 1:
        if isinstance(raw, dict):
            check_keys(raw, where, MODEL_SOURCES + ("kwargs", "python_path"))
        what = "one of application, file, builder or {class_name, config}"
        raise expected(where, what, raw)
    kind = given[0]
    if kind == "file":
        check_keys(raw, where, ("file",))
        return ModelConfig(
            "file", path(raw["file"], f"{where}.file", base, suffix=".keras")
        )
    if kind == "builder":
        check_keys(raw, where, ("builder", "kwargs", "python_path"))
        spec = raw["builder"]
        if not isinstance(spec, str) or not re.fullmatch(r"[\w.]+:\w+", spec):
            raise expected(f"{where}.builder", "'module:function'", spec)
        kwargs = mapping(raw.get("kwargs") or {}, f"{where}.kwargs")
        dirs = raw.get("python_path") or [str(base)]
        if not isinstance(dirs, list):
            raise expected(
                f"{where}.python_path", "a list of directories", dirs
            )
        dirs = tuple(
            path(d, f"{where}.python_path[{i}]", base, directory=True)
            for i, d in enumerate(dirs)
        )
        return ModelConfig("builder", spec, kwargs, dirs)
    check_keys(raw, where, ("application",))
    where = f"{where}.application"
    app = raw["application"]
    app = {"name": app} if isinstance(app, str) else app
    if not isinstance(app, dict) or not isinstance(app.get("name"), str):
        raise expected(where, "{name: <keras.applications name>, ...}", app)
    kwargs = dict(app)
    name = kwargs.pop("name")
    function = getattr(keras.applications, name, None)
    if not name[:1].isupper() or not callable(function):
        names = [n for n in dir(keras.applications) if n[:1].isupper()]
        message = (
            f"unknown keras.applications model {name!r}{hint(name, names)}"
        )
        raise ConfigError(f"{where}.name", message)
    parameters = inspect.signature(function).parameters
    check_keys(
        kwargs, where, ("name",) + tuple(p for p in parameters if p != "name")
    )
    return ModelConfig("application", name, kwargs)


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


# ------------------------------------------------------- Keras identifiers

_KERAS_MODULES = {
    "loss": keras.losses,
    "regularizer": keras.regularizers,
    "metric": keras.metrics,
    "optimizer": keras.optimizers,
}


def resolve(kind, value, where):
    """Deserializes an identifier or `{class_name, config}` of `kind`.

    `kind` is `"loss"`, `"regularizer"`, `"schedule"` (through `kt.losses`,
    `kt.regularizers`, `kt.schedules`), `"metric"` or `"optimizer"`; a short
    dict without `module` is looked up in the matching `keras` module.
    """
    from keras_tap import losses, regularizers, schedules

    getter = {
        "loss": losses.get,
        "regularizer": regularizers.get,
        "schedule": schedules.get,
        "metric": keras.metrics.get,
        "optimizer": keras.optimizers.get,
    }[kind]
    if isinstance(value, dict):
        value = with_module(value, _KERAS_MODULES.get(kind))
    elif not isinstance(value, str):
        raise expected(
            where, f"a {kind} identifier or {{class_name, config}}", value
        )
    try:
        result = getter(value)
    except Exception as error:
        message = message_of(error)
        name = value.get("class_name") if isinstance(value, dict) else value
        modules = [_KERAS_MODULES.get(kind)]
        modules.append({"loss": losses, "regularizer": regularizers}.get(kind))
        modules.append(schedules if kind == "schedule" else None)
        names = {n for m in modules if m for n in dir(m) if n[:1].isalpha()}
        if kind == "optimizer" and isinstance(value, str):
            names = {n.lower() for n in names if n[:1].isupper()}
        if name not in names and (
            kind in ("optimizer", "metric") or isinstance(value, dict)
        ):
            message = f"unknown {kind} {name!r}{hint(name, sorted(names))}"
        raise ConfigError(where, message) from None
    if result is None:
        raise expected(where, f"a {kind}", value)
    return result


def with_module(value, module):
    """Adds `module` to a short `{class_name, config}` that names a class of
    the Keras `module`, so that Keras's deserializer finds it."""
    name = value.get("class_name")
    if (
        module is None
        or "module" in value
        or not isinstance(name, str)
        or not isinstance(getattr(module, name, None), type)
    ):
        return value
    return {**value, "module": module.__name__}


def resolve_callback(spec, where):
    """Builds a callback: a `keras.callbacks` or `kt.callbacks` class name,
    or a registered `package>Name`, called with `spec.config`."""
    import keras_tap

    candidates = {}
    for module in (keras.callbacks, getattr(keras_tap, "callbacks", None)):
        for attr in dir(module) if module is not None else ():
            obj = getattr(module, attr)
            if isinstance(obj, type) and issubclass(
                obj, keras.callbacks.Callback
            ):
                candidates.setdefault(attr, obj)
    for internal in ("Callback", "CallbackList", "History", "ProgbarLogger"):
        candidates.pop(internal, None)
    name = spec.class_name
    cls = candidates.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str) and ">" in name:
        cls = keras.saving.get_registered_object(name)
    if not (
        isinstance(cls, type) and issubclass(cls, keras.callbacks.Callback)
    ):
        message = f"unknown callback {_show(name)}{hint(name, candidates)}"
        raise ConfigError(f"{where}.class_name", message)
    parameters = inspect.signature(cls).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        check_keys(spec.config, f"{where}.config", list(parameters))
    try:
        return cls(**spec.config)
    except Exception as error:
        raise ConfigError(f"{where}.config", message_of(error)) from None


def _check_tap(tap, where):
    """Lets `kt.Tap` itself check how the tap's settings combine."""
    from keras_tap import Tap

    config = tap.to_dict()
    for key in ("loss", "regularizer"):
        if isinstance(config[key], dict):
            config[key] = with_module(config[key], _KERAS_MODULES[key])
    config["adapter"] = None
    try:
        Tap(**config)
    except Exception as error:
        raise ConfigError(where, message_of(error)) from None


# ------------------------------------------------------------------ helpers


def check_keys(raw, where, allowed):
    """Raises `ConfigError` for the first key of `raw` not in `allowed`."""
    if not isinstance(raw, dict):
        raise expected(where, "a mapping", raw)
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                key_path(str(key), prefix=where),
                f"unknown key{hint(key, allowed)} (expected one of "
                + ", ".join(map(str, allowed))
                + ")",
            )


def hint(name, candidates):
    """`"; did you mean 'x'?"` for the closest candidate, or `""`."""
    close = difflib.get_close_matches(str(name), list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _show(value):
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value, default=lambda v: type(v).__name__)
    return text if len(text) <= 80 else text[:77] + "..."


def message_of(error):
    """One line of an exception's message, without Keras's config dumps."""
    message = " ".join(str(error).split())
    for marker in (" Full object config:", " config={", " Received: config="):
        message = message.split(marker)[0]
    if len(message) > 400:
        message = message[:397] + "..."
    return message or type(error).__name__
