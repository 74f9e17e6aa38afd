"""Sublayers: the layers a layer holds, and the path segments naming them.

Keras lists the layers of a model (`Model.layers`), but a plain
`keras.layers.Layer` has no public list of the layers it holds: a
`MultiHeadAttention` keeps its projections and its softmax in attributes,
a keras-hub encoder keeps its blocks in a list attribute. This module finds
them from what each layer holds, without private Keras API:

- `held_sublayers(layer)`: the layers `layer` holds directly, each with its
  path segment (its `name`), in the order the attributes were set.
- `match_segment(children, written)`: one written segment to one of them;
  Keras's generated `_N` suffix (`softmax_7`) may be left out where the
  rest names exactly one sublayer, so a path written in one process works
  in another.
- `walk(layer, depth=None)`: every layer below `layer`, as `(path, layer)`.
- `find(layer, path)`: a `/`-separated path of segments to its layer.

Example:

>>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
>>> x = np.zeros((1, 3, 8), "float32")
>>> _ = mha(x, x)
>>> [segment for segment, _ in held_sublayers(mha)][:3]
['query', 'key', 'value']
>>> path, softmax = find(mha, "softmax")  # whatever its `_N` suffix
>>> path == softmax.name and type(softmax).__name__
'Softmax'
"""

import difflib
import re

import keras

from keras_tap.taps import graph

# Attributes in which Keras and TensorFlow keep their own records of the
# layers a layer tracks (checkpoint dependencies, a graph's operations, a
# Sequential's inner Functional). Every layer they hold is also held by an
# attribute that the layer's own code set, or by `Model.layers` for a graph
# model; reading them too would only bring in Keras's internal objects.
_TRACKER_ATTRIBUTES = frozenset(
    {
        "_layers",
        "_operations",
        "_operations_by_depth",
        "_functional",
        "_self_unconditional_dependency_names",
        "_self_unconditional_checkpoint_dependencies",
        "_self_unconditional_deferred_dependencies",
    }
)

_SUFFIX = re.compile(r"(.+)_(\d+)")


def held_sublayers(layer):
    """Returns the layers that `layer` holds directly, with their segments.

    A sublayer is an attribute whose value is a `keras.layers.Layer`, or a
    layer inside a list, tuple or dict attribute (nested containers
    included). For a Functional or Sequential model, the layers of its
    graph (`model.layers`) come first, in graph order. Then come the
    layers held by attributes, in the order the attributes were first set,
    and within a container in its own order. A layer held twice is listed
    once, at its first place; `layer` itself, input layers and objects
    that are not layers are left out, and so are Keras's and TensorFlow's
    internal records of tracked layers.

    The segment of a sublayer is its `name`. Should two sublayers of
    `layer` share a name, the later one gets Keras's `_N` suffix (the
    smallest `N` that no sibling uses), so segments are unique within a
    parent. Layers that a layer creates in `build()` (a
    `MultiHeadAttention`'s projections) exist only once it is built.

    Args:
        layer: a `keras.layers.Layer` (a model included).

    Returns:
        A list of `(segment, sublayer)` pairs.

    Raises:
        TypeError: If `layer` is not a `keras.layers.Layer`.

    Example:

    >>> class Block(keras.layers.Layer):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.proj = keras.layers.Dense(4, name="proj")
    ...         self.heads = [keras.layers.Dense(1, name=f"head_{i}")
    ...                       for i in range(2)]
    >>> [segment for segment, _ in held_sublayers(Block())]
    ['proj', 'head_0', 'head_1']
    """
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(
            "held_sublayers() expects a keras.layers.Layer (a model "
            f"included). Received: {type(layer).__name__}"
        )
    found = []
    seen = {id(layer)}
    visited = set()  # containers, against cycles

    def visit(value):
        if isinstance(value, keras.layers.Layer):
            if id(value) not in seen:
                seen.add(id(value))
                if not isinstance(value, keras.layers.InputLayer):
                    found.append(value)
        elif isinstance(value, (list, tuple, dict)):
            if id(value) in visited:
                return
            visited.add(id(value))
            items = value.values() if isinstance(value, dict) else value
            for item in items:
                visit(item)

    if graph.is_graph_model(layer):
        visit(list(layer.layers))
    first = len(found)
    attributes = vars(layer)
    # On PyTorch a layer is a `torch.nn.Module`: a layer set as an
    # attribute lives in its `_modules` dict, not among the attributes.
    modules = attributes.get("_modules")
    modules = modules if isinstance(modules, dict) else {}
    for held in (attributes, modules):
        for attribute, value in held.items():
            if attribute not in _TRACKER_ATTRIBUTES | {"_modules"}:
                visit(value)
    if modules:
        # Two dicts lose the order in which the attributes were set; Keras
        # tracks the layers it is given in that order, in `_layers`.
        tracked = vars(layer).get("_layers")
        tracked = list(tracked) if isinstance(tracked, (list, tuple)) else []
        place = {id(sublayer): i for i, sublayer in enumerate(tracked)}
        found[first:] = sorted(
            found[first:],
            key=lambda sublayer: place.get(id(sublayer), len(tracked)),
        )
    return _unique_segments(found)


