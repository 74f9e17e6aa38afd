"""A TransformerLens-style user on tiny keras-hub decoders other than GPT-2
(Llama, Qwen, Gemma; grouped-query attention, rotary embeddings; random
weights, no download): listing, a cache of every block, points inside the
attention layer (projections, rotary outputs, probabilities), activation
patching, ablation with `Zero(where=)`, steering with `Add` and gradients,
each checked against NumPy, the blocks applied by hand or the backend's
own autodiff."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, assert_close, grad_at, to_numpy

import keras_tap as kt

VOCAB, T = 50, 6
ARCHS = {
    # name: (backbone, causal LM, block, attention, rotary, softmax)
    "llama": ("LlamaBackbone", "LlamaCausalLM", "transformer_layer",
              "self_attention", "llama_rotary_embedding",
              "attention_softmax"),
    "qwen": ("QwenBackbone", "QwenCausalLM", "transformer_layer",
             "self_attention", "rotary_embedding", "attention_softmax"),
    "gemma": ("GemmaBackbone", "GemmaCausalLM", "decoder_block", "attention",
              "rotary_embedding", "softmax"),
}
# keras-hub's Llama and Qwen attention fuse whenever the backend has a
# fused op (JAX, PyTorch, decided by a module function): their softmax
# runs on TensorFlow only. Gemma's decides per layer, and keras_tap
# switches it to the explicit path while its softmax is tapped.
FUSED_ELSEWHERE = {"llama", "qwen"}


class Arch:
    def __init__(self, name, keras_hub):
        backbone, lm, self.block, self.attention, self.rotary, \
            self.softmax = ARCHS[name]
        self.name = name
        keras.utils.set_random_seed(0)
        config = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2,
                      num_key_value_heads=1, hidden_dim=16,
                      intermediate_dim=32)
        if name == "gemma":
            config["head_dim"] = 8
        self.backbone = getattr(keras_hub.models, backbone)(**config)
        self.lm = getattr(keras_hub.models, lm)(backbone=self.backbone,
                                                preprocessor=None)

    def path(self, i, inner=""):
        return f"{self.block}_{i}" + (f"/{self.attention}/{inner}"
                                      if inner else "")

    def embed(self, x):
        hidden = self.backbone.token_embedding(x["token_ids"])
        if self.name == "gemma":
            hidden = hidden * np.sqrt(16.0).astype("float32")
        return hidden

    def block_by_hand(self, i, hidden, mask):
        block = self.backbone.transformer_layers[i]
        hidden = keras.ops.convert_to_tensor(to_numpy(hidden))
        if self.name == "gemma":
            return block(hidden, padding_mask=mask)
        return block(hidden, decoder_padding_mask=mask)

    def logits(self, hidden):
        """Final norm and the tied embedding, by the backbone's layers."""
        hidden = keras.ops.convert_to_tensor(to_numpy(hidden))
        return to_numpy(self.backbone.token_embedding(
            self.backbone.layer_norm(hidden), reverse=True))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    return Arch(request.param, pytest.importorskip("keras_hub"))


def _inputs(seed=0):
    ids = np.random.default_rng(seed).integers(1, VOCAB, size=(2, T))
    return {"token_ids": ids.astype("int32"),
            "padding_mask": np.ones((2, T), "int32")}


def _blocks_by_hand(arch, x):
    hidden, outputs = arch.embed(x), []
    for i in range(2):
        hidden = arch.block_by_hand(i, hidden, x["padding_mask"])
        outputs.append(to_numpy(hidden))
    return outputs


def _einsum_dense(layer, h):
    y = np.einsum(layer.equation, np.asarray(h, np.float64),
                  to_numpy(layer.kernel))
    return y if layer.bias is None else y + to_numpy(layer.bias)


