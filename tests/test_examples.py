"""The research example: a PCGrad `TapModel` subclass.

The example's `train_step` is TensorFlow code (`tf.GradientTape`): the
tests of its step run on TensorFlow, in a fresh process with
`KERAS_BACKEND=tensorflow` when the suite runs on another backend. Its
gradient surgery (`pcgrad`) is `keras.ops` and runs on every backend.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "research_pcgrad.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("research_pcgrad", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(backend):
    return dict(
        os.environ,
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
    )


def on_tensorflow(test_name):
    """Whether to run `test_name` here: True on TensorFlow. On another
    backend, runs that test of this file in a fresh process on TensorFlow
    (asserting it passes) and returns False."""
    if BACKEND == "tensorflow":
        return True
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{pathlib.Path(__file__).resolve()}::{test_name}",
        ],
        env=_env("tensorflow"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout, done.stdout[-3000:]
    return False


def _flat(grads):
    return np.concatenate([np.ravel(g) for g in grads])


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["agree", "conflict"])
def test_pcgrad_projection_matches_numpy(example, sign):
    rng = np.random.default_rng(0)
    main = [rng.normal(size=(3, 2)), rng.normal(size=(4,))]
    tap = [sign * m + 0.3 * rng.normal(size=m.shape) for m in main]
    grads, stats = to_numpy(
        example.pcgrad(
            [keras.ops.convert_to_tensor(g, "float32") for g in main],
            [keras.ops.convert_to_tensor(g, "float32") for g in tap],
        )
    )
    m, t = _flat(main), _flat(tap)
    dot = m @ t
    if dot < 0:
        expected = (m - dot / (t @ t) * t) + (t - dot / (m @ m) * m)
    else:
        expected = m + t
    np.testing.assert_allclose(_flat(grads), expected, rtol=1e-5, atol=1e-5)
    assert float(stats["conflict"]) == float(dot < 0)
    assert float(stats["cosine"]) == pytest.approx(
        dot / np.sqrt((m @ m) * (t @ t)), rel=1e-5
    )
    if dot < 0:  # the projected parts no longer conflict
        projected_main = m - dot / (t @ t) * t
        assert projected_main @ t == pytest.approx(0.0, abs=1e-6)


def test_pcgrad_step_matches_a_hand_computed_update(example):
    if not on_tensorflow("test_pcgrad_step_matches_a_hand_computed_update"):
        return
    import tensorflow as tf

    x, y = example.load_data(samples=64)
    tap_model = example.build_model()
    tap_model.compile(
        keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    variables = tap_model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    with tf.GradientTape(persistent=True) as tape:
        y_pred = tap_model(x, training=True)
        main, aux = tap_model.compute_loss_parts(x, y, y_pred)
    grads_main = [
        np.zeros(v.shape) if g is None else g.numpy()
        for g, v in zip(tape.gradient(main, variables), variables)
    ]
    grads_tap = [
        np.zeros(v.shape) if g is None else g.numpy()
        for g, v in zip(tape.gradient(aux, variables), variables)
    ]
    m, t = _flat(grads_main), _flat(grads_tap)
    dot = m @ t
    combined = m + t
    if dot < 0:
        combined = (m - dot / (t @ t) * t) + (t - dot / (m @ m) * m)

    history = tap_model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    after = _flat([v.numpy() for v in variables])
    np.testing.assert_allclose(after, _flat(before) - 0.1 * combined, atol=1e-5)
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["prediction_grad_norm"] == pytest.approx(
        np.sqrt(m @ m), rel=1e-4
    )
    assert logs["tap_grad_norm"] == pytest.approx(np.sqrt(t @ t), rel=1e-4)
    assert logs["conflict_rate"] == float(dot < 0)
    assert logs["loss"] == pytest.approx(float(main + aux), rel=1e-4)
    for key in ("predictions_loss", "block1_loss", "features_loss"):
        assert np.isfinite(logs[key])
    assert "block1_accuracy" in logs


def test_pcgrad_step_runs_one_forward_pass(example):
    if not on_tensorflow("test_pcgrad_step_runs_one_forward_pass"):
        return
    import tensorflow as tf

    x, y = example.load_data(samples=64)
    tap_model = example.build_model()
    calls = []
    base_call = tap_model.call

    def counting_call(*args, **kwargs):
        calls.append(1)
        return base_call(*args, **kwargs)

    tap_model.call = counting_call
    tap_model.compile(
        "sgd", loss=keras.losses.SparseCategoricalCrossentropy(True)
    )
    tap_model.train_step((tf.constant(x), tf.constant(y)))
    assert len(calls) == 1


def test_example_refuses_another_backend_by_name(example):
    if BACKEND != "tensorflow":
        message = f"tf.GradientTape.*TensorFlow backend.*'{BACKEND}'"
        with pytest.raises(RuntimeError, match=message):
            example.build_model()
        return
    message = "tf.GradientTape.*TensorFlow backend.*'jax'"
    done = _run_script("jax", samples=64)
    assert done.returncode != 0
    assert "RuntimeError" in done.stderr
    assert re.search(message, done.stderr), done.stderr[-3000:]


def _run_script(backend, samples):
    """The example as a script for one epoch, on `backend`."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "1", "--samples",
         str(samples)],
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )


def test_example_runs_as_a_script():
    # Whatever the suite's backend: the example is TensorFlow code.
    done = _run_script("tensorflow", samples=256)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val_accuracy" in done.stdout and "conflict_rate" in done.stdout
