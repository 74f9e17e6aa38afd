"""Callbacks for tapped models: activation statistics during training."""

import contextlib
import difflib

import keras

from keras_tap.inspect import statistics
from keras_tap.inspect.statistics import TapStatisticsMetric


@keras.saving.register_keras_serializable(package="keras_tap")
class TapStatistics(keras.callbacks.Callback):
    """Log the mean, std, zero fraction and dead channels of taps.

    The statistics are computed inside the compiled training step, on the
    batches being trained on and from the step's own forward pass (a
    callback cannot add ops to a compiled step, so `TapModel.fit` switches
    them on in the step). At each epoch's end this callback writes
    `<tap>_mean`, `<tap>_std`, `<tap>_zero_fraction` and
    `<tap>_dead_channels`, over the epoch's training batches, into the
    epoch's logs: History, TensorBoard, CSVLogger and the run's
    `history.csv` record them; the progress bar leaves them out, to stay
    one line of loss terms and metrics. Changing the set of watched taps
    between fits retraces the training step once.

    Args:
        taps: tap names to watch (default: every tap of the model).
        every: compute the statistics on every `every`-th training batch
            only (1: every batch). On JAX, whose step is stateless, each
            batch computes them and the others count zero: the values
            are the same, the time saved is not.

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

    def statistics_set(self, model):
        """`(key, factory)` of the statistics this callback asks of
        `model` (`TapModel.set_statistics`)."""
        shapes = model.tap_shapes()
        selected = self._select(model)
        # A structured tap (a tuple or dict output) has no one activation
        # to describe: left out by default, refused when named.
        from keras_tap.taps import graph

        structured = [n for n in selected if not graph.is_shape(shapes[n])]
        if structured and self.taps is not None:
            raise ValueError(
                f"TapStatistics: the tap {structured[0]!r} has a structured "
                "output (a tuple, list or dict of tensors); tap one element "
                "of it (`'path:output[i]'`) to log its statistics."
            )
        selected = [n for n in selected if n not in structured]
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
            return statistics.Statistics(metrics, self.every)

        return (tuple(selected), self.every), factory

    def on_train_begin(self, logs=None):
        model = self.model
        if not hasattr(model, "tap_names"):
            raise TypeError(
                "TapStatistics works with a kt.TapModel; the model being "
                f"trained is a {type(model).__name__}."
            )
        # `TapModel.fit` switched them on already; this keeps the same set.
        self._statistics = model.set_statistics(*self.statistics_set(model))

    def on_epoch_begin(self, epoch, logs=None):
        for metric in self._statistics.metrics:
            metric.reset_state()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for metric in self._statistics.metrics:
            for key, value in metric.result().items():
                logs[key] = float(value)

    def get_config(self):
        return {"taps": self.taps, "every": self.every}
