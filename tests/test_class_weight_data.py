"""`fit(x, class_weight=...)` with `x` a PyDataset, a generator, an
iterator or a torch DataLoader: the per-batch losses and the final
weights equal those of the same fit on NumPy arrays with the class weights
given as an explicit sample weight computed in NumPy; the first epoch's
losses equal a NumPy reference."""

import functools
import pickle

import conftest
import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy

import keras_tap as kt

assert_close = functools.partial(conftest.assert_close, rtol=1e-5, atol=1e-5)
N = 11  # not divisible by the batch size 4: a last partial batch
B = 4
CLASS_WEIGHT = {0: 1.0, 1: 3.0, 2: 0.5}
KINDS = ["pydataset", "pydataset_threads", "generator", "iterator", "torch"]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = rng.integers(0, 3, size=(N,))
    y[:3] = [0, 1, 2]
    t = rng.normal(size=(N, 4)).astype("float32")
    w = rng.uniform(0.5, 2.0, size=(N,)).astype("float32")
    return x, y, t, w


def numpy_class_weights(y, one_hot=False):
    labels = np.argmax(y, -1) if one_hot else y
    return np.array([CLASS_WEIGHT[int(c)] for c in labels], "float32")


def tap_model(lr=0.1):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), name="x")
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(hidden)
    model = keras.Model(inputs, outputs, name="mlp")
    result = kt.TapModel(
        model, {"hid": kt.Tap("hidden", loss="mse", weight=0.5)}
    )
    result.compile(keras.optimizers.SGD(lr), "sparse_categorical_crossentropy")
    return result


