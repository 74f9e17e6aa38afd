"""Checks of config values, and Keras identifiers resolved from them.

A check is `check(value, where) -> value`: it returns the value (perhaps
converted) or raises `ConfigError` at the key path `where`. `field(default,
check)` attaches a check to a dataclass field, and `read_section` checks a
raw config section against such a dataclass. `resolve` turns an identifier
(`"adam"`) or a Keras serialization (`{class_name, config}`) into the Keras
object, and `resolve_callback` builds a callback.
"""

import dataclasses
import difflib
import inspect
import math
import os
import re
from pathlib import Path

import keras

from keras_tap.runs.keypaths import (
    ConfigError,
    hint,
    key_path,
    message_of,
    show,
)
from keras_tap.training.arguments import same_form

KERAS_FORM = ("class_name", "config", "module", "registered_name")


def expected(where, what, value):
    """The `ConfigError` "expected <what>, got <value>" at `where`."""
    return ConfigError(where, f"expected {what}, got {show(value)}")


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
            words = ", ".join(show(o) for o in options)
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


# ------------------------------------------------------------- sections


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


# ------------------------------------------------------- Keras identifiers

KERAS_MODULES = {
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
    from keras_tap.training import losses, regularizers, schedules

    getter = {
        "loss": losses.get,
        "regularizer": regularizers.get,
        "schedule": schedules.get,
        "metric": keras.metrics.get,
        "optimizer": keras.optimizers.get,
    }[kind]
    if isinstance(value, dict):
        value = with_module(value, KERAS_MODULES.get(kind))
    elif not isinstance(value, str):
        raise expected(
            where, f"a {kind} identifier or {{class_name, config}}", value
        )
    # Read before `getter`: Keras's deserializers may edit the dict (an
    # optimizer's `class_name` is lower-cased in place).
    name = value.get("class_name") if isinstance(value, dict) else value
    config = value.get("config") if isinstance(value, dict) else None
    try:
        result = getter(json_copy(value))
    except Exception as error:
        message = message_of(error)
        modules = [KERAS_MODULES.get(kind)]
        modules.append({"loss": losses, "regularizer": regularizers}.get(kind))
        modules.append(schedules if kind == "schedule" else None)
        if isinstance(name, str) and isinstance(config, dict):
            cls = next(
                (getattr(m, name) for m in modules if m and hasattr(m, name)),
                None,
            ) or keras.saving.get_registered_object(name)
            check_arguments(cls, config, f"{where}.config")
        names = known_names(kind, [m for m in modules if m])
        if name not in names and (
            kind in ("optimizer", "metric") or isinstance(value, dict)
        ):
            message = f"unknown {kind} {name!r}{name_hint(name, names)}"
        if kind == "schedule" and isinstance(value, str):
            message = _schedule_name_message(value, names)
        raise ConfigError(where, message) from None
    if result is None:
        raise expected(where, f"a {kind}", value)
    return result


def _schedule_name_message(name, names):
    """The message for a schedule written as a name (`kt.schedules.get`
    takes no names: every schedule has arguments), with the closest class
    in the `{class_name: ...}` form; a lower-case name is matched against
    the snake-case forms (`cosine_decayy` -> `CosineDecay`)."""
    classes = sorted(n for n in names if n[:1].isupper() and n != "Schedule")
    if name == name.lower():
        by_form = {_snake_case(n): n for n in classes}
    else:
        by_form = {n: n for n in classes}
    close = difflib.get_close_matches(name, list(by_form), n=1)
    suggestion = (
        f"; did you mean {{class_name: {by_form[close[0]]}, config: ...}}?"
        if close
        else ""
    )
    return (
        "expected a non-negative number or a schedule {class_name, config} "
        f"(not a name), got {name!r}{suggestion}"
    )


def json_copy(value):
    """A deep copy of nested dicts and lists (other values are shared)."""
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


# Keras's own short names of metrics (`keras.metrics.get("mae")`).
_METRIC_ALIASES = ("bce", "mse", "mae", "mape", "msle")
# Functions of the Keras modules that name no object.
_NOT_NAMES = ("get", "serialize", "deserialize")


def known_names(kind, modules):
    """The names of a `kind` of Keras object that `modules` define, as a
    config may write them: the public names, and also the snake-case form
    of a metric class (`"sparse_categorical_accuracy"`; not the functions
    of `keras.metrics`, which `keras.metrics.get` does not take) and the
    lower-case form of an optimizer class (`"rmsprop"`)."""
    names = set()
    for module in modules:
        for n in dir(module):
            obj = getattr(module, n)
            if n[:1].isalpha() and callable(obj) and n not in _NOT_NAMES:
                names.add(n)
    classes = [n for n in names if n[:1].isupper()]
    if kind == "metric":
        names = set(classes) | {_snake_case(n) for n in classes}
        names |= set(_METRIC_ALIASES) | {a.upper() for a in _METRIC_ALIASES}
    if kind == "optimizer":
        names |= {n.lower() for n in classes}
    return names


def name_hint(name, names):
    """`hint` for a near miss of `names`, in the form `name` is written
    (`"acurracy"` -> `"accuracy"`, `"Acurracy"` -> `"Accuracy"`)."""
    return hint(name, sorted(same_form(name, names)))


def _snake_case(name):
    """A class name as Keras writes it in snake case (`F1Score` ->
    `f1_score`), the form `keras.metrics.get` takes."""
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def check_arguments(cls, config, where, extra=()):
    """Raises at `where.<key>` for a `config` key that no `__init__` of
    `cls` (or its base classes) takes, nor `extra`, naming the closest
    argument. Serves Keras serializations (`{class_name, config}`) of
    layers, losses, optimizers, schedules..."""
    if not isinstance(cls, type):
        return
    known = set(extra)
    for base in cls.__mro__[:-1]:
        try:
            parameters = inspect.signature(base.__init__).parameters
        except (TypeError, ValueError):
            continue
        known |= {
            n
            for n, p in parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
    for key in config:
        if isinstance(key, str) and key not in known:
            message = f"unknown argument of {cls.__name__}"
            close = hint(key, sorted(known))
            if not close and 0 < len(known) <= 12:
                close = f" (expected one of {', '.join(sorted(known))})"
            at = key_path(key, prefix=where)
            raise ConfigError(at, message + close) from None


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
        message = f"unknown callback {show(name)}{hint(name, candidates)}"
        raise ConfigError(f"{where}.class_name", message)
    parameters = inspect.signature(cls).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        check_keys(spec.config, f"{where}.config", list(parameters))
    try:
        return cls(**spec.config)
    except Exception as error:
        raise ConfigError(f"{where}.config", message_of(error)) from None
