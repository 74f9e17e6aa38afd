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


# -- the same tests on every Keras backend -----------------------------------

BACKEND = keras.backend.backend()


def to_numpy(value):
    """Any backend's tensor (or a nested structure of them) as NumPy: a
    PyTorch tensor that requires grad, a JAX array, a `tf.Tensor`."""
    return keras.tree.map_structure(
        lambda v: v if v is None else keras.ops.convert_to_numpy(v), value
    )


def run_tap_model(tap_model, x, how):
    """`(predictions, taps)` as NumPy from a `TapModel` called directly
    (`how="call"`), through `predict`, or through `extract` (predictions
    `None`)."""
    if how == "call":
        predictions, taps = tap_model(x)
        return to_numpy(predictions), to_numpy(taps)
    if how == "predict":
        return tap_model.predict(x, verbose=0)
    return None, tap_model.extract(x, verbose=0)


def dtype_name(value):
    """The Keras name of a tensor's dtype (`"float32"`), on any backend."""
    return keras.backend.standardize_dtype(value.dtype)


def value_and_grad(fn, variables):
    """`(fn(), d fn() / d variables)` with the active backend's autodiff,
    written as a user of that backend writes it: a `tf.GradientTape`,
    `torch.autograd.grad`, or `jax.value_and_grad` over the variables'
    values (in a `keras.StatelessScope`). An independent reference for
    keras_tap's training steps.

    Args:
        fn: a function of no arguments returning a scalar; it reads the
            variables (`model(x)`, `variable.value`, ...).
        variables: a list of `keras.Variable`s.

    Returns:
        `(value, grads)`, both NumPy; a gradient is zeros where `fn` does
        not depend on the variable.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, variables)
    elif BACKEND == "torch":
        import torch

        value = fn()
        grads = torch.autograd.grad(
            value, [v.value for v in variables], allow_unused=True
        )
    elif BACKEND == "jax":
        import jax

        def pure(values):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values))
            ):
                return fn()

        value, grads = jax.value_and_grad(pure)(
            [v.value for v in variables]
        )
    else:  # pragma: no cover - the tests run on these three
        raise NotImplementedError(BACKEND)
    grads = [
        np.zeros(v.shape, "float32") if g is None else to_numpy(g)
        for v, g in zip(variables, grads)
    ]
    return to_numpy(value), grads


def assert_close(actual, expected, rtol=1e-7, atol=0.0):
    """`np.testing.assert_allclose` on any backend's tensors."""
    np.testing.assert_allclose(
        to_numpy(actual), to_numpy(expected), rtol=rtol, atol=atol
    )


def grad_at(fn, value):
    """`(fn(value), d fn / d value)` for an array `value` and a scalar
    `fn`, with the active backend's autodiff (`tf.GradientTape`,
    `torch.autograd.grad`, `jax.value_and_grad`); both NumPy."""
    value = keras.ops.convert_to_tensor(to_numpy(value))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(value)
            out = fn(value)
        grad = tape.gradient(out, value)
    elif BACKEND == "torch":
        import torch

        value = value.detach().requires_grad_(True)
        out = fn(value)
        (grad,) = torch.autograd.grad(out, value, allow_unused=True)
    elif BACKEND == "jax":
        import jax

        out, grad = jax.value_and_grad(fn)(value)
    else:  # pragma: no cover - the tests run on these three
        raise NotImplementedError(BACKEND)
    if grad is None:
        grad = keras.ops.zeros_like(value)
    return to_numpy(out), to_numpy(grad)
