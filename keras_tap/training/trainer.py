"""The training side of `kt.TapModel`: losses, metrics, steps and `fit`.

`Trainer` is a mixin of `TapModel`, as Keras's own `Trainer` is of
`keras.Model`. Its steps dispatch to the trainer of the active backend
(`trainers/<backend>.py`); the loss terms come from `step.py`, and every
metric is updated in one place, `compute_metrics`.
"""

import inspect
import math

import keras
from keras import ops

from keras_tap.training import step as step_lib
from keras_tap.training import trainers
from keras_tap.training.step import named_metric, optimizer_step
from keras_tap.training.targets import TargetsMixin


class Trainer(TargetsMixin):
    """Losses, metrics and steps of `TapModel`."""

    def init_trainer(self):
        """Create the tap metrics and the loss trackers (`__init__`)."""
        metrics = {
            n: [named_metric(m, n) for m in t.metrics]
            for n, t in self.taps.items()
        }
        object.__setattr__(self, "_metrics_by_tap", metrics)
        self.tap_metrics = [m for ms in metrics.values() for m in ms]
        self._predictions_loss = keras.metrics.Mean(name="predictions_loss")
        self._tap_loss_trackers = [
            keras.metrics.Mean(name=f"{n}_loss")
            for n, t in self.taps.items()
            if t.has_terms
        ]
        # The optimizer step that `evaluate` weights the taps at, copied
        # in at its start: a stateless (JAX) test step gets variables only
        # through its state, which holds no optimizer variable. Not
        # tracked, so never saved. int32: JAX has no int64 by default.
        object.__setattr__(
            self,
            "_evaluation_step",
            keras.Variable(
                0, dtype="int32", trainable=False, name="evaluation_step"
            ),
        )

    @property
    def metrics_variables(self):
        """Keras's metrics variables, then the step `evaluate` weights the
        taps at (`_evaluation_step`)."""
        return super().metrics_variables + [self._evaluation_step]

    # -- losses --------------------------------------------------------------

    def compute_tap_losses(
        self, x, y, taps, sample_weight=None, training=False
    ):
        """The unweighted tap terms: each tap's loss plus its regularizer.

        Override this to try a new tap loss; the caller applies each tap's
        weight and the distribution scaling. Values are batch means in
        float32 over this replica's batch, as logged in `<tap>_loss`.
        This computes and returns: it updates no metric.

        Args:
            x: the input batch.
            y: the target batch (the prediction target, or the dict form
                `{"predictions": ..., tap_name: ...}`).
            taps: `{tap_name: activation}` from this step's forward pass.
            sample_weight: one array, or a dict keyed like `y`; weights
                each tap's loss and metrics (not its regularizer). In the
                dict form a tap uses its own key, or else the weight of
                `"predictions"`.
            training: whether this is a training step.

        Returns:
            `{tap_name: scalar}` for every tap with a loss or regularizer.

        Raises:
            ValueError: when a tap's target is missing from `y`, or its
                shape cannot be compared with the activation's (the tap,
                both shapes and the `y` key are named).

        Example:

        ```python
        class CenteredL2(kt.TapModel):
            def compute_tap_losses(self, x, y, taps, sample_weight=None,
                                   training=False):
                terms = super().compute_tap_losses(
                    x, y, taps, sample_weight, training)
                a = taps["features"]
                terms["features"] = keras.ops.mean(
                    (a - keras.ops.mean(a, axis=0)) ** 2)
                return terms
        ```
        """
        return step_lib.tap_terms(self, x, y, taps, sample_weight, training)

    def tap_weights(self, step=None):
        """`{tap_name: weight}` at `step` (default: the optimizer's)."""
        if step is None:
            step = optimizer_step(self)
        return {
            n: ops.cast(t.weight(step), "float32")
            for n, t in self.taps.items()
            if t.has_terms
        }

    def compute_loss_terms(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Every loss of a step, apart: a `kt` `LossTerms` tuple.

        Its fields are `predictions_loss` (the compiled loss alone),
        `extra_loss` (`sum(model.losses)`), `tap_terms` (from
        `compute_tap_losses`), `tap_weights`, `tap_loss`
        (`sum(weight_i * term_i)`), `total` and `step`, all float32 scalars
        in one-device units (as logged). Updates no metric: pass it to
        `compute_metrics(..., losses=terms)` to log it.
        """
        return step_lib.assemble(
            self, x, y, y_pred, sample_weight, training=training
        )

    def compute_loss_parts(
        self,
        x=None,
        y=None,
        y_pred=None,
        sample_weight=None,
        training=True,
        losses=None,
    ):
        """The total loss in two parts: `(prediction_loss, tap_loss)`.

        `prediction_loss` is the compiled loss plus `model.losses`,
        `tap_loss` is `sum(weight_i(step) * tap_term_i)`, both scaled for
        distribution as Keras scales its losses: a custom `train_step` can
        take their gradients apart. In training, their gradients wait for
        a check that every tap term is finite. Updates no metric.

        Args:
            x, y, y_pred, sample_weight, training: as in `compute_loss`.
            losses: the step's `compute_loss_terms(...)`, when already
                computed (the other arguments are then not used).

        Example:

        ```python
        with tf.GradientTape(persistent=True) as tape:
            y_pred = self(x, training=True)
            losses = self.compute_loss_terms(x, y, y_pred, sample_weight)
            main, aux = self.compute_loss_parts(losses=losses)
        main_grads = tape.gradient(main, self.trainable_variables)
        ...
        return self.compute_metrics(x, y, y_pred, sample_weight,
                                    losses=losses, training=True)
        ```
        """
        if losses is None:
            losses = self.compute_loss_terms(
                x, y, y_pred, sample_weight, training=training
            )
        trainer = trainers.get()
        main = trainer.scale_for_replicas(
            losses.predictions_loss + losses.extra_loss
        )
        aux = trainer.scale_for_replicas(losses.tap_loss)
        checked = losses.tap_terms if training else {}
        jit_compile = bool(getattr(self, "jit_compile", False))
        return trainer.guard_finite((main, aux), checked, losses.step,
                                    jit_compile)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Prediction loss + weighted tap terms + `model.losses`, scaled for
        distribution (Keras's symbolic build in `fit` calls this)."""
        main, aux = self.compute_loss_parts(
            x, y, y_pred, sample_weight, training=training
        )
        return main + aux

    # -- metrics -------------------------------------------------------------

    def compute_metrics(
        self, x, y, y_pred, sample_weight=None, losses=None, training=False
    ):
        """Update every metric of a step and return the logs.

        The compiled metrics see the predictions alone. With `losses` (the
        step's `compute_loss_terms`), this also logs `loss`,
        `predictions_loss` and `<tap>_loss` (each weighted by the batch
        size, as Keras weights `loss`), updates the tap metrics on
        `(target, adapted activation)` and, in training, the statistics of
        `kt.callbacks.TapStatistics`.

        Returns:
            `{name: value}` of `model.metrics`.
        """
        predictions, taps = y_pred
        pred_y, _ = self.split_targets(y)
        pred_sw, _ = self.split_weights(sample_weight, y)
        if losses is not None:
            self._update_loss_metrics(x, losses)
            self._update_tap_metrics(x, y, taps, sample_weight, losses,
                                     training)
            statistics = getattr(self, "_statistics", None)
            if training and statistics is not None:
                statistics.update(taps, losses.step)
        return super().compute_metrics(
            x, pred_y, predictions, sample_weight=pred_sw
        )

    def _update_loss_metrics(self, x, losses):
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        for metric in super().metrics:
            if metric.name == "loss":  # Keras's loss tracker
                metric.update_state(losses.total, sample_weight=batch)
        self._predictions_loss.update_state(
            losses.predictions_loss, sample_weight=batch
        )
        for tracker in self._tap_loss_trackers:
            tap_name = tracker.name[: -len("_loss")]
            if tap_name in losses.tap_terms:
                tracker.update_state(
                    losses.tap_terms[tap_name], sample_weight=batch
                )

    def _update_tap_metrics(self, x, y, taps, sample_weight, losses,
                            training):
        if not self.tap_metrics:
            return
        outputs = getattr(losses.tap_terms, "outputs", None)
        if not outputs:  # an override of `compute_tap_losses` made its own
            outputs = step_lib.tap_outputs(
                self, x, y, taps, sample_weight, training
            )
        for tap_name, metrics in self._metrics_by_tap.items():
            if not metrics:
                continue
            target, output, weight, _ = outputs[tap_name]
            for metric in metrics:
                metric.update_state(target, output, sample_weight=weight)

    # -- steps and fitting ---------------------------------------------------

    def train_step(self, *args):
        # `(data,)`, or `(state, data)` on JAX (stateless steps).
        return trainers.get().train_step(self, *args)

    def test_step(self, *args):
        return trainers.get().test_step(self, *args)

    # A trainer may wrap Keras's compiled functions and its build before
    # `fit`/`evaluate`: TensorFlow's does under a multi-worker strategy
    # (`trainers/multi_worker.py`), where Keras's own fail.

    def make_train_function(self, force=False):
        make = super().make_train_function
        wrap = getattr(trainers.get(), "make_function", None)
        if wrap is None:
            return make(force=force)
        return wrap(self, make, "train", force)

    def make_test_function(self, force=False):
        make = super().make_test_function
        wrap = getattr(trainers.get(), "make_function", None)
        if wrap is None:
            return make(force=force)
        return wrap(self, make, "test", force)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        build = super()._maybe_symbolic_build
        replace = getattr(trainers.get(), "maybe_symbolic_build", None)
        if replace is None:
            return build(iterator=iterator, data_batch=data_batch)
        return replace(self, build, iterator, data_batch)

    def fit(self, x=None, y=None, *args, **kwargs):
        kwargs = _bind(keras.Model.fit, self, x, y, *args, **kwargs)
        x, y = kwargs.pop("x"), kwargs.pop("y")
        x, y, kwargs = self.prepare_fit_data(x, y, kwargs)
        callbacks = list(kwargs.get("callbacks") or [])
        trainer = trainers.get()
        if bool(getattr(self, "jit_compile", False)) or getattr(
            trainer, "STOPS_FROM_LOGS", False
        ):
            callbacks.append(StopOnNonFinite())
        kwargs["callbacks"] = self.prepare_statistics(
            callbacks, kwargs.get("verbose", "auto")
        )
        return run_guarded(super().fit, x, y, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        if self.optimizer is not None:
            # A copy: on JAX a buffer shared by two variables of the
            # train state would be donated twice.
            self._evaluation_step.assign(
                ops.copy(ops.cast(self.optimizer.iterations, "int32"))
            )
        return run_guarded(super().evaluate, x, y, *args, **kwargs)

    def get_compile_config(self):
        """Keras's compile config, with the optimizer saved under its
        public name: on PyTorch, Keras saves a torch-only class
        (`keras.src.backend.torch.optimizers...`) that other backends
        cannot load."""
        config = super().get_compile_config()
        optimizer = (config or {}).get("optimizer")
        if isinstance(optimizer, dict) and str(
            optimizer.get("module")
        ).startswith("keras.src.backend."):
            config["optimizer"] = dict(optimizer, module="keras.optimizers")
        return config

    # -- a frozen teacher ----------------------------------------------------

    def _frozen_weights(self):
        """The teacher's variables that the student does not share."""
        teacher = getattr(self, "teacher", None)
        if teacher is None:
            return {}
        own = {id(w) for w in self.base.weights}
        for adapter in getattr(self, "adapters", []):
            own.update(id(w) for w in adapter.weights)
        return {id(w): w for w in teacher.weights if id(w) not in own}

    @property
    def trainable_weights(self):
        """The weights the optimizer updates: the teacher's never are."""
        frozen = self._frozen_weights()
        return [w for w in super().trainable_weights if id(w) not in frozen]

    @property
    def trainable_variables(self):
        frozen = self._frozen_weights()
        return [
            v for v in super().trainable_variables if id(v) not in frozen
        ]

    @property
    def non_trainable_weights(self):
        weights = super().non_trainable_weights
        seen = {id(w) for w in weights}
        frozen = self._frozen_weights()
        return weights + [
            w for w in super().trainable_weights
            if id(w) in frozen and id(w) not in seen
        ]

    @property
    def non_trainable_variables(self):
        variables = super().non_trainable_variables
        seen = {id(v) for v in variables}
        frozen = self._frozen_weights()
        return variables + [
            v for v in super().trainable_variables
            if id(v) in frozen and id(v) not in seen
        ]


def _bind(method, model, *args, **kwargs):
    """`method`'s arguments by name (positional ones included)."""
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def run_guarded(method, *args, **kwargs):
    """Run `fit`/`evaluate`, turning a non-finite tap loss into an error
    that names the tap, the step and the value."""
    try:
        return method(*args, **kwargs)
    except Exception as e:
        error = trainers.get().nonfinite_error(e)
        if error is not None:
            raise error from None
        raise


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops `fit` when a logged loss is not finite.

    Under `jit_compile=True` the step skips the update of a non-finite loss
    (XLA drops the assertion that stops it otherwise); this turns that step
    into an error naming the tap, the step and the value.
    """

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        names = [f"{n}_loss" for n in self.model.tap_names]
        for key in names + ["predictions_loss", "loss"]:
            if key in logs and not math.isfinite(float(logs[key])):
                step = int(self.model.optimizer.iterations)
                what = (
                    "the prediction loss"
                    if key in ("predictions_loss", "loss")
                    else f"tap {key[: -len('_loss')]!r}"
                )
                detail = f"{what} at step {step}: its loss is {logs[key]}"
                message = trainers.get().nonfinite_message(detail)
                raise FloatingPointError(message)
