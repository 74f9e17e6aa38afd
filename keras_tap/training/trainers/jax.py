"""The JAX trainer of `kt.TapModel`: stateless `train_step` and
`test_step`, as Keras's own JAX trainer writes them.

Keras's JAX `fit` hands each step the model's state (trainable,
non-trainable, optimizer and metrics variables) and takes the new state
back. The step runs the model, the loss terms (`step.py`) and the metrics
inside a `keras.StatelessScope` that maps every variable to its value in
that state and collects the losses of the forward pass (what
`stateless_call(..., return_losses=True)` does), so activity regularizers
count in `model.losses`.

A non-finite total loss skips the update (the step keeps the old
trainable and optimizer variables), and so do the later steps of the same
execution (`steps_per_execution`); the logged loss then stops `fit`
(`StopOnNonFinite`) with the weights of the last good step.
"""

import jax
import jax.numpy as jnp
import keras
from keras import ops

from keras_tap.training import step as step_lib
from keras_tap.training.step import LossTerms, TapOutput, TapTerms
from keras_tap.training.trainers import portable

# The step skips a non-finite update; `fit` stops from the logs.
STOPS_FROM_LOGS = True


def __getattr__(name):
    """The rest of the trainer interface (`trainers.get().<name>`):
    `portable`'s."""
    return getattr(portable, name)


def _flatten_tap_terms(terms):
    names = tuple(terms.outputs)
    outputs = {n: tuple(terms.outputs[n][:3]) for n in names}
    sources = tuple(terms.outputs[n].source for n in names)
    return (dict(terms), outputs), (names, sources)


def _unflatten_tap_terms(static, children):
    names, sources = static
    terms, outputs = children
    return TapTerms(
        terms,
        {n: TapOutput(*outputs[n], source=s) for n, s in zip(names, sources)},
    )


# `compute_loss_terms(...)` as a pytree: a user's stateless `train_step`
# can return it from `jax.value_and_grad(..., has_aux=True)` (a plain
# leaf would carry the tracers of the gradient out of it).
jax.tree_util.register_pytree_node(
    TapTerms, _flatten_tap_terms, _unflatten_tap_terms
)


def _mapping(variables, values):
    return list(zip(variables, values))


def _current(scope, variables, values):
    """The values of `variables` at the end of `scope`."""
    result = []
    for variable, value in zip(variables, values):
        new = scope.get_current_value(variable)
        result.append(value if new is None else new)
    return result


def _evaluation_step(model, metrics_values):
    """The optimizer step of an evaluation, from the test state: the
    optimizer's variables are not in it, and reading them in the traced
    step would freeze their value at the first trace."""
    for variable, value in zip(model.metrics_variables, metrics_values):
        if variable is model._evaluation_step:
            return value
    raise AssertionError("the evaluation step is not in the test state")


def _forward(model, state, x, y, sample_weight, training, step=None,
             metrics_values=None):
    """The loss of one step, with what the rest of the step needs.

    `metrics_values` are mapped too: Keras's compiled loss of a model
    with several outputs updates a loss metric per output (`o1_loss`)
    while it computes the loss.

    Returns:
        `(scaled_loss, (losses, outputs, y_pred, non_trainable,
        metrics_values))`, a JAX-friendly structure: the tap terms as a
        plain dict, and each tap's `(target, output, sample_weight)`.
    """
    trainable, non_trainable, optimizer_values = state
    mapping = _mapping(model.trainable_variables, trainable)
    mapping += _mapping(model.non_trainable_variables, non_trainable)
    if metrics_values is not None:
        mapping += _mapping(model.metrics_variables, metrics_values)
    if model.optimizer is not None and optimizer_values is not None:
        mapping += _mapping(model.optimizer.variables, optimizer_values)
    if model.optimizer is not None and step is not None:
        iterations = model.optimizer.iterations
        mapping.append((iterations, ops.cast(step, iterations.dtype)))
    with keras.StatelessScope(
        state_mapping=mapping, collect_losses=True
    ) as scope:
        y_pred = model(x, training=training)
        losses = model.compute_loss_terms(
            x, y, y_pred, sample_weight=sample_weight, training=training
        )
        loss = losses.total
        if training and model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    non_trainable = _current(
        scope, model.non_trainable_variables, non_trainable
    )
    if metrics_values is not None:
        metrics_values = _current(
            scope, model.metrics_variables, metrics_values
        )
    outputs = getattr(losses.tap_terms, "outputs", {})
    outputs = {n: tuple(o[:3]) for n, o in outputs.items()}
    losses = losses._replace(tap_terms=dict(losses.tap_terms))
    return loss, (losses, outputs, y_pred, non_trainable, metrics_values)


