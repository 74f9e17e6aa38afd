"""`keras_tap.taps.sublayers`: the layers a layer holds, and their paths."""

import doctest
import re

import keras
import numpy as np
import pytest

from keras_tap.taps import sublayers
from keras_tap.taps.sublayers import find, held_sublayers, match_segment, walk


class Holder(keras.layers.Layer):
    """Holds Dense layers in an attribute, a list, a dict and deeper."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.count = 3
        self.label = "not a layer"
        self.numbers = [1, 2.0, "three"]
        self.proj = keras.layers.Dense(4, name="proj")
        self.stack = [
            keras.layers.Dense(3, name="stack_a"),
            keras.layers.Dense(3, name="stack_b"),
        ]
        self.heads = {
            "cls": keras.layers.Dense(2, name="cls"),
            "box": keras.layers.Dense(4, name="box"),
        }
        self.nested = {
            "pair": (
                keras.layers.Dense(1, name="deep_a"),
                [keras.layers.Dense(1, name="deep_b")],
            )
        }
        self.alias = self.proj  # the same object, held a second time
        self.aliases = [self.stack[1], self.heads["cls"]]

    def call(self, x):
        hidden = self.proj(x)
        for dense in self.stack:
            hidden = dense(hidden)
        outputs = [head(hidden) for head in self.heads.values()]
        first, rest = self.nested["pair"]
        return outputs + [first(hidden), rest[0](hidden)]


class Block(keras.layers.Layer):
    """A block holding a `Holder` and a Dense (two levels of sublayers)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = Holder(name="inner")
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x):
        return self.out(self.inner(x)[0])


