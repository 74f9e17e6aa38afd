"""`forward.build`: one interface, a graph run or a watched run."""

import keras
import numpy as np
import pytest
from conftest import Counter, dense_ref, to_numpy

from keras_tap.taps import forward, paths


class Block(keras.Model):
    """A subclassed block: `Dense(5, relu, "inner") -> Counter`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(5, activation="relu", name="inner")
        self.counter = Counter(name="block_counter")

    def call(self, x):
        return self.counter(self.inner(x))


def _two_headed():
    """Functional, dict output, with a subclassed block nested inside."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="h")(inputs)
    block = Block(name="block")
    b = block(h)
    counted = Counter(name="late_counter")(b)
    outputs = {
        "first": keras.layers.Dense(2, name="first")(counted),
        "second": keras.layers.Dense(3, name="second")(h),
    }
    return keras.Model(inputs, outputs, name="two_headed"), block


def _points(index, *specs):
    return [index.resolve(spec)[0][1] for spec in specs]


@pytest.fixture
def x4():
    return np.random.default_rng(0).normal(size=(8, 4)).astype("float32")


def test_graph_forward_returns_predictions_and_points(x4):
    model, _ = _two_headed()
    index = paths.LayerIndex(model)
    run = forward.build(index, _points(index, "h"), ["hid"])
    assert isinstance(run, forward.GraphForward)
    predictions, values = to_numpy(run(x4))
    expected = to_numpy(model(x4))
    assert set(predictions) == {"first", "second"}
    for key in expected:
        np.testing.assert_allclose(predictions[key], expected[key], atol=1e-6)
    np.testing.assert_allclose(
        values["hid"], dense_ref(model.get_layer("h"), x4, "relu"), atol=1e-5
    )


def test_graph_forward_without_outputs_keeps_only_what_it_needs(x4):
    model, block = _two_headed()
    index = paths.LayerIndex(model)
    run = forward.build(index, _points(index, "h"), ["hid"], outputs=False)
    predictions, values = run(x4)
    assert predictions is None and list(values) == ["hid"]
    names = {layer.name for layer in run.model.layers}
    assert "h" in names and not names & {"block", "first", "second"}
    assert run.model.count_params() == 4 * 6 + 6


def test_watched_forward_for_a_point_inside_a_subclassed_block(x4):
    model, block = _two_headed()
    index = paths.LayerIndex(model)
    late = model.get_layer("late_counter")
    start = int(late.count.numpy())
    run = forward.build(index, _points(index, "block/inner"), ["inner"])
    # The graph still runs rebuilt; the point inside the block is watched.
    assert isinstance(run, forward.GraphForward) and run.watcher is not None
    predictions, values = to_numpy(run(x4))
    hidden = dense_ref(model.get_layer("h"), x4, "relu")
    np.testing.assert_allclose(
        values["inner"], dense_ref(block.inner, hidden, "relu"), atol=1e-5
    )
    np.testing.assert_allclose(
        predictions["first"], to_numpy(model(x4)["first"]), atol=1e-6
    )
    assert int(late.count.numpy()) == start + 2  # run, then model(x4).
    assert "call" not in vars(block.inner)


def test_watched_forward_stops_early_without_outputs(x4):
    model, block = _two_headed()
    index = paths.LayerIndex(model)
    late = model.get_layer("late_counter")
    start = int(late.count.numpy()), int(block.counter.count.numpy())
    run = forward.build(
        index, _points(index, "block/inner"), ["inner"], outputs=False,
        stop_early=True,
    )
    predictions, values = run(x4)
    assert predictions is None and tuple(values["inner"].shape) == (8, 5)
    # Nothing after the point ran, inside the block or after it.
    assert int(late.count.numpy()) == start[0]
    assert int(block.counter.count.numpy()) == start[1]
    # A plain call afterwards runs whole.
    model(x4)
    assert int(late.count.numpy()) == start[0] + 1
