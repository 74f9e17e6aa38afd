"""Gradients at taps and Grad-CAM heatmaps, from one forward pass.

`TapModel.gradients(x, target, taps)` runs the model once and
differentiates a per-sample target, summed over the batch, with respect to
the tapped activations. `grad_cam(tap_model, x, tap)` turns the gradients
at a convolutional tap into one heatmap per sample, as keras-io's Grad-CAM
example (`make_gradcam_heatmap`) computes it for one image.

Only `_differentiate` depends on the backend (a `tf.GradientTape`,
`torch.autograd.grad` or `jax.vjp`); the rest is `keras.ops`.
"""

import functools

import keras
import numpy as np
from keras import ops


def _scores(predictions, target):
    """The per-sample target: `(batch,)` scores from `predictions`."""
    if callable(target):
        return target(predictions)
    if not isinstance(predictions, keras.KerasTensor) and not hasattr(
        predictions, "shape"
    ):
        raise ValueError(
            "The model has several outputs, so `target` must be a callable "
            "`predictions -> per-sample scores`; received "
            f"target={target!r}."
        )
    flat = ops.reshape(predictions, (ops.shape(predictions)[0], -1))
    if target is None:
        return ops.max(flat, axis=-1)
    if isinstance(target, (int, np.integer)) and not isinstance(
        target, bool
    ):
        classes = predictions.shape[-1]
        if not -classes <= int(target) < classes:
            raise ValueError(
                f"`target` class index {int(target)} is out of range: the "
                f"predictions have {classes} classes (last axis)."
            )
        return predictions[..., int(target)]
    raise ValueError(
        "`target` must be None (each sample's top score), an integer class "
        "index or a callable `predictions -> per-sample scores`; received "
        f"{target!r}."
    )


