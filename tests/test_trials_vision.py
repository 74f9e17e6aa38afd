"""Two keras-io vision examples redone with keras_tap on every backend:
Grad-CAM (examples/vision/grad_cam.py) and probing ViT representations
(examples/vision/probing_vits.py). Every value is checked against a
reference written by hand: the model cut in two plain Keras models with the
backend's own autodiff (`grad_at`), or attention recomputed in NumPy from
the layer's weights."""

import keras
import numpy as np
import pytest
from conftest import grad_at, to_numpy
from keras import ops

import keras_tap as kt

SIZE = 64


def _images(n=2, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, size, size, 3)).astype("float32")


def _keras_io_heatmap(model, layer_name, img_array, pred_index=None):
    """keras-io's `make_gradcam_heatmap`, its two-output model and
    `GradientTape` written as the model cut at the layer and the backend's
    autodiff at the cut."""
    layer = model.get_layer(layer_name)
    body = keras.Model(model.inputs[0], layer.output)
    head = keras.Model(layer.output, model.outputs[0])
    activation = to_numpy(body(img_array))
    if pred_index is None:
        pred_index = int(np.argmax(to_numpy(head(activation))[0]))
    _, grads = grad_at(
        lambda a: ops.sum(head(a)[:, pred_index]), activation
    )
    pooled = grads.mean(axis=(0, 1, 2))
    heatmap = np.squeeze(activation[0] @ pooled[:, None])
    return np.maximum(heatmap, 0) / np.max(heatmap), activation, grads


# -- Grad-CAM ----------------------------------------------------------------


def test_grad_cam_keras_applications_equals_keras_io_recipe():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=0.35, weights=None, classes=4,
    )
    model.layers[-1].activation = None  # as keras-io does
    x = _images()
    tap_model = kt.TapModel(model, {"last_conv": "out_relu"})
    preds, _, grads = tap_model.gradients(x, target=2)
    np.testing.assert_allclose(to_numpy(preds), to_numpy(model(x)),
                               atol=1e-5)
    maps = kt.attribution.grad_cam(tap_model, x, "last_conv")
    assert maps.shape == (2, 2, 2)
    for i in range(2):
        heatmap, _, _ = _keras_io_heatmap(model, "out_relu", x[i:i + 1])
        if np.isnan(heatmap).any():  # no positive value: zeros, not NaN
            heatmap = np.zeros_like(heatmap)
        np.testing.assert_allclose(maps[i], heatmap, atol=1e-5)
        _, _, grad = _keras_io_heatmap(model, "out_relu", x[i:i + 1], 2)
        np.testing.assert_allclose(to_numpy(grads["last_conv"])[i:i + 1],
                                   grad, rtol=1e-4, atol=1e-7)
    # The layers are shared: an activation restored later shows at once.
    model.layers[-1].activation = keras.activations.softmax
    np.testing.assert_allclose(to_numpy(tap_model(x)[0]),
                               to_numpy(model(x)), atol=1e-6)


def test_grad_cam_inside_a_backbone_nested_in_a_sequential():
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False,
        weights=None,
    )
    pool, dense = keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), backbone, pool,
                              dense])
    with pytest.raises(ValueError):  # keras-io's recipe fails here
        model.get_layer("out_relu")
    x = _images()
    inner = f"{backbone.name}/block_16_project_BN"
    tap_model = kt.TapModel(model, {"last": f"{backbone.name}/out_relu"})
    _, taps, grads = tap_model.gradients(x, target=1, taps=["last", inner])
    # The last conv is the backbone's output: the head is pool + dense.
    last = to_numpy(backbone(x))
    _, expected = grad_at(lambda a: ops.sum(dense(pool(a))[:, 1]), last)
    np.testing.assert_allclose(to_numpy(grads["last"]), expected, atol=1e-6)
    layer = backbone.get_layer("block_16_project_BN")
    body = keras.Model(backbone.input, layer.output)
    rest = keras.Model(layer.output, backbone.output)
    activation = to_numpy(body(x))
    _, expected = grad_at(
        lambda a: ops.sum(dense(pool(rest(a)))[:, 1]), activation
    )
    np.testing.assert_allclose(to_numpy(taps[inner]), activation, atol=1e-5)
    np.testing.assert_allclose(to_numpy(grads[inner]), expected,
                               rtol=1e-4, atol=1e-6)
    maps = kt.attribution.grad_cam(tap_model, x, "last", class_index=[0, 2])
    assert maps.shape == (2, 2, 2) and np.isfinite(maps).all()


