"""`kt.train(config)`: build, train and record a run from a config.

A run directory holds:

- `config.yaml`: the resolved config (defaults filled in, paths absolute);
- `model.keras`: the trained `TapModel`; `base.keras`: `tap_model.base`
  alone, for deployment;
- `history.json` and `history.csv`: every logged value per epoch (`loss`,
  `predictions_loss`, `<tap>_loss`, metrics, `val_` versions);
- `logs/`: TensorBoard logs;
- `checkpoints/`: `epoch_NNNN.keras`, a full checkpoint with the optimizer
  state written at every epoch end, and `state.json` naming the last
  completed epoch, its checkpoint and the history so far. Both are written
  to a temporary file and moved into place, so a run killed at any moment
  leaves a consistent state that `train(..., resume=True)` continues from;
- `history.png` (and `statistics.png` with `TapStatistics`) when matplotlib
  is installed.
"""

import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path

import keras
import numpy as np

from keras_tap import config as config_lib
from keras_tap import data as data_lib
from keras_tap.config import ConfigError, key_path

CONFIG = "config.yaml"
MODEL = "model.keras"
BASE = "base.keras"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
_RESUMABLE_KEYS = ("fit.epochs", "fit.verbose", "run.plots")
_MARKER = "# The resolved config of this keras-tap run.\n"


@dataclasses.dataclass
class Run:
    """What `train` produced.

    Attributes:
        dir: the run directory.
        model: the trained `TapModel`.
        history: `{key: [value per epoch]}`, with an `epoch` key (0-based).
        files: `{what: path}` of the files written (`model`, `base`,
            `config`, `history_json`, `history_csv`, `logs`, plots).
        metrics: the last epoch's held-out values (`val_` keys, prefix
            removed), or its training values without a validation split.
        initial_epoch: the epoch this call started from (0 unless resumed).
    """

    dir: Path
    model: keras.Model
    history: dict
    files: dict
    metrics: dict
    initial_epoch: int = 0


def train(config, *, resume=False, overwrite=False, verbose=None):
    """Builds the config's `TapModel`, trains it and writes a run directory.

    Args:
        config: a `Config`, a dict or a path to a YAML/JSON config.
        resume: continue the run in `config.run.dir` from its last
            checkpoint (start it when there is none).
        overwrite: delete a previous run in `config.run.dir` first.
        verbose: `fit`'s verbosity; defaults to `config.fit.verbose`.

    Returns:
        A `Run`.

    Raises:
        ConfigError: for a bad config, a non-empty run directory without
            `resume` or `overwrite`, or a resume with a different config.
    """
    cfg = config_lib.load(config)
    run_dir = Path(cfg.run.dir)
    state, replace = _check_run_dir(
        run_dir, cfg, resume=resume, overwrite=overwrite
    )
    seed_everything(cfg.run)
    train_data, val_data = data_lib.load(cfg.data, cfg.run.seed)
    tap_model = build(cfg)
    check_inputs(tap_model, train_data)
    compile_model(tap_model, cfg)
    history, initial_epoch = {}, 0
    if state is not None:
        # The config rebuilds the model; the checkpoint restores its weights
        # and the optimizer's state (iterations, moments).
        restore(tap_model, run_dir / CHECKPOINTS / state["checkpoint"])
        history, initial_epoch = state["history"], state["epoch"] + 1
    _start_run_dir(run_dir, state, replace)
    if state is None:
        _write_text(run_dir / CONFIG, _MARKER + cfg.to_yaml())
    epochs = cfg.fit.epochs
    steps = data_lib.steps_per_epoch(
        train_data, cfg.data.batch_size, cfg.fit.steps_per_epoch
    )
    recorder = _Recorder(run_dir, history, cfg.run.keep_checkpoints)
    callbacks = build_callbacks(cfg) + [recorder]
    if initial_epoch < epochs:
        dataset = data_lib.training_dataset(
            train_data,
            batch_size=cfg.data.batch_size,
            seed=cfg.data.seed if cfg.data.seed is not None else cfg.run.seed,
            shuffle=cfg.data.shuffle,
            initial_epoch=initial_epoch,
            epochs=epochs,
            steps=steps,
        )
        validation = None
        if val_data is not None:
            validation = (val_data.x, val_data.fit_targets())
        tap_model.fit(
            dataset,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            validation_data=validation,
            validation_batch_size=cfg.data.batch_size,
            callbacks=callbacks,
            shuffle=False,
            verbose=cfg.fit.verbose if verbose is None else verbose,
        )
    files = {"config": run_dir / CONFIG}
    files["model"] = _save(tap_model, run_dir / MODEL)
    files["base"] = _save(tap_model.base, run_dir / BASE)
    files.update(_write_history(run_dir, recorder.history))
    if cfg.run.tensorboard:
        files["logs"] = run_dir / LOGS
    if cfg.run.plots:
        files.update(write_plots(run_dir))
    return Run(
        dir=run_dir,
        model=tap_model,
        history=recorder.history,
        files=files,
        metrics=final_metrics(recorder.history, tap_model.tap_names),
        initial_epoch=initial_epoch,
    )


