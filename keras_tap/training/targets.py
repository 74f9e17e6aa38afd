"""Targets, sample weights and class weights of a `TapModel`'s steps.

`y` is either the prediction target alone, or the dict form
`{"predictions": prediction_target, tap_name: tap_target, ...}`.
`sample_weight` is one array, or a dict keyed like `y`. `class_weight`
weights the predictions only: `fit` turns it into a prediction sample
weight before Keras sees it.
"""

import numpy as np

from keras_tap.training import trainers

PREDICTIONS = "predictions"


class TargetsMixin:
    """Target and sample-weight handling shared by `TapModel`'s steps."""

    def is_dict_form(self, y):
        """Whether `y` is the dict form (it names the predictions or a
        tap)."""
        return isinstance(y, dict) and (
            PREDICTIONS in y or any(n in y for n in self.tap_names)
        )

    def split_targets(self, y):
        """`y` -> `(prediction_target, {tap_name: tap_target})`."""
        if self.is_dict_form(y):
            return y.get(PREDICTIONS), {
                k: v for k, v in y.items() if k != PREDICTIONS
            }
        return y, {}

    def split_weights(self, sample_weight, y):
        """`sample_weight` -> `(prediction_weight, {tap_name: weight})`."""
        if sample_weight is None:
            return None, {}
        if isinstance(sample_weight, dict):
            pred = sample_weight.get(PREDICTIONS)
            return pred, {
                k: v
                for k, v in sample_weight.items()
                if k != PREDICTIONS and v is not None
            }
        if isinstance(sample_weight, (list, tuple)) and self.is_dict_form(y):
            # Keras flattens a dict-shaped sample weight to a list, sorted
            # like the keys of `y`.
            keys = sorted(y)
            weights = dict(zip(keys, sample_weight))
            return self.split_weights(weights, y)
        return sample_weight, {n: sample_weight for n in self.tap_names}

    def data_target(self, tap_name, y, tap_targets):
        """`y[tap_name]`, or a `ValueError` saying how to pass it."""
        if tap_name in tap_targets:
            return tap_targets[tap_name]
        got = sorted(y) if isinstance(y, dict) else None
        received = (
            f"the keys {got}" if got is not None else "a y that is not a dict"
        )
        raise ValueError(
            f"Tap {tap_name!r} has target='data', so it needs y[{tap_name!r}]"
            f"; received {received}. Pass y={{'predictions': ..., "
            f"{tap_name!r}: ...}}, or give the Tap target='predictions' or "
            "teacher='layer path'."
        )

    def prepare_fit_data(self, x, y, kwargs):
        """Turn `class_weight` into a prediction sample weight.

        Keras refuses `class_weight` when `y` is a dict, and would apply it
        to the tap losses too when it is not; the contract says it weights
        the predictions only. The taps whose target is not in `y`
        (`target="predictions"`, teacher taps) get an entry of their own in
        `y` (unused) and in the sample weight (the given one, or ones), so
        that the class weights do not reach them.

        Returns:
            `(x, y, kwargs)` for Keras's `fit`.
        """
        class_weight = kwargs.pop("class_weight", None)
        if class_weight is None:
            return x, y, kwargs
        if not isinstance(class_weight, dict) or not class_weight:
            raise ValueError(
                "`class_weight` must be a non-empty dict {class_index: "
                f"weight}}; received {class_weight!r}."
            )
        if y is None:
            # A dataset, PyDataset, generator or DataLoader: its batches
            # are mapped (Keras refuses a `sample_weight` beside it).
            dataset_fn = trainers.get().with_class_weight
            return dataset_fn(self, x, class_weight), None, kwargs
        sample_weight = kwargs.pop("sample_weight", None)
        new_y, kwargs["sample_weight"] = self.class_weighted(
            y, sample_weight, class_weight
        )
        return x, new_y, kwargs

    def class_weighted(self, y, sample_weight, class_weight):
        """`(y, sample_weight)` -> `(dict y, dict sample_weight)` with the
        class weights in the prediction weight (times the given one), in
        NumPy; the arrays of `fit` and each batch of a PyDataset, generator
        or DataLoader go through here.

        Raises:
            ValueError: if y has no prediction target, or a class of it has
                no weight in `class_weight`.
        """
        pred_y, tap_y = self.split_targets(y)
        if pred_y is None:
            got = f"keys: {sorted(y)}" if isinstance(y, dict) else "no y"
            raise ValueError(
                "`class_weight` applies to the predictions, but y has no "
                f"'predictions' key ({got})."
            )
        pred_w, tap_w = self.split_weights(sample_weight, y)
        weights = class_weights_for(np.asarray(pred_y), class_weight)
        ones = np.ones_like(weights)
        new_y = {PREDICTIONS: pred_y, **tap_y}
        new_w = {PREDICTIONS: weights}
        if pred_w is not None:
            new_w[PREDICTIONS] = weights * np.asarray(pred_w, "float32")
        for name in self.tap_weight_keys(tap_y):
            if name not in tap_y:
                new_y[name] = np.zeros_like(weights)
            given = tap_w.get(name, pred_w)
            new_w[name] = ones if given is None else np.asarray(given)
        return new_y, new_w

    def target_keys(self):
        """What `class_weighted` reads of this model, as a small picklable
        object with the same methods (for PyDataset worker processes)."""
        return TargetKeys(
            tuple(self.tap_names),
            {
                name: TapTargetKind(tap.teacher is not None, tap.target)
                for name, tap in self.taps.items()
            },
        )

    def tap_weight_keys(self, tap_targets):
        """Keys of the sample-weight dict that `class_weight` builds: the
        taps keyed in `y`, then the taps whose target is not in `y`."""
        keys = list(tap_targets)
        for name, tap in self.taps.items():
            elsewhere = tap.teacher is not None or tap.target == PREDICTIONS
            if elsewhere and name not in keys:
                keys.append(name)
        return keys


class TapTargetKind:
    """The two fields of a `Tap` that `tap_weight_keys` reads."""

    def __init__(self, has_teacher, target):
        self.teacher = True if has_teacher else None
        self.target = target if isinstance(target, str) else None


class TargetKeys(TargetsMixin):
    """A model's tap names and tap target kinds, without the model: the
    `TargetsMixin` methods run on it unchanged."""

    def __init__(self, tap_names, taps):
        self.tap_names = tap_names
        self.taps = taps


def class_indices(pred_y):
    """Class index per sample: sparse labels, or argmax of one-hot rows."""
    if pred_y.ndim >= 2 and pred_y.shape[-1] > 1:
        return np.argmax(pred_y, axis=-1).reshape(-1)
    return np.asarray(pred_y).reshape(pred_y.shape[0], -1)[:, 0].astype(int)


def class_weights_for(pred_y, class_weight):
    """The weight of each sample's class, as float32."""
    indices = class_indices(pred_y)
    missing = sorted(set(np.unique(indices).tolist()) - set(class_weight))
    if missing:
        raise ValueError(
            f"`class_weight` has no weight for the classes {missing} found in "
            f"the prediction target; it has keys {sorted(class_weight)}."
        )
    table = np.zeros(max(max(class_weight), indices.max()) + 1, "float32")
    for key, value in class_weight.items():
        table[int(key)] = value
    return table[indices]
