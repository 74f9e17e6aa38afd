"""One re-entrant hook per layer; watchers in a context-local stack."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import keras
import numpy as np
import pytest
from conftest import assert_close

import keras_tap as kt
from keras_tap.taps import watch


class Sleepy(keras.layers.Layer):
    """The identity, sleeping eagerly so that threads interleave."""

    def call(self, inputs):
        time.sleep(0.002)
        return inputs


class Raises(keras.layers.Layer):
    """The identity, raising on a batch of 5."""

    def call(self, inputs):
        if inputs.shape[0] == 5:
            raise RuntimeError("batch of five")
        return inputs


class Net(keras.Model):
    """`x -> a (relu) -> sleepy -> raises -> b`, subclassed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = keras.layers.Dense(6, activation="relu", name="a")
        self.sleepy = Sleepy(name="sleepy")
        self.raises = Raises(name="raises")
        self.b = keras.layers.Dense(3, name="b")

    def call(self, x):
        return self.b(self.raises(self.sleepy(self.a(x))))


def _numpy_a(net, x):
    kernel, bias = (np.asarray(w) for w in net.a.get_weights())
    return np.maximum(np.asarray(x, np.float64) @ kernel + bias, 0.0)


def _numpy_net(net, x):
    kernel, bias = (np.asarray(w) for w in net.b.get_weights())
    return _numpy_a(net, x) @ kernel + bias


def _layers(net):
    return [net.a, net.sleepy, net.raises, net.b]


def _assert_clean(net):
    for layer in _layers(net):
        assert "call" not in vars(layer), layer.name
        assert not watch.is_hooked(layer)
    assert watch._ACTIVE.get() == ()


@pytest.fixture
def net():
    keras.utils.set_random_seed(0)
    model = Net(name="net")
    model(np.zeros((2, 4), "float32"))
    return model


