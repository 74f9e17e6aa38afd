"""Trials of config-driven training as a pipeline runs it: the `keras-tap`
command line as a subprocess, on the backend of `KERAS_BACKEND`.

Covers: commands that load a run directory's `model.keras` (which needs
keras_tap's classes registered after Keras was imported by the CLI), a run
killed mid-epoch and resumed (weights equal an uninterrupted run, read
straight from the `.keras` files with h5py), and bad input that must name
the bad key and its closest valid choice in one line.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import yaml
from conftest import BACKEND

TINY = yaml.safe_load("""
model:
  class_name: Sequential
  config:
    name: tiny
    layers:
      - {class_name: InputLayer, config: {shape: [8, 8, 1]}}
      - class_name: Conv2D
        config: {name: conv1, filters: 4, kernel_size: 3, padding: same,
                 activation: relu}
      - {class_name: GlobalAveragePooling2D, config: {name: gap}}
      - class_name: Dense
        config: {name: out, units: 10, activation: softmax}
taps:
  c1: {layer: conv1, regularizer: {class_name: ActivityL1,
                                   config: {l1: 0.001}}}
compile:
  optimizer: {class_name: Adam, config: {learning_rate: 0.01}}
  loss: sparse_categorical_crossentropy
  metrics: [accuracy]
data: {dataset: sklearn_digits, limit: 120, batch_size: 16}
fit: {epochs: 2, verbose: 0}
run: {tensorboard: false, plots: false}
""")

pytest.importorskip("sklearn")


def env_of(backend=BACKEND):
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def keras_tap(*args, cwd, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "keras_tap.runs.cli", *map(str, args)],
        cwd=cwd,
        env=env or env_of(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    (path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(workdir):
    """One short run of the tiny config, on this backend."""
    result = keras_tap(
        "train", "tiny.yaml", "--set", "run.dir=run", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    return workdir / "run", result


def weights(path):
    """{h5 dataset path: array} of a `.keras` file's weights."""
    import h5py

    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    out = {}
    with h5py.File(io.BytesIO(data), "r") as file:
        file.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()])
                if hasattr(obj, "shape")
                else None
            )
        )
    return out


def test_train_is_quiet_and_writes_the_run_directory(trained):
    run_dir, result = trained
    assert result.stderr == "", result.stderr
    for name in (
        "config.yaml",
        "run.json",
        "model.keras",
        "base.keras",
        "history.csv",
        "history.json",
        "checkpoints/state.json",
    ):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backend"] == BACKEND
    assert [s["backend"] for s in info["sessions"]] == [BACKEND]
    history = json.loads((run_dir / "history.json").read_text())
    assert history["epoch"] == [0, 1]


