"""Backend-free loss assembly of a `TapModel`'s training step.

The functions here are pure, written with `keras.ops`: a step's inputs in
(`x`, `y`, the predictions and taps of its one forward pass, the sample
weights, the step), its loss terms out. `trainers/<backend>.py` takes the
gradients and applies them; `TapModel.compute_metrics` logs the terms.

Every value is in one-device units: a float32 batch mean over this replica's
batch, as logged. The trainer scales the total for distribution.

How a library object reduces is declared, not guessed:

- A regularizer whose class has `reduction = "batch_mean"` (every
  `kt.regularizers` class) is a mean over the batch and is used as it is; any
  other `keras.regularizers.Regularizer` is a sum over the batch and is
  divided by the batch size; a plain function is used as it is.
- A `keras.losses.Loss` whose class has `call_returns = "per_sample"` (every
  `kt.losses` class but `Wrapped`) returns per-sample values from `call`, so
  Keras reduces and scales it for distribution. For any other `Loss`, the
  rank of what its `call` returns decides: Keras leaves a scalar as it is.
"""

from typing import NamedTuple

import keras
from keras import ops

from keras_tap.training import trainers

PREDICTIONS = "predictions"
_SCALED_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


class LossTerms(NamedTuple):
    """The losses of one step, in one-device units (float32 scalars).

    Attributes:
        predictions_loss: the compiled loss on the predictions alone (0
            without one), as logged in `predictions_loss`.
        extra_loss: `sum(model.losses)`.
        tap_terms: `{tap_name: unweighted term}`, as logged in
            `<tap>_loss` (what `compute_tap_losses` returned).
        tap_weights: `{tap_name: weight}` at `step`.
        tap_loss: `sum(weight_i * term_i)`.
        total: `predictions_loss + extra_loss + tap_loss`, logged in `loss`.
        step: the step the weights were evaluated at.
    """

    predictions_loss: object
    extra_loss: object
    tap_terms: dict
    tap_weights: dict
    tap_loss: object
    total: object
    step: object


class TapOutput(NamedTuple):
    """What a tap's loss and metrics compare: `target` against `output`
    (the activation after the tap's adapter), weighted by
    `sample_weight`; `source` names the target (`"y['feat']"`)."""

    target: object
    output: object
    sample_weight: object
    source: str


class TapTerms(dict):
    """`{tap_name: unweighted term}`, with the `TapOutput` of each tap
    that has a loss or metrics in `outputs` (so the metrics reuse the
    adapters' outputs of the same step)."""

    def __init__(self, terms=(), outputs=None):
        super().__init__(terms)
        self.outputs = {} if outputs is None else outputs


def assemble(model, x, y, y_pred, sample_weight=None, training=True):
    """The `LossTerms` of one step of `model` (a `kt.TapModel`).

    Calls `model.compute_tap_losses` (so that an override counts) and
    `model.tap_weights`.
    """
    predictions, taps = y_pred
    pred_y, _ = model.split_targets(y)
    pred_sw, _ = model.split_weights(sample_weight, y)
    if model.loss is not None:
        predictions_loss = trainers.get().unscale_for_replicas(
            compiled_loss(model, pred_y, predictions, pred_sw)
        )
    else:
        predictions_loss = ops.zeros((), dtype="float32")
    extra_loss = scalar_sum(
        ops.sum(ops.cast(loss, "float32")) for loss in model.losses
    )
    terms = model.compute_tap_losses(
        x, y, taps, sample_weight=sample_weight, training=training
    )
    step = optimizer_step(model)
    weights = model.tap_weights(step)
    for tap_name in terms:
        if tap_name not in weights and tap_name in model.taps:
            raise ValueError(
                f"`compute_tap_losses` returned a term for tap "
                f"{tap_name!r}, which has no `loss` or `regularizer`, so "
                "it has no weight and no `<tap>_loss` log. Declare a "
                "`loss=` or `regularizer=` on that `kt.Tap` (the override "
                "may replace its value)."
            )
        if tap_name not in weights:
            raise ValueError(
                f"`compute_tap_losses` returned a term for {tap_name!r}, "
                f"which is not a tap of the model; its taps are "
                f"{list(model.tap_names)}."
            )
    tap_loss = scalar_sum(
        weights[tap_name] * ops.cast(term, "float32")
        for tap_name, term in terms.items()
    )
    total = predictions_loss + extra_loss + tap_loss
    return LossTerms(
        predictions_loss, extra_loss, terms, weights, tap_loss, total, step
    )


