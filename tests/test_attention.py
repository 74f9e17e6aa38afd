"""`keras_tap.taps.attention`: attention probabilities of fused layers."""

import contextlib
import doctest
import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest
from conftest import BACKEND, value_and_grad

from keras_tap.taps import attention
from keras_tap.taps.attention import (
    explicit_call,
    hooks_for,
    probabilities_shape,
    softmax_owner,
)
from keras_tap.taps.sublayers import find

to_numpy = keras.ops.convert_to_numpy


@contextlib.contextmanager
def replaced_call(layer, call):
    object.__setattr__(layer, "call", call)
    try:
        yield
    finally:
        object.__delattr__(layer, "call")


@contextlib.contextmanager
def recorded(layer):
    """Records the outputs of `layer`'s calls (its `call` wrapped)."""
    outputs, original = [], layer.call

    def call(*args, **kwargs):
        outputs.append(original(*args, **kwargs))
        return outputs[-1]

    with replaced_call(layer, call):
        yield outputs


def explicit(layer):
    """Runs `layer` through `explicit_call` (what the watch hook will do)."""
    original = layer.call
    return replaced_call(
        layer, lambda *args, **kw: explicit_call(layer, original, args, kw)
    )


def inputs(*shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype("float32")


def built_mha(query_length=5, value_length=5, **kwargs):
    keras.utils.set_random_seed(0)
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, **kwargs)
    mha(inputs(2, query_length, 8), inputs(2, value_length, 8))
    return mha


def numpy_attention(mha, query, value, mask=None):
    """Probabilities and output of `mha` from its weights, in NumPy."""

    def project(dense, x, equation="btd,dnh->btnh"):
        kernel, bias = to_numpy(dense.kernel), to_numpy(dense.bias)
        return np.einsum(equation, x, kernel) + bias

    q = project(mha.query_dense, query) / np.sqrt(4.0)
    k, v = project(mha.key_dense, value), project(mha.value_dense, value)
    logits = np.einsum("btnh,bsnh->bnts", q, k)
    if mask is not None:
        logits = np.where(mask[:, None], logits, -1e9)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    context = np.einsum("bnts,bsnh->btnh", probabilities, v)
    return probabilities, project(mha.output_dense, context, "btnh,nhd->btd")


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=atol, rtol=1e-5)


def test_docstring_examples():
    results = doctest.testmod(attention, extraglobs={"keras": keras, "np": np})
    assert results.attempted >= 15
    assert results.failed == 0


def test_softmax_owner():
    mha = built_mha()
    owner, softmax = softmax_owner(mha)
    assert owner is mha
    assert softmax is find(mha, "softmax")[1]
    unbuilt = keras.layers.MultiHeadAttention(2, 4)  # no softmax before build
    assert softmax_owner(unbuilt) is None
    assert softmax_owner(keras.layers.Dense(2)) is None
    assert softmax_owner(keras.layers.Softmax()) is None
    assert softmax_owner("mha") is None


def test_hooks_for_only_the_watched_softmaxes():
    x = keras.Input((5, 8))
    first = keras.layers.MultiHeadAttention(2, 4, name="first")
    second = keras.layers.MultiHeadAttention(2, 4, name="second")
    model = keras.Model(x, second(first(x, x), x))
    _, softmax = find(model, "second/softmax")
    dense = find(model, "first/query")[1]
    assert hooks_for(model, [softmax, dense]) == [(second, softmax)]
    assert hooks_for(model, [dense]) == []
    assert hooks_for(model, []) == []
    both = [find(model, f"{n}/softmax")[1] for n in ("first", "second")]
    assert [owner for owner, _ in hooks_for(model, both)] == [first, second]
    assert hooks_for(second, [softmax]) == [(second, softmax)]  # as root


def causal(length):
    return np.tril(np.ones((1, length, length), bool)).repeat(2, axis=0)


def padding(length):
    mask = np.ones((2, length, length), bool)
    mask[0, :, -2:] = False  # the first sample's last two keys are padding
    return mask


