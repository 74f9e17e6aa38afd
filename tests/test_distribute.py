"""`MirroredStrategy` over two logical CPUs equals one device.

Logical devices must be configured before TensorFlow initializes its
devices, so the training runs in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute.MirroredStrategy is TensorFlow's own",
)

SCRIPT = textwrap.dedent(
    """
    import sys

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

    import keras
    import numpy as np

    import keras_tap as kt

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(64,))
    feat = rng.normal(size=(64, 5)).astype("float32")
    weight = rng.uniform(0.5, 1.5, size=(64,)).astype("float32")
    targets = {"predictions": y, "feat": feat}

    SCALAR = len(sys.argv) > 2 and sys.argv[2] == "scalar"

    class ScalarMSE(keras.losses.Loss):
        # `call` returns the batch mean itself: Keras does not scale it.
        def call(self, y_true, y_pred):
            return keras.ops.mean(keras.ops.square(y_true - y_pred))

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(
            4, 3, activation="relu", name="conv1",
            kernel_regularizer=keras.regularizers.L2(1e-3),
        )(inputs)
        h = keras.layers.Conv2D(6, 3, activation="relu", name="conv2")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dense(5, activation="tanh", name="feat")(h)
        outputs = keras.layers.Dense(3, name="logits")(h)
        model = keras.Model(inputs, outputs)
        taps = {
            "conv1": kt.Tap(
                "conv1", regularizer=keras.regularizers.L2(1e-2), weight=0.5
            ),
            "conv2": kt.Tap(
                "conv2", regularizer=kt.regularizers.ActivityL2(1e-2)
            ),
            "feat": kt.Tap("feat", loss="mse", weight=0.3),
        }
        if SCALAR:
            taps = {"h": kt.Tap("feat", loss=ScalarMSE(), weight=0.5)}
        tap_model = kt.TapModel(model, taps)
        tap_model.compile(
            keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return tap_model

    def run(strategy):
        with strategy.scope():
            tap_model = build()
        data = {"predictions": y, "h": feat} if SCALAR else targets
        history = tap_model.fit(
            x,
            data,
            sample_weight=None if SCALAR else weight,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
            validation_data=(x, data),
        )
        return tap_model.base.get_weights(), history.history

    single = run(tf.distribute.get_strategy())
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    mirrored = run(strategy)
    arrays = {}
    for tag, (weights, history) in (("single", single), ("mirrored", mirrored)):
        for i, w in enumerate(weights):
            arrays[f"{tag}/w{i}"] = w
        for key, values in history.items():
            arrays[f"{tag}/log/{key}"] = np.asarray(values)
    np.savez(sys.argv[1], **arrays)
    """
)


def _run(tmp_path_factory, mode):
    out = tmp_path_factory.mktemp("distribute") / "results.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run(tmp_path_factory, "taps")


@pytest.fixture(scope="module")
def scalar_results(tmp_path_factory):
    return _run(tmp_path_factory, "scalar")


def _split(results, tag):
    weights = sorted(
        (int(k.split("/w")[1]), v)
        for k, v in results.items()
        if k.startswith(f"{tag}/w")
    )
    logs = {
        k.split("/log/")[1]: v
        for k, v in results.items()
        if k.startswith(f"{tag}/log/")
    }
    return [w for _, w in weights], logs


def test_mirrored_weights_equal_one_device(results):
    single, _ = _split(results, "single")
    mirrored, _ = _split(results, "mirrored")
    assert len(single) == len(mirrored) == 8
    for a, b in zip(mirrored, single):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_mirrored_logged_losses_equal_one_device(results):
    _, single = _split(results, "single")
    _, mirrored = _split(results, "mirrored")
    expected = {"loss", "predictions_loss", "conv1_loss", "conv2_loss"}
    expected |= {"feat_loss"}
    assert set(single) == expected | {f"val_{k}" for k in expected}
    assert set(mirrored) == set(single)
    for key in single:
        assert single[key].shape == (2,)
        np.testing.assert_allclose(
            mirrored[key], single[key], atol=1e-4, err_msg=key
        )


def test_mirrored_loss_returning_a_scalar_equals_one_device(scalar_results):
    # A custom `Loss` whose `call` returns a scalar is not divided by the
    # number of replicas by Keras, so keras_tap must not undo a scaling
    # that did not happen (it counted 2x too strongly on 2 replicas).
    single, single_logs = _split(scalar_results, "single")
    mirrored, mirrored_logs = _split(scalar_results, "mirrored")
    assert {"h_loss", "val_h_loss"} <= set(single_logs)
    for key in single_logs:
        np.testing.assert_allclose(
            mirrored_logs[key], single_logs[key], atol=1e-4, err_msg=key
        )
    for a, b in zip(mirrored, single):
        np.testing.assert_allclose(a, b, atol=1e-4)
