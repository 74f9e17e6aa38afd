"""`kt.edit`: activations changed while the model runs, against plain
Keras models written out by hand and NumPy."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_tap as kt
from keras_tap.taps import watch


def _chain():
    """`x -> h1 (relu) -> h2 -> out`, a Functional model."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    h1 = keras.layers.Dense(8, activation="relu", name="h1")(inputs)
    h2 = keras.layers.Dense(6, name="h2")(h1)
    out = keras.layers.Dense(3, name="out")(h2)
    return keras.Model(inputs, out, name="chain")


def _x(n=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")


def _by_hand(model, edit_h2):
    """The chain with `edit_h2` applied to h2's output, as a plain Keras
    model over the same layers."""
    inputs = keras.Input((4,))
    h2 = model.get_layer("h2")(model.get_layer("h1")(inputs))
    edited = keras.layers.Lambda(edit_h2)(h2)
    return keras.Model(inputs, model.get_layer("out")(edited))


def _clean(model):
    for layer in model._flatten_layers(include_self=True):
        assert "call" not in vars(layer), layer.name
        assert not watch.is_hooked(layer)


def test_zero_equals_model_zeroed_by_hand_every_way_it_runs():
    model, x = _chain(), _x()
    expected = to_numpy(_by_hand(model, keras.ops.zeros_like)(x))
    tap_model = kt.TapModel(model, {"t2": "h2", "t1": "h1"})
    features = kt.FeatureModel(model, "h2")
    with kt.edit(model, {"h2": kt.edits.Zero()}):
        np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-6)
        np.testing.assert_allclose(
            model.predict(x, verbose=0), expected, atol=1e-6
        )
        predictions, taps = to_numpy(tap_model(x))
        np.testing.assert_allclose(predictions, expected, atol=1e-6)
        np.testing.assert_array_equal(taps["t2"], np.zeros((5, 6)))
        assert np.abs(taps["t1"]).max() > 0
        np.testing.assert_array_equal(
            to_numpy(features(x)["h2"]), np.zeros((5, 6))
        )
        extracted = tap_model.extract(x, taps=["t2"], verbose=0)
        np.testing.assert_array_equal(extracted["t2"], np.zeros((5, 6)))
    _clean(model)


def test_after_the_block_predictions_equal_before_bit_for_bit():
    model, x = _chain(), _x()
    tap_model = kt.TapModel(model, "h2")
    direct, compiled = to_numpy(model(x)), model.predict(x, verbose=0)
    taps_before = tap_model.predict(x, verbose=0)
    with kt.edit(model, {"h1": kt.edits.Scale(3.0)}):
        inside = model.predict(x, verbose=0)
        tap_model.predict(x, verbose=0)
        assert model.predict_function is not None  # traced inside
    assert not np.allclose(inside, compiled)
    assert model.predict_function is None  # discarded on closing
    np.testing.assert_array_equal(to_numpy(model(x)), direct)
    np.testing.assert_array_equal(model.predict(x, verbose=0), compiled)
    after = tap_model.predict(x, verbose=0)
    np.testing.assert_array_equal(after[1]["h2"], taps_before[1]["h2"])
    _clean(model)


def test_replace_patches_the_clean_activation_in():
    model = _chain()
    clean, corrupted = _x(seed=1), _x(seed=2)
    tap_model = kt.TapModel(model, {"a1": "h1", "a2": "h2"})
    clean_out, clean_taps = tap_model(clean)
    with kt.edit(model, {"h1": kt.edits.Replace(clean_taps["a1"])}):
        out, taps = to_numpy(tap_model(corrupted))
    np.testing.assert_allclose(
        taps["a2"], to_numpy(clean_taps["a2"]), atol=1e-6
    )
    np.testing.assert_allclose(out, to_numpy(clean_out), atol=1e-6)
    # Only where the mask is true: by hand with NumPy.
    _, corrupted_taps = to_numpy(tap_model(corrupted))
    mask = np.zeros((5, 8), bool)
    mask[:, :3] = True
    with kt.edit(model, {"h1": kt.edits.Replace(clean_taps["a1"], mask)}):
        _, taps = to_numpy(tap_model(corrupted))
    expected = np.where(
        mask, to_numpy(clean_taps["a1"]), corrupted_taps["a1"]
    )
    np.testing.assert_allclose(taps["a1"], expected, atol=1e-6)


