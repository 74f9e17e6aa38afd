"""`TapModel.gradients` and Grad-CAM against the backend's own autodiff
on a model cut in two by hand (a `tf.GradientTape` on TensorFlow)."""

import keras
import numpy as np
import pytest
from conftest import assert_close, grad_at, to_numpy
from keras import ops

import keras_tap as kt


def _cnn(name="cnn"):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(5, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 10, 10, 3)).astype("float32")


def _reference(model, layer, x, score):
    """The model cut at `layer` into two plain Keras models, and the
    gradient of the summed score at the cut, by the backend's autodiff."""
    body = keras.Model(model.input, layer.output)
    head = keras.Model(layer.output, model.output)
    activation = to_numpy(body(x))
    preds = to_numpy(head(activation))
    _, grad = grad_at(lambda a: ops.sum(score(head(a))), activation)
    return preds, activation, grad


@pytest.mark.parametrize("target", [None, 2, "callable"])
def test_gradients_match_gradient_tape(target):
    model = _cnn()
    x = _images()
    tap_model = kt.TapModel(model, ["conv1", "conv2"])
    if target == "callable":
        target = lambda p: p[:, 0] * p[:, 1]  # noqa: E731
        score = target
    elif target is None:
        score = lambda p: ops.max(p, axis=-1)  # noqa: E731
    else:
        score = lambda p: p[:, 2]  # noqa: E731
    preds, taps, grads = tap_model.gradients(x, target=target)
    for name in ("conv1", "conv2"):
        ref_preds, ref_act, ref_grad = _reference(
            model, model.get_layer(name), x, score
        )
        assert_close(preds, ref_preds, atol=1e-6)
        assert_close(taps[name], ref_act, atol=1e-6)
        assert_close(grads[name], ref_grad, atol=1e-6)
        assert np.abs(ref_grad).max() > 0


def test_gradients_of_a_further_path_and_nested_model():
    backbone = _cnn("backbone")
    model = keras.Sequential(
        [keras.Input((10, 10, 3)), backbone, keras.layers.Dense(2)]
    )
    x = _images()
    tap_model = kt.TapModel(model, "backbone/logits")
    _, taps, grads = tap_model.gradients(x, target=1, taps="backbone/conv2")
    assert list(grads) == ["backbone/conv2"]
    # The reference: the Sequential written out by hand.
    conv2 = backbone.get_layer("conv2")
    body = keras.Model(backbone.input, conv2.output)
    head = keras.Model(conv2.output, backbone.output)
    activation = to_numpy(body(x))
    _, expected = grad_at(
        lambda a: ops.sum(model.layers[-1](head(a))[:, 1]), activation
    )
    assert_close(grads["backbone/conv2"], expected, atol=1e-6)
    assert_close(taps["backbone/conv2"], activation, atol=1e-6)


def test_gradient_is_zero_where_target_does_not_depend():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3, name="a")(inputs)
    b = keras.layers.Dense(3, name="b")(inputs)
    model = keras.Model(inputs, [a, b])
    tap_model = kt.TapModel(model, {"ta": "a", "tb": "b"})
    _, _, grads = tap_model.gradients(
        np.ones((2, 4), "float32"), target=lambda p: ops.sum(p[0], 1)
    )
    np.testing.assert_array_equal(to_numpy(grads["tb"]), np.zeros((2, 3)))
    assert_close(grads["ta"], np.ones((2, 3)))


def test_gradients_bad_targets():
    tap_model = kt.TapModel(_cnn(), "conv1")
    with pytest.raises(ValueError, match="out of range.*4 classes"):
        tap_model.gradients(_images(), target=7)
    with pytest.raises(ValueError, match="`target` must be"):
        tap_model.gradients(_images(), target="cat")


def make_gradcam_heatmap(img_array, model, last_conv_layer_name,
                         pred_index=None):
    """keras-io's Grad-CAM recipe (keras.io/examples/vision/grad_cam),
    with its `tf.GradientTape` over a two-output model written for every
    backend: the model cut at the last conv layer, and the backend's
    autodiff at the cut."""
    layer = model.get_layer(last_conv_layer_name)
    body = keras.Model(model.inputs, layer.output)
    head = keras.Model(layer.output, model.output)
    last_conv_layer_output = to_numpy(body(img_array))
    preds = to_numpy(head(last_conv_layer_output))
    if pred_index is None:
        pred_index = int(np.argmax(preds[0]))
    _, grads = grad_at(
        lambda a: ops.sum(head(a)[:, pred_index]), last_conv_layer_output
    )
    pooled_grads = np.mean(grads, axis=(0, 1, 2))
    last_conv_layer_output = last_conv_layer_output[0]
    heatmap = last_conv_layer_output @ pooled_grads[..., np.newaxis]
    heatmap = np.squeeze(heatmap)
    heatmap = np.maximum(heatmap, 0) / np.max(heatmap)
    return heatmap


