"""The `keras-tap` command: examples, bad input, subcommands."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from keras_tap.runs import cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
DIGITS = ROOT / "examples" / "configs" / "digits.yaml"
# One step of one epoch on a few samples, and nothing process-wide.
TINY = [
    "data.limit=64",
    "data.batch_size=16",
    "fit.epochs=1",
    "fit.steps_per_epoch=1",
    "fit.verbose=0",
    "run.deterministic=false",
]


def run_cli(*args, capsys=None):
    """`cli.main(args)` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def sets(*assignments):
    return [item for a in assignments for item in ("--set", a)]


def digits_npz(path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16).astype("float32")[..., None]
    np.savez(path, x=x, y=digits.target, ink=x.mean(axis=(1, 2, 3)))
    return path


def image_npz(path, n=48, size=32):
    rng = np.random.default_rng(0)
    x = rng.random((n, size, size, 3), dtype="float32")
    np.savez(path, x=x, y=rng.integers(0, 10, n))
    return path


def example_copy(example, tmp_path):
    """The example config, copied beside the data it needs, and the
    overrides that stand in for data this machine cannot have."""
    target = tmp_path / example.name
    shutil.copy(example, target)
    raw = yaml.safe_load(example.read_text())
    source = raw.get("data") or {}
    if "npz" in source:
        digits_npz(tmp_path / source["npz"])
    overrides = []
    if source.get("dataset") not in (None, "sklearn_digits"):
        overrides.append(f"data.npz={image_npz(tmp_path / 'images.npz')}")
    return target, overrides


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_and_trains_a_step(example, tmp_path, capsys):
    config_path, overrides = example_copy(example, tmp_path)
    run_dir = tmp_path / "run"
    args = sets(*overrides, *TINY, f"run.dir={run_dir}", "run.plots=false")
    code, out, err = run_cli("validate", config_path, *args, capsys=capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"{config_path}: OK")
    code, out, err = run_cli("train", config_path, *args, capsys=capsys)
    assert (code, err) == (0, "")
    for name in ("config.yaml", "model.keras", "base.keras", "history.csv"):
        assert (run_dir / name).is_file()
    assert "held-out metrics after 1 epochs: " in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The digits job, 2 short epochs, trained through the CLI."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    args = sets(
        *TINY, "fit.epochs=2", "fit.steps_per_epoch=3", f"run.dir={run_dir}"
    )
    code, _, _ = run_cli("train", DIGITS, *args)
    assert code == 0
    return run_dir


def test_train_writes_the_run_directory(trained):
    names = {p.name for p in trained.iterdir()}
    assert {
        "config.yaml",
        "model.keras",
        "base.keras",
        "history.csv",
        "history.json",
        "history.png",
        "statistics.png",
        "logs",
        "checkpoints",
    } <= names
    history = yaml.safe_load((trained / "history.json").read_text())
    assert history["epoch"] == [0, 1]
    for key in (
        "loss",
        "predictions_loss",
        "sparse_conv2_loss",
        "early_head_loss",
    ):
        assert len(history[key]) == 2 and len(history[f"val_{key}"]) == 2
    assert len(history["sparse_conv2_zero_fraction"]) == 2
    header = (trained / "history.csv").read_text().splitlines()[0].split(",")
    assert header == list(history)
    assert list((trained / "logs" / "train").glob("events.out.tfevents.*"))
    assert list((trained / "logs" / "validation").glob("events.out.tfevents.*"))
    state = yaml.safe_load((trained / "checkpoints" / "state.json").read_text())
    assert (
        state["epoch"] == 1
        and (trained / "checkpoints" / state["checkpoint"]).is_file()
    )


