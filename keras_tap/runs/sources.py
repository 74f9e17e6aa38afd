"""Model sources: how the `model` and `teacher` sections name a model, and
how it is built.

A section holds exactly one of:

- `application: {name: MobileNetV2, ...}`: a `keras.applications` model,
  called with the other keys (`weights: null` works offline);
- `file: model.keras`: a saved model, loaded in Keras's safe mode (a saved
  `TapModel` gives its base model);
- `builder: "module:function"` with `kwargs` and `python_path`: the user's
  own code, imported from `python_path` (default: the config's directory)
  and the current directory, and called with `kwargs`;
- `{class_name: ..., config: ...}`: a Keras serialization of the model
  written inline (a short `Sequential` is built layer by layer, so a bad
  layer is named by its key path).

`read_model` checks a section into a `ModelConfig`; `build_model` builds it.
"""

import contextlib
import dataclasses
import importlib
import inspect
import os
import re
import socket
import sys
from typing import Any

import keras

from keras_tap.runs.checks import (
    KERAS_FORM,
    check_arguments,
    check_keys,
    expected,
    known_names,
    mapping,
    path,
    with_module,
)
from keras_tap.runs.keypaths import (
    SOURCE_KEYS,
    ConfigError,
    hint,
    key_path,
    message_of,
)

MODEL_SOURCES = SOURCE_KEYS["model"]


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


# ---------------------------------------------------------------- reading


def read_model(raw, where, base):
    """Checks a raw `model` (or `teacher`) section into a `ModelConfig`;
    relative paths are relative to the directory `base`."""
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


# --------------------------------------------------------------- building


def build_model(model_config, where):
    """Builds the model a `ModelConfig` describes.

    Raises:
        ConfigError: naming `where` (`model` or `teacher`) and the source
            key, for a model that cannot be loaded, imported or built.
    """
    kind, value = model_config.kind, model_config.value
    if kind == "keras":
        return deserialize_layer(value, where, model=True)
    if kind == "file":
        try:
            model = keras.saving.load_model(
                value, compile=False, safe_mode=True
            )
        except Exception as error:
            message = f"cannot load {value!r}: {message_of(error)}"
            raise ConfigError(f"{where}.file", message) from None
        return getattr(model, "base", model)
    if kind == "application":
        return _build_application(value, model_config.kwargs, where)
    # The builder may import more of its own modules while it runs.
    with search_path(model_config.python_path):
        function = import_builder(
            value, model_config.python_path, f"{where}.builder"
        )
        try:
            model = function(**model_config.kwargs)
        except Exception as error:
            message = f"{value} failed: {message_of(error)}"
            raise ConfigError(f"{where}.builder", message) from None
    if not isinstance(model, keras.Model):
        message = f"{value} returned {type(model).__name__}, not a keras.Model"
        raise ConfigError(f"{where}.builder", message)
    return model


def _build_application(name, kwargs, where):
    where = f"{where}.application"
    try:
        if kwargs.get("weights", "imagenet") == "imagenet":
            with download_timeout(30):
                return getattr(keras.applications, name)(**kwargs)
        return getattr(keras.applications, name)(**kwargs)
    except Exception as error:
        message = message_of(error)
        weights = kwargs.get("weights", "imagenet")
        if weights is not None and ("URL" in message or "fetch" in message):
            message = (
                f"cannot get the {weights!r} weights of {name} "
                f"({message}); this machine may be offline: put the "
                "weights file in ~/.keras/models, or set weights: null"
            )
            raise ConfigError(f"{where}.weights", message) from None
        raise ConfigError(where, message) from None


