"""Reach: points inside layers, suffixes, ops, nested clashing names."""

import keras
import numpy as np
import pytest
from conftest import assert_close, to_numpy

import keras_tap as kt


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# -- 1. points inside subclassed layers ----------------------------------


def test_subclassed_model_sublayers_at_any_depth():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.parts = [keras.layers.Dense(3, name="part")]

        def call(self, x):
            return self.parts[0](x) * 2.0

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.block = Block(name="block")
            self.head = keras.layers.Dense(1, name="head")

        def call(self, x):
            return self.head(self.block(x))

    net = Net(name="net")
    x = _x(4, 5)
    net(x)
    assert [r.path for r in kt.list_layers(net)] == [
        "block/part", "block", "head"
    ]
    _, taps = kt.TapModel(net, ["block/part", "block/part:input"])(x)
    part = net.block.parts[0]
    assert_close(
        taps["block/part"], x @ to_numpy(part.kernel) + to_numpy(part.bias),
        atol=1e-5,
    )
    assert_close(taps["block/part:input"], x)


# -- 2. suffixes and structured outputs ----------------------------------


def _suffix_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,), name="x")
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(inputs)
    total = keras.layers.Add(name="sum")([a, b])
    enc = keras.layers.Dense(4, name="enc")
    twice = enc(enc(total))
    q = keras.layers.Reshape((2, 2), name="q")(twice)
    v = keras.layers.Reshape((2, 2), name="v")(total)
    mha = keras.layers.MultiHeadAttention(2, 3, name="mha")
    out, scores = mha(q, v, return_attention_scores=True)
    outputs = keras.layers.Flatten(name="out")(out)
    scores = keras.layers.Flatten(name="att")(scores)
    return keras.Model(inputs, [outputs, scores], name="suffixes")


def test_input_and_output_suffixes_equal_their_references():
    model = _suffix_model()
    x = _x(5, 6)
    taps = ["enc@1:input", "sum:input", "mha:input[1]", "mha:output[1]",
            "mha", "q:input"]
    tap_model = kt.TapModel(model, taps)
    predictions, got = tap_model(x)
    a, b = to_numpy([model.get_layer("a")(x), model.get_layer("b")(x)])
    total = a + b
    enc = model.get_layer("enc")
    once = to_numpy(enc(total))
    assert_close(got["enc@1:input"], once, atol=1e-5)
    assert_close(got["q:input"], enc(once), atol=1e-5)
    assert_close(got["sum:input"][0], a, atol=1e-5)
    assert_close(got["sum:input"][1], b, atol=1e-5)
    v = np.reshape(total, (5, 2, 2))
    assert_close(got["mha:input[1]"], v, atol=1e-5)
    _, scores = model.get_layer("mha")(
        np.reshape(to_numpy(enc(once)), (5, 2, 2)),
        v,
        return_attention_scores=True,
    )
    # A bare path on a tuple output stands for the whole structure.
    assert isinstance(got["mha"], (tuple, list)) and len(got["mha"]) == 2
    assert_close(got["mha:output[1]"], scores, atol=1e-6)
    assert_close(got["mha"][1], scores, atol=1e-6)
    assert_close(
        predictions[1], np.reshape(to_numpy(scores), (5, -1)), atol=1e-6
    )
    # extract returns every element of a structured tap.
    values = tap_model.extract(x, taps=["mha", "sum:input"], verbose=0)
    assert sorted(values) == [
        "mha:output[0]", "mha:output[1]", "sum:input:output[0]",
        "sum:input:output[1]",
    ]
    assert_close(values["mha:output[1]"], scores, atol=1e-6)
    records = {r.path: r for r in kt.list_layers(model)}
    assert records["mha"].output_shape == ((None, 2, 2), (None, 2, 2, 2))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sum:input[1]", r"'sum' is called with 1 positional input.*"
                         r"':input'"),
        ("a:output[1]", r"'a' has one output.*bare path"),
        ("mha:output[2]", r"no element 2.*':output\[0\]'"),
        ("enc:input", r"called 2 times.*'enc@0:input'"),
    ],
)
def test_suffix_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        kt.TapModel(_suffix_model(), spec)


