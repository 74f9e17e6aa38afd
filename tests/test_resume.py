"""Killing `keras-tap train` with SIGKILL mid-epoch and resuming it.

The resumed run must keep every epoch completed before the kill and end
with the weights of a run that was never interrupted.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_tap.runs import cli
from keras_tap.runs import train as training

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "configs" / "digits.yaml"
SELF_KILL = ROOT / "tests" / "self_kill.py"
EPOCHS = 4
# Many tiny steps (64 an epoch), so that the kill lands in the middle of an
# epoch; TapStatistics and the schedules keep their state across the resume
# as well.
SETTINGS = [
    "data.limit=160",
    "data.batch_size=2",
    f"fit.epochs={EPOCHS}",
    "fit.verbose=0",
    "run.plots=false",
    "run.seed=7",
]
TIMEOUT = 240


def command(run_dir, *extra):
    args = [sys.executable, "-m", "keras_tap.runs.cli", "train", str(DIGITS)]
    for setting in SETTINGS + [f"run.dir={run_dir}"]:
        args += ["--set", setting]
    return args + list(extra)


def run(args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process):
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err[-3000:]
    return out


def read_state(run_dir):
    try:
        with open(run_dir / "checkpoints" / "state.json") as file:
            return json.load(file)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def final_weights(run_dir):
    model = training.load_run(run_dir)
    saved = keras.saving.load_model(run_dir / "model.keras")
    for got, expected in zip(model.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(got, expected)
    return model.get_weights(), int(model.optimizer.iterations.numpy())


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = run(command(reference_dir), tmp_path)
    # The run kills itself with SIGKILL before batch 32 of epoch 2 (of 64):
    # epochs 0 and 1 are complete, epoch 2 is half done.
    killed = run(
        [sys.executable, str(SELF_KILL), "2", "32", "SIGKILL"]
        + command(killed_dir)[3:],
        tmp_path,
    )
    killed.communicate(timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL
    at_kill = read_state(killed_dir)
    assert at_kill["epoch"] == 1
    assert not (killed_dir / "model.keras").exists()

    # Without --resume the run directory is refused.
    with pytest.raises(SystemExit) as refused:
        cli.main(command(killed_dir)[3:])
    assert refused.value.code == 2

    out = finish(run(command(killed_dir, "--resume"), tmp_path))
    assert f"resumed after epoch {at_kill['epoch'] + 1}\n" in out
    finish(reference)

    with open(killed_dir / "history.json") as file:
        resumed_history = json.load(file)
    with open(reference_dir / "history.json") as file:
        reference_history = json.load(file)
    # No completed epoch is lost or repeated, and those before the kill are
    # kept exactly as they were logged.
    assert resumed_history["epoch"] == list(range(EPOCHS))
    assert set(resumed_history) == set(reference_history)
    done = at_kill["epoch"] + 1
    for key, values in at_kill["history"].items():
        assert resumed_history[key][:done] == values
    for key, values in reference_history.items():
        np.testing.assert_allclose(
            resumed_history[key], values, rtol=1e-4, atol=1e-5, err_msg=key
        )

    weights, steps = final_weights(killed_dir)
    reference_weights, reference_steps = final_weights(reference_dir)
    assert steps == reference_steps == EPOCHS * 64
    assert len(weights) == len(reference_weights)
    for got, expected in zip(weights, reference_weights):
        np.testing.assert_allclose(got, expected, atol=1e-5)
