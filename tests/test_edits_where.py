"""`Zero`, `Scale` and `Add` with `where=` inside `kt.edit`, against NumPy
on the un-edited activation; and `GramMatrix`'s normalisation against
keras-io's neural style transfer `style_loss` written in NumPy."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_tap as kt


def _model():
    """`x (4,) -> h (relu, 6) -> out (3)`, a Functional model."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="h")(inputs)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, out)


def _x(n=5):
    return np.random.default_rng(0).normal(size=(n, 4)).astype("float32")


def _masks():
    """A full-shape mask, a per-unit mask broadcast over the batch, and a
    per-sample mask of shape `(n, 1)`."""
    rng = np.random.default_rng(1)
    full = rng.random((5, 6)) < 0.5
    units = np.array([True, False, True, False, False, True])
    samples = np.array([[True], [False], [True], [True], [False]])
    return [full, units, samples]


@pytest.mark.parametrize("mask_index", [0, 1, 2])
def test_zero_scale_add_where_match_numpy(mask_index):
    model, x = _model(), _x()
    mask = _masks()[mask_index]
    tap_model = kt.TapModel(model, {"h": "h"})
    plain_out, plain = to_numpy(tap_model(x))
    a = plain["h"].astype(np.float64)
    w_out = to_numpy(model.get_layer("out").kernel).astype(np.float64)
    b_out = to_numpy(model.get_layer("out").bias).astype(np.float64)
    vector = np.linspace(-1.0, 2.0, 6).astype("float32")
    cases = [
        (kt.edits.Zero(where=mask), np.where(mask, 0.0, a)),
        (kt.edits.Scale(-2.5, where=mask), np.where(mask, -2.5 * a, a)),
        (
            kt.edits.Scale(np.arange(6.0), where=mask),
            np.where(mask, a * np.arange(6.0), a),
        ),
        (
            kt.edits.Add(vector, scale=0.5, where=mask),
            np.where(mask, a + 0.5 * vector, a),
        ),
    ]
    for edit, expected in cases:
        with kt.edit(model, {"h": edit}):
            out, taps = to_numpy(tap_model(x))
            direct = to_numpy(model(x))
        np.testing.assert_allclose(taps["h"], expected, atol=1e-5)
        # The edit reaches the rest of the model: `out` on the edited `h`.
        np.testing.assert_allclose(out, expected @ w_out + b_out, atol=1e-5)
        np.testing.assert_allclose(direct, out, atol=1e-6)
    # An all-false mask leaves the activation alone; `where=None` is the
    # edit everywhere, as before.
    with kt.edit(model, {"h": kt.edits.Zero(where=np.zeros(6, bool))}):
        np.testing.assert_allclose(to_numpy(model(x)), plain_out, atol=1e-6)
    with kt.edit(model, {"h": kt.edits.Scale(3.0, where=None)}):
        _, taps = to_numpy(tap_model(x))
    np.testing.assert_allclose(taps["h"], 3.0 * a, atol=1e-5)


def test_where_under_predict_and_a_tensor_mask():
    model, x = _model(), _x()
    tap_model = kt.TapModel(model, {"h": "h"})
    _, plain = to_numpy(tap_model(x))
    mask = keras.ops.convert_to_tensor(_masks()[0])
    expected = np.where(_masks()[0], 0.0, plain["h"])
    with kt.edit(model, {"h": kt.edits.Zero(where=mask)}):
        _, taps = tap_model.predict(x, verbose=0)
    np.testing.assert_allclose(taps["h"], expected, atol=1e-6)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: kt.edits.Zero(where=m),
        lambda m: kt.edits.Scale(2.0, where=m),
        lambda m: kt.edits.Add(np.ones(6), where=m),
        lambda m: kt.edits.Replace(np.zeros((5, 6)), where=m),
    ],
    ids=["Zero", "Scale", "Add", "Replace"],
)
def test_a_mask_that_does_not_broadcast_raises_as_replace_does(edit):
    model, x = _model(), _x()
    bad = np.ones((5, 4), bool)
    edit = edit(bad)
    name = type(edit).__name__
    pattern = (
        rf"kt.edit at 'h': the edit {name}\(.*where=<mask>\): its where "
        r"mask has shape \(5, 4\), which does not broadcast to the "
        r"activation's shape \(5, 6\)\."
    )
    with pytest.raises(ValueError, match=pattern):
        with kt.edit(model, {"h": edit}):
            model(x)
    # The model is restored after the error.
    with kt.edit(model, {"h": kt.edits.Scale(1.0)}):
        same = to_numpy(model(x))
    np.testing.assert_allclose(to_numpy(model(x)), same, atol=1e-6)


def test_repr_shows_the_mask():
    mask = np.ones(6, bool)
    assert repr(kt.edits.Zero()) == "Zero()"
    assert repr(kt.edits.Zero(where=mask)) == "Zero(where=<mask>)"
    assert repr(kt.edits.Scale(2.0)) == "Scale(2.0)"
    assert repr(kt.edits.Scale(2.0, mask)) == "Scale(2.0, where=<mask>)"
    assert (
        repr(kt.edits.Scale(np.ones(6), where=mask))
        == "Scale(<factor of shape (6,)>, where=<mask>)"
    )
    assert repr(kt.edits.Add(np.ones(6))) == "Add(<vector>, scale=1.0)"
    assert (
        repr(kt.edits.Add(np.ones(6), 2.0, where=mask))
        == "Add(<vector>, scale=2.0, where=<mask>)"
    )
    assert repr(kt.edits.Replace(mask)) == "Replace(<value>)"
    assert (
        repr(kt.edits.Replace(mask, mask)) == "Replace(<value>, where=<mask>)"
    )


# -- GramMatrix against keras-io's neural style transfer ---------------------


def _keras_io_gram_matrix(x):
    """keras-io's `gram_matrix` in NumPy: `x` of shape `(H, W, C)`."""
    features = np.transpose(x, (2, 0, 1)).reshape(x.shape[-1], -1)
    return features @ features.T


def _keras_io_style_loss(style, combination, channels, size):
    """keras-io's `style_loss` in NumPy, `channels` and `size` given (the
    example fixes `channels = 3`, `size = img_nrows * img_ncols`)."""
    s = _keras_io_gram_matrix(style)
    c = _keras_io_gram_matrix(combination)
    return np.sum(np.square(s - c)) / (4.0 * (channels**2) * (size**2))


@pytest.mark.parametrize("shape", [(4, 5, 3), (3, 6, 8)])
def test_gram_matrix_is_keras_io_style_loss_times_4_over_c_squared(shape):
    rng = np.random.default_rng(2)
    h, w, c = shape
    style = rng.normal(size=(2, h, w, c))
    combination = rng.normal(size=(2, h, w, c))
    loss = kt.losses.GramMatrix(reduction=None)
    values = to_numpy(loss(style, combination)).astype(np.float64)
    n = h * w
    for b in range(2):
        reference = _keras_io_style_loss(style[b], combination[b], c, n)
        np.testing.assert_allclose(values[b], reference * 4 / c**2,
                                   rtol=1e-5)
        # With keras-io's own constants (channels = 3, size = the image's
        # pixel count, here 64 x 48): this loss times C^4 N^2 / (36 size^2).
        image = 64 * 48
        literal = _keras_io_style_loss(style[b], combination[b], 3, image)
        np.testing.assert_allclose(
            values[b] * c**4 * n**2 / (36 * image**2), literal, rtol=1e-5
        )
