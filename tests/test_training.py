"""Training a `TapModel`: the contract's math, logging, targets, weights.

Every numeric check compares `fit` with a hand-written loop (the active
backend's own autodiff, through `value_and_grad` of conftest) or a NumPy
computation that does the API contract's math:
`prediction_loss + sum(weight_i * (loss_i + reg_i)) + sum(model.losses)`,
with a Keras `Regularizer`'s value divided by the batch size, the tap losses
sample-weighted and the regularizers not.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND, dtype_name, to_numpy, value_and_grad

import keras_tap as kt

ops = keras.ops

N, B, CLASSES, LR = 32, 8, 3, 0.05
SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(
        4,
        3,
        activation="relu",
        name="conv1",
        kernel_regularizer=keras.regularizers.L2(1e-3),
    )(inputs)
    h = keras.layers.Conv2D(6, 3, activation="tanh", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(5, activation="tanh", name="feat")(h)
    outputs = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(inputs, outputs, name="cnn")


def make_data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,))
    feat = rng.normal(scale=0.5, size=(n, 5)).astype("float32")
    return x, y, feat


L2_CONV1, L2_CONV2, L1_FEAT = 1e-2, 3e-2, 1e-3
W_CONV1, W_FEAT = 0.5, 0.3


def equivalence_taps():
    return {
        "conv1": kt.Tap(
            "conv1", regularizer=keras.regularizers.L2(L2_CONV1), weight=W_CONV1
        ),
        "conv2": kt.Tap(
            "conv2", regularizer=kt.regularizers.ActivityL2(L2_CONV2)
        ),
        "feat": kt.Tap(
            "feat",
            loss="mse",
            regularizer=kt.regularizers.ActivityL1(L1_FEAT),
            weight=W_FEAT,
        ),
    }


def tapped_view(model):
    """A Functional view of `model` with its tapped layers as outputs."""
    names = ["conv1", "conv2", "feat"]
    return keras.Model(
        model.input,
        [model.output] + [model.get_layer(n).output for n in names],
    )


def contract_terms(view, x, y, feat, w_pred=None, w_feat=None):
    """The contract's loss terms, written out with `keras.ops`."""
    logits, a1, a2, f = view(x, training=True)
    batch = float(len(x))
    per_sample = keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True
    )
    if w_pred is not None:
        per_sample = ops.multiply(per_sample, w_pred)
    pred_loss = ops.sum(per_sample) / batch
    conv1 = L2_CONV1 * ops.sum(ops.square(a1)) / batch
    conv2 = L2_CONV2 * ops.mean(
        ops.sum(ops.reshape(ops.square(a2), (len(x), -1)), 1)
    )
    mse = ops.mean(ops.square(ops.subtract(feat, f)), axis=-1)
    if w_feat is not None:
        mse = ops.multiply(mse, w_feat)
    feat_term = ops.sum(mse) / batch + L1_FEAT * ops.mean(
        ops.sum(ops.abs(f), axis=-1)
    )
    extra = ops.sum(ops.stack(view.losses))
    total = pred_loss + W_CONV1 * conv1 + conv2 + W_FEAT * feat_term + extra
    return total, {
        "predictions_loss": pred_loss,
        "conv1_loss": conv1,
        "conv2_loss": conv2,
        "feat_loss": feat_term,
    }


def hand_train(x, y, feat, w_pred=None, w_feat=None, steps_per_epoch=None):
    """SGD on the contract's loss, one batch of `B` after another."""
    model = make_cnn()
    view = tapped_view(model)
    for start in range(0, len(x), B):
        s = slice(start, start + B)
        wp = None if w_pred is None else w_pred[s]
        wf = None if w_feat is None else w_feat[s]
        variables = model.trainable_variables
        _, grads = value_and_grad(
            lambda: contract_terms(view, x[s], y[s], feat[s], wp, wf)[0],
            variables,
        )
        sgd_step(variables, grads)
    return model.get_weights()


def sgd_step(variables, grads):
    """`variable -= LR * grad`, in NumPy."""
    for var, grad in zip(variables, grads):
        var.assign(to_numpy(var) - LR * grad)


def compiled_tap_model(taps=None, metrics=None, **compile_kwargs):
    model = make_cnn()
    tap_model = kt.TapModel(model, taps or equivalence_taps())
    tap_model.compile(
        keras.optimizers.SGD(LR), loss=SCE, metrics=metrics, **compile_kwargs
    )
    return tap_model


