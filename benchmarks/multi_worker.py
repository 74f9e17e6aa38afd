"""Benchmark a `TapModel` training step under `MultiWorkerMirroredStrategy`.

Starts two worker processes on 127.0.0.1 (free ports, one `TF_CONFIG`
each, always killed at the end) and prints a markdown table of the median
training-step time of a small CNN on 32x32 random images, global batch 64,
under the same two-worker strategy:

(a) `TapModel.fit` with an activity-regularizer tap and a data-target tap,
(b) the same base model alone, without taps: a plain `keras.Model` with
    keras_tap's multi-worker fixes (Keras 3.15.1's own `fit` does not run
    under two workers), so that it is Keras's own training step.

Target: (a)/(b) <= 1.05. The setups are interleaved over several rounds
and the ratio is the median of the per-round ratios, so drift and other
load hit both alike; per-step times come from a callback, the first round
is a warm-up.

Usage:

    python benchmarks/multi_worker.py [--steps 20] [--rounds 7]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 64
CLASSES = 10


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(args):
    """Runs two workers of this script; returns worker 0's results."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    out = tempfile.mkdtemp(prefix="keras_tap_bench_")
    processes = []
    try:
        for index in range(2):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            command = [
                sys.executable, __file__, "--worker", out,
                "--steps", str(args.steps), "--rounds", str(args.rounds),
            ]  # fmt: skip
            with open(os.path.join(out, f"{index}.log"), "w") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in processes):
            failed = [p for p in processes if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for index, process in enumerate(processes):
            if process.poll() != 0:
                with open(os.path.join(out, f"{index}.log")) as f:
                    log = f.read()[-3000:]
                raise SystemExit(
                    f"worker {index} failed (returncode {process.poll()}):\n"
                    + log
                )
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(out, ignore_errors=True)


def worker(args):
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras
    import numpy as np

    import keras_tap as kt
    from keras_tap.training.trainers import multi_worker

    class Plain(keras.Model):
        """The base model alone, as Keras trains it, with the two
        multi-worker fixes keras_tap applies to `TapModel`."""

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            build = super()._maybe_symbolic_build
            return multi_worker.maybe_symbolic_build(
                self, build, iterator, data_batch
            )

        def train_step(self, data):
            return multi_worker.reducible_logs(super().train_step(data))

        def make_train_function(self, force=False):
            make = super().make_train_function
            return multi_worker.make_function(self, make, "train", force)

    def base():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((32, 32, 3))
        h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(
            inputs
        )
        h = keras.layers.Conv2D(
            32, 3, strides=2, padding="same", activation="relu", name="block1"
        )(h)
        h = keras.layers.Conv2D(
            64, 3, strides=2, padding="same", activation="relu", name="block2"
        )(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dense(64, activation="relu", name="features")(h)
        outputs = keras.layers.Dense(CLASSES, name="logits")(h)
        return inputs, outputs

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with strategy.scope():
        taps = {
            "block1": kt.Tap(
                "block1", regularizer=kt.regularizers.ActivityL2(1e-4)
            ),
            "features": kt.Tap("features", loss="mse", weight=0.5),
        }
        tapped = kt.TapModel(keras.Model(*base()), taps)
        tapped.compile(keras.optimizers.SGD(0.01), loss=loss)
        plain = Plain(*base())
        plain.compile(keras.optimizers.SGD(0.01), loss=loss)

    rng = np.random.default_rng(0)
    n = BATCH * args.steps
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,))
    features = rng.normal(size=(n, 64)).astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )

    def dataset(targets):
        data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(BATCH)
        return data.with_options(options).cache()

    data = {
        "tapped": dataset({"predictions": y, "features": features}),
        "plain": dataset(y),
    }
    models = {"tapped": tapped, "plain": plain}

    class StepTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    medians = {name: [] for name in models}
    for _ in range(args.rounds + 1):
        for name, model in models.items():
            timer = StepTimes()
            model.fit(data[name], epochs=1, verbose=0, callbacks=[timer])
            medians[name].append(statistics.median(timer.times[1:]))
    medians = {name: values[1:] for name, values in medians.items()}
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
        ratios = [a / b for a, b in zip(medians["tapped"], medians["plain"])]
        results = {
            "tapped": statistics.median(medians["tapped"]),
            "plain": statistics.median(medians["plain"]),
            "ratio": statistics.median(ratios),
        }
        with open(os.path.join(args.worker, "results.json"), "w") as f:
            json.dump(results, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = launch(args)
    verdict = "PASS" if results["ratio"] <= 1.05 else "FAIL"
    print("| Measure | Value | Target | Result |")
    print("| --- | --- | --- | --- |")
    print(f"| with taps (median step s) | {results['tapped']:.4f} |  |  |")
    print(f"| without taps (median step s) | {results['plain']:.4f} |  |  |")
    print(f"| with / without | {results['ratio']:.3f} | <= 1.05 | {verdict} |")


if __name__ == "__main__":
    main()
