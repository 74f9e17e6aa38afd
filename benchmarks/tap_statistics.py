"""Cost of `kt.callbacks.TapStatistics`: step time with and without it.

Runs both variants on the same small CNN (32x32 inputs, batch 64),
interleaved, and prints the median step time and the ratio (target: the
statistics cost at most 5% of the step time).

    python benchmarks/tap_statistics.py
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tap as kt  # noqa: E402

STEPS = 30
REPEATS = 15
BATCH = 64


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu",
                            name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu",
                            name="conv2")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu",
                            name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    tap_model = kt.TapModel(
        model,
        {
            "conv1": kt.Tap("conv1",
                            regularizer=kt.regularizers.ActivityL1(1e-5)),
            "conv3": kt.Tap("conv3",
                            regularizer=kt.regularizers.ActivityL2(1e-5)),
        },
    )
    tap_model.compile("sgd", "sparse_categorical_crossentropy")
    return tap_model


def time_epoch(tap_model, x, y, callbacks):
    start = time.perf_counter()
    tap_model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  shuffle=False, callbacks=callbacks)
    return (time.perf_counter() - start) / STEPS


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(STEPS * BATCH,))
    plain, watched = build(), build()
    callback = kt.callbacks.TapStatistics()
    # Warm-up: trace both train functions.
    time_epoch(plain, x, y, [])
    time_epoch(watched, x, y, [callback])
    times = {"plain": [], "statistics": []}
    for _ in range(REPEATS):
        times["plain"].append(time_epoch(plain, x, y, []))
        times["statistics"].append(time_epoch(watched, x, y, [callback]))
    plain_ms = statistics.median(times["plain"]) * 1e3
    stats_ms = statistics.median(times["statistics"]) * 1e3
    # The median of per-round ratios: each round times both back to back,
    # so load that drifts over the run cancels out (as in train.py).
    ratio = statistics.median(
        s / p for p, s in zip(times["plain"], times["statistics"])
    )
    verdict = "PASS" if ratio <= 1.05 else "FAIL"
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| step time without statistics (ms) | {plain_ms:.1f} | |")
    print(f"| step time with TapStatistics (ms) | {stats_ms:.1f} | |")
    print(f"| with / without | {ratio:.3f} | <= 1.05 {verdict} |")


if __name__ == "__main__":
    main()
