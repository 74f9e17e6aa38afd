"""Plots of tap activations, training curves and tap statistics.

An optional extra: matplotlib is imported only when a function is called
(`pip install "keras-tap[plot]"`). Figures are drawn on matplotlib's
non-interactive Agg canvas, so no global backend state is touched.
"""

import csv
import difflib
import importlib
import json
import math
import os
from pathlib import Path

import keras
import numpy as np

from keras_tap.inspect.overlay import overlay  # noqa: F401

_MISSING_MATPLOTLIB = 'kt.plot needs matplotlib: pip install "keras-tap[plot]"'
_STATISTICS = ("mean", "std", "zero_fraction", "dead_channels")


def feature_maps(
    activation,
    path,
    *,
    max_channels=64,
    cols=None,
    title=None,
    cmap="viridis",
):
    """Draws one sample's tap activation and writes it to a PNG file.

    The drawing depends on the rank of `activation`: `(H, W, C)` gives a
    grid of channel images, each scaled to its own min/max and labelled
    with its channel index (and its value, for a constant channel such as
    a dead ReLU); `(C,)` gives a bar chart of the channels;
    `(T, C)` gives a heatmap of channels against time. A leading batch
    axis of size 1 is removed first.

    Args:
        activation: NumPy array or tensor holding the activation of one
            sample, e.g. `tap_model.extract(x[:1])["conv2"]`.
        path: Where to write the PNG. Parent directories are created.
        max_channels: Most channels drawn in a `(H, W, C)` grid; the first
            `max_channels` are shown. Defaults to `64`.
        cols: Columns of the grid. Defaults to about the square root of
            the number of channels drawn.
        title: Figure title. Defaults to a description of the shape.
        cmap: Matplotlib colormap of the channel images and the heatmap.

    Returns:
        The path written, as a `str`.

    Raises:
        ValueError: If the shape is not one of those above (a batch of
            several samples, for example), or `max_channels` or `cols` is
            not a positive integer.
        ImportError: If matplotlib is not installed.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "conv2.png")
    >>> activation = np.random.rand(16, 16, 8)  # e.g. taps["conv2"][0]
    >>> kt.plot.feature_maps(activation, path) == path
    True
    """
    _check_positive_int(max_channels, "max_channels")
    if cols is not None:
        _check_positive_int(cols, "cols")
    array = keras.ops.convert_to_numpy(activation).astype("float32")
    received = array.shape
    if array.ndim in (2, 3, 4) and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (1, 2, 3) or array.size == 0:
        raise ValueError(
            "feature_maps() draws the activation of one sample: expected "
            "(H, W, C) for a convolutional tap, (C,) for a dense tap or "
            "(T, C) for a sequence tap, optionally with a leading batch axis "
            f"of size 1. Received shape {received}. For a batch, index one "
            "sample, e.g. `activation[0]`."
        )
    if array.ndim == 3:
        fig = _channel_grid(array, max_channels, cols, cmap)
    else:
        width = 8 if array.ndim == 2 else max(6, min(16, array.size / 8))
        fig = _figure((width, 4), layout="constrained")
        ax = fig.add_subplot()
        if array.ndim == 2:
            image = ax.imshow(array.T, aspect="auto", origin="lower", cmap=cmap)
            fig.colorbar(image, ax=ax)
            ax.set(xlabel="time step", ylabel="channel")
        else:
            ax.bar(np.arange(array.size), array, width=1.0)
            ax.set(xlabel="channel", ylabel="activation")
        for axis in (ax.xaxis, ax.yaxis)[: array.ndim]:
            axis.get_major_locator().set_params(integer=True)
    if title is None:
        title = "activation " + "x".join(str(d) for d in array.shape)
        if array.ndim == 3 and array.shape[-1] > max_channels:
            title += f" (first {max_channels} of {array.shape[-1]} channels)"
    fig.suptitle(title)
    return _save(fig, path)


