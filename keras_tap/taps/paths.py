"""Layer paths: index a model's tappable points, resolve and suggest paths.

A layer path is a layer name (`"conv4_block6_out"`), a `/`-separated path
into nested models (`"resnet50/conv3_block1_out"`), or one call of a layer
that is called more than once (`"enc@1"`, the 0-based call index in graph
order). A path starting with `re:` is a regular expression matched with
`re.fullmatch` against every layer path.
"""

import collections
import difflib
import re

import keras

from keras_tap.taps import graph

PATTERN_PREFIX = "re:"

LayerRecord = collections.namedtuple(
    "LayerRecord", ["path", "class_name", "output_shape", "params", "calls"]
)
LayerRecord.__doc__ = """One tappable layer of a model, from `kt.list_layers`.

Attributes:
    path: the layer path (`/`-separated through nested models).
    class_name: the layer's class name.
    output_shape: the output shape of its first call (batch axis `None`).
    params: its number of parameters.
    calls: how many times the model calls it; tap one call as `path@i`.
"""


def split_call(path):
    """`"enc@1"` -> `("enc", 1)`; `"enc"` -> `("enc", None)`."""
    head, sep, tail = path.rpartition("@")
    if sep and tail.isdigit():
        return head, int(tail)
    return path, None


class LayerIndex:
    """Every tappable point of a model, in graph order.

    Args:
        model: a built Keras model (Functional, Sequential or subclassed).

    Attributes:
        model: the model.
        trace: a `graph.GraphTrace` for graph models, else `None`.
        points: `{path: [Point, ...]}`, one `Point` per call.
    """

    def __init__(self, model):
        check_model(model)
        self.model = model
        if graph.is_graph_model(model):
            self.trace = graph.GraphTrace(model)
            self.points = self.trace.points
        else:
            self.trace = None
            self.points, _ = graph.trace_calls(model)

    def connected(self, points):
        """Whether `points` are tensors of the rebuilt graph (else they are
        reached by interception while the model runs)."""
        return self.trace is not None and all(
            p.tensor is not None for p in points
        )

    def point_names(self):
        """Every valid tap address: bare paths, and `path@i` for shared."""
        names = []
        for path, calls in self.points.items():
            if len(calls) == 1:
                names.append(path)
            else:
                names.extend(point.call_name for point in calls)
        return names

    def _error(self, spec, problem, candidates=None):
        pool = candidates if candidates is not None else self.point_names()
        close = difflib.get_close_matches(str(spec), pool, n=5, cutoff=0.5)
        if not close and graph.SEPARATOR in str(spec):
            # A wrong nested prefix: suggest by the last component too.
            last = str(spec).rsplit(graph.SEPARATOR, 1)[-1]
            close = [
                p for p in pool if p.rsplit(graph.SEPARATOR, 1)[-1] == last
            ][:5]
        hint = f" Closest valid paths: {close}." if close else ""
        return ValueError(
            f"Tap {spec!r} in model '{self.model.name}': {problem}.{hint} "
            "Call `kt.list_layers(model)` to see every layer path."
        )

    def _missing_problem(self, path):
        """Explain why `path` is not a tappable point of the model."""
        parts = path.split(graph.SEPARATOR)
        layer = self.model
        for i, part in enumerate(parts):
            parent = graph.SEPARATOR.join(parts[:i])
            if i and not isinstance(layer, keras.Model):
                return (
                    f"'{parent}' is a {type(layer).__name__} layer, not "
                    "a nested model, so nothing is below it"
                )
            try:
                layer = layer.get_layer(part)
            except ValueError:
                if parent:
                    return (
                        f"the nested model '{parent}' has no layer named "
                        f"'{part}'"
                    )
                return f"no layer is named '{part}'"
        if isinstance(layer, keras.layers.InputLayer):
            return (
                "this is an input layer; its output is the model's input, "
                "not a tappable point"
            )
        return "the layer is not called on the way from the model's inputs"

    def resolve(self, spec):
        """Resolve one tap spec into `[(name, Point), ...]`.

        Args:
            spec: a layer path, `path@i`, `re:pattern` or a `Layer`.

        Returns:
            The points it addresses, each with the name a list-spec tap
            gets (the path verbatim, or `path@i` for expanded calls).

        Raises:
            ValueError: for a path that matches nothing, an out-of-range call
                index, a bare name of a shared layer, or an empty pattern
                match.
        """
        if isinstance(spec, keras.layers.Layer):
            return self._resolve_layer(spec)
        if not isinstance(spec, str):
            raise TypeError(
                "A tap's layer must be a layer path (str) or a "
                f"keras.layers.Layer; received {type(spec).__name__}: "
                f"{spec!r}."
            )
        if spec.startswith(PATTERN_PREFIX):
            return self._resolve_pattern(spec)
        path, index = split_call(spec)
        calls = self.points.get(path)
        if calls is None:
            raise self._error(spec, self._missing_problem(path))
        if not calls:
            raise self._error(
                spec, "this layer is never called when the model runs"
            )
        if index is None:
            if len(calls) > 1:
                names = [point.call_name for point in calls]
                raise ValueError(
                    f"Tap {spec!r}: the layer is called {len(calls)} times "
                    f"in model '{self.model.name}', so a bare name is "
                    f"ambiguous. Name one call: {names}."
                )
            return [(spec, calls[0])]
        if index >= len(calls):
            valid = [point.call_name for point in calls]
            if len(calls) == 1:
                valid = [path] + valid
            raise ValueError(
                f"Tap {spec!r}: call index {index} is out of range; the "
                f"layer '{path}' is called {len(calls)} time(s) in model "
                f"'{self.model.name}'. Valid: {valid}."
            )
        return [(spec, calls[index])]

    def _resolve_layer(self, layer):
        found = [p for p, calls in self.points.items() if calls and any(
            point.layer is layer for point in calls
        )]
        if not found:
            raise ValueError(
                f"Tap {layer!r}: this layer object is not part of model "
                f"'{self.model.name}' (is it a layer of a copy of the "
                "model?). Call `kt.list_layers(model)` to see every layer "
                "path."
            )
        return self.resolve(found[0])

    def _resolve_pattern(self, spec):
        source = spec[len(PATTERN_PREFIX):]
        try:
            pattern = re.compile(source)
        except re.error as e:
            raise ValueError(
                f"Tap {spec!r}: invalid regular expression ({e})."
            ) from e
        matches = []
        for path, calls in self.points.items():
            if not calls or not pattern.fullmatch(path):
                continue
            if len(calls) == 1:
                matches.append((path, calls[0]))
            else:
                matches.extend((p.call_name, p) for p in calls)
        if not matches:
            raise self._error(
                spec,
                "the pattern matches no layer path (it is matched with "
                "re.fullmatch against paths such as 'block/conv')",
                candidates=list(self.points),
            )
        return matches


