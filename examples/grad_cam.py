"""Grad-CAM on a backbone nested in a Sequential, where keras-io's recipe
fails.

keras-io's Grad-CAM example builds a second model,
`keras.Model(model.inputs, [model.get_layer(name).output, model.output])`,
and a `GradientTape` by hand. When the backbone is a layer of a
`Sequential` (the usual way to put a new head on a `keras.applications`
model), `model.get_layer("out_relu")` raises `No such layer`: the layer
lives inside the nested model, and its output tensor belongs to the
backbone's own graph, not to the Sequential's.

keras_tap reaches it by path, `"mobilenetv2_0.35_64/out_relu"`, and
`kt.attribution.grad_cam` computes every sample's heatmap from one forward
and one backward pass. `kt.plot.overlay` draws each heatmap over its image.
No weights are downloaded (`weights=None`); the images are synthetic.
Run it:

    python examples/grad_cam.py --out runs/grad_cam
"""

import argparse
import os

import keras
import numpy as np

import keras_tap as kt

SIZE = 64


def build_model(classes=5, seed=0):
    """A MobileNetV2 backbone (random weights) and a new head, nested in a
    Sequential."""
    keras.utils.set_random_seed(seed)
    backbone = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False,
        weights=None,
    )
    return keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        backbone,
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, name="classes"),
    ])


def images(count=2, seed=0):
    """Noise images with one bright square each, in [0, 255]."""
    rng = np.random.default_rng(seed)
    batch = rng.uniform(0, 80, size=(count, SIZE, SIZE, 3))
    for image in batch:
        top, left = rng.integers(0, SIZE - 20, size=2)
        image[top:top + 20, left:left + 20] = 255.0
    return batch.astype("float32")


def main(out="runs/grad_cam", count=2):
    model = build_model()
    backbone = model.layers[0]
    last_conv = f"{backbone.name}/out_relu"
    try:  # keras-io's recipe: the layer is not the Sequential's own.
        model.get_layer("out_relu")
    except ValueError as error:
        print(f"keras-io's recipe fails: {error}")
    tap_model = kt.TapModel(model, {"last_conv": last_conv})
    batch = images(count)
    inputs = keras.applications.mobilenet_v2.preprocess_input(batch.copy())
    heatmaps = kt.attribution.grad_cam(tap_model, inputs, "last_conv")
    written = []
    for i, (image, heatmap) in enumerate(zip(batch, heatmaps)):
        path = os.path.join(out, f"grad_cam_{i}.png")
        written.append(kt.plot.overlay(image, heatmap, path))
        print(f"heatmap {heatmap.shape} -> {path}")
    return heatmaps, written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/grad_cam")
    parser.add_argument("--count", type=int, default=2)
    args = parser.parse_args()
    main(args.out, args.count)
