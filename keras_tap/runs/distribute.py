"""Where a config trains: its `distribution:` section.

```yaml
distribution:
  strategy: multi_worker     # none | mirrored | multi_worker | data_parallel
  devices: null              # mirrored, data_parallel: default all
  backup: true               # keras.callbacks.BackupAndRestore
  cross_replica_moments: false
```

A bare string (`distribution: mirrored`) is the strategy alone. `mirrored`
is `tf.distribute.MirroredStrategy` over `devices`; `multi_worker` is
`tf.distribute.MultiWorkerMirroredStrategy` with the cluster and this
process's task read from `TF_CONFIG`; `data_parallel` is
`keras.distribution.DataParallel`, for the JAX backend.

Under `multi_worker` every worker runs the same command. The chief (the
`chief` task, or worker 0 without one) writes the run directory; each other
worker writes what it must into a temporary folder that is removed when it
is done. With `backup`, each worker keeps a `BackupAndRestore` backup of
the last completed epoch in `<run.dir>/backup/<task>` (one folder per
worker: workers sharing one fail on its file lock), so a worker killed
mid-epoch is restarted, with the others, by the same command, and the run
continues after its last completed epoch.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras

from keras_tap.runs.checks import boolean, expected, field, read_section
from keras_tap.runs.keypaths import ConfigError, hint, key_path

STRATEGIES = ("none", "mirrored", "multi_worker", "data_parallel")
BACKUP = "backup"
# What Keras's `BackupAndRestore` writes in its folder.
BACKUP_METADATA = "training_metadata.json"


def device_names(value, where):
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(d, str) and d for d in value)
    ):
        raise expected(where, "a list of device names", value)
    return value


def strategy_name(value, where):
    if value not in STRATEGIES:
        raise ConfigError(
            where,
            f"unknown strategy {value!r}{hint(str(value), STRATEGIES)} "
            f"(expected one of {', '.join(STRATEGIES)})",
        )
    return value


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """The `distribution:` section of a config.

    Attributes:
        strategy: `"none"`, `"mirrored"`, `"multi_worker"` or
            `"data_parallel"`.
        devices: the devices of `mirrored` and `data_parallel` (`None`:
            all of them).
        backup: whether to wire `keras.callbacks.BackupAndRestore` (any
            strategy but `none`, whose runs continue with `--resume`).
        cross_replica_moments: whether batch-statistic regularizers
            compute their moments over the global batch (all replicas)
            instead of each replica's batch.
    """

    strategy: str = field("none", strategy_name)
    devices: Any = field(None, device_names)
    backup: bool = field(True, boolean)
    cross_replica_moments: bool = field(False, boolean)

    def to_dict(self):
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_config(cls, raw, where="distribution"):
        """Checks a raw `distribution:` section (`None`, a strategy name
        or a mapping).

        Raises:
            ConfigError: at the key path of the first problem, including a
                strategy that the active Keras backend does not run.
        """
        if isinstance(raw, str):
            raw = {"strategy": raw}
        if raw is not None and not isinstance(raw, dict):
            what = f"a strategy ({', '.join(STRATEGIES)}) or a mapping"
            raise expected(where, what, raw)
        values = read_section(cls, raw, where)
        config = cls(**values)
        config.check(where)
        return config

    def check(self, where="distribution"):
        """Raises `ConfigError` for a strategy the active backend does not
        run, or devices given to a strategy that does not take them."""
        backend = keras.backend.backend()
        strategy = self.strategy
        if strategy in ("mirrored", "multi_worker") and backend != (
            "tensorflow"
        ):
            raise ConfigError(
                key_path("strategy", prefix=where),
                f"{strategy!r} is a tf.distribute strategy and needs the "
                f"TensorFlow backend; the active Keras backend is "
                f"{backend!r} ({_instead(backend)})",
            )
        if strategy == "data_parallel" and backend != "jax":
            raise ConfigError(
                key_path("strategy", prefix=where),
                "'data_parallel' is keras.distribution.DataParallel, which "
                f"needs the JAX backend; the active Keras backend is "
                f"{backend!r} ({_instead(backend)})",
            )
        if self.devices is not None and strategy not in (
            "mirrored",
            "data_parallel",
        ):
            raise ConfigError(
                key_path("devices", prefix=where),
                f"devices are chosen for 'mirrored' and 'data_parallel' "
                f"only; strategy {strategy!r} takes "
                + (
                    "its workers from TF_CONFIG"
                    if strategy == "multi_worker"
                    else "the default device"
                ),
            )


# ------------------------------------------------------------- the cluster


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's place in a `TF_CONFIG` cluster.

    Attributes:
        type: `"worker"` or `"chief"` (`"worker"` without a cluster).
        index: the task's index in its type.
        workers: the number of tasks that train (chief and workers).
        is_chief: whether this task writes the run directory.
    """

    type: str = "worker"
    index: int = 0
    workers: int = 1
    is_chief: bool = True

    @property
    def name(self):
        return f"{self.type}_{self.index}"


