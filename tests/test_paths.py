"""Layer paths: `kt.list_layers` and the errors of path resolution."""

import keras
import numpy as np
import pytest
from conftest import to_numpy, value_and_grad

import keras_tap as kt
from keras_tap.taps import paths


@pytest.fixture
def nested():
    """`pre -> outer(mid -> inner(deep)) -> head`, `enc` shared twice."""
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((5,), name="inner_in")
    inner = keras.Model(
        inner_in, keras.layers.Dense(3, name="deep")(inner_in), name="inner"
    )
    outer_in = keras.Input((5,), name="outer_in")
    mid = keras.layers.Dense(5, name="mid")(outer_in)
    outer = keras.Model(outer_in, inner(mid), name="outer")
    inputs = keras.Input((4,), name="x")
    enc = keras.layers.Dense(5, name="enc")
    pre = keras.layers.Dense(4, name="pre")(inputs)
    hidden = keras.layers.Add(name="add")([enc(inputs), enc(pre)])
    outputs = keras.layers.Dense(2, name="head")(outer(hidden))
    return keras.Model(inputs, outputs, name="net")


# -- list_layers --------------------------------------------------------------


def test_list_layers_records(nested):
    records = kt.list_layers(nested)
    assert all(isinstance(r, kt.LayerRecord) for r in records)
    by_path = {r.path: r for r in records}
    # Graph order; nested models expanded (inner layers, then the model
    # call itself); input layers left out.
    order = [r.path for r in records]
    assert sorted(order[:2]) == ["enc", "pre"]  # Same depth: either order.
    assert order[2:] == [
        "add",
        "outer/mid",
        "outer/inner/deep",
        "outer/inner",
        "outer",
        "head",
    ]
    assert by_path["enc"].calls == 2
    assert all(r.calls == 1 for p, r in by_path.items() if p != "enc")
    assert by_path["outer/inner/deep"].class_name == "Dense"
    assert by_path["outer"].class_name == "Functional"
    assert by_path["add"].class_name == "Add"
    assert by_path["outer/inner/deep"].output_shape == (None, 3)
    assert by_path["head"].output_shape == (None, 2)
    outer = nested.get_layer("outer")
    layers = {
        "enc": nested.get_layer("enc"),
        "outer": outer,
        "outer/mid": outer.get_layer("mid"),
        "outer/inner/deep": outer.get_layer("inner").get_layer("deep"),
        "add": nested.get_layer("add"),
    }
    for path, layer in layers.items():
        assert by_path[path].params == layer.count_params(), path
    assert by_path["enc"].params == 4 * 5 + 5
    assert by_path["outer"].params == 5 * 5 + 5 + 5 * 3 + 3


def test_list_layers_sequential_without_input():
    model = keras.Sequential(
        [keras.layers.Conv2D(2, 3, name="conv"),
         keras.layers.Flatten(name="flatten")]
    )
    model.build((None, 6, 6, 1))
    records = kt.list_layers(model)
    assert [(r.path, r.class_name) for r in records] == [
        ("conv", "Conv2D"),
        ("flatten", "Flatten"),
    ]
    assert records[0].output_shape == (None, 4, 4, 2)
    assert records[1].output_shape == (None, 32)
    assert records[0].params == 3 * 3 * 1 * 2 + 2


