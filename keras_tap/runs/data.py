"""Data sources for config-driven training.

The `data` section of a config names one source:

- `dataset: sklearn_digits` (the default): scikit-learn's 8x8 digits, which
  ship inside scikit-learn (`pip install "keras-tap[examples]"`), scaled to
  [0, 1] with shape `(8, 8, 1)` and 10 classes;
- `dataset: mnist | fashion_mnist | cifar10 | cifar100`: `keras.datasets`,
  read from the Keras cache (`~/.keras/datasets`) and never downloaded here;
  the training split is used, images scaled to [0, 1];
- `npz: file.npz` with arrays named by `x` and `y` (defaults `"x"`, `"y"`)
  and tap targets `targets: {tap_name: array name}`;
- `npy: x.npy` with `y: y.npy` and `targets: {tap_name: t.npy}`;
- `directory: images/`: `keras.utils.image_dataset_from_directory` (one
  subfolder per class), read into memory once.

`validation_split` holds out a seeded random share of the samples. Training
batches come from `training_dataset`, whose order in epoch `e` is a function
of `(seed, e)` alone, so a resumed run sees the batches an uninterrupted one
would have seen.
"""

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from keras_tap.runs import checks, keypaths
from keras_tap.runs.checks import field
from keras_tap.runs.keypaths import SOURCE_KEYS, ConfigError, key_path