def refused_on_torch(compile_kwargs):
    """Whether Keras's PyTorch trainer refuses these `compile` arguments:
    it runs one step per call, and `fit` raises on `steps_per_execution`
    above 1."""
    steps = compile_kwargs.get("steps_per_execution", 1)
    return BACKEND == "torch" and steps > 1


def assert_weights_close(actual, expected, atol=1e-4):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, atol=atol)


# -- equivalence with a hand-written loop ------------------------------------


@pytest.mark.parametrize("weighting", ["none", "array", "dict"])
def test_fit_matches_hand_written_loop(weighting):
    x, y, feat = make_data()
    rng = np.random.default_rng(1)
    w_pred = rng.uniform(0.2, 2.0, size=N).astype("float32")
    w_feat = rng.uniform(0.2, 2.0, size=N).astype("float32")
    targets = {"predictions": y, "feat": feat}
    if weighting == "none":
        sample_weight, expected = None, hand_train(x, y, feat)
    elif weighting == "array":
        sample_weight = w_pred
        expected = hand_train(x, y, feat, w_pred, w_pred)
    else:
        sample_weight = {"predictions": w_pred, "feat": w_feat}
        expected = hand_train(x, y, feat, w_pred, w_feat)
    tap_model = compiled_tap_model()
    before = tap_model.base.get_weights()
    tap_model.fit(
        x,
        targets,
        sample_weight=sample_weight,
        batch_size=B,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    assert int(tap_model.optimizer.iterations) == N // B
    after = tap_model.base.get_weights()
    assert not all(np.allclose(a, b) for a, b in zip(after, before))
    assert_weights_close(after, expected)


def test_sample_weight_does_not_weight_regularizers():
    x, y, feat = make_data()
    view = tapped_view(make_cnn())
    zero = np.zeros(N, "float32")
    _, terms = contract_terms(view, x, y, feat, zero, zero)
    tap_model = compiled_tap_model()
    logs = tap_model.evaluate(
        x,
        {"predictions": y, "feat": feat},
        sample_weight=zero,
        batch_size=N,
        verbose=0,
        return_dict=True,
    )
    assert logs["predictions_loss"] == pytest.approx(0.0, abs=1e-7)
    assert logs["conv1_loss"] > 0 and logs["conv2_loss"] > 0
    for key, value in to_numpy(terms).items():
        assert logs[key] == pytest.approx(float(value), rel=1e-4, abs=1e-6)


# -- logging ------------------------------------------------------------------


def test_history_logs_unweighted_terms_on_one_batch():
    x, y, feat = make_data()
    view = tapped_view(make_cnn())
    total, terms = to_numpy(contract_terms(view, x, y, feat))
    logits = to_numpy(view(x)[0])
    accuracy = np.mean(np.argmax(logits, -1) == y)
    tap_model = compiled_tap_model(metrics=["accuracy"])
    history = tap_model.fit(
        x,
        {"predictions": y, "feat": feat},
        batch_size=N,
        epochs=1,
        verbose=0,
        validation_data=(x, {"predictions": y, "feat": feat}),
    )
    logs = {k: v[0] for k, v in history.history.items()}
    expected_keys = {"loss", "accuracy", *terms}
    assert set(logs) == expected_keys | {f"val_{k}" for k in expected_keys}
    assert logs["loss"] == pytest.approx(float(total), rel=1e-4)
    assert logs["accuracy"] == pytest.approx(accuracy)
    for key, value in terms.items():
        assert logs[key] == pytest.approx(float(value), rel=1e-4)
    # Validation runs after the update, on the trained weights.
    view_after = tapped_view(tap_model.base)
    total_after, terms_after = to_numpy(
        contract_terms(view_after, x, y, feat)
    )
    assert logs["val_loss"] == pytest.approx(float(total_after), rel=1e-4)
    for key, value in terms_after.items():
        assert logs[f"val_{key}"] == pytest.approx(float(value), rel=1e-4)


def test_logged_losses_are_sample_averages_over_the_epoch():
    x, y, feat = make_data(n=20)  # batches of 8, 8 and 4
    view = tapped_view(make_cnn())
    tap_model = compiled_tap_model()
    logs = tap_model.evaluate(
        x,
        {"predictions": y, "feat": feat},
        batch_size=B,
        verbose=0,
        return_dict=True,
    )
    sums = {}
    for start in range(0, 20, B):
        s = slice(start, start + B)
        _, terms = to_numpy(contract_terms(view, x[s], y[s], feat[s]))
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(x[s])
    for key, value in sums.items():
        assert logs[key] == pytest.approx(value / 20, rel=1e-4)


def test_tap_metrics_and_deep_supervision_with_adapter():
    x, y, _ = make_data()
    keras.utils.set_random_seed(3)
    head = keras.Sequential(
        [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(CLASSES)],
        name="aux_head",
    )
    taps = {
        "aux": kt.Tap(
            "conv2",
            loss=SCE,
            target="predictions",
            adapter=head,
            weight=0.4,
            metrics=["accuracy"],
        )
    }
    tap_model = compiled_tap_model(taps=taps, metrics=["accuracy"])
    base_weights = {id(w) for w in tap_model.base.weights}
    assert head.weights and not any(id(w) in base_weights for w in head.weights)
    _, activations = tap_model(x)
    aux_logits = to_numpy(head(activations["aux"]))
    aux_loss = float(to_numpy(SCE(y, aux_logits)))
    aux_accuracy = np.mean(np.argmax(aux_logits, -1) == y)
    head_before = head.get_weights()
    kernel_l2 = float(to_numpy(ops.sum(ops.stack(tap_model.base.losses))))
    history = tap_model.fit(x, y, batch_size=N, epochs=1, verbose=0)
    logs = {k: v[0] for k, v in history.history.items()}
    assert set(logs) == {
        "loss",
        "accuracy",
        "predictions_loss",
        "aux_loss",
        "aux_accuracy",
    }
    assert logs["aux_loss"] == pytest.approx(aux_loss, rel=1e-4)
    assert logs["aux_accuracy"] == pytest.approx(aux_accuracy)
    assert logs["loss"] == pytest.approx(
        logs["predictions_loss"] + 0.4 * aux_loss + kernel_l2, rel=1e-4
    )
    assert any(
        not np.allclose(a, b) for a, b in zip(head.get_weights(), head_before)
    )


def test_missing_data_target_names_the_tap_and_keys():
    x, y, feat = make_data()
    tap_model = compiled_tap_model()
    with pytest.raises(ValueError, match=r"'feat'.*\['predictions'\]"):
        tap_model.fit(x, {"predictions": y}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="'feat'.*not a dict"):
        tap_model.fit(x, y, epochs=1, verbose=0)


def test_tensorboard_callback_logs_tap_losses(tmp_path):
    # Keras's TensorBoard callback writes with `tf.summary` on every
    # backend; TensorFlow reads the event files back.
    import tensorflow as tf

    x, y, feat = make_data()
    tap_model = compiled_tap_model()
    targets = {"predictions": y, "feat": feat}
    tap_model.fit(
        x,
        targets,
        batch_size=B,
        epochs=2,
        verbose=0,
        validation_data=(x, targets),
        callbacks=[keras.callbacks.TensorBoard(str(tmp_path))],
    )
    for split in ("train", "validation"):
        tags = set()
        for path in (tmp_path / split).glob("events.out.tfevents*"):
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                tags.update(v.tag for v in event.summary.value)
        assert {
            "epoch_loss",
            "epoch_predictions_loss",
            "epoch_conv1_loss",
            "epoch_feat_loss",
        } <= tags


# -- execution modes ---------------------------------------------------------


@pytest.mark.parametrize(
    "compile_kwargs",
    [
        {"jit_compile": True},
        {"steps_per_execution": 3},
        {"jit_compile": True, "steps_per_execution": 3},
    ],
    ids=["jit", "steps_per_execution", "both"],
)
def test_jit_and_steps_per_execution_match_default(compile_kwargs):
    x, y, feat = make_data(n=48)
    targets = {"predictions": y, "feat": feat}
    if refused_on_torch(compile_kwargs):
        tap_model = compiled_tap_model(**compile_kwargs)
        with pytest.raises(ValueError, match="steps_per_execution.*PyTorch"):
            tap_model.fit(x, targets, batch_size=B, verbose=0)
        return
    # Keras's default ("auto") compiles with XLA on JAX, not on CPU
    # TensorFlow or PyTorch: a plain Keras model says which.
    plain = make_cnn()
    plain.compile(keras.optimizers.SGD(LR), loss=SCE)
    results = []
    for kwargs in ({}, compile_kwargs):
        tap_model = compiled_tap_model(**kwargs)
        history = tap_model.fit(
            x, targets, batch_size=B, epochs=2, shuffle=False, verbose=0
        )
        # Keras silently drops jit_compile, e.g. once op determinism is on.
        expected_jit = kwargs.get("jit_compile", plain.jit_compile)
        assert tap_model.jit_compile == expected_jit
        logs = tap_model.evaluate(
            x, targets, batch_size=B, verbose=0, return_dict=True
        )
        predictions, taps = tap_model.predict(x, batch_size=B, verbose=0)
        results.append(
            (
                tap_model.base.get_weights(),
                history.history,
                logs,
                predictions,
                taps,
            )
        )
    (w0, h0, e0, p0, t0), (w1, h1, e1, p1, t1) = results
    assert_weights_close(w1, w0, atol=1e-5)
    assert h1.keys() == h0.keys()
    for key in h0:
        np.testing.assert_allclose(h1[key], h0[key], rtol=1e-4)
    for key in e0:
        assert e1[key] == pytest.approx(e0[key], rel=1e-4)
    np.testing.assert_allclose(p1, p0, atol=1e-5)
    assert list(t1) == ["conv1", "conv2", "feat"]
    for name in t0:
        np.testing.assert_allclose(t1[name], t0[name], atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "jit"])
