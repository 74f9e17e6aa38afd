"""The `distribution:` section, `TF_CONFIG`, where each worker writes,
and the cross-replica option of batch-statistic regularizers.

The multi-process runs are in `test_multi_worker.py`.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

# `mirrored` and `multi_worker` are tf.distribute strategies.
TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies are TensorFlow's own",
)
DIGITS = Path(__file__).resolve().parents[1] / "examples/configs/digits.yaml"
SETTINGS = ("fit.verbose=0", "run.deterministic=false", "run.plots=false")

MINIMAL = {
    "model": {
        "application": {
            "name": "MobileNetV2",
            "weights": None,
            "input_shape": [32, 32, 3],
        }
    },
    "taps": ["block_1_expand_relu"],
}


def load_config(distribution):
    from keras_tap.runs import config as config_lib

    return config_lib.load({**MINIMAL, "distribution": distribution})


@TF_ONLY
@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, ("none", None, True, False)),
        ("multi_worker", ("multi_worker", None, True, False)),
        ({"strategy": "mirrored", "devices": "cpu:0"},
         ("mirrored", ["cpu:0"], True, False)),
        ({"strategy": "multi_worker", "backup": False,
          "cross_replica_moments": True},
         ("multi_worker", None, False, True)),
    ],
)  # fmt: skip
def test_distribution_section_is_read(raw, expected):
    from keras_tap.runs import config as config_lib

    cfg = load_config(raw)
    section = cfg.distribution
    got = (
        section.strategy,
        section.devices,
        section.backup,
        section.cross_replica_moments,
    )
    assert got == expected
    assert config_lib.load(cfg.to_dict()) == cfg


@TF_ONLY
@pytest.mark.parametrize(
    "raw, match",
    [
        ("multiworker", r"^distribution\.strategy: unknown strategy "
         r"'multiworker'; did you mean 'multi_worker'\?"),
        ("data_parallel", r"^distribution\.strategy: 'data_parallel' is "
         r"keras\.distribution\.DataParallel, which needs the JAX backend; "
         r"the active Keras backend is 'tensorflow'"),
        ({"strategy": "multi_worker", "devices": ["cpu:0"]},
         r"^distribution\.devices: devices are chosen for 'mirrored' and "
         r"'data_parallel' only; strategy 'multi_worker' takes its workers "
         r"from TF_CONFIG"),
        ({"strategy": "mirrored", "bakup": True},
         r"^distribution\.bakup: unknown key; did you mean 'backup'\?"),
        ({"strategy": "mirrored", "backup": "yes"},
         r"^distribution\.backup: expected true or false, got 'yes'"),
        ({"strategy": "mirrored", "devices": [1]},
         r"^distribution\.devices: expected a list of device names"),
        (3, r"^distribution: expected a strategy \(none, mirrored, "
         r"multi_worker, data_parallel\) or a mapping, got 3"),
    ],
)  # fmt: skip
def test_bad_distribution_sections_name_their_key_path(raw, match):
    from keras_tap.runs.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(raw)


@TF_ONLY
def test_unknown_mirrored_device_names_the_devices_there_are():
    from keras_tap.runs import distribute
    from keras_tap.runs.config import ConfigError

    section = distribute.DistributionConfig("mirrored", ["/cpu:7"])
    with pytest.raises(
        ConfigError,
        match=r"^distribution\.devices\[0\]: no device '/cpu:7'.*"
        r"this machine has .*CPU:0",
    ):
        distribute.strategy(section)


def cluster(task_type, index, chief=False):
    spec = {"worker": ["a:1", "b:2"]}
    if chief:
        spec["chief"] = ["c:3"]
    return {
        "TF_CONFIG": json.dumps(
            {"cluster": spec, "task": {"type": task_type, "index": index}}
        )
    }


def test_the_task_and_its_chief_come_from_tf_config():
    from keras_tap.runs.distribute import Task, read_task

    assert read_task({}) == Task("worker", 0, 1, True)
    assert read_task(cluster("worker", 0)) == Task("worker", 0, 2, True)
    assert read_task(cluster("worker", 1)) == Task("worker", 1, 2, False)
    # With a chief task, the chief writes and worker 0 does not.
    assert read_task(cluster("chief", 0, True)) == Task("chief", 0, 3, True)
    assert read_task(cluster("worker", 0, True)).is_chief is False


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"TF_CONFIG": "{not json"}, r"^TF_CONFIG: expected JSON"),
        (cluster("ps", 0), r"^TF_CONFIG: task type 'ps' does not train"),
    ],
)
def test_bad_tf_config_is_an_error(environ, match):
    from keras_tap.runs.config import ConfigError
    from keras_tap.runs.distribute import read_task

    with pytest.raises(ConfigError, match=match):
        read_task(environ)


def test_only_the_chief_writes_the_run_directory(tmp_path):
    from keras_tap.runs import distribute

    section = distribute.DistributionConfig("multi_worker")
    run_dir = tmp_path / "run"
    chief = distribute.Placement(run_dir, section, distribute.Task())
    other_task = distribute.Task("worker", 1, 2, False)
    other = distribute.Placement(run_dir, section, other_task)
    assert chief.run_dir == run_dir
    assert other.run_dir == distribute.scratch_dir(run_dir, other_task)
    assert other.run_dir.is_dir() and not other.run_dir.is_relative_to(
        run_dir
    )
    assert chief.backup_dir == run_dir / "backup" / "worker_0"
    assert other.backup_dir == run_dir / "backup" / "worker_1"
    (other.run_dir / "model.keras").write_text("x")
    other.close()
    chief.close()
    assert not other.run_dir.exists()
    assert not run_dir.exists()  # nothing was written there
    # Without backup, or on one device, there is no backup folder.
    for off in (
        distribute.DistributionConfig("multi_worker", backup=False),
        distribute.DistributionConfig("none"),
    ):
        assert distribute.Placement(run_dir, off).backup_dir is None


def test_the_backup_epoch_is_read_from_keras_backup(tmp_path):
    from keras_tap.runs import distribute

    section = distribute.DistributionConfig("mirrored")
    placement = distribute.Placement(tmp_path, section)
    assert placement.backup_epoch() == 0
    placement.backup_dir.mkdir(parents=True)
    metadata = placement.backup_dir / "training_metadata.json"
    metadata.write_text(json.dumps({"epoch": 2, "batch": 0}))
    assert placement.backup_epoch() == 2
    (callback,) = placement.callbacks()
    assert callback.backup_dir == str(placement.backup_dir)


@TF_ONLY
def test_mirrored_config_trains_as_one_device(tmp_path):
    """`distribution: mirrored` (one CPU here) runs the same steps as no
    strategy, with its backup removed at the end."""
    from keras_tap.runs import config as config_lib
    from keras_tap.runs import train as training

    runs = {}
    for strategy in ("none", {"strategy": "mirrored", "devices": ["cpu:0"]}):
        name = "none" if strategy == "none" else "mirrored"
        overrides = list(SETTINGS) + [
            "data.limit=96",
            "fit.epochs=2",
            "run.tensorboard=false",
            f"run.dir={tmp_path / name}",
        ]
        cfg = config_lib.load(DIGITS, overrides)
        cfg = config_lib.load({**cfg.to_dict(), "distribution": strategy})
        runs[name] = training.train(cfg, verbose=0)
    assert runs["mirrored"].history.keys() == runs["none"].history.keys()
    for key, values in runs["none"].history.items():
        np.testing.assert_allclose(
            runs["mirrored"].history[key], values, atol=1e-5, err_msg=key
        )
    assert not (tmp_path / "mirrored" / "backup").exists()
    assert (tmp_path / "mirrored" / "model.keras").is_file()


# ------------------------------------------------- cross-replica regularizers

MOMENT_REGULARIZERS = ("KLSparsity", "DeCov", "Orthogonality")
MOMENT_REGULARIZERS += ("VarianceCovariance",)


@pytest.mark.parametrize("name", MOMENT_REGULARIZERS)
def test_cross_replica_outside_a_strategy_is_the_batch_value(name):
    import keras_tap as kt

    cls = getattr(kt.regularizers, name)
    x = np.random.default_rng(0).uniform(0.05, 0.95, size=(6, 3, 4))
    x = x.astype("float32")
    plain, cross = cls(), cls(cross_replica=True)
    assert cross.get_config() == {**plain.get_config(), "cross_replica": True}
    np.testing.assert_allclose(float(cross(x)), float(plain(x)), rtol=1e-6)


@pytest.mark.parametrize("name", MOMENT_REGULARIZERS)
def test_cross_replica_must_be_a_bool(name):
    import keras_tap as kt

    cls = getattr(kt.regularizers, name)
    with pytest.raises(
        ValueError,
        match=rf"Invalid value for argument `cross_replica` of `{name}`: "
        r"expected True or False\. Received: cross_replica='yes'",
    ):
        cls(cross_replica="yes")


def test_cross_replica_moments_option_reaches_the_regularizers():
    from keras_tap.runs import config as config_lib
    from keras_tap.runs import train as training

    taps = {
        "decov": {"layer": "block_1_expand_relu", "regularizer": "decov"},
        "l1": {"layer": "block_1_expand_relu", "regularizer": "activity_l1"},
    }
    raw = {**MINIMAL, "taps": taps}
    for option in (False, True):
        raw["distribution"] = {"cross_replica_moments": option}
        tap_model = training.build(config_lib.load(raw))
        assert tap_model.taps["decov"].regularizer.cross_replica is option
        assert not hasattr(tap_model.taps["l1"].regularizer, "cross_replica")


DATA_PARALLEL_SCRIPT = """
import json, sys
import keras
import keras_tap as kt

