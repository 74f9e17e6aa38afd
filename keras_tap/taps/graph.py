"""Reach every computation of a model: graph rebuilds, and watched calls.

Two routes lead to intermediate outputs:

- Graph models (Functional, Sequential, and graph models nested in them at
  any depth) are re-run with `keras.models.clone_model(...,
  clone_function=identity, call_function=...)`. The same layer objects are
  called again (weights are shared, nothing is copied) and nested graph
  models are inlined into the outer graph, so that every inner layer call,
  and every operation that is not a layer (`x + y`, `ops.nn.relu`), becomes
  a tensor connected to the outer inputs. A nested graph model whose inner
  layers share names with others (two towers from one factory) cannot be
  inlined into one graph, whose names must be unique: it stays one node,
  replaced by a multi-output view of itself. The result is a `GraphTrace`.
- The layers held inside a layer (a keras-hub encoder's blocks, a
  `MultiHeadAttention`'s softmax), and every layer of a subclassed model,
  have no graph. The symbolic run records their calls (paths, call order,
  shapes) while a `watch.Watcher` watches them; at run time the tapped ones
  are watched again (`forward`).
"""

import inspect

import keras

from keras_tap.taps import watch
from keras_tap.taps.calls import trace_calls
from keras_tap.taps.points import (  # noqa: F401 - part of this API
    Calls,
    Point,
    flatten_elements,
    is_shape,
    keyword_shapes,
    merge_shapes,
    zeros_like_spec,
)
from keras_tap.taps.points import shape_of as _shape_of

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
    """An uncompiled Functional model over the same layers as `model`.

    The batch dimension of the inputs is left free, so a Sequential that was
    built by calling it once on a batch of 2 still accepts any batch size.
    The view is never compiled, whatever `model` was compiled with (a
    lambda or an unregistered loss): `keras.models.clone_model` compiles
    its clone from the model's compile config, which must not matter here.
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
    if not getattr(model, "compiled", False):
        return model
    return keras.Model(model.input, model.output, name=model.name)


def unpack_singleton(value):
    """A list or tuple of one element -> the element, as Keras calls do."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


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
            the order the calls end (a layer after the layers it holds).
            Points inside layers (and inside subclassed models) have no
            tensor: they are reached by watching the calls (`watch`).
    """

    def __init__(self, model, edited=frozenset()):
        view = functional_view(model)
        self.model = model
        # Nested graph models whose calls apply the open `kt.edit`s at
        # their inlined inputs and outputs (`edited_variant`).
        self._edited = frozenset(edited)
        self._variants = {}
        self.points = {}
        self._views = {}
        self._viewed = _clashing_models(view)
        inputs = free_batch_inputs(view.input)
        rebuilt = self._inline(view, inputs, prefix="", training=None)
        self.inputs = inputs
        self.outputs = rebuilt
        self.nested = frozenset(
            id(point.layer)
            for calls in self.points.values()
            for point in calls
            if is_graph_model(point.layer)
        )

    def edited_variant(self, layers):
        """This trace, or a variant of it in which the nested graph models
        among `layers` (ids) apply the open `kt.edit`s to their calls'
        inputs and outputs: an inlined model is never called itself, so
        the hook of an edit on it never runs. Cached per set of models.
        """
        chosen = frozenset(layers) & self.nested
        if not chosen or chosen <= self._edited:
            return self
        variant = self._variants.get(chosen)
        if variant is None:
            # Built while no edit is active: none is baked into the graph.
            with watch.suspended():
                variant = GraphTrace(self.model, edited=chosen)
            self._variants[chosen] = variant
        return variant

    def _record(self, path, layer, tensor, args, kwargs=None):
        calls = self.points.setdefault(path, [])
        calls.append(
            Point(path, len(calls), layer, tensor, shape=_shape_of(tensor),
                  args=tuple(args), kwargs=dict(kwargs or {}))
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
        """Call one layer (or operation) on connected tensors, record it."""
        if isinstance(layer, keras.layers.InputLayer):
            return layer(*args, **kwargs)
        path = prefix + layer.name
        edited = is_graph_model(layer) and id(layer) in self._edited
        if edited:
            call = len(self.points.get(path, ()))
            args = (
                _EditedCall(layer, call, inputs=True)(args[0]),
            ) + tuple(args[1:])
        if is_graph_model(layer) and id(layer) in self._viewed:
            outputs = self._view(layer, path, args, kwargs)
        elif is_graph_model(layer):
            outputs = self._inline(
                layer,
                args[0],
                prefix=path + SEPARATOR,
                training=kwargs.get("training"),
            )
        elif isinstance(layer, keras.layers.Layer):
            # The layers it holds are watched during the symbolic call:
            # their paths, call order and shapes; tapping one of them
            # makes the forward pass watch it at run time.
            outputs = self._watched_call(layer, path, args, kwargs)
        else:
            outputs = layer(*args, **kwargs)  # an operation: `x + y`.
        if edited:
            outputs = _EditedCall(layer, call, inputs=False)(outputs)
        self._record(path, layer, outputs, args, kwargs)
        return outputs

    def _watched_call(self, layer, path, args, kwargs):
        from keras_tap.taps import sublayers

        outputs = layer(*args, **kwargs)
        if not sublayers.held_sublayers(layer):
            return outputs  # a leaf layer: nothing inside to reach.
        # Keras computes a layer's output on symbolic tensors from its
        # `compute_output_shape` when it has one (MultiHeadAttention), so
        # its `call` never runs: a probe layer around the call makes it run
        # on the backend's symbolic tensors, where the sublayers are called.
        plain_args, plain_kwargs = _dense_specs((args, kwargs))
        try:
            found, _ = trace_calls(
                layer,
                run=lambda: _Probe(layer)(*plain_args, **plain_kwargs),
                inputs=(plain_args, plain_kwargs),
            )
        except Exception:  # noqa: BLE001 - a call that cannot run
            # symbolically: its sublayers are listed without calls.
            found, _ = trace_calls(layer, run=lambda: None)
        for inner_path, calls in found.items():
            full = path + SEPARATOR + inner_path
            known = self.points.setdefault(full, Calls(calls.layer))
            for point in calls:
                point.path, point.index = full, len(known)
                point.anchor = outputs
                known.append(point)
        return outputs

    def _view(self, layer, path, args, kwargs):
        """Call a nested graph model as one node: a multi-output view of
        itself that also returns every point inside it."""
        if id(layer) not in self._views:
            inner = GraphTrace(layer, edited=self._edited)
            exposed, positions = [], {}
            inputs = {id(t) for t in keras.tree.flatten(inner.inputs)}

            def expose(structure):
                for t in keras.tree.flatten(structure):
                    if (
                        isinstance(t, keras.KerasTensor)
                        and id(t) not in positions
                        and id(t) not in inputs
                    ):
                        positions[id(t)] = len(exposed)
                        exposed.append(t)

            expose(inner.outputs)
            for calls in inner.points.values():
                for point in calls:
                    expose(point.tensor)
                    expose(point.anchor)
                    if not point.watched:
                        expose(point.args)
                        expose(point.kwargs)
            view = keras.Model(inner.inputs, exposed, name=layer.name)
            self._views[id(layer)] = (view, inner, positions)
        view, inner, positions = self._views[id(layer)]
        values = view(args[0], **kwargs)
        if not isinstance(values, (list, tuple)):
            values = [values]
        links = {
            id(t): v
            for t, v in zip(
                keras.tree.flatten(inner.inputs), keras.tree.flatten(args[0])
            )
        }

        def outer(structure):
            if structure is None:
                return None

            def one(t):
                if id(t) in positions:
                    return values[positions[id(t)]]
                return links.get(id(t), t)

            return keras.tree.map_structure(one, structure)

        for inner_path, calls in inner.points.items():
            full = path + SEPARATOR + inner_path
            known = self.points.setdefault(
                full, Calls(getattr(calls, "layer", None))
            )
            for point in calls:
                copy = Point(
                    full, len(known), point.layer, outer(point.tensor),
                    point.shape,
                    point.args if point.watched else outer(point.args),
                    outer(point.anchor), point.owner,
                    point.kwargs if point.watched else outer(point.kwargs),
                )
                known.append(copy)
        return outer(inner.outputs)


def _dense_specs(structure):
    """Fresh dense `KerasTensor`s like those of `structure` (shapes only
    matter to a probe; Keras may mark a dense output `sparse`)."""

    def fresh(value):
        if isinstance(value, keras.KerasTensor):
            return keras.KerasTensor(value.shape, dtype=value.dtype)
        return value

    return keras.tree.map_structure(fresh, structure)


class _EditedCall(keras.layers.Layer):
    """Applies the open `kt.edit`s of one call of an inlined nested graph
    model (`layer`, call `index`) to its input (`inputs=True`) or its
    output: what the edit hook would do, were the model called."""

    def __init__(self, layer, index, inputs):
        super().__init__(dtype=layer.dtype_policy)
        self.key, self.index, self.inputs = id(layer), index, inputs
        self.supports_masking = True
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True

    def call(self, value):
        from keras_tap.taps import edit

        if self.inputs:
            return edit.edit_call_inputs(self.key, self.index, (value,))[0]
        return edit.edit_call_outputs(self.key, self.index, value)

    def compute_output_spec(self, value):
        return keras.tree.map_structure(
            lambda t: keras.KerasTensor(t.shape, dtype=t.dtype), value
        )


class _Probe(keras.layers.Layer):
    """Runs `layer`'s call symbolically, whatever its output shape method."""

    def __init__(self, layer):
        super().__init__(name=f"probe_{layer.name}", dtype=layer.dtype_policy)
        self.layer = layer
        self.supports_masking = True  # masks reach `layer` as they are.
        self.built = True

    def call(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def _flat_names(model):
    """`[(name, id(layer)), ...]` for what inlining `model` adds to a graph."""
    found = []
    for operation in functional_view(model).operations:
        if isinstance(operation, keras.layers.InputLayer):
            continue
        if is_graph_model(operation):
            found.extend(_flat_names(operation))
        else:
            found.append((operation.name, id(operation)))
    return found


def _clashing_models(view):
    """Ids of the nested graph models of `view` that cannot be inlined:
    an inner layer shares its name with another layer of the flat graph."""
    owners, objects = {}, {}
    for operation in view.operations:
        if isinstance(operation, keras.layers.InputLayer):
            continue
        names = (
            _flat_names(operation)
            if is_graph_model(operation)
            else [(operation.name, id(operation))]
        )
        for name, key in names:
            objects.setdefault(name, set()).add(key)
            owners.setdefault(name, set()).add(id(operation))
    clashing = set()
    for name, keys in objects.items():
        if len(keys) > 1:
            clashing.update(owners[name])
    return {
        id(op)
        for op in view.operations
        if id(op) in clashing and is_graph_model(op)
    }