# ------------------------------------------------------------------ building


def build(config):
    """The config's `TapModel`, uncompiled (with freshly built weights).

    Raises:
        ConfigError: for a model that cannot be built or a tap whose layer
            path matches nothing, named by key path.
    """
    import keras_tap as kt

    cfg = config_lib.load(config)
    model = build_model(cfg.model, "model")
    teacher = (
        None if cfg.teacher is None else build_model(cfg.teacher, "teacher")
    )
    taps = {}
    for name, tap in cfg.taps.items():
        where = key_path("taps", name)
        kwargs = tap.to_dict()
        for key, module in (("loss", keras.losses), ("regularizer", None)):
            if isinstance(kwargs[key], dict):
                module = module or keras.regularizers
                kwargs[key] = config_lib.with_module(kwargs[key], module)
        if kwargs["adapter"] is not None:
            kwargs["adapter"] = deserialize_layer(
                kwargs["adapter"], f"{where}.adapter"
            )
        taps[name] = kt.Tap(**kwargs)
    try:
        return kt.TapModel(model, taps, teacher=teacher)
    except (ValueError, TypeError, KeyError) as error:
        message = config_lib.message_of(error)
        found = [
            (message.find(repr(path)), key_path("taps", name, field))
            for name, tap in cfg.taps.items()
            for field, path in (("layer", tap.layer), ("teacher", tap.teacher))
            if path is not None and repr(path) in message
        ]
        where = min(found)[1] if found else "taps"
        raise ConfigError(where, message) from None


def build_model(model_config, where):
    """Builds the model a `ModelConfig` describes."""
    kind, value = model_config.kind, model_config.value
    if kind == "keras":
        return deserialize_layer(value, where, model=True)
    if kind == "file":
        try:
            model = keras.saving.load_model(
                value, compile=False, safe_mode=True
            )
        except Exception as error:
            message = f"cannot load {value!r}: {config_lib.message_of(error)}"
            raise ConfigError(f"{where}.file", message) from None
        return getattr(model, "base", model)
    if kind == "application":
        kwargs = model_config.kwargs
        where = f"{where}.application"
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            return getattr(keras.applications, value)(**kwargs)
        except Exception as error:
            message = config_lib.message_of(error)
            weights = kwargs.get("weights", "imagenet")
            if weights is not None and ("URL" in message or "fetch" in message):
                message = (
                    f"cannot get the {weights!r} weights of {value} "
                    f"({message}); this machine may be offline: put the "
                    "weights file in ~/.keras/models, or set weights: null"
                )
                raise ConfigError(f"{where}.weights", message) from None
            raise ConfigError(where, message) from None
        finally:
            socket.setdefaulttimeout(timeout)
    function = import_builder(
        value, model_config.python_path, f"{where}.builder"
    )
    try:
        model = function(**model_config.kwargs)
    except Exception as error:
        message = f"{value} failed: {config_lib.message_of(error)}"
        raise ConfigError(f"{where}.builder", message) from None
    if not isinstance(model, keras.Model):
        message = f"{value} returned {type(model).__name__}, not a keras.Model"
        raise ConfigError(f"{where}.builder", message)
    return model