class Siamese(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tower = keras.layers.Dense(3, name="tower")
        self.unused = keras.layers.Dense(3, name="unused")
        self.head = keras.layers.Dense(1, name="head")

    def build(self, input_shape):
        self.unused.build((None, 2))  # Built, but never called.

    def call(self, inputs):
        left, right = inputs[:, :2], inputs[:, 2:]
        return self.head(self.tower(left) - self.tower(right))


def test_list_layers_subclassed():
    model = Siamese(name="siamese")
    model(np.zeros((2, 4), "float32"))
    records = kt.list_layers(model)
    by_path = {r.path: r for r in records}
    assert [r.path for r in records][:2] == ["tower", "head"]
    assert by_path["tower"].calls == 2
    assert by_path["tower"].output_shape == (None, 3)
    assert by_path["tower"].params == model.tower.count_params() == 9
    assert by_path["head"].output_shape == (None, 1)
    # Never called: listed with no calls, so a path to it errors clearly.
    assert by_path["unused"].calls == 0
    with pytest.raises(ValueError, match="never called"):
        kt.TapModel(model, "unused")
    with pytest.raises(ValueError, match="ambiguous"):
        kt.TapModel(model, "tower")
    tap_model = kt.TapModel(model, ["tower@0", "tower@1"])
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    _, taps = tap_model(x)
    np.testing.assert_allclose(
        to_numpy(taps["tower@1"]), to_numpy(model.tower(x[:, 2:]))
    )


def test_list_layers_accepts_an_index(nested):
    index = paths.LayerIndex(nested)
    assert kt.list_layers(index) == kt.list_layers(nested)


def test_list_layers_rejects_non_models():
    with pytest.raises(TypeError, match=r"received list"):
        kt.list_layers([1, 2])


# -- resolution ---------------------------------------------------------------


def test_resolve_names_and_calls(nested):
    index = paths.LayerIndex(nested)
    [(name, point)] = index.resolve("enc@1")
    assert (name, point.path, point.index) == ("enc@1", "enc", 1)
    [(name, point)] = index.resolve("outer/inner/deep@0")
    assert (name, point.path, point.index) == ("outer/inner/deep@0",
                                               "outer/inner/deep", 0)
    names = [n for n, _ in index.resolve("re:outer/.*")]
    assert names == ["outer/mid", "outer/inner/deep", "outer/inner"]
    assert [n for n, _ in index.resolve("re:enc")] == ["enc@0", "enc@1"]


def test_split_call():
    assert paths.split_call("enc@1") == ("enc", 1)
    assert paths.split_call("enc") == ("enc", None)
    assert paths.split_call("a@b") == ("a@b", None)


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            "hed",
            r"Tap 'hed' in model 'net': no layer is named 'hed'\. "
            r"Closest valid paths: \['head'\]\. Call `kt.list_layers",
        ),
        (
            "outer/inner/dep",
            r"nested model 'outer/inner' has no layer named 'dep'.*"
            r"'outer/inner/deep'.*kt.list_layers",
        ),
        ("outer/nope/deep", r"nested model 'outer' has no layer named 'nope'"),
        ("nope/deep", r"no layer is named 'nope'.*'outer/inner/deep'"),
        ("head/kernel", r"'head' is a Dense layer, not a nested model"),
        ("outer/mid/x", r"'outer/mid' is a Dense layer, not a nested model"),
        ("x", r"input layer"),
        ("enc@2", r"call index 2 is out of range.*called 2 time.*enc@1"),
        ("head@1", r"call index 1 is out of range.*\['head', 'head@0'\]"),
        ("enc", r"called 2 times.*ambiguous.*\['enc@0', 'enc@1'\]"),
        ("re:nothing.*", r"'re:nothing\.\*'.*matches no layer.*list_layers"),
        ("re:enc(", r"'re:enc\(': invalid regular expression"),
        (3, r"layer path \(str\) or a keras.layers.Layer.*received int"),
    ],
)
def test_resolution_errors(nested, spec, match):
    error = TypeError if isinstance(spec, int) else ValueError
    with pytest.raises(error, match=match):
        paths.LayerIndex(nested).resolve(spec)
    if error is ValueError:
        with pytest.raises(ValueError, match=match):
            kt.TapModel(nested, [spec])


def test_layer_object_not_in_model(nested):
    stranger = keras.layers.Dense(2, name="head")
    with pytest.raises(ValueError, match=r"not part of model 'net'"):
        kt.TapModel(nested, stranger)


def test_subclassed_nested_in_graph_model_is_tapped_inside():
    inner = Siamese(name="sub")
    inner(np.zeros((1, 4), "float32"))
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="pre")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(
        inner(hidden)))
    records = {r.path: r for r in kt.list_layers(model)}
    assert list(records) == [
        "pre", "sub/tower", "sub/head", "sub/unused", "sub", "out"
    ]
    assert records["sub/tower"].calls == 2
    assert records["sub/tower"].output_shape == (None, 3)
    with pytest.raises(ValueError, match=r"called 2 times"):
        kt.TapModel(model, "sub/tower")
    with pytest.raises(ValueError, match=r"Closest valid paths: \['sub/"):
        kt.TapModel(model, "sub/towr@0")
    tap_model = kt.TapModel(model, ["sub/tower@1", "pre", "sub"])
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    predictions, taps = to_numpy(tap_model(x))
    np.testing.assert_allclose(predictions, to_numpy(model(x)), rtol=1e-6)
    pre = to_numpy(model.get_layer("pre")(x))
    np.testing.assert_allclose(taps["pre"], pre, rtol=1e-6)
    np.testing.assert_allclose(
        taps["sub/tower@1"], to_numpy(inner.tower(pre[:, 2:])), rtol=1e-5
    )
    np.testing.assert_allclose(taps["sub"], to_numpy(inner(pre)), rtol=1e-6)

    # Gradients flow through the intercepted tap, as through the base.
    def tapped_loss():
        _, taps = tap_model(x)
        return keras.ops.sum(taps["sub/tower@1"] ** 2)

    def plain_loss():
        right = model.get_layer("pre")(x)[:, 2:]
        return keras.ops.sum(inner.tower(right) ** 2)

    variables = inner.tower.trainable_variables
    loss, grads = value_and_grad(tapped_loss, variables)
    expected, want = value_and_grad(plain_loss, variables)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # Extraction reaches the inner call too.
    values = tap_model.extract(x, taps=["sub/tower@0"], verbose=0)
    np.testing.assert_allclose(
        to_numpy(values["sub/tower@0"]),
        to_numpy(inner.tower(pre[:, :2])),
        rtol=1e-5,
    )


