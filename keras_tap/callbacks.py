"""Callbacks for tapped models: activation statistics during training."""

import contextlib
import difflib

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_tap")
class TapStatisticsMetric(keras.metrics.Metric):
    """Epoch statistics of one tap's activations.

    Its result is a dict, which Keras spreads into the logs:
    `<tap>_mean`, `<tap>_std` (over every element of every sample),
    `<tap>_zero_fraction` (the share of exact zeros: dead ReLU outputs) and
    `<tap>_dead_channels` (channels, on the last axis, that are zero for
    every sample seen). Every accumulator is a sum, so the values are
    exact under a distribution strategy too.

    Args:
        tap: the tap name, the prefix of the logged keys.
        channels: the size of the channel (last) axis.
        name: the metric's name.
    """

    def __init__(self, tap, channels, name=None, dtype="float32"):
        super().__init__(name=name or f"{tap}_statistics", dtype=dtype)
        self.tap = tap
        self.channels = int(channels)
        self.total = self.add_variable((), "zeros", name="total")
        self.squares = self.add_variable((), "zeros", name="squares")
        self.count = self.add_variable((), "zeros", name="count")
        self.zeros = self.add_variable((), "zeros", name="zeros")
        self.activity = self.add_variable(
            (self.channels,), "zeros", name="activity"
        )

    def update_state(self, activation, sample_weight=None):
        a = ops.cast(activation, "float32")
        a = ops.reshape(a, (-1, self.channels))
        rows = ops.shape(a)[0]
        # Column sums as a (1, N) x (N, C) product: one fast pass each on
        # CPUs and GPUs, where a reduction over axis 0 is slower.
        ones = ops.ones((1, rows), dtype="float32")
        sums = ops.matmul(ones, a)[0]
        squares = ops.matmul(ones, ops.square(a))[0]
        self.total.assign_add(ops.sum(sums))
        self.squares.assign_add(ops.sum(squares))
        self.count.assign_add(ops.cast(rows * self.channels, "float32"))
        self.zeros.assign_add(ops.sum(ops.cast(ops.equal(a, 0.0), "float32")))
        # A channel is dead while its sum of squares stays exactly zero.
        self.activity.assign_add(squares)

    def result(self):
        count = ops.maximum(self.count, 1.0)
        mean = self.total / count
        variance = ops.maximum(self.squares / count - mean * mean, 0.0)
        dead = ops.sum(ops.cast(ops.equal(self.activity, 0.0), "float32"))
        return {
            f"{self.tap}_mean": mean,
            f"{self.tap}_std": ops.sqrt(variance),
            f"{self.tap}_zero_fraction": self.zeros / count,
            f"{self.tap}_dead_channels": dead,
        }

    def reset_state(self):
        for variable in self.variables:
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self):
        return {"tap": self.tap, "channels": self.channels, "name": self.name}


class Statistics:
    """The statistics a `TapModel` computes inside its training step."""

    def __init__(self, metrics, every):
        self.metrics = metrics
        self.every = every
        # Hidden during validation, which computes no statistics.
        self.visible = True

    def update(self, taps, step):
        def record():
            for metric in self.metrics:
                metric.update_state(taps[metric.tap])
            return ops.zeros((), "int32")

        if self.every == 1:
            record()
            return
        ops.cond(
            ops.equal(ops.mod(step, self.every), 0),
            record,
            lambda: ops.zeros((), "int32"),
        )


@keras.saving.register_keras_serializable(package="keras_tap")
class TapStatistics(keras.callbacks.Callback):
    """Log the mean, std, zero fraction and dead channels of taps.

    The statistics are computed inside the compiled training step, on the
    batches being trained on and from the step's own forward pass (a
    callback cannot add ops to a compiled step, so this one switches them on
    in the `TapModel`). They appear in History, the progress bar and
    TensorBoard as `<tap>_mean`, `<tap>_std`, `<tap>_zero_fraction` and
    `<tap>_dead_channels`, over each epoch's training batches.

    Args:
        taps: tap names to watch (default: every tap of the model).
        every: compute the statistics on every `every`-th training batch
            only (1: every batch).

    Example:

    ```python
    tap_model.fit(x, y, callbacks=[kt.callbacks.TapStatistics()])
    ```
    """

    def __init__(self, taps=None, every=1):
        super().__init__()
        if isinstance(taps, str):
            taps = [taps]
        if taps is not None and (
            not isinstance(taps, (list, tuple))
            or not taps
            or not all(isinstance(t, str) for t in taps)
        ):
            raise ValueError(
                "TapStatistics `taps` must be None or a non-empty list of "
                f"tap names; received {taps!r}."
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                "TapStatistics `every` must be a positive int (a number of "
                f"batches); received {every!r}."
            )
        self.taps = None if taps is None else list(taps)
        self.every = every

    def _select(self, model):
        names = list(model.tap_names)
        if self.taps is None:
            return names
        for tap in self.taps:
            if tap not in names:
                close = difflib.get_close_matches(tap, names, n=3)
                hint = f" Closest: {close}." if close else ""
                raise ValueError(
                    f"TapStatistics: {tap!r} is not a tap of the model; its "
                    f"taps are {names}.{hint}"
                )
        return list(self.taps)

    def on_train_begin(self, logs=None):
        model = self.model
        if not hasattr(model, "tap_names"):
            raise TypeError(
                "TapStatistics works with a kt.TapModel; the model being "
                f"trained is a {type(model).__name__}."
            )
        shapes = model.tap_shapes()
        selected = self._select(model)
        strategy = getattr(model, "distribute_strategy", None)

        def factory():
            scope = strategy.scope() if strategy is not None else (
                contextlib.nullcontext()
            )
            with scope:
                metrics = [
                    TapStatisticsMetric(name, shapes[name][-1] or 1)
                    for name in selected
                ]
            return Statistics(metrics, self.every)

        model.set_statistics((tuple(selected), self.every), factory)

    def on_train_end(self, logs=None):
        self.model.set_statistics(None)

    def _show(self, visible):
        statistics = getattr(self.model, "_statistics", None)
        if statistics is not None:
            statistics.visible = visible

    def on_test_begin(self, logs=None):
        self._show(False)

    def on_test_end(self, logs=None):
        self._show(True)

    def get_config(self):
        return {"taps": self.taps, "every": self.every}
