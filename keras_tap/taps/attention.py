"""Attention probabilities: make fused attention layers run their softmax.

Keras's `MultiHeadAttention` (3.15) computes attention with the fused
`keras.ops.dot_product_attention` whenever its dropout is 0, the scores are
not requested and the projected query has rank 4 (the usual case): its
softmax sublayer (`softmax`, `softmax_7`, ...) is then never called, so the
attention probabilities exist nowhere. A tap on that softmax must still
return them, so while it is watched the attention layer runs explicitly:

- `softmax_owner(layer)`: an attention layer and the softmax it holds.
- `hooks_for(root, layers)`: the attention layers, below `root`, that must
  run explicitly for the watched `layers` (their softmaxes).
- `explicit_call(layer, call, args, kwargs)`: what the watch hook of such a
  layer runs instead of `call(*args, **kwargs)`: the same call, made to
  compute attention through the softmax sublayer; it returns what the plain
  call returns (same values up to float rounding).
- `probabilities_shape(layer)`: the softmax's output shape,
  `(batch, heads, query, key)`, from the layer's build shapes, even where
  Keras fuses and the softmax never runs.

How each attention layer is made explicit (keras-hub 0.32 checked):

- `keras.layers.MultiHeadAttention`, and subclasses whose `call` takes
  `return_attention_scores` (keras-hub's `CachedMultiHeadAttention`, used
  by GPT-2's `TransformerDecoder`; ViT's and BERT's blocks hold a plain
  Keras MHA): called with `return_attention_scores=True`, which takes
  Keras's explicit path through the softmax; the scores are dropped from
  the result unless the caller asked for them (`CachedMultiHeadAttention`
  returns `(output, scores, cache)` when given a cache, `(output, cache)`
  without the scores). ViT's MHA has dropout 0 and fuses; BERT and GPT-2
  default to dropout 0.1, which takes the explicit path anyway, and fuse
  when built with `dropout=0`.
- Subclasses whose `call` has no `return_attention_scores` (keras-hub's
  `MoonshineMultiHeadAttention`) but compute attention with the inherited
  `_compute_attention`: that method is asked for the scores while the call
  runs, and the layer's call drops them itself.
- keras-hub's Gemma attention (`CachedGemmaAttention`, likewise Gemma 3 and
  4, Mixtral, Qwen-MoE) is a plain `Layer` holding its own `softmax`; it
  decides per call with its `_use_fused_attention_op()`, which is true only
  on the JAX and torch backends on a GPU (not a T4) or a TPU: on
  TensorFlow, and on CPUs, it always calls its softmax. Its softmax output
  is `(batch, key_value_heads, query_heads // key_value_heads, query,
  key)`. While watched, `_use_fused_attention_op` answers `False`.
- Other keras-hub decoders (Llama, Mistral, Qwen, Phi-3, GPT-NeoX) fuse
  whenever the backend has a fused op (JAX, torch), decided by a module
  function, not per layer: `softmax_owner` does not claim them; their
  softmax runs on TensorFlow, and a tap on it elsewhere raises that the
  point did not run.

One difference is Keras's own: a query position that may attend to no key
at all (a padded query under Keras masks, e.g. after
`Embedding(mask_zero=True)`, which mask whole rows) gets probabilities of
zero on the explicit path, and attention spread evenly over all keys on
the fused one, so the output there differs (the output projection's bias
alone, against the projected mean of the values); every other position
agrees.

An attribute changed for the explicit path (the second and third cases)
is set on the layer instance while at least one explicit call runs,
counted under a lock, and removed after the last: a call of the same layer
in another thread meanwhile also computes attention explicitly, which
gives the same values up to float rounding.

Example:

>>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
>>> x = np.ones((1, 3, 8), "float32")
>>> _ = mha(x, x)
>>> owner, softmax = softmax_owner(mha)
>>> owner is mha and type(softmax).__name__
'Softmax'
>>> y = explicit_call(mha, mha.call, (x, x), {})  # the softmax runs
>>> tuple(y.shape), probabilities_shape(mha)
((1, 3, 8), (1, 2, 3, 3))
"""

import contextlib
import inspect
import threading

import keras

from keras_tap.taps import sublayers

_SCORES = "return_attention_scores"
_LOCK = threading.Lock()
_OVERRIDES = {}  # (id(layer), attribute) -> [count, value before or _MISSING]
_MISSING = object()


def _is_mha(layer):
    return isinstance(layer, keras.layers.MultiHeadAttention)


def _has_fused_switch(layer):
    return callable(getattr(type(layer), "_use_fused_attention_op", None))


