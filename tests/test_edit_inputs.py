"""Taps on an edited input of a graph layer return the edited value.

In a Functional or Sequential model, a tap on `"b:input"` (or `":input[1]"`,
`":input[name]"`) is the value that layer received: while a `kt.edit` on
that input is open, the edited one, in `TapModel` calls, `predict`,
`extract` and `gradients`; other readers of the same producer stay
unedited. Every value is checked against NumPy from the layer weights.
"""

import keras
import numpy as np
import pytest
from conftest import (
    Counter,
    assert_close,
    dense_ref,
    grad_at,
    run_tap_model,
    to_numpy,
)
from keras import ops

import keras_tap as kt

RTOL, ATOL = 1e-5, 1e-6


def _x(n=5, d=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


def _close(actual, expected):
    assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def _sequential():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, name="a"),
        keras.layers.Dense(2, name="b"),
    ])




@pytest.mark.parametrize("how", ["call", "predict", "extract"])
def test_sequential_zero_at_an_input(how):
    model = _sequential()
    x = _x()
    a = dense_ref(model.get_layer("a"), x)
    bias = to_numpy(model.get_layer("b").bias)
    tap_model = kt.TapModel(model, ["b:input", "a"])
    with kt.edit(model, {"b:input": kt.edits.Zero()}):
        predictions, taps = run_tap_model(tap_model, x, how)
    _close(taps["b:input"], np.zeros((5, 4)))
    _close(taps["a"], a)  # the producer's own output is not edited.
    if predictions is not None:
        _close(predictions, np.broadcast_to(bias, (5, 2)))
    # Closed: the graph value again.
    predictions, taps = run_tap_model(tap_model, x, how)
    _close(taps["b:input"], a)
    if predictions is not None:
        _close(predictions, dense_ref(model.get_layer("b"), a))


def _shared():
    """`x -> a`, read by `b` and `c`; output `concat([b, c])`."""
    keras.utils.set_random_seed(1)
    x = keras.Input((3,), name="x")
    a = keras.layers.Dense(4, name="a")(x)
    b = keras.layers.Dense(2, name="b")(a)
    c = keras.layers.Dense(2, name="c")(a)
    out = keras.layers.Concatenate(name="cat")([b, c])
    return keras.Model(x, out)


@pytest.mark.parametrize("how", ["call", "predict", "extract"])
def test_shared_producer_only_the_edited_reader(how):
    model = _shared()
    x = _x(seed=1)
    a = dense_ref(model.get_layer("a"), x)
    tap_model = kt.TapModel(model, ["b:input", "c:input", "a"])
    with kt.edit(model, {"b:input": kt.edits.Scale(2.0)}):
        predictions, taps = run_tap_model(tap_model, x, how)
    _close(taps["b:input"], 2 * a)
    _close(taps["c:input"], a)
    _close(taps["a"], a)
    if predictions is not None:
        expected = np.concatenate([
            dense_ref(model.get_layer("b"), 2 * a),
            dense_ref(model.get_layer("c"), a),
        ], axis=-1)
        _close(predictions, expected)


class Pair(keras.layers.Layer):
    """`first - 2 * second`: two positional inputs."""

    def call(self, first, second):
        return first - 2.0 * second


def _two_inputs():
    keras.utils.set_random_seed(2)
    x = keras.Input((3,), name="x")
    p = keras.layers.Dense(4, name="p")(x)
    q = keras.layers.Dense(4, name="q")(x)
    total = ops.add(p, q)  # an operation: `model.operations` names it
    pair = Pair(name="pair")(p, q)
    out = keras.layers.Dense(2, name="out")(
        keras.layers.Concatenate(name="cat")([total, pair])
    )
    return keras.Model(x, out)


@pytest.mark.parametrize("how", ["call", "predict", "extract"])
def test_positional_input_of_an_op_and_a_layer(how):
    model = _two_inputs()
    add = next(op.name for op in model.operations if op.name.startswith("add"))
    x = _x(seed=2)
    p = dense_ref(model.get_layer("p"), x)
    q = dense_ref(model.get_layer("q"), x)
    vector = np.arange(4, dtype="float32")
    tap_model = kt.TapModel(model, {
        "add1": f"{add}:input[1]", "add0": f"{add}:input",
        "pair1": "pair:input[1]", "pair0": "pair:input",
    })
    edits = {f"{add}:input[1]": kt.edits.Zero(),
             "pair:input[1]": kt.edits.Add(vector)}
    with kt.edit(model, edits):
        predictions, taps = run_tap_model(tap_model, x, how)
    _close(taps["add1"], np.zeros_like(q))
    _close(taps["add0"], p)
    _close(taps["pair1"], q + vector)
    _close(taps["pair0"], p)
    if predictions is not None:
        joined = np.concatenate([p, p - 2 * (q + vector)], axis=-1)
        _close(predictions, dense_ref(model.get_layer("out"), joined))


