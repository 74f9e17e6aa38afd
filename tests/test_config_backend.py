"""The `backend:` config key and `keras-tap --backend`: validation, the
environment, `kt.train`'s check, and runs on JAX and PyTorch (which also
resumes a JAX run on PyTorch)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest
import yaml

from keras_tap.runs import backends, cli, config
from keras_tap.runs import train as training
from keras_tap.runs.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "configs" / "digits.yaml"
ACTIVE = keras.backend.backend()
OTHER = next(name for name in backends.BACKENDS if name != ACTIVE)
# A few steps of one epoch on a few samples; no plots, logs or
# process-wide determinism.
TINY = [
    "data.limit=64",
    "data.batch_size=16",
    "fit.epochs=1",
    "fit.steps_per_epoch=2",
    "fit.verbose=0",
    "run.deterministic=false",
    "run.plots=false",
    "run.tensorboard=false",
]
# Runs the command line in-process, then reports on stderr whether it
# imported Keras.
PROBE = """
import sys
from keras_tap.runs import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(f"probe: code={code} keras={'keras' in sys.modules}", file=sys.stderr)
"""


def tiny_mlp(run_dir, **keys):
    """A small config: an MLP on the digits with one regularized tap, one
    step of one epoch."""
    layers = [
        {"class_name": "InputLayer", "config": {"shape": [8, 8, 1]}},
        {"class_name": "Flatten", "config": {"name": "flat"}},
        {"class_name": "Dense", "config": {"name": "hidden", "units": 8}},
        {"class_name": "Dense", "config": {"name": "out", "units": 10}},
    ]
    raw = {
        "model": {
            "class_name": "Sequential",
            "config": {"name": "mlp", "layers": layers},
        },
        "taps": {"hidden": {"regularizer": "activity_l2"}},
        "compile": {"loss": "sparse_categorical_crossentropy"},
        "data": {"limit": 32, "batch_size": 16},
        "fit": {"epochs": 1, "steps_per_epoch": 1, "verbose": 0},
        "run": {
            "dir": str(run_dir),
            "deterministic": False,
            "plots": False,
            "tensorboard": False,
        },
    }
    return {**raw, **keys}


def sets(*assignments):
    return [item for a in assignments for item in ("--set", a)]


def run_cli(*args, capsys):
    """`cli.main(args)` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def environment(**extra):
    """The environment without a backend choice or TensorFlow settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "KERAS_BACKEND" and not key.startswith("TF_")
    }
    return {**env, **extra}


def keras_tap(*args, cwd, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "keras_tap", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or environment(),
        timeout=timeout,
    )


def digits_with_backend(tmp_path, backend):
    """digits.yaml with a `backend:` key, in `tmp_path`."""
    path = tmp_path / f"digits_{backend}.yaml"
    path.write_text(DIGITS.read_text() + f"\nbackend: {backend}\n")
    return path


def read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def losses(history):
    return [
        value
        for key, values in history.items()
        if key.endswith("loss")
        for value in values
    ]


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "value, message",
    [
        ("pytorch", "unknown backend 'pytorch'; did you mean 'torch'?"),
        ("tf", "unknown backend 'tf'; did you mean 'tensorflow'?"),
        ("JAX", "unknown backend 'JAX'; did you mean 'jax'?"),
        ("tensorflw", "unknown backend 'tensorflw'; did you mean "
         "'tensorflow'?"),
        ("numpy", "unknown backend 'numpy' (expected one of"),
        ("3", "unknown backend 3 (expected one of"),
    ],
)  # fmt: skip
def test_an_unknown_backend_names_the_valid_ones(value, message):
    with pytest.raises(ConfigError) as info:
        config.load(DIGITS, [f"backend={value}"])
    assert info.value.path == "backend"
    assert str(info.value).startswith(f"backend: {message}")
    assert str(info.value).endswith(
        "(expected one of tensorflow, jax, torch, or null for KERAS_BACKEND "
        "or Keras's default)"
    )


def test_a_misspelt_backend_key_is_an_unknown_key():
    with pytest.raises(ConfigError, match=r"^backnd: unknown key; did you "
                       r"mean 'backend'\?"):  # fmt: skip
        config.load({"backnd": "jax"})


@pytest.mark.parametrize("backend", [None, *backends.BACKENDS])
def test_the_backend_is_kept_and_round_trips(backend, tmp_path):
    overrides = [f"run.dir={tmp_path / 'run'}"]
    if backend is not None:
        overrides.append(f"backend={backend}")
    cfg = config.load(DIGITS, overrides)
    assert cfg.backend == backend and cfg.to_dict()["backend"] == backend
    assert config.load(cfg.to_dict()) == cfg
    assert yaml.safe_load(cfg.to_yaml())["backend"] == backend
    assert backends.of_config(cfg) == backend
    assert backends.of_config(DIGITS, overrides) == backend


def test_select_the_flag_the_config_and_the_environment():
    env = {"KERAS_BACKEND": "tensorflow"}
    assert backends.select(None, None, env) == (None, None)
    assert backends.select("torch", "jax", env) == ("torch", "--backend")
    assert backends.select(None, "jax", {}) == ("jax", "backend")
    assert backends.select(None, "jax", {"KERAS_BACKEND": "jax"}) == (
        "jax",
        "backend",
    )
    with pytest.raises(ConfigError) as info:
        backends.select(None, "jax", env)
    assert str(info.value) == (
        "backend: the config asks for 'jax', but KERAS_BACKEND is "
        "'tensorflow' in the environment; choose one: unset KERAS_BACKEND "
        "(or set it to 'jax'), remove `backend:` from the config, or pass "
        "--backend tensorflow (or --backend jax)"
    )


def test_a_missing_backend_package_says_what_to_install(
    tmp_path, capsys, monkeypatch
):
    real = backends.importlib.util.find_spec
    monkeypatch.setattr(
        backends.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "jax" else real(name, *args),
    )
    with pytest.raises(ConfigError) as info:
        backends.installed("jax")
    assert str(info.value) == (
        "backend: backend 'jax' needs the `jax` package: pip install jax"
    )
    # The command line checks before it imports Keras.
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    code, _, err = run_cli(
        "validate", DIGITS, "--backend", "jax", capsys=capsys
    )
    assert code == 2
    assert err == (
        "keras-tap: error: --backend: backend 'jax' needs the `jax` "
        "package: pip install jax\n"
    )
    assert "KERAS_BACKEND" not in os.environ


def test_an_unknown_backend_flag_is_refused(capsys):
    code, _, err = run_cli(
        "validate", DIGITS, "--backend", "pytorch", capsys=capsys
    )
    assert code == 2
    assert err.startswith(
        "keras-tap: error: argument --backend: unknown backend 'pytorch'; "
        "did you mean 'torch'?"
    )
    assert err.count("\n") == 1


# --------------------------------------------- Keras is imported already


def test_train_refuses_a_config_for_another_backend(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        training.train(tiny_mlp(run_dir, backend=OTHER))
    assert str(info.value) == (
        f"backend: asks for the {OTHER!r} backend, but Keras runs on "
        f"{ACTIVE!r} in this process (Keras chooses its backend once, when "
        f"it is first imported); set KERAS_BACKEND={OTHER} before importing "
        "Keras, or run `keras-tap train`, which sets it from the config"
    )
    assert not run_dir.exists()


def test_the_command_line_in_a_process_with_keras_refuses_another_backend(
    tmp_path, capsys
):
    path = digits_with_backend(tmp_path, OTHER)
    code, _, err = run_cli(
        "validate", path, *sets(*TINY), capsys=capsys
    )
    assert code == 2
    assert err.startswith(
        f"keras-tap: error: backend: asks for the {OTHER!r} backend, but "
        f"Keras runs on {ACTIVE!r} in this process"
    )
    code, _, err = run_cli(
        "validate", DIGITS, "--backend", OTHER, *sets(*TINY), capsys=capsys
    )
    assert code == 2 and err.startswith("keras-tap: error: --backend: ")


def test_train_on_the_running_backend_records_it(tmp_path):
    run_dir = tmp_path / "run"
    run = training.train(tiny_mlp(run_dir, backend=ACTIVE))
    assert run.backend == ACTIVE and run.files["run"] == run_dir / "run.json"
    info = read_json(run_dir / "run.json")
    assert info["backend"] == ACTIVE and info["keras"] == keras.__version__
    assert info["sessions"] == [
        {"backend": ACTIVE, "keras": keras.__version__, "initial_epoch": 0}
    ]
    state = read_json(run_dir / "checkpoints" / "state.json")
    assert state["backend"] == ACTIVE
    assert yaml.safe_load((run_dir / "config.yaml").read_text())[
        "backend"
    ] == ACTIVE


# ------------------------------------------------------ fresh processes


def test_the_environment_and_the_config_disagree(tmp_path):
    """No silent choice, and no Keras import to say so."""
    path = digits_with_backend(tmp_path, "jax")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "train", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment(KERAS_BACKEND="torch"),
        timeout=120,
    )
    *err, last = result.stderr.splitlines()
    assert last == "probe: code=2 keras=False"
    assert err == [
        "keras-tap: error: backend: the config asks for 'jax', but "
        "KERAS_BACKEND is 'torch' in the environment; choose one: unset "
        "KERAS_BACKEND (or set it to 'jax'), remove `backend:` from the "
        "config, or pass --backend torch (or --backend jax)"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """`keras-tap train` of a config with `backend: jax`, in a fresh
    process without KERAS_BACKEND: the run directory, its output and what
    it recorded right after."""
    pytest.importorskip("jax")
    tmp_path = tmp_path_factory.mktemp("backend")
    path = digits_with_backend(tmp_path, "jax")
    run_dir = tmp_path / "run"
    result = keras_tap(
        "train", path, *sets(*TINY, f"run.dir={run_dir}"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "config": path,
        "run_dir": run_dir,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "run": read_json(run_dir / "run.json"),
        "history": read_json(run_dir / "history.json"),
    }


def test_train_with_backend_jax_runs_on_jax(jax_run):
    assert "(backend jax)" in jax_run["stdout"]
    assert "oneDNN" not in jax_run["stderr"]  # TF's start-up lines: hidden
    assert jax_run["run"]["backend"] == "jax"
    assert [s["backend"] for s in jax_run["run"]["sessions"]] == ["jax"]
    values = losses(jax_run["history"])
    assert jax_run["history"]["epoch"] == [0] and len(values) >= 4
    assert all(v is not None and math.isfinite(v) for v in values), values


def test_resume_on_torch_with_the_backend_flag(jax_run):
    """`--backend torch` wins over the config's `backend: jax` and
    continues the JAX run from its `.keras` checkpoint."""
    pytest.importorskip("torch")
    run_dir = jax_run["run_dir"]
    result = keras_tap(
        "train", jax_run["config"], "--backend", "torch", "--resume",
        *sets(*TINY, "fit.epochs=2", f"run.dir={run_dir}"),
        cwd=run_dir.parent,
        env=environment(KERAS_BACKEND="jax"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("resumed after epoch 1\n")
    assert "(backend torch)" in result.stdout
    info = read_json(run_dir / "run.json")
    assert info["backend"] == "torch"
    sessions = [(s["backend"], s["initial_epoch"]) for s in info["sessions"]]
    assert sessions == [("jax", 0), ("torch", 1)]
    assert read_json(run_dir / "checkpoints" / "state.json")["backend"] == (
        "torch"
    )
    history = read_json(run_dir / "history.json")
    assert history["epoch"] == [0, 1]
    # The first epoch is the JAX run's, kept as it was.
    assert history["loss"][0] == jax_run["history"]["loss"][0]
    values = losses(history)
    assert all(v is not None and math.isfinite(v) for v in values), values