def _unique_segments(sublayers):
    """Pairs each sublayer with its name, made unique among its siblings."""
    taken = {sublayer.name for sublayer in sublayers}
    used = set()
    pairs = []
    for sublayer in sublayers:
        segment = sublayer.name
        if segment in used:
            base = _SUFFIX.fullmatch(segment)
            base = base.group(1) if base else segment
            number = 1
            while f"{base}_{number}" in taken | used:
                number += 1
            segment = f"{base}_{number}"
        used.add(segment)
        pairs.append((segment, sublayer))
    return pairs


def strip_suffix(segment):
    """Returns `segment` without a trailing `_N` (`"softmax_7"`: `"softmax"`).

    A segment without such a suffix is returned as it is.
    """
    match = _SUFFIX.fullmatch(segment)
    return match.group(1) if match else segment


def match_segment(children, written, parent=None):
    """Finds the sublayer that one written path segment names.

    A segment equal to a child's segment names that child. Otherwise Keras's
    generated `_N` suffix may be left out: `"softmax"` names the child
    `softmax_7` where it is the one child whose segment is `softmax`
    followed by `_N`.

    Args:
        children: the `(segment, sublayer)` pairs of the parent, as
            `held_sublayers` returns them.
        written: the segment as written in a path (no `/`).
        parent: the parent's path or name, for error messages.

    Returns:
        The matching `(segment, sublayer)` pair of `children`; its segment
        is the real one, for the canonical path.

    Raises:
        ValueError: If `written` names no child (the message lists the
            parent's sublayers and the closest segments), or, without its
            suffix, several (the message names them).

    Example:

    >>> children = [("query", None), ("softmax_7", None)]
    >>> match_segment(children, "softmax")
    ('softmax_7', None)
    """
    where = f"'{parent}'" if parent else "The layer"
    return _match(children, written, where)


def _match(children, written, where):
    for child in children:
        if child[0] == written:
            return child
    bare = [
        child
        for child in children
        if strip_suffix(child[0]) == written and child[0] != written
    ]
    if len(bare) == 1:
        return bare[0]
    segments = [segment for segment, _ in children]
    if bare:
        raise ValueError(
            f"The segment '{written}' is ambiguous in {where}: without their "
            f"`_N` suffix, {len(bare)} of its sublayers are named like it: "
            f"{[segment for segment, _ in bare]}. Write one of these names "
            "in full."
        )
    if not children:
        raise ValueError(
            f"{where} holds no sublayers, so it has no sublayer '{written}'."
        )
    hint = ""
    numbered = [
        segment
        for segment in segments
        if strip_suffix(segment) == strip_suffix(written)
    ]
    if len(numbered) == 1 and written != strip_suffix(written):
        # A suffix written in another process: Keras numbers generated
        # names per process, so the same sublayer has another number here.
        hint = (
            " Keras numbers generated names per process: here it is "
            f"'{numbered[0]}'; write '{strip_suffix(written)}' to name it "
            "in any process."
        )
    else:
        close = difflib.get_close_matches(written, segments, n=3, cutoff=0.5)
        if close:
            hint = f" Closest: {close}."
    raise ValueError(
        f"{where} has no sublayer '{written}'.{hint} Its sublayers are: "
        f"{segments}."
    )


