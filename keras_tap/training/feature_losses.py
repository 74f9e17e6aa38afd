"""The feature losses of `kt.losses`: a tap's activation against a target.

Every loss here is a `keras.losses.Loss` called as `loss(target, activation)`
(`y_true` is the target, e.g. the teacher's feature, `y_pred` the student's).
Its `call` returns one float32 value per sample, shape `(batch,)`, so Keras
applies `sample_weight`, the reduction and the distribution scaling itself;
calling the loss returns that reduction, a float32 scalar by default. Each
class declares so with the class attribute `call_returns = "per_sample"`,
which a `TapModel` reads to undo Keras's distribution scaling exactly where
Keras applied it. A `Loss` of your own that does not declare it is checked
by the rank of what its `call` returns: Keras leaves a scalar as it is.
Activations are channels-last: `(batch, ..., channels)`.
"""

import keras
from keras import ops

from keras_tap.training.arguments import as_float32, check_number

_PACKAGE = "keras_tap"


def _per_step_mean(values):
    """Average every axis after the first two: `(B, T, ...)` -> `(B, T)`.

    Keras reduces the result (a mean over all entries, so the value equals
    the per-sample mean) and applies a `(B, T)` mask carried by a sequence
    activation, which a per-sample value would lose.
    """
    if len(values.shape) <= 2:
        return values
    return ops.mean(values, axis=tuple(range(2, len(values.shape))))


def _positions_by_channels(x):
    """`(B, ..., C)` to `(B, N, C)`, N the number of spatial positions."""
    channels = x.shape[-1] if x.shape[-1] is not None else ops.shape(x)[-1]
    return ops.reshape(x, (ops.shape(x)[0], -1, channels))


def _flatten(x):
    """`(B, ...)` to `(B, prod(...))`."""
    return ops.reshape(x, (ops.shape(x)[0], -1))


def _l2_normalize(x, axis, epsilon):
    # The inner `max(s, eps^2)` keeps the gradient finite at `x == 0`, where
    # `max(sqrt(s), eps)` alone gives `0 * inf = NaN` on JAX and PyTorch
    # (TensorFlow gives 0); the outer one holds if `eps^2` underflows.
    squares = ops.sum(ops.square(x), axis=axis, keepdims=True)
    norm = ops.sqrt(ops.maximum(squares, epsilon * epsilon))
    return x / ops.maximum(norm, epsilon)


