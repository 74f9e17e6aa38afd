"""The `kt.edits`: what `kt.edit` does to an activation.

Each is a callable `activation -> activation` of the same shape and dtype
(`Zero`, `Scale`, `Add`, `Replace`, `Clamp`, `ProjectOut`); any such
callable is an edit too. `edit.py` applies them while a model runs.
"""

import numpy as np
from keras import ops


def _as(value, like):
    """`value` as a tensor of `like`'s dtype."""
    return ops.cast(ops.convert_to_tensor(value), like.dtype)


class _ShapeError(ValueError):
    """An edit's array that does not broadcast to the activation."""


def _fits(edit, what, value, activation):
    """`value`, raising `_ShapeError` when it does not broadcast to the
    activation's shape (the same `ValueError` on every backend, where the
    backends raise their own errors from inside the layer's call)."""
    have, want = tuple(value.shape), tuple(activation.shape)
    if len(have) > len(want) or not all(
        a is None or b is None or a == 1 or a == b
        for a, b in zip(reversed(have), reversed(want))
    ):
        raise _ShapeError(
            f"the edit {edit!r}: its {what} has shape {have}, which does "
            f"not broadcast to the activation's shape {want}."
        )
    return value


def _masked(edit, edited, activation):
    """`edited` where `edit.where` is true and `activation` elsewhere
    (`edited` alone without a mask), raising `_ShapeError` for a mask that
    does not broadcast to the activation."""
    if edit.where is None:
        return edited
    mask = ops.cast(ops.convert_to_tensor(edit.where), "bool")
    _fits(edit, "where mask", mask, activation)
    return ops.where(mask, edited, activation)


def _repr(edit, *args):
    """`Name(args..., where=<mask>)`, the mask only when there is one."""
    if edit.where is not None:
        args = (*args, "where=<mask>")
    return f"{type(edit).__name__}({', '.join(args)})"


class Edit:
    """Base class of the `kt.edits`: `edit(activation) -> activation`."""

    def __call__(self, activation):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Zero(Edit):
    """Replaces the activation by zeros (ablation).

    Args:
        where: an optional boolean mask, broadcast to the activation: zero
            only where it is true (some heads or positions, say).

    Example:

    >>> import keras, numpy as np, keras_tap as kt
    >>> model = keras.Sequential([keras.Input((2,)),
    ...                           keras.layers.Dense(2, name="d")])
    >>> with kt.edit(model, {"d": kt.edits.Zero()}):
    ...     float(keras.ops.sum(model(np.ones((1, 2)))))
    0.0
    >>> mask = np.array([True, False])  # the first unit only
    >>> with kt.edit(model, {"d": kt.edits.Zero(where=mask)}):
    ...     float(keras.ops.convert_to_numpy(model(np.ones((1, 2))))[0, 0])
    0.0
    """

    def __init__(self, where=None):
        self.where = where

    def __call__(self, activation):
        return _masked(self, ops.zeros_like(activation), activation)

    def __repr__(self):
        return _repr(self)


class Scale(Edit):
    """Multiplies the activation by `factor`.

    Args:
        factor: a number (or a tensor broadcast to the activation).
        where: an optional boolean mask, broadcast to the activation:
            scale only where it is true.
    """

    def __init__(self, factor, where=None):
        self.factor = factor
        self.where = where

    def __call__(self, activation):
        factor = _fits(self, "factor", _as(self.factor, activation),
                       activation)
        return _masked(self, activation * factor, activation)

    def __repr__(self):
        if np.ndim(self.factor):  # An array: its shape, not its values.
            factor = f"<factor of shape {np.shape(self.factor)}>"
        else:
            factor = repr(self.factor)
        return _repr(self, factor)


class Add(Edit):
    """Adds `scale * vector`: a steering vector.

    Args:
        vector: an array broadcast over the activation (a `(channels,)`
            vector is added at every batch element and position).
        scale: a number multiplying `vector`.
        where: an optional boolean mask, broadcast to the activation: add
            only where it is true.
    """

    def __init__(self, vector, scale=1.0, where=None):
        self.vector = vector
        self.scale = scale
        self.where = where

    def __call__(self, activation):
        vector = _fits(self, "vector", _as(self.vector, activation),
                       activation)
        added = activation + vector * _as(self.scale, activation)
        return _masked(self, added, activation)

    def __repr__(self):
        return _repr(self, "<vector>", f"scale={self.scale!r}")


class Replace(Edit):
    """Replaces the activation by `value`: activation patching.

    Args:
        value: the value from another run, with the activation's shape
            (the same batch size).
        where: an optional boolean mask, broadcast to the activation:
            replace only where it is true.

    Raises:
        ValueError: when applied to an activation of another batch size.
    """

    def __init__(self, value, where=None):
        self.value = value
        self.where = where

    def __call__(self, activation):
        value = _as(self.value, activation)
        have, want = tuple(value.shape), tuple(activation.shape)
        if (
            len(have) == len(want)
            and have
            and have[0] is not None
            and want[0] is not None
            and have[0] != want[0]
        ):
            raise ValueError(
                f"Replace: the value has batch size {have[0]} (shape "
                f"{have}), but the activation it replaces has batch size "
                f"{want[0]} (shape {want}). Take the value from a run on "
                "a batch of the same size."
            )
        _fits(self, "value", value, activation)
        return _masked(self, value, activation)

    def __repr__(self):
        return _repr(self, "<value>")


class Clamp(Edit):
    """Clips the activation to `[min, max]` (either bound may be `None`)."""

    def __init__(self, min=None, max=None):
        if min is None and max is None:
            raise ValueError("Clamp: give `min`, `max` or both.")
        self.min = min
        self.max = max

    def __call__(self, activation):
        if self.min is not None:
            activation = ops.maximum(activation, _as(self.min, activation))
        if self.max is not None:
            activation = ops.minimum(activation, _as(self.max, activation))
        return activation

    def __repr__(self):
        return f"Clamp(min={self.min!r}, max={self.max!r})"


class ProjectOut(Edit):
    """Removes a direction: `a - (a . d) d` on the last axis, with
    `d = direction / |direction|`.

    Args:
        direction: a non-zero vector as long as the activation's last axis.

    Raises:
        ValueError: for a zero or non-vector `direction`.
    """

    def __init__(self, direction):
        direction = np.asarray(ops.convert_to_numpy(direction), "float64")
        norm = np.linalg.norm(direction) if direction.ndim == 1 else 0.0
        if direction.ndim != 1 or not norm > 0:
            raise ValueError(
                "ProjectOut: `direction` must be a non-zero vector; "
                f"received shape {direction.shape} and norm {norm}."
            )
        self.direction = direction / norm

    def __call__(self, activation):
        d = _as(self.direction, activation)
        along = ops.sum(activation * d, axis=-1, keepdims=True)
        return activation - along * d

    def __repr__(self):
        return f"ProjectOut(<{self.direction.shape[0]}-vector>)"


# -- applying edits ----------------------------------------------------------
