"""Trials: two keras-io examples redone with keras_tap, on every backend.

- "Knowledge Distillation" (examples/vision/knowledge_distillation.py): a
  student trained on `alpha * CE + (1 - alpha) * T^2 KL(softmax(t/T) ||
  softmax(s/T))`, and feature distillation (FitNets hints through an
  adapter, cosine, attention transfer, NST) with `sample_weight` and a
  schedule for the tap weight. Each `fit` step is checked against a
  hand-written single-pass step (`value_and_grad`: GradientTape,
  `jax.value_and_grad`, torch autograd) and, for logits, against
  `keras.distillation.Distiller`.
- "Neural style transfer" (examples/generative/neural_style_transfer.py):
  a frozen VGG19 (weights=None, 32x32) as a `kt.FeatureModel`, Gram matrix
  style loss checked against NumPy, gradients with respect to the image
  against plain Keras, under the backend's compiler, and a perceptual-loss
  training step through a nested frozen VGG19.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND, grad_at, to_numpy, value_and_grad
from keras import ops

import keras_tap as kt

T, ALPHA, LR = 3.0, 0.1, 0.1


@keras.saving.register_keras_serializable(package="keras_tap_trials")
class SoftKL(keras.losses.Loss):
    """keras-io's distillation term: `T^2 KL(softmax(t/T) || softmax(s/T))`
    per sample, as a tap loss called `loss(teacher_logits, logits)`."""

    def __init__(self, temperature=T, name="soft_kl", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = temperature

    def call(self, y_true, y_pred):
        t = ops.softmax(y_true / self.temperature, axis=-1)
        log_s = ops.log_softmax(y_pred / self.temperature, axis=-1)
        log_t = ops.log(ops.maximum(t, 1e-12))
        return ops.sum(t * (log_t - log_s), -1) * self.temperature**2

    def get_config(self):
        return {"temperature": self.temperature, **super().get_config()}


def cnn(width, name, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(width, 3, activation="relu", name=f"{name}_c1"),
            keras.layers.Conv2D(width, 3, activation="relu", name=f"{name}_c2"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, name=f"{name}_logits"),
        ],
        name=name,
    )


RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 8, 8, 1)).astype("float32")
Y = RNG.integers(0, 10, size=(16,))
SW = RNG.uniform(0.2, 1.5, size=(16,)).astype("float32")
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def submodel(model, layer):
    """Plain Keras: the model up to `layer` (a Sequential's layers)."""
    layers = []
    for each in model.layers:
        layers.append(each)
        if each.name == layer:
            break
    return keras.Sequential([keras.Input((8, 8, 1)), *layers])


def sgd_reference(loss_fn, variables, lr=LR):
    value, grads = value_and_grad(loss_fn, variables)
    new = [to_numpy(v) - lr * g for v, g in zip(variables, grads)]
    return float(value), new


def assert_weights(variables, expected):
    for v, e in zip(variables, expected):
        np.testing.assert_allclose(to_numpy(v), e, rtol=1e-4, atol=1e-5)


# -- 1. knowledge distillation ----------------------------------------------


def kd_reference(student, teacher, sample_weight=None):
    """One SGD step of keras-io's `Distiller.compute_loss`, written out."""
    teacher_logits = ops.convert_to_tensor(to_numpy(teacher(X)))
    sw = None if sample_weight is None else ops.convert_to_tensor(sample_weight)

    def loss():
        logits = student(X, training=True)
        ce = keras.losses.sparse_categorical_crossentropy(
            Y, logits, from_logits=True
        )
        kd = SoftKL().call(teacher_logits, logits)
        if sw is not None:
            ce, kd = ce * sw, kd * sw
        return ALPHA * ops.mean(ce) + (1 - ALPHA) * ops.mean(kd)

    return sgd_reference(loss, student.trainable_variables)


def soft_kl_function(t, s):
    return SoftKL().call(t, s)


@pytest.mark.parametrize("loss", ["logits_kl", "class", "function"])
@pytest.mark.parametrize("weighted", [False, True])
def test_logits_distillation_matches_the_keras_io_step(loss, weighted):
    student, teacher = cnn(4, "s", 1), cnn(8, "t", 2)
    sample_weight = SW if weighted else None
    value, expected = kd_reference(student, teacher, sample_weight)
    tap_loss = {
        "logits_kl": kt.losses.LogitsKL(temperature=T),
        "class": SoftKL(),
        "function": soft_kl_function,
    }[loss]
    taps = {
        "kd": kt.Tap(
            "s_logits", teacher="t_logits", loss=tap_loss, weight=1 - ALPHA
        )
    }
    tap_model = kt.TapModel(student, taps, teacher=teacher)
    # alpha on the student loss: Keras's own `loss_weights`.
    tap_model.compile(keras.optimizers.SGD(LR), CE, loss_weights=ALPHA)
    history = tap_model.fit(
        X,
        Y,
        sample_weight=sample_weight,
        batch_size=16,
        verbose=0,
        shuffle=False,
    )
    assert_weights(student.trainable_variables, expected)
    np.testing.assert_allclose(history.history["loss"][0], value, rtol=1e-4)


def test_logits_distillation_equals_keras_distiller():
    """`keras.distillation.Distiller` with `LogitsDistillation` (given a
    `KLDivergence` instance) and the TapModel train the same weights."""
    student, teacher = cnn(4, "s", 1), cnn(8, "t", 2)
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=T, loss=keras.losses.KLDivergence()
        ),
        student_loss_weight=ALPHA,
    )
    distiller.compile(optimizer=keras.optimizers.SGD(LR), loss=CE)
    distiller.fit(X, Y, batch_size=16, verbose=0, shuffle=False)

    student2, teacher2 = cnn(4, "s", 1), cnn(8, "t", 2)
    taps = {
        "kd": kt.Tap(
            "s_logits", teacher="t_logits", loss=SoftKL(), weight=1 - ALPHA
        )
    }
    tap_model = kt.TapModel(student2, taps, teacher=teacher2)
    tap_model.compile(keras.optimizers.SGD(LR), CE, loss_weights=ALPHA)
    tap_model.fit(X, Y, batch_size=16, verbose=0, shuffle=False)
    assert_weights(
        student2.trainable_variables,
        [to_numpy(v) for v in student.trainable_variables],
    )