@pytest.mark.parametrize(
    "masks",
    [{}, {"attention_mask": padding(5)}, {"use_causal_mask": True}],
    ids=["no_mask", "attention_mask", "causal"],
)
def test_explicit_call_runs_the_softmax(masks):
    mha = built_mha()
    q, v = inputs(2, 5, 8), inputs(2, 5, 8, seed=1)
    with recorded(softmax_owner(mha)[1]) as probabilities:
        fused = mha(q, v, **masks)
    assert probabilities == []  # Keras 3.15 fuses: the softmax never runs
    _, scores = mha(q, v, return_attention_scores=True, **masks)
    with recorded(softmax_owner(mha)[1]) as probabilities, explicit(mha):
        output = mha(q, v, **masks)
    assert len(probabilities) == 1
    assert not isinstance(output, (tuple, list))
    close(probabilities[0], scores, atol=0)
    mask = masks.get("attention_mask")
    if masks.get("use_causal_mask"):
        mask = causal(5)
    reference, reference_output = numpy_attention(mha, q, v, mask)
    close(probabilities[0], reference)
    close(output, fused)
    close(output, reference_output)
    if mask is not None:  # masked keys get no probability
        assert np.all(to_numpy(probabilities[0])[
            np.broadcast_to(~mask[:, None], (2, 2, 5, 5))] < 1e-6)


def test_explicit_call_keeps_requested_scores_and_positional_arguments():
    mha = built_mha()
    q, v = inputs(2, 5, 8), inputs(2, 5, 8, seed=1)
    expected, expected_scores = mha(q, v, return_attention_scores=True)
    call = mha.call
    output, scores = explicit_call(
        mha, call, (q, v), {"return_attention_scores": True}
    )
    close(output, expected, atol=0)
    close(scores, expected_scores, atol=0)
    # `key` given positionally, masks given positionally as None.
    with recorded(softmax_owner(mha)[1]) as probabilities:
        output = explicit_call(mha, call, (q, v, v, None, None, None), {})
    assert len(probabilities) == 1
    close(output, mha(q, v))
    close(probabilities[0], expected_scores, atol=0)


def test_cross_attention_shape():
    mha = built_mha(query_length=5, value_length=7)
    q, v = inputs(2, 5, 8), inputs(2, 7, 8, seed=1)
    with recorded(softmax_owner(mha)[1]) as probabilities, explicit(mha):
        output = mha(q, v)
    assert tuple(probabilities[0].shape) == (2, 2, 5, 7)
    assert probabilities_shape(mha) == (2, 2, 5, 7)
    reference, reference_output = numpy_attention(mha, q, v)
    close(probabilities[0], reference)
    close(output, reference_output)


