import keras
import numpy as np
import pytest
from conftest import dtype_name, to_numpy, value_and_grad

from keras_tap.training import losses


def _f64(x):
    return np.asarray(x, np.float64)


def ref_feature_mse(t, s):
    d = (_f64(s) - _f64(t)).reshape(len(s), -1)
    return np.mean(d**2, axis=1)


def ref_attention_transfer(t, s, p=2.0):
    def attention(a):
        q = (np.abs(_f64(a)) ** p).sum(axis=-1).reshape(len(a), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    return np.linalg.norm(attention(s) - attention(t), axis=1)


def ref_gram_matrix(t, s):
    def gram(x):
        f = _f64(x).reshape(len(x), -1, x.shape[-1])
        n, c = f.shape[1], f.shape[2]
        return np.einsum("bnc,bnd->bcd", f, f) / (n * c)

    return np.mean((gram(s) - gram(t)) ** 2, axis=(1, 2))


def ref_cosine_feature(t, s):
    t, s = _f64(t).reshape(len(t), -1), _f64(s).reshape(len(s), -1)
    dot = np.sum(t * s, axis=1)
    return 1.0 - dot / (np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1))


def ref_nst(t, s, degree=2, constant=0.0):
    def channels(x):
        f = _f64(x).reshape(len(x), -1, x.shape[-1]).transpose(0, 2, 1)
        return f / np.linalg.norm(f, axis=2, keepdims=True)

    def kernel(a, b):
        return np.mean(
            (np.einsum("bin,bjn->bij", a, b) + constant) ** degree,
            axis=(1, 2),
        )

    s, t = channels(s), channels(t)
    return kernel(s, s) + kernel(t, t) - 2.0 * kernel(s, t)