DATASETS = ("sklearn_digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
SOURCES = SOURCE_KEYS["data"]
_KERAS_CACHE = {
    "mnist": ["mnist.npz"],
    "fashion_mnist": [
        f"fashion-mnist/{name}-{kind}-idx{n}-ubyte.gz"
        for name in ("train", "t10k")
        for kind, n in (("labels", 1), ("images", 3))
    ],
    "cifar10": ["cifar-10-batches-py-target_archive"],
    "cifar100": ["cifar-100-python-target_archive"],
}
_MISSING_SKLEARN = (
    "the sklearn_digits dataset needs scikit-learn: "
    'pip install "keras-tap[examples]"'
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section: a source (see the module docstring), the split,
    batching and shuffling. `value` is the dataset name or absolute path."""

    source: str = "dataset"
    value: Any = "sklearn_digits"
    x: str = field("x", checks.text)
    y: Any = field("y", checks.text)
    targets: dict = field({}, checks.mapping)
    image_size: Any = field(None, checks.shape(2))
    color_mode: str = field("rgb", checks.one_of("rgb", "grayscale", "rgba"))
    rescale: Any = field(None, checks.number(low=0))
    validation_split: float = field(0.2, checks.number(low=0, high=1))
    batch_size: int = field(32, checks.integer(1))
    shuffle: bool = field(True, checks.boolean)
    seed: Any = field(None, checks.integer(0))
    limit: Any = field(None, checks.integer(2))

    def to_dict(self):
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {data.pop("source"): data.pop("value"), **data}

    @classmethod
    def from_config(cls, raw, taps, base_dir):
        """Checks a raw `data` section against the config's `taps`."""
        values = checks.read_section(cls, raw, "data", extra_keys=SOURCES)
        raw = raw or {}
        given = [key for key in SOURCES if raw.get(key) is not None]
        if len(given) > 1:
            message = f"expected one source, got {', '.join(given)}"
            raise ConfigError("data", message)
        source = given[0] if given else "dataset"
        value = raw.get(source, "sklearn_digits")
        where = f"data.{source}"
        if source == "dataset" and value not in DATASETS:
            hint = keypaths.hint(value, DATASETS)
            raise ConfigError(where, f"unknown dataset {value!r}{hint}")
        if source != "dataset":
            directory = source == "directory"
            suffix = None if directory else f".{source}"
            value = checks.path(
                value, where, base_dir, suffix=suffix, directory=directory
            )
        targets = values["targets"]
        for tap, key in targets.items():
            here = key_path("data", "targets", str(tap))
            if tap not in taps:
                hint = keypaths.hint(tap, taps)
                raise ConfigError(here, f"no tap named {tap!r}{hint}")
            checks.text(key, here)
        if "y" in raw and raw["y"] is None:
            values["y"] = None  # no prediction targets, only tap targets
        if source == "npy":
            y = raw.get("y")
            values["y"] = y and checks.path(y, "data.y", base_dir)
            for tap, name in targets.items():
                here = key_path("data", "targets", tap)
                targets[tap] = checks.path(name, here, base_dir)
        elif targets and source != "npz":
            message = f"tap targets need an npz or npy source, not {source}"
            raise ConfigError("data.targets", message)
        for name, tap in taps.items():
            needs_data = tap.loss is not None and tap.target == "data"
            if needs_data and tap.teacher is None and name not in targets:
                raise ConfigError(
                    key_path("taps", name, "target"),
                    f"the tap's loss needs y[{name!r}] from the data, but "
                    f"data.targets has no {name!r}; add it there or set "
                    "target: predictions",
                )
        if source == "directory" and values["image_size"] is None:
            values["image_size"] = [256, 256]
        return cls(source=source, value=value, **values)


@dataclasses.dataclass
class Arrays:
    """Inputs `x`, prediction targets `y` (or `None`) and tap targets."""

    x: np.ndarray
    y: Any = None
    targets: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.x)

    def take(self, index):
        return Arrays(
            self.x[index],
            None if self.y is None else self.y[index],
            {tap: t[index] for tap, t in self.targets.items()},
        )

    def fit_targets(self):
        """`y` as `fit` takes it: the array, or a dict with tap targets."""
        if not self.targets:
            return self.y
        y = {} if self.y is None else {"predictions": self.y}
        return {**y, **self.targets}


def load(data_config, seed=0):
    """Loads a `DataConfig`'s source and splits it.

    Args:
        data_config: a `DataConfig`.
        seed: used when `data_config.seed` is `None` (the run's seed).

    Returns:
        `(train, validation)`, two `Arrays`; `validation` is `None` when
        `validation_split` is 0.

    Raises:
        ConfigError: a missing file, array key or cached dataset, or
            arrays of different lengths, named by key path.
        ImportError: `sklearn_digits` without scikit-learn.
    """
    arrays, (train_index, val_index) = _read_split(data_config, seed)
    train = arrays.take(train_index)
    validation = arrays.take(val_index) if len(val_index) else None
    return train, validation


def _read_split(data_config, seed):
    """All samples (rescaled, lengths checked) and `split_indices`."""
    cfg = data_config
    arrays = read_arrays(cfg)
    if cfg.rescale is not None:
        arrays.x = arrays.x * np.float32(cfg.rescale)
    n = len(arrays)
    if arrays.y is not None and len(arrays.y) != n:
        message = f"has {len(arrays.y)} samples, but x has {n}"
        raise ConfigError("data.y", message)
    for tap, target in arrays.targets.items():
        if len(target) != n:
            message = f"has {len(target)} samples, but x has {n}"
            raise ConfigError(key_path("data", "targets", tap), message)
    return arrays, split_indices(n, cfg, seed)


def split_indices(n, data_config, seed=0):
    """`(train, validation)`: the sorted indices of the samples `load`
    puts in each split, of `n` samples (`data_config.seed` wins over
    `seed`). The validation indices are empty when `validation_split`
    is 0."""
    cfg = data_config
    seed = seed if cfg.seed is None else cfg.seed
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n)
    if cfg.limit is not None:
        order = order[: cfg.limit]
    n_val = int(round(len(order) * cfg.validation_split))
    if cfg.validation_split > 0:
        n_val = min(max(n_val, 1), len(order) - 1)
    if len(order) - n_val < 1:
        raise ConfigError("data", f"too few samples to train on: {n}")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


SPLITS = ("all", "train", "validation")