def _x(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")


def _wanted(layer, name, index=0):
    return {id(layer): {index: [name]}}


def test_no_hook_while_tap_models_exist(net):
    tap_models = [kt.TapModel(net, "a"), kt.TapModel(net, ["a", "b"])]
    _assert_clean(net)
    for tap_model in tap_models:
        _, taps = tap_model(_x(3))
        assert_close(taps["a"], _numpy_a(net, _x(3)), atol=1e-5)
        _assert_clean(net)
    tap_models[0].predict(_x(3), verbose=0)
    _assert_clean(net)


def test_overlapping_recordings_left_out_of_order(net):
    first = watch.Watcher([net.a], _wanted(net.a, "a")).watch()
    second = watch.Watcher([net.a, net.b], _wanted(net.b, "b")).watch()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # Out of order: `second` stays.
    assert watch.is_hooked(net.a) and watch.is_hooked(net.b)
    x = _x(3)
    net(x)
    assert "a" not in first.records
    assert_close(
        second.records["b"], _numpy_net(net, x), atol=1e-5
    )
    second.__exit__(None, None, None)
    _assert_clean(net)


def test_same_watcher_nested_records_twice(net):
    watcher = watch.Watcher([net.a], None)
    x1, x2 = _x(3, 1), _x(3, 2)
    with watcher.watch() as outer:
        with watcher.watch() as inner:
            net(x1)
        assert watch.is_hooked(net.a)
        net(x2)
    _assert_clean(net)
    assert len(inner.calls) == 1 and len(outer.calls) == 2
    assert_close(inner.calls[0][1], _numpy_a(net, x1), atol=1e-5)
    assert_close(outer.calls[1][1], _numpy_a(net, x2), atol=1e-5)


def test_tap_model_nested_in_a_watcher_on_the_same_layer(net):
    tap_model = kt.TapModel(net, "a")
    x = _x(4)
    watcher = watch.Watcher([net.a], _wanted(net.a, "outer"))
    with watcher.watch() as recording:
        _, taps = tap_model(x)  # Enters its own watcher on `a`.
        assert watch.is_hooked(net.a)
    _assert_clean(net)
    expected = _numpy_a(net, x)
    assert_close(taps["a"], expected, atol=1e-5)
    assert_close(recording.records["outer"], expected, atol=1e-5)


def test_exception_inside_a_watched_call_cleans_up(net):
    tap_model = kt.TapModel(net, ["a", "raises"])
    with pytest.raises(RuntimeError, match="batch of five"):
        tap_model(_x(5))
    _assert_clean(net)
    with pytest.raises(RuntimeError, match="batch of five"):
        with watch.Watcher(_layers(net)).watch():
            with watch.Watcher([net.a]).watch():
                net(_x(5))
    _assert_clean(net)
    assert_close(net(_x(3)), _numpy_net(net, _x(3)), atol=1e-5)


def test_threads_each_record_their_own_calls(net):
    tap_model = kt.TapModel(net, ["a", "b"])
    inputs = [_x(3, seed) for seed in range(4)]
    barrier = threading.Barrier(len(inputs))
    results, errors = {}, []

    def work(i):
        try:
            barrier.wait()
            for _ in range(5):
                _, taps = tap_model(inputs[i])
                results.setdefault(i, []).append(taps)
        except Exception as e:  # Reported below, in the main thread.
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, x in enumerate(inputs):
        assert len(results[i]) == 5
        for taps in results[i]:
            assert_close(taps["a"], _numpy_a(net, x), atol=1e-5)
            assert_close(
                taps["b"], _numpy_net(net, x), atol=1e-5
            )
    _assert_clean(net)


def test_other_thread_calls_are_not_seen(net):
    watcher = watch.Watcher([net.a], None)
    entered, done = threading.Event(), threading.Event()

    def plain():
        entered.wait()
        net(_x(2))  # Hooked, but no watcher in this thread.
        done.set()

    thread = threading.Thread(target=plain)
    thread.start()
    with watcher.watch() as recording:
        entered.set()
        done.wait()
        net(_x(3))
    thread.join()
    assert [tuple(v.shape) for _, v in recording.calls] == [(3, 6)]
    _assert_clean(net)


def test_early_stop_does_not_leak(net):
    tap_model = kt.TapModel(net, "a")
    x = _x(6)
    everything = watch.Watcher(_layers(net), None)
    with everything.watch() as outer:
        features = tap_model.extract(x, taps=["a"], verbose=0, batch_size=6)
        # The extractor stopped after `a`; the outer recording saw that
        # call alone, then sees a whole plain call.
        assert [k for k, _ in outer.calls] == [id(net.a)]
        predictions = net(x)
    assert_close(features["a"], _numpy_a(net, x), atol=1e-5)
    assert_close(predictions, _numpy_net(net, x), atol=1e-5)
    assert [k for k, _ in outer.calls[1:]] == [id(v) for v in _layers(net)]
    _assert_clean(net)
    assert_close(net(x), _numpy_net(net, x), atol=1e-5)


def test_stop_forward_of_inner_run_only(net):
    inner = watch.Watcher([net.a], _wanted(net.a, "a"), stop_early=True)
    result, recording = inner.run(net, _x(3))
    assert result is None and recording.stopped
    # A StopForward that is not the recording's own is not swallowed.
    with pytest.raises(watch.StopForward):
        watch.Watcher([net.b], _wanted(net.b, "b")).run(
            lambda: (_ for _ in ()).throw(watch.StopForward("other"))
        )
    _assert_clean(net)


def test_own_instance_call_is_kept(net):
    calls = []
    original = net.b.call

    def own(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    object.__setattr__(net.b, "call", own)
    try:
        with watch.Watcher([net.b], _wanted(net.b, "b")).watch() as rec:
            net(_x(3))
        assert vars(net.b)["call"] is own
        assert len(calls) == 1
        assert_close(
            rec.records["b"], _numpy_net(net, _x(3)), atol=1e-5
        )
    finally:
        object.__delattr__(net.b, "call")


def test_missing_call_names_the_tap(net):
    watcher = watch.Watcher([net.a], _wanted(net.a, "second", index=1))
    _, recording = watcher.run(net, _x(2))
    with pytest.raises(ValueError, match="'second' was not computed"):
        recording.values(["second"])


SCRIPT = textwrap.dedent(
    """
    import sys

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

    import keras
    import numpy as np

    import keras_tap as kt

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.a = keras.layers.Dense(6, activation="relu", name="a")
            self.b = keras.layers.Dense(3, name="b")

        def call(self, x):
            return self.b(self.a(x))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")

    def run(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            net = Net()
            net(x[:2])
            tap_model = kt.TapModel(
                net,
                {"a": kt.Tap("a", regularizer=kt.regularizers.ActivityL2(0.1))},
            )
            tap_model.compile(keras.optimizers.SGD(0.1), loss="mse")
        history = tap_model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0
        )
        _, taps = tap_model.predict(x, batch_size=8, verbose=0)
        assert "call" not in vars(net.a) and "call" not in vars(net.b)
        kernel, bias = net.a.get_weights()
        np.testing.assert_allclose(
            taps["a"], np.maximum(x @ kernel + bias, 0), atol=1e-5
        )
        return net.get_weights(), history.history["a_loss"]

    single = run(tf.distribute.get_strategy())
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    mirrored = run(strategy)
    for a, b in zip(single[0], mirrored[0]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(single[1], mirrored[1], rtol=1e-5)
    assert single[1][1] != single[1][0]
    print("OK")
    """
)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies are TensorFlow's own",
)
def test_subclassed_base_under_mirrored_strategy():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
