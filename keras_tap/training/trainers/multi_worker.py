"""`fit` and `evaluate` under `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3.15's TensorFlow trainer fails under a multi-worker strategy for
any model, in two places:

1. `fit` and `evaluate` build the model symbolically from the first batch,
   which they first reduce over replicas with `strategy.reduce("MEAN",
   batch, axis=None)`. Across workers that reduction needs tensors and
   receives the `PerReplica` batch ("Attempt to convert a value
   (PerReplica...) to a Tensor").
2. Each step's logs are reduced with `strategy.reduce("MEAN", value,
   axis=0)`, which fails on the scalar logs of every step ("Invalid
   reduction dimension 0 for input with 0 dimensions").

keras_tap does not patch Keras. `TapModel` builds from this worker's own
batch (`maybe_symbolic_build`, which takes the place of Keras's private
`Model._maybe_symbolic_build` under a multi-worker strategy only), and its
TensorFlow `train_step` and `test_step` return the scalar logs packed in
one `(1, n)` vector (`reducible_logs`), which the `axis=0` mean reduces in
one collective, and its train and test functions unpack them
(`make_function`). Each log is a mean over this replica's samples; with
equal shares of the global batch, their mean over replicas is the mean
over the global batch, as one device logs it. `tests/test_multi_worker.py`
checks that both defects still reproduce in plain Keras, so these
workarounds go as soon as Keras fixes them.
"""

import json

import keras
import numpy as np
import tensorflow as tf

# Scalar logs travel as one vector under this key, followed by their names.
PACKED = "keras_tap_packed_logs:"
# The private `keras.Model` method that `maybe_symbolic_build` stands for.
SYMBOLIC_BUILD = "_maybe_symbolic_build"


def in_multi_worker_mode(strategy=None):
    """Whether `strategy` (default: the current one) spans several
    workers: a `MultiWorkerMirroredStrategy` with a cluster in
    `TF_CONFIG`."""
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    if resolver is None:
        return False
    return bool(resolver.cluster_spec().as_dict())


def local_batch(strategy, batch):
    """This worker's first replica batch of a distributed `batch`."""

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return keras.tree.map_structure(local, batch)


def maybe_symbolic_build(model, keras_build, iterator=None, data_batch=None):
    """Build `model` before `fit`/`evaluate`, as Keras does.

    Under a multi-worker strategy the model is built from this worker's
    own batch: the build only needs the batch's shapes and dtypes, and
    every worker builds the same variables in the same order, as the
    strategy requires. Otherwise this is Keras's own build, `keras_build`.

    Args:
        model: the model to build.
        keras_build: Keras's `Model._maybe_symbolic_build`, bound to
            `model`.
        iterator: the `fit`/`evaluate` epoch iterator.
        data_batch: a batch, when there is no iterator.
    """
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None or not in_multi_worker_mode(strategy):
        return keras_build(iterator=iterator, data_batch=data_batch)
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = local_batch(strategy, next(batches))
            break
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def reducible_logs(logs):
    """A step's logs, in the form Keras reduces across workers.

    Under a multi-worker strategy Keras reduces each log on its own, with
    `axis=0` and one collective each. This packs every scalar log into one
    `(1, n)` float32 vector under a single key that names them (one
    collective for them all), and gives each other log a leading axis of
    1; `unpacked` restores them after the reduction. Otherwise the logs
    are returned as they are.
    """
    if not in_multi_worker_mode():
        return logs
    names, scalars, result = [], [], {}
    for name, value in logs.items():
        value = tf.convert_to_tensor(value)
        names.append(name)
        if value.shape.rank == 0:
            scalars.append(tf.cast(value, tf.float32))
        else:
            result[name] = value[None]
    if scalars:
        result[PACKED + json.dumps(names)] = tf.stack(scalars)[None]
    return result


def unpacked(logs):
    """Undo `reducible_logs` on reduced logs: `{name: value}` again, in
    the step's order (scalars as NumPy float32)."""
    if not isinstance(logs, dict):
        return logs
    packed = [key for key in logs if key.startswith(PACKED)]
    if not packed:
        return logs
    key = packed[0]
    names = json.loads(key[len(PACKED):])
    values = iter(np.asarray(logs[key]).reshape(-1))
    return {
        name: logs[name] if name in logs else next(values) for name in names
    }


def make_function(model, keras_make, kind, force=False):
    """Keras's `make_train_function` / `make_test_function` (`kind`:
    `"train"` or `"test"`), whose function then returns `unpacked` logs
    under a multi-worker strategy.

    Args:
        model: the model.
        keras_make: Keras's method, bound to `model`.
        kind: `"train"` or `"test"`.
        force: passed on to Keras.

    Returns:
        The model's function.
    """
    result = keras_make(force=force)
    attribute = f"{kind}_function"
    function = getattr(model, attribute, None)
    strategy = getattr(model, "_distribute_strategy", None)
    if (
        function is None
        or getattr(function, "_keras_tap_unpacks", False)
        or strategy is None
        or not in_multi_worker_mode(strategy)
    ):
        return result if result is not None else function

    def unpacking(*args, **kwargs):
        return unpacked(function(*args, **kwargs))

    unpacking._keras_tap_unpacks = True
    setattr(model, attribute, unpacking)
    return unpacking


def keras_internals_missing():
    """The private Keras names these workarounds rely on that this Keras
    lacks (empty when all are there)."""
    names = (SYMBOLIC_BUILD, "_symbolic_build", "_distribute_strategy")
    model = keras.Sequential()
    return [n for n in names if not hasattr(model, n)]
