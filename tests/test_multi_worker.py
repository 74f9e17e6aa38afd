"""`MultiWorkerMirroredStrategy` over two local worker processes equals
one device on the same global batch.

Each worker is a fresh interpreter with its own `TF_CONFIG` (`workers.py`
starts them on free ports and always kills them).
"""

import json
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import workers

# The worker processes run `tf.distribute.MultiWorkerMirroredStrategy`.
TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies are TensorFlow's own",
)

# Common to the one-device run and the workers: data, models, training.
TRAIN = textwrap.dedent(
    """
    import json
    import os
    import sys

    MODE, OUT = sys.argv[1], sys.argv[2]
    EXTRA = sys.argv[3:]

    import tensorflow as tf

    if MODE == "worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()

    import keras
    import numpy as np

    import keras_tap as kt

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(64,))
    feat = rng.normal(size=(64, 5)).astype("float32")
    weight = rng.uniform(0.5, 1.5, size=(64,)).astype("float32")

    def dataset():
        data = tf.data.Dataset.from_tensor_slices(
            (x, {"predictions": y, "feat": feat}, weight)
        ).batch(16)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return data.with_options(options)

    def student():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(
            4, 3, activation="relu", name="conv1",
            kernel_regularizer=keras.regularizers.L2(1e-3),
        )(inputs)
        h = keras.layers.Conv2D(6, 3, activation="relu", name="conv2")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dense(5, activation="tanh", name="feat")(h)
        outputs = keras.layers.Dense(3, name="logits")(h)
        return keras.Model(inputs, outputs, name="student")

    def teacher():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(3, 3, activation="relu", name="t_conv")(
            inputs
        )
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dense(5, activation="tanh", name="t_feat")(h)
        outputs = keras.layers.Dense(3, name="t_logits")(h)
        return keras.Model(inputs, outputs, name="teacher")

    def build():
        taps = {
            "conv1": kt.Tap(
                "conv1", regularizer=keras.regularizers.L2(1e-2), weight=0.5
            ),
            "conv2": kt.Tap(
                "conv2", regularizer=kt.regularizers.ActivityL2(1e-2)
            ),
            "feat": kt.Tap("feat", loss="mse", weight=0.3),
            "hint": kt.Tap("feat", teacher="t_feat", loss="mse", weight=0.7),
        }
        # Batch moments over the global batch, and (weight 0, logged
        # only) over each replica's share.
        decov = kt.regularizers.DeCov
        vicreg = kt.regularizers.VarianceCovariance
        taps["decov"] = kt.Tap(
            "conv2", regularizer=decov(200.0, cross_replica=True)
        )
        taps["vicreg"] = kt.Tap(
            "feat", regularizer=vicreg(cross_replica=True), weight=0.2
        )
        taps["decov_local"] = kt.Tap(
            "conv2", regularizer=decov(200.0), weight=0.0
        )
        tap_model = kt.TapModel(student(), taps, teacher=teacher())
        tap_model.compile(
            keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return tap_model

    with strategy.scope():
        tap_model = build()
    if MODE == "single":
        np.savez(
            OUT + ".init.npz",
            *tap_model.base.get_weights(),
            *tap_model.teacher.get_weights(),
        )
    else:
        with np.load(OUT + ".init.npz") as init:
            arrays = [init[f"arr_{i}"] for i in range(len(init.files))]
        n = len(tap_model.base.weights)
        tap_model.base.set_weights(arrays[:n])
        tap_model.teacher.set_weights(arrays[n:])

    history = tap_model.fit(
        dataset(), epochs=2, verbose=0, validation_data=dataset()
    )
    evaluated = tap_model.evaluate(dataset(), verbose=0, return_dict=True)
    predictions = tap_model.predict(x[:16], batch_size=16, verbose=0)

    arrays = {}
    for i, w in enumerate(tap_model.base.get_weights()):
        arrays[f"w{i}"] = w
    for key, values in history.history.items():
        arrays[f"log/{key}"] = np.asarray(values)
    for key, value in evaluated.items():
        arrays[f"eval/{key}"] = np.asarray(value)
    for i, value in enumerate(keras.tree.flatten(predictions)):
        arrays[f"predict/{i}"] = np.asarray(value)
    if MODE == "worker":
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        np.savez(f"{OUT}.worker.{index}.npz", **arrays)
    else:
        np.savez(f"{OUT}.single.npz", **arrays)
    """
)

# Plain Keras under two workers: Keras 3.15.1's `fit` fails in two places,
# which `multi_worker.py` works around for `TapModel`. When these stop
# failing, Keras has fixed them: remove the workarounds.
PLAIN_KERAS = textwrap.dedent(
    """
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras
    import numpy as np

    class LocalBuild(keras.Sequential):
        # keras_tap's workaround of the first defect alone.
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            for _, _, batches in iterator:
                batch = next(batches)
                break
            local = strategy.experimental_local_results
            with strategy.scope():
                self._symbolic_build(
                    data_batch=tuple(local(v)[0] for v in batch)
                )

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, x.sum(-1))).batch(8)
    for tag, cls in (("build", keras.Sequential), ("logs", LocalBuild)):
        with strategy.scope():
            model = cls([keras.Input((4,)), keras.layers.Dense(1)])
            model.compile("sgd", "mse")
        try:
            model.fit(data, epochs=1, verbose=0)
            print(f"OUTCOME {tag}: fit ran")
        except Exception as e:
            print(f"OUTCOME {tag}:", type(e).__name__, str(e)[:200])
    """
)


