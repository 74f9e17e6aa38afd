"""Points: one call of one layer or operation, and the value picked there.

A `Point` is what a tap path resolves to: a layer (or operation) and the
index of one of its calls, with the value's shape and, in a rebuilt graph,
its tensor. A suffix picks another value at the same call: `":input"` (the
first positional argument), `":input[i]"`, `":input[name]"` (the keyword
argument `name`, as passed), or one element of a structured output,
`":output[i]"` / `":output[key]"` (`Point.select`).
"""

import difflib

import keras

INPUT, OUTPUT = "input", "output"


class Point:
    """One call of one layer (or operation): a tappable point.

    Attributes:
        path: the layer path, `/`-separated through nested models and
            layers.
        index: the 0-based call index of the layer within the traced model.
        layer: the layer (or operation) object.
        tensor: in a `GraphTrace`, the symbolic value of this point; `None`
            for a point reached by watching (inside a layer, or in a
            subclassed model).
        shape: the value's shape (a tuple, or a structure of tuples).
        args: the positional arguments of the call: tensors in a
            `GraphTrace`, else their shapes.
        kwargs: the keyword arguments of the call, `{name: value}`:
            tensors in a `GraphTrace`, else their shapes (`NotTensor` for
            a value without a tensor, such as `None` or a bool).
        anchor: for a watched point inside a graph layer, the graph tensor
            of the enclosing layer call (the graph must compute it).
        owner: the attention layer that must compute attention explicitly
            for this point to run (a `MultiHeadAttention`'s softmax).
        suffix: `""`, or the selector of the value (`":input"`,
            `":output[1]"`).
        pick: for a watched point with a suffix, `pick(args, outputs)`.
        call_output: for a graph point on an input of a call, the call's
            output tensor (see `inside_call`).
    """

    def __init__(self, path, index, layer, tensor=None, shape=None,
                 args=None, anchor=None, owner=None, kwargs=None):
        self.path = path
        self.index = index
        self.layer = layer
        self.tensor = tensor
        self.shape = shape
        self.args = args
        self.kwargs = kwargs
        self.anchor = anchor
        self.owner = owner
        self.suffix = ""
        self.pick = None
        self.call_output = None
        self.input_key = None

    @property
    def call_name(self):
        return f"{self.path}@{self.index}"

    @property
    def watched(self):
        """Whether the point is reached by watching (no graph tensor)."""
        return self.tensor is None

    @property
    def structured(self):
        """Whether the value is a tuple, list or dict of tensors."""
        return self.shape is not None and not is_shape(self.shape)

    def element_suffixes(self):
        """`[":output[0]", ...]` (or `":output[key]"`), one per element of
        a structured value; `[]` for one tensor."""
        return [suffix for suffix, _ in _elements(self.shape)]

    def select(self, kind, key=None, written=None):
        """A copy of this point for the suffix `:input[key]` or
        `:output[key]` (`key` `None`: `:input`, the first input, or
        `:output`, the whole output; a string `key` of `:input` is a
        keyword argument of the call).

        Raises:
            ValueError: when the point has no such input or element.
        """
        written = written or self.path
        if kind == OUTPUT and key is None:
            return self
        if kind == INPUT:
            key = 0 if key is None else key
            if self.args is None:
                raise ValueError(
                    f"Tap {written!r}: the inputs of '{self.path}' are not "
                    "known (it never ran in the traced call)."
                )
            if isinstance(key, str):
                return self._keyword(key, written)
            if not self.args:
                valid = self.input_suffixes()
                hint = (
                    f" Name a keyword argument instead: {valid}."
                    if valid else
                    " Tap the layer that computes the input instead "
                    "(`kt.list_layers(model)` lists the points before it)."
                )
                raise ValueError(
                    f"Tap {written!r}: '{self.path}' is called with keyword "
                    "arguments only (no positional input), so "
                    f"':input{'' if key == 0 else f'[{key}]'}' cannot reach "
                    f"its inputs.{hint}"
                )
            if not isinstance(key, int) or key >= len(self.args):
                raise ValueError(
                    f"Tap {written!r}: '{self.path}' is called with "
                    f"{len(self.args)} positional input(s), so it has no "
                    f"input {key!r}. Valid suffixes: "
                    f"{self.input_suffixes()}."
                )
            value = self.args[key]
            if self.watched:
                shape, tensor = value, None
            else:
                leaves = keras.tree.flatten(value)
                if not leaves or not all(
                    isinstance(t, keras.KerasTensor) for t in leaves
                ):
                    raise ValueError(
                        f"Tap {written!r}: input {key} of '{self.path}' is "
                        f"not a tensor (received {value!r})."
                    )
                shape, tensor = shape_of(value), value
            suffix = ":input" if key == 0 else f":input[{key}]"
        else:
            if self.structured is False:
                raise ValueError(
                    f"Tap {written!r}: '{self.path}' has one output (a "
                    f"single tensor), so it has no ':output[{key}]'. Write "
                    "the bare path."
                )
            valid = [suffix for suffix, _ in _elements(self.shape, depth=1)]
            suffix = f":output[{key}]"
            if suffix not in valid:
                raise ValueError(
                    f"Tap {written!r}: the output of '{self.path}' has no "
                    f"element {key!r}. Valid suffixes: {valid}."
                )
            shape = self.shape[key]
            tensor = None if self.watched else self.tensor[key]
        return self._copy(tensor, shape, suffix, kind, key)

    def _copy(self, tensor, shape, suffix, kind, key):
        point = Point(self.path, self.index, self.layer, tensor, shape,
                      None, self.anchor, self.owner)
        point.suffix = suffix
        if self.watched:
            point.tensor = None
            point.pick = _picker(kind, key)
        elif kind == INPUT:
            # Read from the graph, the producer's tensor; while a `kt.edit`
            # changes this input, `inside_call` records it in the call.
            point.call_output = self.tensor
            point.input_key = key
        return point

    def inside_call(self):
        """For a graph point on an input of a layer call (`:input`,
        `:input[i]`, `:input[name]`): a copy recorded by watching the call,
        so its value is what the layer received (after any `kt.edit` of
        that input), anchored on the call's output tensor. `None` for any
        other point.
        """
        output = self.call_output
        if self.watched or output is None:
            return None
        point = Point(self.path, self.index, self.layer, None, self.shape,
                      None, output, self.owner)
        point.suffix = self.suffix
        point.pick = _picker(INPUT, self.input_key)
        return point

    def input_suffixes(self):
        """The input suffixes of this call: `":input"`, `":input[i]"` for
        its positional arguments, then `":input[name]"` for each keyword
        argument that holds tensors."""
        count = len(self.args or ())
        found = _input_suffixes(count) if count else []
        for name, value in (self.kwargs or {}).items():
            if _holds_tensors(value, self.watched):
                found.append(f":input[{name}]")
        return found

    def _keyword(self, key, written):
        """The copy of this point for `:input[key]`, a keyword argument."""
        kwargs = self.kwargs
        if kwargs is None:
            raise ValueError(
                f"Tap {written!r}: the inputs of '{self.path}' are not "
                "known (it never ran in the traced call)."
            )
        suffix = f":input[{key}]"
        if key not in kwargs:
            valid = self.input_suffixes()
            close = difflib.get_close_matches(
                suffix, valid, n=len(valid), cutoff=0.0
            )
            named = sorted(kwargs) or "none"
            raise ValueError(
                f"Tap {written!r}: '{self.path}' was not called with a "
                f"keyword argument {key!r} (its keyword arguments: "
                f"{named}). Valid suffixes: {close}."
            )
        value = kwargs[key]
        if not _holds_tensors(value, self.watched):
            shown = value.value if isinstance(value, NotTensor) else value
            raise ValueError(
                f"Tap {written!r}: the keyword argument {key!r} of "
                f"'{self.path}' is not a tensor (it was passed {shown!r}), "
                "so it is not a point. Valid suffixes: "
                f"{self.input_suffixes()}."
            )
        if self.watched:
            shape, tensor = value, None
        else:
            shape, tensor = shape_of(value), value
        return self._copy(tensor, shape, suffix, INPUT, key)

    def __repr__(self):
        return (
            f"Point({self.call_name}{self.suffix}, "
            f"{type(self.layer).__name__})"
        )


