"""Layer paths: index a model's tappable points, resolve and suggest paths.

A layer path is a layer name (`"conv4_block6_out"`), a `/`-separated path
into nested models (`"resnet50/conv3_block1_out"`), or one call of a layer
that is called more than once (`"enc@1"`, the 0-based call index in graph
order). A path starting with `re:` is a regular expression matched with
`re.fullmatch` against every layer path.

Paths reach inside layers (`"vit_encoder/transformer_block_1/mha"`), where
a segment may leave out Keras's generated `_N` suffix when the rest names
exactly one sublayer of its parent (`"mha/softmax"` for `softmax_7`), and
operations of a Functional graph (`"add"`, `"relu"`). A suffix picks a
value at the point: `":input"`, `":input[i]"` (the i-th positional input
of the call), `":input[name]"` (its keyword argument `name`, as passed),
`":output[i]"` or `":output[key]"` (one element of a structured output),
after the call index: `"enc@1:input"`.
"""

import collections
import difflib
import re

import keras

from keras_tap.taps import graph
from keras_tap.taps.calls import trace_calls

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


_SUFFIX = re.compile(r"(?s)(.*?):(input|output)(?:\[([^\[\]]+)\])?")


def split_call(path):
    """`"enc@1"` -> `("enc", 1)`; `"enc"` -> `("enc", None)`."""
    head, sep, tail = path.rpartition("@")
    if sep and tail.isdigit():
        return head, int(tail)
    return path, None


def split_suffix(spec):
    """`"mha:output[1]"` -> `("mha", "output", 1)`; no suffix: `(spec,
    None, None)`. A key of digits is an int, else a string (quotes
    stripped)."""
    match = _SUFFIX.fullmatch(spec)
    if match is None:
        return spec, None, None
    head, kind, key = match.groups()
    if key is not None:
        key = key.strip()
        if key.lstrip("-").isdigit():
            key = int(key)
        elif len(key) > 1 and key[0] == key[-1] and key[0] in "'\"":
            key = key[1:-1]
    return head, kind, key


