"""Tap statistics computed inside the training step.

`kt.callbacks.TapStatistics` switches them on; `StatisticsMixin` gives
`TapModel` the switch, and `TapStatisticsMetric` accumulates one tap's
statistics over an epoch.
"""

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


class StatisticsMixin:
    """The statistics switch of `TapModel`."""

    def init_statistics(self):
        object.__setattr__(self, "_statistics", None)
        object.__setattr__(self, "_statistics_key", None)
        object.__setattr__(self, "_statistics_cache", {})

    def set_statistics(self, key=None, factory=None):
        """Switch in-step tap statistics on or off.

        `kt.callbacks.TapStatistics` calls this: `key` names a statistics
        set (`None`: off) and `factory()` builds it the first time. The
        train function of every set is kept, so switching back and forth
        between fits does not retrace; `compile` makes them stale.
        """
        cache = self._statistics_cache
        current = self._statistics_key
        if key == current:
            return
        kept = cache.get(current, (None, None))[1]
        if kept is not None and kept is not self.train_function:
            # Keras rebuilt the train function (after `compile`): the kept
            # ones hold the old optimizer and losses.
            cache = {k: (stats, None) for k, (stats, _) in cache.items()}
            object.__setattr__(self, "_statistics_cache", cache)
        cache[current] = (self._statistics, self.train_function)
        if key not in cache:
            cache[key] = (factory() if key is not None else None, None)
        statistics, train_function = cache[key]
        object.__setattr__(self, "_statistics", statistics)
        object.__setattr__(self, "_statistics_key", key)
        self.train_function = train_function
        if train_function is None and getattr(self, "optimizer", None):
            self.make_train_function(force=True)

    @property
    def metrics(self):
        metrics = super().metrics
        statistics = getattr(self, "_statistics", None)
        if statistics is not None and statistics.visible:
            metrics = metrics + list(statistics.metrics)
        return metrics