def history(history_or_run_dir, path, *, title=None):
    """Plots the losses and metrics of a training run, one subplot each.

    The total `loss` comes first, then `predictions_loss` and every
    `<tap>_loss`, then the other metrics; a validation curve (`val_`
    prefix) is drawn dashed beside its training curve. The keys logged by
    `kt.callbacks.TapStatistics` are left out: see `kt.plot.statistics`.

    Args:
        history_or_run_dir: A `keras.callbacks.History` (what `fit`
            returns), a dict `{metric: [value per epoch]}`, or a run
            directory holding `history.json` (preferred) or `history.csv`
            (as written by `keras.callbacks.CSVLogger`).
        path: Where to write the PNG. Parent directories are created.
        title: Figure title.

    Returns:
        The path written, as a `str`.

    Raises:
        FileNotFoundError: If the run directory, or both history files in
            it, do not exist.
        ValueError: If the history is empty or holds nothing to plot.
        TypeError: If `history_or_run_dir` is none of the above.
        ImportError: If matplotlib is not installed.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "history.png")
    >>> logs = {"loss": [1.0, 0.6], "val_loss": [1.1, 0.8]}
    >>> kt.plot.history(logs, path) == path  # or history=model.fit(...)
    True
    """
    epochs, logs = _load_history(history_or_run_dir)
    names = []  # training keys, and `val_` keys without one, unprefixed
    for key in logs:
        name = key[4:] if key.startswith("val_") else key
        if name not in names and _statistic(name) is None:
            names.append(name)
    if not names:
        raise ValueError(
            "The history holds only TapStatistics keys "
            f"({', '.join(logs)}); plot them with kt.plot.statistics()."
        )
    # `loss`, `predictions_loss`, other `*_loss`, then the other metrics.
    rank = {"loss": 0, "predictions_loss": 1}
    names.sort(key=lambda k: rank.get(k, 2 if k.endswith("_loss") else 3))
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = _figure((4.5 * cols, 3.2 * rows), layout="constrained")
    for index, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, index + 1)
        color = None
        if name in logs:
            (line,) = ax.plot(*_curve(epochs, logs[name]), label=name)
            color = line.get_color()
        if "val_" + name in logs:
            val_x, val_y = _curve(epochs, logs["val_" + name])
            ax.plot(val_x, val_y, "--", color=color, label="val_" + name)
        ax.set_title(name if name in logs else "val_" + name)
        _label_epochs(ax)
        if name in logs and "val_" + name in logs:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def statistics(history_or_run_dir, path, *, taps=None, title=None):
    """Plots the tap statistics logged by `kt.callbacks.TapStatistics`.

    Four subplots (mean, std, zero fraction, dead channels) with one line
    per tap, from the training keys `<tap>_mean`, `<tap>_std`,
    `<tap>_zero_fraction` and `<tap>_dead_channels`.

    Args:
        history_or_run_dir: A `keras.callbacks.History`, a dict
            `{metric: [value per epoch]}`, or a run directory holding
            `history.json` or `history.csv`.
        path: Where to write the PNG. Parent directories are created.
        taps: A tap name or a list of them to draw. Defaults to every tap
            with statistics.
        title: Figure title.

    Returns:
        The path written, as a `str`.

    Raises:
        ValueError: If the history has no statistics (the callback was not
            used), or `taps` names a tap without statistics.
        FileNotFoundError: If the run directory or its history is missing.
        ImportError: If matplotlib is not installed.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "statistics.png")
    >>> logs = {"conv1_mean": [0.5, 0.4], "conv1_std": [1.0, 0.9],
    ...         "conv1_zero_fraction": [0.3, 0.5],
    ...         "conv1_dead_channels": [0, 2]}
    >>> kt.plot.statistics(logs, path) == path
    True
    """
    epochs, logs = _load_history(history_or_run_dir)
    found = {}
    for key, values in logs.items():
        parsed = None if key.startswith("val_") else _statistic(key)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = values
    if not found:
        raise ValueError(
            "The history has no tap statistics (keys like `<tap>_mean`, "
            "`<tap>_std`, `<tap>_zero_fraction`, `<tap>_dead_channels`). "
            "Add `kt.callbacks.TapStatistics()` to fit's `callbacks=[...]`. "
            f"Keys received: {', '.join(logs)}."
        )
    if taps is not None:
        taps = [taps] if isinstance(taps, str) else list(taps)
        if not taps:
            raise ValueError("`taps` is empty; pass None to draw every tap.")
        for name in taps:
            if name not in found:
                close = difflib.get_close_matches(name, list(found), n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise ValueError(
                    f"No statistics for tap {name!r} in `taps`.{hint} "
                    f"Taps with statistics: {list(found)}."
                )
        found = {name: found[name] for name in taps}
    fig = _figure((10, 6.5), layout="constrained")
    handles = {}
    for index, statistic in enumerate(_STATISTICS):
        ax = fig.add_subplot(2, 2, index + 1)
        for color, (tap, curves) in enumerate(found.items()):
            if statistic in curves:
                (handles[tap],) = ax.plot(
                    *_curve(epochs, curves[statistic]),
                    marker=".",
                    color=f"C{color % 10}",
                    label=tap,
                )
        ax.set_title(statistic.replace("_", " "))
        _label_epochs(ax)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside right upper",
        fontsize="small",
    )
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _figure(figsize, layout=None):
    """Imports matplotlib lazily and returns a `Figure` on an Agg canvas."""
    try:
        importlib.import_module("matplotlib")
        figure = importlib.import_module("matplotlib.figure")
        agg = importlib.import_module("matplotlib.backends.backend_agg")
    except ImportError as error:
        raise ImportError(_MISSING_MATPLOTLIB) from error
    fig = figure.Figure(figsize=figsize, dpi=100, layout=layout)
    agg.FigureCanvasAgg(fig)
    return fig


