"""`keras-tap` on bad input: one line on stderr naming the key path, and
exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from keras_tap.runs import cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "configs" / "digits.yaml"


def run_cli(*args, capsys=None):
    """`cli.main(args)` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


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
    # No TensorFlow settings: the command keeps its start-up lines away.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    result = subprocess.run(
        [sys.executable, "-m", "keras_tap", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "keras-tap: error: taps.sparse_conv2.weight: expected a non-negative "
        "number or a schedule, got -1\n"
    )
    assert not (tmp_path / "runs").exists()