def _compiled(function):
    """`function` traced and compiled by the backend: `tf.function` or
    `jax.jit` (their arguments and results are tensors)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function)
    import jax

    return jax.jit(function)


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="PyTorch runs eagerly (no traced function to compile here); "
    "test_explicit_call_runs_the_softmax is its eager counterpart",
)
def test_explicit_call_inside_a_compiled_function():
    mha = built_mha()
    q, v = inputs(2, 5, 8), inputs(2, 5, 8, seed=1)
    softmax = softmax_owner(mha)[1]

    @_compiled
    def run(q, v):
        with recorded(softmax) as probabilities, explicit(mha):
            output = mha(q, v, use_causal_mask=True)
        return output, probabilities[0]

    output, probabilities = run(
        keras.ops.convert_to_tensor(q), keras.ops.convert_to_tensor(v)
    )
    reference, reference_output = numpy_attention(mha, q, v, causal(5))
    close(probabilities, reference)
    close(output, reference_output)
    close(output, mha(q, v, use_causal_mask=True))


def test_gradients_equal_the_fused_path():
    mha = built_mha()
    # The inputs are variables too: their gradients are compared as well.
    q = keras.Variable(inputs(2, 5, 8), name="q")
    v = keras.Variable(inputs(2, 5, 8, seed=1), name="v")
    weights = inputs(2, 5, 8, seed=2)
    softmax = softmax_owner(mha)[1]

    def gradients(use_explicit):
        def loss():
            with explicit(mha) if use_explicit else contextlib.nullcontext():
                output = mha(q.value, v.value, attention_mask=padding(5))
            return keras.ops.sum(keras.ops.multiply(output, weights))

        with recorded(softmax) as probabilities:
            _, grads = value_and_grad(loss, [q, v] + mha.trainable_weights)
        assert len(probabilities) == int(use_explicit)
        return grads

    fused, explicit_ = gradients(False), gradients(True)
    assert len(fused) == 2 + 8
    for a, b in zip(fused, explicit_):
        close(a, b)
    assert np.abs(to_numpy(fused[0])).sum() > 0


def test_mha_with_dropout_is_explicit_already():
    mha = built_mha(dropout=0.5)
    q, v = inputs(2, 5, 8), inputs(2, 5, 8, seed=1)
    with recorded(softmax_owner(mha)[1]) as probabilities:
        expected = mha(q, v)
    assert len(probabilities) == 1
    with explicit(mha):
        close(mha(q, v), expected, atol=0)


def test_probabilities_shape():
    assert probabilities_shape(built_mha()) == (2, 2, 5, 5)
    mha = keras.layers.MultiHeadAttention(num_heads=3, key_dim=4)
    assert probabilities_shape(mha, (None, 6, 8)) == (None, 3, 6, 6)
    assert probabilities_shape(mha, [4, 6, 8], [4, 9, 8]) == (4, 3, 6, 9)


@pytest.mark.parametrize("axes", [(1, 2), (2,), (-2,)])
def test_probabilities_shape_with_attention_axes(axes):
    # Keras's own scores shape is the reference.
    keras.utils.set_random_seed(0)
    mha = keras.layers.MultiHeadAttention(3, 2, attention_axes=axes)
    q, v = inputs(2, 4, 5, 6), inputs(2, 4, 7, 6, seed=1)
    _, scores = mha(q, v, return_attention_scores=True)
    assert probabilities_shape(mha) == tuple(scores.shape)
    with recorded(softmax_owner(mha)[1]) as probabilities, explicit(mha):
        mha(q, v)
    assert tuple(probabilities[0].shape) == tuple(scores.shape)


def test_errors():
    with pytest.raises(ValueError, match=r"MultiHeadAttention.*'dense_x'"):
        probabilities_shape(keras.layers.Dense(2, name="dense_x"))
    mha = keras.layers.MultiHeadAttention(2, 4, name="unbuilt_mha")
    with pytest.raises(ValueError, match=r"'unbuilt_mha'.*query_shape"):
        probabilities_shape(mha)
    dense = keras.layers.Dense(2, name="dense_y")
    with pytest.raises(ValueError, match=r"'dense_y' \(Dense\)"):
        explicit_call(dense, dense.call, (np.ones((1, 2)),), {})
    mha = keras.layers.MultiHeadAttention(2, 4, name="flash_mha",
                                          flash_attention=True)
    mha.build((None, 5, 8), (None, 5, 8))
    x = inputs(2, 5, 8)
    with pytest.raises(ValueError, match=r"'flash_mha'.*flash attention"):
        explicit_call(mha, mha.call, (x, x), {})


class WithoutScores(keras.layers.MultiHeadAttention):
    """An MHA subclass whose `call` has no `return_attention_scores`."""

    def call(self, query, value, key=None, **kwargs):
        return super().call(query, value, key)


def test_subclass_without_scores_argument():
    keras.utils.set_random_seed(0)
    mha = WithoutScores(num_heads=2, key_dim=4)
    q, v = inputs(2, 5, 8), inputs(2, 5, 8, seed=1)
    fused = mha(q, v)
    with recorded(softmax_owner(mha)[1]) as probabilities:
        mha(q, v)
    assert probabilities == []
    with recorded(softmax_owner(mha)[1]) as probabilities, explicit(mha):
        output = mha(q, v)
    reference, _ = numpy_attention(mha, q, v)
    close(probabilities[0], reference)
    close(output, fused)
    assert "_compute_attention" not in vars(mha)


def test_overrides_are_counted_across_threads():
    mha = WithoutScores(num_heads=2, key_dim=4)
    q, v = inputs(2, 5, 8), inputs(2, 5, 8, seed=1)
    expected = mha(q, v)
    barrier = threading.Barrier(4)

    def work(_):
        barrier.wait()
        return [explicit_call(mha, mha.call, (q, v), {}) for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        results = [y for ys in pool.map(work, range(4)) for y in ys]
    assert len(results) == 12
    close(np.stack(to_numpy(results)), np.stack([to_numpy(expected)] * 12))
    assert "_compute_attention" not in vars(mha)
    assert attention._OVERRIDES == {}


class SwitchedAttention(keras.layers.Layer):
    """Fuses unless `_use_fused_attention_op()` says no (as keras-hub's)."""

    def build(self, input_shape):
        self.softmax = keras.layers.Softmax()

    def _use_fused_attention_op(self):
        return True

    def call(self, x):
        q = keras.ops.expand_dims(x, 2)  # one head
        if self._use_fused_attention_op():
            return keras.ops.dot_product_attention(q, q, q)[:, :, 0]
        logits = keras.ops.einsum("bthd,bshd->bhts", q, q) / 2.0
        p = self.softmax(logits)
        return keras.ops.einsum("bhts,bshd->bthd", p, q)[:, :, 0]


def test_layer_with_a_fused_switch():
    layer = SwitchedAttention()
    x = inputs(2, 5, 4)
    fused = layer(x)
    owner, softmax = softmax_owner(layer)
    assert owner is layer
    with recorded(softmax) as probabilities, explicit(layer):
        output = layer(x)
    logits = np.einsum("btd,bsd->bts", x, x) / 2.0
    reference = np.exp(logits - logits.max(-1, keepdims=True))
    reference /= reference.sum(-1, keepdims=True)
    close(probabilities[0][:, 0], reference)
    close(output, fused)
    assert "_use_fused_attention_op" not in vars(layer)


@pytest.fixture(scope="module")
def keras_hub():
    return pytest.importorskip("keras_hub")


def tokens():
    padding_mask = np.ones((2, 6), bool)
    padding_mask[0, -2:] = False  # the first sample's last two tokens
    ids = np.random.default_rng(0).integers(1, 64, (2, 6))
    return {"token_ids": ids, "padding_mask": padding_mask}


def test_vit_attention_probabilities(keras_hub):
    keras.utils.set_random_seed(0)
    vit = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )
    images = inputs(2, 32, 32, 3)
    expected = vit(images)
    block = vit.get_layer("vit_encoder").encoder_layers[0]
    _, mha = find(block, "mha")
    _, softmax = find(block, "mha/softmax")
    assert hooks_for(vit, [softmax]) == [(mha, softmax)]
    with recorded(softmax) as probabilities:
        vit(images)
    assert probabilities == []  # ViT's attention dropout is 0: fused
    with recorded(softmax) as probabilities, recorded(
        block.layer_norm_1
    ) as normed, explicit(mha):
        output = vit(images)
    # (batch, heads, tokens, tokens): 16 patches and the class token
    assert tuple(probabilities[0].shape) == (2, 2, 17, 17)
    close(keras.ops.sum(probabilities[0], axis=-1), np.ones((2, 2, 17)))
    close(output, expected)
    # Reference: the block's own MHA asked for its scores on its input.
    _, scores = mha(normed[0], normed[0], return_attention_scores=True)
    close(probabilities[0], scores)
    assert probabilities_shape(mha, normed[0].shape) == (2, 2, 17, 17)


