"""Argument checks shared by the loss, regularizer and schedule classes."""

import math
import numbers

import keras
from keras import ops


def check_number(
    owner, name, value, *, minimum=0.0, strict=False, integer=False
):
    """Returns `value` as a float (or int), or raises a `ValueError` that
    names the argument, its owner, what was expected and what came."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        noun = "an integer" if integer else "a finite number"
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(
            f"Invalid value for argument `{name}` of `{owner}`: expected "
            f"{noun} {bound}. Received: {name}={value!r}"
        )
    return int(value) if integer else float(value)


def as_float32(x, owner, min_rank):
    """`x` cast to float32 (sums of float16 activations overflow), of rank
    at least `min_rank`."""
    x = ops.cast(x, "float32")
    if len(x.shape) < min_rank:
        raise ValueError(
            f"`{owner}` expects an activation of rank >= {min_rank} "
            f"(batch first, channels last). Received: shape={x.shape}"
        )
    return x


def same_form(name, candidates):
    """The `candidates` written as `name` is, to suggest for a near miss:
    the lower-case ones (`"accuracy"`, `"feature_mse"`) for a lower-case
    `name`, the others (class names, `"MSE"`) else; all of them if none
    is written that way."""
    lower = str(name) == str(name).lower()
    chosen = [c for c in candidates if (c == c.lower()) == lower]
    return chosen or list(candidates)


def from_name(identifier, by_name, aliases):
    """The class named `identifier` (a class name, or a snake-case alias
    in any case), or `None`."""
    return by_name.get(identifier) or aliases.get(identifier.lower())


def from_string(identifier, by_name, aliases, get):
    """What a name gives before a module's own fallbacks: our class of
    that name (`from_name`) built with its defaults, or the object
    registered as `"package>Name"` passed through `get`; else `None`."""
    cls = from_name(identifier, by_name, aliases)
    if cls is not None:
        return cls()
    if ">" in identifier:
        registered = keras.saving.get_registered_object(identifier)
        if registered is not None:
            return get(registered)
    return None
