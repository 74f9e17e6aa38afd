import os
import re

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


def _tensorboard_scalars(log_dir):
    """Reads `{tag: {epoch: value}}` back from TensorBoard event files."""
    import tensorflow as tf

    scalars = {}
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(log_dir)
        for name in names
        if "tfevents" in name
    )
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    number = tf.make_ndarray(value.tensor)
                elif value.HasField("simple_value"):
                    number = value.simple_value
                else:
                    continue  # an image or graph summary
                scalars.setdefault(value.tag, {})[event.step] = float(number)
    return scalars


@pytest.mark.parametrize("tensorboard_first", [False, True],
                         ids=["statistics_first", "tensorboard_first"])
def test_statistics_in_tensorboard(tmp_path, tensorboard_first):
    """The epoch statistics reach TensorBoard with History's values.

    TensorBoard writes each epoch's training logs as `epoch_<key>` scalars
    in `train/`, and the validation logs (without `val_`) in
    `validation/`. The statistics are training-only, and are there in
    whichever order the two callbacks are given.
    """
    x, y = _data()
    statistics_keys = [
        f"{tap}_{statistic}"
        for tap in ("conv", "dense")
        for statistic in ("mean", "std", "zero_fraction", "dead_channels")
    ]

    def fit(log_dir, with_statistics):
        keras.utils.set_random_seed(0)
        tap_model = kt.TapModel(_model(), ["conv", "dense"])
        tap_model.compile("sgd", "mse")
        callbacks = [keras.callbacks.TensorBoard(str(log_dir))]
        if with_statistics:
            statistics = kt.callbacks.TapStatistics()
            if tensorboard_first:
                callbacks.append(statistics)
            else:
                callbacks.insert(0, statistics)
        history = tap_model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                                validation_split=0.25, callbacks=callbacks)
        return history.history

    history = fit(tmp_path / "with", with_statistics=True)
    train = _tensorboard_scalars(tmp_path / "with" / "train")
    validation = _tensorboard_scalars(tmp_path / "with" / "validation")
    # The reader works: the loss is there, equal to History's.
    np.testing.assert_allclose(
        [train["epoch_loss"][epoch] for epoch in (0, 1)],
        history["loss"], rtol=0, atol=1e-6,
    )
    for key in statistics_keys:
        assert len(history[key]) == 2, key
        assert "epoch_" + key in train, (
            f"{key!r} is in History but not in TensorBoard; TensorBoard "
            f"has {sorted(train)}"
        )
        logged = train["epoch_" + key]
        assert sorted(logged) == [0, 1], (key, logged)
        np.testing.assert_allclose(
            [logged[0], logged[1]], history[key], rtol=0, atol=1e-6,
            err_msg=key,
        )
        assert "epoch_" + key not in validation, key
    assert "epoch_loss" in validation
    # Channel 1 of the conv is dead (see _model), in every epoch.
    assert train["epoch_conv_dead_channels"] == {0: 1.0, 1: 1.0}

    fit(tmp_path / "without", with_statistics=False)
    plain = _tensorboard_scalars(tmp_path / "without" / "train")
    assert "epoch_loss" in plain
    leaked = [
        tag for tag in plain
        if tag.removeprefix("epoch_") in statistics_keys
    ]
    assert not leaked, f"statistics logged without TapStatistics: {leaked}"


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


def test_statistics_rebuild_the_train_function_only_when_the_set_changes():
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
    # The same set (a new callback asking for the same taps): reused.
    assert fit([kt.callbacks.TapStatistics(taps=["conv"])]) is with_stats
    plain = fit([])
    assert plain is not with_stats
    assert fit([]) is plain
    every_other = fit([kt.callbacks.TapStatistics(every=2)])
    assert every_other not in (plain, with_stats)
    assert fit([kt.callbacks.TapStatistics(every=2)]) is every_other
    # A new compile builds a new one: the new optimizer must be used.
    tap_model.compile("adam", "mse")
    assert fit([kt.callbacks.TapStatistics(every=2)]) is not every_other


def test_statistics_stay_out_of_the_progress_bar(capsys):
    tap_model = kt.TapModel(
        _model(),
        {
            "c": kt.Tap("conv", regularizer=kt.regularizers.ActivityL1()),
            "d": kt.Tap("dense", regularizer=kt.regularizers.ActivityL2()),
        },
    )
    tap_model.compile("sgd", "mse")
    x, y = _data()
    capsys.readouterr()
    history = tap_model.fit(x, y, batch_size=16, epochs=2, verbose=1,
                            callbacks=[kt.callbacks.TapStatistics()])
    out = capsys.readouterr().out
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # colours
    lines = re.split(r"[\r\n\x08]+", out)
    progress = [line for line in lines if "loss" in line]
    assert progress
    assert max(len(line) for line in progress) <= 120, progress
    assert not any("_mean" in line or "_std" in line for line in progress)
    for key in ("c_loss", "d_loss", "predictions_loss"):
        assert key in progress[-1]
    for name in ("c", "d"):
        for stat in ("mean", "std", "zero_fraction", "dead_channels"):
            assert len(history.history[f"{name}_{stat}"]) == 2


def test_statistics_reach_callbacks_listed_before_them():
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(dict(logs))

    tap_model = kt.TapModel(_model(), ["dense"])
    tap_model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _data()
    history = tap_model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                            callbacks=[Record(), kt.callbacks.TapStatistics()])
    _, taps = tap_model.predict(x, verbose=0)
    assert seen[0]["dense_mean"] == pytest.approx(taps["dense"].mean(),
                                                  rel=1e-4)
    assert history.history["dense_mean"] == [seen[0]["dense_mean"]]


def test_one_statistics_callback_per_fit():
    tap_model = kt.TapModel(_model(), ["conv", "dense"])
    tap_model.compile("sgd", "mse")
    x, y = _data()
    with pytest.raises(ValueError, match="one kt.callbacks.TapStatistics"):
        tap_model.fit(x, y, epochs=1, verbose=0, callbacks=[
            kt.callbacks.TapStatistics(taps=["conv"]),
            kt.callbacks.TapStatistics(taps=["dense"]),
        ])
