"""The run directory `kt.train` writes, and how it is written.

A run directory holds:

- `config.yaml`: the resolved config (defaults filled in, paths absolute);
- `run.json`: how the run trained: the Keras backend (`backend`), the
  Keras and keras_tap versions, and one entry per `train` call in
  `sessions` (a resumed run may continue on another backend);
- `model.keras`: the trained `TapModel`; `base.keras`: `tap_model.base`
  alone, for deployment;
- `history.json` and `history.csv`: every logged value per epoch (`loss`,
  `predictions_loss`, `<tap>_loss`, metrics, `val_` versions);
- `logs/`: TensorBoard logs;
- `checkpoints/`: `epoch_NNNN.keras`, a full checkpoint with the optimizer
  state written at every epoch end, and `state.json` naming the last
  completed epoch, its checkpoint, the backend that wrote it and the
  history so far. Both are written
  to a temporary file and moved into place, so a run killed at any moment
  leaves a consistent state that `train(..., resume=True)` continues from;
- `history.png` (and `statistics.png` with `TapStatistics`), and
  `features/<tap>.png`, a feature-map grid of each tap on the first
  held-out sample, when matplotlib is installed.
"""

import importlib.util
import json
import math
import os
import re
import shutil
from pathlib import Path

import keras
import numpy as np

from keras_tap.runs import config as config_lib
from keras_tap.runs.keypaths import ConfigError, key_path, show

CONFIG = "config.yaml"
RUN_JSON = "run.json"
MODEL = "model.keras"
BASE = "base.keras"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
FEATURES = "features"
MARKER = "# The resolved config of this keras-tap run.\n"
# Keys a resumed run may change.
RESUMABLE_KEYS = ("fit.epochs", "fit.verbose", "run.plots")
# A `.keras` checkpoint loads on any backend.
RESUMABLE_KEYS += ("backend",)
# Where a run trains may change: every strategy gives the same weights.
RESUMABLE_KEYS += (
    "distribution.strategy",
    "distribution.devices",
    "distribution.backup",
)


# ----------------------------------------------------------- starting a run


def check_run_dir(run_dir, cfg, *, resume, overwrite):
    """Checks the run directory before anything is written.

    Returns:
        `(state, replace)`: the checkpoint state to resume from (or
        `None`), and whether an earlier run must be deleted first.

    Raises:
        ConfigError: at `run.dir` for a directory that holds a run,
            without `resume` or `overwrite`, or that is not empty and holds
            no keras-tap run (the message names a free directory beside
            it); at the differing key for a resume with another config.
    """
    if run_dir.exists() and not run_dir.is_dir():
        message = f"{str(run_dir)!r} is a file, not a directory"
        raise ConfigError("run.dir", message)
    is_run = (run_dir / CONFIG).is_file() and (
        (run_dir / CONFIG).read_text(encoding="utf-8").startswith(MARKER)
    )
    non_empty = run_dir.is_dir() and any(run_dir.iterdir())
    elsewhere = f"--set run.dir={_shown(_free_sibling(run_dir))}"
    if non_empty and not is_run:
        message = (
            f"{str(run_dir)!r} is not empty and holds no keras-tap run (no "
            f"{CONFIG} written by keras-tap); choose another run.dir, e.g. "
            f"{elsewhere}"
        )
        raise ConfigError("run.dir", message)
    if non_empty and not (resume or overwrite):
        message = (
            f"{str(run_dir)!r} already holds a run; continue it with "
            "--resume, replace it with --overwrite, or train in another "
            f"directory with {elsewhere}"
        )
        raise ConfigError("run.dir", message)
    state = read_state(run_dir) if resume and is_run else None
    if state is not None:
        saved = config_lib.read(run_dir / CONFIG)
        _check_same_config(saved, cfg.to_dict(), run_dir)
    return state, non_empty and state is None


def _free_sibling(run_dir):
    """`runs/digits-2` (or `-3`, ...): the first name beside `run_dir`
    that does not exist yet."""
    number = 2
    while run_dir.with_name(f"{run_dir.name}-{number}").exists():
        number += 1
    return run_dir.with_name(f"{run_dir.name}-{number}")


