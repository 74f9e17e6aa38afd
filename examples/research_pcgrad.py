"""Gradient surgery between the prediction loss and the tap losses.

A `kt.TapModel` subclass a researcher would write: its `train_step` runs
ONE forward pass, takes the gradient of the prediction loss and of the
weighted tap losses apart (`compute_loss_terms`, `compute_loss_parts`),
logs both gradient norms and their cosine, and, when the two gradients
conflict (negative dot product), projects each onto the normal plane of
the other before adding them: PCGrad (Yu et al., "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020), here with two "tasks", the
predictions and the taps.

The step is TensorFlow code (a persistent `tf.GradientTape` gives both
gradients of the one forward pass), so the example runs on the TensorFlow
backend. Run it on scikit-learn's 8x8 digits (shipped with scikit-learn;
random data when it is missing):

    KERAS_BACKEND=tensorflow python examples/research_pcgrad.py --epochs 5
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from keras import ops

import keras_tap as kt

EPSILON = 1e-12


class PCGradTapModel(kt.TapModel):
    """A `TapModel` whose step applies PCGrad between the prediction
    gradient and the tap gradient.

    Logs, besides `loss`, `predictions_loss` and `<tap>_loss`:
    `prediction_grad_norm`, `tap_grad_norm`, `grad_cosine` (before the
    projection) and `conflict_rate` (the fraction of steps that projected).

    Its `train_step` uses `tf.GradientTape`: it needs the TensorFlow
    backend.
    """

    def __init__(self, *args, **kwargs):
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise RuntimeError(
                "PCGradTapModel's train_step takes its two gradients with "
                "`tf.GradientTape`, so it needs the TensorFlow backend; "
                f"Keras runs on {backend!r} here. Set "
                "KERAS_BACKEND=tensorflow before Keras is imported."
            )
        super().__init__(*args, **kwargs)
        self.prediction_grad_norm = keras.metrics.Mean(
            name="prediction_grad_norm"
        )
        self.tap_grad_norm = keras.metrics.Mean(name="tap_grad_norm")
        self.grad_cosine = keras.metrics.Mean(name="grad_cosine")
        self.conflict_rate = keras.metrics.Mean(name="conflict_rate")

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape(persistent=True) as tape:
            y_pred = self(x, training=True)  # the one forward pass
            losses = self.compute_loss_terms(
                x, y, y_pred, sample_weight, training=True
            )
            main, aux = self.compute_loss_parts(losses=losses)
        variables = self.trainable_variables
        main_grads = _dense(tape.gradient(main, variables), variables)
        tap_grads = _dense(tape.gradient(aux, variables), variables)
        del tape

        grads, stats = pcgrad(main_grads, tap_grads)
        self.optimizer.apply_gradients(zip(grads, variables))

        self.prediction_grad_norm.update_state(stats["main_norm"])
        self.tap_grad_norm.update_state(stats["tap_norm"])
        self.grad_cosine.update_state(stats["cosine"])
        self.conflict_rate.update_state(stats["conflict"])
        # `loss`, `predictions_loss`, `<tap>_loss`, the tap and compiled
        # metrics, all from this step's terms.
        return self.compute_metrics(
            x, y, y_pred, sample_weight, losses=losses, training=True
        )

    def test_step(self, data):
        # Gradients exist in training only: keep their metrics out of the
        # validation logs.
        logs = super().test_step(data)
        gradient_metrics = {
            m.name
            for m in (
                self.prediction_grad_norm,
                self.tap_grad_norm,
                self.grad_cosine,
                self.conflict_rate,
            )
        }
        return {k: v for k, v in logs.items() if k not in gradient_metrics}


def _dense(grads, variables):
    """`None` gradients (a variable one loss does not reach) as zeros."""
    return [
        ops.zeros_like(v) if g is None else ops.convert_to_tensor(g)
        for g, v in zip(grads, variables)
    ]


def _dot(a, b):
    return ops.sum(ops.stack([ops.sum(x * y) for x, y in zip(a, b)]))


def pcgrad(main_grads, tap_grads):
    """PCGrad for two gradients, as lists over the same variables.

    When `g_m . g_t < 0`, each is projected onto the normal plane of the
    other: `g_m' = g_m - (g_m . g_t) / |g_t|^2 g_t` and
    `g_t' = g_t - (g_m . g_t) / |g_m|^2 g_m`; the update is `g_m' + g_t'`.
    Otherwise it is `g_m + g_t`.

    Returns:
        `(grads, stats)`: the combined gradients, and the norms, cosine and
        whether they conflicted (as 0.0 or 1.0).
    """
    dot = _dot(main_grads, tap_grads)
    main_sq = _dot(main_grads, main_grads)
    tap_sq = _dot(tap_grads, tap_grads)
    conflict = ops.cast(dot < 0.0, "float32")
    main_coef = conflict * dot / (tap_sq + EPSILON)
    tap_coef = conflict * dot / (main_sq + EPSILON)
    grads = [
        (m - main_coef * t) + (t - tap_coef * m)
        for m, t in zip(main_grads, tap_grads)
    ]
    stats = {
        "main_norm": ops.sqrt(main_sq),
        "tap_norm": ops.sqrt(tap_sq),
        "cosine": dot / (ops.sqrt(main_sq * tap_sq) + EPSILON),
        "conflict": conflict,
    }
    return grads, stats


def build_model(classes=10, seed=0):
    """A small CNN on 8x8 images and its taps: a deep-supervision head on
    the first block and a DeCov regularizer on the pooled features."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(
        16, 3, padding="same", activation="relu", name="block1"
    )(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D(name="features")(h)
    outputs = keras.layers.Dense(classes, name="logits")(h)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    head = keras.Sequential(
        [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(classes)],
        name="block1_head",
    )
    taps = {
        "block1": kt.Tap(
            "block1",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            target="predictions",
            adapter=head,
            weight=0.3,
            metrics=["accuracy"],
        ),
        "features": kt.Tap(
            "features", regularizer=kt.regularizers.DeCov(), weight=0.1
        ),
    }
    return PCGradTapModel(model, taps)


def load_data(samples=None, seed=0):
    """scikit-learn's digits scaled to [0, 1], or random data without it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(seed)
        n = samples or 512
        x = rng.random((n, 8, 8, 1)).astype("float32")
        return x, rng.integers(0, 10, size=n)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    if samples:
        x, y = x[:samples], y[:samples]
    return x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args(argv)

    x, y = load_data(args.samples)
    split = int(0.8 * len(x))
    tap_model = build_model()
    tap_model.compile(
        keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = tap_model.fit(
        x[:split],
        y[:split],
        validation_data=(x[split:], y[split:]),
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=2,
    )
    last = {k: v[-1] for k, v in history.history.items()}
    print(
        "val_accuracy {val_accuracy:.3f}  conflict_rate {conflict_rate:.2f}"
        "  grad_cosine {grad_cosine:+.3f}".format(**last)
    )
    return history


if __name__ == "__main__":
    main()
