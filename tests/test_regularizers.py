import keras
import numpy as np
import pytest
from conftest import dtype_name, to_numpy, value_and_grad

from keras_tap.training import regularizers

EPS = 1e-7  # keras.config.epsilon()


def _samples(x):
    """Every axis but the last flattened: (N, C), float64."""
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1])


def _off_diagonal(m):
    return m[~np.eye(m.shape[0], dtype=bool)]


def ref_activity_l1(x, l1):
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    return l1 * np.mean(np.sum(np.abs(x), axis=1))


def ref_activity_l2(x, l2):
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    return l2 * np.mean(np.sum(x**2, axis=1))


def ref_kl_sparsity(x, rho, beta):
    rho_hat = np.clip(_samples(x).mean(axis=0), EPS, 1 - EPS)
    kl = rho * np.log(rho / rho_hat) + (1 - rho) * np.log(
        (1 - rho) / (1 - rho_hat)
    )
    return beta * kl.sum()


def ref_decov(x, weight):
    h = _samples(x)
    cov = np.cov(h, rowvar=False, bias=True)  # 1/N, as in the paper
    frobenius = np.sum(cov**2)
    diagonal = np.sum(np.diag(cov) ** 2)
    return weight * 0.5 * (frobenius - diagonal)


def ref_orthogonality(x, weight):
    h = _samples(x)
    channels = h.shape[1]
    corr = np.corrcoef(h, rowvar=False)
    pairs = channels * (channels - 1)
    return weight * np.sum(_off_diagonal(corr) ** 2) / pairs


def ref_variance_covariance(x, vw, cw, gamma, epsilon):
    h = _samples(x)
    std = np.sqrt(np.var(h, axis=0, ddof=1) + epsilon)
    variance = np.mean(np.maximum(gamma - std, 0.0))
    cov = np.cov(h, rowvar=False)  # unbiased, N - 1
    covariance = np.sum(_off_diagonal(cov) ** 2) / h.shape[1]
    return vw * variance + cw * covariance


def _normal(shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=shape)).astype("float32")


def _uniform(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


SHAPES = [(8, 6), (4, 5, 5, 6), (3, 7, 6)]

CASES = [
    (regularizers.ActivityL1(l1=0.3), lambda x: ref_activity_l1(x, 0.3)),
    (regularizers.ActivityL2(l2=0.2), lambda x: ref_activity_l2(x, 0.2)),
    (
        regularizers.KLSparsity(rho=0.1, beta=2.0),
        lambda x: ref_kl_sparsity(x, 0.1, 2.0),
    ),
    (regularizers.DeCov(weight=0.5), lambda x: ref_decov(x, 0.5)),
    (
        regularizers.Orthogonality(weight=2.0),
        lambda x: ref_orthogonality(x, 2.0),
    ),
    (
        regularizers.VarianceCovariance(
            variance_weight=25.0, covariance_weight=1.5, gamma=1.2, epsilon=1e-3
        ),
        lambda x: ref_variance_covariance(x, 25.0, 1.5, 1.2, 1e-3),
    ),
]
IDS = [type(reg).__name__ for reg, _ in CASES]


def _input_for(reg, shape, seed=0):
    if isinstance(reg, regularizers.KLSparsity):
        return _uniform(shape, seed)  # sigmoid range
    if isinstance(reg, regularizers.VarianceCovariance):
        return _normal(shape, seed, scale=0.8)  # both terms active
    return _normal(shape, seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_matches_numpy_reference(reg, reference, shape):
    x = _input_for(reg, shape)
    value = reg(x)
    assert dtype_name(value) == "float32"
    assert tuple(value.shape) == ()
    np.testing.assert_allclose(float(value), reference(x), rtol=1e-5)


@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_batch_mean_does_not_grow_with_batch(reg, reference):
    x = _input_for(reg, (4, 3, 3, 5))
    doubled = np.concatenate([x, x])
    np.testing.assert_allclose(
        float(reg(doubled)), reference(doubled), rtol=1e-5
    )
    if isinstance(reg, (regularizers.ActivityL1, regularizers.ActivityL2)):
        np.testing.assert_allclose(float(reg(doubled)), float(reg(x)), 1e-6)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.function tracing is TensorFlow's own",
)
@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_dynamic_shapes_in_tf_function(reg, reference):
    import tensorflow as tf

    x = _input_for(reg, (4, 5, 5, 6))
    spec = tf.TensorSpec((None, None, None, 6), tf.float32)
    fn = tf.function(reg.__call__, input_signature=[spec])
    np.testing.assert_allclose(float(fn(x)), reference(x), rtol=1e-5)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="jax.jit tracing is JAX's own"
)
@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_under_jax_jit(reg, reference):
    import jax

    fn = jax.jit(reg.__call__)
    for shape in [(4, 5, 5, 6), (3, 7, 6)]:
        x = _input_for(reg, shape)
        np.testing.assert_allclose(float(fn(x)), reference(x), rtol=1e-5)