def walk(layer, depth=None):
    """Returns every layer below `layer`, with its path, depth first.

    Each sublayer comes right after its parent (pre-order), in the order of
    `held_sublayers`. A layer reached a second time (shared, or holding a
    layer above it) is listed once, at its first path, and not entered
    again.

    Args:
        layer: a `keras.layers.Layer` (a model included).
        depth: how many levels to go down: `1` gives the layers `layer`
            holds directly; `None` (default) goes to every depth.

    Returns:
        A list of `(path, sublayer)` pairs, `path` `/`-separated segments
        relative to `layer`.

    Raises:
        TypeError: If `layer` is not a `keras.layers.Layer`.
        ValueError: If `depth` is neither `None` nor a positive integer.

    Example:

    >>> inner = keras.Sequential([keras.layers.Dense(2, name="fc")],
    ...                          name="inner")
    >>> outer = keras.Sequential([inner, keras.layers.Dense(1, name="out")])
    >>> [path for path, _ in walk(outer)]
    ['inner', 'inner/fc', 'out']
    """
    if depth is not None and (
        isinstance(depth, bool) or not isinstance(depth, int) or depth < 1
    ):
        raise ValueError(
            f"`depth` must be None or a positive integer. Received: "
            f"depth={depth!r}"
        )
    found = []
    seen = {id(layer)}

    def descend(parent, prefix, level):
        for segment, sublayer in held_sublayers(parent):
            if id(sublayer) in seen:
                continue
            seen.add(id(sublayer))
            path = prefix + segment
            found.append((path, sublayer))
            if depth is None or level < depth:
                descend(sublayer, path + graph.SEPARATOR, level + 1)

    descend(layer, "", 1)
    return found


def find(layer, path):
    """Follows a `/`-separated path of sublayer segments from `layer`.

    Each segment is matched with `match_segment`, so Keras's generated
    `_N` suffixes may be left out where the rest is unique in the parent.

    Args:
        layer: the `keras.layers.Layer` the path starts from.
        path: segments separated by `/`, such as
            `"vit_encoder/transformer_block_1/mha/softmax"`.

    Returns:
        `(canonical_path, sublayer)`: the path with every segment as
        `held_sublayers` lists it (real names), and the layer it names.

    Raises:
        ValueError: If a segment names no sublayer of its parent, or
            several; the message lists that parent's sublayers.

    Example:

    >>> block = keras.Sequential([keras.layers.Dense(2, name="fc")],
    ...                          name="block")
    >>> path, fc = find(block, "fc")
    >>> path, fc.name
    ('fc', 'fc')
    """
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"A sublayer path must be a non-empty string of segments "
            f"separated by '/'. Received: {path!r}"
        )
    segments = []
    current = layer
    for written in path.split(graph.SEPARATOR):
        parent = graph.SEPARATOR.join(segments) or layer.name
        where = f"'{parent}' ({type(current).__name__})"
        children = held_sublayers(current)
        if not children and not current.built:
            raise ValueError(
                f"{where} is not built, so it holds no sublayers yet (Keras "
                "layers create theirs in `build()`): call the model once "
                f"before naming '{written}' inside it."
            )
        segment, current = _match(children, written, where)
        segments.append(segment)
    return graph.SEPARATOR.join(segments), current