class LayerIndex:
    """Every tappable point of a model, in call order.

    Points are layer calls of the (rebuilt) graph, operations of
    Functional graphs, and the calls of layers held inside layers and
    subclassed models, at any depth.

    Args:
        model: a built Keras model (Functional, Sequential or subclassed).

    Attributes:
        model: the model.
        trace: a `graph.GraphTrace` for graph models, else `None`.
        points: `{path: [Point, ...]}`, one `Point` per call.
        output_paths: the paths of the layers that give the model's
            outputs; `re:` patterns skip them.
    """

    def __init__(self, model):
        check_model(model)
        self.model = model
        if graph.is_graph_model(model):
            self.trace = graph.GraphTrace(model)
            self.points = self.trace.points
        else:
            self.trace = None
            self.points, _ = trace_calls(model)
        self.output_paths = self._output_paths()

    def _output_paths(self):
        """Paths of the layers that give the model's outputs: named like an
        output, or (graph models) computing an output tensor."""
        names = getattr(self.model, "output_names", None) or []
        found = {n for n in names if isinstance(n, str)}
        if self.trace is not None:
            outputs = {id(t) for t in keras.tree.flatten(self.trace.outputs)}
            for path, calls in self.points.items():
                if any(id(point.tensor) in outputs for point in calls):
                    found.add(path)
        return found

    def address(self, point):
        """The canonical path of `point`: `path`, or `path@i` for a layer
        with several calls, then its suffix."""
        calls = self.points.get(point.path, [])
        base = point.path if len(calls) <= 1 else point.call_name
        return base + point.suffix

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

    def _fused_softmax_hint(self, path):
        """Why the softmax of an attention layer that fuses attention never
        runs (keras-hub's Llama, Mistral, Qwen, Phi-3, GPT-NeoX on JAX and
        PyTorch: decided by a module function, not per layer); `""` for
        any other layer."""
        from keras_tap.taps import sublayers

        if graph.SEPARATOR not in path:
            return ""
        parent = path.rsplit(graph.SEPARATOR, 1)[0]
        try:
            _, layer = sublayers.find(self.model, path)
            _, owner = sublayers.find(self.model, parent)
        except ValueError:
            return ""
        if not (isinstance(layer, keras.layers.Softmax)
                and callable(getattr(owner, "_compute_attention", None))):
            return ""
        return (
            f": '{parent}' ({type(owner).__name__}) computes attention with "
            f"a fused op on the {keras.backend.backend()} backend, so its "
            "attention probabilities exist nowhere (keras-hub decides this "
            "per backend, not per layer; they are reachable on TensorFlow). "
            "Tap the query and key it feeds to attention (after the rotary "
            "embedding: its calls @0 and @1) to compute them"
        )

    def stable_address(self, point):
        """`address(point)` with Keras's generated `_N` suffix left out of
        each segment where the rest names one sibling (`"mha/softmax"` for
        `"mha/softmax_7"`), so that it resolves in another process too."""
        from keras_tap.taps import sublayers

        parts = []
        for segment in point.path.split(graph.SEPARATOR):
            bare = sublayers.strip_suffix(segment)
            if bare != segment:
                children = self._children(graph.SEPARATOR.join(parts))
                try:
                    found, _ = sublayers.match_segment(children, bare)
                except ValueError:
                    found = None
                if found == segment and bare not in dict(children):
                    segment = bare
            parts.append(segment)
        path = graph.SEPARATOR.join(parts)
        calls = self.points.get(point.path, [])
        base = path if len(calls) <= 1 else f"{path}@{point.index}"
        return base + point.suffix

    def _children(self, parent):
        """`[(segment, None), ...]`: the segments listed below `parent`."""
        prefix = parent + graph.SEPARATOR if parent else ""
        seen = {}
        for path in self.points:
            if path.startswith(prefix):
                segment = path[len(prefix):].split(graph.SEPARATOR, 1)[0]
                seen.setdefault(segment, None)
        return list(seen.items())

    def canonical(self, path):
        """The listed path that `path` names: each segment matched in its
        parent, Keras's `_N` suffix optional where the rest is unique.

        Raises:
            ValueError: naming the segment that matches nothing (with the
                parent's sublayers) or several.
        """
        if path in self.points:
            return path
        from keras_tap.taps import sublayers

        parts = []
        for written in path.split(graph.SEPARATOR):
            parent = graph.SEPARATOR.join(parts)
            children = self._children(parent)
            try:
                segment, _ = sublayers.match_segment(children, written)
            except ValueError as e:
                if "ambiguous" in str(e):
                    where = f"'{parent}'" if parent else (
                        f"model '{self.model.name}'")
                    raise ValueError(
                        str(e).replace("The layer", where).rstrip(".")
                    ) from None
                raise ValueError(
                    self._no_child(parent, written, children)
                ) from None
            parts.append(segment)
        found = graph.SEPARATOR.join(parts)
        if found not in self.points:
            raise ValueError(f"no point is listed at '{found}'")
        return found

    def _no_child(self, parent, written, children):
        segments = [segment for segment, _ in children]
        if not parent:
            for layer in getattr(self.model, "layers", []):
                if layer.name == written and isinstance(
                    layer, keras.layers.InputLayer
                ):
                    return (
                        "this is an input layer; its output is the "
                        "model's input, not a tappable point"
                    )
            return f"no layer is named '{written}'"
        calls = self.points.get(parent)
        layer = calls[0].layer if calls else None
        kind = type(layer).__name__
        if not children:
            return (
                f"'{parent}' is a {kind} layer, not a nested model, and "
                f"holds no layers, so nothing is below it (no '{written}')"
            )
        if graph.is_graph_model(layer):
            return (
                f"the nested model '{parent}' has no layer named "
                f"'{written}'; its layers are {segments}"
            )
        return (
            f"'{parent}' ({kind}) has no sublayer '{written}'; its "
            f"sublayers are {segments}"
        )

    def _missing_problem(self, path):
        """Explain why `path` is not a tappable point of the model."""
        try:
            self.canonical(path)
        except ValueError as e:
            return str(e).rstrip(".")
        return "the layer is not called on the way from the model's inputs"

    def resolve(self, spec):
        """Resolve one tap spec into `[(name, Point), ...]`.

        Args:
            spec: a layer path (segments may leave out a generated `_N`
                suffix where the rest is unique), `path@i`, either with a
                suffix (`":input"`, `":input[i]"`, `":input[name]"`,
                `":output[i]"`, `":output[key]"`), `re:pattern` or a
                `Layer`.

        Returns:
            The points it addresses, each with the name a list-spec tap
            gets (the path verbatim, or `path@i` for expanded calls).

        Raises:
            ValueError: for a path that matches nothing (naming the segment
                and its parent's sublayers), an out-of-range call index, a
                bare name of a shared layer, a suffix the point does not
                have, or an empty pattern match.
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
        head, kind, key = split_suffix(spec)
        path, index = split_call(head)
        try:
            path = self.canonical(path)
        except ValueError as e:
            raise self._error(spec, str(e).rstrip(".")) from None
        calls = self.points[path]
        if not calls:
            raise self._error(
                spec, "this layer is never called when the model runs"
                + self._fused_softmax_hint(path)
            )
        if index is None:
            if len(calls) > 1:
                names = [point.call_name + _suffix(kind, key)
                         for point in calls]
                raise ValueError(
                    f"Tap {spec!r}: the layer is called {len(calls)} times "
                    f"in model '{self.model.name}', so a bare name is "
                    f"ambiguous. Name one call: {names}."
                )
            point = calls[0]
        elif index >= len(calls):
            valid = [point.call_name for point in calls]
            if len(calls) == 1:
                valid = [path] + valid
            raise ValueError(
                f"Tap {spec!r}: call index {index} is out of range; the "
                f"layer '{path}' is called {len(calls)} time(s) in model "
                f"'{self.model.name}'. Valid: {valid}."
            )
        else:
            point = calls[index]
        if kind is not None:
            point = point.select(kind, key, written=spec)
        return [(spec, point)]

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
        matches, skipped = [], []
        for path, calls in self.points.items():
            if not calls or not pattern.fullmatch(path):
                continue
            if path in self.output_paths:
                skipped.append(path)  # The outputs are the predictions.
                continue
            if len(calls) == 1:
                matches.append((path, calls[0]))
            else:
                matches.extend((p.call_name, p) for p in calls)
        if not matches and skipped:
            raise ValueError(
                f"Tap {spec!r}: the pattern matches only the output layers "
                f"of model '{self.model.name}' ({skipped}), which patterns "
                "leave out: the model's outputs are its predictions, "
                "returned by every TapModel."
            )
        if not matches:
            raise self._error(
                spec,
                "the pattern matches no layer path (it is matched with "
                "re.fullmatch against paths such as 'block/conv')",
                candidates=list(self.points),
            )
        return matches


def _suffix(kind, key):
    if kind is None:
        return ""
    return f":{kind}" + ("" if key is None else f"[{key}]")


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
    except (AttributeError, ValueError):
        return 0  # an operation, or a layer that is not built


def batch_free(shape):
    """The shape with its batch axis `None`; each element of a structure."""
    if shape is None:
        return None
    if graph.is_shape(shape):
        return (None,) + tuple(shape[1:]) if shape else shape
    if isinstance(shape, dict):
        return {k: batch_free(v) for k, v in shape.items()}
    return type(shape)(batch_free(s) for s in shape)


def _check_depth(depth):
    if depth is not None and (
        isinstance(depth, bool) or not isinstance(depth, int) or depth < 1
    ):
        raise ValueError(
            "`depth` must be None (every depth) or a positive integer (1: "
            f"the outer graph alone); received depth={depth!r}."
        )


def list_layers(model, depth=None):
    """List every tappable point of a model, in call order.

    Points are the layer calls of the model's graph, nested graph models
    expanded; the layers held inside layers and subclassed models, at any
    depth (`"vit_encoder/transformer_block_1/mha/softmax"`), even those the
    model did not call (`calls` 0); and the operations of a Functional
    graph (`"add"`, `"relu"`), named as `model.operations` names them. A
    structured output is listed with the structure of its element shapes
    (address one element as `path:output[i]`). A `MultiHeadAttention`'s
    softmax is listed with the shape of the attention probabilities,
    `(batch, heads, query, key)`, even where Keras fuses attention.

    Args:
        model: a built Keras model (or its `LayerIndex`).
        depth: how many path segments to list: `1` lists the outer graph
            alone; `None` (default) every depth.

    Returns:
        A list of `LayerRecord(path, class_name, output_shape, params,
        calls)`, in the order the calls end (a layer after the layers it
        holds), input layers left out.

    Raises:
        TypeError: when `model` is not a Keras model.
        ValueError: for an invalid `depth`.

    Example:

    >>> import keras, keras_tap as kt
    >>> inputs = keras.Input((4,))
    >>> outputs = keras.layers.Dense(2, name="head")(inputs)
    >>> [r.path for r in kt.list_layers(keras.Model(inputs, outputs))]
    ['head']
    """
    _check_depth(depth)
    index = model if isinstance(model, LayerIndex) else LayerIndex(model)
    records = []
    for path, calls in index.points.items():
        if depth is not None and path.count(graph.SEPARATOR) >= depth:
            continue
        layer = calls[0].layer if calls else getattr(calls, "layer", None)
        if layer is None:
            layer = _layer_at(index.model, path)
        shape = batch_free(calls[0].shape) if calls else None
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