def _differentiate(run, inputs, perturb=None):
    """`(outputs, values, grads)`: `run(inputs) -> (outputs, values,
    score)`, and the gradient of `score` with respect to each leaf of
    `values` (zeros where it does not depend on one). `perturb(deltas)`
    adds `deltas[name]` to the value of each tap while the model runs: the
    gradient is taken with respect to these zeros on every backend, so a
    point's gradient is the same on each (for `"b:input"`, the gradient
    through `b` alone, whatever else reads the same tensor)."""
    backend = keras.backend.backend()
    if backend in ("tensorflow", "torch"):
        # The zeros are made when the hook first sees each value, where
        # the autodiff records them (no pass to learn the shapes).
        made = {}

        def lazy(name, watch):
            def delta(value):
                zeros = keras.tree.map_structure(
                    lambda t: watch(ops.zeros_like(t)), value
                )
                made[name] = zeros
                return zeros
            return delta

        if backend == "tensorflow":
            import tensorflow as tf

            def watch(t):
                if t.dtype.is_floating:
                    tape.watch(t)
                return t

            with tf.GradientTape() as tape:
                with perturb(_LazyDeltas(lazy, watch)):
                    outputs, values, score = run(inputs)
            names = list(made)
            found = tape.gradient(
                score, [made[n] for n in names],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
        else:
            import torch

            def watch(t):
                if torch.is_floating_point(t):
                    t.requires_grad_(True)
                return t

            with perturb(_LazyDeltas(lazy, watch)):
                outputs, values, score = run(inputs)
            names = list(made)
            leaves = keras.tree.flatten([made[n] for n in names])
            wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
            grads = [torch.zeros_like(t) for t in leaves]
            if wanted and score.requires_grad:
                got = torch.autograd.grad(
                    score, [leaves[i] for i in wanted], allow_unused=True
                )
                for i, grad in zip(wanted, got):
                    if grad is not None:
                        grads[i] = grad
            found = keras.tree.pack_sequence_as(
                [made[n] for n in names], grads
            )
        grads = dict(zip(names, found))
        return outputs, values, {
            name: grads.get(name, keras.tree.map_structure(
                ops.zeros_like, value))
            for name, value in values.items()
        }
    if backend == "jax":
        import jax

        # JAX differentiates functions, not tensors: a zero added at each
        # tapped point (an edit) is the function's argument.
        def scored(deltas):
            with perturb(deltas):
                outputs, values, score = run(inputs)
            return score, (outputs, values)

        deltas = keras.tree.map_structure(
            lambda s: jax.numpy.zeros(s.shape, s.dtype),
            jax.eval_shape(lambda: run(inputs)[1]),
        )
        grads, (outputs, values) = jax.grad(scored, has_aux=True)(deltas)
        return outputs, values, grads
    raise NotImplementedError(
        f"`gradients` is not implemented for the {backend!r} backend."
    )


class _LazyDeltas:
    """`deltas[name]`: a function making the zeros for the value it is
    given (TensorFlow and PyTorch build them while the model runs)."""

    def __init__(self, lazy, watch):
        self._lazy, self._watch = lazy, watch

    def __getitem__(self, name):
        return self._lazy(name, self._watch)


def _shifted(value, delta):
    if callable(delta):  # made from the value (`_LazyDeltas`)
        delta = delta(value)
    return keras.tree.map_structure(
        lambda a, d: a + ops.cast(d, a.dtype), value, delta
    )


def _perturbation(index, names, points):
    """`perturb(deltas)`: a context manager adding `deltas[name]` to the
    value of each point (through `kt.edit`'s hooks)."""
    from keras_tap.taps import edit, watch

    def perturb(deltas):
        specs, layers, owners = {}, {}, {}
        for name, point in zip(names, points):
            delta = deltas[name]
            calls = index.points.get(point.path, [])
            call = None if len(calls) <= 1 else point.index
            kind, key = edit.suffix_of(point)
            specs.setdefault(id(point.layer), []).append(edit.Spec(
                name, call, kind, key,
                functools.partial(_shifted, delta=delta), structured=True,
            ))
            layers[id(point.layer)] = point.layer
            if point.owner is not None:
                owners[id(point.owner)] = point.owner
        watcher = watch.Watcher(list(layers.values()), explicit=owners.values())
        return edit.EditRecording(watcher, specs, frozenset())

    return perturb


def gradients(tap_model, x, target=None, taps=None):
    """See `TapModel.gradients`."""
    from keras_tap.taps import extract, forward

    names, points = extract._requested(tap_model, taps)
    key = ("gradients", tuple(names))
    run = tap_model._extractors.get(key)
    if run is None:
        if names == tap_model.tap_names:
            run = tap_model._forward
        else:
            run = forward.build(tap_model._index, points, names)
        tap_model._extractors[key] = run

    def score(inputs):
        predictions, values = run(inputs, training=False)
        scores = _scores(predictions, target)
        return predictions, values, ops.sum(scores)

    inputs = keras.tree.map_structure(ops.convert_to_tensor, x)
    perturb = _perturbation(tap_model._index, names, points)
    return _differentiate(score, inputs, perturb)


def grad_cam(tap_model, x, tap, class_index=None):
    """Grad-CAM heatmaps at a convolutional tap, one per sample.

    Each heatmap equals keras-io's `make_gradcam_heatmap` on that sample
    alone: the class is `class_index` or the sample's own top class; the
    channel weights are the class score's gradients at the tap, averaged
    over the sample's spatial positions; the map is
    `relu(sum_c A_c * w_c)` divided by its maximum. A map with no positive
    value is all zeros (never NaN). One forward and one backward pass
    serve the whole batch.

    Args:
        tap_model: a `kt.TapModel` over a model whose predictions are one
            tensor `(batch, classes)`.
        x: a batch of inputs.
        tap: the name of one of `tap_model`'s taps, or a layer path, whose
            activation is `(batch, *spatial, channels)`.
        class_index: `None` (each sample's top class), an integer, or one
            integer per sample.

    Returns:
        A float32 NumPy array `(batch, *spatial)` of heatmaps in `[0, 1]`.

    Raises:
        ValueError: for a tap whose activation has no spatial axes, or a
            `class_index` list of another length than the batch.

    Example:

    >>> import keras, numpy as np, keras_tap as kt
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(),
    ...     keras.layers.Dense(2)])
    >>> maps = kt.attribution.grad_cam(
    ...     kt.TapModel(model, "conv"), np.ones((2, 8, 8, 3)), "conv")
    >>> maps.shape
    (2, 6, 6)
    """
    batch = int(keras.tree.flatten(x)[0].shape[0])
    if class_index is None:
        classes = None
    elif isinstance(class_index, (int, np.integer)):
        classes = np.full((batch,), int(class_index))
    else:
        classes = np.asarray(class_index, dtype="int64").reshape(-1)
        if classes.shape[0] != batch:
            raise ValueError(
                f"`class_index` has {classes.shape[0]} entries for a batch "
                f"of {batch} samples: pass one per sample, an int or None."
            )

    def target(predictions):
        if classes is None:
            chosen = ops.argmax(predictions, axis=-1)
        else:
            chosen = ops.convert_to_tensor(classes)
        picked = ops.take_along_axis(
            predictions, ops.expand_dims(ops.cast(chosen, "int32"), -1),
            axis=-1,
        )
        return picked[:, 0]

    _, values, grads = gradients(tap_model, x, target=target, taps=[tap])
    name = next(iter(values))
    activation = ops.convert_to_numpy(values[name]).astype("float32")
    grad = ops.convert_to_numpy(grads[name]).astype("float32")
    if activation.ndim < 3:
        raise ValueError(
            f"Grad-CAM needs a tap with spatial axes, `(batch, *spatial, "
            f"channels)`; tap {tap!r} has shape {activation.shape}."
        )
    spatial = tuple(range(1, activation.ndim - 1))
    weights = grad.mean(axis=spatial, keepdims=True)
    maps = np.maximum((activation * weights).sum(axis=-1), 0.0)
    peak = maps.max(axis=tuple(range(1, maps.ndim)), keepdims=True)
    safe = np.where(peak > 0, peak, 1.0)
    return np.where(peak > 0, maps / safe, 0.0).astype("float32")