def import_builder(spec, python_path, where):
    """Imports the function of `module:function`, searching `python_path`
    and the current directory."""
    module_name, _, attr = spec.partition(":")
    for directory in (os.getcwd(), *reversed(python_path)):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        message = (
            f"cannot import {module_name!r} ({config_lib.message_of(error)}); "
            "searched the config's directory and the current directory"
        )
        raise ConfigError(where, message) from None
    function = getattr(module, attr, None)
    if not callable(function):
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = config_lib.hint(attr, names)
        message = f"module {module_name!r} has no function {attr!r}{hint}"
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
    config = config_lib.mapping(value.get("config") or {}, f"{where}.config")
    if class_name == "Sequential" and "module" not in value:
        config_lib.check_keys(
            config, f"{where}.config", ("name", "layers", "trainable", "dtype")
        )
        layers = config.get("layers") or []
        if not isinstance(layers, list):
            raise config_lib.expected(
                f"{where}.config.layers", "a list", layers
            )
        layers = [
            deserialize_layer(layer, f"{where}.config.layers[{i}]")
            for i, layer in enumerate(layers)
        ]
        try:
            result = keras.Sequential(layers, name=config.get("name"))
        except Exception as error:
            raise ConfigError(where, config_lib.message_of(error)) from None
        result.trainable = config.get("trainable", True)
        return result
    if not isinstance(class_name, str):
        raise config_lib.expected(
            f"{where}.class_name", "a class name", class_name
        )
    try:
        if class_name in _MODEL_CLASSES and "module" not in value:
            result = keras.saving.deserialize_keras_object(
                value, custom_objects=_MODEL_CLASSES
            )
        else:
            short = config_lib.with_module(value, keras.layers)
            result = keras.layers.deserialize(short)
    except Exception as error:
        known = [n for n in dir(keras.layers) if n[:1].isupper()]
        if not hasattr(keras.layers, class_name) and (
            keras.saving.get_registered_object(class_name) is None
        ):
            hint = config_lib.hint(class_name, known)
            message = f"unknown layer class {class_name!r}{hint}"
            raise ConfigError(f"{where}.class_name", message) from None
        cls = getattr(keras.layers, class_name, None)
        if isinstance(cls, type):
            known = set(inspect.signature(cls).parameters)
            known |= set(inspect.signature(keras.layers.Layer).parameters)
            known |= {"input_shape", "input_dim", "batch_size", "dtype"}
            for key in config:
                if key not in known:
                    hint = config_lib.hint(key, sorted(known))
                    message = f"unknown argument of {class_name}{hint}"
                    where = key_path(key, prefix=f"{where}.config")
                    raise ConfigError(where, message) from None
        message = config_lib.message_of(error)
        raise ConfigError(f"{where}.config", message) from None
    if model and not isinstance(result, keras.Model):
        message = (
            f"expected a model (Sequential, Functional), got {class_name!r}"
        )
        raise ConfigError(f"{where}.class_name", message)
    return result


def compile_model(tap_model, config):
    """Compiles `tap_model` with the config's `compile` section."""
    cfg = config_lib.load(config).compile
    loss = cfg.loss
    if isinstance(loss, dict):
        loss = config_lib.resolve("loss", loss, "compile.loss")
    metrics = [
        config_lib.with_module(m, keras.metrics) if isinstance(m, dict) else m
        for m in cfg.metrics
    ]
    optimizer = config_lib.resolve(
        "optimizer", cfg.optimizer, "compile.optimizer"
    )
    tap_model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=metrics or None,
        jit_compile=cfg.jit_compile,
    )
    return tap_model


def build_callbacks(config):
    """The config's callbacks, then TensorBoard (when `run.tensorboard`)."""
    cfg = config_lib.load(config)
    callbacks = [
        config_lib.resolve_callback(spec, f"callbacks[{i}]")
        for i, spec in enumerate(cfg.callbacks)
    ]
    if cfg.run.tensorboard:
        callbacks.append(EpochScalars(Path(cfg.run.dir) / LOGS))
    return callbacks


