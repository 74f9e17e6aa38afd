"""The front door of `keras-tap`: help, version and argument errors answer
without importing Keras, and commands keep the backend's start-up lines off
stderr unless `--verbose`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keras_tap.version import __version__

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "configs" / "digits.yaml"
# What TensorFlow and absl write to stderr while starting.
START_UP_MARKS = (
    "I0000",
    "W0000",
    "E0000",
    "absl",
    "oneDNN",
    "cuda",
    "cpu_feature_guard",
    "tensorflow",
)
# Runs the command line in-process, then reports on stderr which heavy
# modules it imported.
PROBE = """
import sys
from keras_tap.runs import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("keras", "tensorflow", "jax", "torch", "numpy")
               if m in sys.modules)
print(f"probe: code={code} heavy={heavy}", file=sys.stderr)
"""


def clean_env(**extra):
    """The environment without the test session's TensorFlow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    return {**env, **extra}


def run(args, *, env=None, cwd=ROOT, timeout=120):
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=env or clean_env(),
        cwd=cwd,
        timeout=timeout,
    )


def probe(*args):
    result = run([sys.executable, "-c", PROBE, *args])
    *err, last = result.stderr.splitlines()
    return result.stdout, "\n".join(err), last


@pytest.mark.parametrize(
    "args, code, out, err",
    [
        (["--help"], 0, "usage: keras-tap [-h] [--version] COMMAND", ""),
        ([], 0, "usage: keras-tap [-h] [--version] COMMAND", ""),
        (["--version"], 0, f"keras-tap {__version__}\n", ""),
        (["extract", "--help"], 0, "usage: keras-tap extract", ""),
        (["train"], 2, "", "keras-tap: error: the following arguments are "
         "required: CONFIG (see keras-tap train --help)"),
        (["trian"], 2, "", "keras-tap: error: argument COMMAND: invalid "
         "choice: 'trian'"),
        (["train", "x.yaml", "--epochs", "3"], 2, "",
         "keras-tap: error: unrecognized arguments: --epochs 3"),
        (["extract", "m.keras", "--taps", "a,,b", "--out", "f.npz"], 2, "",
         "keras-tap: error: argument --taps: expected tap names separated "
         "by commas, got 'a,,b'"),
    ],
    ids=["help", "bare", "version", "extract-help", "missing", "typo",
         "unknown-option", "bad-taps"],
)  # fmt: skip
def test_answers_without_importing_keras(args, code, out, err):
    stdout, stderr, last = probe(*args)
    assert last == f"probe: code={code} heavy=[]"
    assert stdout.startswith(out)
    assert stderr.startswith(err) and stderr.count("\n") == 0


def test_help_is_fast():
    start = time.perf_counter()
    result = run([sys.executable, "-m", "keras_tap", "--help"])
    seconds = time.perf_counter() - start
    print(f"python -m keras_tap --help: {seconds:.2f} s")
    assert result.returncode == 0 and result.stderr == ""
    assert seconds < 5


def test_help_describes_every_argument():
    commands = ("train", "validate", "layers", "extract", "plot")
    top, _, _ = probe("--help")
    for command in commands:
        assert f"    {command}  " in top
        text, _, _ = probe(command, "--help")
        body = text.split("\nexamples:\n")
        assert len(body) == 2 and f"keras-tap {command} " in body[1]
        lines = body[0].splitlines()
        start = next(
            i for i, line in enumerate(lines) if line.endswith("arguments:")
        )
        # Every argument line has a help text beside or below it.
        for i, line in enumerate(lines[start:], start):
            name = line.strip()
            if line.startswith("  ") and not line.startswith("   "):
                described = "  " in name or lines[i + 1].startswith(" " * 8)
                assert described, f"{command}: {name!r} has no help"
    text, _, _ = probe("extract", "--help")
    assert "(default: 32)" in text and "(default: x)" in text


def test_a_command_prints_no_start_up_lines(tmp_path):
    """`keras-tap validate` in a fresh process: nothing on stderr (without
    the fix, TensorFlow wrote about 9 lines there)."""
    result = run(
        [sys.executable, "-m", "keras_tap", "validate", str(DIGITS),
         "--set", "data.limit=64", "--set", f"run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{DIGITS}: OK")
    lines = result.stderr.splitlines()
    assert not [
        line for line in lines if any(mark in line for mark in START_UP_MARKS)
    ], lines
    assert result.stderr == ""


FAKE_KERAS = """
import os
os.write(2, b"I0000 start-up noise from C++\\n")
if os.environ.get("FAKE_KERAS_FAILS"):
    raise ImportError("fake keras is broken")


class backend:
    @staticmethod
    def backend():
        return "fake"
"""
IMPORT = """
import os, sys
from keras_tap.runs import cli
cli.import_keras(verbose=bool(sys.argv[1:]))
print(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
"""


@pytest.fixture
def fake_keras(tmp_path):
    (tmp_path / "keras.py").write_text(FAKE_KERAS)
    return clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")


def test_import_keras_hides_start_up_lines(fake_keras):
    result = run([sys.executable, "-c", IMPORT], env=fake_keras)
    assert (result.returncode, result.stdout, result.stderr) == (0, "3\n", "")
    env = {**fake_keras, "TF_CPP_MIN_LOG_LEVEL": "1"}
    result = run([sys.executable, "-c", IMPORT], env=env)
    assert (result.stdout, result.stderr) == ("1\n", "")  # the user's level


def test_verbose_shows_start_up_lines_and_keeps_the_environment(fake_keras):
    result = run([sys.executable, "-c", IMPORT, "verbose"], env=fake_keras)
    assert result.returncode == 0 and result.stdout == "None\n"
    assert result.stderr == "I0000 start-up noise from C++\n"


def test_a_failed_import_shows_what_was_hidden(fake_keras, tmp_path):
    env = {**fake_keras, "FAKE_KERAS_FAILS": "1"}
    result = run(
        [sys.executable, "-m", "keras_tap", "layers", "m.keras"],
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "I0000 start-up noise from C++\n"
        "keras-tap: error: fake keras is broken\n"
    )


def test_import_keras_tap_changes_no_environment():
    code = (
        "import os, sys\n"
        "import keras\n"
        "before = dict(os.environ), list(sys.path)\n"
        "import keras_tap as kt\n"
        "from keras_tap.runs import cli, commands, train\n"
        "kt.TapModel(keras.Sequential([keras.Input((3,)),"
        " keras.layers.Dense(2, name='d')]), 'd')\n"
        "print((dict(os.environ), list(sys.path)) == before)\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "True\n"
