"""The `keras-tap` command: examples, bad input, subcommands."""

import shutil
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
    summary = out[out.index("held-out metrics after 1 epochs:"):]
    assert " loss " in summary and "predictions_loss" in summary
    assert max(len(line) for line in lines) <= 120


def test_train_progress_fits_120_columns(tmp_path, capsys, monkeypatch):
    """The main job's progress: each epoch's loss terms and metrics, then
    its validation values, in lines of at most 120 columns; the tap
    statistics stay out of it (they go to History)."""
    monkeypatch.chdir(tmp_path)
    quick = ["data.limit=128", "fit.epochs=2", "run.plots=false",
             "run.deterministic=false"]  # determinism is process-wide
    code, out, err = run_cli("train", DIGITS, *sets(*quick), capsys=capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120, lines
    epochs = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    assert [lines[i].split()[1] for i in epochs] == ["1/2", "2/2"]
    block = "\n".join(lines[epochs[1]:])
    for key in ("loss", "predictions_loss", "sparse_conv2_loss",
                "early_head_loss", "early_head_accuracy", "accuracy"):
        assert f" {key} " in block, key
    assert "  val:  loss " in block
    assert "sparse_conv2_mean" not in out and "dead_channels" not in out
    history = yaml.safe_load((tmp_path / "runs" / "digits" /
                              "history.json").read_text())
    assert len(history["sparse_conv2_mean"]) == 2  # statistics: in History


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
        "sparse_conv2,conv3", "--reduce", "mean", "--out", out,
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


@pytest.mark.parametrize(
    "order",
    [
        ["RUN", "--taps", "sparse_conv2", "--taps", "conv3", "--out", "OUT"],
        ["--taps", "sparse_conv2", "RUN", "--taps", "conv3", "--out", "OUT"],
        ["--taps", "sparse_conv2,conv3", "--out", "OUT", "RUN"],
    ],
    ids=["positional-first", "positional-between", "positional-last"],
)
def test_extract_arguments_in_any_order(trained, tmp_path, capsys, order):
    out = tmp_path / "feats.npz"
    args = [
        {"RUN": trained, "OUT": out}.get(arg, arg) for arg in order
    ]
    code, _, err = run_cli("extract", *args, "--data", "sklearn_digits",
                           "--reduce", "max", capsys=capsys)  # fmt: skip
    assert (code, err) == (0, "")
    with np.load(out) as feats:
        assert list(feats.files) == ["sparse_conv2", "conv3"]
        assert feats["conv3"].shape == (1797, 64)


def test_extract_from_a_run_directory_uses_its_data(
    trained, tmp_path, capsys
):
    out = tmp_path / "feats.npz"
    code, text, err = run_cli(
        "extract", trained, "--taps", "sparse_conv2", "--reduce", "max",
        "--out", out, capsys=capsys,
    )  # fmt: skip
    assert (code, err) == (0, "")
    with np.load(out) as feats:  # the run's data.limit=64 samples
        assert feats["sparse_conv2"].shape == (64, 32)
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
        "--taps", "sparse_conv2", "--taps", "gap", "--sample", "3",
        "--out", tmp_path,
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


def readme_commands():
    """The `keras-tap` lines of the README, in the order written: the main
    job first, then the command-line block. The commands of "Training on
    several machines" need two hosts' `TF_CONFIG`; test_multi_worker.py
    runs them on two local processes."""
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme = readme.split("## Training on several machines", 1)[0]
    commands = []
    for line in readme.splitlines():
        if "keras-tap train" in line and line.startswith("pip install"):
            line = line.split("&&", 1)[1]
        line = line.strip()
        if line.startswith("keras-tap "):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def test_readme_commands_run_in_the_order_written(
    tmp_path, capsys, monkeypatch
):
    commands = readme_commands()
    assert [args[0] for args in commands] == [
        "train", "validate", "train", "train", "layers", "extract", "plot",
    ]  # fmt: skip
    configs = tmp_path / "examples" / "configs"
    configs.mkdir(parents=True)
    shutil.copy(DIGITS, configs / DIGITS.name)
    monkeypatch.chdir(tmp_path)
    for args in commands:
        if args[0] in ("train", "validate"):  # short, before the README's --set
            quick = sets(*TINY, "data.limit=128", "run.plots=false")
            args = args[:2] + quick + args[2:]
        code, out, err = run_cli(*args, capsys=capsys)
        assert (code, err) == (0, ""), (args, err)
    assert (tmp_path / "runs" / "digits" / "model.keras").is_file()
    variant = tmp_path / "runs" / "digits-5" / "history.json"
    history = yaml.safe_load(variant.read_text())
    assert history["epoch"] == [0, 1, 2, 3, 4]
    with np.load(tmp_path / "feats.npz") as feats:
        assert feats["conv2"].shape == (128, 32)  # the run's data.limit
    assert (tmp_path / "runs" / "digits" / "history.png").is_file()  # plot


def test_a_second_run_is_refused_with_a_free_directory_named(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "digits-2").mkdir(parents=True)
    args = ["train", DIGITS, *sets(*TINY, "run.plots=false")]
    assert run_cli(*args, capsys=capsys)[0] == 0
    code, _, err = run_cli(*args, capsys=capsys)
    assert code == 2
    assert err == (
        f"keras-tap: error: run.dir: {str(tmp_path / 'runs' / 'digits')!r} "
        "already holds a run; continue it with --resume, replace it with "
        "--overwrite, or train in another directory with "
        "--set run.dir=runs/digits-3\n"
    )
    code, _, err = run_cli(*args, "--set", "run.dir=runs/digits-3",
                           capsys=capsys)  # fmt: skip
    assert (code, err) == (0, "")
    assert (tmp_path / "runs" / "digits-3" / "model.keras").is_file()
