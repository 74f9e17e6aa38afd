"""The backend-specific part of keras_tap, one small module per backend.

Everything else is written with `keras.ops`. `get()` returns the module for
the active Keras backend: `tensorflow`, `jax` or `torch` (the last two share
`portable`).
"""

import importlib

import keras

SUPPORTED = ("tensorflow", "jax", "torch")


def get():
    """The trainer module of the active Keras backend.

    Raises:
        NotImplementedError: on a backend other than `SUPPORTED`.
    """
    backend = keras.backend.backend()
    if backend not in SUPPORTED:
        raise NotImplementedError(
            f"keras_tap supports the Keras backends {list(SUPPORTED)}; the "
            f"active backend is {backend!r}. Set KERAS_BACKEND to one of "
            "them before importing keras."
        )
    return importlib.import_module(f"keras_tap.training.trainers.{backend}")
