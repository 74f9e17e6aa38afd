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
    "shape",
    [(8, 8, 6), (1, 8, 8, 6), (16,), (1, 16), (12, 5), (1, 12, 5)],
    ids=["cnn", "cnn_batch1", "dense", "dense_batch1", "seq", "seq_batch1"],
)
def test_feature_maps_writes_png(tmp_path, shape):
    activation = np.random.default_rng(0).normal(size=shape)
    path = tmp_path / "sub" / "dir" / "maps.png"
    result = plot.feature_maps(activation, path, title="tap")
    assert result == str(path)
    assert_png(result)


def test_feature_maps_accepts_tensor_and_limits_channels(tmp_path):
    activation = keras.ops.convert_to_tensor(
        np.random.default_rng(1).random((1, 6, 6, 100)), dtype="float32"
    )
    path = plot.feature_maps(
        activation, tmp_path / "maps.png", max_channels=10, cols=5
    )
    assert_png(path)


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


def test_history_from_dict(tmp_path):
    path = plot.history(HISTORY_LOGS, tmp_path / "history.png", title="run")
    assert path == str(tmp_path / "history.png")
    assert_png(path)


def test_history_from_fit(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)]
    )
    model.compile("sgd", "mse", metrics=["mae"])
    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 2).astype("float32")
    fitted = model.fit(x, y, epochs=2, validation_split=0.25, verbose=0)
    assert_png(plot.history(fitted, tmp_path / "history.png"))


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


def test_statistics_from_dict(tmp_path):
    path = plot.statistics(statistics_logs(), tmp_path / "stats.png")
    assert_png(path)
    restricted = plot.statistics(
        statistics_logs(), tmp_path / "one.png", taps="block/conv2@1"
    )
    assert_png(restricted)


def test_statistics_from_run_dir(tmp_path):
    logs = {k: [float(v) for v in vs] for k, vs in statistics_logs().items()}
    (tmp_path / "history.json").write_text(json.dumps(logs))
    assert_png(plot.statistics(tmp_path, tmp_path / "s.png", taps=["conv1"]))


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
