"""Edit activations while a model runs: `kt.edit` and the `kt.edits`.

`with kt.edit(model, {path: edit}):` changes the value at each point for
every way the model runs inside the block: ablation (`Zero`), scaling,
steering vectors (`Add`), activation patching (`Replace`), clamping and
projecting a direction out. An edit is any callable
`activation -> activation` of the same shape and dtype.

An edit reaches its points through the same hooks that watch them for
taps (`watch`): while the block is open, each edited layer carries one
hook whose edit recording changes the call's input or output, in the order
the blocks were entered (nested blocks compose), before any tap records
it. The model's compiled functions (and those of keras_tap's models over
it) are discarded when the block opens and when it closes, so that Keras
traces them again with, then without, the edits.
"""

import threading
import weakref

import keras

from keras_tap.taps import paths, points, watch
from keras_tap.taps.edits import (  # noqa: F401 (kt.edits)
    Add,
    Clamp,
    Edit,
    ProjectOut,
    Replace,
    Scale,
    Zero,
    _ShapeError,
)

FUNCTIONS = (
    "predict_function",
    "train_function",
    "test_function",
    "generate_function",
)

_LOCK = threading.Lock()
_WRAPPERS = {}  # id(base model) -> [weakref to a keras_tap model over it]
_INDEXES = {}  # id(model) -> (weakref to model, paths.LayerIndex)


# -- the edits -------------------------------------------------------------



def _checked(name, edit, activation):
    """`edit(activation)`, raising when it changes the shape or dtype."""
    try:
        edited = edit(activation)
    except _ShapeError as e:
        raise ValueError(f"kt.edit at {name!r}: {e}") from None
    want_shape = tuple(activation.shape)
    want_dtype = keras.backend.standardize_dtype(activation.dtype)
    if hasattr(edited, "shape") and hasattr(edited, "dtype"):
        have_shape = tuple(edited.shape)
        have_dtype = keras.backend.standardize_dtype(edited.dtype)
    else:
        have_shape, have_dtype = None, type(edited).__name__
    same_shape = have_shape is not None and len(have_shape) == len(
        want_shape
    ) and all(
        a is None or b is None or a == b
        for a, b in zip(have_shape, want_shape)
    )
    if not same_shape or have_dtype != want_dtype:
        raise ValueError(
            f"kt.edit: the edit {edit!r} at {name!r} returned shape "
            f"{have_shape} and dtype {have_dtype}, but the activation there "
            f"has shape {want_shape} and dtype {want_dtype}. An edit must "
            "keep both."
        )
    return edited


def _replace_element(value, key, edited):
    if isinstance(value, dict):
        return {**value, key: edited}
    items = list(value)
    items[key] = edited
    return tuple(items) if isinstance(value, tuple) else items


def suffix_of(point):
    """`(kind, key)` of a point's suffix: `("output", None)` for none,
    `("input", 0)` for `":input"`."""
    if not point.suffix:
        return points.OUTPUT, None
    _, kind, key = paths.split_suffix("p" + point.suffix)
    if kind == points.INPUT and key is None:
        key = 0
    return kind, key


class Spec:
    """One edit at one point: the call index (`None`: every call), the
    kind (`"input"` or `"output"`), the element key and the edit.
    `structured`: the edit takes the whole (structured) value, unchecked.
    """

    def __init__(self, name, index, kind, key, fn, structured=False):
        self.name, self.index = name, index
        self.kind, self.key, self.fn = kind, key, fn
        self.structured = structured

    def output(self, value):
        key = self.key
        if self.structured:
            if key is None:
                return self.fn(value)
            return _replace_element(value, key, self.fn(value[key]))
        if key is None and isinstance(value, (tuple, list)):
            key = 0  # `(hidden, cache)`: the bare path edits the hidden state.
        if key is None:
            return _checked(self.name, self.fn, value)
        edited = _checked(self.name, self.fn, value[key])
        return _replace_element(value, key, edited)


def _edit_keyword(spec, kwargs):
    """`kwargs` with the keyword argument `spec.key` edited."""
    if spec.key not in kwargs:
        raise ValueError(
            f"kt.edit: {spec.name!r} edits the keyword argument "
            f"{spec.key!r} of the call, but the layer was called without "
            f"it (its keyword arguments: {sorted(kwargs)})."
        )
    kwargs = dict(kwargs)
    if spec.structured:
        kwargs[spec.key] = spec.fn(kwargs[spec.key])
    else:
        kwargs[spec.key] = _checked(spec.name, spec.fn, kwargs[spec.key])
    return kwargs


