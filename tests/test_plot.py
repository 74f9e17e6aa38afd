import csv
import doctest
import json
import sys

import keras
import numpy as np
import pytest

import keras_tap
from keras_tap.inspect import plot

matplotlib_image = pytest.importorskip("matplotlib.image")


def assert_png(path, min_size=100):
    image = matplotlib_image.imread(path)
    height, width = image.shape[:2]
    assert width > min_size and height > min_size
    assert np.var(image) > 0


@pytest.fixture
def saved_figures(monkeypatch):
    """Records every matplotlib `Figure` that is saved, in order.

    kt.plot returns only the path it wrote, so the figure is caught where
    matplotlib saves it (a hook on matplotlib's own `Figure.savefig`, which
    still writes the file), to count its panels and read what they show.
    """
    figure = pytest.importorskip("matplotlib.figure")
    saved = []
    savefig = figure.Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(figure.Figure, "savefig", record)
    return saved


def panels(fig):
    """The visible data panels of a figure, colorbars left out."""
    return [
        ax for ax in fig.axes
        if ax.get_visible() and ax.get_label() != "<colorbar>"
    ]


def minmax(values):
    """NumPy reference of a channel image scaled to [0, 1]."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low)


def statistics_logs(taps=("conv1", "block/conv2@1"), epochs=3):
    rng = np.random.default_rng(0)
    logs = {"loss": list(np.linspace(1.0, 0.5, epochs))}
    for tap in taps:
        logs[f"{tap}_mean"] = list(rng.random(epochs))
        logs[f"{tap}_std"] = list(rng.random(epochs) + 0.5)
        logs[f"{tap}_zero_fraction"] = list(rng.random(epochs))
        logs[f"{tap}_dead_channels"] = [0, 1, 3][:epochs]
        logs[f"val_{tap}_mean"] = list(rng.random(epochs))
    return logs


HISTORY_LOGS = {
    "loss": [1.2, 0.8, 0.6],
    "predictions_loss": [1.0, 0.7, 0.55],
    "conv1_loss": [0.2, 0.1, 0.05],
    "accuracy": [0.5, 0.7, 0.8],
    "val_loss": [1.3, 0.9, 0.7],
    "val_accuracy": [0.4, 0.6, 0.7],
    "conv1_mean": [0.1, 0.2, 0.3],
}


@pytest.mark.parametrize(
    "shape, panel_count, kind",
    [
        ((8, 8, 6), 6, "grid"),
        ((1, 8, 8, 6), 6, "grid"),
        ((16,), 1, "bars"),
        ((1, 16), 1, "bars"),
        ((12, 5), 1, "heatmap"),
        ((1, 12, 5), 1, "heatmap"),
    ],
    ids=["cnn", "cnn_batch1", "dense", "dense_batch1", "seq", "seq_batch1"],
)
def test_feature_maps_writes_png(tmp_path, saved_figures, shape,
                                 panel_count, kind):
    activation = np.random.default_rng(0).normal(size=shape)
    path = tmp_path / "sub" / "dir" / "maps.png"
    result = plot.feature_maps(activation, path, title="tap")
    assert result == str(path)
    assert_png(result)
    (fig,) = saved_figures
    drawn = panels(fig)
    assert len(drawn) == panel_count
    sample = activation.reshape(shape[1:] if len(shape) > 1 and shape[0] == 1
                                else shape)
    if kind == "grid":
        # One panel per channel, labelled with its index, showing that
        # channel scaled to its own min/max.
        assert [ax.get_title() for ax in drawn] == [str(c) for c in range(6)]
        for channel, ax in enumerate(drawn):
            np.testing.assert_allclose(
                ax.images[0].get_array(), minmax(sample[..., channel]),
                rtol=1e-5, atol=1e-6,
            )
    elif kind == "bars":
        heights = [patch.get_height() for patch in drawn[0].patches]
        np.testing.assert_allclose(heights, sample, rtol=1e-6)
    else:
        # Channels against time, with a colorbar beside the heatmap.
        assert len(fig.axes) == 2
        np.testing.assert_allclose(
            drawn[0].images[0].get_array(), sample.T, rtol=1e-6
        )


@pytest.mark.parametrize(
    "channels, max_channels, cols, shown, grid",
    [
        (100, 10, 5, 10, (2, 5)),
        (100, 10, 4, 10, (3, 4)),
        (100, 10, None, 10, (3, 4)),
        (65, 64, None, 64, (8, 8)),
        (64, 64, None, 64, (8, 8)),
        (3, 64, None, 3, (2, 2)),
        (6, 64, 10, 6, (1, 6)),
    ],
)
def test_feature_maps_limits_channels(
    tmp_path, saved_figures, channels, max_channels, cols, shown, grid
):
    """C channels draw min(C, max_channels) panels: the first ones."""
    values = np.random.default_rng(1).random((1, 6, 6, channels))
    activation = keras.ops.convert_to_tensor(values, dtype="float32")
    path = plot.feature_maps(
        activation, tmp_path / "maps.png", max_channels=max_channels,
        cols=cols,
    )
    assert_png(path)
    (fig,) = saved_figures
    drawn = panels(fig)
    assert len(drawn) == shown
    assert [ax.get_title() for ax in drawn] == [str(c) for c in range(shown)]
    for ax in drawn:
        rows, columns, _, _ = ax.get_subplotspec().get_geometry()
        assert (rows, columns) == grid
    np.testing.assert_allclose(
        drawn[-1].images[0].get_array(),
        minmax(values[0, ..., shown - 1].astype("float32")),
        rtol=1e-5, atol=1e-6,
    )
    suptitle = fig.get_suptitle()
    if channels > max_channels:
        assert f"first {max_channels} of {channels} channels" in suptitle
    else:
        assert "first" not in suptitle


def test_feature_maps_constant_channel_is_finite(tmp_path):
    activation = np.zeros((8, 8, 4))
    activation[..., 1] = 3.0
    activation[..., 2] = np.arange(64).reshape(8, 8)
    assert np.all(np.isfinite(plot._normalise(activation[..., 1])))
    np.testing.assert_allclose(
        plot._normalise(activation[..., 2]),
        np.arange(64).reshape(8, 8) / 63,
    )
    assert_png(plot.feature_maps(activation, tmp_path / "maps.png"))


def test_feature_maps_labels_constant_channels_with_their_value():
    """A dead ReLU channel draws as one flat colour; its label says so."""
    activation = np.zeros((8, 8, 4), dtype="float32")
    activation[..., 1] = 0.25
    activation[..., 2] = np.arange(64).reshape(8, 8)
    activation[0, 0, 3] = np.nan  # a constant channel with a NaN in it
    activation[..., 3] = np.where(np.isnan(activation[..., 3]), np.nan, 2.0)
    fig = plot._channel_grid(activation, 64, None, "viridis")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["0 (all 0)", "1 (all 0.25)", "2", "3 (all 2)"]


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((4, 8, 8, 6), {}, r"Received shape \(4, 8, 8, 6\).*activation\[0\]"),
        ((1, 2, 8, 8, 6), {}, r"\(H, W, C\).*Received shape"),
        ((), {}, r"Received shape \(\)"),
        ((0, 3), {}, r"Received shape \(0, 3\)"),
        ((8, 8, 6), {"max_channels": 0}, "max_channels"),
        ((8, 8, 6), {"cols": 2.5}, "cols"),
    ],
)
def test_feature_maps_invalid(tmp_path, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot.feature_maps(np.ones(shape), tmp_path / "x.png", **kwargs)


def test_history_from_dict(tmp_path, saved_figures):
    path = plot.history(HISTORY_LOGS, tmp_path / "history.png", title="run")
    assert path == str(tmp_path / "history.png")
    assert_png(path)
    (fig,) = saved_figures
    assert fig.get_suptitle() == "run"
    # One panel per loss family and metric, `val_` beside its training
    # curve, the total first, then the prediction and tap losses, then
    # metrics; the TapStatistics key conv1_mean is not drawn.
    drawn = panels(fig)
    assert [ax.get_title() for ax in drawn] == [
        "loss", "predictions_loss", "conv1_loss", "accuracy",
    ]
    curves = {
        ax.get_title(): {
            line.get_label(): (line.get_xdata(), line.get_ydata(),
                               line.get_linestyle())
            for line in ax.get_lines()
        }
        for ax in drawn
    }
    assert sorted(curves["loss"]) == ["loss", "val_loss"]
    assert sorted(curves["predictions_loss"]) == ["predictions_loss"]
    assert sorted(curves["accuracy"]) == ["accuracy", "val_accuracy"]
    for family, labels in curves.items():
        for label, (x, y, style) in labels.items():
            np.testing.assert_array_equal(x, [1, 2, 3])
            np.testing.assert_allclose(y, HISTORY_LOGS[label])
            assert style == ("--" if label.startswith("val_") else "-")


def test_history_from_fit(tmp_path, saved_figures):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)]
    )
    model.compile("sgd", "mse", metrics=["mae"])
    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 2).astype("float32")
    fitted = model.fit(x, y, epochs=2, validation_split=0.25, verbose=0)
    assert_png(plot.history(fitted, tmp_path / "history.png"))
    (fig,) = saved_figures
    drawn = panels(fig)
    assert [ax.get_title() for ax in drawn] == ["loss", "mae"]
    for ax in drawn:
        name = ax.get_title()
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == [name, "val_" + name]
        np.testing.assert_allclose(
            lines[name].get_ydata(), fitted.history[name]
        )


def test_history_from_run_dir_json_preferred(tmp_path):
    (tmp_path / "history.json").write_text(json.dumps(HISTORY_LOGS))
    (tmp_path / "history.csv").write_text("not,a,history\n")
    assert_png(plot.history(tmp_path, tmp_path / "plots" / "h.png"))
    assert_png(plot.history(str(tmp_path), tmp_path / "h2.png"))


def test_history_from_run_dir_csv(tmp_path):
    with open(tmp_path / "history.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "loss", "conv1_loss", "val_loss"])
        for epoch in range(4):
            writer.writerow([epoch, 1 / (epoch + 1), 0.1 * epoch, 1.0])
    assert_png(plot.history(tmp_path, tmp_path / "h.png"))
    epochs, logs = plot._load_history(tmp_path)
    np.testing.assert_array_equal(epochs, [0, 1, 2, 3])
    assert list(logs) == ["loss", "conv1_loss", "val_loss"]
    np.testing.assert_allclose(logs["loss"], [1, 1 / 2, 1 / 3, 1 / 4])


def test_history_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="history.json or history.csv"):
        plot.history(tmp_path, tmp_path / "h.png")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot.history(tmp_path / "nowhere", tmp_path / "h.png")
    with pytest.raises(ValueError, match="empty"):
        plot.history({}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="empty"):
        plot.history({"loss": []}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="statistics"):
        plot.history({"conv1_mean": [1.0]}, tmp_path / "h.png")
    with pytest.raises(TypeError, match="History"):
        plot.history([1.0, 2.0], tmp_path / "h.png")


@pytest.mark.parametrize(
    "taps, drawn_taps",
    [
        (None, ["conv1", "block/conv2@1"]),
        ("block/conv2@1", ["block/conv2@1"]),
        (["block/conv2@1", "conv1"], ["block/conv2@1", "conv1"]),
    ],
)
def test_statistics_from_dict(tmp_path, saved_figures, taps, drawn_taps):
    logs = statistics_logs()
    path = plot.statistics(logs, tmp_path / "stats.png", taps=taps)
    assert_png(path)
    (fig,) = saved_figures
    # One panel per statistic, one line per drawn tap in each; the
    # validation statistics (`val_<tap>_mean`) are not drawn.
    drawn = panels(fig)
    assert [ax.get_title() for ax in drawn] == [
        "mean", "std", "zero fraction", "dead channels",
    ]
    for ax, statistic in zip(
        drawn, ("mean", "std", "zero_fraction", "dead_channels")
    ):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == drawn_taps
        for line in lines:
            np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
            np.testing.assert_allclose(
                line.get_ydata(), logs[f"{line.get_label()}_{statistic}"]
            )
    # A tap keeps its colour in every panel, and the legend names each
    # drawn tap once.
    colours = {
        line.get_label(): line.get_color() for line in drawn[0].get_lines()
    }
    for ax in drawn[1:]:
        for line in ax.get_lines():
            assert line.get_color() == colours[line.get_label()]
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == drawn_taps


def test_statistics_from_run_dir(tmp_path, saved_figures):
    logs = {k: [float(v) for v in vs] for k, vs in statistics_logs().items()}
    (tmp_path / "history.json").write_text(json.dumps(logs))
    assert_png(plot.statistics(tmp_path, tmp_path / "s.png", taps=["conv1"]))
    (fig,) = saved_figures
    drawn = panels(fig)
    assert len(drawn) == 4
    np.testing.assert_allclose(
        drawn[3].get_lines()[0].get_ydata(), logs["conv1_dead_channels"]
    )


def test_statistics_unknown_tap_suggests(tmp_path):
    with pytest.raises(ValueError, match=r"'conv' .*Did you mean.*conv1"):
        plot.statistics(statistics_logs(), tmp_path / "s.png", taps=["conv"])


def test_statistics_without_callback(tmp_path):
    with pytest.raises(ValueError, match=r"kt\.callbacks\.TapStatistics\(\)"):
        plot.statistics(HISTORY_LOGS | {"conv1_mean": []}, tmp_path / "s.png")
    with pytest.raises(ValueError, match="TapStatistics"):
        plot.statistics({"val_conv1_mean": [1.0]}, tmp_path / "s.png")


def test_statistic_key_parsing():
    assert plot._statistic("a/b@1_zero_fraction") == ("a/b@1", "zero_fraction")
    assert plot._statistic("x_dead_channels") == ("x", "dead_channels")
    assert plot._statistic("x_std") == ("x", "std")
    assert plot._statistic("_mean") is None
    assert plot._statistic("conv1_loss") is None


def test_missing_matplotlib_raises_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match='pip install "keras-tap\\[plot\\]"'):
        plot.feature_maps(np.ones((4, 4, 2)), tmp_path / "x.png")
    with pytest.raises(ImportError, match="keras-tap"):
        plot.history(HISTORY_LOGS, tmp_path / "h.png")
    assert not (tmp_path / "x.png").exists()


def test_docstring_examples():
    results = doctest.testmod(
        plot, extraglobs={"kt": keras_tap, "np": np}, verbose=False
    )
    assert results.attempted > 0
    assert results.failed == 0