def test_mixed_float16_large_activation_l2_stays_finite(jit_compile):
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((64,))
        hidden = keras.layers.Dense(256, name="wide")(inputs)
        outputs = keras.layers.Dense(1, dtype="float32")(hidden)
        model = keras.Model(inputs, outputs)
        taps = {
            "wide": kt.Tap("wide", regularizer=keras.regularizers.L2(1e-6)),
            "wide_kt": kt.Tap(
                "wide", regularizer=kt.regularizers.ActivityL2(1e-6)
            ),
        }
        tap_model = kt.TapModel(model, taps)
        x = np.full((32, 64), 100.0, "float32")
        _, activations = tap_model(x)
        a = to_numpy(activations["wide"]).astype("float64")
        assert dtype_name(activations["wide"]) == "float16"
        assert float(np.sum(a**2)) > 65504  # overflows a float16 sum
        tap_model.compile(
            keras.optimizers.SGD(1e-9), loss="mse", jit_compile=jit_compile
        )
        history = tap_model.fit(
            x, np.zeros((32, 1)), batch_size=32, epochs=1, verbose=0
        )
    finally:
        keras.config.set_dtype_policy(policy)
    assert isinstance(tap_model.optimizer, keras.optimizers.LossScaleOptimizer)
    expected = 1e-6 * np.sum(a**2) / 32
    logs = {k: v[0] for k, v in history.history.items()}
    assert all(np.isfinite(v) for v in logs.values())
    assert logs["wide_loss"] == pytest.approx(expected, rel=1e-2)
    assert logs["wide_kt_loss"] == pytest.approx(expected, rel=1e-2)
    assert all(np.isfinite(w).all() for w in model.get_weights())