def scalar_sum(values):
    """The sum of float32 scalars, a float32 zero for none (fewer ops
    than adding to a zero: each is a dispatch on an eager backend)."""
    total = None
    for value in values:
        total = value if total is None else total + value
    if total is None:
        return ops.zeros((), dtype="float32")
    return total


def compiled_loss(model, y, predictions, sample_weight):
    """The loss given to `compile`, on the predictions alone, as Keras
    computes it (scaled for distribution by Keras's `Loss` objects).

    Keras keeps it in the model's `_compile_loss`; no public accessor
    computes it without adding `model.losses`.
    """
    return ops.cast(
        model._compile_loss(y, predictions, sample_weight), "float32"
    )


def tap_outputs(model, x, y, taps, sample_weight=None, training=False):
    """`{tap_name: TapOutput}` for every tap with a loss or metrics: the
    target (`y[tap_name]`, the prediction target or the teacher's output)
    and the activation after the tap's adapter."""
    pred_y, tap_y = model.split_targets(y)
    pred_sw, tap_sw = model.split_weights(sample_weight, y)
    specs = [
        (n, t) for n, t in model.taps.items() if t.loss is not None or t.metrics
    ]
    teacher = {}
    if any(t.teacher is not None for _, t in specs):
        teacher = model.teacher_taps(x)
    outputs = {}
    for tap_name, tap in specs:
        output = taps[tap_name]
        if tap.adapter is not None:
            output = tap.adapter(output, training=training)
        if tap.teacher is not None:
            target = teacher[tap_name]
            source = f"the teacher layer {tap.teacher_path!r}"
        elif tap.target == PREDICTIONS:
            target = pred_y
            source = "y['predictions']" if model.is_dict_form(y) else "y"
        else:
            target = model.data_target(tap_name, y, tap_y)
            source = f"y[{tap_name!r}]"
        weight = tap_sw.get(tap_name, pred_sw)
        outputs[tap_name] = TapOutput(target, output, weight, source)
    return outputs


def tap_terms(model, x, y, taps, sample_weight=None, training=False):
    """The unweighted tap terms (`TapModel.compute_tap_losses`)."""
    outputs = tap_outputs(model, x, y, taps, sample_weight, training)
    terms = TapTerms(outputs=outputs)
    for tap_name, tap in model.taps.items():
        if not tap.has_terms:
            continue
        parts = []
        if tap.loss is not None:
            parts.append(
                tap_loss_value(
                    tap_name, tap, outputs[tap_name], adapter=tap.adapter
                )
            )
        if tap.regularizer is not None:
            parts.append(regularizer_term(tap.regularizer, taps[tap_name]))
        terms[tap_name] = scalar_sum(parts)
    return terms


def tap_loss_value(tap_name, tap, tap_output, adapter=None):
    """A tap's loss as a float32 scalar over this replica's batch, in
    one-device units.

    Raises:
        ValueError: when the loss fails on the shapes of the target and
            the activation (both named, with where the target came from),
            or does not reduce to a scalar.
    """
    loss = tap.loss
    target, output, weight, source = tap_output
    try:
        value = loss(target, output, sample_weight=weight)
        scaled = keras_scales(loss, target, output, weight)
    except (ValueError, TypeError, *trainers.get().SHAPE_ERRORS) as error:
        target_shape = tuple(getattr(target, "shape", ()))
        output_shape = tuple(output.shape)
        if target_shape == output_shape:
            raise
        after = " after its adapter" if adapter is not None else ""
        raise ValueError(
            f"Tap {tap_name!r}: its target {source} has shape "
            f"{target_shape} but the activation{after} has shape "
            f"{output_shape}, and the tap's loss "
            f"{getattr(loss, 'name', loss)!r} cannot compare them. Give "
            f"{source} the activation's shape, or add an `adapter=` that "
            "maps the activation to the target's shape."
        ) from error
    if tuple(value.shape) != ():
        raise ValueError(
            f"Tap {tap_name!r}: its loss returned shape "
            f"{tuple(value.shape)}; a tap loss must reduce to a scalar "
            "(use reduction='sum_over_batch_size')."
        )
    value = ops.cast(value, "float32")
    if scaled:
        value = trainers.get().unscale_for_replicas(value)
    return value


