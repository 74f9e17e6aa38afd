import math

import keras
import numpy as np
import pytest
from conftest import BACKEND, dtype_name, to_numpy

from keras_tap.training import schedules

STEPS = [0, 1, 7, 25, 50, 99, 100, 101, 250]
# The integer dtypes of a step counter (JAX has no int64 unless x64 is on;
# its optimizer counts steps in int32).
STEP_DTYPES = ["int32"] if BACKEND == "jax" else ["int32", "int64"]


def ref_linear_warmup(step, start, end, steps):
    return start + (end - start) * min(max(step / steps, 0.0), 1.0)


def ref_cosine_decay(step, initial, steps, final):
    t = min(step / steps, 1.0)
    return final + (initial - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def ref_piecewise(step, boundaries, values):
    index = int(np.searchsorted(boundaries, step, side="left"))
    return values[index]


CASES = [
    (schedules.Constant(0.3), lambda s: 0.3),
    (schedules.Constant(0), lambda s: 0.0),
    (
        schedules.LinearWarmup(0.0, 2.0, steps=100),
        lambda s: ref_linear_warmup(s, 0.0, 2.0, 100),
    ),
    (
        schedules.LinearWarmup(start=1.0, end=0.25, steps=7),
        lambda s: ref_linear_warmup(s, 1.0, 0.25, 7),
    ),
    (
        schedules.CosineDecay(1.5, steps=100),
        lambda s: ref_cosine_decay(s, 1.5, 100, 0.0),
    ),
    (
        schedules.CosineDecay(initial=0.2, steps=50, final=1.0),
        lambda s: ref_cosine_decay(s, 0.2, 50, 1.0),
    ),
    (
        schedules.Piecewise([25, 100], [1.0, 0.5, 0.1]),
        lambda s: ref_piecewise(s, [25, 100], [1.0, 0.5, 0.1]),
    ),
    (
        schedules.Piecewise([0, 7.5, 101], [0.0, 2.0, 3.0, 0.0]),
        lambda s: ref_piecewise(s, [0, 7.5, 101], [0.0, 2.0, 3.0, 0.0]),
    ),
]
IDS = [repr(schedule) for schedule, _ in CASES]


@pytest.mark.parametrize("schedule, reference", CASES, ids=IDS)
def test_values_match_numpy_formula(schedule, reference):
    for step in STEPS:
        value = schedule(step)
        assert dtype_name(value) == "float32"
        assert tuple(value.shape) == ()
        np.testing.assert_allclose(
            float(value), reference(step), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("schedule, reference", CASES, ids=IDS)
def test_accepts_integer_tensors_and_variables(schedule, reference):
    steps = [keras.ops.convert_to_tensor(25, dtype) for dtype in STEP_DTYPES]
    steps += [
        keras.Variable(25, dtype=dtype, trainable=False)
        for dtype in STEP_DTYPES
    ]
    for step in steps:
        np.testing.assert_allclose(
            float(to_numpy(schedule(step))),
            reference(25),
            rtol=1e-5,
            atol=1e-7,
        )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.function tracing is TensorFlow's own",
)
@pytest.mark.parametrize("schedule, reference", CASES, ids=IDS)
def test_one_trace_for_a_changing_step_variable(schedule, reference):
    import tensorflow as tf

    traces = []
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def weight(step):
        traces.append(1)
        return schedule(step)

    values = []
    for value in STEPS:
        step.assign(value)
        values.append(float(weight(step)))
    assert len(traces) == 1
    np.testing.assert_allclose(
        values, [reference(s) for s in STEPS], rtol=1e-5, atol=1e-7
    )


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit tracing is JAX's own")
@pytest.mark.parametrize("schedule, reference", CASES, ids=IDS)
def test_one_jax_jit_trace_for_a_changing_step(schedule, reference):
    import jax

    traces = []

    @jax.jit
    def weight(step):
        traces.append(1)
        return schedule(step)

    values = [
        float(weight(keras.ops.convert_to_tensor(step, "int32")))
        for step in STEPS
    ]
    assert len(traces) == 1
    np.testing.assert_allclose(
        values, [reference(s) for s in STEPS], rtol=1e-5, atol=1e-7
    )


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit tracing is JAX's own")
def test_weight_follows_the_step_counter_in_a_jax_stateless_step():
    # As Keras's JAX trainer runs a step: the optimizer's variables are
    # traced arguments, mapped onto the variables by a `StatelessScope`.
    import jax

    schedule = schedules.LinearWarmup(0.0, 1.0, steps=10)
    optimizer = keras.optimizers.SGD()
    optimizer.build([])
    traces = []

    @jax.jit
    def weight(iterations):
        traces.append(1)
        mapping = [(optimizer.iterations, iterations)]
        with keras.StatelessScope(state_mapping=mapping):
            return schedule(optimizer.iterations)

    first = float(weight(optimizer.iterations.value))
    second = float(weight(optimizer.iterations.value + 5))
    assert (first, second) == (0.0, 0.5)
    assert len(traces) == 1


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.function tracing is TensorFlow's own",
)
def test_weight_changes_inside_one_trace():
    import tensorflow as tf

    schedule = schedules.LinearWarmup(0.0, 1.0, steps=10)
    optimizer = keras.optimizers.SGD()
    optimizer.build([])
    traces = []

    @tf.function
    def weight():
        traces.append(1)
        return schedule(optimizer.iterations)

    first = float(weight())
    optimizer.iterations.assign(5)
    second = float(weight())
    assert (first, second) == (0.0, 0.5)
    assert len(traces) == 1