@pytest.mark.parametrize("command", ["extract", "features"])
def test_commands_load_a_run_directory(trained, command):
    # The CLI imports keras_tap before Keras: TapModel must still be
    # registered when model.keras is loaded.
    run_dir, _ = trained
    args = {
        "extract": [
            "extract",
            run_dir,
            "--taps",
            "c1",
            "--reduce",
            "mean",
            "--out",
            run_dir.parent / "feats.npz",
        ],
        "features": [
            "plot",
            "--features",
            run_dir,
            "--taps",
            "conv1",
            "--out",
            run_dir.parent / "maps",
        ],
    }[command]
    result = keras_tap(*args, cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    assert "Could not locate class" not in result.stderr
    if command == "extract":
        feats = np.load(run_dir.parent / "feats.npz")
        assert feats["c1"].shape[1:] == (4,)


# Epochs of 24 steps: the killed run signals itself before step 12 of the
# second (tests/self_kill.py).
STEPS = "fit.steps_per_epoch=24"
SELF_KILL = os.path.join(os.path.dirname(__file__), "self_kill.py")


@pytest.fixture(scope="module")
def reference(workdir):
    result = keras_tap(
        "train",
        "tiny.yaml",
        "--set",
        "run.dir=ref",
        "--set",
        STEPS,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    return workdir / "ref"


@pytest.mark.skipif(BACKEND == "tensorflow", reason="jax and torch trials")
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(reference, workdir):
    # SIGTERM on JAX, SIGKILL on PyTorch (neither leaves a handler time).
    sig = "SIGTERM" if BACKEND == "jax" else "SIGKILL"
    run_dir = workdir / f"killed_{sig}"
    train = ["train", "tiny.yaml", "--set", f"run.dir={run_dir.name}",
             "--set", STEPS]  # fmt: skip
    process = subprocess.run(
        [sys.executable, SELF_KILL, "1", "12", sig, *train],
        cwd=workdir,
        env=env_of(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    assert process.returncode == -getattr(signal, sig)
    state = run_dir / "checkpoints" / "state.json"
    assert json.loads(state.read_text())["epoch"] == 0  # killed in epoch 2
    result = keras_tap(*train, "--resume", cwd=workdir)
    assert result.returncode == 0, result.stderr
    info = json.loads((run_dir / "run.json").read_text())
    sessions = [(s["backend"], s["initial_epoch"]) for s in info["sessions"]]
    assert sessions == [(BACKEND, 0), (BACKEND, 1)]
    history = json.loads((run_dir / "history.json").read_text())
    assert history["epoch"] == [0, 1]
    expected = weights(reference / "base.keras")
    got = weights(run_dir / "base.keras")
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(
            got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key
        )


@pytest.mark.skipif(BACKEND == "tensorflow", reason="jax and torch trials")
def test_resumed_on_the_other_backend(trained, workdir):
    reference, _ = trained
    other = "torch" if BACKEND == "jax" else "jax"
    first = keras_tap(
        "train",
        "tiny.yaml",
        "--set",
        "run.dir=cross",
        "--set",
        "fit.epochs=1",
        cwd=workdir,
    )
    assert first.returncode == 0, first.stderr
    result = keras_tap(
        "train",
        "tiny.yaml",
        "--set",
        "run.dir=cross",
        "--resume",
        cwd=workdir,
        env=env_of(other),
    )
    assert result.returncode == 0, result.stderr
    info = json.loads((workdir / "cross" / "run.json").read_text())
    sessions = [(s["backend"], s["initial_epoch"]) for s in info["sessions"]]
    assert sessions == [(BACKEND, 0), (other, 1)]
    expected = weights(reference / "base.keras")
    got = weights(workdir / "cross" / "base.keras")
    for key in expected:  # Another backend: float rounding only.
        np.testing.assert_allclose(
            got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key
        )


BAD = [
    ("compile.optimizer={class_name: Adam, config: {learning_ratee: 0.1}}",
     "compile.optimizer.config.learning_ratee: unknown argument of Adam; "
     "did you mean 'learning_rate'?"),
    ("compile.loss={class_name: SparseCategoricalCrossentropy, "
     "config: {from_logit: true}}",
     "compile.loss.config.from_logit: unknown argument of "
     "SparseCategoricalCrossentropy; did you mean 'from_logits'?"),
    ("taps.c1.weight={class_name: CosineDecay, config: {initial: 1, "
     "stepz: 3}}",
     "taps.c1.weight.config.stepz: unknown argument of CosineDecay; did you "
     "mean 'steps'?"),
    ("taps.c1.regularizer={class_name: ActivityL1, config: {l2: 0.1}}",
     "taps.c1.regularizer.config.l2: unknown argument of ActivityL1 "
     "(expected one of l1)"),
    ("model.config.layers[1].config.filter=3",
     "model.config.layers[1].config.filter: unknown argument of Conv2D; did "
     "you mean 'filters'?"),
    ("compile.loss=sparse_categorical_crossentropyy",
     "compile.loss: Unknown loss: 'sparse_categorical_crossentropyy'. Did "
     "you mean ['sparse_categorical_crossentropy'"),
    ("taps.c1.layer=conv9", "taps.c1.layer: Tap 'conv9' in model 'tiny': no "
     "layer is named 'conv9'. Closest valid paths: ['conv1']"),
    ("backend=pytorch", None),
    ("distribution=data_parallel", "distribution.strategy: "),
    ("distribution=mirrored", "distribution.strategy: 'mirrored' is a "
     "tf.distribute strategy"),
]  # fmt: skip


# As a subprocess: these; in-process (the same `main`, faster): the rest.
SUBPROCESS = {BAD[0][0], BAD[8][0], BAD[9][0]}


@pytest.mark.parametrize("override, message", BAD)
def test_bad_config_is_one_clear_line(
    workdir, override, message, monkeypatch, capsys
):
    if override == "distribution=data_parallel" and BACKEND == "jax":
        pytest.skip("data_parallel runs on JAX")
    if override == "distribution=mirrored" and BACKEND == "tensorflow":
        pytest.skip("mirrored runs on TensorFlow")
    if override == "backend=pytorch":
        message = "backend: unknown backend 'pytorch'; did you mean 'torch'?"
    if override in SUBPROCESS:
        result = keras_tap(
            "validate", "tiny.yaml", "--set", override, cwd=workdir, timeout=60
        )
    else:
        from keras_tap.runs import cli

        monkeypatch.chdir(workdir)
        with pytest.raises(SystemExit) as exit:
            cli.main(["validate", "tiny.yaml", "--set", override])
        result = subprocess.CompletedProcess(
            [], exit.value.code, *capsys.readouterr()
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("keras-tap: error: " + message), (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if override.startswith("distribution="):
        # The suggestion fits the active backend.
        if BACKEND == "torch":
            assert "runs no distribution strategy" in result.stderr
        elif BACKEND == "jax":
            assert "on JAX use 'data_parallel'" in result.stderr
        else:
            assert "on TensorFlow use 'mirrored'" in result.stderr


def test_unknown_keras_backend_in_the_environment(workdir):
    result = keras_tap(
        "validate", "tiny.yaml", cwd=workdir, env=env_of("pytorch"), timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == (
        "keras-tap: error: KERAS_BACKEND: unknown backend 'pytorch' in the "
        "environment; did you mean 'torch'? (expected one of tensorflow, "
        "jax, torch; or pass --backend)\n"
    )


def test_help_imports_no_backend(workdir):
    code = (
        "import sys\n"
        "from keras_tap.runs import cli\n"
        "try:\n"
        "    cli.main(['train', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax', 'torch') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workdir,
        env=env_of(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert time.monotonic() - start < 10