@contextlib.contextmanager
def download_timeout(seconds):
    """Gives sockets opened inside the block a default timeout of
    `seconds` (Keras's `get_file` takes none), and restores the previous
    default when the block ends."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def search_path(python_path):
    """Puts `python_path` and the current directory first on `sys.path`
    inside the block, and removes what it added when the block ends."""
    added = []
    for directory in (os.getcwd(), *reversed(python_path)):
        if directory not in sys.path:
            sys.path.insert(0, directory)
            added.append(directory)
    try:
        yield
    finally:
        for directory in added:
            if directory in sys.path:
                sys.path.remove(directory)


def import_builder(spec, python_path, where):
    """Imports the function of `module:function`, searching `python_path`
    and the current directory (on `sys.path` only while importing)."""
    module_name, _, attr = spec.partition(":")
    try:
        with search_path(python_path):
            module = importlib.import_module(module_name)
    except ImportError as error:
        message = (
            f"cannot import {module_name!r} ({message_of(error)}); "
            "searched the config's directory and the current directory"
        )
        raise ConfigError(where, message) from None
    function = getattr(module, attr, None)
    if not callable(function):
        names = [n for n in dir(module) if not n.startswith("_")]
        message = (
            f"module {module_name!r} has no function {attr!r}"
            f"{hint(attr, names)}"
        )
        raise ConfigError(where, message)
    return function


_MODEL_CLASSES = {
    "Sequential": keras.Sequential,
    "Functional": keras.Model,
    "Model": keras.Model,
}


def deserialize_layer(value, where, *, model=False):
    """Builds a layer or model from a Keras serialization dict.

    Accepts Keras's full form and the short one without `module`. A short
    `Sequential` is built layer by layer, so a bad layer is named by its key
    path (`taps.head.adapter.config.layers[1]`).
    """
    class_name = value.get("class_name")
    config = mapping(value.get("config") or {}, f"{where}.config")
    if class_name == "Sequential" and "module" not in value:
        check_keys(
            config, f"{where}.config", ("name", "layers", "trainable", "dtype")
        )
        layers = config.get("layers") or []
        if not isinstance(layers, list):
            raise expected(f"{where}.config.layers", "a list", layers)
        layers = [
            deserialize_layer(layer, f"{where}.config.layers[{i}]")
            for i, layer in enumerate(layers)
        ]
        try:
            result = keras.Sequential(layers, name=config.get("name"))
        except Exception as error:
            raise ConfigError(where, message_of(error)) from None
        result.trainable = config.get("trainable", True)
        return result
    if not isinstance(class_name, str):
        raise expected(f"{where}.class_name", "a class name", class_name)
    try:
        if class_name in _MODEL_CLASSES and "module" not in value:
            result = keras.saving.deserialize_keras_object(
                value, custom_objects=_MODEL_CLASSES
            )
        else:
            result = keras.layers.deserialize(with_module(value, keras.layers))
    except Exception as error:
        _raise_layer_error(class_name, config, where, error)
    if model and not isinstance(result, keras.Model):
        message = (
            f"expected a model (Sequential, Functional), got {class_name!r}"
        )
        raise ConfigError(f"{where}.class_name", message)
    return result


# What `keras.layers.Layer` takes through `**kwargs`.
_LAYER_KWARGS = ("input_shape", "input_dim", "batch_size")


def _raise_layer_error(class_name, config, where, error):
    """Names what made a layer's deserialization fail: an unknown class,
    an unknown argument, or else Keras's own message."""
    known = [n for n in dir(keras.layers) if n[:1].isupper()]
    if not hasattr(keras.layers, class_name) and (
        keras.saving.get_registered_object(class_name) is None
    ):
        message = f"unknown layer class {class_name!r}{hint(class_name, known)}"
        raise ConfigError(f"{where}.class_name", message) from None
    cls = getattr(keras.layers, class_name, None)
    check_arguments(cls, config, f"{where}.config", _LAYER_KWARGS)
    for key, value in config.items():
        if str(key).endswith("activation") and isinstance(value, str):
            try:
                keras.activations.get(value)
            except Exception:
                # Activation names are lower-case: `Relux` is closest to
                # `relu`, not (by case) to `elu`.
                names = sorted(known_names("activation", [keras.activations]))
                message = f"unknown activation {value!r}"
                message += hint(value.lower(), names)
                at = key_path(key, prefix=f"{where}.config")
                raise ConfigError(at, message) from None
    raise ConfigError(f"{where}.config", message_of(error)) from None