def _normal(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _per_sample(values):
    """`call` keeps a second (time) axis for masks; average it here."""
    values = np.asarray(to_numpy(values))
    return values.reshape(values.shape[0], -1).mean(axis=1)


# (loss, reference, target shape, student shape)
CASES = [
    (losses.FeatureMSE(), ref_feature_mse, (4, 5, 5, 3), (4, 5, 5, 3)),
    (losses.FeatureMSE(), ref_feature_mse, (4, 7), (4, 7)),
    (
        losses.AttentionTransfer(),
        ref_attention_transfer,
        (4, 5, 5, 3),
        (4, 5, 5, 8),
    ),
    (
        losses.AttentionTransfer(p=1),
        lambda t, s: ref_attention_transfer(t, s, p=1.0),
        (4, 9, 3),
        (4, 9, 6),
    ),
    (
        losses.AttentionTransfer(p=3.5),
        lambda t, s: ref_attention_transfer(t, s, p=3.5),
        (3, 4, 4, 5),
        (3, 4, 4, 5),
    ),
    (losses.GramMatrix(), ref_gram_matrix, (4, 5, 5, 3), (4, 5, 5, 3)),
    (losses.GramMatrix(), ref_gram_matrix, (4, 9, 6), (4, 9, 6)),
    (losses.CosineFeature(), ref_cosine_feature, (4, 5, 5, 3), (4, 5, 5, 3)),
    (losses.CosineFeature(), ref_cosine_feature, (4, 7), (4, 7)),
    (losses.NST(), ref_nst, (4, 4, 4, 7), (4, 4, 4, 5)),
    (
        losses.NST(degree=3, constant=1.0),
        lambda t, s: ref_nst(t, s, degree=3, constant=1.0),
        (3, 10, 4),
        (3, 10, 6),
    ),
]
IDS = [
    f"{type(case[0]).__name__}-{len(case[3])}d-{i}"
    for i, case in enumerate(CASES)
]
LOSSES = [
    losses.FeatureMSE(),
    losses.AttentionTransfer(),
    losses.GramMatrix(),
    losses.CosineFeature(),
    losses.NST(),
]
LOSS_IDS = [type(loss).__name__ for loss in LOSSES]


@pytest.mark.parametrize("loss, reference, t_shape, s_shape", CASES, ids=IDS)
def test_call_matches_numpy_reference(loss, reference, t_shape, s_shape):
    t, s = _normal(t_shape, 0), _normal(s_shape, 1)
    values = loss.call(t, s)
    assert dtype_name(values) == "float32"
    assert values.shape[0] == t_shape[0] and len(values.shape) <= 2
    expected = reference(t, s)
    np.testing.assert_allclose(_per_sample(values), expected, rtol=1e-5)
    # Keras reduces with sum_over_batch_size: the mean over the batch.
    value = loss(t, s)
    assert dtype_name(value) == "float32"
    np.testing.assert_allclose(float(value), expected.mean(), rtol=1e-5)


@pytest.mark.parametrize("loss, reference, t_shape, s_shape", CASES, ids=IDS)
def test_sample_weight(loss, reference, t_shape, s_shape):
    t, s = _normal(t_shape, 0), _normal(s_shape, 1)
    weights = np.array([1.0, 0.0, 2.0, 0.5][: t_shape[0]], "float32")
    expected = np.sum(weights * reference(t, s)) / t_shape[0]
    value = loss(t, s, sample_weight=weights)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    # A weight of 0 removes the sample: changing it changes nothing.
    s_changed = s.copy()
    s_changed[1] = 100.0 * _normal(s_shape[1:], 2)
    np.testing.assert_allclose(
        float(loss(t, s_changed, sample_weight=weights)), expected, rtol=1e-5
    )


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_identical_features_give_zero(loss):
    x = _normal((3, 4, 4, 6), 0)
    np.testing.assert_allclose(to_numpy(loss.call(x, x)), 0.0, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_float16_large_activations_give_finite_float32(loss):
    t = np.full((2, 8, 8, 16), -300.0, "float16")
    s = (300.0 * np.abs(_normal((2, 8, 8, 16), 0))).astype("float16")
    tensors = keras.ops.convert_to_tensor(t), keras.ops.convert_to_tensor(s)
    for value in (loss(t, s), loss.call(*tensors)):
        assert dtype_name(value) == "float32"
        assert np.all(np.isfinite(to_numpy(value)))


def test_float16_feature_mse_of_300():
    t = np.full((2, 8, 8, 16), -300.0, "float16")
    s = np.full((2, 8, 8, 16), 300.0, "float16")
    per_sample = losses.FeatureMSE().call(
        keras.ops.convert_to_tensor(t), keras.ops.convert_to_tensor(s)
    )
    np.testing.assert_allclose(
        _per_sample(per_sample), [600.0**2] * 2, rtol=1e-6
    )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.function tracing is TensorFlow's own",
)
@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_dynamic_shapes_in_tf_function(loss):
    import tensorflow as tf

    t, s = _normal((3, 4, 4, 6), 0), _normal((3, 4, 4, 6), 1)
    spec = tf.TensorSpec((None, None, None, 6), tf.float32)
    fn = tf.function(loss.call, input_signature=[spec, spec])
    np.testing.assert_allclose(
        fn(t, s).numpy(), loss.call(t, s).numpy(), rtol=1e-6
    )


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="jax.jit tracing is JAX's own"
)
@pytest.mark.parametrize("loss, reference, t_shape, s_shape", CASES, ids=IDS)
def test_under_jax_jit(loss, reference, t_shape, s_shape):
    import jax

    t, s = _normal(t_shape, 0), _normal(s_shape, 1)
    np.testing.assert_allclose(
        _per_sample(jax.jit(loss.call)(t, s)), reference(t, s), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(jax.jit(loss.__call__)(t, s)), reference(t, s).mean(), rtol=1e-5
    )


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_gradient_is_finite_at_degenerate_points(loss):
    t = _normal((2, 3, 3, 4), 0)
    t[:, :, :, 0] = 0.0  # a dead channel
    s = keras.Variable(t.copy())
    _, (grad,) = value_and_grad(lambda: loss(t, s.value), [s])
    assert np.all(np.isfinite(grad))
    zeros = keras.Variable(np.zeros_like(t))
    value, (grad,) = value_and_grad(lambda: loss(t, zeros.value), [zeros])
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


CONFIGURED = [
    losses.FeatureMSE(name="hint", reduction="sum"),
    losses.AttentionTransfer(p=3, dtype="float32"),
    losses.GramMatrix(reduction="mean"),
    losses.CosineFeature(epsilon=1e-6),
    losses.NST(degree=3, constant=0.5, name="nst_poly3"),
    losses.Wrapped("mae"),
    losses.Wrapped(keras.losses.mean_squared_error, reduction="sum"),
]


