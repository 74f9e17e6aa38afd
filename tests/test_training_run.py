"""The pictures `keras-tap train` writes at the end of a run."""

from pathlib import Path

import numpy as np
import pytest

from keras_tap.runs import cli
from keras_tap.runs import rundir as runs

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "configs" / "digits.yaml"


def open_png(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The digits job for one epoch on 200 samples, with an extra dense
    tap whose name needs a safe file name; returns (run_dir, stdout)."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    settings = [
        "data.limit=200",
        "fit.epochs=1",
        "fit.verbose=0",
        "run.deterministic=false",
        f"run.dir={run_dir}",
        'taps["gap/pooled@0"]=gap',
    ]
    args = ["train", str(DIGITS)]
    for setting in settings:
        args += ["--set", setting]
    assert cli.main(args) == 0
    return run_dir


def test_train_writes_a_feature_map_grid_of_every_tap(run):
    features = sorted(p.name for p in (run / "features").iterdir())
    assert features == [
        "early_head.png",
        "gap_pooled_0.png",
        "sparse_conv2.png",
    ]


def test_every_png_of_the_run_is_a_real_picture(run):
    pngs = sorted(run.glob("*.png")) + sorted(run.glob("features/*.png"))
    names = [p.relative_to(run).as_posix() for p in pngs]
    assert names[:2] == ["history.png", "statistics.png"]
    assert len(names) == 5
    for path in pngs:
        image = open_png(path)
        height, width = image.shape[:2]
        assert height > 100 and width > 100, (path.name, image.shape)
        assert image[..., :3].var() > 0, path.name


def test_the_grid_of_a_conv_tap_has_one_panel_per_channel(run):
    """conv2 has 32 channels: a 6x6 grid of which 32 panels are drawn, so
    the picture is taller than one row and not one flat colour."""
    image = open_png(run / "features" / "sparse_conv2.png")[..., :3]
    assert image.shape[0] > 300 and image.shape[1] > 300
    # Many distinct colours: channel images, not a blank canvas.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_train_prints_the_feature_maps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", str(DIGITS)]
    for setting in ("data.limit=64", "fit.epochs=1", "fit.steps_per_epoch=1",
                    "fit.verbose=0", "run.deterministic=false"):  # fmt: skip
        args += ["--set", setting]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "features:" in x)
    assert line == (
        "  features: runs/digits/features/sparse_conv2.png, "
        "runs/digits/features/early_head.png"
    )


@pytest.mark.parametrize(
    "tap, name",
    [
        ("conv2", "conv2"),
        ("model/conv2@1", "model_conv2_1"),
        ("resnet50/conv3_block1_out", "resnet50_conv3_block1_out"),
        ("a b.c", "a_b.c"),
        ("..", "_"),
    ],
)
def test_tap_names_become_safe_file_names(tap, name):
    assert runs.file_name(tap) == name
