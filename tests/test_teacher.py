"""Teacher taps and adapters: distillation targets from the same step."""

import keras
import numpy as np
import pytest
from conftest import Counter, to_numpy

import keras_tap as kt

N, B = 16, 8


def make_student(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="s_conv1")(inputs)
    h = Counter(name="s_counter")(h)
    h = keras.layers.Conv2D(6, 3, strides=2, name="s_conv2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, name="s_logits")(h)
    return keras.Model(inputs, outputs, name="student")


def make_teacher(seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="t_conv1")(inputs)
    h = keras.layers.BatchNormalization(name="t_bn")(h)
    h = Counter(name="t_counter")(h)
    h = keras.layers.Conv2D(10, 3, strides=2, name="t_conv2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, name="t_logits")(h)
    return keras.Model(inputs, outputs, name="teacher")


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(N,))
    return x, y


def distiller(student=None, teacher=None, weight=0.5):
    student = student or make_student()
    teacher = teacher or make_teacher()
    keras.utils.set_random_seed(2)
    taps = {
        "hint": kt.Tap(
            "s_counter",
            teacher="t_counter",
            loss=kt.losses.FeatureMSE(),
            adapter=keras.layers.Conv2D(8, 1, name="regressor"),
            weight=weight,
        ),
        "logits": kt.Tap("s_logits", teacher="t_logits", loss="mse"),
    }
    tap_model = kt.TapModel(student, taps, teacher=teacher)
    tap_model.compile(
        keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return tap_model


def teacher_view(teacher, *names):
    return keras.Model(
        teacher.input, [teacher.get_layer(n).output for n in names]
    )


def test_teacher_target_comes_from_the_same_step():
    x, y = make_data()
    tap_model = distiller()
    teacher = tap_model.teacher
    t_hint, t_logits = to_numpy(
        teacher_view(teacher, "t_counter", "t_logits")(x, training=False)
    )
    _, taps = tap_model(x)
    adapter = tap_model.taps["hint"].adapter
    hint = np.mean((to_numpy(adapter(taps["hint"])) - t_hint) ** 2)
    logits = np.mean((to_numpy(taps["logits"]) - t_logits) ** 2)
    history = tap_model.fit(x, y, batch_size=N, verbose=0)
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["hint_loss"] == pytest.approx(hint, rel=1e-4)
    assert logs["logits_loss"] == pytest.approx(logits, rel=1e-4)
    assert logs["loss"] == pytest.approx(
        logs["predictions_loss"] + 0.5 * hint + logits, rel=1e-4
    )


def test_teacher_weights_never_change():
    x, y = make_data()
    tap_model = distiller()
    teacher = tap_model.teacher
    frozen = [w.copy() for w in teacher.get_weights()]
    counter = teacher.get_layer("t_counter").count
    student_before = [w.copy() for w in tap_model.base.get_weights()]
    tap_model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    assert teacher.trainable  # the user's object is left as it was
    for name, before, after in zip(
        [w.path for w in teacher.weights], frozen, teacher.get_weights()
    ):
        if name == counter.path:
            continue
        np.testing.assert_array_equal(after, before, err_msg=name)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(tap_model.base.get_weights(), student_before)
    ]
    assert sum(changed) >= 4  # kernels and biases of the student


def test_student_and_teacher_run_once_per_training_step():
    x, y = make_data()
    tap_model = distiller()
    student_count = tap_model.base.get_layer("s_counter").count
    teacher_count = tap_model.teacher.get_layer("t_counter").count
    steps = 3 * (N // B)
    tap_model.fit(x, y, batch_size=B, epochs=3, verbose=0)
    assert int(tap_model.optimizer.iterations) == steps
    assert int(student_count) == steps
    assert int(teacher_count) == steps


def test_shape_mismatch_without_adapter_names_both_shapes():
    taps = {"hint": kt.Tap("s_counter", teacher="t_counter", loss="mse")}
    with pytest.raises(ValueError, match=r"\(8, 8, 4\).*\(8, 8, 8\)"):
        kt.TapModel(make_student(), taps, teacher=make_teacher())


def test_adapter_maps_student_to_teacher_shape():
    adapter = keras.layers.Conv2D(8, 1)
    taps = {
        "hint": kt.Tap(
            "s_counter", teacher="t_counter", loss="mse", adapter=adapter
        )
    }
    tap_model = kt.TapModel(make_student(), taps, teacher=make_teacher())
    assert adapter.built
    assert tuple(adapter.kernel.shape) == (1, 1, 4, 8)
    assert tap_model.adapters == [adapter]


def test_adapters_train_and_stay_out_of_the_base_model():
    x, y = make_data()
    tap_model = distiller()
    adapter = tap_model.taps["hint"].adapter
    base_ids = {id(w) for w in tap_model.base.weights}
    assert adapter.weights
    assert not any(id(w) in base_ids for w in adapter.weights)
    trainable_ids = {id(w) for w in tap_model.trainable_weights}
    assert all(id(w) in trainable_ids for w in adapter.trainable_weights)
    teacher_ids = {id(w) for w in tap_model.teacher.weights}
    assert not any(id(w) in trainable_ids for w in tap_model.teacher.weights)
    assert not teacher_ids & base_ids
    before = [w.copy() for w in adapter.get_weights()]
    tap_model.fit(x, y, batch_size=B, verbose=0)
    for a, b in zip(adapter.get_weights(), before):
        assert not np.allclose(a, b)


def test_adapters_are_saved_with_the_tap_model(tmp_path):
    x, y = make_data()
    tap_model = distiller()
    tap_model.fit(x, y, batch_size=B, verbose=0)
    path = str(tmp_path / "distiller.keras")
    tap_model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kt.TapModel)
    adapter = loaded.taps["hint"].adapter
    for a, b in zip(
        adapter.get_weights(), tap_model.taps["hint"].adapter.get_weights()
    ):
        np.testing.assert_array_equal(a, b)
    base_ids = {id(w) for w in loaded.base.weights}
    assert not any(id(w) in base_ids for w in adapter.weights)
    for a, b in zip(
        loaded.teacher.get_weights(), tap_model.teacher.get_weights()
    ):
        np.testing.assert_array_equal(a, b)
    _, expected = to_numpy(tap_model(x))
    _, actual = to_numpy(loaded(x))
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-6)