def read_task(environ=None):
    """This process's `Task`, from `TF_CONFIG` (one worker without it).

    Raises:
        ConfigError: at `TF_CONFIG` for a value that is not a cluster.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG") or ""
    if not raw.strip():
        return Task()
    try:
        spec = json.loads(raw)
        cluster = spec.get("cluster") or {}
        task = spec.get("task") or {}
        kind = str(task.get("type", "worker"))
        index = int(task.get("index", 0))
        training = ("chief", "worker")
        workers = sum(len(cluster.get(k) or []) for k in training)
    except (ValueError, TypeError, AttributeError) as error:
        message = (
            "expected JSON {\"cluster\": {\"worker\": [\"host:port\", "
            "...]}, \"task\": {\"type\": \"worker\", \"index\": i}}, "
            f"got {raw[:200]!r} ({error})"
        )
        raise ConfigError("TF_CONFIG", message) from None
    if kind not in training:
        message = (
            f"task type {kind!r} does not train; keras-tap train runs on "
            "the 'chief' and 'worker' tasks"
        )
        raise ConfigError("TF_CONFIG", message)
    has_chief = bool(cluster.get("chief"))
    is_chief = kind == "chief" or (not has_chief and index == 0)
    return Task(kind, index, max(workers, 1), is_chief)


def shard_by_data(dataset):
    """`dataset` with `tf.data` auto-sharding by data: under a strategy,
    each global batch is split over the replicas, so every step sees the
    batch of one device."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def batched(arrays, batch_size):
    """A `tf.data.Dataset` of `(x, y)` NumPy arrays in batches, sharded by
    data (`shard_by_data`)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
    return shard_by_data(dataset)


_STRATEGIES = {}


def prepare(config, overrides=()):
    """Creates the strategy of a config before anything else runs.

    A multi-worker strategy must be created at the start of the program,
    before TensorFlow runs any op, while checking a whole config builds
    Keras objects. This reads the `distribution` section alone (of a
    config path or dict, with `--set` `overrides`) and creates its
    strategy, which `strategy` then returns.

    Returns:
        The `DistributionConfig`.
    """
    from keras_tap.runs import config as config_lib

    if isinstance(config, config_lib.Config):
        return config.distribution
    if isinstance(config, dict):
        raw = json.loads(json.dumps(config))
    else:
        raw = config_lib.read(config)
    for assignment in overrides or ():
        config_lib.apply_override(raw, assignment)
    section = DistributionConfig.from_config(raw.get("distribution"))
    strategy(section)
    return section


def strategy(config, where="distribution"):
    """The `tf.distribute` strategy of a `DistributionConfig` (`None` for
    `none` and `data_parallel`), created once per process: TensorFlow
    allows one multi-worker strategy, made before any other op.

    Raises:
        ConfigError: at `distribution.devices` for a device that does not
            exist, naming those that do.
    """
    name = config.strategy
    if name in ("none", "data_parallel"):
        if name == "data_parallel":
            _set_data_parallel(config, where)
        return None
    key = (name, tuple(config.devices or ()))
    if key in _STRATEGIES:
        return _STRATEGIES[key]
    import tensorflow as tf

    if name == "multi_worker":
        read_task()
        try:
            result = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:
            raise RuntimeError(
                "`distribution: multi_worker` creates "
                "tf.distribute.MultiWorkerMirroredStrategy, which must come "
                "before TensorFlow runs any op; TensorFlow had already "
                f"started ({error}). Pass kt.train the config's path or "
                "dict (not a loaded Config), or call "
                "keras_tap.runs.distribute.prepare(config) first thing."
            ) from None
    else:
        if config.devices is not None:
            _check_devices(config.devices, f"{where}.devices")
        result = tf.distribute.MirroredStrategy(config.devices)
    _STRATEGIES[key] = result
    return result


def _check_devices(names, where):
    import tensorflow as tf

    known = [d.name for d in tf.config.list_logical_devices()]
    short = {n.split("device:")[-1].lower(): n for n in known}
    for i, name in enumerate(names):
        plain = name.lower().lstrip("/").split("device:")[-1]
        if plain not in short:
            raise ConfigError(
                f"{where}[{i}]",
                f"no device {name!r}{hint(name, known)} (this machine has "
                f"{', '.join(known)})",
            )


def _set_data_parallel(config, where):
    try:
        devices = config.devices or keras.distribution.list_devices()
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
    except ValueError as error:
        raise ConfigError(f"{where}.devices", str(error)) from None


def scratch_dir(run_dir, task):
    """The temporary folder of a worker other than the chief: one per run
    directory and task, in the system's temporary directory."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()
    name = f"keras_tap_{digest[:12]}_{task.name}"
    return Path(tempfile.gettempdir()) / name


