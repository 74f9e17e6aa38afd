"""The backend-specific part of keras_tap, one small module per backend.

Everything else is written with `keras.ops`. `get()` returns the module for
the active Keras backend, or raises if keras_tap does not support it yet.
"""

import keras

SUPPORTED = ("tensorflow",)


def get():
    """The trainer module of the active Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_tap.training.trainers import tensorflow

        return tensorflow
    raise NotImplementedError(
        f"keras_tap supports the Keras backends {list(SUPPORTED)} for now; "
        f"the active backend is {backend!r}. Set KERAS_BACKEND=tensorflow "
        "before importing keras (JAX and PyTorch support are planned)."
    )