class _FeatureLoss(keras.losses.Loss):
    """Forwards `name`, `reduction` and `dtype`, and serializes them."""

    call_returns = "per_sample"

    def __init__(self, name=None, reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._dtype_config = (
            None if dtype is None else keras.dtype_policies.get(dtype).name
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        # `call` may return per-step values `(B, T)` (so that a `(B, T)`
        # mask carried by a sequence activation applies); a per-sample
        # weight `(B,)` then broadcasts as `(B, 1)`.
        if (
            sample_weight is not None
            and len(getattr(y_pred, "shape", ())) >= 3
            and len(getattr(sample_weight, "shape", (0, 0))) == 1
        ):
            sample_weight = ops.expand_dims(sample_weight, -1)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {
            "name": self.name,
            "reduction": self.reduction,
            "dtype": self._dtype_config,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeatureMSE(_FeatureLoss):
    """Mean squared error between features: the FitNets hint loss.

    From "FitNets: Hints for Thin Deep Nets" (Romero et al., ICLR 2015). Per
    sample `b`, with student `s` and target `t`:
    `loss_b = mean_{i != b} (s_{b,i} - t_{b,i})^2`. Put a regressor in the
    tap's `adapter` when the shapes differ.

    Args:
        name: Optional name for the loss instance.
        reduction, dtype: As in `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> from keras_tap import losses
    >>> t, s = np.zeros((2, 4, 4, 3)), np.ones((2, 4, 4, 3))
    >>> round(float(losses.FeatureMSE()(t, s)), 4)
    1.0
    """

    def __init__(
        self, name="feature_mse", reduction="sum_over_batch_size", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        t = as_float32(y_true, type(self).__name__, 1)
        s = as_float32(y_pred, type(self).__name__, 1)
        return _per_step_mean(ops.mean(ops.square(s - t), axis=-1))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AttentionTransfer(_FeatureLoss):
    """Activation-based attention transfer (Zagoruyko & Komodakis, 2017).

    From "Paying More Attention to Attention" (ICLR 2017). The attention map
    of an activation `A` of shape `(B, H, W, C)` (or `(B, L, C)`) sums the
    channels, `Q = sum_c |A_c|^p`, flattened per sample and L2-normalised:

    ```
    q = Q / max(||Q||_2, eps)                 # eps = keras.config.epsilon()
    loss_b = ||q_s - q_t||_2                  # per sample b
    ```

    The paper's `beta / 2` factor is the tap's `weight`. Student and target
    need the same spatial size; their channel counts may differ.

    Args:
        p: Exponent of the attention map, a finite float >= 1 (below 1 the
            gradient at zero activations is infinite). Defaults to `2`.
        name: Optional name for the loss instance.
        reduction, dtype: As in `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> from keras_tap import losses
    >>> t = np.ones((2, 4, 4, 8))
    >>> s = 3 * np.ones((2, 4, 4, 16))  # same attention, other channels
    >>> round(float(losses.AttentionTransfer()(t, s)), 4)
    0.0
    """

    def __init__(
        self,
        p=2,
        name="attention_transfer",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.p = check_number(type(self).__name__, "p", p, minimum=1.0)

    def _attention(self, x):
        x = as_float32(x, type(self).__name__, 3)
        q = _flatten(ops.sum(ops.power(ops.abs(x), self.p), axis=-1))
        return _l2_normalize(q, -1, keras.config.epsilon())

    def call(self, y_true, y_pred):
        diff = self._attention(y_pred) - self._attention(y_true)
        tiny = keras.config.epsilon() ** 2  # finite gradient at diff == 0
        return ops.sqrt(ops.maximum(ops.sum(ops.square(diff), axis=-1), tiny))

    def get_config(self):
        return {"p": self.p, **super().get_config()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GramMatrix(_FeatureLoss):
    """Style loss between Gram matrices (Gatys et al., 2015).

    From "A Neural Algorithm of Artistic Style". Per sample, the features
    `F` of shape `(N, C)`, with `N = H * W` spatial positions, give
    `G = F^T F / (N * C)` and

    ```
    loss_b = mean_{i, j} (G_s - G_t)_{ij}^2      # over the C x C entries
           = sum_{i, j} (F_s^T F_s - F_t^T F_t)_{ij}^2 / (N^2 C^4)
    ```

    keras-io's neural style transfer `style_loss` divides the same summed
    squared difference of unnormalised Gram matrices by
    `4 * channels^2 * size^2`; with `channels = C` and `size = N` it is
    this loss times `C^2 / 4`. (That example fixes `channels = 3` and
    `size` to the image's pixel count at every layer: its value is this
    loss times `C^4 N^2 / (36 size^2)`.)

    Args:
        name: Optional name for the loss instance.
        reduction, dtype: As in `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> from keras_tap import losses
    >>> t, s = np.zeros((1, 2, 2, 1)), np.ones((1, 2, 2, 1))
    >>> round(float(losses.GramMatrix()(t, s)), 4)  # G_s = 4 / 4
    1.0
    """

    def __init__(
        self, name="gram_matrix", reduction="sum_over_batch_size", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def _gram(self, x):
        f = _positions_by_channels(as_float32(x, type(self).__name__, 2))
        size = ops.cast(ops.shape(f)[1] * ops.shape(f)[2], "float32")
        return ops.matmul(ops.transpose(f, (0, 2, 1)), f) / size

    def call(self, y_true, y_pred):
        diff = self._gram(y_pred) - self._gram(y_true)
        return ops.mean(ops.square(diff), axis=(1, 2))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CosineFeature(_FeatureLoss):
    """One minus the cosine similarity of flattened features.

    Per sample, with `s` and `t` flattened to vectors:

    ```
    loss_b = 1 - (s / max(||s||_2, eps)) . (t / max(||t||_2, eps))
    ```

    Args:
        epsilon: Positive finite float, the smallest norm a vector is divided
            by. Defaults to `None`, meaning `keras.config.epsilon()`.
        name: Optional name for the loss instance.
        reduction, dtype: As in `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> from keras_tap import losses
    >>> t = np.array([[1.0, 0.0], [1.0, 0.0]])
    >>> s = np.array([[2.0, 0.0], [0.0, 1.0]])
    >>> round(float(losses.CosineFeature()(t, s)), 4)  # (0 + 1) / 2
    0.5
    """

    def __init__(
        self,
        epsilon=None,
        name="cosine_feature",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if epsilon is not None:
            epsilon = check_number(
                type(self).__name__, "epsilon", epsilon, strict=True
            )
        self.epsilon = epsilon

    def call(self, y_true, y_pred):
        eps = keras.config.epsilon() if self.epsilon is None else self.epsilon
        t = _flatten(as_float32(y_true, type(self).__name__, 1))
        s = _flatten(as_float32(y_pred, type(self).__name__, 1))
        cosine = ops.sum(
            _l2_normalize(s, -1, eps) * _l2_normalize(t, -1, eps), axis=-1
        )
        return 1.0 - cosine

    def get_config(self):
        return {"epsilon": self.epsilon, **super().get_config()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LogitsKL(_FeatureLoss):
    """Soft-target distillation: KL divergence of temperature-softened logits.

    From "Distilling the Knowledge in a Neural Network" (Hinton et al.,
    2015), as keras-io's "Knowledge Distillation" example computes it. With
    teacher logits `t`, student logits `s` (last axis: the classes) and
    `p = softmax(t / T)`, `q = softmax(s / T)`:

    ```
    loss_b = T^2 * sum_k p_k * (log p_k - log q_k)
    ```

    The `T^2` keeps the gradients' scale independent of `T`. Tap the
    logits (before any softmax) of the student and the teacher. A Keras
    `"kl_divergence"` on logits does not do this: it expects
    probabilities and clips logits into `[eps, 1]`, silently.

    Args:
        temperature: The softening temperature `T`, a finite float > 0.
            Defaults to `1.0`.
        name: Optional name for the loss instance.
        reduction, dtype: As in `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> from keras_tap import losses
    >>> t = np.array([[2.0, 0.0, -1.0]])
    >>> round(float(losses.LogitsKL(temperature=3.0)(t, t)), 4)
    0.0
    """

    def __init__(
        self,
        temperature=1.0,
        name="logits_kl",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = check_number(
            type(self).__name__, "temperature", temperature, strict=True
        )

    def call(self, y_true, y_pred):
        t = as_float32(y_true, type(self).__name__, 2) / self.temperature
        s = as_float32(y_pred, type(self).__name__, 2) / self.temperature
        log_p = ops.log_softmax(t, axis=-1)
        log_q = ops.log_softmax(s, axis=-1)
        kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        return _per_step_mean(kl * self.temperature**2)

    def get_config(self):
        return {"temperature": self.temperature, **super().get_config()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NST(_FeatureLoss):
    """Neuron selectivity transfer: MMD between channel distributions.

    From "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer" (Huang & Wang, 2017). Per sample, each channel's flattened map
    is one sample of a distribution, L2-normalised (`eps =
    keras.config.epsilon()`): `s_i` for the `C_s` student channels, `t_j` for
    the `C_t` target channels. With the polynomial kernel
    `k(x, y) = (x . y + constant)^degree`:

    ```
    loss_b = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j')
             - 2 * mean_{i,j} k(s_i, t_j)          # squared MMD
    ```

    Student and target need the same spatial size; their channel counts may
    differ.

    Args:
        degree: Positive integer, the kernel's degree. Defaults to `2`.
        constant: Non-negative finite float added to the dot product.
            Defaults to `0.0`.
        name: Optional name for the loss instance.
        reduction, dtype: As in `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> from keras_tap import losses
    >>> t = np.random.default_rng(0).normal(size=(2, 4, 4, 8))
    >>> round(float(losses.NST()(t, t)), 4)
    0.0
    """

    def __init__(
        self,
        degree=2,
        constant=0.0,
        name="nst",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.degree = check_number(
            "NST", "degree", degree, minimum=1, integer=True
        )
        self.constant = check_number("NST", "constant", constant)

    def _channels(self, x):
        x = _positions_by_channels(as_float32(x, type(self).__name__, 3))
        x = ops.transpose(x, (0, 2, 1))  # (B, C, N)
        return _l2_normalize(x, -1, keras.config.epsilon())

    def _kernel(self, a, b):
        dot = ops.matmul(a, ops.transpose(b, (0, 2, 1))) + self.constant
        return ops.mean(ops.power(dot, self.degree), axis=(1, 2))

    def call(self, y_true, y_pred):
        s, t = self._channels(y_pred), self._channels(y_true)
        return (
            self._kernel(s, s) + self._kernel(t, t) - 2.0 * self._kernel(s, t)
        )

    def get_config(self):
        return {
            "degree": self.degree,
            "constant": self.constant,
            **super().get_config(),
        }
