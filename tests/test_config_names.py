"""Near-miss names in a config: the suggestion is written as the user
wrote the name (a lower-case identifier or a class name), and unknown
arguments of a Keras serialization name the closest argument."""

from pathlib import Path

import keras
import pytest
import yaml

from keras_tap.runs import config, sources
from keras_tap.runs.checks import known_names
from keras_tap.runs.config import ConfigError

DIGITS = Path(__file__).resolve().parents[1] / "examples/configs/digits.yaml"


def error_of(*overrides):
    """The one-line `ConfigError` of the digits config with `overrides`."""
    raw = yaml.safe_load(DIGITS.read_text())
    with pytest.raises(ConfigError) as info:
        config.load(raw, [*overrides, "run.dir=/tmp/unused"])
    return str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("compile.metrics=[acurracy]",
         "compile.metrics[0]: unknown metric 'acurracy'; did you mean "
         "'accuracy'?"),
        ("compile.metrics=[Acurracy]",
         "compile.metrics[0]: unknown metric 'Acurracy'; did you mean "
         "'Accuracy'?"),
        ("compile.metrics=[accuracy, sparse_categorical_acuracy]",
         "compile.metrics[1]: unknown metric 'sparse_categorical_acuracy'; "
         "did you mean 'sparse_categorical_accuracy'?"),
        ("compile.metrics=[f1_scor]",
         "compile.metrics[0]: unknown metric 'f1_scor'; did you mean "
         "'f1_score'?"),
        ("compile.metrics=[{class_name: SparseCategoricalAcuracy}]",
         "compile.metrics[0]: unknown metric 'SparseCategoricalAcuracy'; "
         "did you mean 'SparseCategoricalAccuracy'?"),
        ("taps.early_head.metrics=[acurracy]",
         "taps.early_head.metrics[0]: unknown metric 'acurracy'; did you "
         "mean 'accuracy'?"),
        ("taps.early_head.metrics=[Acurracy]",
         "taps.early_head.metrics[0]: unknown metric 'Acurracy'; did you "
         "mean 'Accuracy'?"),
        ("compile.optimizer=adamm",
         "compile.optimizer: unknown optimizer 'adamm'; did you mean "
         "'adam'?"),
        ("compile.optimizer=Adamm",
         "compile.optimizer: unknown optimizer 'Adamm'; did you mean "
         "'Adam'?"),
        ("compile.loss={class_name: sparse_categorical_crossentropyy}",
         "compile.loss: unknown loss 'sparse_categorical_crossentropyy'; "
         "did you mean 'sparse_categorical_crossentropy'?"),
        ("compile.loss={class_name: SparseCategoricalCrossentropyy}",
         "compile.loss: unknown loss 'SparseCategoricalCrossentropyy'; did "
         "you mean 'SparseCategoricalCrossentropy'?"),
    ],
)  # fmt: skip
def test_a_near_miss_is_suggested_in_the_form_written(override, message):
    assert error_of(override) == message


@pytest.mark.parametrize(
    "where, name, close, other",
    [
        ("compile.loss", "sparse_categorical_crossentropyy",
         "'sparse_categorical_crossentropy'", "SparseCategorical"),
        ("compile.loss", "SparseCategoricalCrossentropyy",
         "'SparseCategoricalCrossentropy'", "'sparse_categorical"),
        ("taps.early_head.loss", "feature_mze", "'feature_mse'",
         "'FeatureMSE'"),
        ("taps.sparse_conv2.regularizer", "ActivityL3", "'ActivityL2'",
         "'activity_l2'"),
    ],
)  # fmt: skip
def test_loss_and_regularizer_lists_keep_the_form(where, name, close, other):
    message = error_of(f"{where}={name}")
    head, _, listed = message.partition("Did you mean [")
    assert head.startswith(f"{where}: Unknown "), message
    listed = listed.split("]")[0]
    assert listed.startswith(close), message
    assert other not in listed, message


def test_lower_case_metric_names_are_ones_keras_takes():
    names = known_names("metric", [keras.metrics])
    assert {"accuracy", "mae", "f1_score", "auc", "r2_score"} <= names
    for name in sorted(n for n in names if n == n.lower()):
        try:
            assert keras.metrics.get(name) is not None, name
        except TypeError:  # Known, but needs arguments (`IoU`, `Metric`).
            pass


@pytest.mark.parametrize(
    "override, message",
    [
        ("compile.optimizer={class_name: Nadam, config: {beta_11: 0.8}}",
         "compile.optimizer.config.beta_11: unknown argument of Nadam; "
         "did you mean 'beta_1'?"),
        ("compile.loss={class_name: CategoricalCrossentropy, "
         "config: {label_smoothin: 0.1}}",
         "compile.loss.config.label_smoothin: unknown argument of "
         "CategoricalCrossentropy; did you mean 'label_smoothing'?"),
    ],
)  # fmt: skip
def test_unknown_argument_of_a_keras_object(override, message):
    assert error_of(override) == message


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"class_name": "Conv2D",
          "config": {"filters": 2, "kernel_size": 3, "kernel_sise": 3}},
         "m.config.kernel_sise: unknown argument of Conv2D; did you mean "
         "'kernel_size'?"),
        ({"class_name": "Dense", "config": {"units": 2, "input_shap": [3]}},
         "m.config.input_shap: unknown argument of Dense; did you mean "
         "'input_shape'?"),
        ({"class_name": "Dense", "config": {"units": 2, "activation": "relux"}},
         "m.config.activation: unknown activation 'relux'; did you mean "
         "'relu'?"),
    ],
)  # fmt: skip
def test_unknown_argument_of_a_layer(layer, message):
    with pytest.raises(ConfigError) as info:
        sources.deserialize_layer(layer, "m")
    assert str(info.value) == message


def test_a_layer_argument_typo_in_a_config_is_named():
    raw = yaml.safe_load(DIGITS.read_text())
    raw["model"]["config"]["layers"][1]["config"]["filterz"] = 3
    cfg = config.load(raw, ["run.dir=/tmp/unused"])
    with pytest.raises(ConfigError) as info:
        sources.build_model(cfg.model, "model")
    assert str(info.value) == (
        "model.config.layers[1].config.filterz: unknown argument of Conv2D; "
        "did you mean 'filters'?"
    )
