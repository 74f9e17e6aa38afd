"""User trial of keras_tap's data paths: `extract` (arrays, PyDataset,
generator, tf.data, torch DataLoader, `.npz` streaming, `reduce`),
`predict`/`fit`/`evaluate` with taps on the same kinds, multi-input and
multi-output models, sample and class weights, last partial batches and
integer-token inputs; every number against plain Keras or NumPy."""

import functools
import os
import tracemalloc

import conftest
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import BACKEND, to_numpy

import keras_tap as kt

assert_close = functools.partial(conftest.assert_close, rtol=1e-5, atol=1e-5)
N = 11  # not divisible by the batch size 4: a last partial batch


def _mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), name="x")
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(hidden)
    return keras.Model(inputs, outputs, name="mlp")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = rng.integers(0, 3, size=(N,))
    t = rng.normal(size=(N, 4)).astype("float32")
    w = rng.uniform(0.5, 2.0, size=(N,)).astype("float32")
    return x, y, t, w


def hidden_ref(model, x):
    return to_numpy(
        keras.Model(model.input, model.get_layer("hidden").output)(x)
    )


class Batches(keras.utils.PyDataset):
    """Batches of 4 of any structure of arrays: `x`, `(x, y)`, ..."""

    def __init__(self, arrays, **kwargs):
        super().__init__(**kwargs)
        self.arrays = arrays

    def __len__(self):
        return -(-N // 4)

    def __getitem__(self, i):
        return keras.tree.map_structure(
            lambda v: v[i * 4 : (i + 1) * 4], self.arrays
        )


def generator(arrays):
    for i in range(-(-N // 4)):
        yield keras.tree.map_structure(lambda v: v[i * 4 : (i + 1) * 4], arrays)


def torch_loader(*arrays):
    torch = pytest.importorskip("torch")
    dataset = torch.utils.data.TensorDataset(
        *(torch.as_tensor(a) for a in arrays)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=4)


SOURCES = ["numpy", "pydataset", "generator", "tf_data", "torch_loader"]


def source(kind, x, y):
    if kind == "numpy":
        return x
    if kind == "pydataset":
        return Batches((x, y))
    if kind == "generator":
        return generator((x, y))
    if kind == "tf_data":
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    return torch_loader(x, y)


# -- extract and predict on every data kind ----------------------------------


@pytest.mark.parametrize("kind", SOURCES)
def test_extract_and_predict_each_source(kind, data):
    x, y, _, _ = data
    model = _mlp()
    tap_model = kt.TapModel(model, {"hid": "hidden"})
    expected = hidden_ref(model, x)
    result = tap_model.extract(source(kind, x, y), batch_size=4, verbose=0)
    assert result["hid"].shape == (N, 4)  # the last partial batch kept
    assert result["hid"].dtype == np.float32
    assert_close(result["hid"], expected)
    predictions, taps = tap_model.predict(
        source(kind, x, y), batch_size=4, verbose=0
    )
    assert_close(predictions, model.predict(x, batch_size=4, verbose=0))
    assert_close(taps["hid"], expected)


def test_extract_torch_loader_of_x_alone(data):
    x = data[0]
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(torch.as_tensor(x), batch_size=4)
    model = _mlp()
    result = kt.TapModel(model, "hidden").extract(loader, verbose=0)
    assert_close(result["hidden"], hidden_ref(model, x))


def test_extract_batch_size_none_is_kerass_default(data):
    x = data[0]
    model = _mlp()
    result = kt.TapModel(model, "hidden").extract(x, batch_size=None, verbose=0)
    assert_close(result["hidden"], hidden_ref(model, x))


def test_extract_to_npz_and_reduce(tmp_path):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5, 5, 2))
    conv = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    model = keras.Model(
        inputs, keras.layers.Dense(2)(keras.layers.Flatten()(conv))
    )
    images = np.random.default_rng(1).normal(size=(N, 5, 5, 2))
    images = images.astype("float32")
    tap_model = kt.TapModel(model, "conv")
    expected = to_numpy(keras.Model(inputs, conv)(images))
    path = tap_model.extract(
        images, batch_size=4, to=str(tmp_path / "f.npz"), verbose=0
    )
    with np.load(path) as stored:
        assert stored["conv"].shape == (N, 3, 3, 3)
        assert_close(stored["conv"], expected)
    pooled = tap_model.extract(
        generator(images), reduce="max", to=tmp_path / "p.npz", verbose=0
    )
    with np.load(pooled) as stored:
        assert_close(stored["conv"], expected.max(axis=(1, 2)))
    assert sorted(os.listdir(tmp_path)) == ["f.npz", "p.npz"]  # no temps


def test_streaming_memory_does_not_grow(tmp_path):
    """Twice the batches, the same peak: the rows go to disk."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((64,))
    wide = keras.layers.Dense(256, name="wide")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(wide))
    tap_model = kt.TapModel(model, "wide")
    batch = np.ones((64, 64), "float32")

    def batches(count):
        for _ in range(count):
            yield batch

    tap_model.extract(batches(2), to=tmp_path / "warm.npz", verbose=0)
    peaks = []
    for count in (160, 320):
        tracemalloc.start()
        try:
            path = tap_model.extract(
                batches(count), to=tmp_path / f"{count}.npz", verbose=0
            )
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        with np.load(path) as stored:
            assert stored["wide"].shape == (count * 64, 256)
    total = 320 * 64 * 256 * 4  # 21 MB of features
    assert peaks[1] < total / 2, peaks
    assert peaks[1] < peaks[0] * 1.25, peaks


# -- multi-input and multi-output models --------------------------------------


def _two_towers():
    keras.utils.set_random_seed(3)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    cat = keras.layers.Concatenate(name="cat")([a, b])
    hh = keras.layers.Dense(4, name="hh")(cat)
    o1 = keras.layers.Dense(2, name="o1")(hh)
    o2 = keras.layers.Dense(1, name="o2")(hh)
    as_dict = keras.Model({"a": a, "b": b}, {"o1": o1, "o2": o2})
    as_list = keras.Model([a, b], [o1, o2])
    return as_dict, as_list, keras.Model([a, b], hh)


@pytest.fixture
def towers_data():
    rng = np.random.default_rng(4)
    xa = rng.normal(size=(N, 3)).astype("float32")
    xb = rng.normal(size=(N, 2)).astype("float32")
    y1 = rng.normal(size=(N, 2)).astype("float32")
    y2 = rng.normal(size=(N, 1)).astype("float32")
    th = rng.normal(size=(N, 4)).astype("float32")
    return xa, xb, y1, y2, th


@pytest.mark.parametrize("form", ["dict", "dict_reordered", "list"])
@pytest.mark.parametrize("kind", ["numpy", "pydataset", "generator", "tf_data"])
def test_multi_input_extract_and_predict(form, kind, towers_data):
    xa, xb, *_ = towers_data
    as_dict, as_list, hh_model = _two_towers()
    model = as_list if form == "list" else as_dict
    x = {
        "dict": {"a": xa, "b": xb},
        "dict_reordered": {"b": xb, "a": xa},
        "list": [xa, xb],
    }[form]
    if form == "list" and kind != "numpy":
        # Keras reads a list batch as `(x, y)` and tf.data cannot batch a
        # list of arrays of two shapes: a list model takes a tuple.
        x = tuple(x)
    if kind == "numpy":
        given = x
    elif kind == "pydataset":
        given = Batches((x,))
    elif kind == "generator":
        given = generator((x,))
    else:
        given = tf.data.Dataset.from_tensor_slices((x,)).batch(4)
    tap_model = kt.TapModel(model, "hh")
    expected = to_numpy(hh_model([xa, xb]))
    assert_close(
        tap_model.extract(given, batch_size=4, verbose=0)["hh"], expected
    )
    if kind == "generator":
        given = generator((x,))
    predictions, taps = tap_model.predict(given, batch_size=4, verbose=0)
    reference = model.predict(x, batch_size=4, verbose=0)
    keras.tree.map_structure(assert_close, predictions, reference)
    assert_close(taps["hh"], expected)


@pytest.mark.parametrize("form", ["dict", "list"])
def test_multi_output_losses_fit_evaluate(form, towers_data):
    """Per-output losses of a multi-output model with a tap loss and a
    regularizer (JAX failed here: "'NoneType' object is not callable")."""
    xa, xb, y1, y2, th = towers_data
    as_dict, as_list, hh_model = _two_towers()
    if form == "dict":
        model, x, pred_y = as_dict, {"a": xa, "b": xb}, {"o1": y1, "o2": y2}
        loss = {"o1": "mse", "o2": "mae"}
    else:
        model, x, pred_y = as_list, [xa, xb], [y1, y2]
        loss = ["mse", "mae"]
    tap_model = kt.TapModel(
        model,
        {
            "hh": kt.Tap("hh", loss="mse", weight=2.0),
            "reg": kt.Tap("cat", regularizer=kt.regularizers.ActivityL2(0.1)),
        },
    )
    tap_model.compile(keras.optimizers.SGD(0.0), loss=loss)
    y = {"predictions": pred_y, "hh": th}
    out = to_numpy(as_list([xa, xb]))
    l1 = np.mean((out[0] - y1) ** 2)
    l2 = np.mean(np.abs(out[1] - y2))
    lt = np.mean((to_numpy(hh_model([xa, xb])) - th) ** 2)
    lreg = 0.1 * np.sum(np.concatenate([xa, xb], 1) ** 2) / N
    logs = tap_model.evaluate(x, y, batch_size=N, verbose=0, return_dict=True)
    history = tap_model.fit(x, y, batch_size=N, verbose=0).history
    for got in (logs, {k: v[0] for k, v in history.items()}):
        assert_close(got["loss"], l1 + l2 + 2 * lt + lreg, rtol=1e-4)
        assert_close(got["hh_loss"], lt, rtol=1e-4)
        assert_close(got["predictions_loss"], l1 + l2, rtol=1e-4)
        names = ("o1_loss", "o2_loss") if form == "dict" else ()
        for name, value in zip(names, (l1, l2)):
            assert_close(got[name], value, rtol=1e-4)


# -- sample_weight and class_weight against NumPy -----------------------------


def _reference(model, x, y, t, w_pred, w_tap, batch):
    """Keras's logged loss: per batch `sum(w * l) / batch size`, averaged
    over the batches weighted by their sizes."""
    p = np.clip(to_numpy(model(x)).astype("float64"), 1e-7, 1 - 1e-7)
    ce = -np.log(p[np.arange(N), y]) * w_pred
    mse = ((hidden_ref(model, x) - t) ** 2).mean(-1) * w_tap
    parts = [
        (ce[s : s + batch].sum(), mse[s : s + batch].sum())
        for s in range(0, N, batch)
    ]
    pred = sum(p_ for p_, _ in parts) / N
    tap = sum(t_ for _, t_ in parts) / N
    return pred, tap, pred + 0.5 * tap


def _tap_model(model):
    tap_model = kt.TapModel(
        model, {"hid": kt.Tap("hidden", loss="mse", weight=0.5)}
    )
    tap_model.compile(
        keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy"
    )
    return tap_model


def _check(logs, reference):
    pred, tap, total = reference
    assert_close(logs["loss"], total, rtol=1e-4)
    assert_close(logs["predictions_loss"], pred, rtol=1e-4)
    assert_close(logs["hid_loss"], tap, rtol=1e-4)


CLASS_WEIGHT = {0: 1.0, 1: 3.0, 2: 0.5}


@pytest.mark.parametrize("weights", ["sample", "class", "both"])
def test_fit_weights_against_numpy(weights, data):
    x, y, t, w = data
    model = _mlp()
    tap_model = _tap_model(model)
    kwargs = {}
    cw = np.array([CLASS_WEIGHT[int(c)] for c in y], "float32")
    w_pred, w_tap = np.ones(N), np.ones(N)
    if weights in ("sample", "both"):
        kwargs["sample_weight"] = w
        w_pred, w_tap = w, w
    if weights in ("class", "both"):
        kwargs["class_weight"] = CLASS_WEIGHT
        w_pred = w_pred * cw
    history = tap_model.fit(
        x,
        {"predictions": y, "hid": t},
        batch_size=4,
        epochs=1,
        shuffle=False,
        verbose=0,
        **kwargs,
    ).history
    _check(
        {k: v[0] for k, v in history.items()},
        _reference(model, x, y, t, w_pred, w_tap, 4),
    )


@pytest.mark.parametrize(
    "kind", ["pydataset", "generator", "tf_data", "torch_loader"]
)
def test_evaluate_and_fit_weighted_sources(kind, data):
    x, y, t, w = data
    model = _mlp()
    tap_model = _tap_model(model)
    reference = _reference(model, x, y, t, w, w, 4)
    if kind == "torch_loader":
        if BACKEND != "torch":
            pytest.skip("Keras reads a DataLoader's batches on torch here")
        torch = pytest.importorskip("torch")

        class Samples(torch.utils.data.Dataset):
            def __len__(self):
                return N

            def __getitem__(self, i):
                return x[i], {"predictions": y[i], "hid": t[i]}, w[i]

        make = lambda: torch.utils.data.DataLoader(Samples(), batch_size=4)  # noqa: E731
    else:
        arrays = (x, {"predictions": y, "hid": t}, w)
        make = {
            "pydataset": lambda: Batches(arrays),
            "generator": lambda: generator(arrays),
            "tf_data": lambda: tf.data.Dataset.from_tensor_slices(arrays).batch(
                4
            ),
        }[kind]
    _check(tap_model.evaluate(make(), verbose=0, return_dict=True), reference)
    history = tap_model.fit(make(), epochs=1, verbose=0).history
    _check({k: v[0] for k, v in history.items()}, reference)


def test_class_weight_with_tf_data(data):
    x, y, t, _ = data
    model = _mlp()
    tap_model = _tap_model(model)
    cw = np.array([CLASS_WEIGHT[int(c)] for c in y], "float32")
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, {"predictions": y, "hid": t})
    ).batch(4)
    history = tap_model.fit(
        dataset, class_weight=CLASS_WEIGHT, verbose=0
    ).history
    _check(
        {k: v[0] for k, v in history.items()},
        _reference(model, x, y, t, cw, np.ones(N), 4),
    )


def test_class_weight_with_pydataset(data):
    x, y, t, _ = data
    model = _mlp()
    tap_model = _tap_model(model)
    cw = np.array([CLASS_WEIGHT[int(c)] for c in y], "float32")
    history = tap_model.fit(
        Batches((x, {"predictions": y, "hid": t})),
        class_weight=CLASS_WEIGHT,
        verbose=0,
    ).history
    _check(
        {k: v[0] for k, v in history.items()},
        _reference(model, x, y, t, cw, np.ones(N), 4),
    )


# -- integer tokens ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "generator", "tf_data"])
def test_embedding_integer_tokens(kind):
    keras.utils.set_random_seed(5)
    tokens_in = keras.Input((6,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(20, 4, name="emb")(tokens_in)
    pooled = keras.layers.GlobalAveragePooling1D(name="gap")(embedded)
    outputs = keras.layers.Dense(3, activation="softmax")(pooled)
    model = keras.Model(tokens_in, outputs)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 20, size=(N, 6)).astype("int32")
    labels = rng.integers(0, 3, size=(N,))
    tap_model = kt.TapModel(
        model,
        {
            "emb": "emb",
            "ids": "emb:input",
            "gap": kt.Tap("gap", regularizer=kt.regularizers.ActivityL1(0.01)),
        },
    )
    given = {
        "numpy": lambda: tokens,
        "generator": lambda: generator((tokens, labels)),
        "tf_data": lambda: tf.data.Dataset.from_tensor_slices(
            (tokens, labels)
        ).batch(4),
    }[kind]
    result = tap_model.extract(given(), batch_size=4, verbose=0)
    expected = to_numpy(keras.Model(tokens_in, embedded)(tokens))
    assert_close(result["emb"], expected)
    assert result["ids"].dtype == np.int32
    np.testing.assert_array_equal(result["ids"], tokens)
    pooled_mean = tap_model.extract(
        given(), taps=["emb"], batch_size=4, reduce="mean", verbose=0
    )
    assert_close(pooled_mean["emb"], expected.mean(axis=1))
    tap_model.compile("adam", "sparse_categorical_crossentropy")
    fit_data = given() if kind != "numpy" else tokens
    fit_y = None if kind != "numpy" else labels
    tap_model.fit(fit_data, fit_y, batch_size=4, epochs=1, verbose=0)
    predictions, taps = tap_model.predict(tokens, batch_size=4, verbose=0)
    assert_close(predictions, model.predict(tokens, batch_size=4, verbose=0))
    assert taps["gap"].shape == (N, 4)