def _label_epochs(ax):
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)


def _channel_grid(array, max_channels, cols, cmap):
    shown = min(array.shape[-1], max_channels)
    cols = min(cols or math.ceil(math.sqrt(shown)), shown)
    rows = math.ceil(shown / cols)
    size = (max(3.0, 1.3 * cols), 1.4 * rows + 0.6)
    fig = _figure(size, layout="compressed")
    for channel in range(shown):
        values = array[..., channel]
        ax = fig.add_subplot(rows, cols, channel + 1)
        ax.imshow(_normalise(values), cmap=cmap, vmin=0, vmax=1)
        label = str(channel)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() == finite.max():
            # A constant channel draws as one flat colour: say so, so that
            # a dead ReLU channel does not look like a failed drawing.
            label += f" (all {finite.min():.3g})"
        ax.set_title(label, fontsize=7, pad=2)
        ax.set_axis_off()
    return fig


def _normalise(channel):
    """Scales a channel to [0, 1]; a constant channel becomes zeros."""
    finite = channel[np.isfinite(channel)]
    low, high = (finite.min(), finite.max()) if finite.size else (0, 0)
    if high <= low:
        return np.zeros_like(channel)
    return np.clip((channel - low) / (high - low), 0.0, 1.0)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


def _statistic(key):
    """Splits `<tap>_<statistic>` into `(tap, statistic)`, or gives None."""
    for statistic in sorted(_STATISTICS, key=len, reverse=True):
        suffix = "_" + statistic
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], statistic
    return None


def _curve(epochs, values):
    """Returns the x (1-based epochs) and y values of one curve."""
    values = np.asarray(values, dtype="float64").ravel()
    if epochs is not None and len(epochs) == len(values):
        return np.asarray(epochs) + 1, values
    return np.arange(1, len(values) + 1), values


def _load_history(source):
    """Returns `(epochs, {metric: values})`; epochs are 0-based or None.

    Epochs come from `History.epoch` or an `epoch` key or column, which
    Keras writes 0-based; without one, curves are numbered from 1.
    """
    if isinstance(source, keras.callbacks.History):
        logs = dict(source.history)
        logs.setdefault("epoch", list(source.epoch))
    elif isinstance(source, dict):
        logs = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        logs = _read_run_dir(Path(source))
    else:
        raise TypeError(
            "Expected a keras.callbacks.History, a dict {metric: values} or "
            "a run directory with history.json or history.csv. Received: "
            f"{type(source).__name__}"
        )
    epochs = logs.pop("epoch", None)
    keys = [str(key) for key in logs]
    logs = {str(k): v for k, v in logs.items() if np.size(v) > 0}
    if not logs:
        raise ValueError(
            "The history is empty: no metric has any value (did training "
            f"run for at least one epoch?). Received keys: {keys}"
        )
    if epochs is not None:
        epochs = np.asarray(epochs, dtype="float64").ravel()
    return epochs, logs


def _read_run_dir(path):
    if not path.is_dir():
        raise FileNotFoundError(f"No run directory at {str(path)!r}.")
    if (path / "history.json").is_file():
        with open(path / "history.json", encoding="utf-8") as file:
            logs = json.load(file)
        if not isinstance(logs, dict):
            raise ValueError(
                f"{str(path / 'history.json')!r} must hold a JSON object "
                f"{{metric: [values]}}. Received: {type(logs).__name__}"
            )
        return logs
    if (path / "history.csv").is_file():
        with open(path / "history.csv", newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        names = rows[0].keys() if rows else []
        return {k: [float(row[k] or "nan") for row in rows] for k in names}
    raise FileNotFoundError(
        f"No history.json or history.csv in run directory {str(path)!r}."
    )