def check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a built Keras model (`keras.Model`: Functional, "
            f"Sequential or subclassed); received {type(model).__name__}: "
            f"{model!r}."
        )


def _params(layer):
    try:
        return int(layer.count_params())
    except ValueError:
        return 0


def _batch_free(shape):
    if isinstance(shape, tuple) and shape and not isinstance(
        shape[0], tuple
    ):
        return (None,) + shape[1:]
    return keras.tree.map_structure(
        lambda s: s, shape
    )


def list_layers(model):
    """List every tappable layer of a model, nested models expanded.

    Args:
        model: a built Keras model.

    Returns:
        A list of `LayerRecord(path, class_name, output_shape, params,
        calls)`, in graph order (input layers left out).

    Example:

    >>> import keras, keras_tap as kt
    >>> inputs = keras.Input((4,))
    >>> outputs = keras.layers.Dense(2, name="head")(inputs)
    >>> [r.path for r in kt.list_layers(keras.Model(inputs, outputs))]
    ['head']
    """
    index = model if isinstance(model, LayerIndex) else LayerIndex(model)
    records = []
    for path, calls in index.points.items():
        layer = calls[0].layer if calls else _layer_at(index.model, path)
        shape = _batch_free(calls[0].shape) if calls else None
        records.append(
            LayerRecord(path, type(layer).__name__, shape, _params(layer),
                        len(calls))
        )
    return records


def _layer_at(model, path):
    layer = model
    for part in path.split(graph.SEPARATOR):
        layer = layer.get_layer(part)
    return layer