def _small_layers():
    return [keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
            keras.layers.Conv2D(6, 3, name="c2"), keras.layers.ReLU(name="r2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(3, name="d")]


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stack = _small_layers()

    def call(self, x):
        for layer in self.stack:
            x = layer(x)
        return x


def _reference(layers, x, head, index):
    c1, c2, r2, gap, d = layers
    activation = to_numpy(r2(c2(c1(x))))
    _, grad = grad_at(
        lambda a: ops.sum(head(d(gap(a)))[:, index]), activation
    )
    return activation, grad


@pytest.mark.parametrize("kind", ["sequential", "subclassed", "nested"])
def test_grad_cam_where_plain_keras_has_no_layer_output(kind):
    keras.utils.set_random_seed(0)
    x = _images(size=12)
    head = (lambda p: p)  # noqa: E731
    if kind == "sequential":
        model = keras.Sequential(_small_layers())
        model.build((None, 12, 12, 3))
        layers, path = model.layers, "r2"
    elif kind == "subclassed":
        model = _Subclassed(name="sub")
        model(x)
        layers, path = model.stack, "r2"
    else:
        sub = _Subclassed(name="sub")
        inputs = keras.Input((12, 12, 3))
        top = keras.layers.Dense(2, name="top")
        model = keras.Model(inputs, top(sub(inputs)))
        layers, path, head = sub.stack, "sub/r2", top
    tap_model = kt.TapModel(model, {"conv": path})
    _, taps, grads = tap_model.gradients(x, target=1)
    activation, grad = _reference(layers, x, head, 1)
    np.testing.assert_allclose(to_numpy(taps["conv"]), activation, atol=1e-6)
    np.testing.assert_allclose(to_numpy(grads["conv"]), grad, atol=1e-6)
    maps = kt.attribution.grad_cam(tap_model, x, "conv", class_index=1)
    weights = grad.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((activation * weights).sum(-1), 0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    expected = np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0)
    np.testing.assert_allclose(maps, expected, atol=1e-5)


def test_sequential_never_called_is_refused_with_the_fix():
    model = keras.Sequential(_small_layers())
    with pytest.raises(ValueError, match=r"no defined input.*model\.build"):
        kt.TapModel(model, "r2")


# -- Probing ViT representations ---------------------------------------------


@pytest.fixture(scope="module")
def vit():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )


def _np_layer_norm(layer, v):
    gamma, beta = (to_numpy(w) for w in layer.weights)
    mean, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def _np_attention(mha, v):
    """Attention probabilities `(batch, heads, query, key)` in NumPy."""
    def project(dense):
        kernel, bias = to_numpy(dense.kernel), to_numpy(dense.bias)
        return np.einsum("btd,dhk->bthk", v, kernel) + bias

    q, k = project(mha._query_dense), project(mha._key_dense)
    s = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    s = np.exp(s - s.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)


def _blocks_by_hand(vit, x):
    encoder = vit.get_layer("vit_encoder")
    hidden = vit.get_layer("vit_patching_and_embedding")(x)
    outputs = []
    for block in encoder.encoder_layers:
        outputs.append(to_numpy(hidden))
        hidden = block(hidden)
    return encoder, outputs + [to_numpy(hidden)]


def test_pattern_taps_attention_of_every_block(vit):
    # Keras names the second block's softmax `softmax_1`: patterns match
    # the real names (a pattern without `(_\d+)?` reaches block 1 alone).
    tap_model = kt.TapModel(
        vit, r"re:vit_encoder/transformer_block_\d+/mha/softmax(_\d+)?"
    )
    assert len(tap_model.tap_names) == 2
    x = _images(3, size=32)
    _, taps = tap_model(x)
    encoder, inputs = _blocks_by_hand(vit, x)
    for name, block, hidden in zip(
        tap_model.tap_names, encoder.encoder_layers, inputs
    ):
        expected = _np_attention(
            block.mha, _np_layer_norm(block.layer_norm_1, hidden)
        )
        np.testing.assert_allclose(to_numpy(taps[name]), expected,
                                   atol=2e-5)
    # Mean attention distance (probing_vits), from the taps.
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"),
                    -1).reshape(-1, 2) * 8
    distance = np.linalg.norm(grid[:, None] - grid[None], axis=-1)
    for value in taps.values():
        patches = to_numpy(value)[:, :, 1:, 1:]
        mean = (patches * distance).sum(-1).mean(-1)
        assert mean.shape == (3, 2) and np.all(mean > 0)


