"""`kt.config`: typed sections, key paths, `--set` overrides, round trips."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from keras_tap.runs import config, data
from keras_tap.runs import train as training
from keras_tap.runs.config import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
DIGITS = EXAMPLES / "digits.yaml"
TINY = [
    "data.limit=96",
    "data.batch_size=16",
    "fit.epochs=2",
    "fit.steps_per_epoch=2",
    "fit.verbose=0",
    "run.plots=false",
    "run.deterministic=false",
]


def tiny_mlp(**sections):
    """A small valid config dict: an inline MLP on the digits."""
    raw = {
        "model": {
            "class_name": "Sequential",
            "config": {
                "name": "mlp",
                "layers": [
                    {
                        "class_name": "InputLayer",
                        "config": {"shape": [8, 8, 1]},
                    },
                    {"class_name": "Flatten", "config": {"name": "flat"}},
                    {
                        "class_name": "Dense",
                        "config": {"name": "hidden", "units": 8},
                    },
                    {
                        "class_name": "Dense",
                        "config": {"name": "out", "units": 10},
                    },
                ],
            },
        },
        "taps": {"a/b": {"layer": "hidden", "regularizer": "activity_l2"}},
    }
    raw.update(sections)
    return raw


def without_auto_names(value):
    """`value` with Keras's generated input-layer names made equal (a lazily
    built adapter gets `input_layer_<n>`, n counting in the session)."""
    if isinstance(value, dict):
        return {k: without_auto_names(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_auto_names(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"^input_layer(_\d+)?$", "input_layer", value)
    return value


def test_load_gives_typed_sections():
    cfg = config.load(DIGITS, ["run.dir=/tmp/somewhere"])
    assert cfg.model.kind == "keras"
    assert list(cfg.taps) == ["sparse_conv2", "early_head"]
    head = cfg.taps["early_head"]
    assert head.layer == "pool" and head.target == "predictions"
    assert head.weight["class_name"] == "CosineDecay"
    assert cfg.compile.loss == "sparse_categorical_crossentropy"
    assert cfg.data.source == "dataset" and cfg.data.value == "sklearn_digits"
    assert cfg.data.validation_split == 0.2 and cfg.data.batch_size == 32
    assert cfg.fit.epochs == 20
    assert cfg.callbacks[0].class_name == "TapStatistics"
    assert cfg.run.dir == "/tmp/somewhere" and cfg.run.seed == 0


def test_defaults_and_run_dir_from_the_config_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "my_job.yaml"
    path.write_text(yaml.safe_dump(tiny_mlp()))
    cfg = config.load(path)
    assert cfg.run.dir == str(tmp_path / "runs" / "my_job")
    assert cfg.compile.optimizer == "adam" and cfg.compile.metrics == []
    assert cfg.data.value == "sklearn_digits" and cfg.data.shuffle is True
    assert cfg.fit.epochs == 10 and cfg.fit.steps_per_epoch is None


def test_relative_paths_resolve_where_they_are_written(tmp_path, monkeypatch):
    """A path in the config file is relative to the file's directory; a path
    given with --set (overrides) is relative to the current directory, as
    is the default run directory."""
    folder, cwd = tmp_path / "configs", tmp_path / "work"
    for directory in (folder / "data", cwd / "data"):
        directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for directory in (folder / "data", cwd / "data"):
        np.save(directory / "x.npy", rng.random((8, 8, 8, 1), "float32"))
        np.save(directory / "y.npy", rng.integers(0, 10, 8))
    path = folder / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            tiny_mlp(
                data={"npy": "data/x.npy", "y": "data/y.npy"},
                run={"dir": "out/in_file"},
            )
        )
    )
    monkeypatch.chdir(cwd)
    cfg = config.load(path)
    assert cfg.run.dir == str(folder / "out" / "in_file")
    assert cfg.data.value == str(folder / "data" / "x.npy")
    assert cfg.data.y == str(folder / "data" / "y.npy")
    cfg = config.load(path, ["run.dir=out/set", "data.npy=data/x.npy"])
    assert cfg.run.dir == str(cwd / "out" / "set")
    assert cfg.data.value == str(cwd / "data" / "x.npy")
    assert cfg.data.y == str(folder / "data" / "y.npy")  # from the file
    cfg = config.load(path, ["run={dir: out/section}", "data.y=data/y.npy"])
    assert cfg.run.dir == str(cwd / "out" / "section")
    assert cfg.data.y == str(cwd / "data" / "y.npy")
    raw = tiny_mlp()
    raw.pop("run", None)
    path.write_text(yaml.safe_dump(raw))
    assert config.load(path).run.dir == str(cwd / "runs" / "job")
    # An npz source's y and targets name arrays, not files.
    np.savez(cwd / "d.npz", x=np.zeros((8, 8, 8, 1)), labels=np.zeros(8))
    cfg = config.load(path, ["data.npz=d.npz", "data.y=labels"])
    assert cfg.data.value == str(cwd / "d.npz") and cfg.data.y == "labels"


def test_resolved_dict_loads_back_equal(tmp_path):
    cfg = config.load(DIGITS, [f"run.dir={tmp_path}"])
    again = config.load(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_relative_paths_are_resolved_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    np.savez(
        tmp_path / "sub" / "d.npz", x=np.zeros((4, 8, 8, 1)), y=np.zeros(4)
    )
    path = tmp_path / "sub" / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_mlp(data={"npz": "d.npz"})))
    cfg = config.load(path)
    assert cfg.data.value == str(tmp_path / "sub" / "d.npz")
    assert cfg.data.to_dict()["npz"] == cfg.data.value


@pytest.mark.parametrize(
    "parts, text",
    [
        (["taps", "a/b", "weight"], 'taps["a/b"].weight'),
        (["taps", "x.y", "loss"], 'taps["x.y"].loss'),
        (
            ["callbacks", 0, "config", "patience"],
            "callbacks[0].config.patience",
        ),
        (["data", "targets", "early"], "data.targets.early"),
    ],
)
def test_key_paths_round_trip(parts, text):
    assert config.key_path(*parts) == text
    assert config.parse_key_path(text) == parts


@pytest.mark.parametrize(
    "assignment, path, value",
    [
        ("fit.epochs=5", ("fit", "epochs"), 5),
        ("taps.a.weight=0.5", ("taps", "a", "weight"), 0.5),
        ("data.shuffle=false", ("data", "shuffle"), False),
        ("data.image_size=[4, 6]", ("data", "image_size"), [4, 6]),
        ("data.seed=null", ("data", "seed"), None),
        ("run.dir=out/run 1", ("run", "dir"), "out/run 1"),
        ('taps["a/b"].weight=0.25', ("taps", "a/b", "weight"), 0.25),
        ("taps['a/b'].metrics=[mae]", ("taps", "a/b", "metrics"), ["mae"]),
        (
            "compile.optimizer={class_name: SGD}",
            ("compile", "optimizer"),
            {"class_name": "SGD"},
        ),  # fmt: skip
    ],
)
def test_override_parses_values_as_yaml(assignment, path, value):
    raw = {"taps": {"a": "conv", "a/b": {"layer": "x"}}, "data": {"seed": 3}}
    config.apply_override(raw, assignment)
    node = raw
    for part in path:
        node = node[part]
    assert node == value and type(node) is type(value)
    if path[:2] == ("taps", "a"):
        assert raw["taps"]["a"]["layer"] == "conv"


def test_overrides_are_validated_and_typed():
    raw = tiny_mlp()
    cfg = config.load(
        raw,
        [
            "fit.epochs=3",
            'taps["a/b"].weight=0.5',
            "data.shuffle=false",
            "fit.steps_per_epoch=null",
            "compile.metrics=[accuracy, mae]",
        ],
    )
    assert cfg.fit.epochs == 3 and cfg.taps["a/b"].weight == 0.5
    assert cfg.data.shuffle is False and cfg.fit.steps_per_epoch is None
    assert cfg.compile.metrics == ["accuracy", "mae"]
    with pytest.raises(ConfigError, match=r'^taps\["a/b"\]\.weight: expected'):
        config.load(raw, ['taps["a/b"].weight=-1'])
    with pytest.raises(ConfigError, match=r"^fit\.epochs: expected an integer"):
        config.load(raw, ["fit.epochs=2.5"])


def test_setting_a_source_replaces_the_other_source():
    raw = {"data": {"dataset": "mnist", "batch_size": 4}, "model": {
        "application": {"name": "MobileNetV2"}}}  # fmt: skip
    config.apply_override(raw, "data.npz=x.npz")
    config.apply_override(raw, "model.file=m.keras")
    assert raw["data"] == {"batch_size": 4, "npz": "x.npz"}
    assert raw["model"] == {"file": "m.keras"}


@pytest.mark.parametrize(
    "assignment, match",
    [
        ("foo", r"^--set: expected key\.path=value, got 'foo'"),
        ("taps[=3", r"^--set: cannot parse the key path"),
        ("=3", r"^--set: expected key\.path=value, got no key path"),
        ("fit.epochs=[1", r"^fit\.epochs: cannot parse the --set value"),
        ("callbacks[3].config=1", r"^callbacks\[3\]: no such list item"),
        ("fit.epochs.x=1", r"^fit\.epochs\.x: cannot set a key in 10"),
    ],
)
def test_bad_overrides(assignment, match):
    raw = {"fit": {"epochs": 10}, "callbacks": []}
    with pytest.raises(ConfigError, match=match):
        config.apply_override(raw, assignment)


def test_errors_are_value_errors_with_the_key_path():
    with pytest.raises(ValueError) as info:
        config.load(tiny_mlp(taps={"early": {"layer": "hidden", "weight": -1}}))
    assert str(info.value) == (
        "taps.early.weight: expected a non-negative number or a schedule, "
        "got -1"
    )
    assert info.value.path == "taps.early.weight"


def test_tap_list_and_bare_paths():
    cfg = config.load(tiny_mlp(taps=["hidden", "flat"]))
    assert list(cfg.taps) == ["hidden", "flat"]
    assert cfg.taps["flat"].layer == "flat" and cfg.taps["flat"].loss is None
    cfg = config.load(tiny_mlp(taps={"h": "hidden", "out": None}))
    assert cfg.taps["h"].layer == "hidden" and cfg.taps["out"].layer == "out"


def test_short_and_full_keras_forms_both_resolve():
    full = keras.saving.serialize_keras_object(keras.regularizers.L2(1e-3))
    cfg = config.load(
        tiny_mlp(
            taps={
                "short": {"layer": "hidden", "regularizer": {
                    "class_name": "L2", "config": {"l2": 1e-3}}},
                "full": {"layer": "flat", "regularizer": full},
            },
            compile={"optimizer": {"class_name": "SGD", "config": {
                "learning_rate": 0.1}}},
        )
    )  # fmt: skip
    tap_model = training.build(cfg)
    regs = [tap_model.taps[name].regularizer for name in ("short", "full")]
    assert all(isinstance(r, keras.regularizers.L2) for r in regs)
    assert [r.l2 for r in regs] == pytest.approx([1e-3, 1e-3])


def test_data_split_is_seeded_and_disjoint():
    cfg = config.load(tiny_mlp(data={"limit": 100, "validation_split": 0.25}))
    train, val = data.load(cfg.data, seed=0)
    again, _ = data.load(cfg.data, seed=0)
    other, _ = data.load(cfg.data, seed=1)
    assert len(train) == 75 and len(val) == 25
    np.testing.assert_array_equal(train.x, again.x)
    assert not np.array_equal(train.x, other.x)
    flat = {tuple(v.ravel()) for v in val.x}
    assert not any(tuple(v.ravel()) in flat for v in train.x)
    assert train.x.dtype == np.float32 and train.x.max() <= 1.0
    assert train.x.shape[1:] == (8, 8, 1) and set(train.y) <= set(range(10))


def test_epoch_order_depends_on_seed_and_epoch_only():
    arrays = data.Arrays(np.arange(10, dtype="float32")[:, None], np.arange(10))

    def epochs(initial, seed=3):
        dataset = data.training_dataset(
            arrays, batch_size=4, seed=seed, shuffle=True,
            initial_epoch=initial, epochs=3, steps=3,
        )  # fmt: skip
        return [x[:, 0].tolist() for x, _ in dataset.as_numpy_iterator()]

    full, resumed = epochs(0), epochs(2)
    assert resumed == full[6:]
    perm = np.random.default_rng([3, 2]).permutation(10).tolist()
    assert sum(resumed, []) == perm
    assert epochs(0, seed=4) != full


def test_config_round_trip_rebuilds_the_same_model(tmp_path):
    """config -> run -> saved config.yaml -> the same model."""
    cfg = config.load(DIGITS, TINY + [f"run.dir={tmp_path / 'run'}"])
    run = training.train(cfg)
    saved = config.load(run.dir / "config.yaml")
    assert saved == cfg and saved.to_dict() == cfg.to_dict()
    rebuilt = training.build(saved)
    rebuilt.set_weights(run.model.get_weights())
    loaded = keras.saving.load_model(run.files["model"])
    expected_config = without_auto_names(run.model.get_config())
    assert without_auto_names(rebuilt.get_config()) == expected_config
    assert without_auto_names(loaded.get_config()) == expected_config
    x = data.load(saved.data, saved.run.seed)[1].x
    expected, expected_taps = run.model.predict(x, verbose=0)
    for model in (rebuilt, loaded):
        predictions, taps = model.predict(x, verbose=0)
        np.testing.assert_allclose(predictions, expected, atol=1e-6)
        for name in expected_taps:
            np.testing.assert_allclose(
                taps[name], expected_taps[name], atol=1e-6
            )
    base = keras.saving.load_model(run.files["base"])
    np.testing.assert_allclose(base.predict(x, verbose=0), expected, atol=1e-6)


# -------------------------------------------------------------- data sources


def test_npz_npy_and_directory_sources(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((20, 8, 8, 1), dtype="float32")
    y = rng.integers(0, 10, 20)
    np.savez(tmp_path / "d.npz", images=x, labels=y, hint=x.mean((1, 2)))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    head = {"class_name": "Dense", "config": {"units": 1}}
    taps = {"hint": {"layer": "hidden", "loss": "mse", "adapter": head}}
    cfg = config.load(
        tiny_mlp(taps=taps, data={"npz": "d.npz", "x": "images", "y": "labels",
                 "targets": {"hint": "hint"}, "validation_split": 0.25}),
        base_dir=tmp_path,
    )  # fmt: skip
    train, val = data.load(cfg.data)
    assert (len(train), len(val)) == (15, 5)
    assert train.fit_targets()["hint"].shape == (15, 1)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train.y, val.y])), np.sort(y)
    )
    cfg = config.load(
        tiny_mlp(data={"npy": "x.npy", "y": "y.npy"}), base_dir=tmp_path
    )
    train, val = data.load(cfg.data)
    assert train.x.shape == (16, 8, 8, 1) and val.y.shape == (4,)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            keras.utils.save_img(
                tmp_path / "images" / label / f"{i}.png",
                rng.integers(0, 255, (10, 12, 3)).astype("uint8"),
            )
    cfg = config.load(
        tiny_mlp(data={"directory": "images", "image_size": [8, 8],
                       "color_mode": "grayscale", "rescale": 1 / 255,
                       "validation_split": 0}),
        base_dir=tmp_path,
    )  # fmt: skip
    train, val = data.load(cfg.data)
    assert train.x.shape == (6, 8, 8, 1) and val is None
    assert sorted(train.y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert 0 <= train.x.min() and train.x.max() <= 1


def test_npz_key_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8, 1)), y=np.zeros(3))
    cases = [
        (
            {"x": "inputs"},
            r"^data\.x: no array 'inputs' in .* \(arrays: x, y\)",
        ),
        ({}, r"^data\.y: has 3 samples, but x has 4"),
    ]
    for extra, match in cases:
        cfg = config.load(
            tiny_mlp(data={"npz": "d.npz", **extra}), base_dir=tmp_path
        )
        with pytest.raises(ConfigError, match=match):
            data.load(cfg.data)


def test_keras_dataset_missing_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cfg = config.load(tiny_mlp(data={"dataset": "fashion_mnist"}))
    with pytest.raises(ConfigError) as info:
        data.load(cfg.data)
    message = str(info.value)
    assert message.startswith("data.dataset: fashion_mnist is not in the Keras")
    assert str(tmp_path / "datasets" / "fashion-mnist") in message
    assert "keras.datasets.fashion_mnist.load_data()" in message


def test_sklearn_missing_gives_the_pip_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_sklearn)
    cfg = config.load(tiny_mlp())
    with pytest.raises(
        ImportError, match=r'pip install "keras-tap\[examples\]"'
    ):
        data.load(cfg.data)


# ------------------------------------------------------------------ resuming


def test_resume_ignores_half_written_files(tmp_path):
    """A kill while a checkpoint or the state is being written leaves only
    temporary files, which a resume removes."""
    settings = TINY + [f"run.dir={tmp_path}", "fit.epochs=1"]
    run = training.train(config.load(DIGITS, settings))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "epoch_0001.tmp.keras").write_bytes(b"PK\x03 half")
    (checkpoints / "state.json.tmp").write_text('{"epoch": 1, "chec')
    resumed = training.train(
        config.load(DIGITS, settings + ["fit.epochs=2"]), resume=True
    )
    assert resumed.initial_epoch == 1
    assert resumed.history["epoch"] == [0, 1]
    assert resumed.history["loss"][0] == run.history["loss"][0]
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch_0001.keras", "state.json",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"^data\.batch_size: differs from"):
        training.train(
            config.load(DIGITS, settings + ["data.batch_size=8"]), resume=True
        )