def _losses(losses, outputs):
    """`LossTerms` again, with the tap outputs the metrics reuse."""
    outputs = {n: TapOutput(*o, source="") for n, o in outputs.items()}
    return LossTerms(
        *losses._replace(tap_terms=TapTerms(losses.tap_terms, outputs))
    )


def _metrics(model, state, metrics_values, x, y, y_pred, sample_weight,
             losses, training):
    """Update every metric in a `StatelessScope`; the logs and the new
    metrics variables."""
    trainable, non_trainable, optimizer_values = state
    mapping = _mapping(model.trainable_variables, trainable)
    mapping += _mapping(model.non_trainable_variables, non_trainable)
    if model.optimizer is not None and optimizer_values is not None:
        mapping += _mapping(model.optimizer.variables, optimizer_values)
    mapping += _mapping(model.metrics_variables, metrics_values)
    with keras.StatelessScope(state_mapping=mapping) as scope:
        logs = model.compute_metrics(
            x, y, y_pred, sample_weight, losses=losses, training=training
        )
    return logs, _current(scope, model.metrics_variables, metrics_values)


def _logged_nonfinite(model, metrics_values):
    """Whether the loss trackers (`loss`, `predictions_loss`,
    `<tap>_loss`, reset every epoch) hold a non-finite value: a step
    before this one, in the same execution, skipped its update. With
    `steps_per_execution > 1` the execution's later steps skip theirs
    too, so `fit` stops with the weights of the last good step."""
    tracked = {id(v) for v in step_lib.loss_tracker_variables(model)}
    values = [
        value
        for variable, value in zip(model.metrics_variables, metrics_values)
        if id(variable) in tracked
    ]
    if not values:
        return False
    return jnp.logical_not(
        jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))
    )


def train_step(model, state, data):
    """One stateless training step of a `kt.TapModel` on JAX.

    Args:
        state: `(trainable, non_trainable, optimizer, metrics)` variable
            values, as Keras's JAX trainer passes them.
        data: the batch, `(x, y[, sample_weight])`.

    Returns:
        `(logs, new_state)`.
    """
    trainable, non_trainable, optimizer_values, metrics_values = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

    def loss_fn(trainable_values):
        return _forward(
            model,
            (trainable_values, non_trainable, optimizer_values),
            x,
            y,
            sample_weight,
            training=True,
            metrics_values=metrics_values,
        )

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    losses, outputs, y_pred, non_trainable, metrics_values = aux
    losses = _losses(losses, outputs)
    if trainable:
        new_trainable, new_optimizer = model.optimizer.stateless_apply(
            optimizer_values, grads, trainable
        )
        finite = jnp.isfinite(losses.total) & jnp.logical_not(
            _logged_nonfinite(model, metrics_values)
        )

        def keep_finite(new, old):
            return jnp.where(finite, new, old)

        trainable = jax.tree.map(keep_finite, new_trainable, trainable)
        optimizer_values = jax.tree.map(
            keep_finite, new_optimizer, optimizer_values
        )
    logs, metrics_values = _metrics(
        model,
        (trainable, non_trainable, optimizer_values),
        metrics_values,
        x,
        y,
        y_pred,
        sample_weight,
        losses,
        training=True,
    )
    return logs, (trainable, non_trainable, optimizer_values, metrics_values)


def test_step(model, state, data):
    """One stateless evaluation step of a `kt.TapModel` on JAX:
    `(logs, (trainable, non_trainable, metrics))`."""
    trainable, non_trainable, metrics_values = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    _, aux = _forward(
        model,
        (trainable, non_trainable, None),
        x,
        y,
        sample_weight,
        training=False,
        step=_evaluation_step(model, metrics_values),
        metrics_values=metrics_values,
    )
    losses, outputs, y_pred, non_trainable, metrics_values = aux
    logs, metrics_values = _metrics(
        model,
        (trainable, non_trainable, None),
        metrics_values,
        x,
        y,
        y_pred,
        sample_weight,
        _losses(losses, outputs),
        training=False,
    )
    return logs, (trainable, non_trainable, metrics_values)
