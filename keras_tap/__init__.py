"""keras_tap: losses, regularizers and extraction on intermediate layers.

`kt.TapModel(model, taps)` exposes any layer's output alongside the
predictions from one forward pass, and trains with losses on them in
`model.fit`.

The public surface is this module: `TapModel`, `Tap`, `FeatureModel`,
`list_layers`, `LayerRecord`, `train`, and the modules `losses`,
`regularizers`, `schedules`, `callbacks`, `plot` and `config`.

Names are loaded when first used, so that `keras-tap --help` answers
without importing a Keras backend. When Keras is already imported (any
program that builds or loads models imports it first), everything is loaded
at once, so that `keras.models.load_model` finds keras_tap's registered
classes after a bare `import keras_tap`.
"""

import importlib
import sys

from keras_tap.version import __version__

# Public name -> (module, attribute); attribute None: the module itself.
_EXPORTS = {
    "TapModel": ("keras_tap.taps.model", "TapModel"),
    "Tap": ("keras_tap.taps.tap", "Tap"),
    "FeatureModel": ("keras_tap.taps.features", "FeatureModel"),
    "LayerRecord": ("keras_tap.taps.paths", "LayerRecord"),
    "list_layers": ("keras_tap.taps.paths", "list_layers"),
    "train": ("keras_tap.runs.train", "train"),
    "losses": ("keras_tap.training.losses", None),
    "regularizers": ("keras_tap.training.regularizers", None),
    "schedules": ("keras_tap.training.schedules", None),
    "callbacks": ("keras_tap.inspect.callbacks", None),
    "plot": ("keras_tap.inspect.plot", None),
    "config": ("keras_tap.runs.config", None),
    "attribution": ("keras_tap.taps.attribution", None),
    "edit": ("keras_tap.taps.edit", "edit"),
    "edits": ("keras_tap.taps.edits", None),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(
            f"module 'keras_tap' has no attribute {name!r}"
        ) from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _load_all():
    """Import every public name (and so register every serializable
    class with Keras)."""
    for name in _EXPORTS:
        __getattr__(name)


if "keras" in sys.modules:
    _load_all()
