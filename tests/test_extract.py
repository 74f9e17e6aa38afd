"""`TapModel.extract`: data kinds, reductions, streaming, pruning, reuse."""

import functools
import os

import conftest
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Counter, dense_ref, to_numpy

import keras_tap as kt

assert_close = functools.partial(conftest.assert_close, rtol=1e-5, atol=1e-5)


@pytest.fixture
def convnet():
    """`conv -> counter_mid -> conv_late -> counter_end -> pool -> dense`."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    x = Counter(name="counter_mid")(x)
    x = keras.layers.Conv2D(4, 3, name="conv_late")(x)
    x = Counter(name="counter_end")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="convnet")


@pytest.fixture
def images():
    rng = np.random.default_rng(1)
    return rng.normal(size=(10, 6, 6, 2)).astype("float32")


def sub_output(model, path, x):
    return to_numpy(
        keras.Model(model.input, model.get_layer(path).output)(x)
    )


def counts(model):
    return tuple(
        int(model.get_layer(n).count) for n in ("counter_mid", "counter_end")
    )


# -- data kinds ---------------------------------------------------------------


def test_numpy(convnet, images):
    tap_model = kt.TapModel(convnet, ["conv", "pool"])
    result = tap_model.extract(images, batch_size=4, verbose=0)
    assert list(result) == ["conv", "pool"]
    assert all(isinstance(v, np.ndarray) for v in result.values())
    assert result["conv"].shape == (10, 6, 6, 3)
    assert_close(result["conv"], sub_output(convnet, "conv", images))
    assert_close(result["pool"], sub_output(convnet, "pool", images))


def test_structure_of_arrays_multi_input(x4):
    keras.utils.set_random_seed(2)
    left = keras.Input((4,), name="left")
    right = keras.Input((2,), name="right")
    merged = keras.layers.Concatenate(name="cat")([left, right])
    hidden = keras.layers.Dense(3, name="hidden")(merged)
    model = keras.Model(
        {"left": left, "right": right}, keras.layers.Dense(1)(hidden)
    )
    extra = np.arange(16, dtype="float32").reshape(8, 2) / 16
    tap_model = kt.TapModel(model, "hidden")
    result = tap_model.extract(
        {"left": x4, "right": extra}, batch_size=3, verbose=0
    )
    expected = dense_ref(
        model.get_layer("hidden"), np.concatenate([x4, extra], axis=1)
    )
    assert_close(result["hidden"], expected)


def test_list_of_arrays_multi_input(x4):
    keras.utils.set_random_seed(3)
    left, right = keras.Input((4,)), keras.Input((4,))
    enc = keras.layers.Dense(2, name="enc")
    model = keras.Model(
        [left, right], keras.layers.Add(name="add")([enc(left), enc(right)])
    )
    tap_model = kt.TapModel(model, ["enc@0", "enc@1"])
    result = tap_model.extract([x4, -x4], batch_size=5, verbose=0)
    assert_close(result["enc@0"], dense_ref(enc, x4))
    assert_close(result["enc@1"], dense_ref(enc, -x4))


def test_tf_data_dataset_of_x_y(convnet, images):
    labels = np.arange(10)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    tap_model = kt.TapModel(convnet, "conv")
    result = tap_model.extract(data, verbose=0)
    assert_close(result["conv"], sub_output(convnet, "conv", images))
    # A dataset of x alone works too.
    data = tf.data.Dataset.from_tensor_slices(images).batch(3)
    result = tap_model.extract(data, verbose=0)
    assert_close(result["conv"], sub_output(convnet, "conv", images))


class ImageBatches(keras.utils.PyDataset):
    def __init__(self, images, batch_size, with_y=True, **kwargs):
        super().__init__(**kwargs)
        self.images = images
        self.batch_size = batch_size
        self.with_y = with_y

    def __len__(self):
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, index):
        batch = self.images[index * self.batch_size:][: self.batch_size]
        if self.with_y:
            return batch, np.zeros(len(batch))
        return batch


@pytest.mark.parametrize("with_y", [True, False])
def test_py_dataset(convnet, images, with_y):
    tap_model = kt.TapModel(convnet, "conv")
    result = tap_model.extract(
        ImageBatches(images, 4, with_y=with_y), verbose=0
    )
    assert_close(result["conv"], sub_output(convnet, "conv", images))


# -- what is extracted --------------------------------------------------------


def test_taps_argument_names_and_extra_paths(convnet, images):
    tap_model = kt.TapModel(convnet, {"early": "conv", "late": "conv_late"})
    result = tap_model.extract(
        images, taps=["late", "pool", "early"], verbose=0
    )
    assert list(result) == ["late", "pool", "early"]
    assert_close(result["late"], sub_output(convnet, "conv_late", images))
    assert_close(result["pool"], sub_output(convnet, "pool", images))
    assert_close(result["early"], sub_output(convnet, "conv", images))
    only = tap_model.extract(images, taps="early", verbose=0)
    assert list(only) == ["early"]
    pattern = tap_model.extract(images, taps=["re:conv.*"], verbose=0)
    assert list(pattern) == ["conv", "conv_late"]


@pytest.mark.parametrize("how", ["mean", "max"])
def test_reduce_pools_all_but_batch_and_channels(convnet, images, how):
    tap_model = kt.TapModel(convnet, ["conv", "pool"])
    result = tap_model.extract(images, reduce=how, verbose=0)
    full = sub_output(convnet, "conv", images)
    pool = np.mean if how == "mean" else np.max
    assert result["conv"].shape == (10, 3)
    assert_close(result["conv"], pool(full, axis=(1, 2)))
    # A tap of rank 2 is returned as it is.
    assert_close(result["pool"], sub_output(convnet, "pool", images))


def test_reduce_callable_gets_the_batched_tensor(convnet, images):
    tap_model = kt.TapModel(convnet, "conv")
    shapes = []

    def flatten(tensor):
        shapes.append(tuple(tensor.shape))
        return keras.ops.reshape(tensor, (-1, 6 * 6 * 3))

    result = tap_model.extract(images, reduce=flatten, verbose=0)
    assert shapes and all(len(s) == 4 and s[1:] == (6, 6, 3) for s in shapes)
    full = sub_output(convnet, "conv", images)
    assert_close(result["conv"], full.reshape(10, -1))


# -- streaming ----------------------------------------------------------------


def test_stream_to_npz_equals_in_memory(convnet, images, tmp_path):
    tap_model = kt.TapModel(convnet, ["conv", "pool"])
    in_memory = tap_model.extract(images, batch_size=3, verbose=0)
    target = tmp_path / "sub" / "feats.npz"
    path = tap_model.extract(images, batch_size=3, to=target, verbose=0)
    assert path == str(target)
    assert os.path.exists(path)
    with np.load(path) as stored:
        assert sorted(stored.files) == ["conv", "pool"]
        for name, value in in_memory.items():
            assert stored[name].dtype == value.dtype
            np.testing.assert_array_equal(stored[name], value)
    # No temporary files are left beside it.
    assert sorted(os.listdir(target.parent)) == ["feats.npz"]


def test_stream_nested_and_shared_names(tmp_path, x4):
    keras.utils.set_random_seed(4)
    inner_in = keras.Input((4,))
    inner = keras.Model(
        inner_in, keras.layers.Dense(3, name="proj")(inner_in), name="tower"
    )
    left, right = keras.Input((4,)), keras.Input((4,))
    model = keras.Model(
        [left, right],
        keras.layers.Subtract(name="diff")([inner(left), inner(right)]),
    )
    tap_model = kt.TapModel(model, ["tower/proj@0", "tower/proj@1"])
    path = tap_model.extract(
        [x4, 2 * x4], to=str(tmp_path / "f.npz"), verbose=0
    )
    with np.load(path) as stored:
        proj = inner.get_layer("proj")
        assert_close(stored["tower/proj@0"], dense_ref(proj, x4))
        assert_close(stored["tower/proj@1"], dense_ref(proj, 2 * x4))


def test_failed_stream_leaves_nothing(convnet, images, tmp_path):
    tap_model = kt.TapModel(convnet, "conv")

    def broken():
        yield images[:4]
        raise RuntimeError("data source failed")

    data = tf.data.Dataset.from_generator(
        broken, output_signature=tf.TensorSpec((None, 6, 6, 2), "float32")
    )
    with pytest.raises(Exception, match="data source failed"):
        tap_model.extract(data, to=tmp_path / "x.npz", verbose=0)
    assert os.listdir(tmp_path) == []


# -- progress bar -------------------------------------------------------------


def test_verbose_zero_prints_nothing(convnet, images, capsys):
    tap_model = kt.TapModel(convnet, "conv")
    tap_model.extract(images, batch_size=4, verbose=0)
    assert capsys.readouterr().out == ""
    tap_model.extract(images, batch_size=4, verbose=1)
    assert "3/3" in capsys.readouterr().out


# -- reuse and pruning --------------------------------------------------------


def test_extractor_is_reused_without_retracing(convnet, images):
    tap_model = kt.TapModel(convnet, ["conv", "pool"])
    tap_model.extract(images, batch_size=5, verbose=0)
    assert len(tap_model._extractors) == 1
    [extractor] = tap_model._extractors.values()
    function = extractor.predict_function
    assert function is not None
    tracing = keras.backend.backend() == "tensorflow"
    if tracing:
        traced = function.experimental_get_tracing_count()
        assert traced >= 1
    tap_model.extract(images, batch_size=5, verbose=0)
    tap_model.extract(images[:5], batch_size=5, verbose=0)
    assert list(tap_model._extractors.values()) == [extractor]
    assert extractor.predict_function is function
    if tracing:  # tf.function's trace count is TensorFlow's own.
        assert function.experimental_get_tracing_count() == traced
    # Another tap set or reduction gets its own extractor.
    tap_model.extract(images, taps=["pool"], verbose=0)
    tap_model.extract(images, reduce="mean", verbose=0)
    assert len(tap_model._extractors) == 3


def test_reused_extractor_follows_the_weights(convnet, images):
    # A compiled step (JAX's jit) must read the variables, not a copy of
    # their values when it was first traced.
    tap_model = kt.TapModel(convnet, ["conv", "conv_late"])
    tap_model.extract(images, batch_size=5, verbose=0)
    conv = convnet.get_layer("conv")
    conv.kernel.assign(to_numpy(conv.kernel) * 2.0 + 0.5)
    result = tap_model.extract(images, batch_size=5, verbose=0)
    assert len(tap_model._extractors) == 1
    assert_close(result["conv"], sub_output(convnet, "conv", images))
    assert_close(
        result["conv_late"], sub_output(convnet, "conv_late", images)
    )


def test_pruned_extraction_skips_later_layers(convnet, images):
    tap_model = kt.TapModel(convnet, ["conv", "conv_late"])
    tap_model.extract(images, taps=["conv"], batch_size=5, verbose=0)
    assert counts(convnet) == (0, 0)
    tap_model.extract(images, taps=["conv_late"], batch_size=5, verbose=0)
    assert counts(convnet) == (2, 0)
    tap_model.extract(images, taps=["logits"], batch_size=5, verbose=0)
    assert counts(convnet) == (4, 2)


def test_pruned_extraction_inside_nested_model(images):
    keras.utils.set_random_seed(5)
    inner_in = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(3, 1, name="early")(inner_in)
    x = Counter(name="counter")(x)
    inner = keras.Model(inner_in, keras.layers.Conv2D(2, 1)(x), name="inner")
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 1, name="stem"),
            inner,
            keras.layers.Flatten(),
        ]
    )
    tap_model = kt.TapModel(model, "inner/early")
    result = tap_model.extract(images, verbose=0)
    assert int(inner.get_layer("counter").count) == 0
    stem = model.get_layer("stem")(images)
    assert_close(result["inner/early"], sub_output(inner, "early", stem))


class Staged(keras.Model):
    """A subclassed model: `first -> counter -> second`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(3, name="first")
        self.counter = Counter(name="counter")
        self.second = keras.layers.Dense(2, name="second")

    def call(self, inputs):
        return self.second(self.counter(self.first(inputs)))