# -- class weights -------------------------------------------------------------


CLASS_WEIGHT = {0: 0.5, 1: 2.0, 2: 1.5}


def test_class_weight_with_tap_targets_equals_sample_weight_dict():
    x, y, feat = make_data()
    targets = {"predictions": y, "feat": feat}
    weights = []
    for kwargs in (
        {"class_weight": CLASS_WEIGHT},
        {
            "sample_weight": {
                "predictions": np.array([CLASS_WEIGHT[c] for c in y]),
                "feat": np.ones(N),
            }
        },
    ):
        tap_model = compiled_tap_model()
        tap_model.fit(
            x, targets, batch_size=B, shuffle=False, verbose=0, **kwargs
        )
        weights.append(tap_model.base.get_weights())
    assert_weights_close(weights[0], weights[1], atol=1e-6)
    w_pred = np.array([CLASS_WEIGHT[c] for c in y], "float32")
    assert_weights_close(weights[0], hand_train(x, y, feat, w_pred))


def test_class_weight_on_a_dataset_with_tap_targets():
    # Keras's `fit` takes a `tf.data.Dataset` on every backend.
    import tensorflow as tf

    x, y, feat = make_data()
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, {"predictions": y, "feat": feat})
    ).batch(B)
    tap_model = compiled_tap_model()
    tap_model.fit(dataset, class_weight=CLASS_WEIGHT, shuffle=False, verbose=0)
    w_pred = np.array([CLASS_WEIGHT[c] for c in y], "float32")
    assert_weights_close(
        tap_model.base.get_weights(), hand_train(x, y, feat, w_pred)
    )


