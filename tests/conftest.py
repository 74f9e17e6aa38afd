"""Shared tiny models for the keras_tap tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@keras.saving.register_keras_serializable(package="keras_tap_tests")
class Counter(keras.layers.Layer):
    """The identity, counting its executions in a non-trainable variable."""

    def build(self, input_shape):
        self.count = self.add_weight(
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            name="count",
        )

    def call(self, inputs):
        self.count.assign_add(1)
        return inputs


@pytest.fixture
def x4():
    """Eight samples of four features."""
    return np.random.default_rng(0).normal(size=(8, 4)).astype("float32")


@pytest.fixture
def mlp():
    """`Input(4) -> Dense(8, relu, "hidden") -> Dense(3, "out")`."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="out")(hidden)
    return keras.Model(inputs, outputs, name="mlp")


def dense_ref(layer, x, activation=None):
    """A Dense layer applied in NumPy."""
    kernel, bias = (np.asarray(w) for w in layer.get_weights())
    y = np.asarray(x, np.float64) @ kernel + bias
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y
