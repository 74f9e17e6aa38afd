"""The TensorFlow trainer of `kt.TapModel`: `train_step` and `test_step`,
and what is TensorFlow's own: distribution scaling, the non-finite guard,
class weights on a `tf.data.Dataset`."""

import contextlib
import re
import weakref

import keras
import tensorflow as tf

from keras_tap.training import class_weight_data
from keras_tap.training import step as step_lib
from keras_tap.training.trainers.multi_worker import (  # noqa: F401
    make_function,
    maybe_symbolic_build,
    reducible_logs,
)

NONFINITE_MARKER = "keras_tap non-finite tap loss"
# Errors a loss raises on shapes it cannot compare, when run eagerly.
SHAPE_ERRORS = (tf.errors.InvalidArgumentError,)


def no_gradient():
    """A scope for the frozen teacher's pass: nothing here, the
    `stop_gradient` on its outputs prunes it from the step's gradient
    graph (TensorFlow has no public scope that stops a tape recording)."""
    return contextlib.nullcontext()


def num_replicas():
    """Replicas of the current `tf.distribute` strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_for_replicas(value):
    """Scale a per-replica batch mean as Keras scales its own losses.

    Gradients are summed over replicas, so a term that is a mean over the
    local batch is divided by the number of replicas.
    """
    replicas = num_replicas()
    if replicas > 1:
        value = value * tf.cast(1.0 / replicas, value.dtype)
    return value


def replica_sum(value):
    """`value` summed over the replicas of the current strategy, from a
    replica context (as it is outside one, or with one replica). Its
    gradient is the all-reduced gradient, so a term of the global batch's
    moments trains as on one device (`training/moments.py`)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def unscale_for_replicas(value):
    """Undo `scale_for_replicas` (for logging, as Keras logs `loss`)."""
    replicas = num_replicas()
    if replicas > 1:
        value = value * tf.cast(replicas, value.dtype)
    return value


def guard_finite(values, terms, step, jit_compile):
    """Make the gradients of `values` wait for a check that every tap term
    is finite.

    Each value passes through an identity whose gradient depends on the
    check, so every gradient, and with them the optimizer's update, runs
    only once the check passed: a non-finite tap loss stops training with
    the weights of the last good step (`nonfinite_error` words the error).
    XLA drops assertions: under `jit_compile=True`, `train_step` skips the
    update instead.

    Returns:
        `values` (a tuple of tensors), guarded.
    """
    if jit_compile or not terms:
        return tuple(values)
    checks = []
    for name, value in terms.items():
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(value)),
                [
                    f"{NONFINITE_MARKER}: tap={name!r} step=",
                    step,
                    "value=",
                    value,
                ],
                summarize=4,
            )
        )

    @tf.custom_gradient
    def guarded(value):
        def grad(upstream):
            with tf.control_dependencies(checks):
                return tf.identity(upstream)

        with tf.control_dependencies(checks):
            return tf.identity(value), grad

    return tuple(guarded(value) for value in values)


_CALL_RANKS = weakref.WeakKeyDictionary()


def call_rank(loss, target_shape, shape):
    """The rank of what `loss.call` returns for these shapes, from a trace
    of its own (cached): none of its ops runs in the step.

    Returns:
        The rank, or `None` when the call does not trace on its own.
    """
    key = (tuple(target_shape), tuple(shape))
    ranks = _CALL_RANKS.setdefault(loss, {})
    if key not in ranks:
        function = tf.function(lambda t, a: loss.call(t, a), autograph=False)
        try:
            concrete = function.get_concrete_function(
                tf.TensorSpec(target_shape, loss.dtype),
                tf.TensorSpec(shape, loss.dtype),
            )
            ranks[key] = len(concrete.structured_outputs.shape)
        except (ValueError, TypeError, AttributeError, tf.errors.OpError):
            ranks[key] = None
    return ranks[key]


def loss_accepts(loss, target_shape, shape):
    """Whether `loss(target, activation)` traces for these shapes."""
    function = tf.function(lambda t, a: loss(t, a), autograph=False)
    try:
        function.get_concrete_function(
            tf.TensorSpec(target_shape, "float32"),
            tf.TensorSpec(shape, "float32"),
        )
    except (ValueError, TypeError, tf.errors.OpError):
        return False
    return True


def nonfinite_error(error):
    """Turn the guard's `InvalidArgumentError` into a clear error."""
    if not isinstance(error, tf.errors.InvalidArgumentError):
        return None
    message = str(error)
    if NONFINITE_MARKER not in message:
        return None
    # The op quotes the message's strings, escaping the quotes around the
    # tap name: `tap=\'feat\' step=] [2] [value=] [nan]`.
    found = re.search(
        r"tap=\\?'(.*?)\\?' step=\]?\s*\[?(-?\d+)\]?.*?value=\]?\s*"
        r"\[?([-+\w.]+)",
        message,
        re.S,
    )
    if found:
        name, step, value = found.groups()
        detail = f"tap {name!r} at step {step}: its loss is {value}"
    else:
        detail = message.split("\n")[0]
    return FloatingPointError(nonfinite_message(detail))