def test_add_clamp_project_out_and_callables_match_numpy():
    model, x = _chain(), _x()
    tap_model = kt.TapModel(model, {"t": "h2"})
    _, plain = tap_model(x)
    a = to_numpy(plain["t"]).astype(np.float64)
    vector = np.arange(6, dtype="float32")
    d = np.array([1.0, 2.0, 0.0, -1.0, 0.5, 3.0])
    u = d / np.linalg.norm(d)
    cases = [
        (kt.edits.Add(vector, scale=0.5), a + 0.5 * vector),
        (kt.edits.Clamp(min=-0.1, max=0.2), np.clip(a, -0.1, 0.2)),
        (kt.edits.Clamp(max=0.0), np.minimum(a, 0.0)),
        (kt.edits.ProjectOut(d), a - (a @ u)[:, None] * u),
        (lambda t: t * t, a * a),
    ]
    for edit, expected in cases:
        with kt.edit(model, {"h2": edit}):
            _, taps = to_numpy(tap_model(x))
        np.testing.assert_allclose(taps["t"], expected, atol=1e-5)
    projected = cases[3][1]
    np.testing.assert_allclose(projected @ u, 0.0, atol=1e-6)


def test_nested_blocks_compose_inner_on_outer():
    model, x = _chain(), _x()
    expected = to_numpy(_by_hand(model, lambda t: (t + 1.0) * 2.0)(x))
    once = to_numpy(_by_hand(model, lambda t: t + 1.0)(x))
    with kt.edit(model, {"h2": kt.edits.Add(np.ones(6))}):
        with kt.edit(model, {"h2": kt.edits.Scale(2.0)}):
            np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-5)
        np.testing.assert_allclose(to_numpy(model(x)), once, atol=1e-5)
    _clean(model)


def test_one_call_of_a_shared_layer():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    a = shared(inputs)
    b = shared(keras.layers.Activation("tanh", name="mid")(a))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(b))
    x = _x()
    ref_in = keras.Input((4,))
    first = shared(ref_in)
    second = keras.ops.zeros_like(shared(keras.ops.tanh(first)))
    reference = keras.Model(ref_in, model.get_layer("head")(second))
    expected = to_numpy(reference(x))
    tap_model = kt.TapModel(model, {"first": "shared@0"})
    _, plain = to_numpy(tap_model(x))
    with kt.edit(model, {"shared@1": kt.edits.Zero()}):
        for _ in range(2):  # the calls are counted per run
            np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-6)
        preds, taps = to_numpy(tap_model(x))
        np.testing.assert_allclose(preds, expected, atol=1e-6)
        np.testing.assert_allclose(taps["first"], plain["first"])


def test_fit_inside_scale_zero_gives_no_gradient_to_the_cut_branch():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3, name="branch_a")(inputs)
    b = keras.layers.Dense(3, name="branch_b")(inputs)
    merged = keras.layers.Add(name="merge")([a, b])
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(merged))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = _x(16), np.ones((16, 1), "float32")
    a_before = [w.numpy().copy() for w in model.get_layer("branch_a").weights]
    b_before = [w.numpy().copy() for w in model.get_layer("branch_b").weights]
    with kt.edit(model, {"branch_a": kt.edits.Scale(0.0)}):
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        zeroed = model.evaluate(x, y, verbose=0)
    for w, before in zip(model.get_layer("branch_a").weights, a_before):
        np.testing.assert_array_equal(w.numpy(), before)
    assert any(
        not np.array_equal(w.numpy(), before)
        for w, before in zip(model.get_layer("branch_b").weights, b_before)
    )
    # evaluate ran the edited model: its loss is the cut model's.
    by_hand = keras.Model(
        inputs,
        model.get_layer("head")(model.get_layer("branch_b")(inputs)),
    )
    expected = np.mean((to_numpy(by_hand(x)) - y) ** 2)
    assert zeroed == pytest.approx(expected, rel=1e-5)
    assert model.train_function is None and model.test_function is None


