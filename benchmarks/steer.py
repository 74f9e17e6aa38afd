"""Benchmark steer: `predict` inside a `kt.edit` block, and `gradients`.

Prints a markdown table, in one run, over a MobileNetV2 (random weights):

- the median time of `model.predict` on 256 images (a) plain and (b)
  inside `kt.edit(model, {layer: kt.edits.Add(vector)})` with one steering
  vector on a middle block; target: edit/plain <= 1.05. Entering the block
  discards the compiled predict function, so both are measured after a
  warm-up; the plain runs are measured before and after the block, and
  their mean is the reference.
- the median time of (c) `tap_model.gradients(x, taps=[layer])` and (d) a
  hand-written `tf.GradientTape` step computing the same gradient (the
  top score's gradient at the layer, through
  `keras.Model(inputs, [layer.output, model.output])`), alternating;
  target: gradients/tape <= 1.10.

Usage:

    python benchmarks/steer.py [--repeats 10] [--batch 32]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tap as kt  # noqa: E402

LAYER = "block_6_expand_relu"


def _build(size):
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=0.5, weights=None, classes=10
    )


def _times(run, repeats):
    run()
    run()
    found = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        found.append(time.perf_counter() - start)
    return found


def predict_inside_edit(model, x, batch, repeats):
    def predict():
        model.predict(x, batch_size=batch, verbose=0)

    before = _times(predict, repeats)
    channels = model.get_layer(LAYER).output.shape[-1]
    vector = np.random.default_rng(0).normal(size=channels) * 0.1
    with kt.edit(model, {LAYER: kt.edits.Add(vector)}):
        edited = _times(predict, repeats)
    after = _times(predict, repeats)
    plain = statistics.median(before + after)
    return plain, statistics.median(edited)


def gradients_against_tape(model, x, repeats):
    import tensorflow as tf

    tap_model = kt.TapModel(model, {"mid": LAYER})
    reference = keras.Model(
        model.input, [model.get_layer(LAYER).output, model.output]
    )

    def ours():
        _, _, grads = tap_model.gradients(x, taps=["mid"])
        return grads["mid"].numpy()

    def tape():
        inputs = tf.convert_to_tensor(x)
        with tf.GradientTape() as g:
            g.watch(inputs)
            activation, preds = reference(inputs, training=False)
            score = tf.reduce_sum(tf.reduce_max(preds, axis=-1))
        return g.gradient(score, activation).numpy()

    np.testing.assert_allclose(ours(), tape(), atol=1e-5)
    for run in (ours, tape, ours, tape):
        run()
    times = {"ours": [], "tape": []}
    for _ in range(repeats):
        for name, run in (("ours", ours), ("tape", tape)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(
        times["tape"]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    model = _build(args.size)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, args.size, args.size, 3)).astype("float32")
    plain, edited = predict_inside_edit(model, x, args.batch, args.repeats)
    ours, tape = gradients_against_tape(
        model, x[: args.batch], args.repeats
    )
    print(f"backend {keras.backend.backend()}, MobileNetV2(alpha=0.5, "
          f"{args.size}x{args.size}), batch {args.batch}, median of "
          f"{args.repeats}")
    print()
    print("| measure | time (ms) | ratio | target |")
    print("|---|---|---|---|")
    print(f"| predict, plain (256 images) | {plain * 1e3:.1f} | | |")
    print(f"| predict inside kt.edit (one Add) | {edited * 1e3:.1f} | "
          f"{edited / plain:.3f} | <= 1.05 |")
    print(f"| hand-written GradientTape | {tape * 1e3:.1f} | | |")
    print(f"| tap_model.gradients | {ours * 1e3:.1f} | "
          f"{ours / tape:.3f} | <= 1.10 |")


if __name__ == "__main__":
    main()
