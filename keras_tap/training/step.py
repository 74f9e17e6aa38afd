"""Training helpers of `TapModel`: targets, sample and class weights, tap
loss terms, tap metrics and the non-finite stop.

`y` is either the prediction target alone, or the dict form
`{"predictions": prediction_target, tap_name: tap_target, ...}`.
`sample_weight` is one array, or a dict keyed like `y`.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_tap.training import regularizers as tap_regularizers
from keras_tap.training import trainers

PREDICTIONS = "predictions"
_SCALED_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


class TargetsMixin:
    """Target and sample-weight handling shared by `TapModel`'s steps."""

    def is_dict_form(self, y):
        return isinstance(y, dict) and (
            PREDICTIONS in y or any(n in y for n in self.tap_names)
        )

    def split_targets(self, y):
        """`y` -> `(prediction_target, {tap_name: tap_target})`."""
        if self.is_dict_form(y):
            return y.get(PREDICTIONS), {
                k: v for k, v in y.items() if k != PREDICTIONS
            }
        return y, {}

    def split_weights(self, sample_weight, y):
        """`sample_weight` -> `(prediction_weight, {tap_name: weight})`."""
        if sample_weight is None:
            return None, {}
        if isinstance(sample_weight, dict):
            pred = sample_weight.get(PREDICTIONS)
            return pred, {
                k: v
                for k, v in sample_weight.items()
                if k != PREDICTIONS and v is not None
            }
        if isinstance(sample_weight, (list, tuple)) and self.is_dict_form(y):
            # Keras flattens a dict-shaped sample weight to a list, sorted
            # like the keys of `y`.
            keys = sorted(y)
            weights = dict(zip(keys, sample_weight))
            return self.split_weights(weights, y)
        return sample_weight, {n: sample_weight for n in self.tap_names}

    def data_target(self, tap_name, y, tap_targets):
        if tap_name in tap_targets:
            return tap_targets[tap_name]
        got = sorted(y) if isinstance(y, dict) else None
        received = (
            f"the keys {got}" if got is not None else "a y that is not a dict"
        )
        raise ValueError(
            f"Tap {tap_name!r} has target='data', so it needs y[{tap_name!r}]"
            f"; received {received}. Pass y={{'predictions': ..., "
            f"{tap_name!r}: ...}}, or give the Tap target='predictions' or "
            "teacher='layer path'."
        )

    def log_losses(self, x, pred_loss, terms):
        """Update the `predictions_loss` and `<tap>_loss` logs, weighted by
        the batch size as Keras weights `loss`."""
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        self._predictions_loss.update_state(pred_loss, sample_weight=batch)
        for tracker in self._tap_loss_trackers:
            tap_name = tracker.name[: -len("_loss")]
            if tap_name in terms:
                tracker.update_state(terms[tap_name], sample_weight=batch)

    # -- class weights -------------------------------------------------------

    def prepare_fit_data(self, x, y, kwargs):
        """Turn `class_weight` into a prediction sample weight, and add the
        non-finite stop under XLA.

        Keras refuses `class_weight` when `y` is a dict, and would apply it
        to the tap losses too when it is not; the contract says it weights
        the predictions only. The taps whose target is not in `y`
        (`target="predictions"`, teacher taps) get an entry of their own in
        `y` (unused) and in the sample weight (the given one, or ones), so
        that the class weights do not reach them.
        """
        if jit_compiled(self):
            callbacks = list(kwargs.get("callbacks") or [])
            kwargs["callbacks"] = callbacks + [StopOnNonFinite()]
        class_weight = kwargs.pop("class_weight", None)
        if class_weight is None:
            return x, y, kwargs
        if not isinstance(class_weight, dict) or not class_weight:
            raise ValueError(
                "`class_weight` must be a non-empty dict {class_index: "
                f"weight}}; received {class_weight!r}."
            )
        sample_weight = kwargs.pop("sample_weight", None)
        if y is None:
            dataset_fn = trainers.get().with_class_weight
            return dataset_fn(self, x, class_weight), None, kwargs
        pred_y, tap_y = self.split_targets(y)
        if pred_y is None:
            raise ValueError(
                "`class_weight` applies to the predictions, but y has no "
                f"'predictions' key (keys: {sorted(y)})."
            )
        pred_w, tap_w = self.split_weights(sample_weight, y)
        weights = class_weights_for(np.asarray(pred_y), class_weight)
        ones = np.ones_like(weights)
        new_y = {PREDICTIONS: pred_y, **tap_y}
        new_w = {PREDICTIONS: weights}
        if pred_w is not None:
            new_w[PREDICTIONS] = weights * np.asarray(pred_w, "float32")
        for name in self.tap_weight_keys(tap_y):
            if name not in tap_y:
                new_y[name] = np.zeros_like(weights)
            given = tap_w.get(name, pred_w)
            new_w[name] = ones if given is None else np.asarray(given)
        kwargs["sample_weight"] = new_w
        return x, new_y, kwargs

    def tap_weight_keys(self, tap_targets):
        """Keys of the sample-weight dict that `class_weight` builds: the
        taps keyed in `y`, then the taps whose target is not in `y`."""
        keys = list(tap_targets)
        for name, tap in self.taps.items():
            elsewhere = tap.teacher is not None or tap.target == PREDICTIONS
            if elsewhere and name not in keys:
                keys.append(name)
        return keys

    def run_guarded(self, method, *args, **kwargs):
        """Run `fit`/`evaluate`, turning a non-finite tap loss into an error
        that names the tap, the step and the value."""
        try:
            return method(*args, **kwargs)
        except Exception as e:
            error = trainers.get().nonfinite_error(e)
            if error is not None:
                raise error from None
            raise