def test_train_prints_where_its_outputs_went(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("train", DIGITS, *sets(*TINY), capsys=capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "run directory: runs/digits"
    assert lines[2] == (
        "  model:   runs/digits/model.keras (TapModel), "
        "runs/digits/base.keras (base)"
    )
    assert "runs/digits/history.csv, runs/digits/history.json" in out
    assert "tensorboard --logdir runs/digits/logs" in out
    assert "runs/digits/history.png" in out
    assert lines[-1].startswith("held-out metrics after 1 epochs: ")
    assert " loss " in lines[-1] and "predictions_loss" in lines[-1]


def test_train_refuses_a_non_empty_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "train",
        DIGITS,
        *sets(*TINY, f"run.dir={run_dir}", "run.plots=false"),
    ]
    assert run_cli(*args, capsys=capsys)[0] == 0
    code, _, err = run_cli(*args, capsys=capsys)
    assert code == 2
    assert err.startswith("keras-tap: error: run.dir: ")
    assert "--resume" in err and "--overwrite" in err
    assert run_cli(*args, "--overwrite", capsys=capsys)[0] == 0
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    (other / "config.yaml").write_text("model: {file: mine.keras}\n")
    code, _, err = run_cli(
        "train", DIGITS, *sets(*TINY, f"run.dir={other}"), "--overwrite",
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and "holds no keras-tap run" in err
    assert (other / "keep.txt").read_text() == "precious"


def test_set_on_a_quoted_tap_name(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    raw = yaml.safe_load(DIGITS.read_text())
    raw["taps"] = {
        "model/conv2": {"layer": "conv2", "regularizer": "activity_l2"}
    }
    raw["callbacks"] = None
    path.write_text(yaml.safe_dump(raw))
    code, out, _ = run_cli(
        "validate", path, *sets('taps["model/conv2"].weight=0.5'), capsys=capsys
    )
    assert code == 0 and "tap model/conv2: conv2 -> (None, 8, 8, 32)" in out
    code, _, err = run_cli(
        "validate",
        path,
        *sets('taps["model/conv2"].weight=-0.5'),
        capsys=capsys,
    )
    assert code == 2
    assert err == (
        'keras-tap: error: taps["model/conv2"].weight: expected a '
        "non-negative number or a schedule, got -0.5\n"
    )


# ------------------------------------------------------------- bad input


def broken(**changes):
    """The digits config with `changes` ({dotted key: value}; None deletes)."""
    raw = yaml.safe_load(DIGITS.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("|")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


CONV = {"class_name": "Conv2D", "config": {"filters": 2, "kernel_size": 3}}
SMALL_INPUT = [
    {"class_name": "InputLayer", "config": {"shape": [28, 28, 1]}},
    {"class_name": "Conv2D", "config": {**CONV["config"], "name": "conv2"}},
    {"class_name": "MaxPooling2D", "config": {"name": "pool"}},
]
EARLY = "taps|early_head|"
BROKEN = {
    "unknown section": (
        broken(modle={}),
        "modle: unknown key; did you mean 'model'?",
    ),
    "unknown fit key": (
        broken(**{"fit|epoch": 3}),
        "fit.epoch: unknown key; did you mean 'epochs'?",
    ),
    "negative tap weight": (
        broken(**{"taps|sparse_conv2|weight": -1}),
        "taps.sparse_conv2.weight: expected a non-negative number or a "
        "schedule, got -1",
    ),
    "weight of a wrong type": (
        broken(**{EARLY + "weight": [1]}),
        "taps.early_head.weight: expected a non-negative number or a schedule",
    ),
    "unknown optimizer": (
        broken(**{"compile|optimizer": "adamm"}),
        "compile.optimizer: unknown optimizer 'adamm'; did you mean 'adam'?",
    ),
    "unknown loss": (
        broken(**{"compile|loss": "sparse_categorical_crossentropyy"}),
        "compile.loss: Unknown loss: 'sparse_categorical_crossentropyy'",
    ),
    "unknown metric": (
        broken(**{"compile|metrics": ["acuracy"]}),
        "compile.metrics[0]: unknown metric 'acuracy'",
    ),
    "unknown regularizer": (
        broken(**{"taps|sparse_conv2|regularizer": "activity_l3"}),
        "taps.sparse_conv2.regularizer: Unknown regularizer: 'activity_l3'",
    ),
    "unknown schedule": (
        broken(**{EARLY + "weight": {"class_name": "CosineDecayy"}}),
        "taps.early_head.weight: unknown schedule 'CosineDecayy'; did you "
        "mean 'CosineDecay'?",
    ),
    "unknown tap key": (
        broken(**{EARLY + "adaptor": {}}),
        "taps.early_head.adaptor: unknown key; did you mean 'adapter'?",
    ),
    "bad tap target": (
        broken(**{EARLY + "target": "labels"}),
        "taps.early_head.target: expected one of 'data', 'predictions'",
    ),
    "tap target missing in data": (
        broken(**{EARLY + "target": None}),
        "taps.early_head.target: the tap's loss needs y['early_head']",
    ),
    "teacher layer without teacher": (
        broken(**{EARLY + "teacher": "conv2", EARLY + "target": None}),
        "taps.early_head.teacher: names a teacher layer, but the config has "
        "no teacher",
    ),
    "unknown layer path": (
        broken(**{"taps|sparse_conv2|layer": "conv9"}),
        "taps.sparse_conv2.layer: Tap 'conv9' in model 'digits_cnn': no "
        "layer is named 'conv9'",
    ),
    "unknown layer class": (
        broken(**{"model|config|layers": [{**CONV, "class_name": "Conv2DD"}]}),
        "model.config.layers[0].class_name: unknown layer class 'Conv2DD'; "
        "did you mean 'Conv2D'?",
    ),
    "bad layer argument": (
        broken(**{"model|config|layers": [{**CONV, "config": {"filterz": 2}}]}),
        "model.config.layers[0].config.filterz: unknown argument of Conv2D; "
        "did you mean 'filters'?",
    ),
    "missing model": (
        broken(model=None),
        "model: expected one of application, file, builder",
    ),
    "missing model file": (
        broken(model={"file": "missing.keras"}),
        "model.file: no such file: ",
    ),
    "unknown application": (
        broken(model={"application": {"name": "MobileNetV5"}}),
        "model.application.name: unknown keras.applications model "
        "'MobileNetV5'; did you mean 'MobileNetV2'?",
    ),
    "unknown application argument": (
        broken(model={"application": {"name": "MobileNetV2", "alpah": 0.35}}),
        "model.application.alpah: unknown key; did you mean 'alpha'?",
    ),
    "bad builder": (
        broken(model={"builder": "no_such_module:build"}),
        "model.builder: cannot import 'no_such_module'",
    ),
    "builder without colon": (
        broken(model={"builder": "build"}),
        "model.builder: expected 'module:function', got 'build'",
    ),
    "missing npz": (
        broken(data={"npz": "missing.npz"}),
        "data.npz: no such file: ",
    ),
    "batch size as a string": (
        broken(**{"data|batch_size": "32"}),
        "data.batch_size: expected an integer >= 1, got '32'",
    ),
    "validation split of 1.5": (
        broken(**{"data|validation_split": 1.5}),
        "data.validation_split: expected a number in [0, 1), got 1.5",
    ),
    "unknown dataset": (
        broken(**{"data|dataset": "mnistt"}),
        "data.dataset: unknown dataset 'mnistt'; did you mean 'mnist'?",
    ),
    "targets of an unknown tap": (
        broken(**{"data|targets": {"erly_head": "y"}}),
        "data.targets.erly_head: no tap named 'erly_head'",
    ),
    "unknown callback": (
        broken(callbacks=[{"class_name": "EarlyStoping"}]),
        "callbacks[0].class_name: unknown callback 'EarlyStoping'; did you "
        "mean 'EarlyStopping'?",
    ),
    "unknown callback argument": (
        broken(
            callbacks=[
                {"class_name": "EarlyStopping", "config": {"patiense": 2}}
            ]
        ),  # fmt: skip
        "callbacks[0].config.patiense: unknown key; did you mean 'patience'?",
    ),
    "negative seed": (
        broken(**{"run|seed": -1}),
        "run.seed: expected an integer >= 0, got -1",
    ),
    "zero steps": (
        broken(**{"fit|steps_per_epoch": 0}),
        "fit.steps_per_epoch: expected an integer >= 1, got 0",
    ),
    "input shape mismatch": (
        broken(**{"model|config|layers": SMALL_INPUT}),
        "data: the inputs have shape (8, 8, 1), but the model expects "
        "(28, 28, 1)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_config_exits_2_with_the_key_path(case, tmp_path, capsys):
    raw, message = BROKEN[case]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("validate", path, capsys=capsys)
    assert code == 2
    assert err.startswith(f"keras-tap: error: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", DIGITS, "--set", "foo"],
            "--set: expected key.path=value, got 'foo' (no '=')",
        ),
        (
            ["train", DIGITS, "--set", "taps[.x=1"],
            "--set: cannot parse the key path 'taps[.x'",
        ),
        (
            ["train", DIGITS, "--set", "fit.epochs=[3"],
            "fit.epochs: cannot parse the --set value",
        ),
        (["train", "missing.yaml"], "config: no such file: 'missing.yaml'"),
        (
            ["validate", DIGITS, "--set", "data.dataset=cifar10"],
            "data.dataset: cifar10 is not in the Keras cache",
        ),
        (
            ["train", DIGITS, "--resume", "--overwrite"],
            "argument --overwrite: not allowed with argument --resume",
        ),
        (["trian", DIGITS], "argument COMMAND: invalid choice: 'trian'"),
        (["layers", "model.h5"], "MODEL_OR_CONFIG: expected a .keras file"),
        (["plot"], "RUN_DIR: give a run directory, or --features MODEL"),
    ],
)
def test_bad_command_lines_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    code, _, err = run_cli(*args, capsys=capsys)
    assert code == 2
    assert err.startswith(f"keras-tap: error: {message}"), err
    assert err.count("\n") == 1


def test_yaml_syntax_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    code, _, err = run_cli("validate", path, capsys=capsys)
    assert code == 2 and err.startswith("keras-tap: error: config: ")
    assert "is not valid YAML" in err and err.count("\n") == 1


def test_a_real_process_exits_2_with_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken(**{"taps|sparse_conv2|weight": -1})))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "keras_tap.runs.cli", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "keras-tap: error: taps.sparse_conv2.weight: expected a non-negative "
        "number or a schedule, got -1"
    )
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------- subcommands


