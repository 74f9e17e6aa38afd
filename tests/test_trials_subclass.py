"""User trial: a researcher subclasses `kt.TapModel` (README "Research").

A new loss term from two taps (`compute_tap_losses`), a stop-gradient and
a per-tap gradient scale through that hook, an overridden `train_step` on
each backend that keeps the per-tap logs, and saving / loading / resuming
the registered subclass. Every update is checked against a hand-written
step (`value_and_grad` of conftest) on the same weights and batch.
"""

import os

import keras
import numpy as np
from conftest import BACKEND, to_numpy, value_and_grad
from keras import ops

import keras_tap as kt

LR = 0.1
W_HEAD, W_COS = 0.5, 0.3


def cosine_term(a, b):
    """1 - mean over samples of cos(a_i, b_i)."""
    a = a / ops.sqrt(ops.sum(a * a, axis=-1, keepdims=True) + 1e-6)
    b = b / ops.sqrt(ops.sum(b * b, axis=-1, keepdims=True) + 1e-6)
    return 1.0 - ops.mean(ops.sum(a * b, axis=-1))


@keras.saving.register_keras_serializable(package="trials_subclass")
class AlignedTapModel(kt.TapModel):
    """Cross-layer cosine term between taps `h1` and `h2`, logged as
    `h2_loss`; the `h1` head learns from a stop-gradient activation (the
    backbone gets no gradient from it)."""

    def compute_tap_losses(self, x, y, taps, sample_weight=None,
                           training=False):
        detached = dict(taps, h1=ops.stop_gradient(taps["h1"]))
        terms = super().compute_tap_losses(
            x, y, detached, sample_weight, training
        )
        terms["h2"] = cosine_term(taps["h1"], taps["h2"])
        return terms


@keras.saving.register_keras_serializable(package="trials_subclass")
def declared(activation):
    """A placeholder regularizer: `compute_tap_losses` sets the term."""
    return ops.zeros(())


def build(cls=AlignedTapModel):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h1 = keras.layers.Dense(6, activation="tanh", name="h1")(inputs)
    h2 = keras.layers.Dense(6, activation="tanh", name="h2")(h1)
    out = keras.layers.Dense(3, name="out")(h2)
    base = keras.Model(inputs, out, name="base")
    head = keras.Sequential([keras.layers.Dense(3, name="head_dense")],
                            name="head")
    taps = {
        "h1": kt.Tap("h1", loss="mse", target="predictions", adapter=head,
                     weight=W_HEAD),
        # Its term is the override's: the regularizer only declares it.
        "h2": kt.Tap("h2", regularizer=declared, weight=W_COS),
    }
    model = cls(base, taps)
    model.compile(keras.optimizers.SGD(LR), loss="mse")
    return model


def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    return x, y


def hand_loss(model, x, y, head_stop=True, parts=False):
    """The total loss written out with the base layers alone."""
    base = model.base
    x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    h1 = base.get_layer("h1")(x)
    h2 = base.get_layer("h2")(h1)
    logits = base.get_layer("out")(h2)
    head = model.taps["h1"].adapter
    head_in = ops.stop_gradient(h1) if head_stop else h1
    pred = ops.mean((logits - y) ** 2)
    head_term = ops.mean((head(head_in) - y) ** 2)
    cos = cosine_term(h1, h2)
    if parts:
        return pred, head_term, cos
    return pred + W_HEAD * head_term + W_COS * cos


def reference_step(model, x, y, fn=None):
    """The weights after one SGD step of the hand-written loss."""
    variables = model.trainable_variables
    fn = fn or (lambda: hand_loss(model, x, y))
    value, grads = value_and_grad(fn, variables)
    return value, grads, [
        to_numpy(v) - LR * g for v, g in zip(variables, grads)
    ]


def check_step(model, x, y, fn=None):
    value, grads, expected = reference_step(model, x, y, fn)
    parts = [float(to_numpy(p)) for p in hand_loss(model, x, y, parts=True)]
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False,
                        verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert {"loss", "predictions_loss", "h1_loss", "h2_loss"} <= set(logs)
    np.testing.assert_allclose(logs["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(
        [logs["predictions_loss"], logs["h1_loss"], logs["h2_loss"]],
        parts, rtol=1e-5,
    )
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(to_numpy(v), e, rtol=1e-5, atol=1e-6)
    return grads, logs


def test_two_tap_term_and_stop_gradient():
    x, y = data()
    model = build()
    model(x)
    # Without the stop-gradient the backbone's `h1` kernel would move
    # differently: the check below tells the two apart.
    kernel = model.base.get_layer("h1").kernel
    _, (with_stop,) = value_and_grad(lambda: hand_loss(model, x, y),
                                     [kernel])
    _, (no_stop,) = value_and_grad(
        lambda: hand_loss(model, x, y, head_stop=False), [kernel])
    assert np.max(np.abs(with_stop - no_stop)) > 1e-4
    check_step(model, x, y)


def test_save_load_resume(tmp_path):
    x, y = data()
    model = build()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "aligned.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is AlignedTapModel
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b))
    # Resuming runs the override (a cosine `h2_loss`) and the hand step.
    check_step(loaded, x, y)


