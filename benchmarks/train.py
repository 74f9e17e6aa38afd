"""Benchmark `TapModel.fit` against hand-written Keras training steps.

Prints a markdown table, in one run, of the median training-step time
(after a warm-up; per-step times from a callback; setups interleaved over
several rounds, and each ratio the median of the per-round ratios, so that
drift and other load hit both sides alike) of a small CNN on 32x32 random
images, batch 64:

(a) tap losses: `TapModel.fit` with an activity-regularizer tap and a
    data-target tap, vs the same math hand-written as a Functional
    multi-output model with a custom `train_step`; target <= 1.03.
(b) teacher feature distillation: `TapModel` with
    `Tap(teacher=..., loss=FeatureMSE)` vs `keras.distillation.Distiller`
    with `FeatureDistillation` on the same student and teacher (target
    <= 0.65), and vs a hand-written single-pass step (target <= 1.05).
    The teacher has the student's architecture (its own weights).

Before timing, each TapModel is checked to train to the same weights as its
hand-written twin.

Usage:

    python benchmarks/train.py [--steps 20] [--rounds 15]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_tap as kt  # noqa: E402

BATCH = 64
CLASSES = 10
LR = 0.01
L2 = 1e-4
FEAT_WEIGHT = 0.5
SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -- models -------------------------------------------------------------------


def student(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(
        32, 3, strides=2, padding="same", activation="relu", name="block1"
    )(h)
    h = keras.layers.Conv2D(
        64, 3, strides=2, padding="same", activation="relu", name="block2"
    )(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(64, activation="relu", name="features")(h)
    outputs = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(inputs, outputs, name="student")


def teacher(seed=1):
    """The student's architecture, its own weights: the benchmark measures
    the cost of the student's passes, which a larger teacher would hide."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(
        32, 3, strides=2, padding="same", activation="relu"
    )(h)
    h = keras.layers.Conv2D(
        64, 3, strides=2, padding="same", activation="relu", name="t_block2"
    )(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    outputs = keras.layers.Dense(CLASSES)(h)
    return keras.Model(inputs, outputs, name="teacher")


# -- (a) tap losses ---------------------------------------------------------


def tap_losses_kt():
    taps = {
        "block1": kt.Tap("block1", regularizer=keras.regularizers.L2(L2)),
        "features": kt.Tap("features", loss="mse", weight=FEAT_WEIGHT),
    }
    model = kt.TapModel(student(), taps)
    model.compile(keras.optimizers.SGD(LR), loss=SCE)
    return model


class HandTapLosses(keras.Model):
    """The same math: a Functional model with the tapped layers as outputs
    and a custom `train_step`, logging the same values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pred_tracker = keras.metrics.Mean(name="predictions_loss")
        self.block1_tracker = keras.metrics.Mean(name="block1_loss")
        self.features_tracker = keras.metrics.Mean(name="features_loss")
        self.mse = keras.losses.MeanSquaredError()

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            logits, block1, features = self(x, training=True)
            batch = tf.cast(tf.shape(x)[0], "float32")
            pred_loss = SCE(y["predictions"], logits)
            block1_loss = L2 * tf.reduce_sum(tf.square(block1)) / batch
            features_loss = self.mse(y["features"], features)
            loss = pred_loss + block1_loss + FEAT_WEIGHT * features_loss
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        for tracker, value in (
            (self.pred_tracker, pred_loss),
            (self.block1_tracker, block1_loss),
            (self.features_tracker, features_loss),
        ):
            tracker.update_state(value, sample_weight=batch)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=batch)
        return {m.name: m.result() for m in self.metrics}


def tap_losses_hand():
    base = student()
    outputs = [
        base.output,
        base.get_layer("block1").output,
        base.get_layer("features").output,
    ]
    model = HandTapLosses(base.input, outputs)
    model.compile(keras.optimizers.SGD(LR))
    return model


# -- (b) feature distillation -------------------------------------------------


def distill_kt():
    # Distiller's total: 0.5 * student loss + 0.5 * distillation loss.
    taps = {
        "hint": kt.Tap(
            "block2",
            teacher="t_block2",
            loss=kt.losses.FeatureMSE(),
            weight=0.5,
        )
    }
    model = kt.TapModel(student(), taps, teacher=teacher())
    model.compile(keras.optimizers.SGD(LR), loss=SCE, loss_weights=0.5)
    return model


def distill_keras():
    loss = keras.distillation.FeatureDistillation(
        loss="mse", teacher_layer_name="t_block2", student_layer_name="block2"
    )
    model = keras.distillation.Distiller(
        teacher=teacher(),
        student=student(),
        distillation_losses=loss,
        student_loss_weight=0.5,
    )
    model.compile(keras.optimizers.SGD(LR), loss=SCE)
    return model


class HandDistill(keras.Model):
    """One student pass with the distilled layer as a second output, the
    teacher's layer from a frozen extractor."""

    def __init__(self, *args, teacher_features=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_features = teacher_features
        self.teacher_features.trainable = False
        self.pred_tracker = keras.metrics.Mean(name="predictions_loss")
        self.hint_tracker = keras.metrics.Mean(name="hint_loss")
        self.mse = keras.losses.MeanSquaredError()

    def train_step(self, data):
        x, y = data
        target = tf.stop_gradient(self.teacher_features(x, training=False))
        with tf.GradientTape() as tape:
            logits, block2 = self(x, training=True)
            pred_loss = SCE(y, logits)
            hint_loss = self.mse(target, block2)
            loss = 0.5 * pred_loss + 0.5 * hint_loss
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        batch = tf.cast(tf.shape(x)[0], "float32")
        self.pred_tracker.update_state(pred_loss, sample_weight=batch)
        self.hint_tracker.update_state(hint_loss, sample_weight=batch)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=batch)
        return {m.name: m.result() for m in self.metrics}


def distill_hand():
    base, frozen = student(), teacher()
    extractor = keras.Model(frozen.input, frozen.get_layer("t_block2").output)
    model = HandDistill(
        base.input,
        [base.output, base.get_layer("block2").output],
        teacher_features=extractor,
    )
    model.compile(keras.optimizers.SGD(LR))
    return model


# -- timing -------------------------------------------------------------------


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def data(steps):
    rng = np.random.default_rng(0)
    n = steps * BATCH
    x = rng.random((n, 32, 32, 3), "float32")
    y = rng.integers(0, CLASSES, size=n)
    features = rng.normal(size=(n, 64)).astype("float32")
    return x, y, features


def trainable_weights_of(model):
    if isinstance(model, kt.TapModel):
        return model.base.get_weights()
    return [w.numpy() for w in model.weights if w.trainable]


def check_same_training(kt_model, hand_model, x, y_kt, y_hand):
    """One epoch of four steps; the same weights (to 1e-4)."""
    for model, y in ((kt_model, y_kt), (hand_model, y_hand)):
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    kt_weights = kt_model.base.get_weights()
    hand_weights = [w.numpy() for w in hand_model.trainable_weights]
    assert len(kt_weights) == len(hand_weights)
    for a, b in zip(kt_weights, hand_weights):
        np.testing.assert_allclose(a, b, atol=1e-4)


def time_setups(setups, steps, rounds):
    """Per-round median step time of each setup; each round runs every
    setup once, in an order reversed every other round, so that drift hits
    all alike."""
    x, y, features = data(steps)
    runs = {}
    for name, (build, targets) in setups.items():
        model = build()
        runs[name] = (model, targets(y, features))
        model.fit(x, runs[name][1], batch_size=BATCH, epochs=1, verbose=0)
    times = {name: [] for name in setups}
    for round_index in range(rounds):
        order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]
        for name in order:
            model, y_run = runs[name]
            timer = StepTimer()
            model.fit(
                x,
                y_run,
                batch_size=BATCH,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[timer],
            )
            # The first step of a fit also waits on the input pipeline.
            times[name].append(statistics.median(timer.times[1:]))
    return times


