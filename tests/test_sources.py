"""Model sources of a config: a `.keras` file, a `module:function` builder,
`keras.applications` and an inline teacher; building them leaves the
process as it was."""

import socket
import sys

import pytest
import yaml

from keras_tap.runs import config
from keras_tap.runs import train as training
from keras_tap.runs.config import ConfigError


def dense(name, units):
    return {"class_name": "Dense", "config": {"name": name, "units": units}}


def tiny_mlp(**sections):
    """A small valid config dict: an inline MLP on the digits."""
    layers = [
        {"class_name": "InputLayer", "config": {"shape": [8, 8, 1]}},
        {"class_name": "Flatten", "config": {"name": "flat"}},
        dense("hidden", 8),
        dense("out", 10),
    ]
    model = {"class_name": "Sequential",
             "config": {"name": "mlp", "layers": layers}}  # fmt: skip
    taps = {"a/b": {"layer": "hidden", "regularizer": "activity_l2"}}
    return {"model": model, "taps": taps, **sections}


# ------------------------------------------------------------- model sources


def test_model_from_a_file_a_builder_and_an_application(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))  # restored after the test
    base = training.build(config.load(tiny_mlp())).base
    base.save(tmp_path / "mlp.keras")
    (tmp_path / "my_models.py").write_text(
        "import keras\n\n\n"
        "def build(units=4):\n"
        "    inputs = keras.Input((8, 8, 1))\n"
        "    x = keras.layers.Flatten(name='flat')(inputs)\n"
        "    x = keras.layers.Dense(units, name='hidden')(x)\n"
        "    return keras.Model(inputs, keras.layers.Dense(10)(x))\n"
    )
    sources = {
        "file": {"file": "mlp.keras"},
        "builder": {"builder": "my_models:build", "kwargs": {"units": 6}},
    }
    for kind, model in sources.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(tiny_mlp(model=model)))
        cfg = config.load(path)
        assert cfg.model.kind == kind
        tap_model = training.build(cfg)
        assert tap_model.tap_shapes()["a/b"] == (
            None,
            6 if kind == "builder" else 8,
        )
    assert cfg.model.python_path == (str(tmp_path),)
    app = {
        "application": {
            "name": "MobileNetV2",
            "weights": None,
            "input_shape": [32, 32, 3],
            "alpha": 0.35,
        }
    }
    cfg = config.load(tiny_mlp(model=app, taps=["block_1_expand_relu"]))
    model = training.build_model(cfg.model, "model")
    assert model.name.startswith("mobilenetv2") and model.input_shape[1:] == (
        32, 32, 3
    )  # fmt: skip


def test_building_leaves_sys_path_and_socket_timeout_alone(tmp_path):
    (tmp_path / "side_models.py").write_text(
        "import keras\n\n\n"
        "def build():\n"
        "    from side_layers import dense\n"  # imported while building
        "    inputs = keras.Input((8, 8, 1))\n"
        "    x = keras.layers.Flatten(name='flat')(inputs)\n"
        "    x = keras.layers.Dense(4, name='hidden')(x)\n"
        "    return keras.Model(inputs, dense()(x))\n"
    )
    (tmp_path / "side_layers.py").write_text(
        "import keras\n\n\ndef dense():\n    return keras.layers.Dense(10)\n"
    )
    path_before, timeout_before = list(sys.path), socket.getdefaulttimeout()
    try:
        cfg = config.load(
            tiny_mlp(model={"builder": "side_models:build"}), base_dir=tmp_path
        )
        assert training.build(cfg).tap_shapes()["a/b"] == (None, 4)
        app = {"application": {"name": "MobileNetV2", "weights": None,
               "input_shape": [32, 32, 3], "alpha": 0.35}}  # fmt: skip
        cfg = config.load(tiny_mlp(model=app, taps=["block_1_expand_relu"]))
        training.build_model(cfg.model, "model")
        assert sys.path == path_before
        assert socket.getdefaulttimeout() == timeout_before
    finally:
        sys.path[:] = path_before
        for name in ("side_models", "side_layers"):
            sys.modules.pop(name, None)


def test_download_timeout_is_scoped():
    from keras_tap.runs import sources

    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError):
        with sources.download_timeout(7):
            assert socket.getdefaulttimeout() == 7
            raise RuntimeError("a failed download")
    assert socket.getdefaulttimeout() == before


def test_builder_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "few_models.py").write_text("def build():\n    return 3\n")
    for spec, match in [
        ("few_models:biuld", "has no function 'biuld'; did you mean 'build'"),
        ("few_models:build", "returned int, not a keras.Model"),
    ]:
        cfg = config.load(tiny_mlp(model={"builder": spec}), base_dir=tmp_path)
        with pytest.raises(ConfigError, match=f"^model.builder: .*{match}"):
            training.build(cfg)


def test_teacher_section_gives_tap_targets():
    teacher = tiny_mlp()["model"]
    teacher["config"]["name"] = "teacher"
    cfg = config.load(
        tiny_mlp(
            teacher=teacher,
            taps={"hint": {"layer": "hidden", "teacher": "hidden",
                           "loss": "feature_mse"}},
        )
    )  # fmt: skip
    assert cfg.teacher.kind == "keras" and cfg.taps["hint"].teacher == "hidden"
    tap_model = training.build(cfg)
    assert tap_model.teacher.name == "teacher"
    bad = config.load(
        tiny_mlp(teacher=teacher, taps={"hint": {"layer": "hidden",
                 "teacher": "hiddn", "loss": "feature_mse"}})
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^taps\.hint\.teacher: .*hiddn"):
        training.build(bad)