def softmax_owner(layer):
    """Returns an attention layer and the softmax sublayer it holds.

    An attention layer is a `keras.layers.MultiHeadAttention` (any subclass,
    keras-hub's included) or a keras-hub attention layer that chooses a
    fused op per call (Gemma's `CachedGemmaAttention`, ...). Its softmax is
    the one `keras.layers.Softmax` it holds directly (found through
    `sublayers.held_sublayers`, whatever attribute holds it).

    Args:
        layer: any `keras.layers.Layer`.

    Returns:
        `(layer, softmax)`, or `None` when `layer` is not such an attention
        layer, is not built yet (Keras creates the softmax in `build()`), or
        does not hold exactly one softmax.

    Example:

    >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    >>> softmax_owner(mha) is None  # not built: no softmax yet
    True
    >>> softmax_owner(keras.layers.Dense(2)) is None
    True
    """
    if not isinstance(layer, keras.layers.Layer):
        return None
    if not (_is_mha(layer) or _has_fused_switch(layer)):
        return None
    found = [
        sublayer
        for _, sublayer in sublayers.held_sublayers(layer)
        if isinstance(sublayer, keras.layers.Softmax)
    ]
    if len(found) != 1:
        return None
    return layer, found[0]


def hooks_for(root, layers):
    """Returns the attention layers that must run explicitly for `layers`.

    The watch mechanism calls this once for the layers a watcher watches:
    every attention layer below `root` (or `root` itself) whose softmax is
    one of `layers` gets a hook that runs `explicit_call` instead of its
    plain call.

    Args:
        root: the `keras.layers.Layer` (usually the model) to search.
        layers: the watched layers; those that are not the softmax of an
            attention layer are ignored.

    Returns:
        A list of `(attention_layer, softmax)` pairs, in the order
        `sublayers.walk` reaches the attention layers, each once.

    Example:

    >>> inputs = keras.Input((3, 8))
    >>> mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    >>> model = keras.Model(inputs, mha(inputs, inputs))
    >>> _, softmax = sublayers.find(model, "mha/softmax")
    >>> hooks_for(model, [softmax]) == [(mha, softmax)]
    True
    """
    wanted = {id(layer) for layer in layers}
    if not wanted:
        return []
    candidates = [root] + [layer for _, layer in sublayers.walk(root)]
    found = []
    for candidate in candidates:
        owner = softmax_owner(candidate)
        if owner is not None and id(owner[1]) in wanted:
            found.append(owner)
    return found


def explicit_call(layer, call, args, kwargs):
    """Runs `call(*args, **kwargs)` with attention computed explicitly.

    The softmax sublayer of `layer` runs during the call, so a watcher of
    it records the attention probabilities. The result is what the plain
    call returns (the attention output, or the structure the caller asked
    for), equal up to float rounding. It works eagerly, inside
    `tf.function` and under a gradient tape, with every mask argument of
    the layer's call.

    Args:
        layer: an attention layer, as `softmax_owner` accepts.
        call: the function to run: `layer.call`, or the hook's saved
            original `call` of `layer`.
        args: the positional arguments of the call (a tuple or list).
        kwargs: the keyword arguments of the call (a dict).

    Returns:
        The outputs of the call.

    Raises:
        ValueError: If `layer` is not an attention layer of a kind that
            `softmax_owner` accepts, or if it uses flash attention, which
            never computes the probabilities.

    Example:

    >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    >>> x = np.ones((1, 3, 8), "float32")
    >>> _ = mha(x, x)  # built: it holds its softmax
    >>> out, scores = explicit_call(
    ...     mha, mha.call, (x, x), {"return_attention_scores": True})
    >>> tuple(scores.shape)
    (1, 2, 3, 3)
    """
    if not (_is_mha(layer) or _has_fused_switch(layer)):
        raise ValueError(
            "explicit_call() expects an attention layer, as softmax_owner() "
            "accepts: a keras.layers.MultiHeadAttention or a keras-hub "
            "attention layer with a fused-op switch. Received: "
            f"'{getattr(layer, 'name', layer)}' ({type(layer).__name__})."
        )
    if _has_fused_switch(layer):
        with _override(layer, "_use_fused_attention_op", _never_fused):
            return call(*args, **kwargs)
    signature = inspect.signature(call)
    if _SCORES not in signature.parameters:
        return _through_compute_attention(layer, call, args, kwargs)
    bound = signature.bind(*args, **kwargs)
    if bound.arguments.get(_SCORES):
        return _call(layer, call, args, kwargs)  # explicit already
    bound.arguments[_SCORES] = True
    outputs = _call(layer, call, bound.args, bound.kwargs)
    return _without_scores(layer, outputs)