def _shown(path):
    """`path` relative to the current directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def start_run_dir(run_dir, state, replace):
    """Deletes an earlier run (`replace`), or the temporary files a killed
    one left (`state`), and makes sure the directory exists."""
    if replace:
        shutil.rmtree(run_dir)
    if state is not None:
        for leftover in (run_dir / CHECKPOINTS).glob("*.tmp*"):
            leftover.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def write_run_info(run_dir, initial_epoch=0):
    """Writes `run.json`, adding this `train` call to its `sessions`.

    Returns:
        Its path.
    """
    from keras_tap.version import __version__

    path = Path(run_dir) / RUN_JSON
    info = {}
    if initial_epoch and path.is_file():
        try:
            with open(path, encoding="utf-8") as file:
                info = json.load(file)
        except (OSError, ValueError):
            info = {}
    backend = keras.backend.backend()
    session = {
        "backend": backend,
        "keras": keras.__version__,
        "initial_epoch": initial_epoch,
    }
    sessions = info.get("sessions") if isinstance(info, dict) else None
    info = {
        "backend": backend,
        "keras": keras.__version__,
        "keras_tap": __version__,
        "sessions": (sessions if isinstance(sessions, list) else [])
        + [session],
    }
    return write_text(path, json.dumps(info, indent=1) + "\n")


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
    if saved != current and where not in RESUMABLE_KEYS:
        message = (
            f"differs from the run being resumed in {str(run_dir)!r} "
            f"({show(saved)} there, {show(current)} here); resume with the "
            "same config, or use --overwrite"
        )
        raise ConfigError(where, message)


# ------------------------------------------------------------ during a run


class Recorder(keras.callbacks.Callback):
    """Appends each epoch's logs to the history and writes a checkpoint,
    the state and the history files, each atomically.

    Args:
        run_dir: the run directory.
        history: the history so far (`{}`, or a resumed run's).
        keep: how many epoch checkpoints to keep.
    """

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
        save(self.model, checkpoints / name)
        state = {
            "epoch": epoch,
            "checkpoint": name,
            "backend": keras.backend.backend(),
            "history": self.history,
        }
        write_text(checkpoints / STATE, json.dumps(state))
        write_history(self.run_dir, self.history)
        kept = sorted(checkpoints.glob("epoch_*.keras"))
        for old in kept[: -self.keep]:
            if old.name != name:
                old.unlink()


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


def _number(value):
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


# ---------------------------------------------------------- atomic writes


def save(model, path):
    """Saves a `.keras` file atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp.keras")
    model.save(tmp)
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return path


def write_text(path, text):
    """Writes a text file atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return path


def write_history(run_dir, history):
    """Writes `history.json` and `history.csv`; returns their paths as
    `{"history_json": ..., "history_csv": ...}`."""
    run_dir = Path(run_dir)
    files = {"history_json": run_dir / HISTORY_JSON}
    write_text(files["history_json"], json.dumps(history, indent=1))
    keys = list(history)
    rows = [",".join(keys)]
    for i in range(len(history.get("epoch", []))):
        cells = [history[key][i] for key in keys]
        rows.append(",".join("" if c is None else repr(c) for c in cells))
    files["history_csv"] = write_text(
        run_dir / HISTORY_CSV, "\n".join(rows) + "\n"
    )
    return files


# ------------------------------------------------------------------ plots


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
    from keras_tap.inspect import plot

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


def write_feature_maps(
    tap_model, x, out_dir, *, sample="first sample", optional=True
):
    """Writes `<out_dir>/<tap>.png`, a `kt.plot.feature_maps` grid of each
    tap's activation on the sample `x[:1]`.

    Taps whose activation (with its batch axis) is not of rank 2, 3 or 4
    are left out. A tap name is made a file name by replacing every
    character other than letters, digits, `_`, `.` and `-` with `_`.

    Args:
        tap_model: a `TapModel`.
        x: inputs; only the first sample is drawn.
        out_dir: the directory to write into (created when needed).
        sample: what `x[:1]` is, for the titles.
        optional: write nothing without matplotlib, instead of raising.

    Returns:
        `{"features_<file name>_png": path}` for the files written, in the
        order of the taps.
    """
    from keras_tap.inspect import plot

    if optional and importlib.util.find_spec("matplotlib") is None:
        return {}
    activations = tap_model.extract(x[:1], verbose=0)
    files, used = {}, set()
    for name, activation in activations.items():
        if np.ndim(activation) not in (2, 3, 4):
            continue
        stem = file_name(name)
        while stem in used:
            stem += "_"
        used.add(stem)
        tap = tap_model.taps.get(name)
        layer = getattr(tap, "path", name)
        title = name if layer == name else f"{name}: {layer}"
        path = Path(out_dir) / f"{stem}.png"
        plot.feature_maps(activation[0], path, title=f"{title} ({sample})")
        files[f"features_{stem}_png"] = path
    return files


def file_name(tap):
    """A tap name as a file name: `"model/conv2@1"` -> `"model_conv2_1"`."""
    return re.sub(r"[^\w.-]+", "_", tap).strip(".") or "_"


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
