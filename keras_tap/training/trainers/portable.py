"""What the JAX and PyTorch trainers share: the backend-free answers to
the questions `step.py` asks its trainer.

Neither backend splits a batch into replicas inside the step: JAX's
`keras.distribution.DataParallel` computes the loss on the global batch
(sharded across devices), PyTorch runs on one device. So no value is
scaled for replicas, and a sum over replicas is the value itself.
"""

import contextlib
import weakref

from keras import ops

from keras_tap.training import class_weight_data

# Errors a loss raises on shapes it cannot compare: JAX and PyTorch raise
# `TypeError`, `ValueError` or `RuntimeError` (torch's size mismatch).
SHAPE_ERRORS = (RuntimeError,)


def num_replicas():
    """1: the step sees the global batch."""
    return 1


def scale_for_replicas(value):
    """`value` as it is (the step sees the global batch)."""
    return value


def unscale_for_replicas(value):
    """`value` as it is (the step sees the global batch)."""
    return value


def replica_sum(value):
    """`value` as it is (the step sees the global batch)."""
    return value


def guard_finite(values, terms, step, jit_compile):
    """`values` as they are: the JAX and PyTorch steps check the total
    loss themselves before applying the update."""
    return tuple(values)


def no_gradient():
    """A scope whose computations record nothing for gradients (the
    frozen teacher's pass): nothing on JAX, whose gradients are taken of
    functions of the trainable variables alone."""
    return contextlib.nullcontext()


def _concrete(shape):
    return tuple(2 if dim is None else dim for dim in shape)


_CALL_RANKS = weakref.WeakKeyDictionary()


def call_rank(loss, target_shape, shape):
    """The rank of what `loss.call` returns for these shapes, from a call
    on zeros (cached).

    Returns:
        The rank, or `None` when the call fails on zeros.
    """
    key = (tuple(target_shape), tuple(shape))
    ranks = _CALL_RANKS.setdefault(loss, {})
    if key not in ranks:
        try:
            value = loss.call(
                ops.zeros(_concrete(target_shape), dtype=loss.dtype),
                ops.zeros(_concrete(shape), dtype=loss.dtype),
            )
            ranks[key] = len(value.shape)
        except (ValueError, TypeError, RuntimeError):
            ranks[key] = None
    return ranks[key]


def loss_accepts(loss, target_shape, shape):
    """Whether `loss(target, activation)` runs for these shapes."""
    try:
        loss(
            ops.zeros(_concrete(target_shape), dtype="float32"),
            ops.zeros(_concrete(shape), dtype="float32"),
        )
    except (ValueError, TypeError, RuntimeError):
        return False
    return True


def nonfinite_error(error):
    """The trainers raise their non-finite error themselves: nothing to
    translate."""
    return None


def nonfinite_message(detail):
    return (
        f"Non-finite loss: {detail}. Training stopped before the "
        "optimizer applied this step, so the weights are those of the last "
        "good step. Lower the tap's weight or learning rate, or check its "
        "target."
    )


def with_class_weight(tap_model, dataset, class_weight):
    """`class_weight` with `x` a dataset: a `tf.data.Dataset` is mapped as
    on TensorFlow (TensorFlow must be installed); a PyDataset, generator,
    iterator or torch DataLoader has its batches mapped in NumPy."""
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - TensorFlow is installed here
        tf = None
    if tf is not None and isinstance(dataset, tf.data.Dataset):
        from keras_tap.training.trainers import tensorflow

        return tensorflow.with_class_weight(tap_model, dataset, class_weight)
    return class_weight_data.with_class_weight(
        tap_model, dataset, class_weight
    )