def test_subclassed_stops_after_last_requested_tap(x4):
    keras.utils.set_random_seed(6)
    model = Staged(name="staged")
    model(x4)
    model.counter.count.assign(0)
    tap_model = kt.TapModel(model, ["first", "second"])
    result = tap_model.extract(x4, taps=["first"], batch_size=3, verbose=0)
    assert int(model.counter.count) == 0
    assert_close(result["first"], dense_ref(model.first, x4))
    result = tap_model.extract(x4, batch_size=3, verbose=0)
    assert int(model.counter.count) == 3
    assert_close(result["second"], model(x4))
    # The layers' own `call` is back.
    assert "call" not in vars(model.first)
    assert "call" not in vars(model.second)


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"reduce": "sum"},
            ValueError,
            r"`reduce` must be None, one of \['mean', 'max'\].*'sum'",
        ),
        ({"to": "feats.csv"}, ValueError, r"ending in '.npz'.*feats.csv"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be a positive"),
        ({"taps": []}, ValueError, r"`taps` is empty"),
        ({"taps": ["conv_lat"]}, ValueError, r"'conv_late'.*list_layers"),
        ({"data": "images"}, TypeError, r"`data` must be a NumPy.*str"),
        ({"data": [1, 2]}, TypeError, r"`data` must be a NumPy.*list"),
        ({"data": np.zeros((0, 6, 6, 2))}, ValueError, r"`data` is empty"),
        (
            {"data": np.zeros((0, 6, 6, 2)), "to": "x.npz"},
            ValueError,
            r"`data` is empty",
        ),
    ],
)
def test_invalid_arguments(convnet, images, tmp_path, kwargs, error, match):
    tap_model = kt.TapModel(convnet, "conv")
    kwargs = dict(kwargs)
    data = kwargs.pop("data", images)
    if "to" in kwargs:
        kwargs["to"] = str(tmp_path / kwargs["to"])
    with pytest.raises(error, match=match):
        tap_model.extract(data, verbose=0, **kwargs)
    assert os.listdir(tmp_path) == []


def test_structured_tap_streams_every_element(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    mha = keras.layers.MultiHeadAttention(2, 2, name="mha")
    out, scores = mha(inputs, inputs, return_attention_scores=True)
    model = keras.Model(inputs, keras.layers.Flatten(name="flat")(out))
    tap_model = kt.TapModel(model, "mha")
    x = np.random.default_rng(0).normal(size=(5, 3, 4)).astype("float32")
    path = tap_model.extract(
        x, batch_size=2, to=tmp_path / "f.npz", verbose=0
    )
    with np.load(path) as saved:
        assert sorted(saved.files) == ["mha:output[0]", "mha:output[1]"]
        reference_out, reference_scores = mha(
            x, x, return_attention_scores=True
        )
        assert_close(saved["mha:output[0]"], reference_out, atol=1e-5)
        assert_close(saved["mha:output[1]"], reference_scores, atol=1e-6)
