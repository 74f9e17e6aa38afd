"""Batch moments over one replica's batch, or over every replica's.

Under a distribution strategy each replica sees its share of the global
batch. A regularizer of batch statistics (`KLSparsity`, `DeCov`,
`Orthogonality`, `VarianceCovariance`) computes its means and covariances
on that share by default, as an unsynchronized `BatchNormalization` does.
With `cross_replica=True` it computes them on the global batch:
`replica_sum` adds a value over the replicas with an all-reduce whose
gradient is the all-reduced gradient, so the value and the gradients equal
those of one device on the global batch. Outside a strategy, or with one
replica, both are the same.
"""

from keras import ops


def replica_sum(value, cross_replica=True):
    """`value` summed over the replicas of the current distribution
    strategy when `cross_replica` (as it is otherwise, or without
    replicas). Every replica must make the same calls in the same order."""
    if not cross_replica:
        return value
    from keras_tap.training import trainers

    return trainers.get().replica_sum(value)


def count(features, cross_replica=False):
    """The number of rows of `(N, C)` features, as a float32 scalar (over
    every replica with `cross_replica`)."""
    n = ops.cast(ops.shape(features)[0], "float32")
    return replica_sum(n, cross_replica)


def centred(features, cross_replica=False):
    """`(features - mean, n)`: `(N, C)` features centred on their mean
    over the batch (the global batch with `cross_replica`), and the number
    of rows that mean is over."""
    n = count(features, cross_replica)
    total = ops.sum(features, axis=0, keepdims=True)
    return features - replica_sum(total, cross_replica) / n, n


def check_cross_replica(owner, value):
    """Returns `value` if it is a bool, or raises a `ValueError` naming
    the argument of `owner`."""
    if not isinstance(value, bool):
        raise ValueError(
            f"Invalid value for argument `cross_replica` of `{owner}`: "
            f"expected True or False. Received: cross_replica={value!r}"
        )
    return value