def test_gpt2_cached_multi_head_attention(keras_hub):
    keras.utils.set_random_seed(0)
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16, dropout=0.0,
    )
    data = tokens()
    expected = gpt2(data)
    _, mha = find(gpt2, "transformer_layer_0/self_attention")
    assert isinstance(mha, keras_hub.layers.CachedMultiHeadAttention)
    softmax = softmax_owner(mha)[1]
    with recorded(softmax) as probabilities:
        gpt2(data)
    assert probabilities == []  # dropout 0: fused
    with recorded(softmax) as probabilities, explicit(mha):
        output = gpt2(data)
    close(output, expected)
    p = to_numpy(probabilities[0])
    assert p.shape == (2, 2, 6, 6)
    close(p.sum(-1), np.ones((2, 2, 6)))
    assert np.all(np.triu(p, 1) < 1e-6)  # causal
    assert np.all(p[0, :, :, -2:] < 1e-6)  # padded keys
    # Generating (with a cache, in a compiled loop): the same tokens.
    causal_lm = keras_hub.models.GPT2CausalLM(gpt2, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    prompt = {"token_ids": np.pad(data["token_ids"][:, :3], [(0, 0), (0, 5)]),
              "padding_mask": np.tile(np.arange(8) < 3, (2, 1))}
    expected = causal_lm.generate(prompt, stop_token_ids=None)
    causal_lm.generate_function = None  # traced again, explicit this time
    with recorded(softmax) as probabilities, explicit(mha):
        generated = causal_lm.generate(prompt, stop_token_ids=None)
    # The prompt, then one traced step of the compiled loop; PyTorch
    # runs the loop eagerly: one call per generated token (8 - 3).
    assert len(probabilities) == (1 + 5 if BACKEND == "torch" else 2)
    np.testing.assert_array_equal(generated["token_ids"], expected["token_ids"])


def test_cached_attention_with_a_cache(keras_hub):
    # While generating, CachedMultiHeadAttention gets a cache and returns
    # (output, cache); with the scores, (output, scores, cache).
    keras.utils.set_random_seed(0)
    mha = keras_hub.layers.CachedMultiHeadAttention(num_heads=2, key_dim=4)
    step = inputs(2, 1, 8, seed=1)
    mha(step, step)
    cache = np.zeros((2, 2, 5, 2, 4), "float32")  # (b, k/v, key, heads, dim)
    arguments = {"cache": cache, "cache_update_index": 2}
    expected, expected_cache = mha(step, step, **arguments)
    _, scores, _ = mha(step, step, return_attention_scores=True, **arguments)
    with recorded(softmax_owner(mha)[1]) as probabilities, explicit(mha):
        output, new_cache = mha(step, step, **arguments)
    close(output, expected)
    close(new_cache, expected_cache, atol=0)
    close(probabilities[0], scores, atol=0)
    assert tuple(probabilities[0].shape) == (2, 2, 1, 5)
    assert probabilities_shape(mha, (2, 1, 8), (2, 5, 8)) == (2, 2, 1, 5)


def test_bert_without_dropout(keras_hub):
    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16, dropout=0.0,
    )
    data = dict(tokens(), segment_ids=np.zeros((2, 6), "int32"))
    expected = bert(data)
    path = "transformer_layer_1/self_attention_layer"
    _, mha = find(bert, path)
    _, softmax = find(bert, path + "/softmax")
    assert hooks_for(bert, [softmax]) == [(mha, softmax)]
    with recorded(softmax) as probabilities, explicit(mha):
        output = bert(data)
    for key in ("sequence_output", "pooled_output"):
        close(output[key], expected[key])
    p = to_numpy(probabilities[0])
    assert p.shape == (2, 2, 6, 6)
    close(p.sum(-1), np.ones((2, 2, 6)))
    assert np.all(p[0, :, :, -2:] < 1e-6)  # padded keys


def test_gemma_attention_calls_its_softmax(keras_hub):
    # Finding: CachedGemmaAttention fuses only on JAX/torch with a GPU or
    # TPU; on TensorFlow its softmax runs in every call, with grouped heads.
    keras.utils.set_random_seed(0)
    gemma = keras_hub.models.GemmaBackbone(
        vocabulary_size=64, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
        head_dim=8,
    )
    data = tokens()
    expected = gemma(data)
    _, layer = find(gemma, "decoder_block_0/attention")
    owner, softmax = softmax_owner(layer)
    assert owner is layer
    with recorded(softmax) as plain:
        gemma(data)
    # (batch, key_value_heads, query_heads // key_value_heads, query, key)
    assert tuple(plain[0].shape) == (2, 1, 2, 6, 6)
    with recorded(softmax) as probabilities, explicit(layer):
        output = gemma(data)
    close(output, expected)
    close(probabilities[0], plain[0], atol=0)
    p = to_numpy(probabilities[0])
    close(p.sum(-1), np.ones((2, 1, 2, 6)))
    assert np.all(p[0, ..., -2:] < 1e-6)  # padded keys
    assert "_use_fused_attention_op" not in vars(layer)
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        probabilities_shape(layer)
