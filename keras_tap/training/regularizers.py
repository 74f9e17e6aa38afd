"""Activity regularizers for the raw activation of a tap.

Every regularizer here is a `keras.regularizers.Regularizer` whose value is a
float32 scalar defined as a **batch mean** (or as a statistic of the batch):
it does not grow with the batch size. Each class declares so with the class
attribute `reduction = "batch_mean"`, and a `TapModel` uses its value as it
is. A Keras `Regularizer` without it is taken as a sum over the batch (as
`keras.regularizers.L2` is) and divided by the batch size; a subclass of your
own that is a batch mean sets `reduction = "batch_mean"` too. When one is
set as a layer's `activity_regularizer`, Keras divides it by the batch size
once more.

Activations are `(batch, channels)` or channels-last `(batch, ..., channels)`.
All reductions run in float32, so float16 activations (mixed precision) do not
overflow.
"""

import difflib

import keras
from keras import ops

from keras_tap.training.arguments import (
    as_float32,
    check_number,
    from_string,
    same_form,
)
from keras_tap.training.moments import (
    centred,
    check_cross_replica,
    count,
    replica_sum,
)

__all__ = [
    "ActivityL1",
    "ActivityL2",
    "DeCov",
    "KLSparsity",
    "Orthogonality",
    "VarianceCovariance",
    "get",
]

_PACKAGE = "keras_tap"


def _per_sample_sum(values):
    if len(values.shape) == 1:
        return values
    return ops.sum(values, axis=tuple(range(1, len(values.shape))))


def _samples_by_channels(x):
    """Flattens every axis but the last: `(N, C)` with N = batch * spatial."""
    channels = x.shape[-1] if x.shape[-1] is not None else ops.shape(x)[-1]
    return ops.reshape(x, (-1, channels))


def _off_diagonal(matrix):
    return matrix - ops.diag(ops.diagonal(matrix))