class Calls(list):
    """The points of one path (a list), and the layer at that path."""

    def __init__(self, layer, points=()):
        super().__init__(points)
        self.layer = layer


def _picker(kind, key):
    """`pick(args, outputs, kwargs)`: the value the suffix selects."""
    if kind == INPUT and isinstance(key, str):
        return lambda args, outputs, kwargs=None: kwargs[key]
    if kind == INPUT:
        return lambda args, outputs, kwargs=None: args[key]
    return lambda args, outputs, kwargs=None: outputs[key]


class NotTensor:
    """A keyword argument of a watched call that holds no tensor (`None`,
    a bool, a Python number): recorded as it is, never a point."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"NotTensor({self.value!r})"


def keyword_shapes(kwargs):
    """`{name: shape}` for the keyword arguments of a call: the shapes of
    the tensors in each value, `NotTensor(value)` for a value that holds
    none."""
    found = {}
    for name, value in (kwargs or {}).items():
        leaves = keras.tree.flatten(value)
        if leaves and all(hasattr(t, "shape") for t in leaves):
            found[name] = shape_of(value)
        else:
            found[name] = NotTensor(value)
    return found


def _holds_tensors(value, watched):
    """Whether a recorded keyword argument is a point: tensors only."""
    if watched:
        return not isinstance(value, NotTensor) and value is not None
    leaves = keras.tree.flatten(value)
    return bool(leaves) and all(
        isinstance(t, keras.KerasTensor) for t in leaves
    )


def _input_suffixes(count):
    return [":input"] + [f":input[{i}]" for i in range(1, count)]


def is_shape(shape):
    """Whether `shape` is one tensor's shape (a tuple of ints and Nones)."""
    return isinstance(shape, tuple) and all(
        d is None or isinstance(d, int) for d in shape
    )