def test_logits_distillation_saves_and_evaluates(tmp_path):
    student, teacher = cnn(4, "s", 1), cnn(8, "t", 2)
    taps = {"kd": kt.Tap("s_logits", teacher="t_logits", loss=SoftKL(5.0))}
    tap_model = kt.TapModel(student, taps, teacher=teacher)
    tap_model.compile("adam", CE)
    tap_model.fit(X, Y, batch_size=8, verbose=0, validation_data=(X, Y))
    logged = tap_model.evaluate(X, Y, verbose=0, return_dict=True)
    path = str(tmp_path / "kd.keras")
    tap_model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.taps["kd"].loss.temperature == 5.0
    again = loaded.evaluate(X, Y, verbose=0, return_dict=True)
    np.testing.assert_allclose(again["kd_loss"], logged["kd_loss"], rtol=1e-5)


def logits_kl_numpy(t, s, temperature):
    def log_softmax(z):
        z = np.asarray(z, np.float64) / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(t), log_softmax(s)
    return temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q), -1)


def test_logits_kl_against_numpy():
    rng = np.random.default_rng(3)
    t, s = rng.normal(size=(2, 6, 10)) * 4
    w = rng.uniform(0.1, 2.0, size=(6,))
    for temperature in (1.0, 3.0, 10.0):
        loss = kt.losses.get(
            {"class_name": "LogitsKL", "config": {"temperature": temperature}}
        )
        per = logits_kl_numpy(t, s, temperature)
        np.testing.assert_allclose(
            to_numpy(loss(t, s)), np.mean(per), rtol=1e-5
        )
        np.testing.assert_allclose(
            to_numpy(loss(t, s, sample_weight=w)),
            np.mean(per * w),
            rtol=1e-5,
        )
        # Keras's KLDivergence on the softened probabilities, times T^2.
        soft = [keras.ops.softmax(v / temperature, -1) for v in (t, s)]
        keras_kl = keras.losses.KLDivergence()(*soft)
        np.testing.assert_allclose(
            to_numpy(loss(t, s)),
            temperature**2 * to_numpy(keras_kl),
            rtol=1e-4,
        )
    again = kt.losses.LogitsKL.from_config(kt.losses.LogitsKL(2.5).get_config())
    assert again.temperature == 2.5
    assert isinstance(kt.losses.get("logits_kl"), kt.losses.LogitsKL)
    with pytest.raises(ValueError, match="temperature"):
        kt.losses.LogitsKL(temperature=0.0)