class Placement:
    """Where one process of a run writes, and what it restores from.

    Args:
        run_dir: the config's `run.dir`.
        config: the config's `DistributionConfig`.
        task: this process's `Task` (default: from `TF_CONFIG`).

    Attributes:
        task: the `Task`.
        run_dir: where this process writes: `run.dir` for the chief, a
            temporary folder for the other workers (`close` removes it).
        backup_dir: this worker's `BackupAndRestore` folder, or `None`.
    """

    def __init__(self, run_dir, config, task=None):
        self.config = config
        self.target = Path(run_dir)
        self.task = (
            task
            if task is not None
            else (read_task() if config.strategy == "multi_worker" else Task())
        )
        self.run_dir = self.target
        if not self.task.is_chief:
            # A worker killed before `close` leaves it: the restarted
            # worker removes it first.
            self.run_dir = scratch_dir(self.target, self.task)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir.mkdir(parents=True)
        self.backup_dir = None
        if config.backup and config.strategy != "none":
            self.backup_dir = self.target / BACKUP / self.task.name

    @property
    def is_chief(self):
        return self.task.is_chief

    def backup_epoch(self):
        """The epoch the backup continues from (0 without a backup)."""
        if self.backup_dir is None:
            return 0
        for name in (BACKUP_METADATA, BACKUP_METADATA + ".bkp"):
            path = self.backup_dir / name
            if path.is_file():
                try:
                    return int(json.loads(path.read_text())["epoch"])
                except (ValueError, KeyError, TypeError):
                    continue
        return 0

    def callbacks(self):
        """The `BackupAndRestore` callback of this worker (or none)."""
        if self.backup_dir is None:
            return []
        # Two copies: a worker killed while writing one keeps the other.
        backup = keras.callbacks.BackupAndRestore(
            str(self.backup_dir), double_checkpoint=True
        )
        return [backup]

    def close(self):
        """Removes a non-chief worker's temporary folder, and the backup
        folder once no worker's backup is left in it."""
        if not self.is_chief:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.backup_dir is not None:
            parent = self.backup_dir.parent
            if parent.is_dir() and not any(parent.iterdir()):
                try:
                    parent.rmdir()
                except OSError:
                    pass
            target = self.target
            if (
                not self.is_chief
                and target.is_dir()
                and not any(target.iterdir())
            ):
                try:
                    target.rmdir()
                except OSError:
                    pass


def _instead(backend):
    """What a strategy the active `backend` does not run can be replaced
    with: the strategies of that backend, or another backend."""
    if backend == "jax":
        return (
            "on JAX use 'data_parallel' for the devices of this machine, or "
            "'none'; 'mirrored' and 'multi_worker' run with --backend "
            "tensorflow"
        )
    if backend == "tensorflow":
        return (
            "on TensorFlow use 'mirrored' for the devices of one machine or "
            "'multi_worker' for several machines, or 'none'; "
            "'data_parallel' runs with --backend jax"
        )
    return (
        f"the {backend!r} backend runs no distribution strategy: use "
        "'none', or --backend jax for 'data_parallel' or --backend "
        "tensorflow for 'mirrored' and 'multi_worker'"
    )