class EditRecording(watch.Recording):
    """The active recording of a `kt.edit` block: changes values."""

    edits = True

    def __init__(self, watcher, specs, roots):
        super().__init__(watcher)
        self.specs = specs  # {id(layer): [_Spec, ...]}
        self.roots = roots  # ids of the models whose call starts a run
        # The layers whose call inputs this changes (`edited_inputs`).
        self.inputs = frozenset(
            key for key, found in specs.items()
            if any(spec.kind == points.INPUT for spec in found)
        )

    def begin_run(self):
        self.counts.clear()

    def before(self, key, args, kwargs):
        """Count the call; edit its inputs: `(args, kwargs, index)`."""
        if key in self.roots:
            self.counts.clear()
        index = self.counts.get(key, 0)
        self.counts[key] = index + 1
        return self.edit_inputs(key, index, args, kwargs) + (index,)

    def edit_inputs(self, key, index, args, kwargs):
        """Edit the inputs of call `index`: `(args, kwargs)`."""
        for spec in self.specs.get(key, ()):
            if spec.kind != points.INPUT or spec.index not in (None, index):
                continue
            if isinstance(spec.key, str):
                kwargs = _edit_keyword(spec, kwargs)
                continue
            position = spec.key or 0
            if position >= len(args):
                raise ValueError(
                    f"kt.edit: {spec.name!r} edits positional input "
                    f"{position} of the call, but the layer was called with "
                    f"{len(args)} positional input(s)."
                )
            args = list(args)
            if spec.structured:
                args[position] = spec.fn(args[position])
            else:
                args[position] = _checked(
                    spec.name, spec.fn, args[position]
                )
            args = tuple(args)
        return args, kwargs

    def after(self, key, index, outputs):
        """Edit the call's outputs."""
        for spec in self.specs.get(key, ()):
            if spec.kind == points.OUTPUT and spec.index in (None, index):
                outputs = spec.output(outputs)
        return outputs


def edit_call_inputs(key, index, args):
    """The positional inputs `args` of call `index` of the layer `key`
    with the active edits applied, in order (a graph that inlines a nested
    model applies its edits so, since the model itself is never called)."""
    for recording in watch.edit_recordings():
        if key in recording.specs:
            args, _ = recording.edit_inputs(key, index, args, {})
    return args


def edit_call_outputs(key, index, outputs):
    """The outputs of call `index` of the layer `key` with the active
    edits applied, in order (see `edit_call_inputs`)."""
    for recording in watch.edit_recordings():
        if key in recording.specs:
            outputs = recording.after(key, index, outputs)
    return outputs


# -- the block ---------------------------------------------------------------


def track(wrapper, base):
    """Register a keras_tap model over `base`, whose compiled functions
    `kt.edit` blocks on `base` discard."""
    with _LOCK:
        refs = [r for r in _WRAPPERS.get(id(base), []) if r() is not None]
        refs.append(weakref.ref(wrapper))
        _WRAPPERS[id(base)] = refs


def _discard_functions(models):
    """Drop the compiled functions of `models` and the keras_tap models
    over them (Keras traces them again on the next call)."""
    seen, queue = set(), list(models)
    while queue:
        model = queue.pop()
        if id(model) in seen:
            continue
        seen.add(id(model))
        for name in FUNCTIONS:
            if getattr(model, name, None) is not None:
                setattr(model, name, None)
        with _LOCK:
            refs = list(_WRAPPERS.get(id(model), []))
        queue.extend(r() for r in refs if r() is not None)
        extractors = vars(model).get("_extractors") or {}
        queue.extend(
            e for e in extractors.values() if isinstance(e, keras.Model)
        )


def _index(model):
    with _LOCK:
        cached = _INDEXES.get(id(model))
    if cached is not None and cached[0]() is model:
        return cached[1]
    index = paths.LayerIndex(model)
    with _LOCK:
        _INDEXES[id(model)] = (weakref.ref(model), index)
    return index


