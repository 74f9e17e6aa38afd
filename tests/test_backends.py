"""keras_tap on every Keras backend: the same training on TensorFlow, JAX
and PyTorch, each in a subprocess, from the same initial weights."""

import importlib.util
import os
import subprocess
import sys

import backend_worker as worker
import keras
import numpy as np
import pytest
from keras import ops

pytestmark = pytest.mark.cross_backend

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = [
    b for b, module in (("tensorflow", "tensorflow"), ("jax", "jax"),
                        ("torch", "torch"))
    if importlib.util.find_spec(module) is not None
]


def run_worker(backend, folder, *modes, **environ):
    env = dict(os.environ, KERAS_BACKEND=backend, **environ)
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "backend_worker.py"), folder,
         *modes],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (backend, result.stderr[-3000:])


def l1_per_sample(y_true, y_pred):
    """`keras.regularizers.L1(REG)` on each sample (Keras averages it)."""
    return worker.REG * ops.sum(ops.abs(y_pred), axis=-1)


def plain_reference(folder, x, y, t, epochs):
    """The same losses on a plain multi-output Keras model."""
    base = worker.student()
    base.load_weights(os.path.join(folder, "student.weights.h5"))
    teach = worker.teacher()
    teach.load_weights(os.path.join(folder, "teacher.weights.h5"))
    teacher_mid = keras.Model(
        teach.inputs, teach.get_layer("t_mid").output
    ).predict(x, verbose=0)
    plain = keras.Model(
        base.inputs,
        [base.outputs[0]]
        + [base.get_layer(n).output for n in ("hidden", "feat", "mid")],
    )
    plain.compile(
        optimizer=keras.optimizers.SGD(worker.LEARNING_RATE),
        loss=["mse", l1_per_sample, "mse", "mse"],
        loss_weights=[1.0, 1.0, worker.FEAT_WEIGHT, worker.TEACHER_WEIGHT],
    )
    targets = [y, np.zeros((len(x), 8), "float32"), t, teacher_mid]
    plain.fit(x, targets, batch_size=len(x), epochs=epochs, shuffle=False,
              verbose=0)
    return worker.weights(base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train on every installed backend; resume each `.keras` file on the
    next backend (tensorflow -> jax -> torch -> tensorflow)."""
    folder = str(tmp_path_factory.mktemp("backends"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    t = rng.normal(size=(16, 3)).astype("float32")
    np.savez(os.path.join(folder, "data.npz"), x=x, y=y, t=t)
    keras.utils.set_random_seed(1)
    worker.student().save_weights(
        os.path.join(folder, "student.weights.h5"))
    worker.teacher().save_weights(
        os.path.join(folder, "teacher.weights.h5"))
    resumed = []
    for i, backend in enumerate(BACKENDS):
        modes = ["train"]
        if i > 0:
            modes.insert(0, f"resume:{BACKENDS[i - 1]}")
            resumed.append((BACKENDS[i - 1], backend))
        run_worker(backend, folder, *modes)
    if len(BACKENDS) > 1:
        run_worker(BACKENDS[0], folder, f"resume:{BACKENDS[-1]}")
        resumed.append((BACKENDS[-1], BACKENDS[0]))
    return folder, (x, y, t), resumed


def load(folder, name):
    return dict(np.load(os.path.join(folder, f"{name}.npz")))


def assert_weights_close(got, expected, what):
    assert sorted(got) == sorted(expected), what
    for key in expected:
        np.testing.assert_allclose(
            got[key], expected[key], atol=1e-4, rtol=0, err_msg=f"{what} {key}"
        )


def test_three_backends_train_alike_and_like_plain_keras(trained):
    folder, (x, y, t), _ = trained
    reference = plain_reference(folder, x, y, t, epochs=3)
    initial = worker.student()
    initial.load_weights(os.path.join(folder, "student.weights.h5"))
    moved = max(
        np.abs(reference[k] - v).max()
        for k, v in worker.weights(initial).items()
    )
    assert moved > 1e-3  # the steps change the weights
    for backend in BACKENDS:
        assert_weights_close(load(folder, backend), reference, backend)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs two Keras backends")
def test_keras_file_saved_on_one_backend_trains_on_another(trained):
    folder, (x, y, t), resumed = trained
    reference = plain_reference(folder, x, y, t, epochs=4)
    assert resumed
    for source, backend in resumed:
        got = load(folder, f"{source}_to_{backend}")
        assert_weights_close(got, reference, f"{source} -> {backend}")


@pytest.mark.skipif("jax" not in BACKENDS, reason="needs JAX")
def test_jax_data_parallel_on_two_devices_equals_one_device(trained):
    folder, _, _ = trained
    run_worker(
        "jax",
        folder,
        "data_parallel",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert_weights_close(
        load(folder, "data_parallel"), load(folder, "jax"), "DataParallel"
    )