@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_float16_input_gives_finite_float32(reg, reference):
    x = _input_for(reg, (4, 8, 8, 16)) * 300.0
    if isinstance(reg, regularizers.KLSparsity):
        x = _input_for(reg, (4, 8, 8, 16))
    x16 = x.astype("float16")
    value = reg(x16)
    assert dtype_name(value) == "float32"
    assert np.isfinite(float(value))
    np.testing.assert_allclose(
        float(value), reference(x16.astype("float32")), rtol=1e-4
    )


def test_float16_l2_of_300_does_not_overflow():
    x = np.full((4, 8, 8, 16), 300.0, dtype="float16")
    value = regularizers.ActivityL2(l2=1.0)(x)
    assert dtype_name(value) == "float32"
    np.testing.assert_allclose(float(value), 300.0**2 * 8 * 8 * 16, rtol=1e-6)


@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_gradient_is_finite_with_a_dead_channel(reg, reference):
    x = _input_for(reg, (6, 4))
    x[:, 0] = 0.0  # a dead (constant) channel
    x = keras.Variable(x)
    value, (grad,) = value_and_grad(lambda: reg(x.value), [x])
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_serialization_round_trip(reg, reference):
    config = keras.saving.serialize_keras_object(reg)
    assert config["registered_name"] == f"keras_tap>{type(reg).__name__}"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(reg)
    assert restored.get_config() == reg.get_config()
    x = _input_for(reg, (4, 6))
    np.testing.assert_allclose(float(restored(x)), float(reg(x)), rtol=1e-7)


@pytest.mark.parametrize("reg, reference", CASES, ids=IDS)
def test_config_is_init_arguments(reg, reference):
    config = reg.get_config()
    assert type(reg)(**config).get_config() == config
    for key, value in config.items():
        assert getattr(reg, key) == value


def test_defaults():
    assert regularizers.ActivityL1().get_config() == {"l1": 0.01}
    assert regularizers.ActivityL2().get_config() == {"l2": 0.01}
    assert regularizers.KLSparsity().get_config() == {
        "rho": 0.05,
        "beta": 1.0,
        "cross_replica": False,
    }
    local = {"weight": 1.0, "cross_replica": False}
    assert regularizers.DeCov().get_config() == local
    assert regularizers.Orthogonality().get_config() == local
    assert regularizers.VarianceCovariance().get_config() == {
        "variance_weight": 1.0,
        "covariance_weight": 1.0,
        "gamma": 1.0,
        "epsilon": 1e-4,
        "cross_replica": False,
    }


def test_works_as_keras_activity_regularizer():
    layer = keras.layers.Dense(
        4, activity_regularizer=regularizers.DeCov(weight=1.0)
    )
    x = _normal((8, 3))
    out = to_numpy(layer(x))
    np.testing.assert_allclose(
        float(to_numpy(layer.losses[0])), ref_decov(out, 1.0) / 8, rtol=1e-5
    )


