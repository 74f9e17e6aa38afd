"""Batched, pruned, streaming extraction of tapped activations."""

import os
import shutil
import tempfile
import zipfile

import keras
import numpy as np
from keras import ops

from keras_tap.taps import forward, graph

REDUCTIONS = ("mean", "max")


def _pool(tensor, how):
    rank = len(tensor.shape)
    if rank <= 2:
        return tensor
    axes = tuple(range(1, rank - 1))
    if how == "mean":
        return ops.mean(tensor, axis=axes)
    return ops.max(tensor, axis=axes)


def _check_reduce(reduce):
    if reduce is None or callable(reduce) or reduce in REDUCTIONS:
        return
    raise ValueError(
        f"`reduce` must be None, one of {list(REDUCTIONS)} or a callable; "
        f"received {reduce!r}."
    )


class Extractor(keras.Model):
    """Computes only the requested taps, reduced inside the graph.

    A graph model runs only the layers the taps depend on; a watched run
    stops once every requested tap is recorded.
    """

    def __init__(self, tap_model, names, points, reduce):
        super().__init__(name="tap_extractor")
        self.names = list(names)
        # A structured point gives one array per element, never fewer.
        self.keys = []
        for name, point in zip(self.names, points):
            suffixes = point.element_suffixes() if point.structured else []
            self.keys.extend(name + s for s in suffixes or [""])
        self.reduce = reduce
        run = forward.build(
            tap_model._index, points, self.names, outputs=False,
            stop_early=True,
        )
        object.__setattr__(self, "_forward", run)
        # Track what runs (the pruned graph or the model): on JAX,
        # `predict_on_batch` passes only tracked variables to its compiled
        # step; untracked ones would be baked in as constants (stale after
        # training) and their updates (a counter, ...) dropped.
        self.network = run.model
        # The tapped model is built, so is every layer this runs: without
        # this, Keras's JAX `predict_on_batch` would run a build pass first.
        self.built = True

    def call(self, inputs):
        _, values = self._forward(inputs, training=False)
        flat = {}
        for name, value in values.items():
            for suffix, leaf in graph.flatten_elements(value):
                flat[name + suffix] = leaf
        if self.reduce is None:
            return flat
        if callable(self.reduce):
            return {n: self.reduce(v) for n, v in flat.items()}
        return {n: _pool(v, self.reduce) for n, v in flat.items()}


def _requested(tap_model, taps):
    """Requested names -> `(names, points)`; paths resolve like taps."""
    known = {n: p for n, _, p in tap_model._tap_specs}
    if taps is None:
        return list(known), list(known.values())
    if isinstance(taps, str):
        taps = [taps]
    names, points = [], []
    for spec in taps:
        if isinstance(spec, str) and spec in known:
            names.append(spec)
            points.append(known[spec])
            continue
        for name, point in tap_model._index.resolve(spec):
            names.append(name)
            points.append(point)
    if not names:
        raise ValueError("`taps` is empty: name at least one tap or path.")
    return names, points


