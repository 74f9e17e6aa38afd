"""`kt.edit` on a nested graph model (its output, its `:input`, a layer
inside it) reaches the `TapModel`s over the outer model.

The rebuilt graph inlines nested graph models: their inner layers are
called, the nested model itself is not. Edits on it must still apply,
as the base model applies them. Every value is checked against NumPy
computed from the layer weights.
"""

import keras
import numpy as np
import pytest
from conftest import assert_close, grad_at, run_tap_model, to_numpy
from keras import ops

import keras_tap as kt

RTOL, ATOL = 1e-5, 1e-6


def _x(n=5, d=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


def _close(actual, expected):
    assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def _dense(model, name, x, relu=False):
    kernel, bias = (np.asarray(w, np.float64) for w in
                    model.get_layer(name).get_weights())
    y = np.asarray(x, np.float64) @ kernel + bias
    return np.maximum(y, 0.0) if relu else y


def _sequential():
    keras.utils.set_random_seed(1)
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(2, name="i1")], name="inner"
    )
    outer = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="relu", name="a"),
        inner,
        keras.layers.Dense(3, name="c"),
    ])
    return outer, inner


def _functional():
    keras.utils.set_random_seed(2)
    x = keras.Input((4,))
    h = keras.layers.Dense(3, activation="relu", name="i1")(x)
    inner = keras.Model(x, keras.layers.Dense(2, name="i2")(h), name="inner")
    x = keras.Input((3,))
    a = keras.layers.Dense(4, activation="relu", name="a")(x)
    y = inner(a)
    outer = keras.Model(x, keras.layers.Dense(3, name="c")(y))
    return outer, inner


def _inner_ref(kind, inner, x, edits):
    """NumPy inner model: `(output, {point: value})`."""
    found = {}
    x = edits.get("inner:input", lambda v: v)(x)
    found["inner:input"] = x
    h = _dense(inner, "i1", x, relu=kind == "functional")
    h = edits.get("inner/i1", lambda v: v)(h)
    found["inner/i1"] = h
    if kind == "functional":
        h = _dense(inner, "i2", h)
    y = edits.get("inner", lambda v: v)(h)
    found["inner"] = y
    return y, found


def _reference(kind, outer, inner, x, edits):
    a = _dense(outer, "a", x, relu=True)
    y, found = _inner_ref(kind, inner, a, edits)
    found["a"] = a
    return _dense(outer, "c", y), found


_BUILD = {"sequential": _sequential, "functional": _functional}


def _edit(name, width, n=5):
    """`(kt edit, NumPy function)` for a point of `width` features."""
    if name == "zero":
        return kt.edits.Zero(), lambda v: 0.0 * v
    if name == "add":
        vector = np.linspace(-1.0, 1.0, width).astype("float32")
        return kt.edits.Add(vector), lambda v: v + vector
    value = np.random.default_rng(7).normal(size=(n, width))
    value = value.astype("float32")
    return kt.edits.Replace(value), lambda v: np.broadcast_to(value, v.shape)




_WIDTH = {"inner": 2, "inner:input": 4, "inner/i1": None}


@pytest.mark.parametrize("how", ["call", "predict", "extract"])
@pytest.mark.parametrize("edit", ["zero", "add", "replace"])
@pytest.mark.parametrize("point", ["inner", "inner:input", "inner/i1"])
@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_edit_on_nested_model(kind, point, edit, how):
    outer, inner = _BUILD[kind]()
    x = _x()
    width = _WIDTH[point] or (2 if kind == "sequential" else 3)
    kt_edit, np_edit = _edit(edit, width)
    names = ["a", "inner", "inner:input", "inner/i1"]
    tap_model = kt.TapModel(outer, names)
    expected, points = _reference(kind, outer, inner, x, {point: np_edit})
    with kt.edit(outer, {point: kt_edit}):
        _close(outer(x), expected)  # the base model, for reference.
        predictions, taps = run_tap_model(tap_model, x, how)
    if predictions is not None:
        _close(predictions, expected)
    for name in names:
        _close(taps[name], points[name])
    # Closed: the model computes what it did before.
    plain, points = _reference(kind, outer, inner, x, {})
    predictions, taps = run_tap_model(tap_model, x, how)
    if predictions is not None:
        _close(predictions, plain)
    for name in names:
        _close(taps[name], points[name])