# The tap whose batch moments are each replica's (no `cross_replica`).
LOCAL = "decov_local"


def load(path):
    with np.load(path) as arrays:
        return {k: arrays[k] for k in arrays.files}


def run_one_device(tmp_path, script, out, *extra, timeout=240):
    """Run `script` in one process without a cluster."""
    with workers.Cluster(tmp_path, n=1) as cluster:
        cluster.start(
            [sys.executable, "-c", script, "single", out, *extra],
            0,
            env={"TF_CONFIG": ""},
        )
        (result,) = cluster.wait(timeout)
    assert result.returncode == 0, result.log[-3000:]


def run_two_workers(tmp_path, script, out, *extra, timeout=240):
    with workers.Cluster(tmp_path, n=2) as cluster:
        results = cluster.run(script, args=["worker", out, *extra],
                              timeout=timeout)
        failed = [r for r in results if r.returncode != 0]
        assert not failed, cluster.describe()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multi_worker")
    out = str(tmp_path / "run")
    run_one_device(tmp_path, TRAIN, out)
    run_two_workers(tmp_path, TRAIN, out)
    return {
        "init": f"{out}.init.npz",
        "single": load(f"{out}.single.npz"),
        0: load(f"{out}.worker.0.npz"),
        1: load(f"{out}.worker.1.npz"),
    }


def _part(results, prefix):
    return {
        k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)
    }


def _weights(results):
    found = _part(results, "w")
    return [found[str(i)] for i in range(len(found))]


@TF_ONLY
def test_two_workers_train_to_the_weights_of_one_device(trained):
    single = _weights(trained["single"])
    assert len(single) == 8
    for worker in (0, 1):
        got = _weights(trained[worker])
        assert len(got) == len(single)
        for a, b in zip(got, single):
            np.testing.assert_allclose(a, b, atol=1e-4)
    # Training moved the weights: equal weights are not the initial ones.
    with np.load(trained["init"]) as init:
        assert not np.allclose(init["arr_0"], single[0], atol=1e-3)


@TF_ONLY
def test_two_workers_log_the_losses_of_one_device(trained):
    single = _part(trained["single"], "log/")
    expected = {
        "loss", "predictions_loss", "accuracy",
        "conv1_loss", "conv2_loss", "feat_loss", "hint_loss",
        "decov_loss", "vicreg_loss", "decov_local_loss",
    }
    assert set(single) == expected | {f"val_{k}" for k in expected}
    for worker in (0, 1):
        logs = _part(trained[worker], "log/")
        assert set(logs) == set(single)
        for key in single:
            assert logs[key].shape == (2,), key
            if LOCAL in key:
                continue  # per-replica moments: compared below
            np.testing.assert_allclose(
                logs[key], single[key], atol=1e-4, err_msg=key
            )


@TF_ONLY
def test_two_workers_evaluate_and_predict_as_one_device(trained):
    for part in ("eval/", "predict/"):
        single = _part(trained["single"], part)
        assert single
        for worker in (0, 1):
            got = _part(trained[worker], part)
            assert set(got) == set(single)
            for key in single:
                if LOCAL in key:
                    continue
                np.testing.assert_allclose(
                    got[key], single[key], atol=1e-4, err_msg=part + key
                )


@TF_ONLY
def test_keras_multi_worker_defects_still_reproduce(tmp_path):
    """The workarounds in `multi_worker.py` stand for these two defects of
    Keras's TensorFlow trainer; this fails once Keras fixes either."""
    from keras_tap.training.trainers import multi_worker

    assert multi_worker.keras_internals_missing() == []
    with workers.Cluster(tmp_path, n=2) as cluster:
        results = cluster.run(PLAIN_KERAS, timeout=180)
    for result in results:
        assert result.returncode == 0, cluster.describe()
        outcomes = [
            line for line in result.log.splitlines()
            if line.startswith("OUTCOME")
        ]
        assert len(outcomes) == 2, result.log[-3000:]
        build, logs = outcomes
        assert "PerReplica" in build, (
            "Keras now builds under MultiWorkerMirroredStrategy: remove "
            f"`multi_worker.maybe_symbolic_build`. Got {build!r}"
        )
        assert "Invalid reduction dimension" in logs, (
            "Keras now reduces scalar logs across workers: remove "
            f"`multi_worker.reducible_logs`. Got {logs!r}"
        )


# ------------------------------------------------------------ keras-tap train