def _elements(shape, depth=None):
    """`[(":output[i]" or ":output[key]", shape), ...]` for a structured
    shape, nested structures flattened (`":output[0][1]"`)."""
    if is_shape(shape) or shape is None:
        return []
    items = shape.items() if isinstance(shape, dict) else enumerate(shape)
    found = []
    for key, inner in items:
        suffix = f":output[{key}]"
        if depth == 1 or is_shape(inner) or inner is None:
            found.append((suffix, inner))
        else:
            found.extend(
                (suffix + rest[len(":output"):], s)
                for rest, s in _elements(inner)
            )
    return found


def flatten_elements(value):
    """`[(":output[i]", tensor), ...]` for a structured value, as
    `Point.element_suffixes` names them; `[("", value)]` for a tensor."""
    if not isinstance(value, (list, tuple, dict)):
        return [("", value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    found = []
    for key, inner in items:
        for rest, leaf in flatten_elements(inner):
            tail = rest[len(":output"):] if rest else ""
            found.append((f":output[{key}]{tail}", leaf))
    return found


def shape_of(value):
    """The shape of each tensor in `value` (a tuple), `None` elsewhere."""
    return keras.tree.map_structure(
        lambda t: _plain_shape(t.shape) if hasattr(t, "shape") else None,
        value,
    )


def _plain_shape(shape):
    """A shape of ints and `None`s: a symbolic dimension of JAX's shape
    inference (a batch of unknown size) becomes `None`."""
    return tuple(d if d is None or isinstance(d, int) else None
                 for d in shape)


def merge_shapes(first, second):
    """Two runs' shapes, with the dimensions that differ set to `None`."""
    if is_shape(first) and is_shape(second) and len(first) == len(second):
        return tuple(a if a == b else None for a, b in zip(first, second))
    if isinstance(first, dict) and isinstance(second, dict):
        return {k: merge_shapes(v, second.get(k)) for k, v in first.items()}
    if (
        isinstance(first, (list, tuple))
        and isinstance(second, (list, tuple))
        and len(first) == len(second)
    ):
        return type(first)(
            merge_shapes(a, b) for a, b in zip(first, second)
        )
    return first


def zeros_like_spec(spec, batch):
    """Zeros shaped like the `keras.KerasTensor`s in `spec` (other values
    kept), `batch` for a free dimension."""
    return keras.tree.map_structure(
        lambda t: keras.ops.zeros(
            tuple(batch if d is None else d for d in t.shape), t.dtype
        ) if isinstance(t, keras.KerasTensor) else t,
        spec,
    )