@pytest.mark.parametrize("class_index", [None, 3])
def test_grad_cam_equals_keras_io_recipe(class_index):
    model = _cnn()
    x = _images(4)
    maps = kt.attribution.grad_cam(
        kt.TapModel(model, "conv2"), x, "conv2", class_index=class_index
    )
    assert maps.shape == (4, 6, 6) and maps.dtype == np.float32
    for i in range(4):
        expected = make_gradcam_heatmap(
            x[i:i + 1], model, "conv2", pred_index=class_index
        )
        if np.isnan(expected).any():
            np.testing.assert_array_equal(maps[i], 0.0)
        else:
            np.testing.assert_allclose(maps[i], expected, atol=1e-6)


def test_grad_cam_no_positive_value_gives_zeros():
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(
        3, 3, name="conv", kernel_initializer="zeros",
        bias_initializer="zeros",
    )(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(conv)
    model = keras.Model(inputs, keras.layers.Dense(2)(pooled))
    maps = kt.attribution.grad_cam(
        kt.TapModel(model, "conv"), np.ones((2, 6, 6, 2), "float32"), "conv"
    )
    np.testing.assert_array_equal(maps, np.zeros((2, 4, 4)))


def test_grad_cam_errors():
    tap_model = kt.TapModel(_cnn(), "conv1")
    with pytest.raises(ValueError, match="spatial axes"):
        kt.attribution.grad_cam(tap_model, _images(2), "logits")
    with pytest.raises(ValueError, match="one per sample"):
        kt.attribution.grad_cam(
            tap_model, _images(2), "conv1", class_index=[0, 1, 2]
        )


def test_overlay_writes_a_png_at_least_the_image_size(tmp_path):
    plt_image = pytest.importorskip("matplotlib.image")
    image = np.zeros((20, 30, 3), "uint8")
    path = kt.plot.overlay(image, np.eye(3), tmp_path / "sub" / "o.png")
    written = plt_image.imread(path)
    assert written.shape[:2] == (20, 30)
    # The hot diagonal is brighter than the cold corner, where the jet
    # colormap is blue.
    assert written[1, 1, 0] > written[1, 28, 0]
    assert written[1, 28, 2] > written[1, 28, 0]
    with pytest.raises(ValueError, match="2-D map"):
        kt.plot.overlay(image, np.ones((2, 3, 3)), tmp_path / "x.png")


def test_grad_cam_example_reaches_the_nested_backbone(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples"
    spec = importlib.util.spec_from_file_location(
        "grad_cam", path / "grad_cam.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    heatmaps, written = example.main(str(tmp_path), count=2)
    assert heatmaps.shape == (2, 2, 2)
    assert all(pathlib.Path(p).stat().st_size > 0 for p in written)
    # keras-io's recipe, run on the backbone alone with its head by hand:
    # the same maps.
    model = example.build_model()
    backbone = model.layers[0]
    images = keras.applications.mobilenet_v2.preprocess_input(
        example.images(2)
    )
    # The backbone ends at `out_relu`: the head is the Sequential's tail.
    assert backbone.output is backbone.get_layer("out_relu").output

    def predict(conv):
        return model.layers[2](model.layers[1](conv))

    for i in range(2):
        conv = to_numpy(backbone(images[i:i + 1]))
        top = int(np.argmax(to_numpy(predict(conv))[0]))
        _, grads = grad_at(lambda a: ops.sum(predict(a)[:, top]), conv)
        pooled = np.mean(grads, axis=(0, 1, 2))
        heatmap = np.maximum(np.squeeze(conv[0] @ pooled[..., None]), 0)
        expected = heatmap / heatmap.max() if heatmap.max() > 0 else heatmap
        assert_close(heatmaps[i], expected, atol=1e-5)


def test_gradcam_cli_writes_overlays(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("matplotlib")
    model = _cnn()
    model.save(tmp_path / "cnn.keras")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        image = rng.integers(0, 256, size=(10, 10, 3)).astype("uint8")
        keras.utils.save_img(tmp_path / f"{name}.png", image)
    np.save(tmp_path / "more.npy", _images(2))
    env = {**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [
        sys.executable, "-m", "keras_tap", "gradcam",
        str(tmp_path / "cnn.keras"), "--tap", "conv2", "--images",
        str(tmp_path / "a.png"), str(tmp_path / "b.png"),
        str(tmp_path / "more.npy"), "--out", str(tmp_path / "cams"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert written == [
        "a_gradcam.png", "b_gradcam.png", "more_0_gradcam.png",
        "more_1_gradcam.png",
    ]
    import matplotlib.image

    assert matplotlib.image.imread(
        tmp_path / "cams" / "a_gradcam.png"
    ).shape[:2] == (10, 10)
    command[command.index("conv2")] = "conv9"
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "--tap" in done.stderr and "conv1" in done.stderr


@pytest.mark.cross_backend
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_gradients_and_edits_on_other_backends(backend):
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    worker = os.path.join(os.path.dirname(__file__), "attribution_worker.py")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, worker], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ok {backend}" in done.stdout