def test_subclassed_teacher_and_student():
    """Interception, not graph rebuilds, for models without a graph."""

    class Net(keras.Model):
        def __init__(self, width, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(width, name="hidden")
            self.counter = Counter(name="counter")
            self.out = keras.layers.Dense(2, name="out")

        def call(self, x):
            return self.out(self.counter(self.hidden(x)))

    keras.utils.set_random_seed(0)
    student, teacher = Net(3, name="student"), Net(5, name="teacher")
    x = np.random.default_rng(0).normal(size=(N, 4)).astype("float32")
    student(x[:1])
    teacher(x[:1])
    taps = {
        "hidden": kt.Tap(
            "hidden",
            teacher="hidden",
            loss="mse",
            adapter=keras.layers.Dense(5),
        )
    }
    tap_model = kt.TapModel(student, taps, teacher=teacher)
    tap_model.compile(keras.optimizers.SGD(0.05), loss="mse")
    t_hidden = to_numpy(teacher.hidden(x))
    _, activations = tap_model(x)
    adapted = tap_model.taps["hidden"].adapter(activations["hidden"])
    expected = np.mean((to_numpy(adapted) - t_hidden) ** 2)
    counts = int(student.counter.count), int(teacher.counter.count)
    frozen = [w.copy() for w in teacher.get_weights()]
    history = tap_model.fit(
        x, np.zeros((N, 2)), batch_size=N, epochs=2, verbose=0
    )
    assert history.history["hidden_loss"][0] == pytest.approx(
        expected, rel=1e-4
    )
    assert int(student.counter.count) - counts[0] == 2
    assert int(teacher.counter.count) - counts[1] == 2
    for a, b in zip(teacher.get_weights(), frozen):
        if a.dtype != np.int32:
            np.testing.assert_array_equal(a, b)


def test_teacher_given_as_a_layer_object(tmp_path):
    """Defect 6: `Tap(teacher=<Layer>)` resolves against the teacher."""
    x, _ = make_data()
    student, teacher = make_student(), make_teacher()
    tap = kt.Tap("s_logits", teacher=teacher.get_layer("t_logits"), loss="mse")
    tap_model = kt.TapModel(student, {"logits": tap}, teacher=teacher)
    assert tap_model.taps["logits"].teacher == "t_logits"
    assert tap_model.get_config()["taps"]["logits"]["teacher"] == "t_logits"
    expected = to_numpy(teacher_view(teacher, "t_logits")(x, training=False))
    np.testing.assert_allclose(
        to_numpy(tap_model.teacher_taps(x)["logits"]), expected, atol=1e-6
    )
    tap_model.compile(keras.optimizers.SGD(0.05), loss="mse")
    tap_model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.taps["logits"].teacher == "t_logits"
    np.testing.assert_allclose(
        to_numpy(loaded.teacher_taps(x)["logits"]), expected, atol=1e-6
    )
    # A layer of another model is refused, naming the teacher.
    other = make_student(seed=3).get_layer("s_logits")
    with pytest.raises(ValueError, match="not part of model 'teacher'"):
        kt.TapModel(
            make_student(),
            {"logits": kt.Tap("s_logits", teacher=other, loss="mse")},
            teacher=teacher,
        )
    with pytest.raises(TypeError, match=r"teacher.*received int"):
        kt.Tap("s_logits", teacher=3, loss="mse")


def _teacher_state(teacher):
    counter = teacher.get_layer("t_counter").count.path
    return {
        w.path: w.numpy().copy() for w in teacher.weights if w.path != counter
    }


def test_the_users_teacher_stays_trainable_and_trains_on_its_own():
    teacher = make_teacher()
    tap_model = distiller(teacher=teacher)
    assert teacher.trainable
    assert all(layer.trainable for layer in teacher.layers)
    x, y = make_data()
    before = _teacher_state(teacher)
    tap_model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert teacher.trainable
    for path, value in _teacher_state(teacher).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    # The user's own fit of the teacher trains it (it trained nothing
    # when the TapModel set `teacher.trainable = False`).
    teacher.compile(
        keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    teacher.fit(x, y, batch_size=B, epochs=1, verbose=0)
    after = _teacher_state(teacher)
    changed = [p for p in after if not np.array_equal(after[p], before[p])]
    assert len(changed) >= 8, changed  # kernels, biases, BN state
    # And the TapModel's step still leaves it alone afterwards.
    trained = _teacher_state(teacher)
    tap_model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    for path, value in _teacher_state(teacher).items():
        np.testing.assert_array_equal(value, trained[path], err_msg=path)


def test_teacher_weights_get_no_optimizer_slots():
    tap_model = distiller()
    x, y = make_data()
    tap_model.compile(keras.optimizers.Adam(1e-3), loss="mse")
    tap_model.fit(x, keras.ops.one_hot(y, 3), batch_size=B, epochs=1,
                  verbose=0)
    teacher_ids = {id(w) for w in tap_model.teacher.weights}
    assert not teacher_ids & {id(w) for w in tap_model.trainable_variables}
    frozen = {id(w) for w in tap_model.non_trainable_weights}
    assert teacher_ids <= frozen
    # Adam keeps two slots per trained variable, none for the teacher.
    slots = len(tap_model.optimizer.variables) - 2  # iterations, lr
    assert slots == 2 * len(tap_model.trainable_variables)