def test_layers_prints_the_table(trained, capsys):
    for source in (trained, trained / "base.keras", DIGITS):
        code, out, err = run_cli("layers", source, capsys=capsys)
        assert (code, err) == (0, "")
        rows = [line.split() for line in out.splitlines()]
        assert rows[0] == [
            "path",
            "class",
            "output",
            "shape",
            "params",
            "calls",
        ]
        assert [row[0] for row in rows[1:]] == [
            "conv1", "conv2", "pool", "conv3", "gap", "classifier",
        ]  # fmt: skip
        assert rows[2][:2] == ["conv2", "Conv2D"] and rows[2][-2:] == [
            "4,640",
            "1",
        ]
        assert "(None, 8, 8, 32)" in out.splitlines()[2]


def test_extract_writes_an_npz(trained, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    code, text, err = run_cli(
        "extract", trained, "--data", "sklearn_digits", "--taps",
        "sparse_conv2", "conv3", "--reduce", "mean", "--out", out,
        capsys=capsys,
    )  # fmt: skip
    assert (code, err) == (0, "")
    with np.load(out) as feats:
        assert feats["sparse_conv2"].shape == (1797, 32)
        assert feats["conv3"].shape == (1797, 64)
    assert "sparse_conv2: (1797, 32)" in text
    code, _, _ = run_cli(
        "extract", trained / "base.keras", "--data", "sklearn_digits",
        "--taps", "pool", "--out", out, capsys=capsys,
    )  # fmt: skip
    assert code == 0
    with np.load(out) as feats:
        assert feats["pool"].shape == (1797, 4, 4, 32)
    code, _, err = run_cli(
        "extract", trained, "--data", "sklearn_digits", "--taps", "conv9",
        "--out", out, capsys=capsys,
    )  # fmt: skip
    assert code == 2 and err.startswith("keras-tap: error: --taps: ")


def test_extract_from_a_run_directory_uses_its_data(
    trained, tmp_path, capsys
):
    out = tmp_path / "feats.npz"
    code, text, err = run_cli(
        "extract", trained, "--taps", "sparse_conv2", "--reduce", "max",
        "--out", out, capsys=capsys,
    )  # fmt: skip
    assert (code, err) == (0, "")
    with np.load(out) as feats:
        assert feats["sparse_conv2"].shape == (1797, 32)
    code, _, err = run_cli(
        "extract", trained / "base.keras", "--taps", "pool", "--out", out,
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and "--data: a model file needs --data" in err


def assert_png(path, min_side=200):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert min(image.shape[:2]) >= min_side
    assert image[..., :3].var() > 0


def test_plot_a_run_directory(trained, tmp_path, capsys):
    code, out, err = run_cli("plot", trained, "--out", tmp_path, capsys=capsys)
    assert (code, err) == (0, "")
    assert_png(tmp_path / "history.png")
    assert_png(tmp_path / "statistics.png")
    assert out.count("wrote ") == 2


def test_plot_feature_maps(trained, tmp_path, capsys):
    code, out, err = run_cli(
        "plot", "--features", trained, "--data", "sklearn_digits",
        "--taps", "sparse_conv2", "gap", "--sample", "3", "--out", tmp_path,
        capsys=capsys,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert_png(tmp_path / "sparse_conv2.png")
    assert_png(tmp_path / "gap.png")


def test_extract_from_a_config_without_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        "extract", DIGITS, "--taps", "conv2", "--reduce", "max",
        "--out", "feats.npz", capsys=capsys,
    )  # fmt: skip
    assert code == 0
    assert err.startswith("keras-tap: note: no trained model at runs/digits/")
    with np.load(tmp_path / "feats.npz") as feats:
        assert list(feats.files) == ["conv2"]
        assert feats["conv2"].shape == (1797, 32)
