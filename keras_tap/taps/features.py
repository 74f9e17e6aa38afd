"""`FeatureModel`: a model that returns chosen intermediate outputs only."""

import keras

from keras_tap.taps import edit, forward, paths
from keras_tap.taps.tap import resolve_taps


@keras.saving.register_keras_serializable(package="keras_tap")
class FeatureModel(keras.Model):
    """A Keras model that returns `{tap_name: tensor}` and nothing else.

    Like timm's `features_only` and torchvision's
    `create_feature_extractor`: the features of a backbone, as a model to
    train, to call inside another model (a decoder over several taps) or to
    save. The layers are `model`'s own (weights are shared, not copied).

    For a graph model (Functional or Sequential, nested models included) it
    holds only the layers the taps depend on: its `count_params()` is theirs
    and nothing after the deepest tap runs. A subclassed model runs as it is
    and stops after the last tapped call.

    Args:
        model: a built Keras model.
        taps: a layer path, a list of them, or a dict
            `{tap_name: path}`, in the forms `kt.TapModel` accepts (`name@i`,
            `/`-separated nested paths, `re:pattern`, a `Layer` object).
        name: the model's name (default `features_<model name>`).
        **kwargs: passed on to `keras.Model`.

    Attributes:
        base: `model`.
        tap_names: the names of the outputs, in declaration order.
        network: the Keras model that runs: a pruned Functional model over
            the layers the taps need (graph models), or `model` itself.

    Raises:
        TypeError: when `model` is not a Keras model.
        ValueError: for a path that matches nothing (with the closest
            paths), an ambiguous shared layer, an empty tap list or a tap
            name used twice.

    Example:

    >>> import keras, numpy as np, keras_tap as kt
    >>> inputs = keras.Input((4,))
    >>> hidden = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    >>> features = kt.FeatureModel(model, "hidden")
    >>> tuple(features(np.ones((3, 4)))["hidden"].shape)
    (3, 8)
    >>> features.count_params()
    40
    """

    def __init__(self, model, taps, *, name=None, **kwargs):
        paths.check_model(model)
        super().__init__(name=name or f"features_{model.name}", **kwargs)
        index = paths.LayerIndex(model)
        entries = resolve_taps(index, taps)
        self.tap_names = [n for n, _, _ in entries]
        addresses = {n: t.layer for n, t, _ in entries}
        object.__setattr__(self, "_addresses", addresses)
        object.__setattr__(self, "_base", model)
        edit.track(self, model)
        points = [p for _, _, p in entries]
        run = forward.build(
            index, points, self.tap_names, outputs=False, stop_early=True
        )
        object.__setattr__(self, "_forward", run)
        # Track only what runs: the pruned graph's layers, or the model.
        self.network = run.model
        self.built = True  # `model` is built: so is every layer in use.

    @property
    def base(self):
        return self._base

    def call(self, inputs, training=None):
        _, values = self._forward(inputs, training=training)
        return values

    def get_config(self):
        model = keras.saving.serialize_keras_object(self._base)
        if isinstance(model, dict):
            # How the base was compiled does not matter to its features.
            model.pop("compile_config", None)
        return {
            "model": model,
            "taps": dict(self._addresses),
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model, config.pop("taps"), **config)
