"""`TapModel`: a model's predictions and intermediate outputs, one pass."""

import keras
from keras import ops

from keras_tap.inspect.statistics import StatisticsMixin
from keras_tap.taps import edit, forward, paths
from keras_tap.taps.tap import Tap, resolve_taps
from keras_tap.training import trainers
from keras_tap.training.step import check_teacher_shape
from keras_tap.training.trainer import Trainer

PREDICTIONS = "predictions"


def _output_names(model):
    names = getattr(model, "output_names", None) or []
    return [n for n in names if isinstance(n, str)]


@keras.saving.register_keras_serializable(package="keras_tap")
class TapModel(StatisticsMixin, Trainer, keras.Model):
    """A Keras model that returns `(predictions, taps)` from one pass.

    The wrapper shares layers and weights with `model` (nothing is copied);
    `tap_model.base is model`, which stays usable on its own: to deploy,
    save or export `tap_model.base`.

    Args:
        model: a built Keras model: Functional, Sequential (with or without
            an `Input`), with models nested at any depth, or subclassed.
        taps: a layer path, a list of them, or a dict
            `{tap_name: path_or_Tap}`. Paths are layer names, `/`-separated
            paths into nested models, `name@i` for one call of a shared
            layer, or `re:pattern`. `kt.list_layers(model)` lists them.
        teacher: an optional built Keras model whose layers `Tap(...,
            teacher="path")` take their targets from (run in the same step,
            `training=False`, no gradient; its weights never change).
        name: the model's name.

    Raises:
        TypeError: when `model` is not a Keras model.
        ValueError: for a path that matches nothing (with the closest
            paths), an ambiguous shared layer, an empty tap list or a tap
            named `predictions` or like one of the model's outputs.

    Example:

    >>> import keras, numpy as np, keras_tap as kt
    >>> inputs = keras.Input((4,))
    >>> hidden = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    >>> preds, taps = kt.TapModel(model, "hidden")(np.ones((3, 4)))
    >>> tuple(taps["hidden"].shape)
    (3, 8)
    """

    def __init__(self, model, taps, *, teacher=None, name=None, **kwargs):
        trainers.get()
        paths.check_model(model)
        if teacher is not None:
            paths.check_model(teacher)
        super().__init__(name=name or f"tap_{model.name}", **kwargs)
        self.base = model
        edit.track(self, model)
        index = paths.LayerIndex(model)
        entries = self._resolve_taps(index, taps)
        self._tap_specs = [(n, t, p) for n, t, p in entries]
        self.tap_names = [n for n, _, _ in entries]
        self.taps = {n: t for n, t, _ in entries}
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_extractors", {})
        self.teacher = teacher
        self._teacher_points = self._resolve_teacher(teacher)
        object.__setattr__(self, "_forward", self._build_forward(index))
        object.__setattr__(
            self, "_teacher_forward", self._build_teacher_forward()
        )
        self.adapters = [t.adapter for _, t, _ in entries if t.adapter]
        self._build_adapters()
        self.init_trainer()
        self.init_statistics()
        # The base, the teacher and the adapters are built: without this,
        # Keras's JAX `predict` would run a build pass before the first.
        self.built = True

    def tap_shapes(self):
        """`{tap_name: output shape}` (batch axis `None`)."""
        return {
            n: paths.batch_free(p.shape) for n, _, p in self._tap_specs
        }

    # -- resolution --------------------------------------------------------

    def _resolve_taps(self, index, taps):
        return resolve_taps(
            index, taps, reserved={PREDICTIONS, *_output_names(self.base)}
        )

    def _resolve_teacher(self, teacher):
        wanted = [(n, t) for n, t, _ in self._tap_specs if t.teacher]
        if wanted and teacher is None:
            raise ValueError(
                f"Tap {wanted[0][0]!r} takes its target from "
                f"teacher={wanted[0][1].teacher_path!r}, but the TapModel "
                "has no teacher: pass `kt.TapModel(model, taps, "
                "teacher=teacher)`."
            )
        if teacher is None:
            return []
        # The teacher is frozen inside the step (`Trainer.trainable_weights`
        # leaves its weights out); the user's object is left as it was.
        index = paths.LayerIndex(teacher)
        object.__setattr__(self, "_teacher_index", index)
        points, resolved = [], {}
        for tap_name, tap in wanted:
            (_, point), *rest = index.resolve(tap.teacher)
            if rest:
                raise ValueError(
                    f"Tap {tap_name!r}: teacher path {tap.teacher_path!r} "
                    "matches several layers; name exactly one."
                )
            # As written; a Layer as a path that resolves in any process.
            address = index.stable_address(point)
            if isinstance(tap.teacher, str):
                address = tap.teacher
            resolved[tap_name] = tap.with_teacher(address)
            points.append((tap_name, point))
        # A `Layer` given as `teacher=` is kept as its path (serialized).
        self._tap_specs = [
            (n, resolved.get(n, t), p) for n, t, p in self._tap_specs
        ]
        self.taps = {n: t for n, t, _ in self._tap_specs}
        return points

    # -- forward -----------------------------------------------------------

    def _build_forward(self, index):
        points = [p for _, _, p in self._tap_specs]
        return forward.build(index, points, self.tap_names)

    def _build_teacher_forward(self):
        if not self._teacher_points:
            return None
        names = [n for n, _ in self._teacher_points]
        points = [p for _, p in self._teacher_points]
        # A graph teacher runs only the layers its tapped points need; a
        # watched teacher runs whole, once per step.
        return forward.build(
            self._teacher_index, points, names, outputs=False
        )

    def _build_adapters(self):
        teacher_shapes = {n: p.shape for n, p in self._teacher_points}
        for tap_name, tap, point in self._tap_specs:
            shape = point.shape
            if tap.adapter is not None:
                spec = keras.KerasTensor(
                    (None,) + tuple(shape[1:]),
                    dtype=getattr(point.tensor, "dtype", "float32"),
                )
                shape = tuple(tap.adapter(spec).shape)
            if tap_name in teacher_shapes:
                check_teacher_shape(
                    tap_name, tap, shape[1:], teacher_shapes[tap_name][1:]
                )

    def call(self, inputs, training=None):
        # The forward pass runs here, in the calling context: a watched
        # run then records the calls of this thread (or replica) alone.
        return self._forward(inputs, training=training)

    def teacher_taps(self, inputs):
        """The teacher's tapped outputs for `inputs` (no gradient)."""
        if self._teacher_forward is None:
            return {}
        with trainers.get().no_gradient():
            _, values = self._teacher_forward(inputs, training=False)
        return {n: ops.stop_gradient(v) for n, v in values.items()}

    # -- gradients -------------------------------------------------------------

    def gradients(self, x, target=None, taps=None):
        """Predictions, taps and the target's gradients at the taps.

        One forward and one backward pass (inference mode): the target,
        summed over the batch, is differentiated with respect to each
        tapped activation, as a zero added at that point while the model
        runs: the same on every backend, and for a point such as
        `"b:input"` the gradient through `b` alone (tap the layer that
        computes the tensor for its gradient through every reader).

        Args:
            x: a batch of inputs.
            target: `None` (each sample's top predicted score), an integer
                class index (last axis of the predictions), or a callable
                `predictions -> per-sample scores`.
            taps: names of this model's taps or further layer paths
                (default: all taps).

        Returns:
            `(predictions, taps, grads)`: `taps` and `grads` are dicts
            `{tap_name: tensor}`; `grads[name]` has the shape of
            `taps[name]` (zeros where the target does not depend on it).

        Raises:
            ValueError: for an out-of-range class index, an integer or
                `None` target on a model with several outputs, or a path
                that matches nothing.

        Example:

        >>> import keras, numpy as np, keras_tap as kt
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="hidden")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
        >>> _, taps, grads = kt.TapModel(model, "hidden").gradients(
        ...     np.ones((3, 4)), target=1)
        >>> tuple(grads["hidden"].shape)
        (3, 8)
        """
        from keras_tap.taps import attribution

        return attribution.gradients(self, x, target=target, taps=taps)

    # -- extraction ------------------------------------------------------------

    def extract(
        self,
        data,
        *,
        taps=None,
        batch_size=32,
        reduce=None,
        to=None,
        verbose="auto",
    ):
        """Compute tapped activations for a whole data set.

        Only the part of the model the requested taps need is run (graph
        models stop after the deepest requested layer), and the extractor is
        built once per tap set and reused across calls.

        Args:
            data: a NumPy array (or a structure of them), a `tf.data.Dataset`
                of batches, a `keras.utils.PyDataset`, or a generator or torch
                `DataLoader` of batches (a tuple or list batch is read as
                `(x, y[, sample_weight])`, as Keras's `predict` reads it); a
                `y` in the data is ignored.
            batch_size: batch size for NumPy data (`None`: 32).
            taps: names of this model's taps or further layer paths
                (default: all taps).
            reduce: `None`, `"mean"` or `"max"` (pool every axis except the
                batch and channel axes, inside the graph), or a callable
                applied to each batched tensor.
            to: a `.npz` path to stream the results into, batch by batch, so
                memory does not grow with the number of samples.
            verbose: `0` hides the progress bar.

        Returns:
            `{tap_name: np.ndarray}`, or the path written when `to` is set.
        """
        from keras_tap.taps import extract as extract_lib

        return extract_lib.extract(
            self,
            data,
            taps=taps,
            batch_size=batch_size,
            reduce=reduce,
            to=to,
            verbose=verbose,
        )

    # -- serialization ---------------------------------------------------------

    def get_config(self):
        teacher = self.teacher
        return {
            "model": keras.saving.serialize_keras_object(self.base),
            "taps": {n: t.get_config() for n, t, _ in self._tap_specs},
            "teacher": (
                None
                if teacher is None
                else keras.saving.serialize_keras_object(teacher)
            ),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        teacher = config.pop("teacher", None)
        if teacher is not None:
            teacher = keras.saving.deserialize_keras_object(
                teacher, custom_objects=custom_objects
            )
        taps = {n: Tap.from_config(c) for n, c in config.pop("taps").items()}
        return cls(model, taps, teacher=teacher, **config)
