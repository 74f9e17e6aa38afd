"""Benchmark `TapModel.fit` on each Keras backend, side by side.

For each backend (TensorFlow, JAX, PyTorch; one subprocess each, with
`KERAS_BACKEND` set), the tap-loss setup of `train.py` (a small CNN on
32x32 images, batch 64, an activity-regularizer tap and a data-target tap)
is timed against a plain multi-output Keras model trained by Keras's own
trainer on that backend with the same losses (its `compile(loss=[...],
loss_weights=[...])`), after checking that both train to the same weights.
The median step times go into one markdown table: users pick a backend
from it; there is no target across backends.

Usage:

    python benchmarks/backends.py [--steps 20] [--rounds 7]
        [--backends tensorflow,jax,torch]
    python benchmarks/backends.py --backend jax   # one backend, one row
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def plain_twin(train):
    """The tap-loss math on a plain multi-output Keras model."""
    import keras
    from keras import ops

    def block1_l2(y_true, y_pred):
        # L2(L2) of each sample; Keras averages it over the batch.
        return train.L2 * ops.sum(
            ops.reshape(ops.square(y_pred), (ops.shape(y_pred)[0], -1)),
            axis=-1,
        )

    base = train.student()
    outputs = [
        base.output,
        base.get_layer("block1").output,
        base.get_layer("features").output,
    ]
    model = keras.Model(base.input, outputs)
    model.compile(
        keras.optimizers.SGD(train.LR),
        loss=[train.SCE, block1_l2, "mse"],
        loss_weights=[1.0, 1.0, train.FEAT_WEIGHT],
    )
    return model


def one_backend(steps, rounds):
    """Time this process's backend; return its row as a dict."""
    import keras
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train

    def kt_targets(y, features):
        return {"predictions": y, "features": features}

    x, y, features = train.data(4)
    kt_model, plain = train.tap_losses_kt(), plain_twin(train)
    block1 = plain.get_layer("block1").output.shape[1:]
    zeros = np.zeros((len(y),) + tuple(block1), "float32")
    plain.set_weights(kt_model.base.get_weights())
    kt_model.fit(x, kt_targets(y, features), batch_size=train.BATCH,
                 shuffle=False, verbose=0)
    plain.fit(x, [y, zeros, features], batch_size=train.BATCH,
              shuffle=False, verbose=0)
    gap = max(
        float(np.abs(a - b).max())
        for a, b in zip(kt_model.base.get_weights(), plain.get_weights())
    )

    def plain_build():
        return plain_twin(train)

    def plain_run_targets(y, features):
        return [y, np.zeros((len(y),) + tuple(block1), "float32"), features]

    times = train.time_setups(
        {
            "tap_model": (train.tap_losses_kt, kt_targets),
            "plain": (plain_build, plain_run_targets),
        },
        steps,
        rounds,
    )
    median = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {
        "backend": keras.backend.backend(),
        "tap_model_ms": median["tap_model"],
        "plain_ms": median["plain"],
        "ratio": train.paired_ratio(times, "tap_model", "plain"),
        "weight_gap": gap,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    args = parser.parse_args()
    if args.backend is not None:
        os.environ["KERAS_BACKEND"] = args.backend
        print(json.dumps(one_backend(args.steps, args.rounds)))
        return
    rows = []
    for backend in args.backends.split(","):
        module = "torch" if backend == "torch" else backend
        if importlib.util.find_spec(module) is None:
            print(f"{backend}: not installed, skipped", file=sys.stderr)
            continue
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--backend", backend,
             "--steps", str(args.steps), "--rounds", str(args.rounds)],
            capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print("| backend | TapModel step (ms) | plain Keras step (ms) | ratio "
          "| same weights (max diff) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['tap_model_ms']:.2f} | "
              f"{row['plain_ms']:.2f} | {row['ratio']:.3f} | "
              f"{row['weight_gap']:.1e} |")


if __name__ == "__main__":
    main()
