"""`evaluate` weights each tap at the optimizer's current step, on every
backend: inside `fit` (once per epoch) and alone after loading weights.

A JAX test step is traced once; a step read from the optimizer while
tracing would stay the step of the first evaluation.
"""

import keras
import numpy as np

import keras_tap as kt

STEPS = 4  # batches per epoch
WARMUP = 40  # LinearWarmup(0, 1, 40): the weight is step / 40


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * 8, 5)).astype("float32")
    y = rng.normal(size=(STEPS * 8, 2)).astype("float32")
    feat = rng.normal(size=(STEPS * 8, 3)).astype("float32")
    return x, y, feat


def _tap_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(3, name="h")(inputs)
    outputs = keras.layers.Dense(2, name="out")(h)
    model = keras.Model(inputs, outputs)
    tap_model = kt.TapModel(
        model,
        {"h": kt.Tap("h", loss="mse",
                     weight=kt.schedules.LinearWarmup(0.0, 1.0, WARMUP))},
    )
    tap_model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return tap_model


def _expected_val_loss(logs, step):
    """The validation loss of its parts, with the weight in NumPy."""
    weight = min(step / WARMUP, 1.0)
    return logs["val_predictions_loss"] + weight * logs["val_h_loss"]


def test_validation_loss_weights_taps_at_each_epochs_step():
    x, y, feat = _data()
    tap_model = _tap_model()
    data = (x, {"predictions": y, "h": feat})
    history = tap_model.fit(
        *data, batch_size=8, epochs=3, shuffle=False, verbose=0,
        validation_data=data,
    ).history
    for epoch in range(3):
        logs = {k: v[epoch] for k, v in history.items()}
        step = (epoch + 1) * STEPS
        np.testing.assert_allclose(
            logs["val_loss"], _expected_val_loss(logs, step), rtol=1e-5
        )
    # The weight moved between epochs: a frozen step would not pass.
    assert history["val_h_loss"][0] > 0


def test_evaluate_after_loading_weights_uses_the_loaded_step(tmp_path):
    x, y, feat = _data()
    trained = _tap_model()
    trained.fit(x, {"predictions": y, "h": feat}, batch_size=8, epochs=2,
                shuffle=False, verbose=0)
    path = str(tmp_path / "tapped.weights.h5")
    trained.save_weights(path)
    fresh = _tap_model()
    fresh.evaluate(x, {"predictions": y, "h": feat}, verbose=0)  # step 0
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 8
    logs = fresh.evaluate(
        x, {"predictions": y, "h": feat}, batch_size=8, verbose=0,
        return_dict=True,
    )
    expected = logs["predictions_loss"] + 8 / WARMUP * logs["h_loss"]
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
