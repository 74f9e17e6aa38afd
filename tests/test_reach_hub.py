"""Reach inside keras-hub backbones built from small configs (no download):
ViT blocks, attention probabilities, probes, training and teachers."""

import keras
import numpy as np
import pytest
from conftest import assert_close, to_numpy, value_and_grad

import keras_tap as kt
from keras_tap.taps import paths


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.fixture(scope="module")
def keras_hub():
    return pytest.importorskip("keras_hub")


def _vit(keras_hub):
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )


@pytest.fixture(scope="module")
def vit(keras_hub):
    keras.utils.set_random_seed(0)
    return _vit(keras_hub)


def test_vit_blocks_equal_applying_the_blocks_by_hand(vit):
    records = {r.path: r for r in kt.list_layers(vit)}
    block = "vit_encoder/transformer_block_1"
    for inner in ("", "/mha", "/mlp/dense_1", "/mlp/dense_2", "/ln_1"):
        assert block + inner in records
    assert records[block].class_name == "ViTEncoderBlock"
    assert records[block + "/mha"].output_shape == (None, 17, 16)
    assert records[block + "/mlp/dense_1"].output_shape == (None, 17, 32)
    # A held sublayer the run did not call is listed with no calls.
    # (Its generated name may carry a `_N` suffix: written without it.)
    dropout = paths.LayerIndex(vit).canonical(block + "/mha/dropout")
    assert dropout.startswith(block + "/mha/dropout")
    assert records[dropout].calls == 0
    # depth=1: the outer graph alone.
    assert [r.path for r in kt.list_layers(vit, depth=1)] == [
        "vit_patching_and_embedding", "vit_encoder"
    ]
    assert all(
        r.path.count("/") < 2 for r in kt.list_layers(vit, depth=2)
    )

    taps = [
        "vit_encoder/transformer_block_1",
        "vit_encoder/transformer_block_2",
        "vit_encoder/transformer_block_2/ln_2",
        "vit_encoder/transformer_block_2/mlp/dense_1",
    ]
    tap_model = kt.TapModel(vit, taps)
    x = _x(3, 32, 32, 3)
    predictions, got = tap_model(x)
    assert_close(predictions, vit(x), atol=1e-5)
    encoder = vit.get_layer("vit_encoder")
    hidden = vit.get_layer("vit_patching_and_embedding")(x)
    first = encoder.encoder_layers[0](hidden)
    second = encoder.encoder_layers[1](first)
    assert_close(got[taps[0]], first, atol=1e-5)
    assert_close(got[taps[1]], second, atol=1e-5)
    dense = encoder.encoder_layers[1].mlp.dense_1
    kernel, bias = to_numpy(dense.weights)
    pre = to_numpy(got[taps[2]]) @ kernel + bias
    expected = keras.activations.get(dense.activation)(pre)
    assert_close(got[taps[3]], expected, atol=1e-5)


def test_vit_attention_probabilities(vit):
    block = vit.get_layer("vit_encoder").encoder_layers[1]
    path = "vit_encoder/transformer_block_2"
    x = _x(2, 32, 32, 3)
    tap_model = kt.TapModel(vit, [f"{path}/ln_1", f"{path}/mha/softmax"])
    _, got = tap_model(x)
    normed = got[f"{path}/ln_1"]
    _, scores = block.mha(normed, normed, return_attention_scores=True)
    assert_close(got[f"{path}/mha/softmax"], scores, atol=1e-6)
    assert got[f"{path}/mha/softmax"].shape == (2, 2, 17, 17)


def test_path_into_a_layer_lists_its_sublayers(vit):
    with pytest.raises(
        ValueError, match=r"has no sublayer 'attn'.*'mha'.*'mlp'"
    ):
        kt.TapModel(vit, "vit_encoder/transformer_block_1/attn")
    with pytest.raises(ValueError, match=r"not a nested model.*nothing"):
        kt.TapModel(vit, "vit_encoder/transformer_block_1/ln_1/x")


def test_training_step_inside_a_backbone_equals_a_gradient_tape(
    keras_hub, vit
):
    keras.utils.set_random_seed(6)
    base = _vit(keras_hub)
    base.set_weights(vit.get_weights())
    path = "vit_encoder/transformer_block_1/mlp/dense_1"
    tap_model = kt.TapModel(
        base, {"hidden": kt.Tap(path, regularizer=kt.regularizers
                                .ActivityL2(0.1))}
    )
    tap_model.compile(keras.optimizers.SGD(0.1), loss="mse")
    x, y = _x(4, 32, 32, 3), _x(4, 17, 16, seed=1)
    reference = _vit(keras_hub)
    reference.set_weights(vit.get_weights())
    index = paths.LayerIndex(reference)
    (_, point), = index.resolve(path)
    tap_model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)

    captured = {}
    original = point.layer.call

    def hook(*args, **kwargs):
        captured["a"] = original(*args, **kwargs)
        return captured["a"]

    def loss():
        out = reference(x, training=True)
        activity = keras.ops.sum(keras.ops.square(captured["a"]), axis=[1, 2])
        error = keras.ops.mean(keras.ops.square(keras.ops.subtract(out, y)))
        return error + 0.1 * keras.ops.mean(activity)

    variables = reference.trainable_variables
    point.layer.call = hook
    try:
        _, grads = value_and_grad(loss, variables)
    finally:
        del point.layer.call
    for var, grad in zip(variables, grads):
        var.assign(to_numpy(var) - 0.1 * grad)
    for got, want in zip(base.get_weights(), reference.get_weights()):
        assert_close(got, want, atol=1e-5)


