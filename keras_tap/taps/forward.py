"""`Forward`: run a model once, return its predictions and chosen points.

One interface, two ways, chosen by `build`:

- `GraphForward`: a graph model (`graph.GraphTrace`). A Functional model
  over the model's outputs and the points' tensors computes everything in
  one pass; without the outputs it keeps only the layers the points depend
  on (nothing after the deepest). Points inside layers (a keras-hub
  block's attention) are recorded by a `watch.Watcher` while the graph
  computes the layer that holds them. A point on a graph layer's input
  (`"b:input"`) reads the producer's tensor, except while a `kt.edit`
  changes that input: then it is recorded inside the call, after the edit.
- `WatchedForward`: a subclassed model. The model runs as it is while a
  `watch.Watcher` records the points; without the outputs, the run stops
  at the last point.

`TapModel.call`, the teacher, extraction and `FeatureModel` all call a
`Forward` as `forward(inputs, training) -> (predictions or None, values)`.
"""

import keras

from keras_tap.taps import graph, watch


class Forward:
    """Runs a model once: `(predictions or None, {name: value})`.

    Attributes:
        names: the names of the points, in order.
        outputs: whether the model's predictions are computed and returned.
    """

    def __init__(self, names, outputs):
        self.names = list(names)
        self.outputs = bool(outputs)

    def __call__(self, inputs, training=None):
        raise NotImplementedError


def _watcher(points, names, stop_early=False):
    """A `watch.Watcher` recording `points` (with their suffixes) under
    `names`, and making their attention layers explicit."""
    wanted = {}
    for name, point in zip(names, points):
        calls = wanted.setdefault(id(point.layer), {})
        key = name if point.pick is None else (name, point.pick)
        calls.setdefault(point.index, []).append(key)
    owners = {id(p.owner): p.owner for p in points if p.owner is not None}
    return watch.Watcher(
        [p.layer for p in points],
        wanted,
        stop_early=stop_early,
        explicit=owners.values(),
    )