def keras_scales(loss, target, output, sample_weight=None):
    """Whether Keras divided `loss(target, output)` by the number of
    replicas.

    A `keras.losses.Loss` scales its reduction for distribution, but
    returns a value that is already a scalar as it is (once weighted by
    `sample_weight`).
    """
    if not isinstance(loss, keras.losses.Loss):
        return False
    if loss.reduction not in _SCALED_REDUCTIONS:
        return False
    if getattr(loss, "call_returns", None) == "per_sample":
        return True
    if sample_weight is not None and len(ops.shape(sample_weight)) > 0:
        return True
    rank = trainers.get().call_rank(
        loss, _static_shape(target), _static_shape(output)
    )
    if rank is None:  # read it from a call here (a compiled step prunes it)
        values = loss.call(
            ops.convert_to_tensor(target, dtype=loss.dtype),
            ops.convert_to_tensor(output, dtype=loss.dtype),
        )
        rank = len(values.shape)
    return rank > 0


def _static_shape(x):
    if not hasattr(x, "shape"):
        x = ops.convert_to_tensor(x)
    return tuple(x.shape)


def regularizer_term(regularizer, activation):
    """A tap's regularizer term as a float32 batch mean."""
    activation = ops.cast(activation, "float32")
    value = ops.cast(regularizer(activation), "float32")
    if sums_over_batch(regularizer):
        batch = ops.shape(activation)[0]
        if not isinstance(batch, int):  # a dynamic batch size (traced)
            batch = ops.cast(batch, "float32")
        value = value / batch
    return value


def sums_over_batch(regularizer):
    """Whether a regularizer's value is a sum over the batch: a Keras
    `Regularizer` that does not declare `reduction = "batch_mean"`."""
    if not isinstance(regularizer, keras.regularizers.Regularizer):
        return False
    return getattr(regularizer, "reduction", "batch_sum") != "batch_mean"


def named_metric(metric, tap_name):
    """A fresh copy of a tap's metric, named `<tap_name>_<metric name>`.

    Each `TapModel` keeps its own copies, so a `Tap` shared between models
    or expanded to several layers (`re:`) never mixes their states.
    """
    config = metric.get_config()
    config["name"] = f"{tap_name}_{metric.name}"
    return type(metric).from_config(config)


def loss_tracker_variables(model):
    """The float variables of the trackers of the logged losses (`loss`,
    `predictions_loss`, `<tap>_loss`), reset every epoch: once one holds
    a non-finite value, a step of this epoch had a non-finite loss."""
    names = {"loss", "predictions_loss"}
    names.update(f"{n}_loss" for n in model.tap_names)
    return [
        variable
        for metric in model.metrics
        if metric.name in names
        for variable in metric.variables
        if keras.backend.is_float_dtype(variable.dtype)
    ]


def optimizer_step(model):
    """The step that tap weights are evaluated at: `optimizer.iterations`
    before the update (0 before the model is compiled)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return ops.zeros((), dtype="int64")
    # Its value now: the step's metrics run after the update.
    return ops.copy(optimizer.iterations)


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
        f"the teacher layer {tap.teacher_path!r} gives {expected}, and the "
        "tap's loss cannot compare them. Add an `adapter=` (e.g. a 1x1 "
        "Conv2D or Dense) that maps the student's shape to the teacher's."
    )
