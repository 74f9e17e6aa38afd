"""Leftover near misses of the config pipeline: a tap weight schedule
written as a name, an activation written in CamelCase, and `--x-key`
without `--data`."""

from pathlib import Path

import pytest
import yaml

from keras_tap.runs import cli, config, sources
from keras_tap.runs.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "configs" / "digits.yaml"


def error_of(*overrides):
    """The one-line `ConfigError` of the digits config with `overrides`."""
    raw = yaml.safe_load(DIGITS.read_text())
    with pytest.raises(ConfigError) as info:
        config.load(raw, [*overrides, "run.dir=/tmp/unused"])
    return str(info.value)


def run_cli(capsys, *args):
    """`cli.main(args)` in-process: (exit code, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


# `kt.schedules.get` takes no names (every schedule has arguments): a name
# is refused, with the closest class in the `{class_name: ...}` form.
NOT_A_NAME = (
    "taps.early_head.weight: expected a non-negative number or a schedule "
    "{class_name, config} (not a name), got "
)


@pytest.mark.parametrize(
    "weight, message",
    [
        ("cosine_decayy",
         NOT_A_NAME + "'cosine_decayy'; did you mean {class_name: "
         "CosineDecay, config: ...}?"),
        ("CosineDecayy",
         NOT_A_NAME + "'CosineDecayy'; did you mean {class_name: "
         "CosineDecay, config: ...}?"),
        ("linear_warmup",
         NOT_A_NAME + "'linear_warmup'; did you mean {class_name: "
         "LinearWarmup, config: ...}?"),
        ("Piecewize",
         NOT_A_NAME + "'Piecewize'; did you mean {class_name: Piecewise, "
         "config: ...}?"),
        ("zzz", NOT_A_NAME + "'zzz'"),
        ("{class_name: CosineDecayy}",
         "taps.early_head.weight: unknown schedule 'CosineDecayy'; did you "
         "mean 'CosineDecay'?"),
        ("{class_name: cosine_decayy}",
         "taps.early_head.weight: unknown schedule 'cosine_decayy'; did you "
         "mean 'CosineDecay'?"),
    ],
)  # fmt: skip
def test_a_schedule_name_typo_suggests_the_closest_schedule(weight, message):
    assert error_of(f"taps.early_head.weight={weight}") == message


@pytest.mark.parametrize(
    "activation, close",
    [("Relux", "relu"), ("ReLU", "relu"), ("Softmaxx", "softmax"),
     ("relux", "relu"), ("Gelu", "gelu"), ("LeakyRelu", "leaky_relu")],
)  # fmt: skip
def test_an_activation_typo_is_matched_regardless_of_case(activation, close):
    layer = {"class_name": "Dense",
             "config": {"units": 2, "activation": activation}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        sources.deserialize_layer(layer, "m")
    assert str(info.value) == (
        f"m.config.activation: unknown activation {activation!r}; did you "
        f"mean {close!r}?"
    )


def test_a_camel_case_activation_in_a_config_is_named():
    raw = yaml.safe_load(DIGITS.read_text())
    raw["model"]["config"]["layers"][1]["config"]["activation"] = "Relux"
    cfg = config.load(raw, ["run.dir=/tmp/unused"])
    with pytest.raises(ConfigError) as info:
        sources.build_model(cfg.model, "model")
    assert str(info.value) == (
        "model.config.layers[1].config.activation: unknown activation "
        "'Relux'; did you mean 'relu'?"
    )


X_KEY = "keras-tap: error: --x-key: names the array of an .npz file given "
X_KEY += "with --data\n"


@pytest.mark.parametrize(
    "args",
    [
        ["extract", DIGITS, "--taps", "conv1", "--x-key", "images"],
        ["extract", DIGITS, "--taps", "conv1", "--split", "train",
         "--x-key", "images"],
        ["plot", "--features", DIGITS, "--taps", "conv1", "--x-key",
         "images"],
    ],
)  # fmt: skip
def test_x_key_without_data_is_an_error(args, capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(capsys, *args, "--out", out)
    assert code == 2
    assert err == X_KEY
    assert not out.exists()


def test_x_key_with_data_reads_that_array(capsys, tmp_path):
    import numpy as np

    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
    np.savez(tmp_path / "in.npz", images=x)
    out = tmp_path / "feats.npz"
    args = ["extract", DIGITS, "--taps", "conv1", "--data",
            tmp_path / "in.npz", "--x-key", "images", "--out", out]  # fmt: skip
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    with np.load(out) as arrays:
        assert arrays["conv1"].shape == (3, 8, 8, 16)
