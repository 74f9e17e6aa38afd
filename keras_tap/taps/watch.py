"""Watch layer calls: one re-entrant hook per layer, watchers per context.

A model without a graph (a subclassed model, or a subclassed model nested in
a graph model) is watched while it runs: the layers to watch get a hook, an
instance attribute `call` that calls the layer's own `call` and hands its
output to every watcher that is active in the calling context.

- One hook per layer, whoever watches it: the hook is installed when the
  layer's first active watcher starts, and removed when its last one ends
  (a count per layer, guarded by a lock). A layer that nobody watches
  carries nothing of keras_tap: `"call" not in vars(layer)`.
- The active watchers live in a context-local stack (`contextvars`), so a
  watcher sees the calls made in its own thread or task only: another
  thread's calls, and a plain `model(x)` outside any watcher, go straight
  to the layer's own `call`. A watcher is entered where the model is called
  (inside `TapModel.call`, so in each replica thread of a distribution
  strategy), and leaves the stack in order, even when the call raises.
- A recording may stop the run once it holds every call it wants
  (`stop_early=True`): it raises `StopForward`, which its `run` catches, so
  the rest of the model is skipped (extraction only needs the layers up to
  the deepest tap).
"""

import contextlib
import contextvars
import functools
import threading

_ACTIVE = contextvars.ContextVar("keras_tap_watchers", default=())
_LOCK = threading.Lock()
_HOOKS = {}  # id(layer) -> [layer, active watchers, own `call` or _MISSING]
_MISSING = object()


class StopForward(Exception):
    """Raised once a `stop_early` recording holds every wanted call."""


def _hook(layer, original):
    """The `call` installed on a watched layer."""
    key = id(layer)

    @functools.wraps(original)
    def call(*args, **kwargs):
        active = _ACTIVE.get()
        # Edits (`kt.edit`) change the call's inputs and outputs, in the
        # order their blocks were entered, before any recording sees them.
        edits = [
            (r, None) for r in active if r.edits and key in r.watcher.keys
        ]
        for i, (editing, _) in enumerate(edits):
            args, kwargs, index = editing.before(key, args, kwargs)
            edits[i] = (editing, index)
        if any(key in r.watcher.explicit for r in active):
            # A watched softmax of this attention layer must run.
            from keras_tap.taps import attention

            outputs = attention.explicit_call(layer, original, args, kwargs)
        else:
            outputs = original(*args, **kwargs)
        for editing, index in edits:
            outputs = editing.after(key, index, outputs)
        stop = False
        for recording in active:
            if key in recording.watcher.keys and not recording.edits:
                stop = recording.record(key, outputs, args, kwargs) or stop
        if stop:
            raise StopForward("Every watched call was recorded.")
        return outputs

    return call


def _acquire(layers):
    with _LOCK:
        for layer in layers:
            entry = _HOOKS.get(id(layer))
            if entry is not None:
                entry[1] += 1
                continue
            own = vars(layer).get("call", _MISSING)
            hook = _hook(layer, layer.call)
            object.__setattr__(layer, "call", hook)
            _HOOKS[id(layer)] = [layer, 1, own]


def _release(layers):
    with _LOCK:
        for layer in layers:
            entry = _HOOKS[id(layer)]
            entry[1] -= 1
            if entry[1]:
                continue
            del _HOOKS[id(layer)]
            if entry[2] is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", entry[2])


def begin_run():
    """Tell the active edits that a forward pass of a model starts, so
    that an edit of one call of a shared layer (`"enc@1"`) counts the
    layer's calls from this pass on."""
    for entry in _ACTIVE.get():
        if entry.edits:
            entry.begin_run()


def edited_inputs():
    """The ids of the layers whose call inputs an active `kt.edit` (in
    this context) changes: a graph forward records the taps on those
    inputs inside the call, after the edit, not from the graph."""
    found = set()
    for entry in edit_recordings():
        found.update(entry.inputs)
    return found


def edit_recordings():
    """The recordings of the `kt.edit` blocks active in this context, in
    the order their blocks were entered."""
    return [entry for entry in _ACTIVE.get() if entry.edits]


def edited_layers():
    """The ids of the layers (nested models included) that an active
    `kt.edit` (in this context) edits, at their inputs or outputs."""
    found = set()
    for entry in edit_recordings():
        found.update(entry.specs)
    return found


@contextlib.contextmanager
def suspended():
    """No watcher or edit is active in this context meanwhile (a graph
    built now must not bake the edits in)."""
    token = _ACTIVE.set(())
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def is_hooked(layer):
    """Whether `layer` carries a watch hook now (some watcher is active)."""
    with _LOCK:
        return id(layer) in _HOOKS


