"""Schedules for a tap's weight, as functions of the training step.

A schedule maps the step (`optimizer.iterations` before the update: 0 on the
first step) to a non-negative float32 weight. It is computed with `keras.ops`
from the step tensor, so a compiled train step that reads the step from a
variable is traced once while the weight changes.
"""

import math
import numbers

import keras
from keras import ops

__all__ = [
    "Constant",
    "CosineDecay",
    "LinearWarmup",
    "Piecewise",
    "Schedule",
    "get",
]

_PACKAGE = "keras_tap"


def _check_weight(owner, name, value):
    """Returns `value` as a float, or raises a `ValueError` naming it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(
            f"Invalid value for argument `{name}` of `{owner}`: expected a "
            f"non-negative finite number (a weight). Received: {name}={value!r}"
        )
    return float(value)


def _check_steps(owner, name, value):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (ok and value >= 1):
        raise ValueError(
            f"Invalid value for argument `{name}` of `{owner}`: expected an "
            f"integer >= 1. Received: {name}={value!r}"
        )
    return int(value)


def _progress(step, steps):
    """`clip(step / steps, 0, 1)` as float32."""
    return ops.clip(step / float(steps), 0.0, 1.0)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Schedule:
    """Base class of tap-weight schedules.

    Subclasses implement `call(step)`, which receives the step as a float32
    scalar tensor and returns the weight with `keras.ops` (no Python control
    flow on the step), and `get_config()`, which returns their `__init__`
    arguments.

    Returns:
        Called as `schedule(step)`, with `step` a Python int, an integer
        tensor or a variable (e.g. `optimizer.iterations`), a float32 scalar
        tensor.

    Example:

    >>> import keras
    >>> from keras_tap import schedules
    >>> class Halving(schedules.Schedule):
    ...     def __init__(self, every):
    ...         self.every = every
    ...     def call(self, step):
    ...         return 0.5 ** keras.ops.floor(step / self.every)
    ...     def get_config(self):
    ...         return {"every": self.every}
    >>> float(Halving(every=10)(25))
    0.25
    """

    def __call__(self, step):
        step = ops.cast(step, "float32")
        return ops.cast(self.call(step), "float32")

    def call(self, step):
        raise NotImplementedError(
            f"Schedule `{type(self).__name__}` must implement `call(step)`."
        )

    def get_config(self):
        raise NotImplementedError(
            f"Schedule `{type(self).__name__}` must override `get_config()` "
            "in order to be serializable."
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except NotImplementedError:
            args = "..."
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Constant(Schedule):
    """A constant weight.

    Formula: `weight(step) = value`.

    Args:
        value: Non-negative finite float, the weight.

    Returns:
        Called on a step, a float32 scalar tensor.

    Example:

    >>> from keras_tap import schedules
    >>> float(schedules.Constant(0.5)(1000))
    0.5
    """

    def __init__(self, value):
        self.value = _check_weight(type(self).__name__, "value", value)

    def __call__(self, step):
        # At one step, the step is not read: one op, not a cast and a
        # broadcast (each is a dispatch on an eager backend).
        try:
            scalar = len(getattr(step, "shape", ())) == 0
        except ValueError:  # a tensor of unknown rank
            scalar = False
        if scalar:
            return ops.convert_to_tensor(self.value, dtype="float32")
        return super().__call__(step)

    def call(self, step):
        return ops.zeros_like(step) + self.value

    def get_config(self):
        return {"value": self.value}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LinearWarmup(Schedule):
    """A weight that moves linearly from `start` to `end`, then stays.

    Formula: `weight(step) = start + (end - start) * clip(step / steps, 0, 1)`.

    Args:
        start: Non-negative finite float, the weight at step 0.
        end: Non-negative finite float, the weight from step `steps` on.
        steps: Integer >= 1, the length of the ramp.

    Returns:
        Called on a step, a float32 scalar tensor.

    Example:

    >>> from keras_tap import schedules
    >>> float(schedules.LinearWarmup(0.0, 1.0, steps=100)(25))
    0.25
    """

    def __init__(self, start, end, steps):
        owner = type(self).__name__
        self.start = _check_weight(owner, "start", start)
        self.end = _check_weight(owner, "end", end)
        self.steps = _check_steps(owner, "steps", steps)

    def call(self, step):
        return self.start + (self.end - self.start) * _progress(
            step, self.steps
        )

    def get_config(self):
        return {"start": self.start, "end": self.end, "steps": self.steps}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CosineDecay(Schedule):
    """A weight that follows half a cosine from `initial` to `final`.

    As `keras.optimizers.schedules.CosineDecay` with
    `alpha = final / initial`:

    ```
    t = clip(step / steps, 0, 1)
    weight(step) = final + (initial - final) * 0.5 * (1 + cos(pi * t))
    ```

    Args:
        initial: Non-negative finite float, the weight at step 0.
        steps: Integer >= 1, the number of steps of the decay.
        final: Non-negative finite float, the weight from step `steps` on.
            Defaults to `0.0`.

    Returns:
        Called on a step, a float32 scalar tensor.

    Example:

    >>> from keras_tap import schedules
    >>> round(float(schedules.CosineDecay(1.0, steps=100)(50)), 4)
    0.5
    """

    def __init__(self, initial, steps, final=0.0):
        owner = type(self).__name__
        self.initial = _check_weight(owner, "initial", initial)
        self.steps = _check_steps(owner, "steps", steps)
        self.final = _check_weight(owner, "final", final)

    def call(self, step):
        cosine = 0.5 * (1.0 + ops.cos(math.pi * _progress(step, self.steps)))
        return self.final + (self.initial - self.final) * cosine

    def get_config(self):
        return {
            "initial": self.initial,
            "steps": self.steps,
            "final": self.final,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Piecewise(Schedule):
    """A piecewise constant weight.

    As `keras.optimizers.schedules.PiecewiseConstantDecay`:

    ```
    weight(step) = values[0]      if step <= boundaries[0]
                   values[i]      if boundaries[i-1] < step <= boundaries[i]
                   values[-1]     if step > boundaries[-1]
    ```

    Args:
        boundaries: Non-empty list of strictly increasing finite numbers.
        values: List of non-negative finite floats, one more than
            `boundaries`.

    Returns:
        Called on a step, a float32 scalar tensor.

    Example:

    >>> from keras_tap import schedules
    >>> schedule = schedules.Piecewise([10, 20], [1.0, 0.5, 0.0])
    >>> [float(schedule(s)) for s in (10, 11, 20, 21)]
    [1.0, 0.5, 0.5, 0.0]
    """

    def __init__(self, boundaries, values):
        owner = type(self).__name__
        if not isinstance(boundaries, (list, tuple)) or not boundaries:
            raise ValueError(
                f"Invalid value for argument `boundaries` of `{owner}`: "
                "expected a non-empty list of numbers. "
                f"Received: boundaries={boundaries!r}"
            )
        for b in boundaries:
            real = isinstance(b, numbers.Real) and not isinstance(b, bool)
            if not (real and math.isfinite(b)):
                raise ValueError(
                    f"Invalid value for argument `boundaries` of `{owner}`: "
                    f"expected finite numbers. Received: boundaries="
                    f"{boundaries!r}"
                )
        if any(a >= b for a, b in zip(boundaries[:-1], boundaries[1:])):
            raise ValueError(
                f"Invalid value for argument `boundaries` of `{owner}`: "
                "expected strictly increasing numbers. "
                f"Received: boundaries={boundaries!r}"
            )
        if (
            not isinstance(values, (list, tuple))
            or len(values) != len(boundaries) + 1
        ):
            raise ValueError(
                f"Invalid value for argument `values` of `{owner}`: expected "
                f"a list of len(boundaries) + 1 = {len(boundaries) + 1} "
                f"weights. Received: values={values!r}"
            )
        self.boundaries = [
            int(b) if isinstance(b, numbers.Integral) else float(b)
            for b in boundaries
        ]
        self.values = [
            _check_weight(owner, f"values[{i}]", v)
            for i, v in enumerate(values)
        ]

    def call(self, step):
        boundaries = ops.convert_to_tensor(self.boundaries, dtype="float32")
        values = ops.convert_to_tensor(self.values, dtype="float32")
        index = ops.sum(ops.cast(ops.greater(step, boundaries), "int32"))
        return ops.take(values, index)

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values}


_BY_NAME = {
    cls.__name__: cls
    for cls in (Constant, CosineDecay, LinearWarmup, Piecewise)
}


def get(identifier):
    """Retrieves a weight schedule from an identifier.

    Args:
        identifier: A non-negative finite number (a `Constant` weight), a
            `Schedule` instance, or a serialization dict from
            `keras.saving.serialize_keras_object`.

    Returns:
        A `Schedule` instance.

    Raises:
        ValueError: if the identifier is none of these, or is a number that
            is not a valid weight.

    Example:

    >>> from keras_tap import schedules
    >>> schedules.get(0.5)
    Constant(value=0.5)
    """
    if isinstance(identifier, Schedule):
        return identifier
    if isinstance(identifier, numbers.Real) and not isinstance(
        identifier, bool
    ):
        return Constant(identifier)
    if isinstance(identifier, dict):
        cls = _BY_NAME.get(identifier.get("class_name"))
        if cls is not None and identifier.get("module") in (None, __name__):
            return cls.from_config(identifier.get("config") or {})
        try:
            obj = keras.saving.deserialize_keras_object(identifier)
        except TypeError as error:  # an unknown class name
            raise ValueError(f"Unknown schedule: {error}") from error
        if isinstance(obj, Schedule):
            return obj
    raise ValueError(
        "Could not interpret weight schedule identifier: expected a "
        "non-negative number, a `keras_tap.schedules.Schedule` or its "
        f"serialization dict. Received: identifier={identifier!r}"
    )