def _twice():
    keras.utils.set_random_seed(3)
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(2, name="i1")], name="inner"
    )
    x = keras.Input((3,))
    a = keras.layers.Dense(4, activation="relu", name="a")(x)
    b = keras.layers.Dense(4, name="b")(a)
    y = keras.layers.Concatenate(name="cat")([inner(a), inner(b)])
    return keras.Model(x, keras.layers.Dense(3, name="c")(y)), inner


@pytest.mark.parametrize("point", ["inner@0", "inner@0:input"])
@pytest.mark.parametrize("how", ["call", "predict", "extract"])
def test_nested_model_called_twice_edit_first_call(point, how):
    outer, inner = _twice()
    x = _x(seed=3)
    vector = np.array([0.5, -2.0, 1.0, 3.0][: 2 if point == "inner@0"
                                           else 4], "float32")
    a = _dense(outer, "a", x, relu=True)
    b = _dense(outer, "b", a)
    first_in = a + vector if point == "inner@0:input" else a
    y0 = _dense(inner, "i1", first_in)
    if point == "inner@0":
        y0 = y0 + vector
    y1 = _dense(inner, "i1", b)
    expected = _dense(outer, "c", np.concatenate([y0, y1], axis=-1))
    names = ["inner@0", "inner@1", "inner@0:input", "inner@1:input",
             "inner/i1@0", "inner/i1@1"]
    tap_model = kt.TapModel(outer, names)
    with kt.edit(outer, {point: kt.edits.Add(vector)}):
        _close(outer(x), expected)
        predictions, taps = run_tap_model(tap_model, x, how)
    if predictions is not None:
        _close(predictions, expected)
    _close(taps["inner@0"], y0)
    _close(taps["inner@1"], y1)
    _close(taps["inner@0:input"], first_in)
    _close(taps["inner@1:input"], b)
    # The inner layer's own first call is unedited at "inner@0".
    _close(taps["inner/i1@0"], _dense(inner, "i1", first_in))
    _close(taps["inner/i1@1"], y1)


def test_nested_edits_compose_with_a_layer_edit():
    outer, inner = _functional()
    x = _x(seed=4)
    scale = kt.edits.Scale(2.0)
    expected, points = _reference(
        "functional", outer, inner, x,
        {"inner:input": lambda v: 2.0 * v, "inner": lambda v: v + 1.0},
    )
    tap_model = kt.TapModel(outer, ["inner", "inner:input", "a"])
    with kt.edit(outer, {"inner:input": scale}):
        with kt.edit(outer, {"inner": kt.edits.Add(np.ones(2, "float32"))}):
            predictions, taps = tap_model(x)
    _close(predictions, expected)
    for name in ["inner", "inner:input", "a"]:
        _close(taps[name], points[name])


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_gradients_at_an_edited_nested_model(kind):
    outer, inner = _BUILD[kind]()
    x = _x(seed=5)
    vector = np.array([1.5, -0.5], "float32")
    _, points = _reference(kind, outer, inner, x,
                           {"inner": lambda v: v + vector})
    kernel_c = ops.convert_to_tensor(to_numpy(outer.get_layer("c").kernel))

    def reference(value):  # the target (class 2) from inner's output on
        return ops.sum(ops.matmul(value, kernel_c)[:, 2])

    tap_model = kt.TapModel(outer, "inner")
    with kt.edit(outer, {"inner": kt.edits.Add(vector)}):
        _, taps, grads = tap_model.gradients(x, target=2)
    _, expected = grad_at(
        reference, np.asarray(points["inner"], "float32")
    )
    _close(taps["inner"], points["inner"])
    _close(grads["inner"], expected)
    # A zeroed nested model: the gradient at its (zero) output is the same
    # (linear head), and the predictions are the head's bias.
    with kt.edit(outer, {"inner": kt.edits.Zero()}):
        predictions, taps, grads = tap_model.gradients(x, target=2)
    _close(taps["inner"], np.zeros((5, 2)))
    _close(grads["inner"], expected)
    bias_c = np.asarray(outer.get_layer("c").bias)
    _close(predictions, np.broadcast_to(bias_c, (5, 3)))


def test_no_edit_builds_no_variant():
    outer, _ = _sequential()
    tap_model = kt.TapModel(outer, ["inner", "a"])
    tap_model(_x())
    forward = tap_model._forward
    assert not forward._variants
    with kt.edit(outer, {"a": kt.edits.Zero()}):
        tap_model(_x())
    assert not forward._variants  # an edit on a plain layer: no variant.
