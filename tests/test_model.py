"""`kt.TapModel`: every model kind, one forward pass, shared weights."""

import functools

import conftest
import keras
import numpy as np
import pytest
from conftest import Counter, dense_ref, to_numpy, value_and_grad

import keras_tap as kt
from keras_tap.training import trainers

RTOL = 1e-5
ATOL = 1e-5


assert_close = functools.partial(conftest.assert_close, rtol=RTOL, atol=ATOL)


def images(n=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, size, size, 3)).astype("float32")


def sub_output(model, path, x):
    """`path`'s output computed on `model`'s own graph (no keras_tap)."""
    return keras.Model(model.input, model.get_layer(path).output)(x)


# -- model kinds --------------------------------------------------------------


def test_functional(mlp, x4):
    tap_model = kt.TapModel(mlp, ["hidden"])
    predictions, taps = tap_model(x4)
    assert list(taps) == ["hidden"]
    assert_close(predictions, mlp(x4))
    assert_close(
        taps["hidden"], dense_ref(mlp.get_layer("hidden"), x4, "relu")
    )
    assert tap_model.base is mlp


def test_predict_returns_numpy_structure(mlp, x4):
    predictions, taps = kt.TapModel(mlp, "hidden").predict(x4, verbose=0)
    assert isinstance(predictions, np.ndarray)
    assert isinstance(taps["hidden"], np.ndarray)
    assert_close(predictions, mlp(x4))


def _sequential(with_input):
    keras.utils.set_random_seed(1)
    layers = [
        keras.layers.Dense(6, activation="relu", name="a"),
        keras.layers.Dense(2, name="b"),
    ]
    if with_input:
        layers = [keras.Input((4,))] + layers
    return keras.Sequential(layers, name="seq")


@pytest.mark.parametrize("how", ["input", "build", "called"])
def test_sequential(how, x4):
    model = _sequential(with_input=how == "input")
    if how == "build":
        model.build((None, 4))
    elif how == "called":
        model(x4[:2])  # Built on a batch of 2, fed a batch of 8 below.
    tap_model = kt.TapModel(model, "a")
    predictions, taps = tap_model(x4)
    assert tuple(predictions.shape) == (8, 2)
    assert_close(predictions, model(x4))
    assert_close(taps["a"], dense_ref(model.get_layer("a"), x4, "relu"))
    predictions, taps = tap_model.predict(x4[:5], verbose=0)
    assert predictions.shape == (5, 2)
    assert taps["a"].shape == (5, 6)


def test_sequential_single_output_list_functional(x4):
    # A Functional built with `outputs=[y]` returns `y` bare when called.
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="d")(inputs)
    model = keras.Model([inputs], [keras.layers.Dense(2)(hidden)])
    predictions, _ = kt.TapModel(model, "d")([x4])
    assert tuple(predictions.shape) == (8, 2)
    assert_close(predictions, model([x4]))


@pytest.fixture(scope="module")
def backbone_in_sequential():
    keras.utils.set_random_seed(2)
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None
    )
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            # A layer before the backbone: its inputs are intermediate.
            keras.layers.Rescaling(2.0, offset=-1.0, name="rescale"),
            backbone,
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    return model, backbone


def test_application_backbone_in_sequential(backbone_in_sequential):
    model, backbone = backbone_in_sequential
    path = f"{backbone.name}/block_1_expand_relu"
    assert backbone.name == "mobilenetv2_1.00_32"
    tap_model = kt.TapModel(model, [path, "gap"])
    x = images()
    predictions, taps = tap_model(x)
    assert list(taps) == [path, "gap"]
    assert_close(predictions, model(x))
    rescaled = 2.0 * x - 1.0
    assert_close(
        taps[path], sub_output(backbone, "block_1_expand_relu", rescaled)
    )
    assert_close(
        taps["gap"], np.mean(to_numpy(backbone(rescaled)), axis=(1, 2))
    )


