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
            return statistics.Statistics(metrics, self.every)

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
