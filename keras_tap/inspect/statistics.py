"""Tap statistics computed inside the training step.

`kt.callbacks.TapStatistics` switches them on; `StatisticsMixin` gives
`TapModel` the switch, and `TapStatisticsMetric` accumulates one tap's
statistics over an epoch.
"""

import keras
from keras import ops

STATISTICS = ("mean", "std", "zero_fraction", "dead_channels")


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
        """Add a batch of activations; `sample_weight`, a scalar 0 or 1,
        counts the batch or not (the step's `every`, without a branch)."""
        a = ops.cast(activation, "float32")
        a = ops.reshape(a, (-1, self.channels))
        rows = ops.shape(a)[0]
        # Column sums as a (1, N) x (N, C) product: one fast pass each on
        # CPUs and GPUs, where a reduction over axis 0 is slower.
        ones = ops.ones((1, rows), dtype="float32")
        sums = ops.matmul(ones, a)[0]
        squares = ops.matmul(ones, ops.square(a))[0]
        zeros = ops.sum(ops.cast(ops.equal(a, 0.0), "float32"))
        count = ops.cast(rows * self.channels, "float32")
        if sample_weight is not None:
            w = ops.cast(sample_weight, "float32")
            sums, squares, zeros, count = (
                sums * w, squares * w, zeros * w, count * w
            )
        self.total.assign_add(ops.sum(sums))
        self.squares.assign_add(ops.sum(squares))
        self.count.assign_add(count)
        self.zeros.assign_add(zeros)
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
    """The statistics a `TapModel` computes inside its training step.

    The step updates `metrics` (`TapStatisticsMetric`s, which are not among
    `model.metrics`); `kt.callbacks.TapStatistics` resets them at each
    epoch's start and writes their results into the epoch's logs.
    """

    def __init__(self, metrics, every):
        self.metrics = metrics
        self.every = every

    @property
    def keys(self):
        """The log keys of the statistics (`<tap>_mean`, ...)."""
        return [
            f"{m.tap}_{stat}" for m in self.metrics for stat in STATISTICS
        ]

    @property
    def variables(self):
        """The accumulators of every tap's statistics."""
        return [v for m in self.metrics for v in m.variables]

    def update(self, taps, step):
        def record():
            for metric in self.metrics:
                metric.update_state(taps[metric.tap])
            return ops.zeros((), "int32")

        if self.every == 1:
            record()
            return
        if keras.backend.backend() == "jax":
            # A JAX step is stateless: a branch cannot assign the
            # accumulators, so every step adds its batch, counted 0 or 1.
            counted = ops.equal(ops.mod(step, self.every), 0)
            for metric in self.metrics:
                metric.update_state(taps[metric.tap], sample_weight=counted)
            return
        ops.cond(
            ops.equal(ops.mod(step, self.every), 0),
            record,
            lambda: ops.zeros((), "int32"),
        )


class StatisticsMixin:
    """The statistics switch of `TapModel`."""

    @property
    def metrics_variables(self):
        """Keras's metrics variables, then the statistics accumulators: a
        stateless (JAX) step threads them through its state as it does
        the metrics'. `reset_metrics` leaves them to `TapStatistics`."""
        variables = super().metrics_variables
        statistics = getattr(self, "_statistics", None)
        if statistics is not None:
            variables = variables + statistics.variables
        return variables

    def init_statistics(self):
        object.__setattr__(self, "_statistics", None)
        object.__setattr__(self, "_statistics_key", None)

    def set_statistics(self, key=None, factory=None):
        """Switch in-step tap statistics on or off.

        `key` names a statistics set (`None`: off) and `factory()` builds
        it. Only a change of the set rebuilds the train function (Keras's
        `make_train_function(force=True)`), so fits with the same set reuse
        the traced step.

        Returns:
            The active `Statistics`, or `None`.
        """
        if key != self._statistics_key:
            statistics = factory() if key is not None else None
            object.__setattr__(self, "_statistics", statistics)
            object.__setattr__(self, "_statistics_key", key)
            if self.train_function is not None:
                self.make_train_function(force=True)
        return self._statistics

    def prepare_statistics(self, callbacks, verbose="auto"):
        """Switch the statistics for a `fit` with `callbacks`, before Keras
        builds its train function.

        The `TapStatistics` callbacks go first, so that every other
        callback (TensorBoard, CSVLogger, History) sees the statistics they
        write into the epoch's logs; the progress bar leaves them out.

        Returns:
            The callbacks to pass to Keras's `fit`.
        """
        from keras_tap.inspect.callbacks import TapStatistics

        found = [c for c in callbacks if isinstance(c, TapStatistics)]
        if len(found) > 1:
            raise ValueError(
                "`fit` takes one kt.callbacks.TapStatistics; received "
                f"{len(found)}. Give one the list of taps to watch."
            )
        if not found:
            self.set_statistics(None)
            return callbacks
        statistics = self.set_statistics(*found[0].statistics_set(self))
        others = [c for c in callbacks if c is not found[0]]
        shows = verbose != 0 and not any(
            isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks
        )
        if shows:
            others.append(ProgbarLogger(hidden=statistics.keys))
        return [found[0]] + others


class ProgbarLogger(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, without the keys in `hidden` (the tap
    statistics, which go to History, TensorBoard and the plots)."""

    async_safe = True

    def __init__(self, hidden=()):
        super().__init__()
        self.hidden = set(hidden)

    def _visible(self, logs):
        if not logs:
            return logs
        return {k: v for k, v in logs.items() if k not in self.hidden}

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, self._visible(logs))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, self._visible(logs))
