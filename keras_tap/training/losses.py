"""Losses between a tap's activation and a target activation: `kt.losses`.

The feature losses (`FeatureMSE`, `AttentionTransfer`, `GramMatrix`,
`CosineFeature`, `NST`) and `LogitsKL` live in `feature_losses.py`; this
module adds `Wrapped`, which makes a `Loss` of a loss function or
identifier, and `get`.

Every loss here is a `keras.losses.Loss` called as `loss(target, activation)`
(`y_true` is the target, e.g. the teacher's feature, `y_pred` the student's).
A feature loss's `call` returns one float32 value per sample, so Keras
applies `sample_weight`, the reduction and the distribution scaling itself.
Each such class declares so with the class attribute
`call_returns = "per_sample"`, which a `TapModel` reads to undo Keras's
distribution scaling exactly where Keras applied it. A `Loss` that does not
declare it (`Wrapped`, or one of your own) is checked by the rank of what
its `call` returns: Keras leaves a scalar as it is.
Activations are channels-last: `(batch, ..., channels)`.
"""

import difflib

import keras
from keras import ops

from keras_tap.training import feature_losses
from keras_tap.training.arguments import from_string, same_form
from keras_tap.training.feature_losses import (
    NST,
    AttentionTransfer,
    CosineFeature,
    FeatureMSE,
    GramMatrix,
    LogitsKL,
    _FeatureLoss,
    _per_step_mean,
)

__all__ = [
    "AttentionTransfer",
    "CosineFeature",
    "FeatureMSE",
    "GramMatrix",
    "LogitsKL",
    "NST",
    "Wrapped",
    "get",
]

_PACKAGE = "keras_tap"


_KERAS_ALIASES = ("mse", "mae", "mape", "msle", "kld", "bce")


def _keras_names():
    skip = ("Loss", "get", "serialize", "deserialize")
    names = [n for n in dir(keras.losses) if n[0] != "_" and n not in skip]
    return sorted(names) + list(_KERAS_ALIASES)