def feature_reference(
    student, teacher, adapter, per_sample, weights, sample_weight=None
):
    """Consecutive hand-written SGD steps (one per entry of `weights`, the
    tap weight at that step) on CE + w * mean(per_sample(adapter(s), t))."""
    t_feat = ops.convert_to_tensor(to_numpy(submodel(teacher, "t_c2")(X)))
    s_feat = submodel(student, "s_c2")
    sw = None if sample_weight is None else ops.convert_to_tensor(sample_weight)
    variables = student.trainable_variables + adapter.trainable_variables
    values = []
    for w in weights:

        def loss(w=w):
            logits = student(X, training=True)
            ce = keras.losses.sparse_categorical_crossentropy(
                Y, logits, from_logits=True
            )
            per = per_sample(adapter(s_feat(X)), t_feat)
            if sw is not None:
                ce, per = ce * sw, per * sw
            return ops.mean(ce) + w * ops.mean(per)

        value, new = sgd_reference(loss, variables)
        values.append(value)
        for v, n in zip(variables, new):
            v.assign(n)
    return values, [to_numpy(v) for v in variables]


def mse_per_sample(s, t):
    return ops.mean(ops.square(s - t), axis=(1, 2, 3))


def cosine_per_sample(s, t):
    s, t = ops.reshape(s, (16, -1)), ops.reshape(t, (16, -1))
    dot = ops.sum(s * t, -1)
    return 1.0 - dot / (ops.norm(s, axis=-1) * ops.norm(t, axis=-1))


def adapter_layer():
    keras.utils.set_random_seed(3)
    layer = keras.layers.Conv2D(8, 1, name="adapter")
    layer.build((None, 4, 4, 4))
    return layer


@pytest.mark.parametrize(
    "loss,per_sample",
    [
        (kt.losses.FeatureMSE(), mse_per_sample),
        (kt.losses.CosineFeature(), cosine_per_sample),
    ],
    ids=["feature_mse", "cosine"],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_feature_distillation_through_an_adapter(loss, per_sample, weighted):
    """A 4-wide student hinted by an 8-wide teacher through a 1x1 conv
    adapter, the tap weight warming up over two steps."""
    sample_weight = SW if weighted else None
    schedule = kt.schedules.LinearWarmup(0.2, 1.0, steps=4)
    weights = [float(to_numpy(schedule(s))) for s in (0, 1)]
    assert weights[0] != weights[1]
    ref_student, ref_teacher = cnn(4, "s", 1), cnn(8, "t", 2)
    values, expected = feature_reference(
        ref_student,
        ref_teacher,
        adapter_layer(),
        per_sample,
        weights,
        sample_weight,
    )

    student, teacher, adapter = cnn(4, "s", 1), cnn(8, "t", 2), adapter_layer()
    taps = {
        "hint": kt.Tap(
            "s_c2", teacher="t_c2", loss=loss, weight=schedule, adapter=adapter
        )
    }
    tap_model = kt.TapModel(student, taps, teacher=teacher)
    tap_model.compile(keras.optimizers.SGD(LR), CE)
    history = tap_model.fit(
        X,
        Y,
        sample_weight=sample_weight,
        batch_size=16,
        epochs=2,
        verbose=0,
        shuffle=False,
    )
    assert_weights(
        student.trainable_variables + adapter.trainable_variables, expected
    )
    np.testing.assert_allclose(history.history["loss"], values, rtol=1e-4)
    teacher_ids = {id(v) for v in teacher.weights}
    assert not any(id(v) in teacher_ids for v in tap_model.trainable_weights)


def attention_numpy(a):
    q = np.sum(np.asarray(a, np.float64) ** 2, axis=-1).reshape(len(a), -1)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def test_attention_transfer_across_widths_matches_numpy():
    student, teacher = cnn(4, "s", 1), cnn(8, "t", 2)
    s = to_numpy(submodel(student, "s_c2")(X))
    t = to_numpy(submodel(teacher, "t_c2")(X))
    per = np.linalg.norm(attention_numpy(s) - attention_numpy(t), axis=-1)
    logits = to_numpy(student(X))
    ce = to_numpy(
        keras.losses.sparse_categorical_crossentropy(
            Y, logits, from_logits=True
        )
    )
    taps = {
        "at": kt.Tap(
            "s_c2",
            teacher="t_c2",
            loss=kt.losses.AttentionTransfer(),
            weight=0.5,
        )
    }
    tap_model = kt.TapModel(student, taps, teacher=teacher)
    tap_model.compile(keras.optimizers.SGD(LR), CE)
    history = tap_model.fit(X, Y, sample_weight=SW, batch_size=16, verbose=0)
    np.testing.assert_allclose(
        history.history["at_loss"][0], np.mean(per * SW), rtol=1e-4
    )
    np.testing.assert_allclose(
        history.history["loss"][0],
        np.mean(ce * SW) + 0.5 * np.mean(per * SW),
        rtol=1e-4,
    )


def test_gram_matrix_across_widths_asks_for_an_adapter():
    student, teacher = cnn(4, "s", 1), cnn(8, "t", 2)
    taps = {"g": kt.Tap("s_c2", teacher="t_c2", loss=kt.losses.GramMatrix())}
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 8\).*adapter"):
        kt.TapModel(student, taps, teacher=teacher)


