"""`keras-tap extract` / `plot --features` read the samples a config's
`data` section describes (`limit`, held-out split), and `keras-tap
gradcam` names the images, not the tap, when their shape is wrong.

Training and one extraction run as subprocesses of `python -m keras_tap`
(the command as a user runs it); the other commands call `cli.main` in
this process, on the backend of `KERAS_BACKEND`."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from keras_tap.runs import cli
from keras_tap.runs.keypaths import ConfigError, message_of

pytest.importorskip("sklearn")

SEED = 3
LIMIT, SPLIT = 37, 0.3  # the trained run's data
CONFIG_LIMIT, CONFIG_SPLIT = 23, 0.25  # the untrained config's data


def tiny_config(run_dir, limit, split):
    """Digits through `pixels` (the flattened input, so extracted rows
    are the input samples themselves), then a small CNN."""
    layers = [
        {"class_name": "InputLayer",
         "config": {"shape": [8, 8, 1], "name": "image"}},
        {"class_name": "Flatten", "config": {"name": "pixels"}},
        {"class_name": "Reshape",
         "config": {"name": "grid", "target_shape": [8, 8, 1]}},
        {"class_name": "Conv2D",
         "config": {"name": "conv", "filters": 4, "kernel_size": 3,
                    "padding": "same", "activation": "relu"}},
        {"class_name": "GlobalAveragePooling2D", "config": {"name": "gap"}},
        {"class_name": "Dense",
         "config": {"name": "classifier", "units": 10,
                    "activation": "softmax"}},
    ]  # fmt: skip
    return {
        "model": {
            "class_name": "Sequential",
            "config": {"name": "tiny", "layers": layers},
        },
        "taps": {"features": {"layer": "conv"}},
        "compile": {
            "optimizer": "adam",
            "loss": "sparse_categorical_crossentropy",
        },
        "data": {
            "dataset": "sklearn_digits",
            "limit": limit,
            "validation_split": split,
            "batch_size": 8,
        },
        "fit": {"epochs": 1, "steps_per_epoch": 1, "verbose": 0},
        "run": {
            "dir": str(run_dir),
            "seed": SEED,
            "plots": False,
            "deterministic": False,
        },
    }


def expected_counts(limit, split):
    """`{split: samples}` from the config's numbers: `round(limit *
    split)` held out (at least 1), the rest trained on."""
    held_out = max(1, math.floor(limit * split + 0.5))
    return {"all": limit, "train": limit - held_out, "validation": held_out}


def keras_tap(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "keras_tap", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


class Done:
    """What `cli.main` returned or exited with, and what it printed."""

    def __init__(self, args, capsys):
        capsys.readouterr()
        try:
            self.returncode = cli.main([str(arg) for arg in args])
        except SystemExit as error:
            self.returncode = error.code
        self.stdout, self.stderr = capsys.readouterr()


def digits_x():
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype("float32").reshape(-1, 64)


def indices_of(rows, x):
    """The index in `x` of each extracted row (its first exact match)."""
    index = []
    for row in rows:
        matches = np.flatnonzero(np.all(np.abs(x - row) < 1e-6, axis=1))
        assert len(matches), "an extracted row is no digits sample"
        index.append(int(matches[0]))
    return np.array(index)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with a trained run (`run/`, limit 37, split 0.3) and
    an untrained config (`fresh.yaml`, limit 23, split 0.25)."""
    root = tmp_path_factory.mktemp("inputs")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root / "run", LIMIT, SPLIT)))
    done = keras_tap("train", config, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = tiny_config(root / "never_trained", CONFIG_LIMIT, CONFIG_SPLIT)
    (root / "fresh.yaml").write_text(yaml.safe_dump(fresh))
    return root


def extract(work, source, *options, name="feats.npz", capsys=None):
    """Runs `extract` in this process with `capsys`, else as a subprocess."""
    out = work / name
    args = ["extract", source, "--taps", "pixels,features", "--out", out,
            *options]  # fmt: skip
    if capsys is None:
        done = keras_tap(*args, cwd=work)
    else:
        done = Done(args, capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return {key: arrays[key] for key in arrays.files}


def test_extract_from_a_run_directory_reads_its_limit_and_split(
    work, capsys
):
    counts = expected_counts(LIMIT, SPLIT)
    x = digits_x()
    rows = {}
    for split in ("all", "train", "validation"):
        feats = extract(work, work / "run", "--split", split, capsys=capsys)
        assert len(feats["pixels"]) == counts[split], split
        assert feats["features"].shape == (counts[split], 8, 8, 4)
        rows[split] = indices_of(feats["pixels"], x)
    # The default is `all`: the training and held-out samples, in source
    # order; the two splits are disjoint.
    default = extract(work, work / "run", name="default.npz")
    np.testing.assert_array_equal(default["pixels"], x[rows["all"]])
    assert np.all(np.diff(rows["all"]) > 0)
    assert not set(rows["train"]) & set(rows["validation"])
    union = np.sort(np.concatenate([rows["train"], rows["validation"]]))
    np.testing.assert_array_equal(union, rows["all"])


def test_extract_from_a_config_reads_its_limit_and_split(work, capsys):
    counts = expected_counts(CONFIG_LIMIT, CONFIG_SPLIT)
    config = work / "fresh.yaml"
    feats = extract(work, config, "--split", "validation", capsys=capsys)
    assert len(feats["pixels"]) == counts["validation"] == 6
    feats = extract(work, config, capsys=capsys)
    assert len(feats["features"]) == counts["all"] == CONFIG_LIMIT


def test_plot_features_reads_the_split(work, capsys):
    pytest.importorskip("matplotlib")
    held_out = expected_counts(LIMIT, SPLIT)["validation"]
    base = ["plot", "--features", work / "run", "--taps", "features",
            "--out", work / "maps", "--split", "validation"]  # fmt: skip
    done = Done([*base, "--sample", held_out - 1], capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "maps" / "features.png").is_file()
    done = Done([*base, "--sample", held_out], capsys)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"keras-tap: error: --sample: expected a sample index in [0, "
        f"{held_out}), got {held_out}"
    )


def test_bad_split_options(work, tmp_path, capsys):
    done = Done(["extract", work / "run", "--taps", "pixels", "--split",
                 "test", "--out", tmp_path / "f.npz"], capsys)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(
        "keras-tap: error: argument --split: invalid choice: 'test'"
    )
    done = Done(["extract", work / "run", "--taps", "pixels", "--split",
                 "train", "--data", "sklearn_digits",
                 "--out", tmp_path / "f.npz"], capsys)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "keras-tap: error: --split: selects the config's samples; --data is "
        "read whole"
    )
    config = tiny_config(work / "never", 20, 0)
    (tmp_path / "none_out.yaml").write_text(yaml.safe_dump(config))
    done = Done(["extract", tmp_path / "none_out.yaml", "--taps",
                 "pixels", "--split", "validation",
                 "--out", tmp_path / "f.npz"], capsys)  # fmt: skip
    assert done.returncode == 2
    assert "keras-tap: error: --split: the config holds no samples out" in (
        done.stderr
    )
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize(
    "shape", [(3, 10, 10, 1), (2, 8, 8, 3)], ids=["size", "channels"]
)
def test_gradcam_names_the_images_of_a_wrong_shape(
    work, tmp_path, shape, capsys
):
    images = tmp_path / "wrong.npy"
    np.save(images, np.zeros(shape, "float32"))
    done = Done(["gradcam", work / "run", "--tap", "conv", "--images",
                 images, "--out", tmp_path / "cams"], capsys)  # fmt: skip
    assert done.returncode == 2
    given = "(" + ", ".join(map(str, shape[1:])) + ")"
    assert done.stderr == (
        f"keras-tap: error: --images: {str(images)!r} holds images of shape "
        f"{given}, but the model expects images of shape (8, 8, 1)\n"
    )
    assert "\x1b" not in done.stderr and "--tap" not in done.stderr


def test_config_errors_have_no_ansi_codes():
    bold = "\x1b[1mInput 0 is incompatible\x1b[0m with the layer"
    assert ConfigError("--images", bold).message == (
        "Input 0 is incompatible with the layer"
    )
    assert str(ConfigError("x", "\x1b[31;1mred\x1b[0m")) == "x: red"
    error = ValueError(
        f"Exception encountered. {bold}\n Arguments received by "
        "Functional.call(): inputs=..."
    )
    assert message_of(error) == (
        "Exception encountered. Input 0 is incompatible with the layer"
    )