def samples(data_config, seed=0, split="all"):
    """The samples of a config's data that `keras-tap extract` and
    `plot --features` read: the ones `load` returns, in source order.

    Args:
        data_config: a `DataConfig`.
        seed: used when `data_config.seed` is `None` (the run's seed).
        split: `"all"` (the training and held-out samples together: every
            sample training uses, `limit` applied), `"train"` or
            `"validation"` (the held-out split).

    Returns:
        `Arrays`.

    Raises:
        ConfigError: an unknown split (named `--split`), no held-out
            split to read, or what `load` raises.
    """
    if split not in SPLITS:
        hint = keypaths.hint(split, SPLITS)
        message = f"expected one of {', '.join(SPLITS)}, got {split!r}{hint}"
        raise ConfigError("--split", message)
    arrays, (train_index, val_index) = _read_split(data_config, seed)
    if split == "train":
        return arrays.take(train_index)
    if split == "validation":
        if not len(val_index):
            raise ConfigError(
                "--split",
                "the config holds no samples out (data.validation_split is "
                "0): use --split train or all",
            )
        return arrays.take(val_index)
    return arrays.take(np.sort(np.concatenate([train_index, val_index])))


def read_arrays(cfg):
    """All samples of a `DataConfig`'s source, without split or limit."""
    reader = {
        "dataset": _read_dataset,
        "npz": _read_npz,
        "npy": _read_npy,
        "directory": _read_directory,
    }[cfg.source]
    arrays = reader(cfg)
    if arrays.x.dtype.kind in "biuf" and arrays.x.dtype != np.float32:
        arrays.x = arrays.x.astype("float32")
    return arrays


def inputs(spec, *, x_key="x", image_size=None, base_dir=None):
    """Reads model inputs for `extract` and `plot --features`.

    `spec` is a dataset name, a `.npz` file (array `x_key`), a `.npy` file
    or an image directory. Returns the NumPy array of inputs.
    """
    if spec in DATASETS:
        raw = {"dataset": spec}
    else:
        path = Path(base_dir or Path.cwd()) / os.path.expanduser(spec)
        kind = "directory" if path.is_dir() else path.suffix.lstrip(".").lower()
        if kind not in ("npz", "npy", "directory"):
            message = (
                f"expected a dataset name ({', '.join(DATASETS)}), a .npz or "
                f".npy file or an image directory, got {spec!r}"
            )
            raise ConfigError("--data", message)
        if not path.exists():
            raise ConfigError("--data", f"no such file: {str(path)!r}")
        raw = {kind: str(path), "x": x_key, "image_size": image_size}
    cfg = DataConfig.from_config(raw, {}, base_dir or Path.cwd())
    return read_arrays(dataclasses.replace(cfg, y=None)).x


def training_dataset(
    arrays, *, batch_size, seed, shuffle, initial_epoch, epochs, steps
):
    """A `tf.data.Dataset` of the training batches of epochs
    `initial_epoch` to `epochs - 1`, `steps` batches each.

    Epoch `e` visits the samples in the order
    `np.random.default_rng([seed, e]).permutation(n)` (in order without
    `shuffle`), continuing with `[seed, e, 1]`, ... when `steps` asks for
    more batches than one pass holds; so the batches of an epoch do not
    depend on what was drawn before it, and a resumed run repeats exactly
    those of an uninterrupted one. Use with `fit(steps_per_epoch=steps)`.
    """
    import tensorflow as tf

    n = len(arrays)
    y = arrays.fit_targets()

    def epoch_order(epoch):
        passes = math.ceil(steps * batch_size / n)
        if not shuffle:
            return np.tile(np.arange(n), passes)
        keys = [[seed, epoch]] + [[seed, epoch, k] for k in range(1, passes)]
        return np.concatenate(
            [np.random.default_rng(key).permutation(n) for key in keys]
        )

    def batches():
        per_pass = math.ceil(n / batch_size)
        for epoch in range(initial_epoch, epochs):
            order = epoch_order(epoch)
            for step in range(steps):
                pass_index, start = divmod(step, per_pass)
                begin = pass_index * n + start * batch_size
                end = min(begin + batch_size, (pass_index + 1) * n)
                index = order[begin:end]
                batch_y = tree_map(lambda a: a[index], y)
                if batch_y is None:
                    yield arrays.x[index]
                else:
                    yield arrays.x[index], batch_y

    def spec(array):
        shape = (None,) + array.shape[1:]
        return tf.TensorSpec(shape, tf.as_dtype(array.dtype))

    signature = spec(arrays.x)
    if y is not None:
        signature = (signature, tree_map(spec, y))
    dataset = tf.data.Dataset.from_generator(
        batches, output_signature=signature
    )
    return dataset.prefetch(2)


