"""The PyTorch trainer of `kt.TapModel`: eager `train_step` and
`test_step`, as Keras's own PyTorch trainer writes them.

One forward pass, the loss terms (`step.py`), `backward()` on their total,
the update under `torch.no_grad()`, then every metric in one place
(`model.compute_metrics`). The step runs eagerly, so a non-finite loss is
found before the update and raises at once, naming the tap, the step and
the value.
"""

import math

import keras
import torch

from keras_tap.training.trainers import portable
from keras_tap.training.trainers.portable import nonfinite_message


def __getattr__(name):
    """The rest of the trainer interface (`trainers.get().<name>`):
    `portable`'s."""
    return getattr(portable, name)


def no_gradient():
    """`torch.no_grad()`: the frozen teacher's pass builds no autograd
    graph (its variables are trainable ones that the step leaves out)."""
    return torch.no_grad()


def check_finite(losses):
    """Raise `FloatingPointError` when a loss of the step is not finite
    (before the optimizer applies it)."""
    total = float(losses.total.detach())
    if math.isfinite(total):
        return
    step = int(losses.step)
    for name, term in losses.tap_terms.items():
        value = float(term.detach())
        if not math.isfinite(value):
            detail = f"tap {name!r} at step {step}: its loss is {value}"
            break
    else:
        detail = f"the prediction loss at step {step}: its loss is {total}"
    raise FloatingPointError(nonfinite_message(detail))


def train_step(model, data):
    """One training step of a `kt.TapModel` on PyTorch.

    Raises:
        FloatingPointError: when the step's loss is not finite; the
            weights stay those of the last good step.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = model(x, training=True)
    model.zero_grad()
    losses = model.compute_loss_terms(
        x, y, y_pred, sample_weight=sample_weight, training=True
    )
    check_finite(losses)
    loss = losses.total
    if model.optimizer is not None:
        loss = model.optimizer.scale_loss(loss)
    variables = model.trainable_weights[:]
    if variables:
        loss.backward()
        gradients = [v.value.grad for v in variables]
        with torch.no_grad():
            model.optimizer.apply(gradients, variables)
    with torch.no_grad():
        return model.compute_metrics(
            x, y, y_pred, sample_weight, losses=losses, training=True
        )


def test_step(model, data):
    """One evaluation step of a `kt.TapModel` on PyTorch: one forward
    pass with `training=False`, the loss terms, then every metric."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = model(x, training=False)
    losses = model.compute_loss_terms(
        x, y, y_pred, sample_weight=sample_weight, training=False
    )
    return model.compute_metrics(
        x, y, y_pred, sample_weight, losses=losses, training=False
    )
