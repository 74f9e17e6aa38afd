"""`":input[name]"`: the keyword argument `name` of a layer call, as passed.

A layer called with keyword arguments only (keras-hub's Llama decoder calls
its attention as `self_attention(hidden_states=x, attention_mask=...)`)
has no positional input, so `":input"` cannot reach it; `":input[name]"`
can, everywhere a point works: taps, extraction, `TapStatistics`,
`kt.edit` and `gradients`. Every value is checked against NumPy, the layer
called by hand, or the backend's own autodiff.
"""

import keras
import numpy as np
import pytest
from conftest import assert_close, dense_ref, grad_at, to_numpy
from keras import ops

import keras_tap as kt

D = 3


class Mix(keras.layers.Layer):
    """`(hidden * scale) @ kernel`, its inputs passed by keyword."""

    def build(self, input_shape=None):
        self.kernel = self.add_weight(shape=(D, 2), name="kernel")

    def call(self, hidden=None, scale=None, flag=None):
        return ops.matmul(hidden * scale, self.kernel)


def _mix_ref(mix, hidden, scale):
    kernel = to_numpy(mix.kernel)
    return (np.asarray(hidden, np.float64) * scale) @ kernel


def _functional():
    keras.utils.set_random_seed(0)
    x = keras.Input((D,), name="x")
    s = keras.Input((D,), name="s")
    hidden = keras.layers.Dense(D, name="dense")(x)
    out = Mix(name="mix")(hidden=hidden, scale=s, flag=True)
    return keras.Model([x, s], out, name="functional")


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(D, name="dense")
        self.mix = Mix(name="mix")

    def call(self, x):
        return self.mix(hidden=self.dense(x), scale=x + 1.0, flag=None)


def _subclassed():
    keras.utils.set_random_seed(0)
    model = Subclassed(name="subclassed")
    model(np.zeros((1, D), "float32"))
    return model


def _data(n=4):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, D)).astype("float32")
    s = rng.normal(size=(n, D)).astype("float32")
    return x, s


def _case(kind):
    """`(model, inputs, mix layer, dense layer, scale as passed)`."""
    x, s = _data()
    if kind == "functional":
        model = _functional()
        return model, [x, s], model.get_layer("mix"), \
            model.get_layer("dense"), s
    model = _subclassed()
    return model, x, model.mix, model.dense, x + 1.0


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_tap_is_the_keyword_argument(kind):
    model, inputs, mix, dense, scale = _case(kind)
    x = inputs[0] if kind == "functional" else inputs
    tap_model = kt.TapModel(model, ["mix:input[hidden]", "mix:input[scale]"])
    predictions, taps = tap_model(inputs)
    hidden = dense_ref(dense, x)
    assert_close(taps["mix:input[hidden]"], hidden, rtol=1e-5, atol=1e-6)
    assert_close(taps["mix:input[scale]"], scale, rtol=1e-6)
    assert_close(predictions, _mix_ref(mix, hidden, scale), rtol=1e-5,
                 atol=1e-6)
    # Quotes around the key are accepted too, and name the same point.
    _, quoted = kt.TapModel(model, ["mix:input['hidden']"])(inputs)
    assert_close(quoted["mix:input['hidden']"], hidden, rtol=1e-5, atol=1e-6)
    # Extraction keeps the suffix in the key.
    got = tap_model.extract(inputs, verbose=0)
    assert_close(got["mix:input[hidden]"], hidden, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_replace_changes_the_output_as_a_hand_call(kind):
    model, inputs, mix, dense, scale = _case(kind)
    value = np.random.default_rng(2).normal(size=(4, D)).astype("float32")
    expected = mix(hidden=ops.convert_to_tensor(value),
                   scale=ops.convert_to_tensor(scale))
    before = to_numpy(model(inputs))
    with kt.edit(model, {"mix:input[hidden]": kt.edits.Replace(value)}):
        edited = model(inputs)
        predicted = model.predict(inputs, verbose=0)
    assert_close(edited, expected)
    assert_close(predicted, expected, rtol=1e-6)
    assert_close(edited, _mix_ref(mix, value, scale), rtol=1e-5, atol=1e-6)
    # Closed: the model computes what it did before.
    assert_close(model(inputs), before)
    # The scale is a keyword argument too: zero it, the output is zero.
    with kt.edit(model, {"mix:input[scale]": kt.edits.Zero()}):
        assert_close(model(inputs), np.zeros((4, 2)))


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_gradients_at_a_keyword_argument(kind):
    model, inputs, mix, dense, scale = _case(kind)
    x = inputs[0] if kind == "functional" else inputs
    tap_model = kt.TapModel(model, ["mix:input[hidden]"])

    def target(predictions):
        return ops.sum(ops.square(predictions), axis=-1)

    _, taps, grads = tap_model.gradients(inputs, target=target)
    hidden = dense_ref(dense, x).astype("float32")
    assert_close(taps["mix:input[hidden]"], hidden, rtol=1e-5, atol=1e-6)
    scale_t = ops.convert_to_tensor(scale)
    _, expected = grad_at(
        lambda h: ops.sum(target(mix(hidden=h, scale=scale_t))), hidden
    )
    assert_close(grads["mix:input[hidden]"], expected, rtol=1e-5, atol=1e-6)


def test_statistics_of_a_keyword_argument():
    model, inputs, _, dense, _ = _case("functional")
    tap_model = kt.TapModel(model, ["mix:input[hidden]"])
    tap_model.compile(keras.optimizers.SGD(0.0), "mse")
    history = tap_model.fit(
        inputs, np.zeros((4, 2), "float32"), batch_size=4, epochs=1,
        verbose=0, callbacks=[kt.callbacks.TapStatistics()],
    )
    hidden = dense_ref(dense, inputs[0])
    np.testing.assert_allclose(
        history.history["mix:input[hidden]_mean"][0], hidden.mean(),
        rtol=1e-4, atol=1e-6,
    )


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_errors_name_the_keyword_arguments(kind):
    model, *_ = _case(kind)
    # A bad key: the tensor keyword arguments, the closest first.
    with pytest.raises(ValueError, match=(
            r"no.*keyword argument 'hiden'.*Valid suffixes: "
            r"\[':input\[hidden\]', ':input\[scale\]'\]")):
        kt.TapModel(model, "mix:input[hiden]")
    with pytest.raises(ValueError, match=(
            r"Valid suffixes: \[':input\[scale\]', ':input\[hidden\]'\]")):
        kt.TapModel(model, "mix:input[scales]")
    # `:input` on a keyword-only call suggests the keyword forms.
    with pytest.raises(ValueError, match=(
            r"keyword arguments only.*Name a keyword argument instead: "
            r"\[':input\[hidden\]', ':input\[scale\]'\]")):
        kt.TapModel(model, "mix:input")
    # A keyword argument that holds no tensor is not a point.
    passed = "True" if kind == "functional" else "None"
    with pytest.raises(ValueError, match=(
            rf"keyword argument 'flag' of 'mix' is not a tensor \(it was "
            rf"passed {passed}\)")):
        kt.TapModel(model, "mix:input[flag]")
    with pytest.raises(ValueError, match="'flag'.*not a tensor"):
        kt.edit(model, {"mix:input[flag]": kt.edits.Zero()}).__enter__()
    with pytest.raises(ValueError, match="no.*keyword argument 'x'"):
        kt.edit(model, {"mix:input[x]": kt.edits.Zero()}).__enter__()


def test_positional_and_keyword_arguments_together():
    keras.utils.set_random_seed(0)
    x = keras.Input((D,), name="x")
    hidden = keras.layers.Dense(D, name="dense")(x)
    mix = Mix(name="mix")
    model = keras.Model(x, mix(hidden, scale=x), name="mixed")
    data, _ = _data()
    _, taps = kt.TapModel(model, ["mix:input", "mix:input[scale]"])(data)
    assert_close(taps["mix:input"], dense_ref(model.get_layer("dense"), data),
                 rtol=1e-5, atol=1e-6)
    assert_close(taps["mix:input[scale]"], data)
    with pytest.raises(ValueError, match=(
            r"Valid suffixes: \[':input\[scale\]', ':input'\]")):
        kt.TapModel(model, "mix:input[scal]")
    # `list_layers` lists the call once, without input suffixes.
    assert [r.path for r in kt.list_layers(model)] == ["dense", "mix"]


# -- keras-hub's Llama: the attention is called with keywords only ----------


@pytest.fixture(scope="module")
def llama():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=50, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
    )