def paired_ratio(times, numerator, denominator):
    """The median over rounds of the ratio within each round."""
    return statistics.median(
        a / b for a, b in zip(times[numerator], times[denominator])
    )


def verdict(ok):
    return "PASS" if ok else "FAIL"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    x, y, features = data(4)
    check_same_training(
        tap_losses_kt(),
        tap_losses_hand(),
        x,
        {"predictions": y, "features": features},
        {"predictions": y, "features": features},
    )
    check_same_training(distill_kt(), distill_hand(), x, y, y)

    by_dict = lambda y, f: {"predictions": y, "features": f}  # noqa: E731
    plain = lambda y, f: y  # noqa: E731
    times = time_setups(
        {
            "(a) TapModel.fit, tap losses": (tap_losses_kt, by_dict),
            "(a) hand-written multi-output step": (tap_losses_hand, by_dict),
            "(b) TapModel.fit, teacher tap": (distill_kt, plain),
            "(b) keras Distiller": (distill_keras, plain),
            "(b) hand-written single-pass step": (distill_hand, plain),
        },
        args.steps,
        args.rounds,
    )
    names = list(times)
    ratios = [
        ("(a) TapModel / hand-written", names[0], names[1], 1.03),
        ("(b) TapModel / Distiller", names[2], names[3], 0.65),
        ("(b) TapModel / hand-written", names[2], names[4], 1.05),
    ]
    print(
        f"Small CNN, 32x32x3 random images, batch {BATCH}, SGD; median step "
        f"time over {args.rounds} interleaved rounds of {args.steps} steps "
        "after a warm-up, ratios as the median of per-round ratios; keras "
        f"{keras.__version__}, tensorflow "
        f"{tf.__version__}, {os.cpu_count()} CPU cores.\n"
    )
    print("| Measure | Value | Target | Result |")
    print("| --- | --- | --- | --- |")
    for name, per_round in times.items():
        seconds = statistics.median(per_round)
        print(f"| {name} (median ms/step) | {1000 * seconds:.2f} | | |")
    for name, numerator, denominator, target in ratios:
        ratio = paired_ratio(times, numerator, denominator)
        print(
            f"| {name} | {ratio:.3f} | <= {target:.2f} | "
            f"{verdict(ratio <= target)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