def _batches(data, batch_size):
    """Yield `(x_batch)` and give the number of batches (or None)."""
    unpack = keras.utils.unpack_x_y_sample_weight
    if isinstance(data, keras.utils.PyDataset):
        count = data.num_batches

        def gen():
            for i in range(count):
                yield _only_x(data[i], unpack)

        return gen(), count
    if _is_dataset(data):
        count = None
        try:
            cardinality = int(data.cardinality())
            count = cardinality if cardinality >= 0 else None
        except (TypeError, ValueError):
            pass
        if keras.backend.backend() != "tensorflow" and hasattr(
            data, "as_numpy_iterator"
        ):  # tf.data gives tf tensors: NumPy for JAX and PyTorch
            data = data.as_numpy_iterator()
        return (_only_x(e, unpack) for e in data), count
    if _is_batch_iterable(data):
        # A generator, an iterator or a torch DataLoader, read as Keras's
        # `predict` reads them: a tuple or list batch is `(x, y[, w])`.
        try:
            count = len(data)
        except TypeError:
            count = None
        return (_torch_to_numpy(unpack(e)[0]) for e in data), count
    leaves = keras.tree.flatten(data)
    if not leaves or not all(hasattr(v, "shape") for v in leaves):
        raise TypeError(
            "`data` must be a NumPy array (or a structure of them), a "
            "tf.data.Dataset, a keras.utils.PyDataset, a generator or a "
            f"torch DataLoader; received {type(data).__name__}."
        )
    if batch_size is None:  # as in Keras's `predict`
        batch_size = 32
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive int; received {batch_size!r}."
        )
    total = int(leaves[0].shape[0])
    count = -(-total // batch_size)

    def gen():
        for start in range(0, total, batch_size):
            stop = start + batch_size
            yield keras.tree.map_structure(lambda v: v[start:stop], data)

    return gen(), count


def _is_batch_iterable(data):
    """A source of batches that is not an array structure: a generator,
    an iterator or a torch `DataLoader`."""
    if isinstance(data, (list, tuple, dict)) or hasattr(data, "shape"):
        return False
    return hasattr(data, "__next__") or (
        type(data).__module__.startswith("torch")
        and hasattr(data, "__iter__")
    )


def _torch_to_numpy(x):
    """Torch tensors of a batch as NumPy, except on the torch backend."""
    if keras.backend.backend() == "torch":
        return x

    def convert(v):
        if type(v).__module__.startswith("torch") and hasattr(v, "numpy"):
            return v.detach().cpu().numpy()
        return v

    return keras.tree.map_structure(convert, x)


def _is_dataset(data):
    return type(data).__module__.startswith("tensorflow") and hasattr(
        data, "element_spec"
    )


def _only_x(element, unpack):
    if isinstance(element, tuple):
        return unpack(element)[0]
    return element


def _check_npz_path(path):
    try:
        path = os.fspath(path)
    except TypeError:
        path = None
    if not isinstance(path, str) or not path.endswith(".npz"):
        raise ValueError(
            f"`to` must be a path ending in '.npz'; received {path!r}."
        )
    return path


class NpzStream:
    """Writes arrays batch by batch into a `.npz`, in constant memory.

    Each key's batches go to a temporary raw file; `close()` writes the
    `.npy` header (the row count is known by then) and copies the rows into
    the zip in chunks, then moves the file into place atomically.
    """

    def __init__(self, path):
        path = _check_npz_path(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.path = path
        self.tmp = tempfile.mkdtemp(prefix=".kt_extract_", dir=folder)
        self.meta = {}

    def write(self, arrays):
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            meta = self.meta.get(name)
            if meta is None:
                meta = self.meta[name] = {
                    "file": os.path.join(self.tmp, f"{len(self.meta)}.raw"),
                    "dtype": array.dtype,
                    "shape": array.shape[1:],
                    "rows": 0,
                }
            elif (array.shape[1:], array.dtype) != (
                meta["shape"],
                meta["dtype"],
            ):
                raise ValueError(
                    f"Tap {name!r}: a batch has shape {array.shape[1:]} and "
                    f"dtype {array.dtype}, but earlier batches had "
                    f"{meta['shape']} and {meta['dtype']}; one array cannot "
                    "hold both. Use inputs of one shape, or `reduce=` to "
                    "pool the varying axes."
                )
            with open(meta["file"], "ab") as f:
                f.write(array.tobytes())
            meta["rows"] += array.shape[0]

    def close(self):
        partial = self.path + ".partial"
        try:
            self._write_zip(partial)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        os.replace(partial, self.path)
        self.discard()
        return self.path

    def _write_zip(self, partial):
        with zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
            for name, meta in self.meta.items():
                header = {
                    "descr": np.lib.format.dtype_to_descr(meta["dtype"]),
                    "fortran_order": False,
                    "shape": (meta["rows"],) + tuple(meta["shape"]),
                }
                with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_2_0(f, header)
                    with open(meta["file"], "rb") as raw:
                        shutil.copyfileobj(raw, f, 1 << 22)

    def discard(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def extract(tap_model, data, *, taps, batch_size, reduce, to, verbose):
    """See `TapModel.extract`."""
    _check_reduce(reduce)
    if to is not None:
        _check_npz_path(to)
    names, points = _requested(tap_model, taps)
    batches, count = _batches(data, batch_size)
    key = (tuple(names), reduce)
    extractor = tap_model._extractors.get(key)
    if extractor is None:
        extractor = Extractor(tap_model, names, points, reduce)
        tap_model._extractors[key] = extractor
    if verbose == "auto":
        verbose = 1
    progbar = keras.utils.Progbar(count, verbose=1 if verbose else 0)
    sink = NpzStream(to) if to is not None else None
    names = extractor.keys
    collected = {n: [] for n in names}
    steps = 0
    try:
        for batch in batches:
            values = extractor.predict_on_batch(batch)
            # In the order asked for (JAX returns a dict's keys sorted).
            values = {name: values[name] for name in names}
            if sink is not None:
                sink.write(values)
            else:
                for name in names:
                    collected[name].append(values[name])
            steps += 1
            progbar.update(steps)
        if not steps:
            raise ValueError(
                "`data` is empty: it gave no batch to extract from."
            )
        if sink is not None:
            return sink.close()
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    return {n: np.concatenate(v, axis=0) for n, v in collected.items()}
