"""Saving and loading a `TapModel`: `.keras` round trips in safe mode."""

import inspect
import json

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_tap as kt

N, B = 16, 8


def functional_base():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    return keras.Model(inputs, outputs, name="cnn")


def sequential_base():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
            keras.layers.Conv2D(6, 3, activation="relu", name="conv2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(3, name="logits"),
        ],
        name="seq",
    )


def sequential_base_without_input():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
            keras.layers.Conv2D(6, 3, activation="relu", name="conv2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(3, name="logits"),
        ],
        name="seq_built_by_a_call",
    )
    model(np.zeros((2, 8, 8, 3), "float32"))
    return model


def student_taps():
    keras.utils.set_random_seed(5)
    return {
        "conv1": kt.Tap("conv1", regularizer=keras.regularizers.L2(1e-3)),
        "conv2": kt.Tap(
            "conv2",
            regularizer=kt.regularizers.DeCov(0.1),
            weight=kt.schedules.LinearWarmup(0.0, 1.0, steps=5),
        ),
        "gap": kt.Tap(
            "gap",
            loss=kt.losses.CosineFeature(),
            adapter=keras.Sequential(
                [keras.layers.Dense(5, activation="tanh")], name="gap_head"
            ),
            weight=0.5,
            metrics=["mae"],
        ),
        "aux": kt.Tap(
            "conv2",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            target="predictions",
            adapter=keras.Sequential(
                [keras.layers.GlobalMaxPooling2D(), keras.layers.Dense(3)],
                name="aux_head",
            ),
            weight=0.3,
            metrics=["accuracy"],
        ),
    }


def teacher_setup():
    student = functional_base()
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, activation="relu", name="t_conv1")(inputs)
    h = keras.layers.BatchNormalization(name="t_bn")(h)
    h = keras.layers.GlobalAveragePooling2D(name="t_gap")(h)
    teacher = keras.Model(inputs, keras.layers.Dense(3)(h), name="teacher")
    keras.utils.set_random_seed(5)
    taps = {
        "hint": kt.Tap(
            "conv1",
            teacher="t_conv1",
            loss=kt.losses.FeatureMSE(),
            adapter=keras.layers.Conv2D(8, 1, name="regressor"),
        ),
        "attention": kt.Tap(
            "conv1", teacher="t_conv1", loss=kt.losses.AttentionTransfer()
        ),
    }
    return kt.TapModel(student, taps, teacher=teacher)


SETUPS = {
    "functional": lambda: kt.TapModel(functional_base(), student_taps()),
    "sequential": lambda: kt.TapModel(sequential_base(), student_taps()),
    "sequential_no_input": lambda: kt.TapModel(
        sequential_base_without_input(), student_taps()
    ),
    "teacher": teacher_setup,
}


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(N,))
    gap = rng.normal(size=(N, 5)).astype("float32")
    return x, y, gap


def targets(tap_model, y, gap):
    if "gap" in tap_model.taps:
        return {"predictions": y, "gap": gap}
    return y


def trained(setup):
    tap_model = SETUPS[setup]()
    tap_model.compile(
        keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y, gap = data()
    tap_model.fit(
        x, targets(tap_model, y, gap), batch_size=B, shuffle=False, verbose=0
    )
    return tap_model


def as_json(config):
    return json.loads(json.dumps(config))


def assert_all_equal(actual, expected, atol=0.0):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, atol=atol)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_save_load_round_trip_keeps_training(setup, tmp_path):
    tap_model = trained(setup)
    path = str(tmp_path / f"{setup}.keras")
    tap_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)

    assert type(loaded) is kt.TapModel
    assert loaded.tap_names == tap_model.tap_names
    assert as_json(loaded.get_config()["taps"]) == as_json(
        tap_model.get_config()["taps"]
    )
    for name, tap in tap_model.taps.items():
        assert repr(loaded.taps[name]) == repr(tap)
    assert len(loaded.adapters) == len(tap_model.adapters)
    for new, old in zip(loaded.adapters, tap_model.adapters):
        assert new is not old
        assert_all_equal(new.get_weights(), old.get_weights())
    assert_all_equal(loaded.base.get_weights(), tap_model.base.get_weights())
    if tap_model.teacher is not None:
        trainable = {id(w) for w in loaded.trainable_weights}
        assert not any(id(w) in trainable for w in loaded.teacher.weights)
        assert_all_equal(
            loaded.teacher.get_weights(), tap_model.teacher.get_weights()
        )

    x, y, gap = data(seed=1)
    (p_old, t_old), (p_new, t_new) = to_numpy((tap_model(x), loaded(x)))
    np.testing.assert_allclose(p_new, p_old, atol=1e-6)
    assert list(t_new) == list(t_old)
    for name in t_old:
        np.testing.assert_allclose(t_new[name], t_old[name], atol=1e-6)
    np.testing.assert_allclose(
        loaded.base.predict(x, verbose=0), p_old, atol=1e-6
    )

    assert int(loaded.optimizer.iterations) == N // B
    assert_all_equal(
        [v.numpy() for v in loaded.optimizer.variables],
        [v.numpy() for v in tap_model.optimizer.variables],
    )

    batch = targets(tap_model, y[:B], gap[:B])
    logs = []
    for model in (tap_model, loaded):
        history = model.fit(x[:B], batch, batch_size=B, verbose=0)
        logs.append({k: v[0] for k, v in history.history.items()})
    assert logs[0].keys() == logs[1].keys()
    for key in logs[0]:
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5), key
    assert_all_equal(
        loaded.trainable_weights and [w.numpy() for w in loaded.weights],
        [w.numpy() for w in tap_model.weights],
        atol=1e-6,
    )


def test_loading_needs_no_unsafe_deserialization(tmp_path):
    tap_model = trained("functional")
    path = str(tmp_path / "m.keras")
    tap_model.save(path)
    config = tap_model.get_config()
    text = repr(config)
    assert "lambda" not in text and "__lambda__" not in text
    restored = kt.TapModel.from_config(config)
    assert restored.tap_names == tap_model.tap_names


KERAS_OBJECTS = (
    keras.layers.Layer,
    keras.losses.Loss,
    keras.metrics.Metric,
    keras.regularizers.Regularizer,
    keras.callbacks.Callback,
    kt.schedules.Schedule,
)


def _public_classes(module):
    names = getattr(module, "__all__", None)
    for name, obj in vars(module).items():
        if not inspect.isclass(obj) or name.startswith("_"):
            continue
        if name in (names or ()) or obj.__module__ == module.__name__:
            yield obj


@pytest.mark.parametrize(
    "module",
    [kt.losses, kt.regularizers, kt.schedules, kt.callbacks],
    ids=lambda m: m.__name__,
)
def test_every_class_is_registered(module):
    classes = [
        c for c in _public_classes(module) if issubclass(c, KERAS_OBJECTS)
    ]
    assert classes
    for cls in classes:
        name = keras.saving.get_registered_name(cls)
        assert name == f"keras_tap>{cls.__name__}", cls
        assert keras.saving.get_registered_object(name) is cls


def test_tap_model_and_tap_are_registered():
    for cls in (kt.TapModel, kt.Tap):
        name = keras.saving.get_registered_name(cls)
        assert name == f"keras_tap>{cls.__name__}"
        assert keras.saving.get_registered_object(name) is cls


def test_tap_config_round_trip():
    for tap in student_taps().values():
        config = tap.get_config()
        again = kt.Tap.from_config(config)
        assert again.get_config() == config
