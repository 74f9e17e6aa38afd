"""keras_tap: losses, regularizers and extraction on intermediate layers.

`kt.TapModel(model, taps)` exposes any layer's output alongside the
predictions from one forward pass, and trains with losses on them in
`model.fit`.
"""

from keras_tap import (
    callbacks,
    config,
    losses,
    plot,
    regularizers,
    schedules,
)
from keras_tap.model import TapModel
from keras_tap.paths import LayerRecord, list_layers
from keras_tap.tap import Tap
from keras_tap.training import train
from keras_tap.version import __version__

__all__ = [
    "LayerRecord",
    "Tap",
    "TapModel",
    "callbacks",
    "config",
    "__version__",
    "list_layers",
    "losses",
    "plot",
    "regularizers",
    "schedules",
    "train",
]
