"""`Tap`: what to do with one intermediate activation."""

import math

import keras

from keras_tap.training import losses as tap_losses
from keras_tap.training import regularizers as tap_regularizers
from keras_tap.training import schedules

TARGETS = ("data", "predictions")


def _serialize(obj):
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    return keras.saving.serialize_keras_object(obj)


def _deserialize_layer(adapter):
    if adapter is None or isinstance(adapter, keras.layers.Layer):
        return adapter
    if isinstance(adapter, dict):
        layer = keras.saving.deserialize_keras_object(adapter)
        if isinstance(layer, keras.layers.Layer):
            return layer
    raise TypeError(
        "A tap's `adapter` must be a keras.layers.Layer (e.g. a "
        "keras.Sequential head) or the Keras serialization dict of one; "
        f"received {type(adapter).__name__}: {adapter!r}."
    )


def _metric(identifier, loss):
    """Resolve a metric identifier; `"accuracy"` follows the loss."""
    if isinstance(identifier, keras.metrics.Metric):
        return identifier
    if isinstance(identifier, str) and identifier in ("accuracy", "acc"):
        name = getattr(loss, "name", "") or ""
        fn = getattr(loss, "fn", None)
        text = f"{name} {getattr(fn, '__name__', '')} {type(loss).__name__}"
        text = text.lower()
        if "sparse" in text:
            return keras.metrics.SparseCategoricalAccuracy(name=identifier)
        if "binary" in text:
            return keras.metrics.BinaryAccuracy(name=identifier)
        return keras.metrics.CategoricalAccuracy(name=identifier)
    try:
        metric = keras.metrics.get(identifier)
    except ValueError as e:
        raise ValueError(
            f"Unknown tap metric {identifier!r}: expected a "
            "keras.metrics.Metric, a metric name such as 'accuracy' or "
            f"'mae', or its serialization dict. ({e})"
        ) from e
    if isinstance(metric, keras.metrics.Metric):
        return metric
    name = identifier if isinstance(identifier, str) else metric.__name__
    return keras.metrics.MeanMetricWrapper(metric, name=name)