def test_structured_point_with_a_single_tensor_loss_raises():
    with pytest.raises(ValueError, match=r"mha:output\[0\].*mha:output\[1\]"):
        kt.TapModel(
            _suffix_model(), {"att": kt.Tap("mha", regularizer="l2")}
        )


def test_dict_output_of_a_sublayer():
    class Split(keras.layers.Layer):
        def call(self, x):
            return {"low": x[:, :2], "high": x[:, 2:]}

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.split = Split(name="split")

        def call(self, x):
            parts = self.split(x)
            return parts["low"] + parts["high"]

    net = Net(name="net")
    x = _x(3, 4)
    net(x)
    _, taps = kt.TapModel(net, ["split:output[high]"])(x)
    assert_close(taps["split:output[high]"], x[:, 2:])


# -- 3. nested graph models with clashing names ---------------------------


def _tower(name):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="relu", name="fc")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="proj")(h),
                       name=name)


def test_two_towers_from_one_factory():
    keras.utils.set_random_seed(2)
    stream_a, stream_b = _tower("stream_a"), _tower("stream_b")
    inputs = keras.Input((6,))
    joined = keras.layers.Concatenate(name="join")(
        [stream_a(inputs), stream_b(inputs)]
    )
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(joined))
    x = _x(4, 6)
    tap_model = kt.TapModel(model, ["stream_a/fc", "stream_b/fc", "join"])
    predictions, got = tap_model(x)
    assert_close(predictions, model(x), atol=1e-6)
    for tower in (stream_a, stream_b):
        alone = keras.Model(tower.inputs, tower.get_layer("fc").output)
        assert_close(got[f"{tower.name}/fc"], alone(x),
                                   atol=1e-6)
    # Weights stay shared: one set per tower, not copies.
    assert tap_model.count_params() == model.count_params()
    values = tap_model.extract(x, taps=["stream_b/proj"], verbose=0)
    assert_close(values["stream_b/proj"], stream_b(x),
                               atol=1e-6)


def test_two_mobilenet_streams():
    keras.utils.set_random_seed(3)
    streams = [
        keras.applications.MobileNetV2(
            weights=None, include_top=False, input_shape=(32, 32, 3),
            alpha=0.35, name=name,
        )
        for name in ("stream_a", "stream_b")
    ]
    inputs = keras.Input((32, 32, 3))
    pooled = [
        keras.layers.GlobalAveragePooling2D()(s(inputs)) for s in streams
    ]
    model = keras.Model(inputs, keras.layers.Concatenate()(pooled))
    x = _x(2, 32, 32, 3)
    _, got = kt.TapModel(model, ["stream_a/Conv1", "stream_b/Conv1"])(x)
    for stream in streams:
        alone = keras.Model(stream.inputs, stream.get_layer("Conv1").output)
        assert_close(got[f"{stream.name}/Conv1"], alone(x),
                                   atol=1e-5)


# -- 4. operations of a Functional graph -----------------------------------


def test_op_points_equal_the_op_on_the_previous_output():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, name="d")
    d = dense(inputs)
    relu = keras.ops.nn.relu(d)
    total = d + relu
    first = total[..., 0]
    model = keras.Model(inputs, [total, first])
    names = [op.name for op in model.operations][2:]
    listed = [r.path for r in kt.list_layers(model)]
    assert listed == ["d"] + names
    relu_name, add_name, item_name = names
    x = _x(5, 4)
    _, got = kt.TapModel(model, {"relu": relu_name, "sum": add_name,
                                 "first": item_name})(x)
    hidden = x @ to_numpy(dense.kernel) + to_numpy(dense.bias)
    assert_close(got["relu"], np.maximum(hidden, 0), atol=1e-5)
    assert_close(
        got["sum"], hidden + np.maximum(hidden, 0), atol=1e-5
    )
    assert_close(
        got["first"], (hidden + np.maximum(hidden, 0))[..., 0], atol=1e-5
    )
    got = kt.TapModel(model, [f"{add_name}:input[1]"])(x)[1]
    assert_close(
        got[f"{add_name}:input[1]"], np.maximum(hidden, 0), atol=1e-5
    )