INVALID = [
    (regularizers.ActivityL1, {"l1": -0.1}, "`l1`.*Received: l1=-0.1"),
    (regularizers.ActivityL1, {"l1": float("nan")}, "`l1`.*finite"),
    (regularizers.ActivityL1, {"l1": "0.1"}, "`l1`.*Received: l1='0.1'"),
    (regularizers.ActivityL2, {"l2": float("inf")}, "`l2`.*finite"),
    (regularizers.ActivityL2, {"l2": None}, "`l2`.*Received: l2=None"),
    (regularizers.KLSparsity, {"rho": 0.0}, "`rho`.*> 0"),
    (regularizers.KLSparsity, {"rho": 1.0}, r"`rho`.*\(0, 1\)"),
    (regularizers.KLSparsity, {"rho": 1.5}, "`rho`.*Received: rho=1.5"),
    (regularizers.KLSparsity, {"beta": -1.0}, "`beta`"),
    (regularizers.DeCov, {"weight": -1.0}, "`weight` of `DeCov`"),
    (regularizers.DeCov, {"weight": True}, "`weight`.*Received: weight=True"),
    (regularizers.Orthogonality, {"weight": [1.0]}, "`weight`"),
    (regularizers.VarianceCovariance, {"variance_weight": -1}, "variance_w"),
    (
        regularizers.VarianceCovariance,
        {"covariance_weight": float("nan")},
        "covariance_weight",
    ),
    (regularizers.VarianceCovariance, {"gamma": -0.5}, "`gamma`"),
    (regularizers.VarianceCovariance, {"epsilon": 0.0}, "`epsilon`.*> 0"),
]


@pytest.mark.parametrize("cls, kwargs, match", INVALID)
def test_invalid_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "cls",
    [
        regularizers.KLSparsity,
        regularizers.DeCov,
        regularizers.Orthogonality,
        regularizers.VarianceCovariance,
    ],
)
def test_channel_regularizers_refuse_rank_1(cls):
    with pytest.raises(ValueError, match="rank >= 2"):
        cls()(np.ones((4,), "float32"))


@pytest.mark.parametrize(
    "name, cls",
    [
        ("ActivityL1", regularizers.ActivityL1),
        ("activity_l1", regularizers.ActivityL1),
        ("activity_l2", regularizers.ActivityL2),
        ("kl_sparsity", regularizers.KLSparsity),
        ("KLSparsity", regularizers.KLSparsity),
        ("decov", regularizers.DeCov),
        ("DeCov", regularizers.DeCov),
        ("orthogonality", regularizers.Orthogonality),
        ("variance_covariance", regularizers.VarianceCovariance),
        ("vicreg", regularizers.VarianceCovariance),
        ("keras_tap>DeCov", regularizers.DeCov),
        ("l1", keras.regularizers.L1),
        ("l2", keras.regularizers.L2),
        ("l1_l2", keras.regularizers.L1L2),
    ],
)
def test_get_by_name(name, cls):
    assert type(regularizers.get(name)) is cls


def test_get_other_identifiers():
    reg = regularizers.DeCov(weight=0.5)
    assert regularizers.get(reg) is reg
    assert regularizers.get(None) is None
    assert type(regularizers.get(regularizers.DeCov)) is regularizers.DeCov

    restored = regularizers.get(keras.saving.serialize_keras_object(reg))
    assert restored.get_config() == {"weight": 0.5, "cross_replica": False}
    bare = regularizers.get({"class_name": "DeCov", "config": {"weight": 2.0}})
    assert bare.get_config() == {"weight": 2.0, "cross_replica": False}
    l2 = keras.saving.serialize_keras_object(keras.regularizers.L2(0.1))
    assert type(regularizers.get(l2)) is keras.regularizers.L2
    old_style = {"class_name": "L2", "config": {"l2": 0.1}}
    assert regularizers.get(old_style).get_config() == {"l2": 0.1}

    def fn(x):
        return keras.ops.sum(x)

    assert regularizers.get(fn) is fn


def test_get_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean.*'decov'"):
        regularizers.get("decovv")
    with pytest.raises(ValueError, match="'kl_sparsity'"):
        regularizers.get("kl_sparse")
    with pytest.raises(ValueError, match="Could not interpret"):
        regularizers.get(42)
    with pytest.raises(ValueError, match="'Nope'"):
        regularizers.get({"class_name": "Nope", "config": {}})