# -- 2. neural style transfer / perceptual loss ------------------------------

STYLE = ["block1_conv1", "block2_conv1", "block3_conv1"]
CONTENT = "block3_conv2"
IMAGES = np.random.default_rng(1).uniform(0, 1, (3, 1, 32, 32, 3))
BASE, STYLE_IMAGE, COMBINATION = IMAGES.astype("float32")


@pytest.fixture(scope="module")
def vgg():
    keras.utils.set_random_seed(0)
    return keras.applications.VGG19(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )


def gram_numpy(f):
    f = np.asarray(f, np.float64).reshape(-1, f.shape[-1])
    return f.T @ f


def gram_ops(f):
    f = ops.reshape(f, (-1, f.shape[-1]))
    return ops.matmul(ops.transpose(f), f)


def test_gram_matrix_loss_against_numpy_and_keras_io(vgg):
    features = kt.FeatureModel(vgg, STYLE)
    style = to_numpy(features(STYLE_IMAGE))
    combination = to_numpy(features(COMBINATION))
    for name in STYLE:
        s, c = style[name], combination[name]
        n, channels = s.shape[1] * s.shape[2], s.shape[3]
        diff = gram_numpy(c[0]) - gram_numpy(s[0])
        value = float(to_numpy(kt.losses.GramMatrix()(s, c)))
        np.testing.assert_allclose(
            value, np.mean((diff / (n * channels)) ** 2), rtol=1e-4
        )
        # keras-io's style_loss (its `channels = 3`), rescaled.
        keras_io = np.sum(diff**2) / (4.0 * 3**2 * n**2)
        np.testing.assert_allclose(
            value, keras_io * 36 / channels**4, rtol=1e-4
        )


def style_transfer_losses(vgg):
    """keras-io's content + style loss, with keras_tap and by hand."""
    features = kt.FeatureModel(vgg, STYLE + [CONTENT])
    style = {
        k: ops.convert_to_tensor(v)
        for k, v in to_numpy(features(STYLE_IMAGE)).items()
    }
    content = ops.convert_to_tensor(to_numpy(features(BASE))[CONTENT])
    gram = kt.losses.GramMatrix()

    def with_tap(image):
        f = features(image)
        loss = 2.5e-2 * ops.sum(ops.square(f[CONTENT] - content))
        for k in STYLE:
            loss = loss + gram(style[k], f[k]) / len(STYLE)
        return loss

    plain = keras.Model(
        vgg.inputs, {k: vgg.get_layer(k).output for k in STYLE + [CONTENT]}
    )

    def by_hand(image):
        f = plain(image)
        loss = 2.5e-2 * ops.sum(ops.square(f[CONTENT] - content))
        for k in STYLE:
            n, channels = f[k].shape[1] * f[k].shape[2], f[k].shape[3]
            diff = gram_ops(f[k][0]) - gram_ops(style[k][0])
            loss = loss + ops.mean(ops.square(diff / (n * channels))) / len(
                STYLE
            )
        return loss

    return features, with_tap, by_hand


def test_style_transfer_gradient_with_respect_to_the_image(vgg):
    features, with_tap, by_hand = style_transfer_losses(vgg)
    assert features.count_params() < vgg.count_params() / 10
    value, grad = grad_at(with_tap, COMBINATION)
    ref_value, ref_grad = grad_at(by_hand, COMBINATION)
    assert np.abs(ref_grad).max() > 0
    np.testing.assert_allclose(value, ref_value, rtol=1e-4)
    np.testing.assert_allclose(
        grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max()
    )