class Cycle(keras.layers.Layer):
    """A child holding its parent: `walk` must stop.

    Keras's own tracking recurses forever on such a cycle, so the
    references are set past it, as code that keeps plain references does.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.child = Holder(name="child")
        object.__setattr__(self, "loop", {"child": self.child, "me": self})
        object.__setattr__(self.child, "parent", [self])

    def call(self, x):
        return self.child(x)


def built(layer, shape=(2, 5)):
    layer(np.zeros(shape, "float32"))
    return layer


def segments(pairs):
    return [segment for segment, _ in pairs]


def test_custom_layer_attributes_lists_dicts_in_definition_order():
    holder = built(Holder(name="holder"))
    found = held_sublayers(holder)
    assert segments(found) == [
        "proj", "stack_a", "stack_b", "cls", "box", "deep_a", "deep_b",
    ]
    expected = [
        holder.proj, *holder.stack, holder.heads["cls"], holder.heads["box"],
        holder.nested["pair"][0], holder.nested["pair"][1][0],
    ]
    assert [layer for _, layer in found] == expected
    # Held twice (alias, aliases) but listed once; never the layer itself.
    assert len({id(layer) for _, layer in found}) == len(found)
    assert all(layer is not holder for _, layer in found)


def test_plain_leaf_layer_holds_nothing():
    assert held_sublayers(built(keras.layers.Dense(3))) == []


def test_held_sublayers_refuses_non_layers():
    with pytest.raises(TypeError, match=r"keras\.layers\.Layer.*list"):
        held_sublayers([keras.layers.Dense(1)])


def test_sibling_names_are_made_unique_with_a_suffix():
    class Twins(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(1, name="fc")
            self.b = keras.layers.Dense(1, name="fc_1")
            self.c = keras.layers.Dense(1, name="fc")
            self.d = keras.layers.Dense(1, name="fc")

        def call(self, x):
            return self.a(x) + self.b(x) + self.c(x) + self.d(x)

    twins = built(Twins())
    assert segments(held_sublayers(twins)) == ["fc", "fc_1", "fc_2", "fc_3"]
    assert find(twins, "fc") == ("fc", twins.a)
    assert find(twins, "fc_1") == ("fc_1", twins.b)
    assert find(twins, "fc_2") == ("fc_2", twins.c)
    assert find(twins, "fc_3") == ("fc_3", twins.d)


def test_graph_models_list_their_layers_in_graph_order():
    inner = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, name="fc")], name="tower"
    )
    inputs = keras.Input((5,), name="x")
    hidden = inner(inputs)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    # No input layer, no Keras-internal Functional of the Sequential.
    assert held_sublayers(model) == [("tower", inner),
                                     ("head", model.get_layer("head"))]
    assert segments(held_sublayers(inner)) == ["fc"]
    assert [path for path, _ in walk(model)] == ["tower", "tower/fc", "head"]


def test_nested_graph_models_match_their_layers_lists():
    """On graph models, `walk` is `Model.layers`, nested models expanded."""
    shared = keras.layers.Dense(3, name="shared")

    def tower(name):
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(5, name="fc")(inputs)
        return keras.Model(inputs, shared(hidden), name=name)

    inputs = keras.Input((5,))
    left, right = tower("left"), tower("right")
    outputs = keras.layers.Add(name="add")([left(inputs), right(inputs)])
    model = keras.Model(inputs, outputs)

    def reference(graph_model, prefix=""):
        for layer in graph_model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            yield prefix + layer.name, layer
            if isinstance(layer, keras.Model):
                yield from reference(layer, prefix + layer.name + "/")

    expected = list(reference(model))
    # The layer both towers share is listed once, in the first tower.
    assert [path for path, _ in expected].count("right/shared") == 1
    expected.remove(("right/shared", shared))
    assert walk(model) == expected
    assert [path for path, _ in walk(model)] == [
        "left", "left/fc", "left/shared", "right", "right/fc", "add",
    ]


def test_keras_wrappers_and_cells():
    bidirectional = keras.layers.Bidirectional(
        keras.layers.LSTM(3, name="lstm"), name="bi"
    )
    bidirectional(np.zeros((2, 4, 5), "float32"))
    forward = bidirectional.forward_layer
    backward = bidirectional.backward_layer
    assert walk(bidirectional) == [
        (forward.name, forward),
        (f"{forward.name}/{forward.cell.name}", forward.cell),
        (backward.name, backward),
        (f"{backward.name}/{backward.cell.name}", backward.cell),
    ]
    distributed = keras.layers.TimeDistributed(keras.layers.Dense(2))
    distributed(np.zeros((2, 4, 5), "float32"))
    assert held_sublayers(distributed) == [
        (distributed.layer.name, distributed.layer)
    ]


def test_subclassed_model_and_nested_layers_walk_depth_first():
    block = built(Block(name="block"))
    found = walk(block)
    assert [path for path, _ in found] == [
        "inner",
        "inner/proj", "inner/stack_a", "inner/stack_b", "inner/cls",
        "inner/box", "inner/deep_a", "inner/deep_b",
        "out",
    ]
    assert dict(found)["inner/box"] is block.inner.heads["box"]
    assert walk(block, depth=1) == held_sublayers(block)
    assert walk(block, depth=2) == found


def test_walk_stops_on_cycles():
    cycle = built(Cycle(name="cycle"))
    found = walk(cycle)
    assert [path for path, _ in found][:3] == [
        "child", "child/proj", "child/stack_a",
    ]
    assert len(found) == 8
    assert held_sublayers(cycle) == [("child", cycle.child)]
    assert held_sublayers(cycle.child)[-1] == ("cycle", cycle)


@pytest.mark.parametrize("depth", [0, -1, 1.5, True, "1"])
def test_walk_invalid_depth(depth):
    with pytest.raises(ValueError, match=r"`depth` must be None or a positive"):
        walk(keras.layers.Dense(1), depth=depth)


# -- the `_N` suffix rule ------------------------------------------------------


@pytest.mark.parametrize(
    "children, written, expected",
    [
        (["query", "softmax_7"], "softmax", "softmax_7"),
        (["query", "softmax_7"], "softmax_7", "softmax_7"),
        (["softmax", "softmax_3"], "softmax", "softmax"),
        (["softmax", "softmax_3"], "softmax_3", "softmax_3"),
        (["dense_1", "dense_2"], "dense_2", "dense_2"),
        (["block_1_conv"], "block_1_conv", "block_1_conv"),
        (["rotary_embedding_12"], "rotary_embedding", "rotary_embedding_12"),
    ],
)
def test_match_segment(children, written, expected):
    pairs = [(name, object()) for name in children]
    segment, value = match_segment(pairs, written)
    assert segment == expected
    assert value is dict(pairs)[expected]


@pytest.mark.parametrize(
    "children, written, match",
    [
        (
            ["dense_1", "dense_2", "dropout"],
            "dense",
            r"'dense' is ambiguous in 'mlp'.*\['dense_1', 'dense_2'\]",
        ),
        (
            ["query", "softmax_7"],
            "sofmax",
            r"'mlp' has no sublayer 'sofmax'\. Closest: \['softmax_7'\]\. "
            r"Its sublayers are: \['query', 'softmax_7'\]",
        ),
        (
            ["query", "softmax_7"],
            "softmax_2",
            r"here it is 'softmax_7'; write 'softmax' to name it in any "
            r"process",
        ),
        (["query"], "zzz", r"no sublayer 'zzz'\. Its sublayers are: "),
        ([], "query", r"'mlp' holds no sublayers"),
        (["block_1_conv"], "block", r"no sublayer 'block'"),
    ],
)
def test_match_segment_errors(children, written, match):
    pairs = [(name, object()) for name in children]
    with pytest.raises(ValueError, match=match):
        match_segment(pairs, written, parent="mlp")


@pytest.fixture(scope="module")
def two_attentions():
    """Two MultiHeadAttention layers built in one process."""
    keras.layers.Softmax()  # so that both softmaxes below get a `_N`
    query = np.random.default_rng(0).normal(size=(2, 5, 8))
    value = np.random.default_rng(1).normal(size=(2, 7, 8))
    layers = []
    for _ in range(2):
        mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        mha(query.astype("float32"), value.astype("float32"))
        layers.append(mha)
    return layers, query.astype("float32"), value.astype("float32")


def test_multi_head_attention_sublayers(two_attentions):
    (mha, _), _, _ = two_attentions
    found = held_sublayers(mha)
    names = segments(found)
    assert names[:3] == ["query", "key", "value"]
    assert re.fullmatch(r"softmax_\d+", names[3]), names
    assert re.fullmatch(r"dropout(_\d+)?", names[4]), names
    assert names[5] == "attention_output"
    # Reference: the attributes MultiHeadAttention keeps them in.
    assert [layer for _, layer in found] == [
        mha._query_dense, mha._key_dense, mha._value_dense, mha._softmax,
        mha._dropout_layer, mha._output_dense,
    ]
    assert [type(layer).__name__ for _, layer in found] == [
        "EinsumDense", "EinsumDense", "EinsumDense", "Softmax", "Dropout",
        "EinsumDense",
    ]


def test_found_softmax_gives_the_attention_scores(two_attentions, monkeypatch):
    """The softmax found is the one computing the attention probabilities."""
    (mha, _), query, value = two_attentions
    _, softmax = find(mha, "softmax")
    seen = []
    original = softmax.call

    def record(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(softmax, "call", record)
    _, scores = mha(query, value, return_attention_scores=True)
    assert len(seen) == 1
    assert tuple(seen[0].shape) == (2, 2, 5, 7)  # (batch, heads, q, k)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(seen[0]), keras.ops.convert_to_numpy(scores)
    )


def test_suffix_free_segment_resolves_in_each_layer(two_attentions):
    (first, second), _, _ = two_attentions
    first_name = first._softmax.name
    second_name = second._softmax.name
    assert first_name != second_name  # Keras numbered them per process
    assert re.fullmatch(r"softmax_\d+", second_name)
    assert find(first, "softmax") == (first_name, first._softmax)
    assert find(second, "softmax") == (second_name, second._softmax)
    assert find(second, second_name) == (second_name, second._softmax)
    with pytest.raises(ValueError, match=f"here it is '{second_name}'"):
        find(second, first_name)


def test_ambiguous_bare_segment_names_its_candidates():
    class TwoSoftmax(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="two")
            keras.layers.Softmax()  # neither below is plain `softmax`
            self.a = keras.layers.Softmax()
            self.b = keras.layers.Softmax()

        def call(self, x):
            return self.a(x) + self.b(x)

    layer = built(TwoSoftmax())
    a, b = layer.a.name, layer.b.name
    with pytest.raises(
        ValueError,
        match=rf"'softmax' is ambiguous in 'two' \(TwoSoftmax\).*"
        rf"\['{a}', '{b}'\]",
    ):
        find(layer, "softmax")
    assert find(layer, b) == (b, layer.b)


def test_find_errors_name_the_parent_and_its_sublayers(two_attentions):
    (mha, _), _, _ = two_attentions
    softmax = mha._softmax.name
    with pytest.raises(
        ValueError,
        match=rf"'{mha.name}' \(MultiHeadAttention\) has no sublayer "
        rf"'sofmax'\. Closest: \['{softmax}'\]\. Its sublayers are: "
        rf"\['query', 'key', 'value', '{softmax}'",
    ):
        find(mha, "sofmax")
    with pytest.raises(
        ValueError, match=r"'query' \(EinsumDense\) holds no sublayers"
    ):
        find(mha, "query/kernel")
    with pytest.raises(ValueError, match="is not built.*build"):
        find(keras.layers.MultiHeadAttention(2, 4, name="fresh"), "softmax")
    for bad in ["", None]:
        with pytest.raises(ValueError, match="non-empty string"):
            find(mha, bad)


def test_docstring_examples():
    results = doctest.testmod(
        sublayers, extraglobs={"np": np}, verbose=False
    )
    assert results.attempted > 0
    assert results.failed == 0


# -- keras-hub backbones from small configs (no download) ----------------------

@pytest.fixture(scope="module")
def keras_hub():
    return pytest.importorskip("keras_hub")


@pytest.fixture(scope="module")
def vit(keras_hub):
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )


@pytest.fixture(scope="module")
def gemma(keras_hub):
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=64, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
        head_dim=8,
    )


@pytest.fixture(scope="module")
def bert(keras_hub):
    return keras_hub.models.BertBackbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )


@pytest.fixture(scope="module")
def gpt2(keras_hub):
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )


def test_vit_blocks_attention_and_mlp(vit):
    # The outer graph alone: what kt.list_layers reached before.
    assert segments(held_sublayers(vit)) == [
        "vit_patching_and_embedding", "vit_encoder",
    ]
    encoder = vit.get_layer("vit_encoder")
    blocks = encoder.encoder_layers
    assert [name for name, _ in held_sublayers(encoder)] == [
        "transformer_block_1", "transformer_block_2", "dropout", "ln",
    ]
    paths = dict(walk(vit))
    for index, block in enumerate(blocks, start=1):
        prefix = f"vit_encoder/transformer_block_{index}"
        assert paths[prefix] is block
        assert segments(held_sublayers(block)) == [
            "ln_1", "mha", "dropout", "ln_2", "mlp",
        ]
        assert paths[prefix + "/mha"] is block.mha
        assert paths[prefix + "/mlp"] is block.mlp
        assert paths[prefix + "/mlp/dense_1"] is block.mlp.dense_1
        assert paths[prefix + "/mlp/dense_2"] is block.mlp.dense_2
        for projection in ("query", "key", "value", "attention_output"):
            assert isinstance(paths[f"{prefix}/mha/{projection}"],
                              keras.layers.EinsumDense)
        path, softmax = find(vit, prefix + "/mha/softmax")
        assert softmax is block.mha._softmax
        assert path == f"{prefix}/mha/{softmax.name}"
    with pytest.raises(
        ValueError,
        match=r"'transformer_block' is ambiguous in 'vit_encoder'.*"
        r"\['transformer_block_1', 'transformer_block_2'\]",
    ):
        find(vit, "vit_encoder/transformer_block/mha")
    with pytest.raises(
        ValueError,
        match=r"'dense' is ambiguous in 'vit_encoder/transformer_block_1/"
        r"mlp' \(MLP\).*\['dense_1', 'dense_2'\]",
    ):
        find(vit, "vit_encoder/transformer_block_1/mlp/dense")


def test_gemma_decoder_blocks_attention_and_feed_forward(gemma):
    assert segments(held_sublayers(gemma)) == [
        "token_embedding", "decoder_block_0", "decoder_block_1",
        "final_normalization",
    ]
    for index, block in enumerate(gemma.transformer_layers):
        prefix = f"decoder_block_{index}"
        assert find(gemma, prefix) == (prefix, block)
        assert segments(held_sublayers(block)) == [
            "pre_attention_norm", "attention", "pre_ffw_norm", "ffw_gating",
            "ffw_gating_2", "ffw_linear",
        ]
        assert find(gemma, prefix + "/attention")[1] is block.attention
        assert find(gemma, prefix + "/ffw_gating")[1] is block.gating_ffw
        assert find(gemma, prefix + "/ffw_gating_2")[1] is block.gating_ffw_2
        assert find(gemma, prefix + "/ffw_linear")[1] is block.ffw_linear
        attention = dict(held_sublayers(block.attention))
        for projection in ("query", "key", "value", "attention_output"):
            assert isinstance(attention[projection], keras.layers.EinsumDense)
        path, softmax = find(gemma, prefix + "/attention/softmax")
        assert isinstance(softmax, keras.layers.Softmax)
        assert path == f"{prefix}/attention/{softmax.name}"
        _, rotary = find(gemma, prefix + "/attention/rotary_embedding")
        assert type(rotary).__name__ == "RotaryEmbedding"


@pytest.mark.parametrize(
    "backbone, attention, feed_forward",
    [
        ("bert", "self_attention_layer", "feedforward_intermediate_dense"),
        ("gpt2", "self_attention", "feedforward_intermediate_dense"),
    ],
)
def test_bert_and_gpt2_blocks(request, backbone, attention, feed_forward):
    model = request.getfixturevalue(backbone)
    for index, block in enumerate(model.transformer_layers):
        prefix = f"transformer_layer_{index}"
        assert find(model, prefix) == (prefix, block)
        _, mha = find(model, f"{prefix}/{attention}")
        assert isinstance(mha, keras.layers.MultiHeadAttention)
        assert segments(held_sublayers(mha))[:3] == ["query", "key", "value"]
        _, softmax = find(model, f"{prefix}/{attention}/softmax")
        assert softmax is mha._softmax
        _, dense = find(model, f"{prefix}/{feed_forward}")
        assert isinstance(dense, keras.layers.Dense)
        assert dense.units == 32  # intermediate_dim


@pytest.mark.parametrize("backbone", ["vit", "gemma", "bert", "gpt2"])
def test_every_walked_path_finds_its_layer(request, backbone):
    """`walk` and `find` agree, with and without `_N` suffixes."""
    model = request.getfixturevalue(backbone)
    found = walk(model)
    assert len({id(layer) for _, layer in found}) == len(found)
    assert len({path for path, _ in found}) == len(found)
    assert not any(
        isinstance(layer, keras.layers.InputLayer) for _, layer in found
    )
    for path, layer in found:
        assert find(model, path) == (path, layer)
        # Leave out each segment's suffix where that stays unique.
        bare = []
        parent = model
        for segment in path.split("/"):
            siblings = segments(held_sublayers(parent))
            stripped = sublayers.strip_suffix(segment)
            unique = [s for s in siblings
                      if sublayers.strip_suffix(s) == stripped]
            exact = stripped in siblings and stripped != segment
            bare.append(stripped if len(unique) == 1 and not exact
                        else segment)
            parent = dict(held_sublayers(parent))[segment]
        assert find(model, "/".join(bare)) == (path, layer)