def test_two_levels_of_nesting(x4):
    keras.utils.set_random_seed(3)
    inner_in = keras.Input((5,))
    inner_out = keras.layers.Dense(
        3, activation="relu", name="deep"
    )(inner_in)
    inner = keras.Model(inner_in, inner_out, name="inner")
    outer_in = keras.Input((5,))
    outer_mid = keras.layers.Dense(5, name="mid")(outer_in)
    outer = keras.Model(outer_in, inner(outer_mid), name="outer")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, name="pre"), outer]
    )
    tap_model = kt.TapModel(model, ["outer/inner/deep", "outer/mid"])
    predictions, taps = tap_model(x4)
    assert_close(predictions, model(x4))
    mid = outer.get_layer("mid")(model.get_layer("pre")(x4))
    assert_close(taps["outer/mid"], mid)
    assert_close(taps["outer/inner/deep"], sub_output(inner, "deep", mid))


def test_nested_training_false_matches_base(x4):
    """`inner(x, training=False)` inside a model called with training=True.

    Keras 3.15 drops the explicit `training=False` of a nested model's call
    once the outer model is called with `training=True` (README, "Limits"):
    the BatchNormalization inside runs in training mode (batch moments) and
    updates its moving statistics. The expected values are written out in
    NumPy for both modes; the base must use the mode stated here, and the
    tap model must give the same predictions, tap and moving statistics.
    """
    inner_in = keras.Input((4,))
    norm = keras.layers.BatchNormalization(name="bn")
    inner = keras.Model(inner_in, norm(inner_in), name="inner")
    outer_in = keras.Input((4,))
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(outer_in, head(inner(outer_in, training=False)))
    tap_model = kt.TapModel(model, "inner/bn")
    kernel, bias = head.get_weights()
    mean0, variance0 = np.full(4, 3.0), np.full(4, 2.0)
    momentum, epsilon = norm.momentum, norm.epsilon  # 0.99, 1e-3

    def reset():
        norm.moving_mean.assign(mean0.astype("float32"))
        norm.moving_variance.assign(variance0.astype("float32"))

    # NumPy references (gamma 1, beta 0), one per mode.
    x = x4.astype("float64")
    batch_mean, batch_variance = x.mean(0), x.var(0)  # biased, as Keras
    reference = {
        "training": {
            "bn": (x - batch_mean) / np.sqrt(batch_variance + epsilon),
            "moving_mean": momentum * mean0 + (1 - momentum) * batch_mean,
            "moving_variance": (
                momentum * variance0 + (1 - momentum) * batch_variance
            ),
        },
        "inference": {
            "bn": (x - mean0) / np.sqrt(variance0 + epsilon),
            "moving_mean": mean0,
            "moving_variance": variance0,
        },
    }
    for values in reference.values():
        values["predictions"] = values["bn"] @ kernel + bias
    assert not np.allclose(
        reference["training"]["bn"], reference["inference"]["bn"], atol=0.1
    )

    def matches(mode, predictions, moving_mean, moving_variance):
        expected = reference[mode]
        return all(
            np.allclose(to_numpy(got), expected[key], rtol=RTOL, atol=ATOL)
            for key, got in (
                ("predictions", predictions),
                ("moving_mean", moving_mean),
                ("moving_variance", moving_variance),
            )
        )

    # The base model on its own, without keras_tap.
    reset()
    base_predictions = model(x4, training=True)
    base = (base_predictions, norm.moving_mean, norm.moving_variance)
    base_mode = [mode for mode in reference if matches(mode, *base)]
    assert base_mode == ["training"], (
        "Keras changed: a nested `training=False` under an outer "
        "`training=True` now runs BatchNormalization in "
        f"{base_mode or 'neither'} mode, not training mode as in Keras 3.15. "
        "Update README 'Limits' and this test."
    )

    # The tap model does what the base does, and its tap is the BN output.
    reset()
    predictions, taps = tap_model(x4, training=True)
    expected = reference["training"]
    assert_close(predictions, expected["predictions"])
    assert_close(taps["inner/bn"], expected["bn"])
    assert_close(norm.moving_mean, expected["moving_mean"])
    assert_close(norm.moving_variance, expected["moving_variance"])
    assert_close(predictions, base_predictions)