def _count(features, axis):
    return ops.cast(ops.shape(features)[axis], "float32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActivityL1(keras.regularizers.Regularizer):
    """L1 penalty on an activation, as a mean over the batch.

    Formula: `l1 * mean_b(sum_{i != b} |x_{b,i}|)`.

    Args:
        l1: Non-negative finite float, the penalty factor. Defaults to `0.01`.

    Returns:
        Called on an activation, a float32 scalar.

    Example:

    >>> import numpy as np
    >>> from keras_tap import regularizers
    >>> reg = regularizers.ActivityL1(l1=0.5)
    >>> round(float(reg(np.ones((4, 3)))), 4)
    1.5
    """

    reduction = "batch_mean"

    def __init__(self, l1=0.01):
        self.l1 = check_number(type(self).__name__, "l1", l1)

    def __call__(self, x):
        x = as_float32(x, type(self).__name__, 1)
        return self.l1 * ops.mean(_per_sample_sum(ops.abs(x)))

    def get_config(self):
        return {"l1": self.l1}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActivityL2(keras.regularizers.Regularizer):
    """Squared L2 penalty on an activation, as a mean over the batch.

    Formula: `l2 * mean_b(sum_{i != b} x_{b,i}^2)`.

    Args:
        l2: Non-negative finite float, the penalty factor. Defaults to `0.01`.

    Returns:
        Called on an activation, a float32 scalar.

    Example:

    >>> import numpy as np
    >>> from keras_tap import regularizers
    >>> reg = regularizers.ActivityL2(l2=0.5)
    >>> round(float(reg(2 * np.ones((4, 3)))), 4)
    6.0
    """

    reduction = "batch_mean"

    def __init__(self, l2=0.01):
        self.l2 = check_number(type(self).__name__, "l2", l2)

    def __call__(self, x):
        x = as_float32(x, type(self).__name__, 1)
        return self.l2 * ops.mean(_per_sample_sum(ops.square(x)))

    def get_config(self):
        return {"l2": self.l2}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class KLSparsity(keras.regularizers.Regularizer):
    """KL-divergence sparsity penalty for sigmoid-range activations.

    The mean activation of unit `j` over the batch (and spatial positions),
    `rho_hat_j`, is pulled towards the target rate `rho` (sparse
    autoencoders, Ng 2011):

    ```
    rho_hat_j = clip(mean_n x_{n,j}, eps, 1 - eps)
    penalty = beta * sum_j [rho * log(rho / rho_hat_j)
                            + (1 - rho) * log((1 - rho) / (1 - rho_hat_j))]
    ```

    with `eps = keras.config.epsilon()`.

    Args:
        rho: Target activation rate, a float in `(0, 1)`. Defaults to `0.05`.
        beta: Non-negative finite float, the penalty factor. Defaults to
            `1.0`.
        cross_replica: Whether the batch moments span every replica of a
            distribution strategy (`keras_tap.training.moments`), equal to
            one device. Defaults to `False`: each replica's own batch.

    Returns:
        Called on an activation of rank >= 2, a float32 scalar.

    Example:

    >>> import numpy as np
    >>> from keras_tap import regularizers
    >>> reg = regularizers.KLSparsity(rho=0.5)
    >>> round(float(reg(np.full((4, 3), 0.5))), 4)
    0.0
    """

    reduction = "batch_mean"

    def __init__(self, rho=0.05, beta=1.0, cross_replica=False):
        owner = type(self).__name__
        self.cross_replica = check_cross_replica(owner, cross_replica)
        rho = check_number(owner, "rho", rho, strict=True)
        if rho >= 1.0:
            raise ValueError(
                f"Invalid value for argument `rho` of `{owner}`: expected a "
                f"target rate in (0, 1). Received: rho={rho!r}"
            )
        self.rho = rho
        self.beta = check_number(owner, "beta", beta)

    def __call__(self, x):
        x = as_float32(x, type(self).__name__, 2)
        eps = keras.config.epsilon()
        h, cross = _samples_by_channels(x), self.cross_replica
        rho_hat = replica_sum(ops.sum(h, axis=0), cross) / count(h, cross)
        rho_hat = ops.clip(rho_hat, eps, 1.0 - eps)
        rho = self.rho
        kl = rho * ops.log(rho / rho_hat) + (1.0 - rho) * ops.log(
            (1.0 - rho) / (1.0 - rho_hat)
        )
        return self.beta * ops.sum(kl)

    def get_config(self):
        return {
            "rho": self.rho,
            "beta": self.beta,
            "cross_replica": self.cross_replica,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DeCov(keras.regularizers.Regularizer):
    """DeCov penalty on the cross-covariance of features (Cogswell et al.).

    From "Reducing Overfitting in Deep Networks by Decorrelating
    Representations" (ICLR 2016). With features `h` of shape `(N, C)` (for
    rank > 2 every axis but the last is flattened into the N samples):

    ```
    C_ij = 1/N * sum_n (h_ni - mu_i) * (h_nj - mu_j)
    penalty = weight * 0.5 * (||C||_F^2 - ||diag(C)||_2^2)
    ```

    Args:
        weight: Non-negative finite float, the penalty factor. Defaults to
            `1.0`.
        cross_replica: Whether the batch moments span every replica of a
            distribution strategy (`keras_tap.training.moments`), equal to
            one device. Defaults to `False`: each replica's own batch.

    Returns:
        Called on an activation of rank >= 2, a float32 scalar.

    Example:

    >>> import numpy as np
    >>> from keras_tap import regularizers
    >>> x = np.array([[1.0, 1.0], [-1.0, -1.0]])
    >>> round(float(regularizers.DeCov()(x)), 4)
    1.0
    """

    reduction = "batch_mean"

    def __init__(self, weight=1.0, cross_replica=False):
        owner = type(self).__name__
        self.weight = check_number(owner, "weight", weight)
        self.cross_replica = check_cross_replica(owner, cross_replica)

    def __call__(self, x):
        h = _samples_by_channels(as_float32(x, type(self).__name__, 2))
        h, n = centred(h, self.cross_replica)
        cov = replica_sum(ops.matmul(ops.transpose(h), h), self.cross_replica)
        cov = cov / n
        return self.weight * 0.5 * ops.sum(ops.square(_off_diagonal(cov)))

    def get_config(self):
        return {"weight": self.weight, "cross_replica": self.cross_replica}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Orthogonality(keras.regularizers.Regularizer):
    """Penalty on the correlation between feature channels.

    With features of shape `(N, C)` (every axis but the last flattened into
    the N samples), each channel column is centred and L2-normalised,
    `z_j = (h_j - mean(h_j)) / max(||h_j - mean(h_j)||_2, eps)` with
    `eps = keras.config.epsilon()`, and

    ```
    R = Z^T Z                       # C x C correlation matrix
    penalty = weight * sum_{i != j} R_ij^2 / (C * (C - 1))
    ```

    i.e. the mean squared off-diagonal correlation (0 when `C == 1`).

    Args:
        weight: Non-negative finite float, the penalty factor. Defaults to
            `1.0`.
        cross_replica: Whether the batch moments span every replica of a
            distribution strategy (`keras_tap.training.moments`), equal to
            one device. Defaults to `False`: each replica's own batch.

    Returns:
        Called on an activation of rank >= 2, a float32 scalar.

    Example:

    >>> import numpy as np
    >>> from keras_tap import regularizers
    >>> x = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    >>> round(float(regularizers.Orthogonality()(x)), 4)
    1.0
    """

    reduction = "batch_mean"

    def __init__(self, weight=1.0, cross_replica=False):
        owner = type(self).__name__
        self.weight = check_number(owner, "weight", weight)
        self.cross_replica = check_cross_replica(owner, cross_replica)

    def __call__(self, x):
        h = _samples_by_channels(as_float32(x, type(self).__name__, 2))
        h, _ = centred(h, self.cross_replica)
        squares = ops.sum(ops.square(h), axis=0, keepdims=True)
        # `sqrt(max(s, eps^2))` equals `max(sqrt(s), eps)`, with a finite
        # gradient for a constant channel (`s == 0`): there the other form
        # gives `0 * inf = NaN` on JAX and PyTorch (TensorFlow gives 0).
        epsilon = keras.config.epsilon()
        squares = replica_sum(squares, self.cross_replica)
        z = h / ops.sqrt(ops.maximum(squares, epsilon * epsilon))
        corr = replica_sum(ops.matmul(ops.transpose(z), z), self.cross_replica)
        channels = _count(h, 1)
        pairs = ops.maximum(channels * (channels - 1.0), 1.0)
        return self.weight * ops.sum(ops.square(_off_diagonal(corr))) / pairs

    def get_config(self):
        return {"weight": self.weight, "cross_replica": self.cross_replica}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class VarianceCovariance(keras.regularizers.Regularizer):
    """Variance and covariance terms of VICReg (Bardes et al., ICLR 2022).

    From "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning". With features `h` of shape `(N, C)` (every
    axis but the last flattened into the N samples) and the unbiased
    covariance `K = (h - mu)^T (h - mu) / max(N - 1, 1)`:

    ```
    v = mean_j relu(gamma - sqrt(K_jj + epsilon))
    c = sum_{i != j} K_ij^2 / C
    penalty = variance_weight * v + covariance_weight * c
    ```

    Args:
        variance_weight: Non-negative finite float, factor of `v`.
            Defaults to `1.0`.
        covariance_weight: Non-negative finite float, factor of `c`.
            Defaults to `1.0`.
        gamma: Non-negative finite float, the target standard deviation.
            Defaults to `1.0`.
        epsilon: Positive finite float added to the variance under the
            square root. Defaults to `1e-4`.
        cross_replica: Whether the batch moments span every replica of a
            distribution strategy (`keras_tap.training.moments`), equal to
            one device. Defaults to `False`: each replica's own batch.

    Returns:
        Called on an activation of rank >= 2, a float32 scalar.

    Example:

    >>> import numpy as np
    >>> from keras_tap import regularizers
    >>> reg = regularizers.VarianceCovariance(covariance_weight=0.0)
    >>> round(float(reg(np.zeros((4, 3)))), 2)  # collapsed features
    0.99
    """

    reduction = "batch_mean"

    def __init__(
        self,
        variance_weight=1.0,
        covariance_weight=1.0,
        gamma=1.0,
        epsilon=1e-4,
        cross_replica=False,
    ):
        owner = type(self).__name__
        self.cross_replica = check_cross_replica(owner, cross_replica)
        self.variance_weight = check_number(
            owner, "variance_weight", variance_weight
        )
        self.covariance_weight = check_number(
            owner, "covariance_weight", covariance_weight
        )
        self.gamma = check_number(owner, "gamma", gamma)
        self.epsilon = check_number(owner, "epsilon", epsilon, strict=True)

    def __call__(self, x):
        h = _samples_by_channels(as_float32(x, type(self).__name__, 2))
        h, n = centred(h, self.cross_replica)
        cov = replica_sum(ops.matmul(ops.transpose(h), h), self.cross_replica)
        cov = cov / ops.maximum(n - 1.0, 1.0)
        std = ops.sqrt(ops.diagonal(cov) + self.epsilon)
        variance = ops.mean(ops.relu(self.gamma - std))
        covariance = ops.sum(ops.square(_off_diagonal(cov))) / _count(h, 1)
        return (
            self.variance_weight * variance
            + self.covariance_weight * covariance
        )

    def get_config(self):
        return {
            "variance_weight": self.variance_weight,
            "covariance_weight": self.covariance_weight,
            "gamma": self.gamma,
            "epsilon": self.epsilon,
            "cross_replica": self.cross_replica,
        }


_CLASSES = (
    ActivityL1,
    ActivityL2,
    DeCov,
    KLSparsity,
    Orthogonality,
    VarianceCovariance,
)
_ALIASES = {
    "activity_l1": ActivityL1,
    "activity_l2": ActivityL2,
    "decov": DeCov,
    "kl_sparsity": KLSparsity,
    "orthogonality": Orthogonality,
    "variance_covariance": VarianceCovariance,
    "vicreg": VarianceCovariance,
}
_BY_NAME = {**{cls.__name__: cls for cls in _CLASSES}, **_ALIASES}


def _from_string(identifier):
    found = from_string(identifier, _BY_NAME, _ALIASES, get)
    if found is not None:
        return found
    keras_classes = _keras_regularizers()
    if identifier in keras_classes:
        return keras_classes[identifier]()
    valid = sorted(_BY_NAME) + sorted(keras_classes)
    valid = same_form(identifier, valid)
    close = difflib.get_close_matches(identifier, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(
        f"Unknown regularizer: {identifier!r}.{hint} Expected a keras_tap "
        f"regularizer name ({sorted(_BY_NAME)}) or a Keras one "
        f"({sorted(keras_classes)})."
    )


def _keras_regularizers():
    """Public Keras regularizer classes by name, aliases included."""
    base = keras.regularizers.Regularizer
    found = {}
    for name in dir(keras.regularizers):
        obj = getattr(keras.regularizers, name)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base:
            found[name] = obj
    return found


def get(identifier):
    """Retrieves a regularizer from an identifier.

    Args:
        identifier: `None`; a name, either of a `keras_tap` regularizer (class
            name or snake case: `"DeCov"`, `"decov"`, `"kl_sparsity"`) or of a
            Keras one (`"l1"`, `"l2"`, `"l1_l2"`); a serialization dict from
            `keras.saving.serialize_keras_object`; a `Regularizer` class or
            instance; or a callable of the activation.

    Returns:
        A `Regularizer` instance or the callable itself (`None` for `None`).
        A name builds the regularizer with its default arguments.

    Raises:
        ValueError: if the identifier cannot be interpreted; an unknown name
            lists the closest valid names.

    Example:

    >>> from keras_tap import regularizers
    >>> regularizers.get("decov").get_config()
    {'weight': 1.0}
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        return _from_string(identifier)
    if isinstance(identifier, dict):
        cls = _BY_NAME.get(identifier.get("class_name"))
        if cls is not None and identifier.get("module") in (None, __name__):
            return cls.from_config(identifier.get("config") or {})
        try:
            return keras.regularizers.get(identifier)
        except TypeError as error:  # an unknown class name
            raise ValueError(f"Unknown regularizer: {error}") from error
    elif isinstance(identifier, type):
        if issubclass(identifier, keras.regularizers.Regularizer):
            return identifier()
    elif callable(identifier):
        return identifier
    raise ValueError(
        "Could not interpret regularizer identifier: expected a name, a "
        "serialization dict, a `keras.regularizers.Regularizer` or a "
        f"callable. Received: identifier={identifier!r}"
    )