def test_class_weight_with_plain_y_does_not_weight_tap_losses():
    x, y, _ = make_data()
    logs = []
    for class_weight in (None, CLASS_WEIGHT):
        keras.utils.set_random_seed(1)
        taps = {
            "aux": kt.Tap(
                "feat",
                loss=SCE,
                target="predictions",
                adapter=keras.layers.Dense(CLASSES, name="aux_head"),
            )
        }
        tap_model = compiled_tap_model(taps=taps)
        history = tap_model.fit(
            x, y, batch_size=N, class_weight=class_weight, verbose=0
        )
        logs.append({k: v[0] for k, v in history.history.items()})
    plain, weighted = logs
    assert weighted["aux_loss"] == pytest.approx(plain["aux_loss"], rel=1e-5)
    logits = make_cnn()(x)
    w_pred = np.array([CLASS_WEIGHT[c] for c in y], "float32")
    expected = float(to_numpy(SCE(y, logits, sample_weight=w_pred)))
    assert weighted["predictions_loss"] == pytest.approx(expected, rel=1e-4)
    assert plain["predictions_loss"] != pytest.approx(expected, rel=1e-2)


# -- schedules -------------------------------------------------------------


def _traced_functions(function):
    """The `tf.function`s in the closure of Keras's train function."""
    found = []
    for cell in function.__closure__ or ():
        value = cell.cell_contents
        if hasattr(value, "experimental_get_tracing_count"):
            found.append(value)
    return found


@pytest.mark.parametrize(
    "schedule, values",
    [
        (kt.schedules.LinearWarmup(0.0, 1.0, steps=4), [0.0, 0.25, 0.5, 0.75]),
        (kt.schedules.Piecewise([1, 2], [2.0, 0.5, 0.0]), [2.0, 2.0, 0.5, 0]),
    ],
    ids=["linear_warmup", "piecewise"],
)
def test_schedule_changes_weight_inside_one_compiled_function(schedule, values):
    x, y, feat = make_data()
    traced = []

    class Counting(kt.TapModel):
        def compute_tap_losses(self, *args, **kwargs):
            traced.append(1)
            return super().compute_tap_losses(*args, **kwargs)

    model = make_cnn()
    taps = {
        "conv2": kt.Tap(
            "conv2", regularizer=keras.regularizers.L2(1.0), weight=schedule
        )
    }
    tap_model = Counting(model, taps)
    tap_model.compile(keras.optimizers.SGD(LR), loss=SCE)
    tap_model.fit(x, y, batch_size=B, shuffle=False, verbose=0)

    expected = make_cnn()
    view = keras.Model(
        expected.input, [expected.output, expected.get_layer("conv2").output]
    )
    for step, start in enumerate(range(0, N, B)):
        s = slice(start, start + B)

        def total(s=s, step=step):
            logits, a = view(x[s], training=True)
            return (
                SCE(y[s], logits)
                + ops.sum(ops.stack(view.losses))
                + values[step] * ops.sum(ops.square(a)) / B
            )

        _, grads = value_and_grad(total, expected.trainable_variables)
        sgd_step(expected.trainable_variables, grads)
    assert_weights_close(model.get_weights(), expected.get_weights())
    if BACKEND == "tensorflow":
        functions = _traced_functions(tap_model.train_function)
        assert functions
        assert all(f.experimental_get_tracing_count() == 1 for f in functions)
    if BACKEND in ("tensorflow", "jax"):
        # Four steps ran with four different weights inside one traced
        # step (`tf.function`, `jax.jit`): no step retraced. PyTorch runs
        # the step eagerly, calling `compute_tap_losses` every step.
        assert 1 <= len(traced) <= 2
    np.testing.assert_allclose(
        [float(tap_model.tap_weights(s)["conv2"]) for s in range(4)],
        values,
    )