def test_style_transfer_gradient_compiled(vgg):
    """The image gradient under the backend's compiler: `jax.jit` over
    `stateless_call`, `tf.function(jit_compile=True)`; torch eager."""
    features, with_tap, by_hand = style_transfer_losses(vgg)
    ref_value, ref_grad = grad_at(by_hand, COMBINATION)
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in features.trainable_variables]
        frozen = [v.value for v in features.non_trainable_variables]

        def pure(image):
            with keras.StatelessScope(
                state_mapping=list(
                    zip(
                        features.trainable_variables
                        + features.non_trainable_variables,
                        trainable + frozen,
                    )
                )
            ):
                return with_tap(image)

        value, grad = jax.jit(jax.value_and_grad(pure))(COMBINATION)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(image):
            with tf.GradientTape() as tape:
                tape.watch(image)
                loss = with_tap(image)
            return loss, tape.gradient(loss, image)

        value, grad = step(tf.constant(COMBINATION))
    else:
        value, grad = grad_at(with_tap, COMBINATION)
    np.testing.assert_allclose(to_numpy(value), ref_value, rtol=1e-4)
    np.testing.assert_allclose(
        to_numpy(grad),
        ref_grad,
        rtol=1e-4,
        atol=1e-5 * np.abs(ref_grad).max(),
    )


def test_tap_model_taps_give_the_same_image_gradient(vgg):
    tap_model = kt.TapModel(vgg, STYLE)
    plain = keras.Model(vgg.inputs, [vgg.get_layer(k).output for k in STYLE])
    gram = kt.losses.GramMatrix()

    def with_tap(image):
        _, taps = tap_model(image)
        return sum(gram(ops.zeros_like(taps[k]), taps[k]) for k in STYLE)

    def by_hand(image):
        return sum(gram(ops.zeros_like(f), f) for f in plain(image))

    value, grad = grad_at(with_tap, COMBINATION)
    ref_value, ref_grad = grad_at(by_hand, COMBINATION)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4)
    np.testing.assert_allclose(
        grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max()
    )


def test_perceptual_training_through_a_nested_frozen_vgg(vgg):
    """A transform net trained on Gram losses at taps inside a frozen VGG19
    nested in a Sequential, style targets from a FeatureModel as data."""
    keras.utils.set_random_seed(1)
    net = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(3, 3, padding="same", name="tconv"),
        ],
        name="transform",
    )
    vgg.trainable = False
    try:
        full = keras.Sequential([keras.Input((32, 32, 3)), net, vgg])
        x = np.random.default_rng(2).uniform(0, 1, (4, 32, 32, 3))
        x = x.astype("float32")
        targets = {
            k: np.repeat(v, 4, axis=0)
            for k, v in to_numpy(
                kt.FeatureModel(vgg, STYLE)(STYLE_IMAGE)
            ).items()
        }
        scale = 1e6  # the Gram losses of an untrained VGG are ~1e-8
        taps = {
            k: kt.Tap(f"vgg19/{k}", loss=kt.losses.GramMatrix(), weight=scale)
            for k in STYLE
        }
        tap_model = kt.TapModel(full, taps)
        tap_model.compile(keras.optimizers.SGD(1e-2), loss=None)
        assert len(tap_model.trainable_weights) == 2

        plain = keras.Model(
            vgg.inputs, [vgg.get_layer(k).output for k in STYLE]
        )
        gram = kt.losses.GramMatrix()

        def loss():
            feats = plain(net(x))
            return scale * sum(
                gram(targets[k], f) for k, f in zip(STYLE, feats)
            )

        variables = net.trainable_variables
        value, expected = sgd_reference(loss, variables, lr=1e-2)
        before = [to_numpy(v) for v in variables]
        history = tap_model.fit(x, targets, batch_size=4, verbose=0)
        for v, b, e in zip(variables, before, expected):
            step, ref_step = to_numpy(v) - b, e - b
            assert np.abs(ref_step).max() > 1e-5
            np.testing.assert_allclose(
                step, ref_step, rtol=1e-3, atol=1e-4 * np.abs(ref_step).max()
            )
        np.testing.assert_allclose(history.history["loss"][0], value, rtol=1e-4)
    finally:
        vgg.trainable = True
