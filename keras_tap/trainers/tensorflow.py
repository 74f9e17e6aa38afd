"""TensorFlow specifics: distribution scaling and the non-finite guard."""

import re

import tensorflow as tf

NONFINITE_MARKER = "keras_tap non-finite tap loss"


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


def unscale_for_replicas(value):
    """Undo `scale_for_replicas` (for logging, as Keras logs `loss`)."""
    replicas = num_replicas()
    if replicas > 1:
        value = value * tf.cast(replicas, value.dtype)
    return value


def guard_finite(total, terms, step, jit_compile):
    """Make `total` depend on a check that every tap term is finite.

    The check runs before the gradients exist, so a non-finite tap loss
    stops training before the optimizer touches the weights. XLA drops
    assertions, so under `jit_compile=True` the check runs on the logged
    values after the step instead (see `TapModel.fit`).
    """
    if jit_compile or not terms:
        return total
    checks = []
    for name, value in terms.items():
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(value)),
                [f"{NONFINITE_MARKER}: tap={name!r} step=", step,
                 "value=", value],
                summarize=4,
            )
        )
    with tf.control_dependencies(checks):
        return tf.identity(total)


def nonfinite_error(error):
    """Turn the guard's `InvalidArgumentError` into a clear error."""
    if not isinstance(error, tf.errors.InvalidArgumentError):
        return None
    message = str(error)
    if NONFINITE_MARKER not in message:
        return None
    found = re.search(
        r"tap=('[^']*'|\"[^\"]*\") step=\]?\s*\[?(\d+)\]?.*?value=\]?\s*"
        r"\[?([-+\w.]+)",
        message,
        re.S,
    )
    if found:
        name, step, value = found.groups()
        detail = f"tap {name} at step {step}: its loss is {value}"
    else:
        detail = message.split("\n")[0]
    return FloatingPointError(
        f"Non-finite tap loss, {detail}. Training stopped before the "
        "optimizer applied this step, so the weights are those of the last "
        "good step. Lower the tap's weight or learning rate, or check its "
        "target."
    )


def with_class_weight(tap_model, dataset, class_weight):
    """Map a `tf.data.Dataset` of `(x, y[, sample_weight])` so that
    `class_weight` becomes the prediction sample weight (dict form)."""
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            "`class_weight` needs `y`, or `x` as a tf.data.Dataset of "
            f"(x, y) batches; received x of type {type(dataset).__name__}."
        )
    size = max(int(k) for k in class_weight) + 1
    table = [0.0] * size
    for key, value in class_weight.items():
        table[int(key)] = float(value)
    table = tf.constant(table, tf.float32)

    def add_weights(x, y, sample_weight=None):
        pred_y, tap_y = tap_model.split_targets(y)
        pred_w, tap_w = tap_model.split_weights(sample_weight, y)
        labels = tf.convert_to_tensor(pred_y)
        if labels.shape.rank >= 2 and labels.shape[-1] > 1:
            indices = tf.argmax(labels, axis=-1)
        else:
            indices = tf.reshape(labels, [tf.shape(labels)[0], -1])[:, 0]
        weights = tf.gather(table, tf.cast(indices, tf.int32))
        if pred_w is not None:
            weights = weights * tf.cast(pred_w, tf.float32)
        new_y = {"predictions": pred_y, **tap_y}
        new_w = {"predictions": weights}
        for key in tap_y:
            given = tap_w.get(key)
            new_w[key] = tf.ones_like(weights) if given is None else given
        return x, new_y, new_w

    return dataset.map(add_weights)