def nonfinite_message(detail):
    return (
        f"Non-finite loss: {detail}. Training stopped before the "
        "optimizer applied this step, so the weights are those of the last "
        "good step. Lower the tap's weight or learning rate, or check its "
        "target."
    )


def logged_nonfinite(model):
    """Whether the loss trackers (`loss`, `predictions_loss`,
    `<tap>_loss`, reset every epoch) hold a non-finite value: under
    `jit_compile=True`, a step before this one in the same execution
    skipped its update, and so does this one."""
    checks = [
        tf.reduce_all(tf.math.is_finite(variable.value))
        for variable in step_lib.loss_tracker_variables(model)
    ]
    if not checks:
        return tf.constant(False)
    return tf.logical_not(tf.reduce_all(tf.stack(checks)))


def train_step(model, data):
    """One training step of a `kt.TapModel` on TensorFlow.

    One forward pass, the loss terms (`model.compute_loss_terms`), the
    gradient of their total, scaled for distribution and by the
    optimizer (`optimizer.scale_loss`), the update, then every metric in
    one place (`model.compute_metrics`).

    A non-finite tap term stops training before the update: the gradients
    wait for a finiteness check (`guard_finite`). XLA drops that
    assertion, so under `jit_compile=True` the step skips the update of a
    non-finite loss instead, and the logged values stop `fit`
    (`StopOnNonFinite`) with the weights of the last good step; with
    `steps_per_execution > 1` the stop comes after the execution's
    remaining steps, which skip their updates alike.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    jit_compile = bool(getattr(model, "jit_compile", False))
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        losses = model.compute_loss_terms(
            x, y, y_pred, sample_weight=sample_weight, training=True
        )
        (loss,) = guard_finite(
            (scale_for_replicas(losses.total),),
            losses.tap_terms,
            losses.step,
            jit_compile,
        )
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    variables = model.trainable_weights
    if variables:
        gradients = tape.gradient(loss, variables)

        def apply():
            model.optimizer.apply_gradients(zip(gradients, variables))
            return tf.constant(True)

        if jit_compile:
            tf.cond(
                tf.math.is_finite(losses.total)
                & tf.logical_not(logged_nonfinite(model)),
                apply,
                lambda: tf.constant(False),
            )
        else:
            # The guarded loss waits for the check: so does every op of
            # the update, `optimizer.iterations` included.
            with tf.control_dependencies([loss]):
                apply()
    logs = model.compute_metrics(
        x, y, y_pred, sample_weight, losses=losses, training=True
    )
    return reducible_logs(logs)


def test_step(model, data):
    """One evaluation step of a `kt.TapModel` on TensorFlow: one forward
    pass with `training=False`, the loss terms, then every metric."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = model(x, training=False)
    losses = model.compute_loss_terms(
        x, y, y_pred, sample_weight=sample_weight, training=False
    )
    logs = model.compute_metrics(
        x, y, y_pred, sample_weight, losses=losses, training=False
    )
    return reducible_logs(logs)


def with_class_weight(tap_model, dataset, class_weight):
    """Map a `tf.data.Dataset` of `(x, y[, sample_weight])` so that
    `class_weight` becomes the prediction sample weight (dict form)."""
    if not isinstance(dataset, tf.data.Dataset):
        return class_weight_data.with_class_weight(
            tap_model, dataset, class_weight
        )
    size = max(int(k) for k in class_weight) + 1
    table = [0.0] * size
    for key, value in class_weight.items():
        table[int(key)] = float(value)
    table = tf.constant(table, tf.float32)
    known = [False] * size
    for key in class_weight:
        known[int(key)] = True
    known = tf.constant(known)
    keys = sorted(int(k) for k in class_weight)

    def add_weights(x, y, sample_weight=None):
        pred_y, tap_y = tap_model.split_targets(y)
        pred_w, tap_w = tap_model.split_weights(sample_weight, y)
        labels = tf.convert_to_tensor(pred_y)
        if labels.shape.rank >= 2 and labels.shape[-1] > 1:
            indices = tf.argmax(labels, axis=-1)
        else:
            indices = tf.reshape(labels, [tf.shape(labels)[0], -1])[:, 0]
        indices = tf.cast(indices, tf.int32)
        inside = (indices >= 0) & (indices < size)
        safe = tf.where(inside, indices, 0)
        ok = inside & tf.gather(known, safe)
        # As the arrays path: a class without a weight is an error.
        check = tf.debugging.Assert(
            tf.reduce_all(ok),
            [
                "`class_weight` has no weight for the classes",
                tf.unique(tf.boolean_mask(indices, ~ok))[0],
                f"found in the prediction target; it has keys {keys}.",
            ],
        )
        with tf.control_dependencies([check]):
            weights = tf.gather(table, safe)
        if pred_w is not None:
            weights = weights * tf.cast(pred_w, tf.float32)
        new_y = {"predictions": pred_y, **tap_y}
        new_w = {"predictions": weights}
        for key in tap_model.tap_weight_keys(tap_y):
            if key not in tap_y:
                new_y[key] = tf.zeros_like(weights)
            given = tap_w.get(key, pred_w)
            new_w[key] = tf.ones_like(weights) if given is None else given
        return x, new_y, new_w

    return dataset.map(add_weights)