def test_cosine_decay_matches_keras_schedule():
    ours = schedules.CosineDecay(2.0, steps=40, final=0.5)
    theirs = keras.optimizers.schedules.CosineDecay(2.0, 40, alpha=0.25)
    for step in STEPS:
        np.testing.assert_allclose(
            float(ours(step)), float(theirs(step)), rtol=1e-5
        )


def test_piecewise_matches_keras_piecewise_constant_decay():
    boundaries, values = [10, 20, 30], [1.0, 0.5, 0.25, 0.0]
    ours = schedules.Piecewise(boundaries, values)
    theirs = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, values
    )
    for step in range(0, 40):
        step = keras.ops.convert_to_tensor(step, STEP_DTYPES[-1])
        assert float(to_numpy(ours(step))) == float(to_numpy(theirs(step)))


@pytest.mark.parametrize("schedule, reference", CASES, ids=IDS)
def test_serialization_round_trip(schedule, reference):
    config = keras.saving.serialize_keras_object(schedule)
    name = type(schedule).__name__
    assert config["registered_name"] == f"keras_tap>{name}"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    for step in STEPS:
        assert float(restored(step)) == float(schedule(step))


@pytest.mark.parametrize("schedule, reference", CASES, ids=IDS)
def test_config_is_init_arguments(schedule, reference):
    config = schedule.get_config()
    assert type(schedule)(**config).get_config() == config
    for key, value in config.items():
        assert getattr(schedule, key) == value


def test_custom_schedule_subclass():
    class Halving(schedules.Schedule):
        def __init__(self, every):
            self.every = every

        def call(self, step):
            return 0.5 ** keras.ops.floor(step / self.every)

        def get_config(self):
            return {"every": self.every}

    assert float(Halving(10)(25)) == 0.25
    assert schedules.get(Halving(10)).every == 10
    with pytest.raises(NotImplementedError, match="call"):
        schedules.Schedule()(0)
    with pytest.raises(NotImplementedError, match="get_config"):
        schedules.Schedule().get_config()


def test_get():
    constant = schedules.get(0.5)
    assert type(constant) is schedules.Constant
    assert constant.value == 0.5
    assert schedules.get(2).get_config() == {"value": 2.0}
    assert schedules.get(np.float32(0.25)).value == 0.25
    warmup = schedules.LinearWarmup(0.0, 1.0, 10)
    assert schedules.get(warmup) is warmup
    restored = schedules.get(keras.saving.serialize_keras_object(warmup))
    assert restored.get_config() == warmup.get_config()
    bare = schedules.get(
        {"class_name": "CosineDecay", "config": {"initial": 1.0, "steps": 5}}
    )
    assert bare.get_config() == {"initial": 1.0, "steps": 5, "final": 0.0}


@pytest.mark.parametrize(
    "identifier, match",
    [
        ("linear", "Could not interpret.*Received: identifier='linear'"),
        (True, "Could not interpret"),
        (None, "Could not interpret"),
        (-1.0, "`value` of `Constant`"),
        (float("nan"), "`value`.*finite"),
        ({"class_name": "Nope", "config": {}}, "Unknown schedule.*'Nope'"),
        (keras.saving.serialize_keras_object(keras.regularizers.L2()), "L2"),
    ],
)
def test_get_invalid(identifier, match):
    with pytest.raises(ValueError, match=match):
        schedules.get(identifier)


INVALID = [
    (schedules.Constant, {"value": -0.5}, "`value`.*Received: value=-0.5"),
    (schedules.Constant, {"value": float("inf")}, "`value`.*finite"),
    (schedules.Constant, {"value": "1"}, "`value`.*Received: value='1'"),
    (schedules.Constant, {"value": True}, "`value`"),
    (
        schedules.LinearWarmup,
        {"start": -1.0, "end": 1.0, "steps": 10},
        "`start` of `LinearWarmup`",
    ),
    (
        schedules.LinearWarmup,
        {"start": 0.0, "end": float("nan"), "steps": 10},
        "`end`",
    ),
    (
        schedules.LinearWarmup,
        {"start": 0.0, "end": 1.0, "steps": 0},
        "`steps`.*integer >= 1.*Received: steps=0",
    ),
    (
        schedules.LinearWarmup,
        {"start": 0.0, "end": 1.0, "steps": 10.5},
        "`steps`.*Received: steps=10.5",
    ),
    (schedules.CosineDecay, {"initial": -1.0, "steps": 10}, "`initial`"),
    (schedules.CosineDecay, {"initial": 1.0, "steps": -3}, "`steps`"),
    (
        schedules.CosineDecay,
        {"initial": 1.0, "steps": 10, "final": -0.1},
        "`final`",
    ),
    (
        schedules.Piecewise,
        {"boundaries": [], "values": [1.0]},
        "`boundaries`.*non-empty",
    ),
    (
        schedules.Piecewise,
        {"boundaries": 5, "values": [1.0, 2.0]},
        "`boundaries`.*Received: boundaries=5",
    ),
    (
        schedules.Piecewise,
        {"boundaries": [10, 10], "values": [1.0, 2.0, 3.0]},
        "`boundaries`.*strictly increasing",
    ),
    (
        schedules.Piecewise,
        {"boundaries": [float("nan")], "values": [1.0, 2.0]},
        "`boundaries`.*finite",
    ),
    (
        schedules.Piecewise,
        {"boundaries": [10, 20], "values": [1.0, 2.0]},
        r"`values`.*len\(boundaries\) \+ 1 = 3",
    ),
    (
        schedules.Piecewise,
        {"boundaries": [10], "values": [1.0, -2.0]},
        r"`values\[1\]`.*Received: values\[1\]=-2.0",
    ),
]


@pytest.mark.parametrize("cls, kwargs, match", INVALID)
def test_invalid_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