class EpochScalars(keras.callbacks.Callback):
    """Writes each epoch's logs as TensorBoard scalars.

    The layout is `keras.callbacks.TensorBoard`'s (runs `train/` and
    `validation/`, tags `epoch_<key>`), written with `tf.summary.write`
    alone, so it works without the `tensorboard` package installed.

    Args:
        log_dir: the directory of the runs.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = Path(log_dir)
        self._writers = {}

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        metadata = summary_pb2.SummaryMetadata(plugin_data=plugin)
        for key, value in (logs or {}).items():
            run = "validation" if key.startswith("val_") else "train"
            if run not in self._writers:
                path = str(self.log_dir / run)
                self._writers[run] = tf.summary.create_file_writer(path)
            tag = "epoch_" + key.removeprefix("val_")
            with self._writers[run].as_default():
                value = tf.constant(float(np.asarray(value)), tf.float32)
                tf.summary.write(tag, value, step=epoch, metadata=metadata)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def check_inputs(tap_model, arrays):
    """Raises `ConfigError` when the data's inputs do not fit the model."""
    inputs = tap_model.base.inputs
    if not inputs or len(inputs) != 1:
        return
    expected = tuple(inputs[0].shape[1:])
    got = tuple(arrays.x.shape[1:])
    if len(expected) != len(got) or any(
        e is not None and e != g for e, g in zip(expected, got)
    ):
        shape = tuple(None if e is None else e for e in expected)
        message = f"the inputs have shape {got}, but the model expects {shape}"
        raise ConfigError("data", message)


def seed_everything(run_config):
    """Seeds Python, NumPy and the backend; with `deterministic`, makes TF
    ops deterministic (process-wide)."""
    keras.utils.set_random_seed(run_config.seed)
    if run_config.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def restore(tap_model, path):
    """Loads the weights and optimizer state of a `.keras` file this config
    wrote (a checkpoint or `model.keras`) into `tap_model`, built and
    compiled from the same config."""
    if not tap_model.built:
        tap_model.build(tap_model.base.input_shape)
    tap_model.optimizer.build(tap_model.trainable_variables)
    tap_model.load_weights(path)
    return tap_model


def load_run(run_dir, checkpoint=None):
    """The compiled `TapModel` of a run directory, with the weights and
    optimizer state of its `model.keras` (or of `checkpoint`)."""
    run_dir = Path(run_dir)
    cfg = config_lib.load(run_dir / CONFIG)
    tap_model = compile_model(build(cfg), cfg)
    return restore(tap_model, checkpoint or run_dir / MODEL)


# -------------------------------------------------------------- run folder


def _check_run_dir(run_dir, cfg, *, resume, overwrite):
    """Checks the run directory before anything is written.

    Returns:
        `(state, replace)`: the checkpoint state to resume from (or
        `None`), and whether an earlier run must be deleted first.
    """
    if run_dir.exists() and not run_dir.is_dir():
        message = f"{str(run_dir)!r} is a file, not a directory"
        raise ConfigError("run.dir", message)
    is_run = (run_dir / CONFIG).is_file() and (
        (run_dir / CONFIG).read_text(encoding="utf-8").startswith(_MARKER)
    )
    non_empty = run_dir.is_dir() and any(run_dir.iterdir())
    if non_empty and not (resume or overwrite):
        message = (
            f"{str(run_dir)!r} is not empty; resume the run with --resume, "
            "replace it with --overwrite, or choose another run.dir"
        )
        raise ConfigError("run.dir", message)
    if non_empty and not is_run:
        message = (
            f"{str(run_dir)!r} is not empty and holds no keras-tap run (no "
            f"{CONFIG} written by keras-tap); choose another run.dir"
        )
        raise ConfigError("run.dir", message)
    state = read_state(run_dir) if resume and is_run else None
    if state is not None:
        saved = config_lib.read(run_dir / CONFIG)
        _check_same_config(saved, cfg.to_dict(), run_dir)
    return state, non_empty and state is None


