"""`class_weight` with `x` a `keras.utils.PyDataset`, a Python generator or
iterator, or a torch `DataLoader`: each batch `(x, y[, sample_weight])` is
mapped in NumPy, like the arrays of `fit`, to `(x, dict y, dict weights)`
with the class weights in the prediction weight (times the batch's own).

Shared by every backend; a `tf.data.Dataset` is mapped in TensorFlow by
`trainers/tensorflow.py` instead.
"""

import collections.abc
import sys

import keras


class BatchWeighter:
    """Maps one batch; holds no model, so it pickles to worker processes."""

    def __init__(self, tap_model, class_weight):
        self.keys = tap_model.target_keys()
        self.class_weight = dict(class_weight)

    def __call__(self, batch):
        if isinstance(batch, list):
            batch = tuple(batch)
        if not isinstance(batch, tuple) or len(batch) not in (2, 3):
            size = ""
            if isinstance(batch, tuple):
                size = f" of length {len(batch)}"
            raise ValueError(
                "`class_weight` needs batches `(x, y)` or `(x, y, "
                "sample_weight)`; received a batch of type "
                f"{type(batch).__name__}{size}."
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        new_y, new_w = self.keys.class_weighted(
            y, sample_weight, self.class_weight
        )
        return x, new_y, new_w


class ClassWeightedPyDataset(keras.utils.PyDataset):
    """A `PyDataset` whose batches are those of `dataset`, class-weighted.
    It keeps the workers, multiprocessing, queue size, length and epoch
    hooks of `dataset`."""

    def __init__(self, dataset, weighter):
        super().__init__(
            workers=dataset.workers,
            use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        self.dataset = dataset
        self.weighter = weighter

    def __len__(self):
        return len(self.dataset)

    @property
    def num_batches(self):
        return self.dataset.num_batches

    def __getitem__(self, index):
        return self.weighter(self.dataset[index])

    def on_epoch_begin(self):
        self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()


def _mapped(iterable, weighter):
    for batch in iterable:
        yield weighter(batch)


def _torch_dataloader_type():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return getattr(getattr(torch, "utils", None), "data", None)


def _weighted_dataloader(loader, weighter):
    """A `DataLoader` over the class-weighted batches of `loader`:
    iterable once per epoch like `loader`, with its length."""
    data = _torch_dataloader_type()

    class Batches(data.IterableDataset):
        def __iter__(self):
            return _mapped(loader, weighter)

        def __len__(self):
            return len(loader)

    return data.DataLoader(Batches(), batch_size=None)


def with_class_weight(tap_model, x, class_weight):
    """`x` with each batch class-weighted, of a kind Keras's `fit` reads.

    Raises:
        ValueError: for an `x` of another kind.
    """
    weighter = BatchWeighter(tap_model, class_weight)
    if isinstance(x, keras.utils.PyDataset):
        return ClassWeightedPyDataset(x, weighter)
    data = _torch_dataloader_type()
    if data is not None and isinstance(x, data.DataLoader):
        return _weighted_dataloader(x, weighter)
    if isinstance(x, collections.abc.Iterator):
        return _mapped(x, weighter)
    raise ValueError(
        "`class_weight` needs `y`, or `x` as a tf.data.Dataset, a "
        "keras.utils.PyDataset, a Python generator or iterator, or a torch "
        "DataLoader of (x, y) or (x, y, sample_weight) batches; received x "
        f"of type {type(x).__name__}."
    )