def test_feature_model_and_extract_of_blocks_and_attention(vit):
    taps = {f"block{i}": f"vit_encoder/transformer_block_{i}"
            for i in (1, 2)}
    taps["att2"] = "vit_encoder/transformer_block_2/mha/softmax"
    x = _images(5, size=32, seed=1)
    encoder, hidden = _blocks_by_hand(vit, x)
    out = kt.FeatureModel(vit, taps)(x)
    np.testing.assert_allclose(to_numpy(out["block1"]), hidden[1], atol=1e-5)
    np.testing.assert_allclose(to_numpy(out["block2"]), hidden[2], atol=1e-5)
    block = encoder.encoder_layers[1]
    expected = _np_attention(
        block.mha, _np_layer_norm(block.layer_norm_1, hidden[1])
    )
    np.testing.assert_allclose(to_numpy(out["att2"]), expected, atol=2e-5)
    tap_model = kt.TapModel(vit, taps)
    got = tap_model.extract(x, batch_size=2, verbose=0)
    np.testing.assert_allclose(got["att2"], expected, atol=2e-5)
    np.testing.assert_allclose(got["block2"], hidden[2], atol=1e-5)
    cls = tap_model.extract(x, taps=["att2"], batch_size=4, verbose=0,
                            reduce=lambda a: a[:, :, 0, 1:])
    np.testing.assert_allclose(cls["att2"], expected[:, :, 0, 1:],
                               atol=2e-5)


def test_gradients_at_attention_inside_a_nested_vit(vit):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(3)
    classifier = keras_hub.models.ViTImageClassifier(
        backbone=vit, num_classes=3, preprocessor=None
    )
    path = f"{vit.name}/vit_encoder/transformer_block_2"
    tap_model = kt.TapModel(classifier, {
        "att": f"{path}/mha/softmax", "ln": f"{path}/ln_1"})
    x = _images(2, size=32, seed=2)
    preds, taps, grads = tap_model.gradients(x, target=1)
    np.testing.assert_allclose(to_numpy(preds), to_numpy(classifier(x)),
                               atol=1e-5)
    encoder, hidden = _blocks_by_hand(vit, x)
    block = encoder.encoder_layers[1]
    mha, normed = block.mha, to_numpy(taps["ln"])
    values = to_numpy(mha._value_dense(normed))

    def head(att):  # the rest of the model after the probabilities
        mixed = ops.einsum("bhqt,bthk->bqhk", att, values)
        residual = ops.add(mha._output_dense(mixed), hidden[1])
        out = residual + block.mlp(block.layer_norm_2(residual))
        return classifier.get_layer("predictions")(
            encoder.layer_norm(out)[:, 0])

    att = to_numpy(taps["att"])
    np.testing.assert_allclose(att, _np_attention(mha, normed), atol=2e-5)
    score, expected = grad_at(lambda a: ops.sum(head(a)[:, 1]), att)
    np.testing.assert_allclose(score, to_numpy(preds)[:, 1].sum(), atol=1e-4)
    np.testing.assert_allclose(to_numpy(grads["att"]), expected,
                               rtol=1e-4, atol=1e-5)