def _start_run_dir(run_dir, state, replace):
    """Deletes an earlier run (`replace`), or the temporary files a killed
    one left (`state`), and makes sure the directory exists."""
    if replace:
        shutil.rmtree(run_dir)
    if state is not None:
        for leftover in (run_dir / CHECKPOINTS).glob("*.tmp*"):
            leftover.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def read_state(run_dir):
    """The checkpoint state of a run, or `None` when it has none."""
    path = Path(run_dir) / CHECKPOINTS / STATE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _check_same_config(saved, current, run_dir, parts=()):
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(saved) + [k for k in current if k not in saved]:
            _check_same_config(
                saved.get(key), current.get(key), run_dir, parts + (key,)
            )
        return
    where = key_path(*parts)
    if saved != current and where not in _RESUMABLE_KEYS:
        message = (
            f"differs from the run being resumed in {str(run_dir)!r} "
            f"({config_lib._show(saved)} there, {config_lib._show(current)} "
            "here); resume with the same config, or use --overwrite"
        )
        raise ConfigError(where, message)


class _Recorder(keras.callbacks.Callback):
    """Appends each epoch's logs to the history and writes a checkpoint,
    the state and the history files, each atomically."""

    def __init__(self, run_dir, history, keep):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.history = {key: list(values) for key, values in history.items()}
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        logs = {"epoch": epoch, **(logs or {})}
        count = len(self.history.get("epoch", []))
        for key in logs:
            self.history.setdefault(key, [None] * count)
        for key, values in self.history.items():
            value = logs.get(key)
            values.append(None if value is None else _number(value))
        self.history["epoch"][-1] = epoch
        checkpoints = self.run_dir / CHECKPOINTS
        checkpoints.mkdir(exist_ok=True)
        name = f"epoch_{epoch:04d}.keras"
        _save(self.model, checkpoints / name)
        state = {"epoch": epoch, "checkpoint": name, "history": self.history}
        _write_text(checkpoints / STATE, json.dumps(state))
        _write_history(self.run_dir, self.history)
        kept = sorted(checkpoints.glob("epoch_*.keras"))
        for old in kept[: -self.keep]:
            if old.name != name:
                old.unlink()


def _number(value):
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


def _save(model, path):
    """Saves a `.keras` file atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp.keras")
    model.save(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    return path


def _write_text(path, text):
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return path


def _fsync(path):
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _write_history(run_dir, history):
    run_dir = Path(run_dir)
    files = {"history_json": run_dir / HISTORY_JSON}
    _write_text(files["history_json"], json.dumps(history, indent=1))
    keys = list(history)
    rows = [",".join(keys)]
    for i in range(len(history.get("epoch", []))):
        cells = [history[key][i] for key in keys]
        rows.append(",".join("" if c is None else repr(c) for c in cells))
    files["history_csv"] = _write_text(
        run_dir / HISTORY_CSV, "\n".join(rows) + "\n"
    )
    return files


def write_plots(run_dir, out_dir=None, *, optional=True):
    """Writes `history.png` (and `statistics.png` when the history has
    `TapStatistics` values) with `kt.plot`.

    Args:
        run_dir: the run directory.
        out_dir: where to write; defaults to `run_dir`.
        optional: write nothing without matplotlib, instead of raising.

    Returns:
        `{"history_png": path, ...}` for the files written.
    """
    from keras_tap import plot

    if optional and importlib.util.find_spec("matplotlib") is None:
        return {}
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    files = {
        "history_png": Path(plot.history(run_dir, out_dir / "history.png"))
    }
    with open(run_dir / HISTORY_JSON, encoding="utf-8") as file:
        keys = json.load(file)
    if any(key.endswith("_zero_fraction") for key in keys):
        path = plot.statistics(run_dir, out_dir / "statistics.png")
        files["statistics_png"] = Path(path)
    return files


def final_metrics(history, taps=()):
    """The last epoch's held-out values (`val_` removed), or its training
    values when there is no validation split; the `TapStatistics` values
    of `taps` (statistics of training batches) are left out."""
    statistics = {
        f"{tap}_{name}"
        for tap in taps
        for name in ("mean", "std", "zero_fraction", "dead_channels")
    }
    last = {
        key: values[-1]
        for key, values in history.items()
        if values
        and key != "epoch"
        and key.removeprefix("val_") not in statistics
    }
    held_out = {k[4:]: v for k, v in last.items() if k.startswith("val_")}
    return held_out or last
