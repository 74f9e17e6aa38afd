"""A TransformerLens-style user on a tiny keras-hub GPT-2 (random weights,
no download): a cache of every block and attention pattern with a padding
mask, the logit lens, activation patching, steering and ablation during
`generate`, and gradients at blocks and attention probabilities, each
checked against NumPy or the backend's own autodiff."""

import re

import keras
import numpy as np
import pytest
from conftest import assert_close, grad_at, to_numpy

import keras_tap as kt

BLOCKS = r"re:transformer_layer_\d+"
ATTENTION = r"re:transformer_layer_\d+/self_attention/softmax(_\d+)?"


def _backbone(keras_hub, layers=2):
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=layers, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=32, dropout=0.0,
    )


@pytest.fixture(scope="module")
def lm():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    lm = keras_hub.models.GPT2CausalLM(
        backbone=_backbone(keras_hub), preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def _inputs(padded=True):
    ids = np.random.default_rng(0).integers(1, 64, size=(3, 8))
    mask = np.ones((3, 8), "int32")
    if padded:
        mask[1, 6:] = 0
        mask[2, 5:] = 0
    return {"token_ids": ids.astype("int32"), "padding_mask": mask}


def _layer_norm(layer, v):
    v = np.asarray(v, np.float64)
    mean, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return ((v - mean) / np.sqrt(var + layer.epsilon) * to_numpy(layer.gamma)
            + to_numpy(layer.beta))


def _unembed(backbone, hidden):
    """Final layer norm and the tied embedding, in NumPy."""
    table = to_numpy(backbone.token_embedding.embeddings)
    return _layer_norm(backbone.get_layer("layer_norm"), hidden) @ table.T


def _blocks_by_hand(backbone, x):
    """Each block's output, the blocks applied one after another."""
    tokens = backbone.token_embedding(x["token_ids"])
    hidden = backbone.get_layer("embeddings_add")(
        (tokens, backbone.position_embedding(tokens)))
    outputs = []
    for block in backbone.transformer_layers:
        hidden = block(hidden, decoder_padding_mask=x["padding_mask"])
        outputs.append(to_numpy(hidden))
    return outputs


def _attention_by_hand(block, hidden, mask):
    """Causal, padding-masked attention probabilities in NumPy."""
    attention = block._self_attention_layer
    h = _layer_norm(block._self_attention_layer_norm, hidden)
    q = np.einsum("bsd,dhk->bshk", h, to_numpy(attention._query_dense.kernel))
    q = q + to_numpy(attention._query_dense.bias)
    k = np.einsum("bsd,dhk->bshk", h, to_numpy(attention._key_dense.kernel))
    k = k + to_numpy(attention._key_dense.bias)
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    n = hidden.shape[1]
    allowed = np.tril(np.ones((n, n), bool))[None] & mask[:, None].astype(
        bool)
    scores = np.where(allowed[:, None], scores, -1e9)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_cache_of_blocks_and_attention_with_padding(lm):
    backbone, x = lm.backbone, _inputs()
    tap_model = kt.TapModel(backbone, {"block": BLOCKS, "attn": ATTENTION})
    # Pattern taps are named by their real paths (the second block's
    # softmax is `softmax_1`, or `softmax_7` after other models).
    names = sorted(tap_model.tap_names)
    assert names[2:] == [
        "block/transformer_layer_0", "block/transformer_layer_1"
    ]
    attention = names[:2]
    for i, name in enumerate(attention):
        assert re.fullmatch(
            rf"attn/transformer_layer_{i}/self_attention/softmax(_\d+)?", name
        ), name
    predictions, cache = tap_model(x)
    assert_close(predictions, backbone(x), atol=1e-6)
    blocks = _blocks_by_hand(backbone, x)
    for i, expected in enumerate(blocks):
        assert_close(cache[f"block/transformer_layer_{i}"], expected,
                     atol=1e-5)
    valid = x["padding_mask"].astype(bool)
    for i, block in enumerate(backbone.transformer_layers):
        hidden = blocks[i - 1] if i else _embedded(backbone, x)
        expected = _attention_by_hand(block, hidden, x["padding_mask"])
        got = to_numpy(cache[attention[i]])
        assert got.shape == (3, 2, 8, 8)
        for b in range(3):  # The rows of padded queries are not compared.
            np.testing.assert_allclose(got[b][:, valid[b]],
                                       expected[b][:, valid[b]], atol=1e-5)
    # FeatureModel and extract (batch by batch) give the same cache.
    features = kt.FeatureModel(backbone, {"attn": ATTENTION, "b1":
                                          "transformer_layer_1"})
    got = features(x)
    assert_close(got["b1"], blocks[1], atol=1e-5)
    extracted = tap_model.extract(x, batch_size=2, verbose=0)
    assert sorted(extracted) == sorted(tap_model.tap_names)
    for name in tap_model.tap_names:
        assert_close(extracted[name], cache[name], atol=1e-6)
    assert_close(got[attention[1]], cache[attention[1]], atol=1e-6)


def _embedded(backbone, x):
    tokens = backbone.token_embedding(x["token_ids"])
    return to_numpy(backbone.get_layer("embeddings_add")(
        (tokens, backbone.position_embedding(tokens))))


def test_logit_lens_at_the_last_block_equals_the_logits(lm):
    x = _inputs()
    _, cache = kt.TapModel(lm.backbone, BLOCKS)(x)
    logits = to_numpy(lm(x))
    lens = _unembed(lm.backbone, to_numpy(cache["transformer_layer_1"]))
    np.testing.assert_allclose(lens, logits, atol=1e-4)
    assert _unembed(lm.backbone, to_numpy(
        cache["transformer_layer_0"])).shape == logits.shape


def test_activation_patching_against_the_clean_run(lm):
    backbone = lm.backbone
    clean = _inputs(padded=False)
    corrupted = {**clean, "token_ids": clean["token_ids"].copy()}
    corrupted["token_ids"][:, 2] = (corrupted["token_ids"][:, 2] + 32) % 64
    tap_model = kt.TapModel(backbone, BLOCKS)
    _, clean_cache = tap_model(clean)
    _, corrupt_cache = tap_model(corrupted)
    last = clean_cache["transformer_layer_1"]
    # The last block patched everywhere: the clean block output's logits.
    with kt.edit(lm, {"transformer_layer_1": kt.edits.Replace(last)}):
        patched = to_numpy(lm(corrupted))
    np.testing.assert_allclose(patched, _unembed(backbone, to_numpy(last)),
                               atol=1e-4)
    # The first block patched at the corrupted position only: spliced by
    # hand, then the last block and the unembedding.
    where = np.zeros((3, 8, 1), bool)
    where[:, 2] = True
    first = clean_cache["transformer_layer_0"]
    with kt.edit(lm, {"transformer_layer_0": kt.edits.Replace(
            first, where=where)}):
        patched = to_numpy(lm(corrupted))
    spliced = np.where(where, to_numpy(first),
                       to_numpy(corrupt_cache["transformer_layer_0"]))
    hidden = backbone.transformer_layers[1](
        keras.ops.convert_to_tensor(spliced),
        decoder_padding_mask=clean["padding_mask"])
    np.testing.assert_allclose(patched, _unembed(backbone, to_numpy(hidden)),
                               atol=1e-4)
    assert not np.allclose(patched, to_numpy(lm(corrupted)), atol=1e-3)


def _generate_inputs():
    ids = np.zeros((2, 10), "int32")
    ids[:, :4] = [[3, 9, 4, 1], [7, 2, 8, 5]]
    mask = np.zeros((2, 10), bool)
    mask[:, :4] = True
    return {"token_ids": ids, "padding_mask": mask}


def _greedy_by_hand(backbone, inputs, steer):
    """Greedy decoding with full forward passes, `steer` added to the
    first block's output, in plain Keras and NumPy."""
    tokens = inputs["token_ids"].copy()
    for t in range(4, tokens.shape[1]):
        x = {"token_ids": tokens[:, :t], "padding_mask": np.ones((2, t))}
        hidden = keras.ops.convert_to_tensor(_embedded(backbone, x))
        hidden = backbone.transformer_layers[0](
            hidden, decoder_padding_mask=x["padding_mask"])
        hidden = keras.ops.add(hidden, keras.ops.convert_to_tensor(steer))
        hidden = backbone.transformer_layers[1](
            hidden, decoder_padding_mask=x["padding_mask"])
        tokens[:, t] = _unembed(backbone, to_numpy(hidden))[:, -1].argmax(-1)
    return tokens


@pytest.mark.parametrize("jit_compile", [False, True])
def test_steering_and_ablation_in_generate_then_bit_for_bit(lm, jit_compile):
    lm.compile(sampler="greedy", jit_compile=jit_compile)
    try:
        inputs, x = _generate_inputs(), _inputs()
        before = lm.generate(inputs, stop_token_ids=None)["token_ids"]
        logits_before = to_numpy(lm(x))
        vector = np.random.default_rng(1).normal(size=32).astype("float32")
        with kt.edit(lm, {"transformer_layer_0": kt.edits.Add(
                vector, scale=8.0)}):
            steered = lm.generate(inputs, stop_token_ids=None)["token_ids"]
        np.testing.assert_array_equal(
            steered, _greedy_by_hand(lm.backbone, inputs, 8.0 * vector))
        assert not np.array_equal(steered, before)
        # Attention of the last block zeroed: only the output projection's
        # bias is added to the residual stream there.
        with kt.edit(lm, {"transformer_layer_1/self_attention/softmax":
                          kt.edits.Zero()}):
            ablated = to_numpy(lm(x))
            lm.generate(inputs, stop_token_ids=None)
        block = lm.backbone.transformer_layers[1]
        hidden = _blocks_by_hand(lm.backbone, x)[0] + to_numpy(
            block._self_attention_layer._output_dense.bias)
        normed = keras.ops.convert_to_tensor(
            _layer_norm(block._feedforward_layer_norm, hidden), "float32")
        hidden = hidden + to_numpy(block._feedforward_output_dense(
            block._feedforward_intermediate_dense(normed)))
        np.testing.assert_allclose(ablated, _unembed(lm.backbone, hidden),
                                   atol=1e-4)
        # Closed: exactly what it computed before, bit for bit.
        after = lm.generate(inputs, stop_token_ids=None)["token_ids"]
        np.testing.assert_array_equal(after, before)
        np.testing.assert_array_equal(to_numpy(lm(x)), logits_before)
    finally:
        lm.compile(sampler="greedy")


def test_gradients_at_a_block_and_attention_probabilities(lm):
    backbone = lm.backbone
    tap_model = kt.TapModel(lm, {
        "b0": "gpt2_backbone/transformer_layer_0",
        "a1": "gpt2_backbone/transformer_layer_1/self_attention/softmax",
    })
    x = _inputs(padded=False)

    def target(logits):
        return logits[:, -1, 5]

    predictions, taps, grads = tap_model.gradients(x, target=target)
    block = backbone.transformer_layers[1]
    attention = block._self_attention_layer
    table = backbone.token_embedding.embeddings
    final = backbone.get_layer("layer_norm")

    def score(hidden):
        logits = keras.ops.matmul(final(hidden), keras.ops.transpose(table))
        return keras.ops.sum(target(logits))

    value, expected = grad_at(lambda h: score(
        block(h, decoder_padding_mask=x["padding_mask"])), taps["b0"])
    np.testing.assert_allclose(value, to_numpy(target(predictions)).sum(),
                               rtol=1e-5, atol=1e-5)
    assert_close(grads["b0"], expected, atol=1e-5)
    first = keras.ops.convert_to_tensor(to_numpy(taps["b0"]))

    def through_probabilities(p):
        values = attention._value_dense(block._self_attention_layer_norm(
            first))
        context = keras.ops.einsum("bhqk,bkhd->bqhd", p, values)
        hidden = first + attention._output_dense(context)
        return score(hidden + block._feedforward_output_dense(
            block._feedforward_intermediate_dense(
                block._feedforward_layer_norm(hidden))))

    value, expected = grad_at(through_probabilities, taps["a1"])
    np.testing.assert_allclose(value, to_numpy(target(predictions)).sum(),
                               rtol=1e-5, atol=1e-4)
    assert_close(grads["a1"], expected, atol=1e-5)


def test_an_edit_of_the_wrong_shape_names_the_point_on_every_backend(lm):
    # Was the backend's own error from inside the block's call (JAX's
    # ValueError, PyTorch's RuntimeError, TensorFlow's InvalidArgumentError).
    x = _inputs()
    before = to_numpy(lm(x))
    wrong = {
        "vector": kt.edits.Add(np.ones(31, "float32")),
        "factor": kt.edits.Scale(np.ones((2, 32), "float32")),
        "where mask": kt.edits.Replace(0.0, where=np.ones((1, 7, 1), bool)),
    }
    for what, edit in wrong.items():
        with pytest.raises(ValueError, match=(
                rf"kt.edit at 'transformer_layer_1': the edit .*its {what} "
                r"has shape .*not broadcast to the activation's shape "
                r"\(3, 8, 32\)")):
            with kt.edit(lm, {"transformer_layer_1": edit}):
                lm(x)
    np.testing.assert_array_equal(to_numpy(lm(x)), before)