class GraphForward(Forward):
    """A Functional model over the rebuilt graph's tensors.

    Points inside layers have no tensor of their own: the graph computes
    the call of the layer that holds them (their `anchor`), and a watcher
    records them meanwhile.

    Args:
        trace: the model's `graph.GraphTrace`.
        points: the points to return.
        names: one name per point.
        outputs: whether to compute and return the model's predictions.
        stop_early: with `outputs` off and only watched points, stop the
            run once they are recorded.

    Attributes:
        model: the Functional model (its layers are the model's own).
    """

    def __init__(self, trace, points, names, outputs=True,
                 stop_early=False):
        super().__init__(names, outputs)
        self.structure = trace.outputs
        heads = keras.tree.flatten(trace.outputs) if outputs else []
        self.count = len(heads)
        flat = list(heads)
        self.slots = []  # (name, structure, first, count) for graph points
        watched, watched_names = [], []
        for name, point in zip(self.names, points):
            if point.watched:
                watched.append(point)
                watched_names.append(name)
                flat.extend(keras.tree.flatten(point.anchor))
                continue
            leaves = keras.tree.flatten(point.tensor)
            self.slots.append((name, point.tensor, len(flat), len(leaves)))
            flat.extend(leaves)
        self.watched_names = watched_names
        self.watcher = None
        if watched:
            # With nothing to return from the graph, the run may stop as
            # soon as the last watched point is recorded.
            self.watcher = _watcher(
                watched, watched_names,
                stop_early=stop_early and not outputs and not self.slots,
            )
        self.model = keras.Model(trace.inputs, flat)
        # Points on the inputs of a graph layer's call read the producer's
        # tensor; while a `kt.edit` changes that input, they must be what
        # the layer received: a variant records them inside the call.
        self._trace, self._points = trace, list(points)
        self._stop_early = stop_early
        self._inside = {  # point index -> id of the layer it enters
            i: id(point.layer)
            for i, point in enumerate(points)
            if point.inside_call() is not None
            and not graph.is_graph_model(point.layer)
        }
        self._variants = {}
        self._variant = False  # a variant never chooses another.

    def _edited(self):
        """This forward, or the variant for the active `kt.edit`s (decided
        per call: edits discard the compiled functions when they open and
        close, so a traced function decides again):

        - points on inputs that an edit changes are recorded inside their
          calls;
        - nested graph models that an edit changes (at their output or
          input) are inlined: they are never called, so the graph of the
          variant applies their edits itself (`GraphTrace.edited_variant`).
        """
        trace = self._trace
        if self._variant or not (self._inside or trace.nested):
            return self
        nested = frozenset()
        if trace.nested:
            nested = trace.nested & frozenset(watch.edited_layers())
        chosen = ()
        if self._inside:
            edited = watch.edited_inputs()
            chosen = tuple(
                i for i, layer in self._inside.items() if layer in edited
            )
        if not chosen and not nested:
            return self
        variant = self._variants.get((nested, chosen))
        if variant is None:
            points = self._points
            if nested:
                trace = trace.edited_variant(nested)
                points = [_remap(point, trace) for point in points]
            variant = GraphForward(
                trace,
                [points[i].inside_call() if i in chosen else point
                 for i, point in enumerate(points)],
                self.names, outputs=self.outputs,
                stop_early=self._stop_early,
            )
            variant._variant = True
            self._variants[(nested, chosen)] = variant
        return variant

    def __call__(self, inputs, training=None):
        variant = self._edited()
        if variant is not self:
            return variant(inputs, training=training)
        watch.begin_run()
        if self.watcher is None:
            values = self.model(inputs, training=training)
            recorded = {}
        else:
            values, recording = self.watcher.run(
                self.model, inputs, training=training
            )
            recorded = recording.values(self.watched_names)
        if values is None:  # stopped early: only watched points wanted.
            values = []
        elif not isinstance(values, (list, tuple)):
            values = [values]
        predictions = None
        if self.outputs:
            predictions = keras.tree.pack_sequence_as(
                self.structure, list(values[: self.count])
            )
        found = dict(recorded)
        for name, structure, first, count in self.slots:
            found[name] = keras.tree.pack_sequence_as(
                structure, list(values[first:first + count])
            )
        return predictions, {name: found[name] for name in self.names}


def _remap(point, trace):
    """The point of `trace` (a variant of the point's trace) at the same
    call, with the same suffix."""
    from keras_tap.taps import paths

    found = trace.points[point.path][point.index]
    if point.suffix:
        _, kind, key = paths.split_suffix("p" + point.suffix)
        found = found.select(kind, key)
    return found


class WatchedForward(Forward):
    """Runs the model itself while a `watch.Watcher` records the points.

    Args:
        model: the model to run.
        points: the points to record (layer and call index).
        names: one name per point.
        outputs: whether to return the model's predictions.
        stop_early: stop the run once every point is recorded (only
            without `outputs`).
    """

    def __init__(self, model, points, names, outputs=True, stop_early=False):
        super().__init__(names, outputs)
        self.model = model
        self.watcher = _watcher(
            points, self.names, stop_early=stop_early and not outputs
        )

    def __call__(self, inputs, training=None):
        watch.begin_run()
        predictions, recording = self.watcher.run(
            self.model, inputs, training=training
        )
        values = recording.values(self.names)
        return (predictions if self.outputs else None), values


def build(index, points, names, *, outputs=True, stop_early=False):
    """The `Forward` that computes `points` of `index.model`.

    Args:
        index: the model's `paths.LayerIndex`.
        points: the points to compute.
        names: one name per point.
        outputs: whether to compute and return the model's predictions.
        stop_early: whether a watched run may stop after the last point
            (graph runs never compute what the points do not need; with
            watched points only, they stop after the last one too).

    Returns:
        A `GraphForward` for a graph model (points inside its layers are
        watched while the graph runs), else a `WatchedForward`.
    """
    if index.trace is not None:
        return GraphForward(
            index.trace, points, names, outputs=outputs,
            stop_early=stop_early,
        )
    return WatchedForward(
        index.model, points, names, outputs=outputs, stop_early=stop_early
    )