def test_teacher_path_and_statistics_inside_layers(vit, keras_hub):
    keras.utils.set_random_seed(7)
    student = _vit(keras_hub)
    path = "vit_encoder/transformer_block_1/mha/softmax"
    tap_model = kt.TapModel(
        student,
        {"att": kt.Tap(path, loss="mse", teacher=path)},
        teacher=vit,
    )
    x = _x(2, 32, 32, 3)
    teacher_taps = tap_model.teacher_taps(x)
    _, reference = kt.TapModel(vit, [path])(x)
    assert_close(teacher_taps["att"], reference[path],
                               atol=1e-6)
    tap_model.compile("sgd", loss="mse")
    stats = kt.callbacks.TapStatistics()
    history = tap_model.fit(
        x, _x(2, 17, 16), epochs=1, verbose=0, callbacks=[stats]
    )
    assert "att_loss" in history.history
    assert "att_mean" in history.history
    assert_close(
        history.history["att_mean"][0], 1 / 17, rtol=1e-4
    )


def test_probe_transformer_example(tmp_path, keras_hub):
    import importlib.util
    import pathlib

    script = (
        pathlib.Path(__file__).parents[1] / "examples/probe_transformer.py"
    )
    spec = importlib.util.spec_from_file_location("probe_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracies, attention, figure = example.main(
        ["--samples", "192", "--layers", "2", "--out", str(tmp_path)]
    )
    assert list(accuracies) == [
        "vit_encoder/transformer_block_1", "vit_encoder/transformer_block_2"
    ]
    assert accuracies["vit_encoder/transformer_block_1"] > 0.4  # chance .25
    assert len(attention) == 2
    # The class token's attention over the patches: its weight on itself
    # is the rest of 1.
    for value in attention.values():
        assert value.shape == (192, 16)
        total = value.sum(axis=1)
        assert np.all((total > 0) & (total < 1))
    assert pathlib.Path(figure).stat().st_size > 1000


def _token_backbone(keras_hub, name):
    keras.utils.set_random_seed(9)
    small = dict(vocabulary_size=64, num_layers=2, hidden_dim=16,
                 intermediate_dim=32)
    if name == "gemma":
        return keras_hub.models.GemmaBackbone(
            num_query_heads=2, num_key_value_heads=1, head_dim=8, **small
        )
    cls = {"bert": keras_hub.models.BertBackbone,
           "gpt2": keras_hub.models.GPT2Backbone}[name]
    return cls(num_heads=2, max_sequence_length=16, dropout=0.0, **small)


@pytest.mark.parametrize("name", ["bert", "gpt2", "gemma"])
def test_attention_probabilities_of_token_backbones(keras_hub, name):
    model = _token_backbone(keras_hub, name)
    ids = np.random.default_rng(0).integers(1, 64, size=(2, 8))
    mask = np.ones((2, 8), "int32")
    mask[:, 6:] = 0  # two padding tokens
    x = {"token_ids": ids.astype("int32"), "padding_mask": mask}
    if name == "bert":
        x["segment_ids"] = np.zeros((2, 8), "int32")
    softmax = [
        r for r in kt.list_layers(model)
        if r.path.rsplit("/", 1)[-1].startswith("softmax")
    ]
    assert len(softmax) == 2 and all(r.calls == 1 for r in softmax)
    tap_model = kt.TapModel(model, [softmax[1].path])
    predictions, taps = tap_model(x)
    for got, want in zip(keras.tree.flatten(predictions),
                         keras.tree.flatten(model(x))):
        assert_close(got, want, atol=1e-5)
    probabilities = to_numpy(taps[softmax[1].path])
    assert_close(probabilities.sum(-1), 1.0, atol=1e-5)
    # No weight on the padding tokens; causal decoders look back only.
    assert_close(probabilities[..., :6, 6:], 0.0, atol=1e-6)
    if name != "bert":
        upper = np.triu(np.ones((8, 8), bool), k=1)
        assert np.all(probabilities[..., upper] < 1e-6)


def test_feature_model_inside_blocks_as_a_layer(vit):
    blocks = ["vit_encoder/transformer_block_1",
              "vit_encoder/transformer_block_2/mha/softmax"]
    features = kt.FeatureModel(vit, blocks)
    x = _x(2, 32, 32, 3)
    encoder = vit.get_layer("vit_encoder")
    first = encoder.encoder_layers[0](
        vit.get_layer("vit_patching_and_embedding")(x)
    )
    values = features(x)
    assert_close(values[blocks[0]], first, atol=1e-5)
    assert values[blocks[1]].shape == (2, 2, 17, 17)
    # Used as a layer of another model, and trained through.
    inputs = keras.Input((32, 32, 3))
    feats = features(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(feats[blocks[0]])
    head = keras.Model(inputs, keras.layers.Dense(1)(pooled))
    head.compile("sgd", loss="mse")
    before = to_numpy(encoder.encoder_layers[0].mlp.dense_1.kernel).copy()
    head.fit(x, np.ones((2, 1)), epochs=1, verbose=0)
    after = to_numpy(encoder.encoder_layers[0].mlp.dense_1.kernel)
    assert not np.allclose(before, after)