def class_indices(pred_y):
    """Class index per sample: sparse labels, or argmax of one-hot rows."""
    if pred_y.ndim >= 2 and pred_y.shape[-1] > 1:
        return np.argmax(pred_y, axis=-1).reshape(-1)
    return np.asarray(pred_y).reshape(pred_y.shape[0], -1)[:, 0].astype(int)


def class_weights_for(pred_y, class_weight):
    indices = class_indices(pred_y)
    missing = sorted(set(np.unique(indices).tolist()) - set(class_weight))
    if missing:
        raise ValueError(
            f"`class_weight` has no weight for the classes {missing} found in "
            f"the prediction target; it has keys {sorted(class_weight)}."
        )
    table = np.zeros(max(max(class_weight), indices.max()) + 1, "float32")
    for key, value in class_weight.items():
        table[int(key)] = value
    return table[indices]


def named_metric(metric, tap_name):
    """A fresh copy of a tap's metric, named `<tap_name>_<metric name>`.

    Each `TapModel` keeps its own copies, so a `Tap` shared between models
    or expanded to several layers (`re:`) never mixes their states.
    """
    config = metric.get_config()
    config["name"] = f"{tap_name}_{metric.name}"
    return type(metric).from_config(config)


def regularizer_term(regularizer, activation):
    """A tap's regularizer term as a float32 batch mean.

    A Keras `Regularizer` sums over the batch, so its value is divided by the
    batch size; `kt.regularizers` (and subclasses of them) are batch means
    already, and a plain function is used as it is.
    """
    activation = ops.cast(activation, "float32")
    value = ops.cast(regularizer(activation), "float32")
    if _sums_over_batch(regularizer):
        value = value / ops.cast(ops.shape(activation)[0], "float32")
    return value


def _sums_over_batch(regularizer):
    if not isinstance(regularizer, keras.regularizers.Regularizer):
        return False
    kt_module = tap_regularizers.__name__
    return not any(c.__module__ == kt_module for c in type(regularizer).mro())


def optimizer_step(model):
    """The step that tap weights are evaluated at: `optimizer.iterations`
    before the update (0 before the model is compiled)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return ops.zeros((), dtype="int64")
    return optimizer.iterations


def jit_compiled(model):
    """Whether the model's steps are XLA-compiled."""
    try:
        return bool(model.jit_compile)
    except AttributeError:
        return False


def tap_loss_value(tap_name, loss, target, activation, sample_weight):
    """A tap's loss as a float32 scalar over this replica's batch."""
    value = loss(target, activation, sample_weight=sample_weight)
    if tuple(value.shape) != ():
        raise ValueError(
            f"Tap {tap_name!r}: its loss returned shape "
            f"{tuple(value.shape)}; a tap loss must reduce to a scalar "
            "(use reduction='sum_over_batch_size')."
        )
    value = ops.cast(value, "float32")
    if getattr(loss, "reduction", None) in _SCALED_REDUCTIONS:
        # Keras `Loss` objects divide by the number of replicas: undo it
        # here, the caller scales every term alike.
        value = trainers.get().unscale_for_replicas(value)
    return value


def check_teacher_shape(tap_name, tap, shape, teacher_shape):
    """Raise when a student tap (after its adapter) cannot be compared
    with its teacher target.

    Different shapes are accepted when the tap's loss traces on them:
    `AttentionTransfer` and `NST` compare maps of different channel counts.
    """
    got, expected = tuple(shape), tuple(teacher_shape)
    if got == expected:
        return
    if tap.loss is not None and trainers.get().loss_accepts(
        tap.loss, (2,) + expected, (2,) + got
    ):
        return
    raise ValueError(
        f"Tap {tap_name!r}: the student activation "
        f"{'after its adapter ' if tap.adapter else ''}has shape {got} but "
        f"the teacher layer {tap.teacher!r} gives {expected}, and the tap's "
        "loss cannot compare them. Add an `adapter=` (e.g. a 1x1 Conv2D or "
        "Dense) that maps the student's shape to the teacher's."
    )


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
