"""Reach every layer call of a model: graph rebuilds and call interception.

Two routes lead to intermediate outputs:

- Graph models (Functional, Sequential, and graph models nested in them at
  any depth) are re-run with `keras.models.clone_model(...,
  clone_function=identity, call_function=...)`. The same layer objects are
  called again (weights are shared, nothing is copied) and nested graph
  models are inlined into the outer graph, so that every inner layer call
  becomes a tensor connected to the outer inputs. The result is a
  `GraphTrace`: the outer inputs, the model outputs, and the output of every
  layer call, in graph order.
- Subclassed models have no graph. `Interceptor` temporarily replaces the
  `call` of the layers to watch with a wrapper that records their outputs
  while the model runs (eagerly or inside `tf.function`, gradients intact),
  and restores the original afterwards.
"""

import contextlib
import inspect

import keras

SEPARATOR = "/"


def is_sequential(model):
    return isinstance(model, keras.Sequential)


def is_functional(model):
    """Whether `model` is a Functional model (a graph of layer calls)."""
    if not isinstance(model, keras.Model) or is_sequential(model):
        return False
    return hasattr(model, "operations") and hasattr(model, "inputs")


def is_graph_model(model):
    return is_sequential(model) or is_functional(model)


def _none_batch(tensor, name=None):
    shape = (None,) + tuple(tensor.shape[1:])
    return keras.Input(batch_shape=shape, dtype=tensor.dtype, name=name)


def free_batch_inputs(structure):
    """New `keras.Input`s like `structure`'s, the batch dimension free.

    Dict inputs keep their keys as names, as Keras requires.
    """
    if isinstance(structure, dict):
        return {k: _none_batch(v, name=k) for k, v in structure.items()}
    return keras.tree.map_structure(_none_batch, structure)


def functional_view(model):
    """A Functional model over the same layers as a graph `model`.

    The batch dimension of the inputs is left free, so a Sequential that was
    built by calling it once on a batch of 2 still accepts any batch size.
    """
    if is_sequential(model):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError) as e:
            raise ValueError(
                f"The Sequential model '{model.name}' has no defined input "
                "yet. Build it first (`model.build(input_shape)`), call it "
                "once on a batch, or start it with a `keras.Input`."
            ) from e
        if not inputs:
            raise ValueError(
                f"The Sequential model '{model.name}' has no defined input "
                "yet. Build it first (`model.build(input_shape)`), call it "
                "once on a batch, or start it with a `keras.Input`."
            )
        return keras.Model(
            unpack_singleton(inputs),
            unpack_singleton(outputs),
            name=model.name,
        )
    return model