def _target(model):
    """`(model whose paths resolve, models whose functions to drop)`: a
    keras-hub task resolves in its backbone."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model) and backbone is not model:
        return backbone, [model, backbone]
    return model, [model]


class EditBlock:
    """The context manager `kt.edit` returns (entered once)."""

    def __init__(self, model, edits):
        paths.check_model(model)
        if not isinstance(edits, dict) or not edits:
            raise ValueError(
                "kt.edit takes a non-empty dict `{path: edit}`; received "
                f"{edits!r}."
            )
        for path, fn in edits.items():
            if not callable(fn):
                raise TypeError(
                    f"kt.edit: the edit at {path!r} must be a callable "
                    "`activation -> activation` or one of `kt.edits`; "
                    f"received {type(fn).__name__}: {fn!r}."
                )
        self.model = model
        self.edits = dict(edits)
        self._recording = None

    def _resolve(self, index):
        specs, layers, owners = {}, {}, {}
        for path, fn in self.edits.items():
            try:
                resolved = index.resolve(path)
            except ValueError as error:
                raise ValueError(f"kt.edit: {error}") from None
            for name, point in resolved:
                calls = index.points.get(point.path, [])
                call = None if len(calls) <= 1 else point.index
                kind, key = suffix_of(point)
                spec = Spec(name, call, kind, key, fn)
                specs.setdefault(id(point.layer), []).append(spec)
                layers[id(point.layer)] = point.layer
                if point.owner is not None:
                    owners[id(point.owner)] = point.owner
        return specs, layers, owners

    def __enter__(self):
        if self._recording is not None:
            raise RuntimeError("A kt.edit block can be entered only once.")
        target, models = _target(self.model)
        for model in models:
            if not model.built:
                raise ValueError(
                    f"kt.edit: model '{model.name}' is not built. Build it "
                    "first: call it on a batch (`model(x)`), or "
                    "`model.build(input_shape)`, or give it a "
                    "`keras.Input`."
                )
        specs, layers, owners = self._resolve(_index(target))
        roots = {id(m): m for m in models}
        watcher = watch.Watcher(
            list(layers.values()) + list(roots.values()),
            explicit=owners.values(),
        )
        recording = EditRecording(watcher, specs, frozenset(roots))
        _discard_functions(models)
        recording.__enter__()
        self._recording = recording
        self._models = models
        return self

    def __exit__(self, *exc_info):
        try:
            self._recording.__exit__(*exc_info)
        finally:
            _discard_functions(self._models)
        return False


def edit(model, edits):
    """Change activations at points of `model` while the block is open.

    `with kt.edit(model, {path: edit, ...}):` applies each edit to the
    value at its point for every way the model runs inside the block: a
    direct call, `predict`, `fit`, `evaluate`, and a `TapModel`,
    `FeatureModel` or extractor over it; for a keras-hub task (a
    `CausalLM`), paths resolve in `task.backbone` and `generate` is edited
    too. Taps at an edited point return the edited value. Nested blocks
    compose: an inner edit applies to the value the outer one produced.
    On a point whose output is a tuple (a decoder block's `(hidden,
    cache)` while generating), the bare path edits element 0;
    `":output[i]"` picks another, `":input"` edits the call's input
    (`":input[name]"` its keyword argument `name`). When
    the block closes, the model computes exactly what it did before: the
    compiled functions of the model (and of keras_tap's models over it)
    are discarded when the block opens and when it closes.

    Args:
        model: a built Keras model, or a keras-hub task. A model that holds
            `model` as a layer is not reached: open the edit on the
            outermost model that you run.
        edits: `{path: edit}`: paths as `kt.TapModel` takes them (`name@i`,
            `/`-separated nested paths, suffixes, `re:pattern`); each edit
            a `kt.edits` object or a callable `activation -> activation`.

    Returns:
        A context manager.

    Raises:
        ValueError: (on entering) for a model that is not built, a path
            that matches nothing or a layer that never runs; (while the
            model runs) for an edit that changes the activation's shape or
            dtype, or a `Replace` value of another batch size.
        TypeError: for an edit that is not callable.

    Example:

    >>> import keras, numpy as np, keras_tap as kt
    >>> inputs = keras.Input((3,))
    >>> hidden = keras.layers.Dense(4, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    >>> with kt.edit(model, {"hidden": kt.edits.Zero()}):
    ...     zeroed = model.predict(np.ones((2, 3)), verbose=0)
    >>> np.allclose(zeroed, model.layers[-1].bias.numpy())
    True
    """
    return EditBlock(model, edits)
