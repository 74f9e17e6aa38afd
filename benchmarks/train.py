"""Benchmark `TapModel.fit` against hand-written Keras training steps, on
any Keras backend.

Prints a markdown table, in one run, of the median training-step time
(after a warm-up; per-step times from a callback; setups interleaved over
several rounds, and each ratio the median of the per-round ratios, so that
drift and other load hit both sides alike) of a small CNN on 32x32 random
images, batch 64:

(a) tap losses: `TapModel.fit` with an activity-regularizer tap and a
    data-target tap, vs the same math hand-written as a Functional
    multi-output model with a custom `train_step` (target <= 1.03), and,
    for reference, vs a plain multi-output Keras model trained by Keras's
    own trainer (`compile(loss=[...], loss_weights=[...])`).
(b) teacher feature distillation: `TapModel` with
    `Tap(teacher=..., loss=FeatureMSE)` vs `keras.distillation.Distiller`
    with `FeatureDistillation` on the same student and teacher (target
    <= 0.65), and vs a hand-written single-pass step (target <= 1.05);
    the hand-written step / Distiller ratio shows what any single pass
    reaches on that backend.
    The teacher has the student's architecture (its own weights).

The hand-written steps are those a Keras user writes on each backend:
`tf.GradientTape` on TensorFlow, a stateless `train_step` with
`jax.value_and_grad` over `stateless_call` on JAX, `loss.backward()` and
`optimizer.apply` on PyTorch (the keras.io "custom train step" guides).
Before timing, each TapModel is checked to train to the same weights as its
twins.

Usage:

    python benchmarks/train.py [--steps 20] [--rounds 15]
    python benchmarks/train.py --backend jax     # or tensorflow, torch
    python benchmarks/train.py --all-backends    # one subprocess each,
    python benchmarks/train.py --backends tensorflow,jax   # side by side
        [--steps 12] [--rounds 7]

Without `--backend`, the active backend (`KERAS_BACKEND`, default
TensorFlow) is measured.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BACKENDS = ("tensorflow", "jax", "torch")


# -- backend selection and the all-backends run (no Keras import) ------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="default 20 (12 for --backends)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="default 15 (7 for --backends)"
    )
    parser.add_argument(
        "--backend",
        default=None,
        help=f"one of {', '.join(BACKENDS)}; default: KERAS_BACKEND",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends, each run in a subprocess, "
        "reported side by side",
    )
    parser.add_argument(
        "--all-backends",
        action="store_true",
        help=f"the same as --backends {','.join(BACKENDS)}",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="also print the results as one JSON line (for --backends)",
    )
    args = parser.parse_args(argv)
    if args.all_backends:
        args.backends = ",".join(BACKENDS)
    if args.backends is not None:
        if args.backend is not None:
            parser.error("pass either --backend or --backends, not both")
        args.backends = [b.strip() for b in args.backends.split(",") if b]
        for name in args.backends:
            check_backend_name(name)
    elif args.backend is not None:
        check_backend_name(args.backend)
    several = args.backends is not None
    if args.steps is None:
        args.steps = 12 if several else 20
    if args.rounds is None:
        args.rounds = 7 if several else 15
    return args


def check_backend_name(name):
    if name not in BACKENDS:
        raise SystemExit(
            f"Unknown backend {name!r}: expected one of {', '.join(BACKENDS)}."
        )


def select_backend(name):
    """Set `KERAS_BACKEND` to `name` before Keras is imported."""
    keras_module = sys.modules.get("keras")
    if keras_module is not None:
        current = keras_module.backend.backend()
        if current != name:
            raise SystemExit(
                f"Cannot select backend {name!r}: keras is already imported "
                f"with backend {current!r}. Run this script in a fresh "
                f"process, or set KERAS_BACKEND={name} before importing "
                "keras."
            )
    os.environ["KERAS_BACKEND"] = name


def run_all_backends(args):
    """Run each backend in a subprocess and print one side-by-side table."""
    results = {}
    for name in args.backends:
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        start = time.perf_counter()
        env = dict(os.environ, KERAS_BACKEND=name)
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--backend",
            name,
            "--steps",
            str(args.steps),
            "--rounds",
            str(args.rounds),
            "--json",
        ]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        lines = run.stdout.strip().splitlines()
        if not lines or not lines[-1].startswith("{"):
            print(
                f"{name}: failed (exit {run.returncode}) after {seconds:.0f} "
                f"s:\n{run.stderr[-3000:]}",
                file=sys.stderr,
            )
            continue
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr)
        results[name] = json.loads(lines[-1])
    if not results:
        print("No backend ran.", file=sys.stderr)
        return 1
    first = next(iter(results.values()))
    versions = ", ".join(
        f"{name} {row['backend_version']}" for name, row in results.items()
    )
    print(
        f"Small CNN, 32x32x3 random images, batch {first['batch']}, SGD; "
        f"median step time over {args.rounds} interleaved rounds of "
        f"{args.steps} steps after a warm-up, ratios as the median of "
        f"per-round ratios; one subprocess per backend; keras "
        f"{first['keras_version']}, {versions}, {os.cpu_count()} CPU "
        "cores.\n"
    )
    names = list(results)
    print(f"| Measure | {' | '.join(names)} | Target |")
    print(f"| --- | {' | '.join('---' for _ in names)} | --- |")
    for measure in first["times_ms"]:
        cells = [f"{results[n]['times_ms'][measure]:.2f}" for n in names]
        print(f"| {measure} (median ms/step) | {' | '.join(cells)} | |")
    for measure, spec in first["ratios"].items():
        cells = []
        for name in names:
            ratio = results[name]["ratios"][measure]
            cell = f"{ratio['value']:.3f}"
            if ratio["target"] is not None:
                cell += f" {verdict(ratio['value'] <= ratio['target'])}"
            cells.append(cell)
        target = "" if spec["target"] is None else f"<= {spec['target']:.2f}"
        print(f"| {measure} | {' | '.join(cells)} | {target} |")
    cells = [f"{results[n]['weight_gap']:.1e}" for n in names]
    print(f"| same weights as the twins (max diff) | {' | '.join(cells)} | |")
    return 0 if len(results) == len(args.backends) else 1


def verdict(ok):
    return "PASS" if ok else "FAIL"


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.backends is not None:
        sys.exit(run_all_backends(ARGS))
    if ARGS.backend is not None:
        select_backend(ARGS.backend)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_tap as kt  # noqa: E402

BACKEND = keras.backend.backend()
BATCH = 64
CLASSES = 10
LR = 0.01
L2 = 1e-4
FEAT_WEIGHT = 0.5
SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MSE = keras.losses.MeanSquaredError()


# -- the hand-written step of each backend -----------------------------------
#
# `HandStep.train_step` differentiates `self.loss_terms(x, y, outputs)`, a
# dict of the total ("loss") and each logged term, and updates the metric
# of each name. The loss math is in `keras.ops`, shared by all backends.


def log_terms(model, x, values):
    batch = ops.cast(ops.shape(x)[0], "float32")
    for metric in model.metrics:
        metric.update_state(values[metric.name], sample_weight=batch)
    return {metric.name: metric.result() for metric in model.metrics}


if BACKEND == "tensorflow":
    import tensorflow as tf

    class HandStep(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                values = self.loss_terms(x, y, self(x, training=True))
            variables = self.trainable_variables
            grads = tape.gradient(values["loss"], variables)
            self.optimizer.apply_gradients(zip(grads, variables))
            return log_terms(self, x, values)

elif BACKEND == "jax":
    import jax

    class HandStep(keras.Model):
        def compute_loss_and_updates(self, trainable, non_trainable, x, y):
            outputs, non_trainable = self.stateless_call(
                trainable, non_trainable, x, training=True
            )
            values = self.loss_terms(x, y, outputs)
            return values["loss"], (values, non_trainable)

        def train_step(self, state, data):
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            x, y = data
            grad_fn = jax.value_and_grad(
                self.compute_loss_and_updates, has_aux=True
            )
            (_, (values, non_trainable)), grads = grad_fn(
                trainable, non_trainable, x, y
            )
            trainable, optimizer_vars = self.optimizer.stateless_apply(
                optimizer_vars, grads, trainable
            )
            batch = ops.cast(ops.shape(x)[0], "float32")
            logs, new_metrics_vars = {}, []
            for metric in self.metrics:
                start = len(new_metrics_vars)
                this = metrics_vars[start : start + len(metric.variables)]
                this = metric.stateless_update_state(
                    this, values[metric.name], sample_weight=batch
                )
                logs[metric.name] = metric.stateless_result(this)
                new_metrics_vars += this
            state = (trainable, non_trainable, optimizer_vars)
            return logs, state + (new_metrics_vars,)

elif BACKEND == "torch":
    import torch

    class HandStep(keras.Model):
        def train_step(self, data):
            x, y = data
            self.zero_grad()
            values = self.loss_terms(x, y, self(x, training=True))
            values["loss"].backward()
            variables = self.trainable_weights[:]
            gradients = [v.value.grad for v in variables]
            with torch.no_grad():
                self.optimizer.apply(gradients, variables)
            return log_terms(self, x, values)

else:
    raise SystemExit(
        f"Unsupported Keras backend {BACKEND!r}: expected one of "
        f"{', '.join(BACKENDS)}."
    )


class HandModel(HandStep):
    """A Functional model with a hand-written step: a `Mean` tracker for
    each logged term besides Keras's own "loss"."""

    def __init__(self, *args, terms=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.trackers = [keras.metrics.Mean(name=name) for name in terms]


# -- models -------------------------------------------------------------------


def student(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(
        32, 3, strides=2, padding="same", activation="relu", name="block1"
    )(h)
    h = keras.layers.Conv2D(
        64, 3, strides=2, padding="same", activation="relu", name="block2"
    )(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(64, activation="relu", name="features")(h)
    outputs = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(inputs, outputs, name="student")


def teacher(seed=1):
    """The student's architecture, its own weights: the benchmark measures
    the cost of the student's passes, which a larger teacher would hide."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(
        32, 3, strides=2, padding="same", activation="relu"
    )(h)
    h = keras.layers.Conv2D(
        64, 3, strides=2, padding="same", activation="relu", name="t_block2"
    )(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    outputs = keras.layers.Dense(CLASSES)(h)
    return keras.Model(inputs, outputs, name="teacher")


# -- (a) tap losses ---------------------------------------------------------


def tap_losses_kt():
    taps = {
        "block1": kt.Tap("block1", regularizer=keras.regularizers.L2(L2)),
        "features": kt.Tap("features", loss="mse", weight=FEAT_WEIGHT),
    }
    model = kt.TapModel(student(), taps)
    model.compile(keras.optimizers.SGD(LR), loss=SCE)
    return model


class HandTapLosses(HandModel):
    """The same math: the tapped layers as outputs of a Functional model,
    logging the same values."""

    def loss_terms(self, x, y, outputs):
        logits, block1, features = outputs
        batch = ops.cast(ops.shape(x)[0], "float32")
        pred_loss = SCE(y["predictions"], logits)
        block1_loss = L2 * ops.sum(ops.square(block1)) / batch
        features_loss = MSE(y["features"], features)
        return {
            "loss": pred_loss + block1_loss + FEAT_WEIGHT * features_loss,
            "predictions_loss": pred_loss,
            "block1_loss": block1_loss,
            "features_loss": features_loss,
        }


def tap_losses_hand():
    base = student()
    outputs = [
        base.output,
        base.get_layer("block1").output,
        base.get_layer("features").output,
    ]
    model = HandTapLosses(
        base.input,
        outputs,
        terms=("predictions_loss", "block1_loss", "features_loss"),
    )
    model.compile(keras.optimizers.SGD(LR))
    return model


def tap_losses_plain():
    """The same math on a plain multi-output Keras model, trained by
    Keras's own trainer: the regularizer as a loss on zero targets."""

    def block1_l2(y_true, y_pred):
        # L2(L2) of each sample; Keras averages it over the batch.
        flat = ops.reshape(ops.square(y_pred), (ops.shape(y_pred)[0], -1))
        return L2 * ops.sum(flat, axis=-1)

    base = student()
    outputs = [
        base.output,
        base.get_layer("block1").output,
        base.get_layer("features").output,
    ]
    model = keras.Model(base.input, outputs)
    model.compile(
        keras.optimizers.SGD(LR),
        loss=[SCE, block1_l2, "mse"],
        loss_weights=[1.0, 1.0, FEAT_WEIGHT],
    )
    return model


def tap_targets(y, features):
    return {"predictions": y, "features": features}


def plain_targets(y, features):
    block1 = np.zeros((len(y), 16, 16, 32), "float32")
    return [y, block1, features]


# -- (b) feature distillation -------------------------------------------------


def distill_kt():
    # Distiller's total: 0.5 * student loss + 0.5 * distillation loss.
    taps = {
        "hint": kt.Tap(
            "block2",
            teacher="t_block2",
            loss=kt.losses.FeatureMSE(),
            weight=0.5,
        )
    }
    model = kt.TapModel(student(), taps, teacher=teacher())
    model.compile(keras.optimizers.SGD(LR), loss=SCE, loss_weights=0.5)
    return model


def distill_keras():
    loss = keras.distillation.FeatureDistillation(
        loss="mse", teacher_layer_name="t_block2", student_layer_name="block2"
    )
    model = keras.distillation.Distiller(
        teacher=teacher(),
        student=student(),
        distillation_losses=loss,
        student_loss_weight=0.5,
    )
    model.compile(keras.optimizers.SGD(LR), loss=SCE)
    return model


class HandDistill(HandModel):
    """One pass: the student's logits and distilled layer, and the frozen
    teacher's layer (no gradient) as a third output."""

    def loss_terms(self, x, y, outputs):
        logits, block2, target = outputs
        pred_loss = SCE(y, logits)
        hint_loss = MSE(ops.stop_gradient(target), block2)
        return {
            "loss": 0.5 * pred_loss + 0.5 * hint_loss,
            "predictions_loss": pred_loss,
            "hint_loss": hint_loss,
        }


def distill_hand():
    base, frozen = student(), teacher()
    extractor = keras.Model(frozen.input, frozen.get_layer("t_block2").output)
    extractor.trainable = False
    model = HandDistill(
        base.input,
        [
            base.output,
            base.get_layer("block2").output,
            extractor(base.input, training=False),
        ],
        terms=("predictions_loss", "hint_loss"),
    )
    model.compile(keras.optimizers.SGD(LR))
    return model


def plain(y, features):
    return y


# -- timing -------------------------------------------------------------------


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def data(steps):
    rng = np.random.default_rng(0)
    n = steps * BATCH
    x = rng.random((n, 32, 32, 3), "float32")
    y = rng.integers(0, CLASSES, size=n)
    features = rng.normal(size=(n, 64)).astype("float32")
    return x, y, features


def trained_weights(model):
    if isinstance(model, kt.TapModel):
        return model.base.get_weights()
    return [ops.convert_to_numpy(w) for w in model.trainable_weights]


def check_same_training(kt_model, twin, targets):
    """One epoch of four steps each; the same weights (to 1e-4). Returns
    the largest difference."""
    x, y, features = data(4)
    for model, target in zip((kt_model, twin), targets):
        model.fit(
            x,
            target(y, features),
            batch_size=BATCH,
            shuffle=False,
            verbose=0,
        )
    kt_weights, twin_weights = trained_weights(kt_model), trained_weights(twin)
    assert len(kt_weights) == len(twin_weights)
    for a, b in zip(kt_weights, twin_weights):
        np.testing.assert_allclose(a, b, atol=1e-4)
    return max(
        float(np.abs(a - b).max()) for a, b in zip(kt_weights, twin_weights)
    )


def time_setups(setups, steps, rounds):
    """Per-round median step time of each setup; each round runs every
    setup once, in an order reversed every other round, so that drift hits
    all alike."""
    x, y, features = data(steps)
    runs = {}
    for name, (build, targets) in setups.items():
        model = build()
        runs[name] = (model, targets(y, features))
        model.fit(x, runs[name][1], batch_size=BATCH, epochs=1, verbose=0)
    times = {name: [] for name in setups}
    for round_index in range(rounds):
        order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]
        for name in order:
            model, y_run = runs[name]
            timer = StepTimer()
            model.fit(
                x,
                y_run,
                batch_size=BATCH,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[timer],
            )
            # The first step of a fit also waits on the input pipeline.
            times[name].append(statistics.median(timer.times[1:]))
    return times


def paired_ratio(times, numerator, denominator):
    """The median over rounds of the ratio within each round."""
    return statistics.median(
        a / b for a, b in zip(times[numerator], times[denominator])
    )


def backend_version():
    return importlib.import_module(BACKEND).__version__


def measure(steps, rounds):
    """Check, then time, every setup on this process's backend."""
    gap = max(
        check_same_training(
            tap_losses_kt(), tap_losses_hand(), (tap_targets, tap_targets)
        ),
        check_same_training(
            tap_losses_kt(), tap_losses_plain(), (tap_targets, plain_targets)
        ),
        check_same_training(distill_kt(), distill_hand(), (plain, plain)),
    )
    setups = {
        "(a) TapModel.fit, tap losses": (tap_losses_kt, tap_targets),
        "(a) hand-written multi-output step": (tap_losses_hand, tap_targets),
        "(a) plain Keras multi-output model": (tap_losses_plain, plain_targets),
        "(b) TapModel.fit, teacher tap": (distill_kt, plain),
        "(b) keras Distiller": (distill_keras, plain),
        "(b) hand-written single-pass step": (distill_hand, plain),
    }
    times = time_setups(setups, steps, rounds)
    names = list(times)
    ratios = {
        "(a) TapModel / hand-written": (names[0], names[1], 1.03),
        "(a) TapModel / plain Keras model": (names[0], names[2], None),
        "(b) TapModel / Distiller": (names[3], names[4], 0.65),
        "(b) TapModel / hand-written": (names[3], names[5], 1.05),
        # What any single-pass step reaches against Distiller here: XLA
        # (JAX) merges Distiller's second, identical forward pass.
        "(b) hand-written single-pass / Distiller": (names[5], names[4], None),
    }
    return {
        "backend": BACKEND,
        "backend_version": backend_version(),
        "keras_version": keras.__version__,
        "batch": BATCH,
        "weight_gap": gap,
        "times_ms": {
            name: 1000 * statistics.median(per_round)
            for name, per_round in times.items()
        },
        "ratios": {
            name: {
                "value": paired_ratio(times, numerator, denominator),
                "target": target,
            }
            for name, (numerator, denominator, target) in ratios.items()
        },
    }


def main(args):
    result = measure(args.steps, args.rounds)
    print(
        f"Small CNN, 32x32x3 random images, batch {BATCH}, SGD; median step "
        f"time over {args.rounds} interleaved rounds of {args.steps} steps "
        "after a warm-up, ratios as the median of per-round ratios; keras "
        f"{keras.__version__}, {BACKEND} {result['backend_version']}, "
        f"{os.cpu_count()} CPU cores.\n"
    )
    print("| Measure | Value | Target | Result |")
    print("| --- | --- | --- | --- |")
    for name, ms in result["times_ms"].items():
        print(f"| {name} (median ms/step) | {ms:.2f} | | |")
    for name, ratio in result["ratios"].items():
        value, target = ratio["value"], ratio["target"]
        if target is None:
            print(f"| {name} | {value:.3f} | | |")
            continue
        print(
            f"| {name} | {value:.3f} | <= {target:.2f} | "
            f"{verdict(value <= target)} |"
        )
    print(
        f"| same weights as the twins (max diff) | "
        f"{result['weight_gap']:.1e} | <= 1e-04 | PASS |"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