def probabilities_shape(layer, query_shape=None, value_shape=None):
    """Returns the output shape of a `MultiHeadAttention`'s softmax.

    With the default attention axes this is `(batch, heads, query, key)`;
    with `attention_axes`, the query's other inner axes and the heads,
    then the query's attention axes, then the key's, as Keras lays the
    scores out. It is computed from shapes alone, so it exists where
    Keras fuses attention and the softmax never runs.

    Args:
        layer: a `keras.layers.MultiHeadAttention` (a subclass included).
        query_shape: the query's shape; by default the shape the layer was
            built with.
        value_shape: the value's (and key's) shape; by default
            `query_shape` when given (self-attention), else the shape the
            layer was built with.

    Returns:
        A tuple of ints and `None`s.

    Raises:
        ValueError: If `layer` is not a `MultiHeadAttention`, or has no
            build shapes and none were given.

    Example:

    >>> mha = keras.layers.MultiHeadAttention(num_heads=3, key_dim=4)
    >>> probabilities_shape(mha, (None, 5, 8), (None, 7, 8))
    (None, 3, 5, 7)
    """
    if not _is_mha(layer):
        raise ValueError(
            f"probabilities_shape() expects a keras.layers.MultiHeadAttention."
            f" Received: '{getattr(layer, 'name', layer)}' "
            f"({type(layer).__name__})."
        )
    built = (layer.get_build_config() or {}).get("shapes_dict", {})
    if query_shape is None:
        query_shape = built.get("query_shape")
        value_shape = value_shape or built.get("value_shape")
    value_shape = value_shape or query_shape
    if query_shape is None:
        raise ValueError(
            f"'{layer.name}' ({type(layer).__name__}) is not built, so its "
            "query shape is unknown: pass `query_shape` (and "
            "`value_shape`), or call the layer first."
        )
    query_shape, value_shape = tuple(query_shape), tuple(value_shape)
    rank = len(query_shape) + 1  # projected: (..., heads, key_dim)
    axes = layer.attention_axes
    if axes is None:
        axes = tuple(range(1, rank - 2))
    axes = tuple(axis if axis >= 0 else rank - 1 + axis for axis in axes)
    projected = query_shape[:-1] + (layer.num_heads,)
    kept = [projected[i] for i in range(rank - 1) if i not in axes]
    return (
        tuple(kept)
        + tuple(query_shape[axis] for axis in axes)
        + tuple(value_shape[axis] for axis in axes)
    )


def _never_fused():
    return False


def _call(layer, call, args, kwargs):
    try:
        return call(*args, **kwargs)
    except ValueError as error:
        if "flash attention" in str(error).lower():
            raise _flash_error(layer) from error
        raise


def _flash_error(layer):
    return ValueError(
        f"The attention probabilities of '{layer.name}' "
        f"({type(layer).__name__}) cannot be tapped: the layer uses flash "
        "attention, which never computes them. Create it with "
        "`flash_attention=False`, after "
        "`keras.config.disable_flash_attention()`."
    )


def _without_scores(layer, outputs):
    """Drops the scores (element 1) that the caller did not ask for."""
    if not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
        raise ValueError(
            f"'{layer.name}' ({type(layer).__name__}) was called with "
            f"`{_SCORES}=True` but returned {type(outputs).__name__} "
            "instead of a tuple holding the scores at index 1, so its "
            "attention cannot be made explicit for a softmax tap."
        )
    rest = tuple(outputs[:1]) + tuple(outputs[2:])
    return rest[0] if len(rest) == 1 else type(outputs)(rest)


def _through_compute_attention(layer, call, args, kwargs):
    """For an MHA subclass whose `call` has no `return_attention_scores`."""
    # The class's method: an explicit call already running (another thread,
    # or nested) may have set the instance attribute to `explicit` below.
    compute = getattr(type(layer), "_compute_attention", None)
    if compute is not None:
        compute = compute.__get__(layer, type(layer))
    if compute is None or _SCORES not in _parameters(compute):
        raise ValueError(
            f"The attention of '{layer.name}' ({type(layer).__name__}) "
            f"cannot be made explicit: its `call` has no `{_SCORES}` "
            "argument and it does not compute attention with "
            "MultiHeadAttention's `_compute_attention`, so its softmax "
            "cannot be tapped where the layer fuses attention."
        )

    def explicit(*inner_args, **inner_kwargs):
        bound = inspect.signature(compute).bind(*inner_args, **inner_kwargs)
        bound.arguments[_SCORES] = True
        return compute(*bound.args, **bound.kwargs)

    with _override(layer, "_compute_attention", explicit):
        return _call(layer, call, args, kwargs)


def _parameters(function):
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}


@contextlib.contextmanager
def _override(layer, attribute, value):
    """Sets `layer.<attribute>` while at least one such block runs."""
    key = (id(layer), attribute)
    with _LOCK:
        entry = _OVERRIDES.get(key)
        if entry is None:
            before = vars(layer).get(attribute, _MISSING)
            object.__setattr__(layer, attribute, value)
            entry = _OVERRIDES[key] = [0, before]
        entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry[0] -= 1
            if not entry[0]:
                del _OVERRIDES[key]
                if entry[1] is _MISSING:
                    object.__delattr__(layer, attribute)
                else:
                    object.__setattr__(layer, attribute, entry[1])
