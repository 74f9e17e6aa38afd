"""keras_tap: losses, regularizers and extraction on intermediate layers.

`kt.TapModel(model, taps)` exposes any layer's output alongside the
predictions from one forward pass, and trains with losses on them in
`model.fit`.
"""

from keras_tap import callbacks
from keras_tap import losses
from keras_tap import plot
from keras_tap import regularizers
from keras_tap import schedules
from keras_tap.model import TapModel
from keras_tap.paths import LayerRecord
from keras_tap.paths import list_layers
from keras_tap.tap import Tap
from keras_tap.version import __version__

__all__ = [
    "LayerRecord",
    "Tap",
    "TapModel",
    "callbacks",
    "__version__",
    "list_layers",
    "losses",
    "plot",
    "regularizers",
    "schedules",
]