def test_frozen_backbone_stays_in_inference_mode(x4):
    # The Keras 3 way to freeze BatchNormalization: `trainable = False`.
    inner_in = keras.Input((4,))
    norm = keras.layers.BatchNormalization(name="bn")
    inner = keras.Model(inner_in, norm(inner_in), name="inner")
    inner.trainable = False
    outer_in = keras.Input((4,))
    model = keras.Model(outer_in, keras.layers.Dense(2)(inner(outer_in)))
    norm.moving_mean.assign(np.full(4, 3.0, "float32"))
    norm.moving_variance.assign(np.full(4, 2.0, "float32"))
    predictions, taps = kt.TapModel(model, "inner/bn")(x4, training=True)
    assert_close(predictions, model(x4, training=False))
    assert_close(taps["inner/bn"], (x4 - 3.0) / np.sqrt(2.0 + 1e-3))
    assert_close(norm.moving_mean, np.full(4, 3.0))


# -- shared layers ------------------------------------------------------------


@pytest.fixture
def shared_encoder():
    keras.utils.set_random_seed(4)
    left = keras.Input((4,), name="left")
    right = keras.Input((4,), name="right")
    enc = keras.layers.Dense(3, name="enc")
    merged = keras.layers.Concatenate(name="cat")([enc(left), enc(right)])
    return keras.Model([left, right], merged, name="pair"), enc


def test_each_call_of_a_shared_layer(shared_encoder, x4):
    model, enc = shared_encoder
    tap_model = kt.TapModel(model, ["enc@1", "enc@0"])
    predictions, taps = tap_model([x4, 2 * x4])
    assert list(taps) == ["enc@1", "enc@0"]
    assert_close(predictions, model([x4, 2 * x4]))
    assert_close(taps["enc@0"], dense_ref(enc, x4))
    assert_close(taps["enc@1"], dense_ref(enc, 2 * x4))


def test_bare_name_of_shared_layer_is_ambiguous(shared_encoder):
    model, _ = shared_encoder
    with pytest.raises(ValueError, match=r"called 2 times.*enc@0.*enc@1"):
        kt.TapModel(model, "enc")


def test_shared_nested_submodel_siamese(x4):
    keras.utils.set_random_seed(5)
    tower_in = keras.Input((4,))
    tower = keras.Model(
        tower_in, keras.layers.Dense(3, name="proj")(tower_in), name="tower"
    )
    left, right = keras.Input((4,)), keras.Input((4,))
    diff = keras.layers.Subtract(name="diff")([tower(left), tower(right)])
    model = keras.Model([left, right], diff)
    tap_model = kt.TapModel(
        model, ["tower/proj@0", "tower/proj@1", "tower@1"]
    )
    predictions, taps = tap_model([x4, 3 * x4])
    assert_close(predictions, model([x4, 3 * x4]))
    proj = tower.get_layer("proj")
    assert_close(taps["tower/proj@0"], dense_ref(proj, x4))
    assert_close(taps["tower/proj@1"], dense_ref(proj, 3 * x4))
    assert_close(taps["tower@1"], dense_ref(proj, 3 * x4))
    with pytest.raises(ValueError, match="ambiguous"):
        kt.TapModel(model, "tower/proj")


# -- subclassed models --------------------------------------------------------


