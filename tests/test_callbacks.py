import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_tap as kt  # noqa: E402


def _model():
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(conv)
    dense = keras.layers.Dense(5, activation="relu", name="dense")(pooled)
    outputs = keras.layers.Dense(2, name="head")(dense)
    model = keras.Model(inputs, outputs)
    # Channel 1 of the conv is dead: a large negative bias after ReLU.
    kernel, bias = model.get_layer("conv").get_weights()
    bias[1] = -1e3
    model.get_layer("conv").set_weights([kernel, bias])
    return model


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def _reference(values):
    flat = values.reshape(-1, values.shape[-1])
    return {
        "mean": flat.mean(),
        "std": flat.std(),
        "zero_fraction": (flat == 0).mean(),
        "dead_channels": float((np.abs(flat).sum(0) == 0).sum()),
    }


def test_statistics_match_numpy():
    model = _model()
    tap_model = kt.TapModel(model, ["conv", "dense"])
    # lr 0: the weights do not move, so the epoch statistics are those of
    # the whole data set under the fixed weights.
    tap_model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _data()
    history = tap_model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[kt.callbacks.TapStatistics()],
    )
    _, taps = tap_model.predict(x, verbose=0)
    for name in ("conv", "dense"):
        expected = _reference(taps[name])
        for stat, value in expected.items():
            logged = history.history[f"{name}_{stat}"]
            assert len(logged) == 2
            np.testing.assert_allclose(logged, [value] * 2, rtol=1e-4,
                                       atol=1e-6)
    assert history.history["conv_dead_channels"][0] == 1.0


def test_statistics_not_in_validation_logs():
    tap_model = kt.TapModel(_model(), ["conv"])
    tap_model.compile("sgd", "mse")
    x, y = _data()
    history = tap_model.fit(x, y, epochs=2, verbose=0, validation_split=0.25,
                            callbacks=[kt.callbacks.TapStatistics()])
    assert "conv_mean" in history.history
    assert not [k for k in history.history if k.startswith("val_conv")]
    assert "val_loss" in history.history


def test_statistics_every_and_subset():
    model = _model()
    tap_model = kt.TapModel(model, ["conv", "dense"])
    tap_model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _data()
    history = tap_model.fit(
        x,
        y,
        batch_size=16,
        shuffle=False,
        epochs=1,
        verbose=0,
        callbacks=[kt.callbacks.TapStatistics(taps=["dense"], every=2)],
    )
    assert "conv_mean" not in history.history
    # Batches 0 and 2 of 3 (optimizer steps 0 and 2).
    _, taps = tap_model.predict(x, verbose=0)
    seen = np.concatenate([taps["dense"][:16], taps["dense"][32:48]])
    np.testing.assert_allclose(
        history.history["dense_mean"][0], seen.mean(), rtol=1e-4
    )


def test_statistics_switch_off_after_training():
    tap_model = kt.TapModel(_model(), ["conv"])
    tap_model.compile("sgd", "mse")
    x, y = _data()
    tap_model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[kt.callbacks.TapStatistics()])
    history = tap_model.fit(x, y, epochs=1, verbose=0)
    assert sorted(history.history) == ["loss", "predictions_loss"]


def test_statistics_in_tensorboard(tmp_path):
    tap_model = kt.TapModel(_model(), ["dense"])
    tap_model.compile("sgd", "mse")
    x, y = _data()
    tap_model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[
            kt.callbacks.TapStatistics(),
            keras.callbacks.TensorBoard(str(tmp_path)),
        ],
    )
    events = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert any("tfevents" in f for f in events)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"taps": []}, "non-empty list"),
        ({"taps": [3]}, "non-empty list"),
        ({"every": 0}, "positive int"),
        ({"every": 1.5}, "positive int"),
        ({"every": True}, "positive int"),
    ],
)
def test_statistics_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kt.callbacks.TapStatistics(**kwargs)


def test_statistics_unknown_tap():
    tap_model = kt.TapModel(_model(), ["conv"])
    tap_model.compile("sgd", "mse")
    x, y = _data()
    with pytest.raises(ValueError, match=r"'conf'.*Closest: \['conv'\]"):
        tap_model.fit(x, y, epochs=1, verbose=0,
                      callbacks=[kt.callbacks.TapStatistics(taps=["conf"])])


def test_statistics_needs_tap_model():
    model = _model()
    model.compile("sgd", "mse")
    x, y = _data()
    with pytest.raises(TypeError, match="kt.TapModel"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[kt.callbacks.TapStatistics()])


def test_statistics_metric_serialization():
    metric = kt.callbacks.TapStatisticsMetric("conv", 4)
    config = keras.saving.serialize_keras_object(metric)
    restored = keras.saving.deserialize_keras_object(config)
    assert restored.get_config() == metric.get_config()
    callback = kt.callbacks.TapStatistics(taps=["a"], every=3)
    assert kt.callbacks.TapStatistics(**callback.get_config()).every == 3


def test_statistics_train_functions_are_reused():
    tap_model = kt.TapModel(_model(), ["conv"])
    tap_model.compile("sgd", "mse")
    x, y = _data()
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self.model.train_function)

    def fit(callbacks):
        tap_model.fit(x, y, epochs=1, batch_size=48, verbose=0,
                      callbacks=callbacks + [Record()])
        return seen[-1]

    with_stats = fit([kt.callbacks.TapStatistics()])
    plain = fit([])
    assert with_stats is not plain
    assert fit([kt.callbacks.TapStatistics()]) is with_stats
    assert fit([]) is plain
    # A new compile forgets them: the new optimizer must be used.
    tap_model.compile("adam", "mse")
    assert fit([kt.callbacks.TapStatistics()]) is not with_stats