# -- masks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss", [keras.losses.MeanSquaredError(), "mse", "feature_mse"]
)
def test_mask_of_a_tapped_tensor_is_respected(loss):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = keras.layers.LSTM(3, return_sequences=True, name="lstm")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    taps = {"lstm": kt.Tap("lstm", loss=loss)}
    tap_model = kt.TapModel(model, taps)
    tap_model.compile("sgd", loss="mse")

    rng = np.random.default_rng(0)
    x = rng.integers(1, 10, size=(8, 6)).astype("int32")
    lengths = rng.integers(1, 7, size=8)
    for row, length in zip(x, lengths):
        row[length:] = 0
    target = rng.normal(size=(8, 6, 3)).astype("float32")
    _, activations = tap_model(x)
    mask = x != 0
    errors = np.mean((to_numpy(activations["lstm"]) - target) ** 2, -1)
    expected = errors[mask].mean()
    unmasked = errors.mean()
    assert abs(expected - unmasked) > 1e-3
    logs = tap_model.evaluate(
        x,
        {"predictions": np.zeros((8, 2)), "lstm": target},
        batch_size=8,
        verbose=0,
        return_dict=True,
    )
    assert logs["lstm_loss"] == pytest.approx(expected, rel=1e-4)


# -- bad input --------------------------------------------------------------


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), True])
def test_invalid_tap_weight_raises(weight):
    with pytest.raises(ValueError, match="non-negative finite"):
        kt.Tap("conv1", regularizer="activity_l2", weight=weight)


@pytest.mark.parametrize(
    "kwargs, close",
    [
        ({"loss": "feature_mes"}, "feature_mse"),
        ({"loss": "mean_squard_error"}, "mean_squared_error"),
        ({"regularizer": "activity_l3"}, "activity_l2"),
        ({"regularizer": "decoov"}, "decov"),
    ],
)
def test_unknown_identifier_raises_with_close_match(kwargs, close):
    with pytest.raises(ValueError, match=f"Did you mean.*{close}"):
        kt.Tap("conv1", **kwargs)


def test_non_scalar_tap_loss_raises():
    x, y, feat = make_data()
    taps = {
        "feat": kt.Tap(
            "feat", loss=keras.losses.MeanSquaredError(reduction="none")
        )
    }
    tap_model = compiled_tap_model(taps=taps)
    with pytest.raises(ValueError, match="'feat'.*scalar"):
        tap_model.fit(x, {"predictions": y, "feat": feat}, verbose=0)


@pytest.mark.parametrize(
    "compile_kwargs",
    [
        {},
        {"steps_per_execution": 2},
        {"jit_compile": True},
        {"jit_compile": True, "steps_per_execution": 2},
    ],
    ids=["graph", "steps_per_execution", "jit", "both"],
)
def test_non_finite_tap_loss_stops_fit_before_the_bad_step(compile_kwargs):
    x, y, feat = make_data()
    feat = feat.copy()
    feat[2 * B + 3] = np.nan  # the third batch: step 2
    tap_model = compiled_tap_model(**compile_kwargs)
    if refused_on_torch(compile_kwargs):
        with pytest.raises(ValueError, match="steps_per_execution.*PyTorch"):
            tap_model.fit(x, {"predictions": y, "feat": feat}, verbose=0)
        return
    snapshots = {}

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # `self.model`: on JAX it brings the variables up to date.
            snapshots[batch] = self.model.base.get_weights()

    with pytest.raises(FloatingPointError) as info:
        tap_model.fit(
            x,
            {"predictions": y, "feat": feat},
            batch_size=B,
            shuffle=False,
            verbose=0,
            callbacks=[Snapshot()],
        )
    message = str(info.value)
    assert "'feat'" in message and "step 2" in message
    assert "nan" in message.lower()
    # No step after the bad one: callbacks see at most the end of the
    # execution that holds it, with the weights of the last good step.
    last = 2 + compile_kwargs.get("steps_per_execution", 1) - 1
    assert max(snapshots) <= last
    for batch in range(2, last + 1):
        if batch in snapshots:
            assert_weights_close(snapshots[batch], snapshots[1], atol=0)
    assert_weights_close(tap_model.base.get_weights(), snapshots[1], atol=0)
    assert all(np.isfinite(w).all() for w in tap_model.base.get_weights())
    assert int(tap_model.optimizer.iterations) == 2


def test_non_finite_validation_loss_is_logged_not_raised():
    x, y, feat = make_data()
    bad = feat.copy()
    bad[0] = np.inf
    tap_model = compiled_tap_model()
    history = tap_model.fit(
        x,
        {"predictions": y, "feat": feat},
        validation_data=(x, {"predictions": y, "feat": bad}),
        batch_size=B,
        verbose=0,
    )
    assert np.isinf(history.history["val_feat_loss"][0])
    assert np.isfinite(history.history["feat_loss"][0])