def unpack_singleton(value):
    """A list or tuple of one element -> the element, as Keras calls do."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


class Point:
    """One call of one layer: a tappable point.

    Attributes:
        path: the layer path, `/`-separated through nested models.
        index: the 0-based call index of the layer within the traced model.
        layer: the layer object.
        tensor: in a `GraphTrace`, the symbolic output of this call.
        shape: the output shape (a tuple, or a structure of tuples).
    """

    def __init__(self, path, index, layer, tensor=None, shape=None):
        self.path = path
        self.index = index
        self.layer = layer
        self.tensor = tensor
        self.shape = shape

    @property
    def call_name(self):
        return f"{self.path}@{self.index}"

    def __repr__(self):
        return f"Point({self.call_name}, {type(self.layer).__name__})"


def _shape_of(value):
    return keras.tree.map_structure(
        lambda t: tuple(t.shape) if hasattr(t, "shape") else None, value
    )


def _accepts_training(layer):
    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


class GraphTrace:
    """The graph of a Functional or Sequential model, nested models inlined.

    Args:
        model: a Functional or Sequential model.

    Attributes:
        inputs: the new symbolic inputs (batch dimension free).
        outputs: the symbolic outputs, with the structure of `model.output`.
        points: `{path: [Point, ...]}` with one point per call, the paths in
            graph order.
        opaque: `{path: layer}` for nested models that are not graph models
            (subclassed): their inner points have no tensor (`None`), and
            are reached by interception.
    """

    def __init__(self, model):
        view = functional_view(model)
        self.points = {}
        self.opaque = {}
        inputs = free_batch_inputs(view.input)
        rebuilt = self._inline(view, inputs, prefix="", training=None)
        self.inputs = inputs
        self.outputs = rebuilt

    def _record(self, path, layer, tensor):
        calls = self.points.setdefault(path, [])
        calls.append(
            Point(path, len(calls), layer, tensor, shape=_shape_of(tensor))
        )

    def _inline(self, model, inputs, prefix, training):
        """Re-run `model`'s graph on `inputs`, recording every layer call.

        `clone_model` builds a Functional model from its `input_tensors`;
        when those are intermediate tensors of the outer graph (a nested
        model called after other layers), Keras re-wires copies of the
        graph to new inputs, and the clone's outputs no longer connect to
        the outer graph. So a nested model is cloned against fresh
        `keras.Input`s (its "anchors"), and each of its layer calls is made
        twice: on the anchors' graph, which `clone_model` sees, and on the
        outer tensors, which are recorded and returned.
        """
        view = functional_view(model)
        if prefix:
            anchors = free_batch_inputs(view.input)
            links = {
                id(anchor): tensor
                for anchor, tensor in zip(
                    keras.tree.flatten(anchors), keras.tree.flatten(inputs)
                )
            }
        else:
            anchors, links = inputs, None
        kept = []  # Keep linked tensors alive: `links` is keyed by `id`.

        def outer(structure):
            if links is None:
                return structure
            return keras.tree.map_structure(
                lambda value: links.get(id(value), value), structure
            )

        def call_function(layer, *args, **kwargs):
            # An explicit `training=` on the call of a nested model (a
            # frozen backbone called with `training=False`) must still reach
            # its layers once they are inlined.
            if training is not None and "training" not in kwargs:
                if _accepts_training(layer):
                    kwargs["training"] = training
            outputs = self._call(layer, prefix, outer(args), outer(kwargs))
            if links is None:
                return outputs
            shadow = layer(*args, **kwargs)
            for anchored, tensor in zip(
                keras.tree.flatten(shadow), keras.tree.flatten(outputs)
            ):
                links[id(anchored)] = tensor
                kept.append(anchored)
            return shadow

        clone = keras.models.clone_model(
            view,
            input_tensors=anchors,
            clone_function=lambda layer: layer,
            call_function=call_function,
        )
        # A Functional model called on a batch returns a lone output bare,
        # even when it was built with `outputs=[y]`.
        return outer(unpack_singleton(clone.output))

    def _call(self, layer, prefix, args, kwargs):
        """Call one layer on connected tensors and record the call."""
        if isinstance(layer, keras.layers.InputLayer):
            return layer(*args, **kwargs)
        if not isinstance(layer, keras.layers.Layer):
            return layer(*args, **kwargs)  # a bare op, e.g. `x + 1`.
        path = prefix + layer.name
        if is_graph_model(layer):
            outputs = self._inline(
                layer,
                args[0],
                prefix=path + SEPARATOR,
                training=kwargs.get("training"),
            )
        elif isinstance(layer, keras.Model):
            # A subclassed model has no graph to inline: its layers' calls
            # are recorded by interception (shapes, call order), and
            # tapping one of them makes `TapModel` intercept at run time.
            self.opaque[path] = layer
            inner, outputs = trace_calls(
                layer, run=lambda: layer(*args, **kwargs)
            )
            for inner_path, calls in inner.items():
                full = path + SEPARATOR + inner_path
                known = self.points.setdefault(full, [])
                for point in calls:
                    known.append(
                        Point(full, len(known), point.layer, None,
                              point.shape)
                    )
        else:
            outputs = layer(*args, **kwargs)
        self._record(path, layer, outputs)
        return outputs


class StopForward(Exception):
    """Raised by an `Interceptor` once every wanted call was recorded."""


class Interceptor:
    """Records outputs of chosen layer calls while a model runs.

    Args:
        wanted: `{layer_id: {call_index: [key, ...]}}`: the calls to record
            and the keys to store each under. `None` records every call of
            every layer in `layers`.
        layers: `{layer_id: layer}`, the layers to patch.
        stop_early: raise `StopForward` once every wanted call is recorded
            (used by extraction to skip the rest of the model).
    """

    def __init__(self, layers, wanted=None, stop_early=False):
        self.layers = layers
        self.wanted = wanted
        self.stop_early = stop_early
        self.records = {}
        self.counts = {}

    def _wrap(self, layer, original):
        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            key = id(layer)
            index = self.counts.get(key, 0)
            self.counts[key] = index + 1
            if self.wanted is None:
                self.records.setdefault(key, []).append(outputs)
            else:
                for name in self.wanted.get(key, {}).get(index, ()):
                    self.records[name] = outputs
                if self.stop_early and self._complete():
                    raise StopForward()
            return outputs

        return call

    def _complete(self):
        needed = sum(
            len(names)
            for calls in self.wanted.values()
            for names in calls.values()
        )
        return len(self.records) >= needed

    @contextlib.contextmanager
    def watch(self):
        """Patch the layers for the duration of the block."""
        self.records = {}
        self.counts = {}
        saved = []
        try:
            for layer in self.layers.values():
                own = "call" in vars(layer)
                original = layer.call
                saved.append((layer, own, original))
                object.__setattr__(layer, "call", self._wrap(layer, original))
            yield self
        finally:
            for layer, own, original in reversed(saved):
                if own:
                    object.__setattr__(layer, "call", original)
                else:
                    object.__delattr__(layer, "call")


def walk_layers(model, prefix=""):
    """Yield `(path, layer)` for every layer of `model`, nested models
    expanded, in the order of `model.layers`; input layers left out."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = prefix + layer.name
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from walk_layers(layer, path + SEPARATOR)


