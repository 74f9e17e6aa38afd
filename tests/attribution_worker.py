"""Run by test_attribution on one backend (KERAS_BACKEND): gradients and
edits checked against that backend's own autodiff and a model written out
by hand. Exits non-zero on a mismatch."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tap as kt  # noqa: E402


def main():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((10, 10, 3))
    conv1 = keras.layers.Conv2D(6, 3, activation="relu", name="conv1")
    conv2 = keras.layers.Conv2D(5, 3, activation="relu", name="conv2")
    pool = keras.layers.GlobalAveragePooling2D()
    dense = keras.layers.Dense(4, name="logits")
    model = keras.Model(inputs, dense(pool(conv2(conv1(inputs)))))
    x = np.random.default_rng(0).normal(size=(3, 10, 10, 3)).astype(
        "float32"
    )
    _, taps, grads = kt.TapModel(model, ["conv1"]).gradients(x, target=2)
    a1 = conv1(x)

    def head(a):
        return dense(pool(conv2(a)))[:, 2]

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        ref = jax.grad(lambda a: head(a).sum())(a1)
    else:
        import torch

        a1 = a1.detach().requires_grad_(True)
        (ref,) = torch.autograd.grad(head(a1).sum(), a1)
    ref = keras.ops.convert_to_numpy(ref)
    got = keras.ops.convert_to_numpy(grads["conv1"])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(taps["conv1"]),
        keras.ops.convert_to_numpy(a1), atol=1e-6,
    )
    # An edit: conv2 zeroed == the head's bias, every way the model runs.
    before = model.predict(x, verbose=0)
    bias = keras.ops.convert_to_numpy(dense.bias)
    with kt.edit(model, {"conv2": kt.edits.Zero()}):
        for out in (model(x), model.predict(x, verbose=0)):
            out = keras.ops.convert_to_numpy(out)
            np.testing.assert_allclose(out, np.tile(bias, (3, 1)), atol=1e-6)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)
    assert "call" not in vars(conv2)
    print("ok", backend)


if __name__ == "__main__":
    sys.exit(main())