def test_subclassed_model_is_edited():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(5, name="hidden")
            self.head = keras.layers.Dense(2, name="head")

        def call(self, x):
            return self.head(keras.ops.relu(self.hidden(x)))

    keras.utils.set_random_seed(0)
    model = Net()
    x = _x()
    model(x)
    expected = np.maximum(to_numpy(model.hidden(x)) * -1.0, 0)
    expected = to_numpy(model.head(expected))
    with kt.edit(model, {"hidden": kt.edits.Scale(-1.0)}):
        np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-6)
        np.testing.assert_allclose(
            model.predict(x, verbose=0), expected, atol=1e-6
        )
    _clean(model)


def test_input_suffix_edits_the_call_input():
    model, x = _chain(), _x()
    expected = to_numpy(model.get_layer("out").bias)
    with kt.edit(model, {"out:input": kt.edits.Zero()}):
        np.testing.assert_allclose(
            to_numpy(model(x)), np.broadcast_to(expected, (5, 3)), atol=1e-6
        )


def test_errors():
    model, x = _chain(), _x()
    with pytest.raises(ValueError, match=r"'h2'.*\(5, 2\).*\(5, 6\)"):
        with kt.edit(model, {"h2": lambda t: t[:, :2]}):
            model(x)
    with pytest.raises(ValueError, match="dtype"):
        with kt.edit(model, {"h2": lambda t: keras.ops.cast(t, "int32")}):
            model(x)
    with pytest.raises(ValueError, match="batch size 3.*batch size 5"):
        with kt.edit(model, {"h2": kt.edits.Replace(np.zeros((3, 6)))}):
            model(x)
    with pytest.raises(ValueError, match="Closest valid paths.*'h2'"):
        with kt.edit(model, {"h3": kt.edits.Zero()}):
            pass
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.Dense(3, name="used")
            self.unused = keras.layers.Dense(3, name="unused")

        def call(self, x):
            return self.used(x)

    net = Net()
    net(x)
    with pytest.raises(ValueError, match="kt.edit.*'unused'.*never called"):
        with kt.edit(net, {"unused": kt.edits.Zero()}):
            pass
    unbuilt = keras.Sequential([keras.layers.Dense(2, name="d")])
    with pytest.raises(ValueError, match="not built.*build"):
        with kt.edit(unbuilt, {"d": kt.edits.Zero()}):
            pass
    with pytest.raises(TypeError, match="callable"):
        kt.edit(model, {"h2": 3.0})
    with pytest.raises(ValueError, match="non-zero"):
        kt.edits.ProjectOut(np.zeros(6))
    _clean(model)
    np.testing.assert_allclose(
        to_numpy(model(x)), to_numpy(_by_hand(model, lambda t: t)(x)),
        atol=1e-6,
    )


def _load_example(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_is_edited_and_restored():
    pytest.importorskip("keras_hub")
    example = _load_example("steer_transformer.py")
    lm = example.build_lm(num_layers=2)
    inputs = example.batch([[3, 9, 4, 1]])
    before = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    # The last block's hidden state zeroed (element 0 of its `(hidden,
    # cache)` while decoding): the final layer norm gives its beta, so
    # every step picks argmax(beta @ embeddings.T), computed with NumPy.
    beta = lm.backbone.get_layer("layer_norm").beta.numpy()
    table = lm.backbone.token_embedding.embeddings.numpy()
    token = int(np.argmax(beta @ table.T))
    with kt.edit(lm, {"transformer_layer_1": kt.edits.Zero()}):
        zeroed = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(zeroed[0, 4:], token)
    np.testing.assert_array_equal(zeroed[0, :4], [3, 9, 4, 1])
    after = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(after, before)
    assert lm.generate_function is None or not np.array_equal(zeroed, after)
    _clean(lm)


def test_steer_transformer_example(tmp_path):
    pytest.importorskip("keras_hub")
    example = _load_example("steer_transformer.py")
    result = example.main(str(tmp_path), num_layers=2)
    assert not np.array_equal(result["plain"], result["steered"])
    restored = result["restored"]
    assert list(restored) == ["transformer_layer_0", "transformer_layer_1"]
    assert all(np.isfinite(v) for v in restored.values())
    # The corrupted token patched in after the last block cannot reach the
    # last position any more: nothing is restored.
    assert restored["transformer_layer_1"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "patching.png").stat().st_size > 0


def test_docstring_examples_run():
    import doctest

    from keras_tap.taps import edit, edits

    for module in (edit, edits):
        results = doctest.testmod(module)
        assert results.attempted and not results.failed, module.__name__