@keras.saving.register_keras_serializable(package="keras_tap")
class Tap:
    """One tapped layer and the terms computed on its output.

    Args:
        layer: a layer path (`"block/conv"`, `"enc@1"`, `"re:conv.*"`) or a
            `keras.layers.Layer` of the model.
        loss: a `keras.losses.Loss`, an identifier (`"mse"`,
            `"feature_mse"`) or its serialization dict; called as
            `loss(target, activation)` after the adapter.
        regularizer: a function of the raw activation alone: a
            `keras.regularizers.Regularizer` (its value is divided by the
            batch size), a `kt.regularizers` class (a batch mean already)
            or a plain function (used as it is: return a batch mean).
        weight: a non-negative finite float or a `kt.schedules` schedule,
            evaluated at `optimizer.iterations`.
        target: `"data"` (the target is `y[tap_name]`) or `"predictions"`
            (the prediction target: deep supervision).
        teacher: a layer path (or a `keras.layers.Layer`) of the
            `TapModel`'s teacher: the target is that layer's output in the
            teacher (no gradient).
        adapter: a layer applied to the activation before the loss and
            metrics (a FitNets regressor, an auxiliary head); trained and
            saved with the `TapModel`.
        metrics: Keras metrics on `(target, adapted activation)`, logged
            as `<tap_name>_<metric name>`.

    Example:

    >>> import keras_tap as kt
    >>> tap = kt.Tap("conv1", regularizer=kt.regularizers.ActivityL1(1e-3))
    >>> tap.has_terms
    True
    """

    def __init__(
        self,
        layer,
        *,
        loss=None,
        regularizer=None,
        weight=1.0,
        target="data",
        teacher=None,
        adapter=None,
        metrics=None,
    ):
        if not isinstance(layer, (str, keras.layers.Layer)):
            raise TypeError(
                "Tap `layer` must be a layer path (str) or a "
                f"keras.layers.Layer; received {type(layer).__name__}: "
                f"{layer!r}."
            )
        if target not in TARGETS:
            raise ValueError(
                f"Tap `target` must be one of {list(TARGETS)}; received "
                f"{target!r}. To take the target from a teacher model, pass "
                "`teacher='layer path'` instead."
            )
        if teacher is not None and not isinstance(
            teacher, (str, keras.layers.Layer)
        ):
            raise TypeError(
                "Tap `teacher` must be a layer path (str) or a "
                "keras.layers.Layer of the teacher model; received "
                f"{type(teacher).__name__}: {teacher!r}."
            )
        if teacher is not None and target != "data":
            raise ValueError(
                "Tap: give either `teacher=` or `target='predictions'`, "
                f"not both (received target={target!r}, "
                f"teacher={teacher!r})."
            )
        if (teacher is not None or target != "data") and (
            loss is None and not metrics
        ):
            raise ValueError(
                f"Tap on {layer!r}: a target (target={target!r}, "
                f"teacher={teacher!r}) is only used by a `loss` or "
                "`metrics`; pass `loss=`."
            )
        if isinstance(weight, bool) or (
            isinstance(weight, (int, float))
            and (not math.isfinite(weight) or weight < 0)
        ):
            raise ValueError(
                "Tap `weight` must be a non-negative finite float or a "
                f"kt.schedules schedule; received {weight!r}."
            )
        self.layer = layer
        self.loss = None if loss is None else tap_losses.get(loss)
        self.regularizer = (
            None if regularizer is None else tap_regularizers.get(regularizer)
        )
        self.weight = schedules.get(weight)
        self.target = target
        self.teacher = teacher
        self.adapter = _deserialize_layer(adapter)
        self.metrics = [_metric(m, self.loss) for m in (metrics or [])]

    @property
    def has_terms(self):
        """Whether this tap adds a loss or regularizer term to training."""
        return self.loss is not None or self.regularizer is not None

    @property
    def path(self):
        return self.layer if isinstance(self.layer, str) else self.layer.name

    @property
    def teacher_path(self):
        """The teacher layer path (a `Layer` given as `teacher=`: its
        name until a `TapModel` resolves it)."""
        teacher = self.teacher
        if teacher is None or isinstance(teacher, str):
            return teacher
        return teacher.name

    def with_layer(self, layer):
        """A copy of this tap pointing at `layer` (same objects shared)."""
        return self._replace(layer=layer)

    def with_teacher(self, teacher):
        """A copy of this tap with the teacher point `teacher`."""
        return self._replace(teacher=teacher)

    def _replace(self, **changes):
        tap = object.__new__(type(self))
        tap.__dict__.update(self.__dict__)
        tap.__dict__.update(changes)
        return tap

    def get_config(self):
        weight = self.weight
        if isinstance(weight, schedules.Constant):
            weight = float(weight.value)
        return {
            "layer": self.path,
            "loss": _serialize(self.loss),
            "regularizer": _serialize(self.regularizer),
            "weight": _serialize(weight),
            "target": self.target,
            "teacher": self.teacher_path,
            "adapter": _serialize(self.adapter),
            "metrics": [_serialize(m) for m in self.metrics] or None,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layer = config.pop("layer")
        for key in ("loss", "regularizer", "weight"):
            value = config.get(key)
            if isinstance(value, dict):
                config[key] = keras.saving.deserialize_keras_object(value)
        if config.get("metrics"):
            config["metrics"] = [
                keras.saving.deserialize_keras_object(m)
                if isinstance(m, dict)
                else m
                for m in config["metrics"]
            ]
        return cls(layer, **config)

    def __repr__(self):
        parts = [repr(self.path)]
        for key in ("loss", "regularizer", "adapter"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={type(value).__name__}")
        if self.teacher is not None:
            parts.append(f"teacher={self.teacher_path!r}")
        return f"Tap({', '.join(parts)})"


def normalize_taps(taps):
    """`taps` -> `[(key or None, Tap)]` in declaration order."""
    if isinstance(taps, (str, keras.layers.Layer, Tap)):
        taps = [taps]
    if isinstance(taps, dict):
        items = list(taps.items())
    elif isinstance(taps, (list, tuple)):
        items = [(None, spec) for spec in taps]
    else:
        raise TypeError(
            "`taps` must be a layer path, a Layer, a kt.Tap, a list of them "
            f"or a dict {{tap_name: path_or_Tap}}; received "
            f"{type(taps).__name__}: {taps!r}."
        )
    if not items:
        raise ValueError(
            "`taps` is empty: name at least one layer path to tap. Call "
            "`kt.list_layers(model)` to see every layer path."
        )
    normalized = []
    for key, spec in items:
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(
                f"Tap names must be non-empty strings; received {key!r}."
            )
        if isinstance(spec, dict):
            spec = Tap.from_config(spec)
        tap = spec if isinstance(spec, Tap) else Tap(spec)
        normalized.append((key, tap))
    return normalized


def resolve_taps(index, taps, reserved=()):
    """Resolve `taps` against a model: `[(tap_name, Tap, Point), ...]`.

    Each returned `Tap` points at one call (its path, or `path@i` for a
    layer called several times); a pattern expands to one entry per match.

    Args:
        index: the model's `paths.LayerIndex`.
        taps: taps in any form `normalize_taps` accepts.
        reserved: names a tap may not take (the model's predictions).

    Raises:
        ValueError: for a path that resolves to nothing, a reserved or
            repeated tap name, or one adapter on a pattern of several
            layers.
    """
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
            if point.structured and tap.has_terms:
                elements = [
                    match_name + s for s in point.element_suffixes()
                ]
                raise ValueError(
                    f"Tap {match_name!r}: the point has a structured "
                    "output, but a loss or regularizer needs one tensor. "
                    f"Tap one element instead: {elements}."
                )
            address = index.address(point)
            if isinstance(tap.layer, keras.layers.Layer) or (
                tap.layer.startswith("re:")
            ):
                # Saved with the model: resolvable in another process, where
                # Keras numbers generated names differently.
                address = index.stable_address(point)
            elif len(matches) == 1 and not tap.layer.startswith("re:"):
                address = tap.layer  # as written
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