class TwoStep(keras.Model):
    """A subclassed model whose `call` is plain Python."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(5, activation="tanh", name="first")
        self.counter = Counter(name="after")
        self.second = keras.layers.Dense(2, name="second")

    def call(self, inputs):
        hidden = self.first(inputs)
        if hidden.shape[-1] == 5:  # Python control flow.
            hidden = hidden * 2.0
        return self.second(self.counter(hidden))


@pytest.fixture
def subclassed(x4):
    keras.utils.set_random_seed(6)
    model = TwoStep(name="two_step")
    model(x4)
    return model


def test_subclassed_eager(subclassed, x4):
    tap_model = kt.TapModel(subclassed, ["first", "second"])
    predictions, taps = tap_model(x4)
    assert list(taps) == ["first", "second"]
    assert_close(predictions, subclassed(x4))
    first = np.tanh(dense_ref(subclassed.first, x4))
    assert_close(taps["first"], first)
    assert_close(taps["second"], predictions)
    # The layers' own `call` is back once the model has run.
    assert "call" not in vars(subclassed.first)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.function tracing is TensorFlow's own",
)
def test_subclassed_inside_tf_function(subclassed, x4):
    import tensorflow as tf

    tap_model = kt.TapModel(subclassed, "first")
    run = tf.function(lambda x: tap_model(x))
    predictions, taps = run(tf.constant(x4))
    assert_close(predictions, subclassed(x4))
    assert_close(taps["first"], np.tanh(dense_ref(subclassed.first, x4)))


def test_subclassed_gradients_through_tap(subclassed, x4):
    tap_model = kt.TapModel(subclassed, "first")
    variables = subclassed.trainable_variables

    def through_tap():
        predictions, taps = tap_model(x4)
        return keras.ops.sum(taps["first"] ** 2) + keras.ops.sum(predictions)

    def by_hand():  # The same loss on the base model, without keras_tap.
        hidden = subclassed.first(x4)
        return keras.ops.sum(hidden**2) + keras.ops.sum(subclassed(x4))

    got_loss, got = value_and_grad(through_tap, variables)
    expected_loss, expected = value_and_grad(by_hand, variables)
    assert_close(got_loss, expected_loss, atol=1e-4)
    assert all(np.abs(g).max() > 0 for g in got)
    for g, e in zip(got, expected):
        assert_close(g, e)


def test_subclassed_unbuilt_raises():
    with pytest.raises(ValueError, match=r"not built.*Call it once"):
        kt.TapModel(TwoStep(), "first")


# -- tap specs ----------------------------------------------------------------


@pytest.fixture
def convnet():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv_a")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="convnet")


def test_pattern_expands_in_graph_order(convnet):
    tap_model = kt.TapModel(convnet, "re:conv_.*")
    assert tap_model.tap_names == ["conv_a", "conv_b"]
    x = images(2, 8)
    _, taps = tap_model(x)
    assert list(taps) == ["conv_a", "conv_b"]
    assert_close(taps["conv_b"], sub_output(convnet, "conv_b", x))


def test_pattern_is_a_fullmatch(convnet):
    with pytest.raises(ValueError, match="matches no layer path"):
        kt.TapModel(convnet, "re:conv")


def test_pattern_expands_shared_calls(shared_encoder):
    model, _ = shared_encoder
    tap_model = kt.TapModel(model, ["re:enc|right"])
    # Input layers are not tappable: `right` matches nothing.
    assert tap_model.tap_names == ["enc@0", "enc@1"]


def test_pattern_over_nested_paths(backbone_in_sequential):
    model, backbone = backbone_in_sequential
    tap_model = kt.TapModel(model, r"re:.*/block_1_.*_relu")
    assert tap_model.tap_names == [
        f"{backbone.name}/block_1_expand_relu",
        f"{backbone.name}/block_1_depthwise_relu",
    ]


def test_dict_spec_names_and_order(convnet):
    tap_model = kt.TapModel(convnet, {"late": "conv_b", "early": "conv_a"})
    _, taps = tap_model(images(2, 8))
    assert list(taps) == ["late", "early"]
    assert tap_model.tap_names == ["late", "early"]


def test_dict_names_with_patterns(convnet):
    tap_model = kt.TapModel(
        convnet, {"convs": "re:conv_.*", "pooled": "re:po.l"}
    )
    # Several matches: `<name>/<path>`; one match keeps the name.
    assert tap_model.tap_names == ["convs/conv_a", "convs/conv_b", "pooled"]


def test_single_string_and_layer_object_specs(convnet):
    assert kt.TapModel(convnet, "pool").tap_names == ["pool"]
    layer = convnet.get_layer("conv_b")
    tap_model = kt.TapModel(convnet, [layer])
    assert tap_model.tap_names == ["conv_b"]
    tap_model = kt.TapModel(convnet, {"b": layer, "a": kt.Tap("conv_a")})
    assert tap_model.tap_names == ["b", "a"]


def test_nested_layer_object_spec(backbone_in_sequential):
    model, backbone = backbone_in_sequential
    layer = backbone.get_layer("block_2_add")
    tap_model = kt.TapModel(model, layer)
    assert tap_model.tap_names == [f"{backbone.name}/block_2_add"]


# -- sharing, not copying -----------------------------------------------------


def test_weights_are_shared_not_copied(mlp, x4):
    tap_model = kt.TapModel(mlp, "hidden")
    base_ids = {id(v) for v in mlp.weights}
    assert base_ids <= {id(v) for v in tap_model.weights}
    assert len(tap_model.weights) == len(mlp.weights)
    out = mlp.get_layer("out")
    out.kernel.assign(to_numpy(out.kernel) + 1.0)
    predictions, _ = tap_model(x4)
    assert_close(predictions, mlp(x4))
    hidden = dense_ref(mlp.get_layer("hidden"), x4, "relu")
    assert_close(predictions, dense_ref(out, hidden))


def test_training_the_tap_model_trains_the_base(mlp, x4):
    tap_model = kt.TapModel(mlp, "hidden")
    tap_model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = to_numpy(mlp.get_layer("out").kernel).copy()
    tap_model.fit(x4, np.ones((8, 3)), verbose=0)
    assert not np.allclose(before, to_numpy(mlp.get_layer("out").kernel))
    assert_close(tap_model(x4)[0], mlp(x4))


# -- one forward pass ---------------------------------------------------------


def _counting_model():
    keras.utils.set_random_seed(8)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, name="hidden")(inputs)
    counted = Counter(name="counter")(hidden)
    outputs = keras.layers.Dense(2, name="out")(counted)
    return keras.Model(inputs, outputs)


def test_one_forward_pass_per_predict_batch(x4):
    model = _counting_model()
    counter = model.get_layer("counter")
    tap_model = kt.TapModel(model, ["hidden", "counter"])
    tap_model.predict(np.concatenate([x4, x4[:4]]), batch_size=4, verbose=0)
    assert int(counter.count) == 3


def test_one_forward_pass_per_training_step(x4):
    model = _counting_model()
    counter = model.get_layer("counter")
    tap_model = kt.TapModel(model, ["hidden", "counter"])
    tap_model.compile(optimizer="sgd", loss="mse")
    x = np.concatenate([x4, x4[:4]])
    tap_model.fit(x, np.zeros((12, 2)), batch_size=4, verbose=0)
    assert int(counter.count) == 3


def test_one_forward_pass_subclassed(subclassed, x4):
    subclassed.counter.count.assign(0)
    tap_model = kt.TapModel(subclassed, ["first", "second"])
    tap_model.predict(np.concatenate([x4, x4[:4]]), batch_size=4, verbose=0)
    assert int(subclassed.counter.count) == 3


# -- keras.applications -------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50():
    keras.utils.set_random_seed(9)
    return keras.applications.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=5
    )


@pytest.fixture(scope="module")
def mobilenet_v2():
    keras.utils.set_random_seed(10)
    return keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=5
    )


@pytest.fixture(scope="module")
def efficientnet_b0():
    keras.utils.set_random_seed(11)
    return keras.applications.EfficientNetB0(
        weights=None, input_shape=(32, 32, 3), classes=5
    )


@pytest.mark.parametrize(
    "fixture, paths",
    [
        ("resnet50", ["conv2_block3_out", "conv4_block6_out", "avg_pool"]),
        ("mobilenet_v2", ["block_3_project_BN", "out_relu"]),
        ("efficientnet_b0", ["block2a_activation", "top_activation"]),
    ],
)
def test_keras_applications(fixture, paths, request):
    model = request.getfixturevalue(fixture)
    tap_model = kt.TapModel(model, paths)
    x = images(2)
    predictions, taps = tap_model(x)
    assert_close(predictions, model(x))
    for path in paths:
        assert_close(taps[path], sub_output(model, path, x), atol=1e-4)


def test_application_output_layer_name_is_reserved(resnet50):
    # keras.applications name their classifier `predictions`.
    with pytest.raises(ValueError, match="reserved"):
        kt.TapModel(resnet50, "predictions")
    tap_model = kt.TapModel(resnet50, {"probs": "predictions"})
    predictions, taps = tap_model(images(1))
    assert_close(taps["probs"], predictions)


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "taps, error, match",
    [
        ([], ValueError, r"`taps` is empty.*kt.list_layers"),
        ({}, ValueError, r"`taps` is empty"),
        ({"predictions": "hidden"}, ValueError, r"'predictions'.*reserved"),
        ("out", ValueError, r"'out'.*reserved for the model's predictions"),
        ({"out": "hidden"}, ValueError, r"'out'.*reserved"),
        (["hidden", "hidden"], ValueError, r"'hidden' is used more than"),
        (
            # Patterns leave the output layer `out` out: one match, named
            # by its path, so `hidden` is there twice.
            ["hidden", "re:hidden|out"],
            ValueError,
            r"'hidden' is used more than once",
        ),
        (3, TypeError, r"`taps` must be a layer path.*received int"),
        ([3], TypeError, r"layer path \(str\) or a keras.layers.Layer"),
        ({"": "hidden"}, TypeError, r"non-empty strings"),
    ],
)
def test_invalid_taps(mlp, taps, error, match):
    with pytest.raises(error, match=match):
        kt.TapModel(mlp, taps)


@pytest.mark.parametrize(
    "model, match",
    [
        ("a string", r"keras.Model.*received str"),
        (keras.layers.Dense(2), r"keras.Model.*received Dense"),
        (np.zeros(3), r"keras.Model.*received ndarray"),
    ],
)
def test_not_a_keras_model(model, match):
    with pytest.raises(TypeError, match=match):
        kt.TapModel(model, "x")


def test_sequential_without_input_raises():
    model = keras.Sequential([keras.layers.Dense(2, name="d")])
    with pytest.raises(ValueError, match=r"no defined input.*build"):
        kt.TapModel(model, "d")


def test_other_backend_raises(monkeypatch, mlp):
    monkeypatch.setattr(trainers.keras.backend, "backend", lambda: "numpy")
    with pytest.raises(
        NotImplementedError,
        match=r"backends \['tensorflow', 'jax', 'torch'\].*'numpy'",
    ):
        kt.TapModel(mlp, "hidden")


class _UnregisteredLoss(keras.losses.Loss):
    """A custom loss that is not registered for serialization."""

    def call(self, y_true, y_pred):
        return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)


@pytest.mark.parametrize(
    "loss",
    [lambda a, b: keras.ops.mean((a - b) ** 2), _UnregisteredLoss()],
    ids=["lambda", "unregistered_loss"],
)
@pytest.mark.parametrize("nested", [False, True])
def test_wrapping_a_compiled_base(mlp, x4, loss, nested):
    """Defect 1: wrapping never depends on how the base was compiled."""
    mlp.compile(keras.optimizers.SGD(0.1), loss=loss)
    base = mlp
    if nested:  # A compiled model inside another graph model.
        inputs = keras.Input((4,))
        base = keras.Model(inputs, mlp(inputs), name="outer")
        base.compile("sgd", loss=loss)
    path = "mlp/hidden" if nested else "hidden"
    tap_model = kt.TapModel(base, path)
    predictions, taps = tap_model(x4)
    np.testing.assert_allclose(
        to_numpy(predictions), to_numpy(mlp(x4)), atol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(taps[path]),
        dense_ref(mlp.get_layer("hidden"), x4, "relu"),
        atol=1e-5,
    )
    # The base's own compile state is untouched: it still fits.
    assert mlp.loss is loss
    before = mlp.get_layer("out").get_weights()[0].copy()
    history = mlp.fit(x4, np.zeros((8, 3)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert np.abs(mlp.get_layer("out").get_weights()[0] - before).max() > 0