class Wrapper(keras.Model):
    """A subclassed model calling another subclassed model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = Siamese(name="body")
        self.out = keras.layers.Dense(2, name="out")

    def call(self, inputs):
        return self.out(self.body(inputs))


def test_list_layers_nested_subclassed_in_call_order():
    model = Wrapper(name="wrapper")
    x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    model(x)
    records = kt.list_layers(model)
    # Like graph models: a nested model is listed after its layers.
    assert [(r.path, r.calls) for r in records] == [
        ("body/tower", 2),
        ("body/head", 1),
        ("body", 1),
        ("out", 1),
        ("body/unused", 0),
    ]
    _, taps = to_numpy(kt.TapModel(model, ["body/head", "body/tower@1"])(x))
    np.testing.assert_allclose(
        taps["body/head"], to_numpy(model.body(x)), rtol=1e-6
    )
    np.testing.assert_allclose(
        taps["body/tower@1"], to_numpy(model.body.tower(x[:, 2:])), rtol=1e-6
    )


def _classifier(name="predictions"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="x")
    h = keras.layers.Dense(5, activation="relu", name="fc1")(inputs)
    h = keras.layers.Dense(4, activation="relu", name="fc2")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name=name)(h)
    return keras.Model(inputs, outputs, name="classifier")


def test_pattern_skips_the_output_layers():
    """Defect 6: `re:.*` no longer fails on the reserved output name."""
    model = _classifier()
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    tap_model = kt.TapModel(model, "re:.*")
    assert tap_model.tap_names == ["fc1", "fc2"]
    predictions, taps = to_numpy(tap_model(x))
    np.testing.assert_allclose(predictions, to_numpy(model(x)), atol=1e-6)
    reference = keras.Model(model.input, model.get_layer("fc2").output)
    np.testing.assert_allclose(taps["fc2"], to_numpy(reference(x)), atol=1e-6)
    # Sequential models have no `output_names`: the output is found by
    # its tensor.
    seq = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(2, name="h"),
         keras.layers.Dense(1, name="predictions")]
    )
    assert kt.TapModel(seq, "re:.*").tap_names == ["h"]
    # Named explicitly, the output layer is still reserved...
    with pytest.raises(ValueError, match="reserved"):
        kt.TapModel(model, "predictions")
    # ...and a pattern that matches it alone says so.
    with pytest.raises(ValueError, match="matches only the output layers"):
        kt.TapModel(model, "re:pred.*")


def test_pattern_on_vgg16_skips_predictions():
    vgg = keras.applications.VGG16(
        weights=None, input_shape=(32, 32, 3), include_top=True, classes=3
    )
    tap_model = kt.TapModel(vgg, "re:.*")
    assert "predictions" not in tap_model.tap_names
    assert tap_model.tap_names[-1] == "fc2"
    assert len(tap_model.tap_names) == len(vgg.layers) - 2


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mha", ("mha", None, None)),
        ("mha:output[1]", ("mha", "output", 1)),
        ("enc@1:input", ("enc@1", "input", None)),
        ("add:input[0]", ("add", "input", 0)),
        ("split:output[high]", ("split", "output", "high")),
        ("split:output['high']", ("split", "output", "high")),
        ("a/b:output", ("a/b", "output", None)),
        ("weird:name", ("weird:name", None, None)),
    ],
)
def test_split_suffix(spec, expected):
    assert paths.split_suffix(spec) == expected