@pytest.mark.parametrize(
    "loss", CONFIGURED, ids=[loss.name for loss in CONFIGURED]
)
def test_serialization_round_trip(loss):
    config = keras.saving.serialize_keras_object(loss)
    assert config["registered_name"] == f"keras_tap>{type(loss).__name__}"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    t, s = _normal((3, 4, 4, 6), 0), _normal((3, 4, 4, 6), 1)
    np.testing.assert_allclose(
        float(restored(t, s)), float(loss(t, s)), rtol=1e-7
    )


@pytest.mark.parametrize(
    "loss", CONFIGURED, ids=[loss.name for loss in CONFIGURED]
)
def test_config_is_init_arguments(loss):
    config = loss.get_config()
    assert type(loss).from_config(config).get_config() == config
    for key in ("name", "reduction"):
        assert getattr(loss, key) == config[key]


def test_default_names_and_reduction():
    for loss, name in [
        (losses.FeatureMSE(), "feature_mse"),
        (losses.AttentionTransfer(), "attention_transfer"),
        (losses.GramMatrix(), "gram_matrix"),
        (losses.CosineFeature(), "cosine_feature"),
        (losses.NST(), "nst"),
        (losses.Wrapped("mse"), "mse"),
    ]:
        assert loss.name == name
        assert loss.reduction == "sum_over_batch_size"
        assert loss.get_config()["dtype"] is None


@keras.saving.register_keras_serializable(package="keras_tap_tests")
def squared_distance(y_true, y_pred):
    return keras.ops.sum(keras.ops.square(y_pred - y_true), axis=-1)


def test_wrapped_registered_function_round_trip():
    loss = losses.get(squared_distance)
    assert isinstance(loss, losses.Wrapped)
    assert loss.name == "squared_distance"
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert restored.fn is squared_distance
    t, s = _normal((4, 3, 5), 0), _normal((4, 3, 5), 1)
    expected = np.mean(np.sum((_f64(s) - _f64(t)) ** 2, axis=-1), axis=1)
    np.testing.assert_allclose(
        _per_sample(restored.call(t, s)), expected, rtol=1e-5
    )


@pytest.mark.parametrize(
    "identifier, reference",
    [
        ("mse", lambda t, s: np.mean((s - t) ** 2, axis=(1, 2, 3))),
        ("mae", lambda t, s: np.mean(np.abs(s - t), axis=(1, 2, 3))),
        ("mean_squared_error", lambda t, s: np.mean((s - t) ** 2, (1, 2, 3))),
    ],
)
def test_get_keras_function_is_wrapped_with_sample_weight(
    identifier, reference
):
    loss = losses.get(identifier)
    assert isinstance(loss, losses.Wrapped)
    assert loss.fn == identifier
    t, s = _normal((4, 3, 3, 2), 0), _normal((4, 3, 3, 2), 1)
    per_sample = reference(_f64(t), _f64(s))
    np.testing.assert_allclose(
        _per_sample(loss.call(t, s)), per_sample, rtol=1e-5
    )
    weights = np.array([1.0, 0.0, 3.0, 1.0], "float32")
    np.testing.assert_allclose(
        float(loss(t, s, sample_weight=weights)),
        np.sum(weights * per_sample) / 4,
        rtol=1e-5,
    )


def test_wrapped_computes_in_float32():
    t = np.full((2, 8, 8, 16), -300.0, "float16")
    s = np.full((2, 8, 8, 16), 300.0, "float16")
    per_sample = losses.Wrapped("mse").call(
        keras.ops.convert_to_tensor(t), keras.ops.convert_to_tensor(s)
    )
    assert dtype_name(per_sample) == "float32"
    np.testing.assert_allclose(
        _per_sample(per_sample), [600.0**2] * 2, rtol=1e-6
    )
    sparse = losses.get("sparse_categorical_crossentropy")
    logits = keras.ops.softmax(_normal((3, 4), 0))
    values = sparse.call(np.array([0, 3, 1]), logits)
    assert np.all(np.isfinite(to_numpy(values)))


