"""Benchmark `TapModel.extract` against hand-written Keras.

Prints a markdown table, in one run:

- the median wall time (after a warm-up, over several repeats) of
  (a) extracting ResNet50's `conv2_block3_out` with `tap_model.extract`,
  (b) the full forward pass `model.predict`, and
  (c) the hand-written `keras.Model(model.inputs, layer.output).predict`,
  built once; targets: early/full <= 0.5 and kt/hand <= 1.10;
- the peak memory growth of streaming `extract(..., to="x.npz")` over 1,000
  and 10,000 samples, each in a fresh subprocess, from a `PyDataset` that
  makes its batches on the fly (so the input does not dominate); target:
  within 10%.

Usage:

    python benchmarks/extract.py [--samples 256] [--repeats 5]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tap as kt  # noqa: E402

EARLY_TAP = "conv2_block3_out"
MEMORY_TAP = "features"
MEMORY_SIZES = (1_000, 10_000)


def time_resnet(samples, batch_size, repeats):
    model = keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=10
    )
    x = np.random.default_rng(0).random((samples, 64, 64, 3), "float32")
    tap_model = kt.TapModel(model, EARLY_TAP)
    hand = keras.Model(model.inputs, model.get_layer(EARLY_TAP).output)
    runs = {
        "kt extract": lambda: tap_model.extract(
            x, batch_size=batch_size, verbose=0
        ),
        "full predict": lambda: model.predict(
            x, batch_size=batch_size, verbose=0
        ),
        "hand predict": lambda: hand.predict(
            x, batch_size=batch_size, verbose=0
        ),
    }
    # Same values from kt and hand before timing anything.
    np.testing.assert_allclose(
        runs["kt extract"]()[EARLY_TAP],
        runs["hand predict"](),
        rtol=1e-4,
        atol=1e-4,
    )
    for run in runs.values():  # Warm-up: traces, caches.
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):  # Interleaved, so drift hits all alike.
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Batches(keras.utils.PyDataset):
    """Random images made batch by batch: the input never sits in memory."""

    def __init__(self, samples, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.samples = samples
        self.batch_size = batch_size

    def __len__(self):
        return -(-self.samples // self.batch_size)

    def __getitem__(self, index):
        start = index * self.batch_size
        size = min(self.batch_size, self.samples - start)
        rng = np.random.default_rng(index)
        return rng.random((size, 32, 32, 3), "float32")


def small_model():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(
        16, 3, strides=2, padding="same", name=MEMORY_TAP
    )(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset the peak RSS to the current RSS (Linux >= 4.0); else no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """Peak RSS since the last `reset_peak_rss()` (or since the start)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # Not Linux: the peak of the whole process.
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def rss_mib():
    kib = _status_kib("VmRSS")
    return peak_rss_mib() if kib is None else kib / 1024


def memory_child(samples, batch_size):
    """Run in a fresh process: stream `samples` rows of a tap into a file."""
    tap_model = kt.TapModel(small_model(), MEMORY_TAP)
    with tempfile.TemporaryDirectory() as folder:
        # Warm-up on one batch, so tracing is not counted as growth.
        tap_model.extract(
            Batches(batch_size, batch_size),
            to=os.path.join(folder, "warm.npz"),
            verbose=0,
        )
        reset_peak_rss()
        baseline = rss_mib()
        path = tap_model.extract(
            Batches(samples, batch_size),
            to=os.path.join(folder, "x.npz"),
            verbose=0,
        )
        peak = peak_rss_mib()
        with np.load(path) as f:
            rows = f[MEMORY_TAP].shape[0]
            file_mib = f[MEMORY_TAP].nbytes / 2**20
    assert rows == samples, (rows, samples)
    return {
        "samples": samples,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "growth_mib": peak - baseline,
        "output_mib": file_mib,
    }


def measure_memory(batch_size):
    results = []
    for samples in MEMORY_SIZES:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(samples),
             "--batch-size", str(batch_size)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def verdict(ok):
    return "PASS" if ok else "FAIL"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-child", type=int, default=None)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.batch_size)))
        return 0

    times = time_resnet(args.samples, args.batch_size, args.repeats)
    memory = measure_memory(args.batch_size)
    early_full = times["kt extract"] / times["full predict"]
    kt_hand = times["kt extract"] / times["hand predict"]
    small, large = memory
    growth_ratio = large["growth_mib"] / max(small["growth_mib"], 1e-9)

    rows = [
        ("Measure", "Value", "Target", "Result"),
        ("---", "---", "---", "---"),
    ]
    for name, seconds in times.items():
        rows.append((f"{name} (median s)", f"{seconds:.3f}", "", ""))
    rows += [
        ("early/full", f"{early_full:.2f}", "<= 0.50",
         verdict(early_full <= 0.5)),
        ("kt/hand", f"{kt_hand:.2f}", "<= 1.10", verdict(kt_hand <= 1.10)),
    ]
    for m in memory:
        rows.append((
            f"`to=` {m['samples']:,} samples: peak RSS growth (MiB)",
            f"{m['growth_mib']:.1f} (peak {m['peak_mib']:.0f}, "
            f"output {m['output_mib']:.0f})",
            "",
            "",
        ))
    rows.append((
        "growth 10,000 / 1,000", f"{growth_ratio:.2f}", "<= 1.10",
        verdict(growth_ratio <= 1.10),
    ))
    print(
        f"ResNet50(weights=None, 64x64), tap `{EARLY_TAP}`, "
        f"{args.samples} samples, batch {args.batch_size}, "
        f"median of {args.repeats}; keras {keras.__version__}, "
        f"{os.cpu_count()} CPU cores.\n"
    )
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