def _resolve_keras_function(identifier):
    try:
        obj = keras.losses.get(identifier)
    except ValueError:
        obj = None
    if obj is None:
        valid = sorted(_BY_NAME) + _keras_names()
        valid = same_form(identifier, valid)
        close = difflib.get_close_matches(identifier, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"Unknown loss: {identifier!r}.{hint} Expected a keras_tap loss "
            f"name ({sorted(_BY_NAME)}) or a Keras loss identifier "
            "('mse', 'mae', 'categorical_crossentropy', ...)."
        )
    return obj


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Wrapped(_FeatureLoss):
    """A loss function, or a Keras loss identifier, as a `Loss`.

    The function's values are cast to float32 and averaged over every axis
    but the batch axis, so `call` returns one value per sample and the loss
    reduces with `reduction` (`"sum_over_batch_size"`) and applies
    `sample_weight`, as Keras does for its own losses.

    Args:
        fn: A Keras loss function identifier (`"mse"`,
            `"categorical_crossentropy"`, ...) kept as given for
            serialization, or a callable `fn(y_true, y_pred)`. A callable
            serializes as Keras serializes functions: a lambda does not load
            back in safe mode, a function registered with
            `keras.saving.register_keras_serializable` does.
        name: Optional name for the loss instance. Defaults to the identifier
            or the function's name.
        reduction, dtype: As in `keras.losses.Loss`.

    A function may return a scalar already: `call` returns it as it is, and
    Keras neither reduces nor scales it (`call_returns` is `None`: the
    step reads the rank of what `call` returned).

    Example:

    >>> import numpy as np
    >>> from keras_tap import losses
    >>> loss = losses.Wrapped("mse")
    >>> round(float(loss(np.zeros((2, 3)), np.ones((2, 3)), [1.0, 0.0])), 4)
    0.5
    """

    call_returns = None  # the function may return a scalar already

    def __init__(
        self, fn, name=None, reduction="sum_over_batch_size", dtype=None
    ):
        if isinstance(fn, str):
            function = _resolve_keras_function(fn)
            if isinstance(function, keras.losses.Loss):
                raise ValueError(
                    "Invalid value for argument `fn` of `Wrapped`: expected "
                    f"a loss function identifier, but {fn!r} names a `Loss` "
                    "class; use that class directly."
                )
        elif callable(fn) and not isinstance(fn, type):
            function = fn
        else:
            raise ValueError(
                "Invalid value for argument `fn` of `Wrapped`: expected a "
                f"loss identifier string or a function. Received: fn={fn!r}"
            )
        if name is None:
            name = (
                fn
                if isinstance(fn, str)
                else getattr(fn, "__name__", "wrapped")
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.fn = fn
        self._function = function

    def call(self, y_true, y_pred):
        y_true, y_pred = (
            ops.convert_to_tensor(y_true),
            ops.cast(y_pred, "float32"),
        )
        if keras.backend.is_float_dtype(y_true.dtype):
            y_true = ops.cast(y_true, "float32")
        values = self._function(y_true, y_pred)
        return _per_step_mean(ops.cast(values, "float32"))

    def __repr__(self):
        return f"<Wrapped fn={self.fn!r}>"

    def get_config(self):
        fn = self.fn
        if not isinstance(fn, str):
            fn = keras.saving.serialize_keras_object(fn)
        return {"fn": fn, **super().get_config()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["fn"], dict):
            config["fn"] = keras.saving.deserialize_keras_object(config["fn"])
        return cls(**config)


_CLASSES = (
    AttentionTransfer,
    CosineFeature,
    FeatureMSE,
    GramMatrix,
    LogitsKL,
    NST,
)
_ALIASES = {
    "attention_transfer": AttentionTransfer,
    "cosine_feature": CosineFeature,
    "feature_mse": FeatureMSE,
    "gram_matrix": GramMatrix,
    "logits_kl": LogitsKL,
    "nst": NST,
}
_BY_NAME = {**{cls.__name__: cls for cls in _CLASSES}, **_ALIASES}


def _from_string(identifier):
    found = from_string(identifier, _BY_NAME, _ALIASES, get)
    if found is not None:
        return found
    obj = _resolve_keras_function(identifier)
    if isinstance(obj, keras.losses.Loss):
        return obj
    return Wrapped(identifier)


def get(identifier):
    """Retrieves a loss as a `keras.losses.Loss` from an identifier.

    Args:
        identifier: `None`; a `keras_tap` loss name (class name or snake
            case: `"FeatureMSE"`, `"feature_mse"`, `"nst"`); a Keras loss
            identifier (`"mse"`, `"MeanSquaredError"`, ...); a serialization
            dict from `keras.saving.serialize_keras_object`; a `Loss` class
            or instance; or a loss function `fn(y_true, y_pred)`.

    Returns:
        A `keras.losses.Loss` (`None` for `None`). A name builds the loss with
        its default arguments; Keras function identifiers and functions are
        wrapped in `Wrapped`, which reduces with `"sum_over_batch_size"` and
        accepts `sample_weight`.

    Raises:
        ValueError: if the identifier cannot be interpreted; an unknown name
            lists the closest valid names.

    Example:

    >>> from keras_tap import losses
    >>> losses.get("feature_mse").name
    'feature_mse'
    >>> losses.get("mse")
    <Wrapped fn='mse'>
    """
    if identifier is None:
        return None
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    if isinstance(identifier, str):
        return _from_string(identifier)
    if isinstance(identifier, dict):
        cls = _BY_NAME.get(identifier.get("class_name"))
        modules = (None, __name__, feature_losses.__name__)
        if cls is not None and identifier.get("module") in modules:
            return cls.from_config(identifier.get("config") or {})
        try:
            return get(keras.losses.get(identifier))
        except TypeError as error:  # an unknown class name
            raise ValueError(f"Unknown loss: {error}") from error
    if isinstance(identifier, type):
        if issubclass(identifier, keras.losses.Loss):
            return identifier()
    elif callable(identifier):
        return Wrapped(identifier)
    raise ValueError(
        "Could not interpret loss identifier: expected a name, a "
        "serialization dict, a `keras.losses.Loss` or a function. "
        f"Received: identifier={identifier!r}"
    )
