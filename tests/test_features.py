"""`kt.FeatureModel`: a model of the taps alone."""

import warnings

import keras
import numpy as np
import pytest
from conftest import assert_close, value_and_grad

import keras_tap as kt


def _x(n, shape=(4,), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + shape).astype("float32")


@pytest.fixture
def convnet():
    """`Input(8, 8, 3) -> conv1 -> conv2 -> pool -> head`."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(5, 3, activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs, name="convnet")


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = keras.layers.Dense(6, activation="relu", name="a")
        self.b = keras.layers.Dense(3, name="b")

    def call(self, x):
        return self.b(self.a(x))


def test_outputs_match_keras_sub_models(convnet):
    features = kt.FeatureModel(convnet, ["conv1", "pool"])
    x = _x(2, (8, 8, 3))
    values = features(x)
    assert list(values) == ["conv1", "pool"]
    for name in values:
        reference = keras.Model(convnet.input, convnet.get_layer(name).output)
        assert_close(values[name], reference(x), atol=1e-6)
    assert features.base is convnet


def test_holds_only_the_layers_the_taps_need(convnet):
    features = kt.FeatureModel(convnet, {"early": "conv1"})
    conv1 = convnet.get_layer("conv1")
    assert features.count_params() == 3 * 3 * 3 * 4 + 4
    assert {id(w) for w in features.weights} == {id(w) for w in conv1.weights}


def test_resnet50_params_are_those_upstream_of_the_tap():
    keras.utils.set_random_seed(0)
    resnet = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    tap = "conv2_block1_out"
    features = kt.FeatureModel(resnet, tap)
    # Independently: every layer on a path from the input to the tap.
    wanted, stack = set(), [resnet.get_layer(tap)]
    while stack:
        layer = stack.pop()
        if id(layer) in wanted:
            continue
        wanted.add(id(layer))
        for node in layer._inbound_nodes:
            stack.extend(t._keras_history[0] for t in node.input_tensors)
    upstream = [layer for layer in resnet.layers if id(layer) in wanted]
    expected = sum(layer.count_params() for layer in upstream)
    assert features.count_params() == expected
    assert expected < resnet.count_params() / 10
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3))
    reference = keras.Model(resnet.input, resnet.get_layer(tap).output)
    assert_close(features(x)[tap], reference(x), rtol=1e-5, atol=1e-4)


def test_gradients_equal_a_keras_sub_model(convnet):
    features = kt.FeatureModel(convnet, "conv2")
    reference = keras.Model(convnet.input, convnet.get_layer("conv2").output)
    # The input is a variable too: its gradient is compared as well.
    x = keras.Variable(_x(2, (8, 8, 3)), name="x")
    grads = []
    for model, pick in ((features, lambda v: v["conv2"]), (reference, None)):

        def loss(model=model, pick=pick):
            out = model(x.value, training=True)
            out = pick(out) if pick else out
            return keras.ops.sum(out**2)

        _, grad = value_and_grad(loss, [x] + model.trainable_weights)
        grads.append(grad)
    assert len(grads[0]) == len(grads[1]) == 5
    for a, b in zip(*grads):
        assert np.abs(b).max() > 0
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trains_the_shared_layers_inside_another_model(convnet):
    features = kt.FeatureModel(convnet, ["conv1", "conv2"])
    inputs = keras.Input((8, 8, 3))
    maps = features(inputs)
    pooled = [
        keras.layers.GlobalAveragePooling2D()(maps[name])
        for name in ("conv1", "conv2")
    ]
    outputs = keras.layers.Dense(1)(keras.layers.Concatenate()(pooled))
    decoder = keras.Model(inputs, outputs)
    # Only the layers in use are variables of the new model: none of them
    # is left without a gradient.
    assert len(decoder.trainable_weights) == 4 + 2
    before = convnet.get_layer("conv1").get_weights()[0].copy()
    head = convnet.get_layer("head").get_weights()[0].copy()
    decoder.compile(keras.optimizers.SGD(0.1), loss="mse")
    x, y = _x(16, (8, 8, 3)), np.ones((16, 1), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = decoder.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert not [w for w in caught if "Gradients do not exist" in str(w)]
    assert history.history["loss"][-1] < history.history["loss"][0]
    after = convnet.get_layer("conv1").get_weights()[0]
    assert np.abs(after - before).max() > 1e-6
    np.testing.assert_array_equal(
        convnet.get_layer("head").get_weights()[0], head
    )


def test_save_and_load(convnet, tmp_path):
    features = kt.FeatureModel(convnet, {"c": "conv2", "p": "re:po.*"})
    for layer in convnet.layers:  # Weights unlike any fresh build.
        layer.set_weights([w + 0.5 for w in layer.get_weights()])
    path = tmp_path / "features.keras"
    features.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kt.FeatureModel)
    assert loaded.tap_names == ["c", "p"]
    x = _x(3, (8, 8, 3))
    expected, actual = features(x), loaded(x)
    for name in expected:
        assert_close(actual[name], expected[name], atol=1e-6)


def test_compiled_base_with_a_lambda_saves(convnet, tmp_path):
    convnet.compile("adam", loss=lambda a, b: keras.ops.mean((a - b) ** 2))
    features = kt.FeatureModel(convnet, "conv1")
    features.save(tmp_path / "f.keras")
    loaded = keras.models.load_model(tmp_path / "f.keras")
    x = _x(2, (8, 8, 3))
    assert_close(loaded(x)["conv1"], features(x)["conv1"], atol=1e-6)


def test_subclassed_model_is_watched(tmp_path):
    keras.utils.set_random_seed(0)
    net = Net(name="net")
    x = _x(5)
    net(x[:1])
    features = kt.FeatureModel(net, "a")
    kernel, bias = net.a.get_weights()
    assert_close(
        features(x)["a"], np.maximum(x @ kernel + bias, 0), atol=1e-5
    )
    assert "call" not in vars(net.a)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(features(inputs)["a"])
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, np.ones((5, 1)), epochs=2, verbose=0)
    assert np.abs(net.a.get_weights()[0] - kernel).max() > 1e-6
    assert "call" not in vars(net.a)


@pytest.mark.parametrize(
    "taps, error, match",
    [
        ([], ValueError, r"`taps` is empty"),
        ("nope", ValueError, r"'nope'.*kt.list_layers"),
        (["conv1", "re:conv1"], ValueError, r"'conv1' is used more than"),
        (3, TypeError, r"`taps` must be a layer path"),
    ],
)
def test_invalid_taps(convnet, taps, error, match):
    with pytest.raises(error, match=match):
        kt.FeatureModel(convnet, taps)


def test_not_a_model():
    with pytest.raises(TypeError, match="Expected a built Keras model"):
        kt.FeatureModel(keras.layers.Dense(2), "dense")


def test_docstring_examples_run():
    import doctest

    from keras_tap.taps import features, watch

    for module in (features, watch):
        results = doctest.testmod(module)
        assert results.attempted and not results.failed, module.__name__
