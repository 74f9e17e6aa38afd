"""`TapModel`: a model's predictions and intermediate outputs, one pass."""

import keras
from keras import ops

from keras_tap.inspect.statistics import StatisticsMixin
from keras_tap.taps import graph, paths
from keras_tap.taps.tap import Tap, normalize_taps
from keras_tap.training import trainers
from keras_tap.training.step import (
    TargetsMixin,
    check_teacher_shape,
    jit_compiled,
    named_metric,
    optimizer_step,
    regularizer_term,
    tap_loss_value,
)

PREDICTIONS = "predictions"


def _output_names(model):
    names = getattr(model, "output_names", None) or []
    return [n for n in names if isinstance(n, str)]


@keras.saving.register_keras_serializable(package="keras_tap")
class TapModel(StatisticsMixin, TargetsMixin, keras.Model):
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
        metrics = {
            n: [named_metric(m, n) for m in t.metrics] for n, t, _ in entries
        }
        object.__setattr__(self, "_metrics_by_tap", metrics)
        self.tap_metrics = [m for ms in metrics.values() for m in ms]
        self._predictions_loss = keras.metrics.Mean(name="predictions_loss")
        self._tap_loss_trackers = [
            keras.metrics.Mean(name=f"{n}_loss")
            for n, t, _ in entries
            if t.has_terms
        ]
        self.init_statistics()

    def tap_shapes(self):
        """`{tap_name: output shape}` (batch axis `None`)."""
        return {
            n: (None,) + tuple(p.shape[1:]) for n, _, p in self._tap_specs
        }

    # -- resolution --------------------------------------------------------

    def _resolve_taps(self, index, taps):
        reserved = {PREDICTIONS, *_output_names(self.base)}
        entries = []
        for key, tap in normalize_taps(taps):
            matches = index.resolve(tap.layer)
            if len(matches) > 1 and tap.adapter is not None:
                raise ValueError(
                    f"Tap {tap.path!r} expands to {len(matches)} layers but "
                    "has one `adapter`: an adapter's weights cannot serve "
                    "several taps. Give each layer its own Tap."
                )
            for match_name, point in matches:
                calls = index.points[point.path]
                address = point.path if len(calls) == 1 else point.call_name
                if key is None:
                    tap_name = match_name
                elif len(matches) == 1:
                    tap_name = key
                else:
                    tap_name = f"{key}/{match_name}"
                entries.append((tap_name, tap.with_layer(address), point))
        names = [n for n, _, _ in entries]
        for tap_name in names:
            if tap_name in reserved:
                raise ValueError(
                    f"A tap may not be named {tap_name!r}: the name is "
                    f"reserved for the model's predictions ({sorted(reserved)}"
                    "). Use the dict form `taps={'my_name': path}`."
                )
            if names.count(tap_name) > 1:
                raise ValueError(
                    f"The tap name {tap_name!r} is used more than once; tap "
                    "names must be unique."
                )
        return entries

    def _resolve_teacher(self, teacher):
        wanted = [(n, t) for n, t, _ in self._tap_specs if t.teacher]
        if wanted and teacher is None:
            raise ValueError(
                f"Tap {wanted[0][0]!r} takes its target from "
                f"teacher={wanted[0][1].teacher!r}, but the TapModel has no "
                "teacher: pass `kt.TapModel(model, taps, teacher=teacher)`."
            )
        if teacher is None:
            return []
        teacher.trainable = False
        index = paths.LayerIndex(teacher)
        object.__setattr__(self, "_teacher_index", index)
        points = []
        for tap_name, tap in wanted:
            (_, point), *rest = index.resolve(tap.teacher)
            if rest:
                raise ValueError(
                    f"Tap {tap_name!r}: teacher path {tap.teacher!r} matches "
                    "several layers; name exactly one."
                )
            points.append((tap_name, point))
        return points

    # -- forward -----------------------------------------------------------

    def _build_forward(self, index):
        points = [p for _, _, p in self._tap_specs]
        if index.connected(points):
            trace = index.trace
            outputs = keras.tree.flatten(trace.outputs)
            outputs += [p.tensor for p in points]
            return ("graph", keras.Model(trace.inputs, outputs), len(points))
        return ("intercept", self._interceptor(points, self.tap_names))

    def _interceptor(self, points, names, stop_early=False):
        layers, wanted = {}, {}
        for name, point in zip(names, points):
            layers[id(point.layer)] = point.layer
            calls = wanted.setdefault(id(point.layer), {})
            calls.setdefault(point.index, []).append(name)
        return graph.Interceptor(layers, wanted, stop_early=stop_early)

    def _build_teacher_forward(self):
        if not self._teacher_points:
            return None
        names = [n for n, _ in self._teacher_points]
        points = [p for _, p in self._teacher_points]
        index = self._teacher_index
        if index.connected(points):
            tensors = [p.tensor for p in points]
            return ("graph", keras.Model(index.trace.inputs, tensors), names)
        return ("intercept", self._interceptor(points, names), names)

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
        kind = self._forward[0]
        if kind == "graph":
            _, forward, count = self._forward
            outputs = forward(inputs, training=training)
            split = len(outputs) - count
            predictions = keras.tree.pack_sequence_as(
                self._index.trace.outputs, outputs[:split]
            )
            taps = dict(zip(self.tap_names, outputs[split:]))
        else:
            interceptor = self._forward[1]
            with interceptor.watch():
                predictions = self.base(inputs, training=training)
            taps = {n: interceptor.records[n] for n in self.tap_names}
        return predictions, taps

    def teacher_taps(self, inputs):
        """The teacher's tapped outputs for `inputs` (no gradient)."""
        if self._teacher_forward is None:
            return {}
        kind, runner, names = self._teacher_forward
        if kind == "graph":
            outputs = runner(inputs, training=False)
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            values = dict(zip(names, outputs))
        else:
            with runner.watch():
                self.teacher(inputs, training=False)
            values = {n: runner.records[n] for n in names}
        return {n: ops.stop_gradient(v) for n, v in values.items()}

    # -- losses --------------------------------------------------------------

    def compute_tap_losses(
        self, x, y, taps, sample_weight=None, training=False
    ):
        """The unweighted tap terms: each tap's loss plus its regularizer.

        Override this to try a new tap loss; the caller applies each tap's
        weight and the distribution scaling. Values are batch means in
        float32 over this replica's batch, as logged in `<tap>_loss`.

        Args:
            x: the input batch.
            y: the target batch (the prediction target, or the dict form
                `{"predictions": ..., tap_name: ...}`).
            taps: `{tap_name: activation}` from this step's forward pass.
            sample_weight: one array, or a dict keyed like `y`; weights
                each tap's loss and metrics (not its regularizer). In the
                dict form a tap uses its own key, or else the weight of
                `"predictions"`.
            training: whether this is a training step.

        Returns:
            `{tap_name: scalar}` for every tap with a loss or regularizer.

        Example:

        ```python
        class CenteredL2(kt.TapModel):
            def compute_tap_losses(self, x, y, taps, sample_weight=None,
                                   training=False):
                terms = super().compute_tap_losses(
                    x, y, taps, sample_weight, training)
                a = taps["features"]
                terms["features"] = keras.ops.mean(
                    (a - keras.ops.mean(a, axis=0)) ** 2)
                return terms
        ```
        """
        pred_y, tap_y = self.split_targets(y)
        pred_sw, tap_sw = self.split_weights(sample_weight, y)
        teacher = self.teacher_taps(x) if self._teacher_points else {}
        terms = {}
        for tap_name, tap, _ in self._tap_specs:
            if not tap.has_terms and not tap.metrics:
                continue
            activation = taps[tap_name]
            adapted = activation
            if tap.adapter is not None:
                adapted = tap.adapter(activation, training=training)
            weight = tap_sw.get(tap_name, pred_sw)
            target = None
            if tap.loss is not None or tap.metrics:
                if tap.teacher is not None:
                    target = teacher[tap_name]
                elif tap.target == PREDICTIONS:
                    target = pred_y
                else:
                    target = self.data_target(tap_name, y, tap_y)
            for metric in self._metrics_by_tap[tap_name]:
                metric.update_state(target, adapted, sample_weight=weight)
            if not tap.has_terms:
                continue
            term = ops.zeros((), dtype="float32")
            if tap.loss is not None:
                term = term + tap_loss_value(
                    tap_name, tap.loss, target, adapted, weight
                )
            if tap.regularizer is not None:
                term = term + regularizer_term(tap.regularizer, activation)
            terms[tap_name] = term
        return terms

    def tap_weights(self, step=None):
        """`{tap_name: weight}` at `step` (default: the optimizer's)."""
        if step is None:
            step = optimizer_step(self)
        return {
            n: ops.cast(t.weight(step), "float32")
            for n, t, _ in self._tap_specs
            if t.has_terms
        }

    def compute_loss_parts(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The total loss in two parts: `(prediction_loss, tap_loss)`.

        `prediction_loss` is the compiled loss plus `model.losses`,
        `tap_loss` is `sum(weight_i(step) * tap_term_i)`, both scaled for
        distribution as Keras scales its losses: a custom `train_step` can
        take their gradients apart. Updates the `predictions_loss` and
        `<tap>_loss` logs; the gradients wait for a finiteness check.

        Example:

        ```python
        with tf.GradientTape(persistent=True) as tape:
            y_pred = self(x, training=True)
            main, aux = self.compute_loss_parts(x, y, y_pred, sample_weight)
        main_grads = tape.gradient(main, self.trainable_variables)
        ```
        """
        trainer = trainers.get()
        predictions, taps = y_pred
        pred_y, _ = self.split_targets(y)
        pred_sw, _ = self.split_weights(sample_weight, y)
        extra_total = ops.zeros((), dtype="float32")
        for loss in self.losses:
            extra_total += trainer.scale_for_replicas(ops.cast(loss, "float32"))
        if self.loss is not None:
            main = ops.cast(
                super().compute_loss(
                    x, pred_y, predictions, pred_sw, training=training
                ),
                "float32",
            )
            pred_loss = main - extra_total
        else:
            main = extra_total
            pred_loss = ops.zeros((), dtype="float32")
        terms = self.compute_tap_losses(
            x, y, taps, sample_weight=sample_weight, training=training
        )
        step = optimizer_step(self)
        weights = self.tap_weights(step)
        aux = ops.zeros((), dtype="float32")
        for tap_name, term in terms.items():
            aux = aux + weights[tap_name] * trainer.scale_for_replicas(
                ops.cast(term, "float32")
            )
        self.log_losses(x, trainer.unscale_for_replicas(pred_loss), terms)
        if training and self._statistics is not None:
            self._statistics.update(taps, step)
        checked = terms if training else {}  # evaluation logs them as is
        jit = jit_compiled(self)
        return trainer.guard_finite((main, aux), checked, step, jit)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Prediction loss + weighted tap terms + `model.losses`.

        Keras's `train_step` and `test_step` call this once per step with the
        output of the step's single forward pass.
        """
        main, aux = self.compute_loss_parts(
            x, y, y_pred, sample_weight, training=training
        )
        return main + aux

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        predictions, _ = y_pred
        pred_y, _ = self.split_targets(y)
        pred_sw, _ = self.split_weights(sample_weight, y)
        return super().compute_metrics(
            x, pred_y, predictions, sample_weight=pred_sw
        )

    # -- fitting -------------------------------------------------------------

    def train_step(self, data):
        if jit_compiled(self):
            return trainers.get().train_step_jit(self, data)
        return super().train_step(data)

    def fit(self, x=None, y=None, *args, **kwargs):
        x, y, kwargs = self.prepare_fit_data(x, y, kwargs)
        return self.run_guarded(super().fit, x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        return self.run_guarded(super().evaluate, x, y, *args, **kwargs)

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
                of batches or a `keras.utils.PyDataset`; a `y` in the data is
                ignored.
            taps: names of this model's taps or further layer paths
                (default: all taps).
            batch_size: batch size for NumPy data.
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