def input_spec_of(model):
    """Symbolic inputs for a built subclassed model, batch dimension free."""
    config = model.get_build_config() if model.built else None
    shape = (config or {}).get("input_shape")
    if shape is None:
        raise ValueError(
            f"The model '{model.name}' ({type(model).__name__}) is not built. "
            "Call it once on a batch (`model(x)`) or `model.build(shape)` "
            "before tapping it."
        )

    def make(s):
        return keras.KerasTensor((None,) + tuple(s[1:]))

    if isinstance(shape, dict):
        return {k: make(v) for k, v in shape.items()}
    if isinstance(shape, (list, tuple)) and shape and isinstance(
        shape[0], (list, tuple)
    ):
        return [make(s) for s in shape]
    return make(shape)


def trace_calls(model, run=None):
    """Run `model` symbolically and record every call of its layers.

    Args:
        model: a model whose layers to watch (nested models expanded).
        run: a function that calls `model` (default: on symbolic inputs of
            its build shape).

    Returns:
        `({path: [Point, ...]}, run's result)`, the points in the order the
        calls ended (a nested model after its layers, as in a
        `GraphTrace`); `tensor` is left `None` and `shape` is filled in.
    """
    layers = dict(walk_layers(model))
    by_id = {id(layer): path for path, layer in layers.items()}
    interceptor = Interceptor({id(layer): layer for layer in layers.values()})
    order = []

    original_wrap = interceptor._wrap

    def wrap(layer, original):
        inner = original_wrap(layer, original)

        def call(*args, **kwargs):
            outputs = inner(*args, **kwargs)
            order.append(id(layer))
            return outputs

        return call

    interceptor._wrap = wrap
    if run is None:
        inputs = input_spec_of(model)

        def run():
            return model(inputs)

    with interceptor.watch():
        result = run()
    points = {}
    seen = {}
    for key in order:
        index = seen.get(key, 0)
        seen[key] = index + 1
        path = by_id[key]
        output = interceptor.records[key][index]
        points.setdefault(path, []).append(
            Point(path, index, layers[path], None, _shape_of(output))
        )
    # Layers that never ran in the traced call are still listed, with no
    # calls, so that paths to them give a precise error.
    for path, layer in layers.items():
        points.setdefault(path, [])
    return points, result