def steps_per_epoch(arrays, batch_size, steps=None):
    """`steps`, or the batches in one pass over `arrays`."""
    return steps or math.ceil(len(arrays) / batch_size)


def tree_map(fn, y):
    if y is None:
        return None
    if isinstance(y, dict):
        return {key: fn(value) for key, value in y.items()}
    return fn(y)


# ------------------------------------------------------------------ sources


def _read_dataset(cfg):
    name = cfg.value
    if name == "sklearn_digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError(_MISSING_SKLEARN) from None
        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        return Arrays(x, digits.target.astype("int32"))
    cache = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    if not os.access(cache if cache.exists() else cache.parent, os.W_OK):
        cache = Path("/tmp/.keras")
    cache = cache / "datasets"
    missing = [f for f in _KERAS_CACHE[name] if not (cache / f).exists()]
    if missing:
        raise ConfigError(
            "data.dataset",
            f"{name} is not in the Keras cache: {str(cache / missing[0])!r} is "
            "missing and keras-tap does not download. Fetch it once on a "
            f'machine online with: python -c "import keras; '
            f'keras.datasets.{name}.load_data()" (then copy {str(cache)!r}), '
            "or use an npz source",
        )
    import keras

    (x, y), _ = getattr(keras.datasets, name).load_data()
    x = x.astype("float32") / 255.0
    if x.ndim == 3:
        x = x[..., None]
    return Arrays(x, y.reshape(-1).astype("int32"))


def _read_npz(cfg):
    where = "data.npz"
    try:
        archive = np.load(cfg.value, allow_pickle=False)
    except Exception as error:
        message = f"cannot read {cfg.value!r}: {keypaths.message_of(error)}"
        raise ConfigError(where, message) from None
    with archive:
        keys = list(archive.files)

        def get(key, at):
            if key not in keys:
                hint = keypaths.hint(key, keys)
                message = f"no array {key!r} in {cfg.value!r} (arrays: "
                raise ConfigError(at, message + f"{', '.join(keys)}){hint}")
            return archive[key]

        x = get(cfg.x, "data.x")
        y = None if cfg.y is None else get(cfg.y, "data.y")
        targets = {
            tap: get(key, key_path("data", "targets", tap))
            for tap, key in cfg.targets.items()
        }
    return Arrays(x, y, targets)


def _read_npy(cfg):
    def get(path, at):
        try:
            return np.load(path, allow_pickle=False)
        except Exception as error:
            message = f"cannot read {path!r}: {keypaths.message_of(error)}"
            raise ConfigError(at, message) from None

    x = get(cfg.value, "data.npy")
    y = None if cfg.y is None else get(cfg.y, "data.y")
    targets = {
        tap: get(path, key_path("data", "targets", tap))
        for tap, path in cfg.targets.items()
    }
    return Arrays(x, y, targets)


def _read_directory(cfg):
    import keras

    try:
        dataset = keras.utils.image_dataset_from_directory(
            cfg.value,
            labels="inferred",
            label_mode="int",
            color_mode=cfg.color_mode,
            image_size=tuple(cfg.image_size),
            batch_size=256,
            shuffle=False,
            verbose=False,
        )
    except Exception as error:
        message = keypaths.message_of(error)
        raise ConfigError("data.directory", message) from None
    xs, ys = [], []
    for x, y in dataset.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        message = f"no images found in {cfg.value!r}"
        raise ConfigError("data.directory", message)
    return Arrays(np.concatenate(xs), np.concatenate(ys).astype("int32"))