# -- an overridden train_step on each backend --------------------------------

SCALE = 0.25  # the tap part's gradient is scaled by this


if BACKEND == "tensorflow":
    import tensorflow as tf

    class ScaledStep(AlignedTapModel):
        def train_step(self, data):
            x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                losses = self.compute_loss_terms(x, y, y_pred, sw)
                main, aux = self.compute_loss_parts(losses=losses)
                loss = main + SCALE * aux
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(
                zip(grads, self.trainable_variables))
            return self.compute_metrics(x, y, y_pred, sw, losses=losses,
                                        training=True)

elif BACKEND == "jax":
    import jax

    class ScaledStep(AlignedTapModel):
        def train_step(self, state, data):
            trainable, non_trainable, opt_values, metric_values = state
            x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
            others = list(zip(self.non_trainable_variables, non_trainable))
            others += list(zip(self.optimizer.variables, opt_values))
            others += list(zip(self.metrics_variables, metric_values))

            def loss_fn(values):
                mapping = list(zip(self.trainable_variables, values))
                with keras.StatelessScope(
                    state_mapping=mapping + others
                ) as scope:
                    y_pred = self(x, training=True)
                    losses = self.compute_loss_terms(x, y, y_pred, sw)
                    main, aux = self.compute_loss_parts(losses=losses)
                # Keras's compiled loss updates metrics while it computes
                # the loss: carry their values out of the scope.
                new_metrics = [
                    old if scope.get_current_value(v) is None
                    else scope.get_current_value(v)
                    for v, old in zip(self.metrics_variables, metric_values)
                ]
                return main + SCALE * aux, (y_pred, losses, new_metrics)

            (_, (y_pred, losses, metric_values)), grads = (
                jax.value_and_grad(loss_fn, has_aux=True)(trainable))
            trainable, opt_values = self.optimizer.stateless_apply(
                opt_values, grads, trainable)
            mapping = list(zip(self.trainable_variables, trainable))
            mapping += list(zip(self.non_trainable_variables, non_trainable))
            mapping += list(zip(self.optimizer.variables, opt_values))
            mapping += list(zip(self.metrics_variables, metric_values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                logs = self.compute_metrics(x, y, y_pred, sw, losses=losses,
                                            training=True)
            metric_values = [
                old if scope.get_current_value(v) is None
                else scope.get_current_value(v)
                for v, old in zip(self.metrics_variables, metric_values)
            ]
            return logs, (trainable, non_trainable, opt_values,
                          metric_values)

else:
    import torch

    class ScaledStep(AlignedTapModel):
        def train_step(self, data):
            x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
            y_pred = self(x, training=True)
            self.zero_grad()
            losses = self.compute_loss_terms(x, y, y_pred, sw)
            main, aux = self.compute_loss_parts(losses=losses)
            (main + SCALE * aux).backward()
            variables = self.trainable_weights
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in variables],
                                     variables)
                return self.compute_metrics(x, y, y_pred, sw, losses=losses,
                                            training=True)


def test_overridden_train_step_keeps_tap_logs():
    x, y = data()
    model = build(ScaledStep)
    model(x)

    def scaled():
        pred, head, cos = hand_loss(model, x, y, parts=True)
        return pred + SCALE * (W_HEAD * head + W_COS * cos)

    _, _, expected = reference_step(model, x, y, scaled)
    total = float(to_numpy(hand_loss(model, x, y)))
    parts = [float(to_numpy(p)) for p in hand_loss(model, x, y, parts=True)]
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False,
                        verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    # `loss` logs the unscaled total, and each term apart.
    np.testing.assert_allclose(logs["loss"], total, rtol=1e-5)
    np.testing.assert_allclose(
        [logs["predictions_loss"], logs["h1_loss"], logs["h2_loss"]],
        parts, rtol=1e-5,
    )
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(to_numpy(v), e, rtol=1e-5, atol=1e-6)


class TermOnPlainTap(kt.TapModel):
    def compute_tap_losses(self, x, y, taps, sample_weight=None,
                           training=False):
        terms = super().compute_tap_losses(x, y, taps, sample_weight,
                                           training)
        terms["h2"] = cosine_term(taps["h1"], taps["h2"])
        return terms


def test_term_on_a_tap_without_loss_names_the_problem():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h1 = keras.layers.Dense(6, name="h1")(inputs)
    h2 = keras.layers.Dense(6, name="h2")(h1)
    base = keras.Model(inputs, keras.layers.Dense(3, name="out")(h2))
    model = TermOnPlainTap(base, {"h1": kt.Tap("h1"), "h2": kt.Tap("h2")})
    model.compile(keras.optimizers.SGD(LR), loss="mse")
    x, y = data()
    with np.testing.assert_raises_regex(ValueError, "no `loss` or"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