CLI = [sys.executable, "-m", "keras_tap"]
DIGITS = Path(__file__).resolve().parents[1] / "examples/configs/digits.yaml"
SETTINGS = (
    "data.limit=320",
    "fit.verbose=0",
    "run.deterministic=false",
    "run.plots=false",
)


def train_command(run_dir, strategy, epochs):
    command = [*CLI, "train", str(DIGITS)]
    settings = SETTINGS + (
        f"fit.epochs={epochs}",
        f"run.dir={run_dir}",
        f"distribution={strategy}",
    )
    for setting in settings:
        command += ["--set", setting]
    return command


def history(run_dir):
    with open(Path(run_dir) / "history.json") as f:
        return json.load(f)


def base_weights(run_dir):
    import keras

    return keras.saving.load_model(Path(run_dir) / "base.keras").get_weights()


def assert_same_run(run_dir, reference):
    expected, got = history(reference), history(run_dir)
    assert set(got) == set(expected)
    assert got["epoch"] == expected["epoch"]
    for key in expected:
        np.testing.assert_allclose(
            got[key], expected[key], atol=1e-4, err_msg=key
        )
    weights, reference_weights = base_weights(run_dir), base_weights(reference)
    assert len(weights) == len(reference_weights) == 8
    for a, b in zip(weights, reference_weights):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The digits config for 3 epochs in one process, without a strategy."""
    tmp_path = tmp_path_factory.mktemp("one_device")
    run_dir = tmp_path / "run"
    with workers.Cluster(tmp_path, n=1) as cluster:
        cluster.start(
            train_command(run_dir, "none", 3), 0, env={"TF_CONFIG": ""}
        )
        (result,) = cluster.wait(300)
    assert result.returncode == 0, result.log[-3000:]
    return run_dir


@TF_ONLY
def test_keras_tap_train_on_two_workers_writes_one_run(
    tmp_path, one_device_run
):
    run_dir = tmp_path / "run"
    with workers.Cluster(tmp_path, n=2) as cluster:
        cluster.start_all(train_command(run_dir, "multi_worker", 3))
        results = cluster.wait(300)
        assert all(r.returncode == 0 for r in results), cluster.describe()
    chief, worker = results
    assert f"run directory: {run_dir}" in chief.log
    assert "worker_1 of 2: trained; the chief writes the run directory" in (
        worker.log
    )
    assert_same_run(run_dir, one_device_run)
    # One run directory; the backups and the other worker's folder are gone.
    assert not (run_dir / "backup").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run", *(Path(r).name for r in cluster.logs.values())]
    )
    assert "worker_1" not in (run_dir / "config.yaml").read_text()


@TF_ONLY
def test_a_killed_worker_restarts_with_the_same_command(
    tmp_path, one_device_run
):
    """SIGKILL worker 1 in the epoch after the first backup, stop the
    chief, start both again with the same command: the run continues from
    the backup, loses no completed epoch and ends where an uninterrupted
    run ends."""
    run_dir = tmp_path / "run"
    command = train_command(run_dir, "multi_worker", 3)
    marker = run_dir / "backup" / "worker_1" / "training_metadata.json"
    with workers.Cluster(tmp_path, n=2) as cluster:
        cluster.start_all(command)
        cluster.wait_for_file(marker, timeout=240)
        cluster.kill(1)
        # The chief is left waiting for worker 1 in a collective.
        cluster.kill(0)
        backed_up = json.loads(marker.read_text())["epoch"]
        assert 1 <= backed_up < 3
        cluster.start_all(command)
        results = cluster.wait(300)
        assert all(r.returncode == 0 for r in results), cluster.describe()
    assert f"resumed after epoch {backed_up}" in results[0].log
    assert_same_run(run_dir, one_device_run)
    assert not (run_dir / "backup").exists()
    # The killed worker's temporary folder went with the restarted one.
    from keras_tap.runs import distribute

    task = distribute.Task("worker", 1, 2, False)
    assert not distribute.scratch_dir(run_dir, task).exists()


@TF_ONLY
def test_cross_replica_moments_equal_one_device(trained):
    single = trained["single"]
    for worker in (0, 1):
        got = trained[worker]
        for a, b in zip(_weights(got), _weights(single)):
            np.testing.assert_allclose(a, b, atol=1e-4)
        for key in ("decov_loss", "vicreg_loss", "val_decov_loss", "loss"):
            np.testing.assert_allclose(
                got[f"log/{key}"], single[f"log/{key}"], rtol=1e-3,
                atol=1e-6, err_msg=key,
            )
    # The term is not negligible next to the others.
    assert single["log/decov_loss"][0] > 1e-2


@TF_ONLY
def test_replica_moments_by_default_differ_from_one_device(trained):
    """Without `cross_replica`, each worker's DeCov sees its half of the
    batch (documented): on one device the two taps log the same value."""
    single = trained["single"]
    np.testing.assert_allclose(
        single["log/decov_local_loss"], single["log/decov_loss"], rtol=1e-5
    )
    got = trained[0]
    local, cross = got["log/decov_local_loss"], got["log/decov_loss"]
    assert np.all(np.abs(local - cross) > 0.1 * cross)