def test_get_categorical_crossentropy_with_sample_weight():
    loss = losses.get("categorical_crossentropy")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 1]]
    p = to_numpy(keras.ops.softmax(_normal((4, 3), 0)))
    per_sample = -np.sum(_f64(y) * np.log(_f64(p)), axis=1)
    weights = np.array([0.0, 1.0, 1.0, 2.0], "float32")
    np.testing.assert_allclose(
        float(loss(y, p, sample_weight=weights)),
        np.sum(weights * per_sample) / 4,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "name, cls",
    [
        ("FeatureMSE", losses.FeatureMSE),
        ("feature_mse", losses.FeatureMSE),
        ("attention_transfer", losses.AttentionTransfer),
        ("AttentionTransfer", losses.AttentionTransfer),
        ("gram_matrix", losses.GramMatrix),
        ("cosine_feature", losses.CosineFeature),
        ("nst", losses.NST),
        ("NST", losses.NST),
        ("keras_tap>GramMatrix", losses.GramMatrix),
        ("MeanSquaredError", keras.losses.MeanSquaredError),
    ],
)
def test_get_by_name(name, cls):
    assert type(losses.get(name)) is cls


def test_get_other_identifiers():
    loss = losses.NST(degree=3)
    assert losses.get(loss) is loss
    assert losses.get(None) is None
    assert type(losses.get(losses.GramMatrix)) is losses.GramMatrix
    restored = losses.get(keras.saving.serialize_keras_object(loss))
    assert restored.get_config() == loss.get_config()
    bare = losses.get({"class_name": "NST", "config": {"degree": 4}})
    assert bare.degree == 4
    keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    resolved = losses.get(keras.saving.serialize_keras_object(keras_loss))
    assert type(resolved) is keras.losses.CategoricalCrossentropy
    assert resolved.get_config() == keras_loss.get_config()
    old_style = losses.get({"class_name": "MeanAbsoluteError", "config": {}})
    assert type(old_style) is keras.losses.MeanAbsoluteError
    assert isinstance(losses.get(lambda t, s: (s - t) ** 2), losses.Wrapped)


def test_get_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean.*'feature_mse'"):
        losses.get("feature_mes")
    with pytest.raises(ValueError, match="Did you mean.*'gram_matrix'"):
        losses.get("gram_matrx")
    with pytest.raises(ValueError, match="Could not interpret"):
        losses.get(3)
    with pytest.raises(ValueError, match="'Nope'"):
        losses.get({"class_name": "Nope", "config": {}})


INVALID = [
    (losses.AttentionTransfer, {"p": 0.5}, "`p`.*>= 1.*Received: p=0.5"),
    (losses.AttentionTransfer, {"p": "2"}, "`p`.*Received: p='2'"),
    (losses.AttentionTransfer, {"p": float("nan")}, "`p`.*finite"),
    (losses.CosineFeature, {"epsilon": 0.0}, "`epsilon`.*> 0"),
    (losses.CosineFeature, {"epsilon": -1e-3}, "`epsilon`"),
    (losses.NST, {"degree": 0}, "`degree`.*integer >= 1"),
    (losses.NST, {"degree": 2.5}, "`degree`.*Received: degree=2.5"),
    (losses.NST, {"degree": True}, "`degree`"),
    (losses.NST, {"constant": -1.0}, "`constant`.*>= 0"),
    (losses.NST, {"constant": float("inf")}, "`constant`.*finite"),
    (losses.FeatureMSE, {"reduction": "avg"}, "`reduction`"),
    (losses.Wrapped, {"fn": 3}, "`fn`.*Received: fn=3"),
    (losses.Wrapped, {"fn": "nope"}, "Unknown loss: 'nope'"),
    (losses.Wrapped, {"fn": "MeanSquaredError"}, "`Loss` class"),
]


@pytest.mark.parametrize("cls, kwargs, match", INVALID)
def test_invalid_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [losses.AttentionTransfer, losses.NST])
def test_spatial_losses_refuse_rank_2(cls):
    with pytest.raises(ValueError, match="rank >= 3"):
        cls().call(np.ones((2, 4), "float32"), np.ones((2, 4), "float32"))