def test_keras_multi_head_attention_transformer():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((17, 16))
    hidden = inputs
    for i in range(2):
        normed = keras.layers.LayerNormalization(name=f"ln{i}")(hidden)
        mixed = keras.layers.MultiHeadAttention(2, 8, name=f"mha{i}")(
            normed, normed)
        hidden = keras.layers.Add(name=f"add{i}")([hidden, mixed])
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden[:, 0]))
    x = np.random.default_rng(2).normal(size=(2, 17, 16)).astype("float32")
    tap_model = kt.TapModel(model, {"s0": "mha0/softmax", "s1": "mha1/softmax",
                                    "ln1": "ln1", "add0": "add0"})
    preds, taps = tap_model(x)
    np.testing.assert_allclose(to_numpy(preds), to_numpy(model(x)),
                               atol=1e-5)
    truncated = keras.Model(inputs, model.get_layer("add0").output)
    np.testing.assert_allclose(to_numpy(taps["add0"]), to_numpy(truncated(x)),
                               atol=1e-6)
    for i, normed in enumerate([model.get_layer("ln0")(x), taps["ln1"]]):
        _, scores = model.get_layer(f"mha{i}")(
            normed, normed, return_attention_scores=True)
        np.testing.assert_allclose(to_numpy(taps[f"s{i}"]),
                                   to_numpy(scores), atol=1e-6)


def test_zeroed_attention_equals_the_block_by_hand(vit):
    x = _images(2, size=32, seed=4)
    with kt.edit(vit, {"vit_encoder/transformer_block_2/mha/softmax":
                       kt.edits.Zero()}):
        edited = to_numpy(vit(x))
    encoder, hidden = _blocks_by_hand(vit, x)
    block = encoder.encoder_layers[1]
    residual = hidden[1] + to_numpy(block.mha._output_dense.bias)
    out = residual + to_numpy(block.mlp(block.layer_norm_2(residual)))
    np.testing.assert_allclose(edited, to_numpy(encoder.layer_norm(out)),
                               atol=1e-5)
    np.testing.assert_allclose(to_numpy(vit(x)),
                               to_numpy(encoder.layer_norm(hidden[2])),
                               atol=1e-5)


def test_pattern_taps_inside_layers_survive_save_and_load(vit, tmp_path):
    tap_model = kt.TapModel(
        vit, r"re:vit_encoder/transformer_block_\d+/mha/softmax(_\d+)?"
    )
    path = str(tmp_path / "taps.keras")
    tap_model.save(path)
    # Loading builds new layers, numbered further (`softmax_5`): the saved
    # paths leave the generated suffix out, so they resolve again.
    loaded = keras.models.load_model(path)
    assert loaded.tap_names == tap_model.tap_names
    x = _images(2, size=32, seed=5)
    _, expected = tap_model(x)
    _, got = loaded(x)
    for name in tap_model.tap_names:
        np.testing.assert_allclose(to_numpy(got[name]),
                                   to_numpy(expected[name]), atol=1e-6)


def test_gradient_at_an_input_point_is_through_that_layer_alone():
    # `a` feeds `b` and the `add`: the gradient at "b:input" is the one
    # through `b` alone, on every backend (TensorFlow and PyTorch gave the
    # gradient of the shared tensor, through both readers, JAX this one).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b_layer = keras.layers.Dense(4, name="b")
    out_layer = keras.layers.Dense(1, name="out")
    model = keras.Model(inputs, out_layer(keras.layers.Add()([a, b_layer(a)])))
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    tap_model = kt.TapModel(model, {"a": "a", "b_in": "b:input"})
    _, taps, grads = tap_model.gradients(x, target=0)
    activation = to_numpy(taps["a"])
    _, full = grad_at(
        lambda t: ops.sum(out_layer(t + b_layer(t))), activation)
    _, through_b = grad_at(
        lambda t: ops.sum(out_layer(ops.add(activation, b_layer(t)))),
        activation)
    np.testing.assert_allclose(to_numpy(grads["a"]), full, atol=1e-6)
    np.testing.assert_allclose(to_numpy(grads["b_in"]), through_b, atol=1e-6)
    assert np.abs(full - through_b).max() > 1e-3