# -- 5. attention probabilities --------------------------------------------


def test_mha_softmax_equals_return_attention_scores():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5, 8))
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, mha(inputs, inputs))
    records = {r.path: r for r in kt.list_layers(model)}
    softmax = [p for p in records if p.startswith("mha/softmax")]
    assert len(softmax) == 1
    assert records[softmax[0]].output_shape == (None, 2, 5, 5)
    x = _x(3, 5, 8)
    tap_model = kt.TapModel(model, ["mha/softmax"])  # suffix-free
    predictions, got = tap_model(x)
    output, scores = mha(x, x, return_attention_scores=True)
    assert_close(got["mha/softmax"], scores, atol=1e-6)
    assert_close(predictions, output, atol=1e-5)
    # The Layer object works as well, and the layer is left as it was.
    _, got = kt.TapModel(model, [mha._softmax])(x)
    assert_close(got[softmax[0]], scores, atol=1e-6)
    assert "call" not in vars(mha) and "call" not in vars(mha._softmax)


# -- 6. errors, teacher, training ------------------------------------------


def test_point_that_did_not_run_raises_naming_the_tap():
    class Branchy(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra = keras.layers.Dense(2, name="extra")
            self.use_extra = True

        def call(self, x):
            return self.extra(x) if self.use_extra else x[:, :2]

    model = Branchy(name="branchy")
    model(_x(2, 2))
    tap_model = kt.TapModel(model, "extra")
    model.use_extra = False
    with pytest.raises(ValueError, match=r"Tap 'extra' was not computed"):
        tap_model(_x(2, 2))


def test_cli_layers_depth(tmp_path, capsys):
    from keras_tap.runs import cli

    inputs = keras.Input((5, 8))
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, mha(inputs, inputs))
    path = tmp_path / "mha.keras"
    model.save(path)

    def table(*extra):
        code = cli.main(["layers", str(path), *extra])
        out, err = capsys.readouterr()
        assert (code, err) == (0, "")
        return [line.split()[0] for line in out.splitlines()[1:]]

    assert table("--depth", "1") == ["mha"]
    every = table()
    assert every[-1] == "mha" and any(
        p.startswith("mha/softmax") for p in every
    )
    assert "mha/dropout" in " ".join(every)  # never called: listed, '-'
    with pytest.raises(SystemExit):
        cli.main(["layers", str(path), "--depth", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_config_with_suffix_paths_validates(tmp_path, capsys):
    import pathlib

    import yaml

    from keras_tap.runs import cli

    digits = pathlib.Path(__file__).parents[1] / "examples/configs"
    raw = yaml.safe_load((digits / "digits.yaml").read_text())
    raw["taps"] = {
        "pool:input": {"layer": "pool:input", "regularizer": "activity_l2"},
        "all": {"layer": "re:conv[12]"},
    }
    raw["callbacks"] = None
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(
        ["validate", str(path), "--set", 'taps["pool:input"].weight=0.5']
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "tap pool:input: pool:input -> (None, 8, 8, 32)" in out


def test_layer_object_tap_saves_a_process_stable_path(tmp_path):
    keras.utils.set_random_seed(8)
    for _ in range(2):  # later softmaxes get `_N` suffixes
        keras.layers.Softmax()
    inputs = keras.Input((4, 8))
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, mha(inputs, inputs))
    tap_model = kt.TapModel(model, {"att": mha._softmax})
    assert mha._softmax.name != "softmax"
    assert tap_model.taps["att"].layer == "mha/softmax"
    path = tmp_path / "m.keras"
    tap_model.save(path)
    loaded = keras.models.load_model(path)
    x = _x(2, 4, 8)
    _, scores = mha(x, x, return_attention_scores=True)
    assert_close(loaded(x)[1]["att"], scores, atol=1e-6)