class Watcher:
    """Which layer calls to record: a reusable, thread-safe description.

    Each `watch()` gives a new `Recording`, so one watcher can be active in
    several threads, or nested in itself, at once.

    Args:
        layers: the layers to watch.
        wanted: `{id(layer): {call_index: [key, ...]}}`: the calls to record
            and the keys to store each under; the call index counts the
            layer's calls within one recording. A key may be a pair
            `(key, pick)`: `pick(args, outputs, kwargs)` gives the value
            stored (an input of the call, or one element of its output).
            `None`
            records every call of every layer, in the order the calls end.
        stop_early: raise `StopForward` once every wanted call is recorded.
        explicit: attention layers that compute attention explicitly
            (through their softmax sublayer) while a recording is active,
            so that a watched softmax runs although Keras fuses attention
            (see `attention.explicit_call`).

    Example:

    >>> import keras, numpy as np
    >>> dense = keras.layers.Dense(2)
    >>> model = keras.Sequential([dense, keras.layers.Dense(1)])
    >>> watcher = Watcher([dense], {id(dense): {0: ["hidden"]}})
    >>> with watcher.watch() as recording:
    ...     _ = model(np.ones((3, 4)))
    >>> tuple(recording.records["hidden"].shape)
    (3, 2)
    """

    def __init__(self, layers, wanted=None, stop_early=False, explicit=()):
        unique = {id(layer): layer for layer in layers}
        self.keys = frozenset(unique)
        self.explicit = frozenset(id(layer) for layer in explicit)
        for layer in explicit:
            unique.setdefault(id(layer), layer)
        self.layers = list(unique.values())
        self.wanted = wanted
        self.stop_early = bool(stop_early) and wanted is not None
        self.needed = 0
        if wanted is not None:
            self.needed = sum(
                len(names)
                for calls in wanted.values()
                for names in calls.values()
            )

    def watch(self):
        """A new `Recording`: a context manager that records while open."""
        return Recording(self)

    def run(self, fn, *args, **kwargs):
        """Call `fn` while watching: `(fn's result or None, Recording)`.

        The result is `None` when the recording stopped the run early.
        """
        recording = self.watch()
        result = None
        with recording:
            try:
                result = fn(*args, **kwargs)
            except StopForward:
                # Keras may re-raise an exception as a new one of the same
                # class: the recording knows whether it stopped the run.
                if not recording.stopped:
                    raise
        return result, recording


class Recording:
    """The calls recorded by one active `Watcher`.

    Attributes:
        records: `{key: output}` for the wanted calls.
        calls: `[(id(layer), output), ...]` in the order the calls ended
            (when the watcher records every call).
        arguments: the positional arguments of each of `calls`.
        keywords: the keyword arguments of each of `calls` (dicts).
        stopped: whether this recording raised `StopForward`.
    """

    edits = False  # A `kt.edit` block's recording changes values.

    def __init__(self, watcher):
        self.watcher = watcher
        self.records = {}
        self.calls = []
        self.arguments = []
        self.keywords = []
        self.counts = {}
        self.stopped = False
        self._token = None
        self._below = ()

    def __enter__(self):
        if self._token is not None:
            raise RuntimeError("A Recording can be entered only once.")
        _acquire(self.watcher.layers)
        try:
            self._below = _ACTIVE.get()
            self._token = _ACTIVE.set(self._below + (self,))
        except BaseException:
            _release(self.watcher.layers)
            raise
        return self

    def __exit__(self, *exc_info):
        try:
            active = _ACTIVE.get()
            remaining = tuple(r for r in active if r is not self)
            try:
                if active == self._below + (self,):
                    _ACTIVE.reset(self._token)
                else:  # Left out of order: remove this recording alone.
                    _ACTIVE.set(remaining)
            except ValueError:  # Entered in another context.
                _ACTIVE.set(remaining)
        finally:
            _release(self.watcher.layers)
        return False

    def record(self, key, outputs, args=(), kwargs=None):
        """Store one call's output; whether to stop the run now."""
        if self.stopped:
            return False
        index = self.counts.get(key, 0)
        self.counts[key] = index + 1
        wanted = self.watcher.wanted
        if wanted is None:
            self.calls.append((key, outputs))
            self.arguments.append(args)
            self.keywords.append(dict(kwargs or {}))
            return False
        for name in wanted.get(key, {}).get(index, ()):
            if isinstance(name, tuple):
                name, pick = name
                self.records[name] = pick(args, outputs, kwargs or {})
            else:
                self.records[name] = outputs
        if self.watcher.stop_early and len(self.records) >= (
            self.watcher.needed
        ):
            self.stopped = True
            return True
        return False

    def values(self, names):
        """`{name: output}` for `names`; raises for a call that never ran.

        Raises:
            ValueError: when a wanted call did not run (a branch not taken,
                or a call index beyond the calls made).
        """
        missing = [n for n in names if n not in self.records]
        if missing:
            raise ValueError(
                f"Tap {missing[0]!r} was not computed: its layer call did not "
                "run when the model ran on this input (a branch not taken, "
                "or fewer calls than when the model was traced). Tapped "
                f"points that ran: {sorted(self.records)}."
            )
        return {n: self.records[n] for n in names}