class Batches(keras.utils.PyDataset):
    def __init__(self, arrays, **kwargs):
        super().__init__(**kwargs)
        self.arrays = arrays

    def __len__(self):
        return -(-N // B)

    def __getitem__(self, i):
        return keras.tree.map_structure(
            lambda v: v[i * B : (i + 1) * B], self.arrays
        )


def batches(arrays):
    return [
        keras.tree.map_structure(lambda v: v[i : i + B], arrays)
        for i in range(0, N, B)
    ]


def make_source(kind, arrays):
    if kind == "pydataset":
        return Batches(arrays)
    if kind == "pydataset_threads":
        return Batches(arrays, workers=2, max_queue_size=3)
    if kind == "generator":
        return (batch for batch in batches(arrays))
    if kind == "iterator":
        return iter(batches(arrays))
    torch = pytest.importorskip("torch")

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return keras.tree.map_structure(lambda v: v[i], arrays)

    return torch.utils.data.DataLoader(Samples(), batch_size=B)


class BatchLosses(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(
            [float(logs[k]) for k in ("loss", "predictions_loss", "hid_loss")]
        )


def fit(model, *args, **kwargs):
    losses = BatchLosses()
    kwargs.setdefault("shuffle", False)
    model.fit(*args, callbacks=[losses], verbose=0, **kwargs)
    return np.array(losses.seen), [to_numpy(v) for v in model.weights]


def check_same_fit(got, want):
    assert got[0].shape == want[0].shape
    assert_close(got[0], want[0], rtol=1e-4)
    for a, b in zip(got[1], want[1]):
        assert_close(a, b, rtol=1e-4)


# Keras reads a PyDataset with workers out of order (plain Keras too), so
# the threaded kind is checked per epoch only (test_first_epoch_...).
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "pydataset_threads"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["cw", "cw_sw"])
def test_fit_equals_arrays_with_numpy_sample_weight(kind, with_weights, data):
    x, y, t, w = data
    targets = {"predictions": y, "hid": t}
    arrays = (x, targets, w) if with_weights else (x, targets)
    given = w if with_weights else np.ones(N, "float32")
    epochs = 1 if kind in ("generator", "iterator") else 2
    got = fit(
        tap_model(),
        make_source(kind, arrays),
        class_weight=CLASS_WEIGHT,
        epochs=epochs,
    )
    want = fit(
        tap_model(),
        x,
        targets,
        sample_weight={
            "predictions": numpy_class_weights(y) * given,
            "hid": given,
        },
        batch_size=B,
        epochs=epochs,
        shuffle=False,
    )
    check_same_fit(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_first_epoch_against_numpy(kind, data):
    """Learning rate 0: the epoch's logged losses are Keras's
    `sum(w * loss) / batch size`, averaged over batches by size."""
    x, y, t, w = data
    model = tap_model(lr=0.0)
    source = make_source(kind, (x, {"predictions": y, "hid": t}, w))
    logs = model.fit(
        source, class_weight=CLASS_WEIGHT, shuffle=False, verbose=0
    ).history
    p = np.clip(to_numpy(model(x)[0]).astype("float64"), 1e-7, 1 - 1e-7)
    hidden = keras.Model(
        model.base.input, model.base.get_layer("hidden").output
    )
    ce = -np.log(p[np.arange(N), y]) * numpy_class_weights(y) * w
    mse = ((to_numpy(hidden(x)) - t) ** 2).mean(-1) * w
    assert_close(logs["predictions_loss"][0], ce.sum() / N, rtol=1e-4)
    assert_close(logs["hid_loss"][0], mse.sum() / N, rtol=1e-4)
    assert_close(logs["loss"][0], (ce.sum() + 0.5 * mse.sum()) / N, rtol=1e-4)


def test_pydataset_prediction_loss_equals_plain_keras(data):
    """Plain Keras applies `class_weight` to a PyDataset too: same
    prediction loss per batch (learning rate 0, the tap adds its own)."""
    x, y, t, _ = data
    model = tap_model(lr=0.0)
    got = fit(
        model,
        Batches((x, {"predictions": y, "hid": t})),
        class_weight=CLASS_WEIGHT,
    )[0][:, 1]
    plain = model.base
    plain.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    seen = []
    plain.fit(
        Batches((x, y)),
        class_weight=CLASS_WEIGHT,
        shuffle=False,
        verbose=0,
        callbacks=[
            keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda b, logs: seen.append(logs["loss"])
            )
        ],
    )
    assert_close(got, np.array(seen, "float64"), rtol=1e-4)


@pytest.mark.parametrize("kind", ["pydataset", "generator", "torch"])
def test_one_hot_single_target(kind, data):
    """A single one-hot target (not a dict): the class is its argmax; the
    tap (target='predictions') is not class-weighted."""
    x, y, _, _ = data
    one_hot = np.eye(3, dtype="float32")[y]

    def make():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
        outputs = keras.layers.Dense(3, activation="softmax")(hidden)
        adapter = keras.Sequential(
            [keras.layers.Dense(3, activation="softmax")]
        )
        result = kt.TapModel(
            keras.Model(inputs, outputs),
            {
                "hid": kt.Tap(
                    "hidden",
                    target="predictions",
                    adapter=adapter,
                    loss="categorical_crossentropy",
                    weight=0.5,
                )
            },
        )
        result.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
        return result

    got = fit(
        make(), make_source(kind, (x, one_hot)), class_weight=CLASS_WEIGHT
    )
    want = fit(
        make(),
        x,
        {"predictions": one_hot, "hid": np.zeros(N, "float32")},
        sample_weight={
            "predictions": numpy_class_weights(one_hot, one_hot=True),
            "hid": np.ones(N, "float32"),
        },
        batch_size=B,
        shuffle=False,
    )
    check_same_fit(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_class_names_it(kind, data):
    x, y, t, _ = data
    source = make_source(kind, (x, {"predictions": y, "hid": t}))
    with pytest.raises(ValueError, match=r"no weight for the classes \[2\]"):
        tap_model().fit(source, class_weight={0: 1.0, 1: 2.0}, verbose=0)


def test_batches_without_targets_are_refused(data):
    x = data[0]
    with pytest.raises(ValueError, match=r"class_weight.*\(x, y\)"):
        tap_model().fit(Batches((x,)), class_weight=CLASS_WEIGHT, verbose=0)


def test_unknown_data_kind_names_the_type():
    with pytest.raises(ValueError, match="class_weight.*received x of type"):
        tap_model().fit("not data", class_weight=CLASS_WEIGHT, verbose=0)


def test_pydataset_wrapper_keeps_its_settings_and_pickles(data):
    from keras_tap.training import class_weight_data

    x, y, t, _ = data
    model = tap_model()
    source = Batches(
        (x, {"predictions": y, "hid": t}), workers=3, max_queue_size=7
    )
    wrapped = class_weight_data.with_class_weight(model, source, CLASS_WEIGHT)
    assert isinstance(wrapped, keras.utils.PyDataset)
    assert (wrapped.workers, wrapped.max_queue_size) == (3, 7)
    assert not wrapped.use_multiprocessing
    assert len(wrapped) == wrapped.num_batches == 3
    # Worker processes get the batch mapping: it holds no model.
    weighter = pickle.loads(pickle.dumps(wrapped.weighter))
    _, _, weights = weighter(source[0])
    assert_close(weights["predictions"], numpy_class_weights(y[:B]))
    assert_close(weights["hid"], np.ones(B))


def test_torch_dataloader_keeps_its_length(data):
    if BACKEND != "torch":
        pytest.importorskip("torch")
    from keras_tap.training import class_weight_data

    x, y, t, _ = data
    loader = make_source("torch", (x, {"predictions": y, "hid": t}))
    wrapped = class_weight_data.with_class_weight(
        tap_model(), loader, CLASS_WEIGHT
    )
    assert len(wrapped) == len(loader) == 3
    assert len(list(wrapped)) == len(list(wrapped)) == 3  # every epoch


@pytest.mark.parametrize("class_weight", [{0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0}])
def test_tf_data_missing_class_is_an_error(class_weight, data):
    """As the other kinds (and the arrays): no silent weight for a class
    the dict does not name, inside or past its largest key."""
    tf = pytest.importorskip("tensorflow")
    x, y, t, _ = data
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, {"predictions": y, "hid": t})
    ).batch(B)
    missing = 2 if 2 not in class_weight else 1
    with pytest.raises(
        Exception, match=f"no weight for the classes.*{missing}"
    ):
        tap_model().fit(dataset, class_weight=class_weight, verbose=0)
