"""Benchmark reach: taps inside transformer blocks, and `FeatureModel`.

Prints a markdown table, in one run:

- the median time of one training step (`train_on_batch`, after a
  warm-up) of a small keras-hub `ViTBackbone` (a) as plain Keras and (b) as
  a `kt.TapModel` returning 12 taps inside its blocks (attention output,
  MLP hidden layer and second layer norm of each of 4 blocks); target:
  taps/plain <= 1.05, the cost of reaching inside the blocks. For
  reference, (c) the same taps each with an `ActivityL2` term: the terms'
  own arithmetic and their logged losses come on top;
- the median time of a forward pass of (c) a `kt.FeatureModel` for
  ResNet50's early tap `conv2_block3_out` and (d) the full ResNet50, and
  the FeatureModel's parameter count against the layers it needs; target:
  feature/full <= 0.5, parameters equal.

The two runs of each pair alternate, so drift hits them alike.

Usage:

    python benchmarks/reach.py [--repeats 20] [--batch 32]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tap as kt  # noqa: E402

EARLY_TAP = "conv2_block3_out"
INSIDE = ("mha", "mlp/dense_1", "ln_2")


def _median_times(runs, repeats):
    """Median seconds of each callable, alternating, after a warm-up."""
    for run in runs.values():
        run()
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def vit_step(batch, repeats, layers=4):
    import keras_hub

    def build():
        keras.utils.set_random_seed(0)
        return keras_hub.models.ViTBackbone(
            image_shape=(64, 64, 3), patch_size=8, num_layers=layers,
            num_heads=4, hidden_dim=64, mlp_dim=128,
        )

    plain = build()
    paths = [
        f"vit_encoder/transformer_block_{i}/{part}"
        for i in range(1, layers + 1)
        for part in INSIDE
    ]
    returned = kt.TapModel(build(), paths)
    regularized = kt.TapModel(
        build(),
        {
            path.replace("/", "_"): kt.Tap(
                path, regularizer=kt.regularizers.ActivityL2(1e-6)
            )
            for path in paths
        },
    )
    for model in (plain, returned, regularized):
        model.compile(keras.optimizers.SGD(1e-3), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.random((batch, 64, 64, 3), "float32")
    y = rng.random((batch,) + tuple(plain.output.shape[1:]), "float32")
    times = _median_times(
        {
            "ViT step, plain Keras": lambda: plain.train_on_batch(x, y),
            f"ViT step, {len(paths)} taps inside blocks": (
                lambda: returned.train_on_batch(x, y)
            ),
            f"ViT step, {len(paths)} taps + ActivityL2 terms": (
                lambda: regularized.train_on_batch(x, y)
            ),
        },
        repeats,
    )
    taps = paths
    return times, len(taps)


def feature_model(batch, repeats):
    model = keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=10
    )
    features = kt.FeatureModel(model, EARLY_TAP)
    needed = keras.Model(model.inputs, model.get_layer(EARLY_TAP).output)
    x = np.random.default_rng(0).random((batch, 64, 64, 3), "float32")
    np.testing.assert_allclose(
        features(x)[EARLY_TAP], needed(x), rtol=1e-4, atol=1e-4
    )
    run_features = keras.ops.convert_to_tensor(x)
    times = _median_times(
        {
            "FeatureModel early tap": lambda: features.predict_on_batch(
                run_features
            ),
            "ResNet50 full": lambda: model.predict_on_batch(run_features),
        },
        repeats,
    )
    return times, features.count_params(), needed.count_params()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    step, count = vit_step(args.batch, args.repeats)
    forward, params, needed = feature_model(args.batch, args.repeats)
    names = list(step) + list(forward)
    both = step | forward
    rows = [(n, f"{both[n] * 1000:.1f}", "", "") for n in names]
    ratio = step[names[1]] / step[names[0]]
    rows.append(
        (f"taps/plain ({count} taps inside blocks)", f"{ratio:.3f}",
         "<= 1.05", "PASS" if ratio <= 1.05 else "FAIL")
    )
    rows.append(
        ("(taps + terms)/plain: the terms' own cost, for reference",
         f"{step[names[2]] / step[names[0]]:.3f}", "", "")
    )
    early = forward[names[3]] / forward[names[4]]
    rows.append(
        ("feature/full", f"{early:.3f}", "<= 0.50",
         "PASS" if early <= 0.5 else "FAIL")
    )
    rows.append(
        ("FeatureModel params / needed layers' params",
         f"{params:,} / {needed:,}", "equal",
         "PASS" if params == needed else "FAIL")
    )
    print("| Measure | Value (ms or ratio) | Target | Result |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