def _rope(v, wavelength=10000.0):
    """Rotary embedding in NumPy: `(batch, seq, heads, dim)`, halves."""
    d = v.shape[-1]
    inverse = 1.0 / wavelength ** (np.arange(0, d, 2) / d)
    angles = np.arange(v.shape[1])[:, None] * inverse[None]
    cos = np.concatenate([np.cos(angles)] * 2, -1)[None, :, None]
    sin = np.concatenate([np.sin(angles)] * 2, -1)[None, :, None]
    first, second = v[..., : d // 2], v[..., d // 2:]
    return v * cos + np.concatenate([-second, first], -1) * sin


def test_listing_and_a_cache_of_every_block(arch):
    records = {r.path: r for r in kt.list_layers(arch.backbone)}
    for i in range(2):
        assert records[arch.path(i)].output_shape == (None, None, 16)
        for inner, shape in (("query", (None, None, 2, 8)),
                             ("key", (None, None, 1, 8)),
                             ("value", (None, None, 1, 8))):
            assert records[arch.path(i, inner)].output_shape == shape
    # The rotary embedding runs twice per block (query, then key).
    rotary = [r for path, r in records.items()
              if path.startswith(arch.path(1, arch.rotary))]
    assert [r.calls for r in rotary] == [2]
    tap_model = kt.TapModel(arch.backbone, rf"re:{arch.block}_\d+")
    assert sorted(tap_model.tap_names) == [arch.path(0), arch.path(1)]
    x = _inputs()
    predictions, cache = tap_model(x)
    assert_close(predictions, arch.backbone(x), atol=1e-6)
    for i, expected in enumerate(_blocks_by_hand(arch, x)):
        assert_close(cache[arch.path(i)], expected, atol=1e-5)
    assert_close(arch.logits(cache[arch.path(1)]), to_numpy(arch.lm(x)),
                 atol=1e-4)


def test_points_inside_attention(arch):
    norm = ("pre_attention_norm" if arch.name == "gemma"
            else "self_attention_layernorm")
    taps = {
        "norm": f"{arch.path(1)}/{norm}",
        "q": arch.path(1, "query"), "k": arch.path(1, "key"),
        "v": arch.path(1, "value"),
        "rq": arch.path(1, arch.rotary + "@0"),
        "rk": arch.path(1, arch.rotary + "@1"),
        "out": arch.path(1).rsplit("/", 1)[0] + f"/{arch.attention}:output",
    }
    x = _inputs()
    _, got = kt.TapModel(arch.backbone, taps)(x)
    attention = arch.backbone.transformer_layers[1]
    dense = {name: layer for name, layer in _sublayers(attention).items()
             if name in ("query", "key", "value")}
    for name in ("q", "k", "v"):
        layer = dense[{"q": "query", "k": "key", "v": "value"}[name]]
        assert_close(got[name], _einsum_dense(layer, to_numpy(got["norm"])),
                     atol=1e-5)
    assert_close(got["rq"], _rope(to_numpy(got["q"])), atol=1e-5)
    assert_close(got["rk"], _rope(to_numpy(got["k"])), atol=1e-5)
    # The attention probabilities, from the rotated query and key: causal,
    # scaled by 1/sqrt(head_dim), the one key head shared by both queries.
    q, k = to_numpy(got["rq"]), to_numpy(got["rk"])
    scores = np.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) / np.sqrt(8.0)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -1e9)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    softmax = arch.path(1, arch.softmax)
    if arch.name in FUSED_ELSEWHERE and BACKEND != "tensorflow":
        # Was "never called" with no reason, offering unrelated paths.
        with pytest.raises(ValueError, match=(
                r"never called when the model runs: .* computes attention "
                r"with a fused op on the (jax|torch) backend")):
            kt.TapModel(arch.backbone, softmax)
        return
    _, probabilities = kt.TapModel(arch.backbone, [softmax])(x)
    probabilities = to_numpy(probabilities[softmax])
    if arch.name == "gemma":  # (batch, key heads, queries per key, q, k)
        assert probabilities.shape == (2, 1, 2, T, T)
        probabilities = probabilities[:, 0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def _sublayers(layer):
    found = {}
    for sub in layer._flatten_layers(include_self=False):
        found.setdefault(sub.name, sub)
    return found


def test_activation_patching_against_the_clean_run(arch):
    clean, lm = _inputs(), arch.lm
    corrupted = {**clean, "token_ids": clean["token_ids"].copy()}
    corrupted["token_ids"][:, 2] = (corrupted["token_ids"][:, 2] + 25) % VOCAB
    tap_model = kt.TapModel(arch.backbone, rf"re:{arch.block}_\d+")
    _, clean_cache = tap_model(clean)
    _, corrupt_cache = tap_model(corrupted)
    # The whole residual stream patched at the last block: clean logits.
    with kt.edit(lm, {arch.path(1): kt.edits.Replace(
            clean_cache[arch.path(1)])}):
        patched = to_numpy(lm(corrupted))
    np.testing.assert_allclose(patched, to_numpy(lm(clean)), atol=1e-4)
    # The first block patched at the corrupted position only.
    where = np.zeros((1, T, 1), bool)
    where[:, 2] = True
    first = clean_cache[arch.path(0)]
    with kt.edit(lm, {arch.path(0): kt.edits.Replace(first, where=where)}):
        patched = to_numpy(lm(corrupted))
    spliced = np.where(where, to_numpy(first),
                       to_numpy(corrupt_cache[arch.path(0)]))
    hidden = arch.block_by_hand(1, spliced, clean["padding_mask"])
    np.testing.assert_allclose(patched, arch.logits(hidden), atol=1e-4)
    assert not np.allclose(patched, to_numpy(lm(corrupted)), atol=1e-3)


def test_zero_where_positions_changes_only_later_positions(arch):
    x, lm = _inputs(), arch.lm
    before = to_numpy(lm(x))
    where = np.arange(T)[None, :, None] >= 3  # positions 3, 4, 5
    with kt.edit(lm, {arch.path(0): kt.edits.Zero(where=where)}):
        ablated = to_numpy(lm(x))
    np.testing.assert_array_equal(ablated[:, :3], before[:, :3])
    assert not np.allclose(ablated[:, 3:], before[:, 3:], atol=1e-3)
    first = np.where(where, 0.0, _blocks_by_hand(arch, x)[0])
    hidden = arch.block_by_hand(1, first.astype("float32"),
                                x["padding_mask"])
    np.testing.assert_allclose(ablated, arch.logits(hidden), atol=1e-4)
    np.testing.assert_array_equal(to_numpy(lm(x)), before)


def test_steering_with_add(arch):
    x, lm = _inputs(), arch.lm
    vector = np.random.default_rng(1).normal(size=16).astype("float32")
    with kt.edit(lm, {arch.path(0): kt.edits.Add(vector, scale=3.0)}):
        steered = to_numpy(lm(x))
    first = _blocks_by_hand(arch, x)[0] + 3.0 * vector
    hidden = arch.block_by_hand(1, first, x["padding_mask"])
    np.testing.assert_allclose(steered, arch.logits(hidden), atol=1e-4)


def test_gradients_at_a_block(arch):
    x = _inputs()
    # Inside the causal LM, the backbone's name leads the path.
    tap_model = kt.TapModel(arch.lm, {
        "b0": f"{arch.backbone.name}/{arch.path(0)}"})

    def target(logits):
        return logits[:, -1, 7]

    predictions, taps, grads = tap_model.gradients(x, target=target)
    block = arch.backbone.transformer_layers[1]
    mask = x["padding_mask"]

    def score(hidden):
        hidden = (block(hidden, padding_mask=mask) if arch.name == "gemma"
                  else block(hidden, decoder_padding_mask=mask))
        logits = arch.backbone.token_embedding(
            arch.backbone.layer_norm(hidden), reverse=True)
        return keras.ops.sum(target(logits))

    value, expected = grad_at(score, taps["b0"])
    np.testing.assert_allclose(value, to_numpy(target(predictions)).sum(),
                               rtol=1e-5, atol=1e-5)
    assert_close(grads["b0"], expected, atol=1e-5)
    assert np.abs(expected).max() > 0


def test_keyword_only_attention_call_has_no_input_suffix():
    # Llama's decoder calls its attention with keywords only: the error
    # said "no input 0. Valid suffixes: [':input']", offering what failed.
    arch = Arch("llama", pytest.importorskip("keras_hub"))
    with pytest.raises(ValueError, match=(
            r"called with keyword arguments only \(no positional input\)"
    )):
        kt.TapModel(arch.backbone, arch.path(1) + "/self_attention:input")
    _, got = kt.TapModel(arch.backbone, arch.path(1) + "/self_attention"
                         ":output")(_inputs())
    assert tuple(got.values())[0].shape == (2, T, 16)