def _tokens():
    rng = np.random.default_rng(3)
    return {
        "token_ids": rng.integers(0, 50, size=(2, 5)).astype("int32"),
        "padding_mask": np.ones((2, 5), "int32"),
    }


def test_llama_attention_hidden_states(llama):
    inputs = _tokens()
    point = "transformer_layer_0/self_attention:input[hidden_states]"
    _, taps = kt.TapModel(llama, [point])(inputs)
    # The block's input is the token embedding; the attention's
    # `hidden_states` is its RMS-normalized form.
    table = to_numpy(llama.get_layer("token_embedding").embeddings)
    embedded = table[inputs["token_ids"]].astype(np.float64)
    (scale,) = [
        to_numpy(w) for w in llama.weights
        if w.path == "transformer_layer_0/self_attention_layernorm/scale"
    ]
    epsilon = llama.get_config().get("layer_norm_epsilon", 1e-6)
    variance = np.mean(embedded ** 2, axis=-1, keepdims=True)
    expected = embedded / np.sqrt(variance + epsilon) * scale
    assert_close(taps[point], expected, rtol=1e-4, atol=1e-5)
    # Zeroed, the attention (no biases) outputs zeros.
    attention = "transformer_layer_0/self_attention"
    with kt.edit(llama, {point: kt.edits.Zero()}):
        _, edited = kt.TapModel(llama, [attention])(inputs)
    assert_close(edited[attention], np.zeros((2, 5, 16)))


def test_llama_bad_key_names_the_keyword_arguments(llama):
    with pytest.raises(ValueError, match=(
            r"Valid suffixes: \[':input\[hidden_states\]', "
            r"':input\[attention_mask\]'\]")):
        kt.TapModel(
            llama, "transformer_layer_0/self_attention:input[hidden_state]"
        )
    with pytest.raises(ValueError, match=(
            r"keyword arguments only.*"
            r"\[':input\[hidden_states\]', ':input\[attention_mask\]'\]")):
        kt.TapModel(llama, "transformer_layer_0/self_attention:input")
    with pytest.raises(ValueError, match="'cache'.*not a tensor.*None"):
        kt.TapModel(llama, "transformer_layer_0/self_attention:input[cache]")


def test_llama_attention_mask_is_a_point(llama):
    point = "transformer_layer_0/self_attention:input[attention_mask]"
    _, taps = kt.TapModel(llama, [point])(_tokens())
    causal = np.tril(np.ones((5, 5)))
    assert_close(ops.cast(taps[point], "float32"),
                 np.broadcast_to(causal, (2, 5, 5)))