# -- research subclassing ----------------------------------------------------


def test_compute_tap_losses_override_is_used():
    x, y, _ = make_data()

    class Centered(kt.TapModel):
        def compute_tap_losses(
            self, x, y, taps, sample_weight=None, training=False
        ):
            a = taps["feat"]
            return {"feat": keras.ops.mean((a - keras.ops.mean(a, 0)) ** 2)}

    model = make_cnn()
    taps = {"feat": kt.Tap("feat", regularizer="activity_l2", weight=2.0)}
    tap_model = Centered(model, taps)
    tap_model.compile(keras.optimizers.SGD(LR), loss=SCE)
    a = to_numpy(
        keras.Model(model.input, model.get_layer("feat").output)(x)
    )
    expected = np.mean((a - a.mean(0)) ** 2)
    kernel_l2 = float(to_numpy(ops.sum(ops.stack(model.losses))))
    history = tap_model.fit(x, y, batch_size=N, verbose=0)
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["feat_loss"] == pytest.approx(expected, rel=1e-4)
    assert logs["loss"] == pytest.approx(
        logs["predictions_loss"] + 2 * expected + kernel_l2, rel=1e-4
    )


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_data_target_of_the_wrong_shape_names_tap_shapes_and_key(run_eagerly):
    x, y, _ = make_data()
    tap_model = compiled_tap_model(run_eagerly=run_eagerly)
    wrong = np.zeros((N, 32), "float32")
    with pytest.raises(ValueError) as raised:
        tap_model.fit(x, {"predictions": y, "feat": wrong}, batch_size=B,
                      epochs=1, verbose=0)
    message = str(raised.value)
    assert message.startswith("Tap 'feat': its target y['feat'] has shape (")
    assert "32)" in message and "5)" in message
    assert "Dimensions must be equal" not in message.split("(", 1)[0]


def test_predictions_loss_is_computed_not_subtracted():
    # `model.losses` of 1e5 next to a prediction loss of about 1: a value
    # derived as `total - model.losses` in float32 is off by ~1e-2.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(
        8, kernel_regularizer=keras.regularizers.L2(1e5), name="big"
    )(inputs)
    outputs = keras.layers.Dense(CLASSES, name="logits")(h)
    model = keras.Model(inputs, outputs)
    tap_model = kt.TapModel(
        model, {"big": kt.Tap("big", regularizer="activity_l2")}
    )
    tap_model.compile(keras.optimizers.SGD(0.0), loss=SCE)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = rng.integers(0, CLASSES, size=(N,))
    expected = float(to_numpy(SCE(y, model(x))))
    assert float(to_numpy(ops.sum(ops.stack(model.losses)))) > 1e4
    history = tap_model.fit(x, y, batch_size=N, epochs=1, verbose=0)
    logged = history.history["predictions_loss"][0]
    assert logged == pytest.approx(expected, rel=1e-5)


class _BatchMeanL2(keras.regularizers.Regularizer):
    reduction = "batch_mean"

    def __call__(self, x):
        return keras.ops.mean(keras.ops.sum(keras.ops.square(x), axis=-1))


class _BatchSumL2(keras.regularizers.Regularizer):
    def __call__(self, x):
        return keras.ops.sum(keras.ops.square(x))


@pytest.mark.parametrize(
    "regularizer, declared",
    [
        (_BatchMeanL2(), True),
        (_BatchSumL2(), False),
        (kt.regularizers.ActivityL2(1.0), True),
        (lambda a: keras.ops.sum(keras.ops.square(a)), True),
    ],
    ids=["declared_mean", "keras_sum", "kt", "function"],
)
def test_regularizer_reduction_is_declared(regularizer, declared):
    x, y, _ = make_data()
    model = make_cnn()
    tap_model = kt.TapModel(model, {"feat": kt.Tap("feat",
                                                   regularizer=regularizer)})
    _, taps = tap_model(x)
    terms = tap_model.compute_tap_losses(x, y, taps)
    a = to_numpy(taps["feat"]).astype("float64")
    if isinstance(regularizer, (_BatchMeanL2, kt.regularizers.ActivityL2)):
        value = (a**2).sum(-1).mean()
    else:
        value = (a**2).sum()
    expected = value if declared else value / N
    assert float(to_numpy(terms["feat"])) == pytest.approx(expected, rel=1e-5)