config = {
    "model": {"class_name": "Sequential", "config": {"name": "tiny", "layers": [
        {"class_name": "InputLayer", "config": {"shape": [8, 8, 1]}},
        {"class_name": "Conv2D", "config": {"name": "conv1", "filters": 4,
         "kernel_size": 3, "padding": "same", "activation": "relu"}},
        {"class_name": "GlobalAveragePooling2D", "config": {"name": "gap"}},
        {"class_name": "Dense", "config": {"name": "out", "units": 10,
         "activation": "softmax"}}]}},
    "taps": {"conv1": {"layer": "conv1", "regularizer": {
        "class_name": "ActivityL1", "config": {"l1": 0.001}}}},
    "compile": {"optimizer": {"class_name": "SGD",
                              "config": {"learning_rate": 0.1}},
                "loss": "sparse_categorical_crossentropy"},
    "data": {"dataset": "sklearn_digits", "limit": 256, "batch_size": 32,
             "validation_split": 0.25},
    "fit": {"epochs": 2, "verbose": 0},
    "run": {"seed": 0, "plots": False, "tensorboard": False,
            "dir": sys.argv[1]},
    "distribution": sys.argv[2],
}
run = kt.train(config)
distribution = keras.distribution.distribution()
devices = 0 if distribution is None else len(
    distribution.device_mesh.devices.flatten())
weights = [w.tolist() for w in run.model.base.get_weights()]
print(json.dumps({"history": run.history, "devices": devices,
                  "weights": weights}))
"""


def test_data_parallel_config_on_jax_equals_one_device(tmp_path):
    """`distribution: data_parallel` trains with keras.distribution's
    DataParallel over two host devices, equal to one device."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    results = {}
    for strategy in ("none", "data_parallel"):
        done = subprocess.run(
            [sys.executable, "-c", DATA_PARALLEL_SCRIPT,
             str(tmp_path / strategy), strategy],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[strategy] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["none"]["devices"] == 0
    assert results["data_parallel"]["devices"] == 2
    one, two = results["none"], results["data_parallel"]
    for key in ("loss", "predictions_loss", "conv1_loss", "val_loss"):
        np.testing.assert_allclose(two["history"][key], one["history"][key],
                                   atol=1e-4)
    for a, b in zip(one["weights"], two["weights"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
