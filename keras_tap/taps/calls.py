"""Record the calls of the layers a model holds, from one symbolic run.

`trace_calls(model)` runs `model` on symbolic inputs (on PyTorch, twice on
zeros of two batch sizes) while a `watch.Watcher` watches every sublayer,
and returns a `Point` per call with its output, argument and keyword shapes:
the points inside layers and of subclassed models, which have no graph.
"""

import keras

from keras_tap.taps import watch
from keras_tap.taps.points import (
    Calls,
    Point,
    keyword_shapes,
    merge_shapes,
    zeros_like_spec,
)
from keras_tap.taps.points import shape_of as _shape_of


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


def trace_calls(model, run=None, inputs=None):
    """Run `model` symbolically and record every call of the layers it holds.

    Args:
        model: a layer or model whose sublayers to watch, at every depth
            (`sublayers.walk`).
        run: a function that calls `model` (default: on symbolic inputs of
            its build shape).
        inputs: `(args, kwargs)`, the symbolic inputs `run` passes (on
            PyTorch the call runs twice on zeros of their shapes instead).

    Returns:
        `({path: [Point, ...]}, run's result)`, the points in the order the
        calls ended (a layer after the layers it holds), then the sublayers
        that never ran (no calls). `tensor` is `None`; `shape`, `args`
        (the shapes of the positional arguments) and `kwargs` (those of
        the keyword arguments) are filled in, and
        `owner` for the softmax of an attention layer. Attention layers
        compute attention explicitly during the run, so their softmax is
        recorded although Keras fuses attention.
    """
    from keras_tap.taps import attention, sublayers

    walked = sublayers.walk(model)
    layers = dict(walked)
    by_id = {id(layer): path for path, layer in walked}
    owners = {}
    for layer in [model] + list(layers.values()):
        found = attention.softmax_owner(layer)
        if found is not None and id(found[1]) in by_id:
            owners[id(found[1])] = found[0]
    watcher = watch.Watcher(layers.values(), explicit=owners.values())
    torch = keras.backend.backend() == "torch"
    if torch and (run is None or inputs is not None):
        # Keras runs a symbolic call twice on PyTorch (batches 83, 89): run
        # it twice on zeros here, and free the dimensions that differ.
        args, kwargs = inputs or ((input_spec_of(model),), {})
        recorded = [
            _record(watcher, lambda: model(*zeros_like_spec(args, batch),
                                           **zeros_like_spec(kwargs, batch)))
            for batch in (2, 3)
        ]
        result = None
        first, second = recorded[0][0], recorded[1][0]
        if [c[0] for c in first] == [c[0] for c in second]:
            calls_list = [
                (k, merge_shapes(s1, s2), merge_shapes(a1, a2),
                 merge_shapes(w1, w2))
                for (k, s1, a1, w1), (_, s2, a2, w2) in zip(first, second)
            ]
        else:
            calls_list = second
    else:
        if run is None:
            inputs = input_spec_of(model)

            def run():
                return model(inputs)

        calls_list, result = _record(watcher, run)
    points = {}
    for key, shape, args, kwargs in calls_list:
        path = by_id[key]
        calls = points.setdefault(path, Calls(layers[path]))
        calls.append(
            Point(path, len(calls), layers[path], None, shape, args=args,
                  owner=owners.get(key), kwargs=kwargs)
        )
    # Layers that never ran in the traced call are still listed, with no
    # calls, so that paths to them give a precise error.
    for path, layer in layers.items():
        points.setdefault(path, Calls(layer))
    return points, result


def _record(watcher, run):
    """`([(layer key, output shape, argument shapes, keyword argument
    shapes), ...], run())`."""
    with watcher.watch() as recording, keras.StatelessScope():
        result = run()
    calls = [
        (key, _shape_of(output), tuple(_shape_of(a) for a in args),
         keyword_shapes(kwargs))
        for (key, output), args, kwargs in zip(
            recording.calls, recording.arguments, recording.keywords
        )
    ]
    return calls, result