class Mix(keras.layers.Layer):
    """`(hidden * scale) @ kernel`, its inputs passed by keyword."""

    def build(self, input_shape=None):
        self.kernel = self.add_weight(shape=(3, 2), name="kernel")

    def call(self, hidden=None, scale=None):
        return ops.matmul(hidden * scale, self.kernel)


def _keywords():
    keras.utils.set_random_seed(3)
    x = keras.Input((3,), name="x")
    s = keras.Input((3,), name="s")
    hidden = keras.layers.Dense(3, name="dense")(x)
    out = Mix(name="mix")(hidden=hidden, scale=s)
    return keras.Model([x, s], out)


@pytest.mark.parametrize("how", ["call", "predict", "extract"])
def test_keyword_input_of_a_functional_layer(how):
    model = _keywords()
    x, s = _x(seed=3), _x(seed=4)
    hidden = dense_ref(model.get_layer("dense"), x)
    kernel = to_numpy(model.get_layer("mix").kernel)
    tap_model = kt.TapModel(
        model, ["mix:input[hidden]", "mix:input[scale]", "dense"]
    )
    with kt.edit(model, {"mix:input[hidden]": kt.edits.Scale(3.0)}):
        predictions, taps = run_tap_model(tap_model, [x, s], how)
    _close(taps["mix:input[hidden]"], 3 * hidden)
    _close(taps["mix:input[scale]"], s)
    _close(taps["dense"], hidden)
    if predictions is not None:
        _close(predictions, (3 * hidden * s) @ kernel)


@pytest.mark.parametrize("how", ["call", "predict", "extract"])
def test_nested_edits_compose_at_an_input(how):
    model = _shared()
    x = _x(seed=5)
    a = dense_ref(model.get_layer("a"), x)
    vector = np.linspace(-1, 1, 4).astype("float32")
    tap_model = kt.TapModel(model, ["b:input", "c:input"])
    with kt.edit(model, {"b:input": kt.edits.Scale(2.0)}):
        with kt.edit(model, {"b:input": kt.edits.Add(vector)}):
            predictions, taps = run_tap_model(tap_model, x, how)
        _close(taps["b:input"], 2 * a + vector)
        _close(taps["c:input"], a)
        if predictions is not None:
            _close(predictions[:, :2],
                   dense_ref(model.get_layer("b"), 2 * a + vector))
        # The outer edit only.
        predictions, taps = run_tap_model(tap_model, x, how)
        _close(taps["b:input"], 2 * a)


def test_gradients_at_an_edited_input():
    keras.utils.set_random_seed(6)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="relu", name="a"),
        keras.layers.Dense(4, activation="relu", name="h"),
        keras.layers.Dense(2, name="b"),
    ])
    x = _x(seed=6)
    a = dense_ref(model.get_layer("a"), x, "relu")
    kernel_h, bias_h = (
        ops.convert_to_tensor(to_numpy(w))
        for w in model.get_layer("h").weights
    )
    kernel_b = ops.convert_to_tensor(to_numpy(model.get_layer("b").kernel))
    tap_model = kt.TapModel(model, "h:input")

    def reference(value):  # the target (class 1) from h's input onwards
        hidden = ops.relu(ops.matmul(value, kernel_h) + bias_h)
        return ops.sum(ops.matmul(hidden, kernel_b)[:, 1])

    with kt.edit(model, {"h:input": kt.edits.Scale(2.0)}):
        _, taps, grads = tap_model.gradients(x, target=1)
    _, expected = grad_at(reference, (2 * a).astype("float32"))
    _close(taps["h:input"], 2 * a)
    _close(grads["h:input"], expected)
    # Without the edit: the gradient at the unedited input.
    _, taps, grads = tap_model.gradients(x, target=1)
    _, expected = grad_at(reference, a.astype("float32"))
    _close(taps["h:input"], a)
    _close(grads["h:input"], expected)


def test_extraction_stays_pruned_without_an_edit():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, name="a"),
        Counter(name="counter"),
        keras.layers.Dense(2, name="b"),
    ])
    x = _x(seed=7)
    a = dense_ref(model.get_layer("a"), x)
    tap_model = kt.TapModel(model, "b:input")
    counter = model.get_layer("counter")
    found = tap_model.extract(x, taps="counter:input", verbose=0)
    _close(found["counter:input"], a)
    assert int(to_numpy(counter.count)) == 0  # the counter did not run
    with kt.edit(model, {"counter:input": kt.edits.Scale(-1.0)}):
        found = tap_model.extract(x, taps="counter:input", verbose=0)
    _close(found["counter:input"], -a)
    counter.count.assign(0)
    found = tap_model.extract(x, taps="counter:input", verbose=0)
    _close(found["counter:input"], a)
    assert int(to_numpy(counter.count)) == 0
