"""The Keras backend of a run: a config's `backend:` key and `--backend`.

```yaml
backend: jax      # tensorflow | jax | torch; default: KERAS_BACKEND or
                  # Keras's own default (~/.keras/keras.json, else TF)
```

Keras chooses its backend once per process, when it is first imported,
from `KERAS_BACKEND`. The `keras-tap` command line therefore reads a
config's `backend:` (and `--backend`, which overrides it) before it
imports Keras, and sets `KERAS_BACKEND` from it; `kt.train` runs in a
process where Keras is already imported, so it only checks that the
backend asked for is the one running.

This module imports neither Keras nor a backend (`check_active` aside).
`choose` and `argument` serve the `keras-tap` command line (`cli.py`).
"""

import argparse
import importlib.util
import json
import os
import sys

import yaml

from keras_tap.runs.keypaths import (
    CONFIG_SUFFIXES,
    ConfigError,
    apply_override,
    hint,
    show,
)

BACKENDS = ("tensorflow", "jax", "torch")
# The package each backend imports, for `pip install`.
PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
# Names people write for a backend, which difflib finds no match for.
_ALIASES = {
    "tf": "tensorflow",
    "tf2": "tensorflow",
    "keras": "tensorflow",
    "pytorch": "torch",
    "pt": "torch",
    "jaxlib": "jax",
    "flax": "jax",
}


def check(value, where="backend"):
    """Checks a backend name; `None` (no choice) passes.

    Returns:
        `value`.

    Raises:
        ConfigError: at `where`, naming the valid backends and the
            closest one.

    Example:

    >>> check("jax"), check(None)
    ('jax', None)

    `check("pytorch")` raises `backend: unknown backend 'pytorch'; did you
    mean 'torch'? (expected one of tensorflow, jax, torch, or null for
    KERAS_BACKEND or Keras's default)`.
    """
    if value is None or (isinstance(value, str) and value in BACKENDS):
        return value
    raise ConfigError(
        where,
        f"unknown backend {show(value)}{_suggestion(value)} (expected one of "
        f"{', '.join(BACKENDS)}, or null for KERAS_BACKEND or Keras's "
        "default)",
    )


def _suggestion(value):
    """`"; did you mean 'torch'?"` for a near-miss backend name (an alias
    such as `pytorch`, or a close spelling), else the closest names."""
    word = str(value).strip().lower()
    closest = word if word in BACKENDS else _ALIASES.get(word)
    return f"; did you mean {closest!r}?" if closest else hint(word, BACKENDS)


def of_config(config, overrides=()):
    """The backend a config asks for, read without importing Keras.

    Args:
        config: a `Config`, a dict or a path to a YAML/JSON config.
        overrides: `key.path=value` strings, as `keras-tap --set` gives.

    Returns:
        The checked `backend:` value, or `None` when the config sets none.
        A file that cannot be read or an override that cannot be applied
        also gives `None`: loading the config reports those.

    Raises:
        ConfigError: at `backend` for an unknown backend.
    """
    if isinstance(config, dict):
        raw = json.loads(json.dumps(config))
    elif isinstance(config, (str, os.PathLike)):
        try:
            with open(config, encoding="utf-8") as file:
                raw = yaml.safe_load(file)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
    else:
        return check(getattr(config, "backend", None))
    if not isinstance(raw, dict):
        return None
    try:
        for assignment in overrides or ():
            apply_override(raw, assignment)
    except ConfigError:
        return None
    return check(raw.get("backend"))


def select(flag=None, configured=None, environ=None):
    """The backend a command runs on, and where that choice was made.

    `--backend` (`flag`) wins; otherwise the config's `backend:`
    (`configured`), which must agree with `KERAS_BACKEND` when that is set.

    Returns:
        `(name, where)`: `where` is `"--backend"` or `"backend"`; `(None,
        None)` when neither is given (Keras chooses).

    Raises:
        ConfigError: at `backend` when `KERAS_BACKEND` names another
            backend than the config.
    """
    if flag is not None:
        return check(flag, "--backend"), "--backend"
    if configured is None:
        return None, None
    environ = os.environ if environ is None else environ
    current = environ.get("KERAS_BACKEND")
    if current and current != configured:
        raise ConfigError(
            "backend",
            f"the config asks for {configured!r}, but KERAS_BACKEND is "
            f"{current!r} in the environment; choose one: unset "
            f"KERAS_BACKEND (or set it to {configured!r}), remove "
            f"`backend:` from the config, or pass --backend {current} (or "
            f"--backend {configured})",
        )
    return configured, "backend"


def installed(name, where="backend"):
    """Raises `ConfigError` when the package of backend `name` is not
    installed (without importing it)."""
    package = PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            where,
            f"backend {name!r} needs the `{package}` package: pip install "
            f"{package}",
        )


def use(name, where="backend"):
    """Makes Keras start on backend `name` (sets `KERAS_BACKEND`), before
    Keras is imported; once it is, checks that it runs on `name`.

    This changes the environment of the process, so only the command
    line calls it.

    Raises:
        ConfigError: at `where` when the backend's package is missing, or
            when Keras is already imported with another backend.
    """
    if "keras" in sys.modules:
        check_active(name, where)
        return
    installed(name, where)
    os.environ["KERAS_BACKEND"] = name


def check_active(name, where="backend"):
    """Raises `ConfigError` when Keras runs on another backend than `name`
    (`None` passes).

    Imports Keras.
    """
    if name is None:
        return
    import keras

    active = keras.backend.backend()
    if active != name:
        raise ConfigError(
            where,
            f"asks for the {name!r} backend, but Keras runs on {active!r} "
            "in this process (Keras chooses its backend once, when it is "
            f"first imported); set KERAS_BACKEND={name} before importing "
            "Keras, or run `keras-tap train`, which sets it from the config",
        )


def choose(args):
    """Sets `KERAS_BACKEND` for the backend a command runs on, before Keras
    is imported: `--backend`, else the `backend:` of the command's config.

    `args` is the parsed command line of `keras-tap`. Reads the config
    file (with its `--set` overrides) without importing Keras. A model
    file or run directory has no say: a `.keras` file loads on any
    backend. `--backend` is also added to the overrides of `train` and
    `validate`, so that the config records it.

    Returns:
        `(backend, where)`, or `(None, None)` to let `KERAS_BACKEND` or
        Keras's default decide.

    Raises:
        ConfigError: for an unknown backend, a config whose backend is
            not the one `KERAS_BACKEND` names (without `--backend`), or a
            backend whose package is not installed.
    """
    configured = None
    if args.backend is None:
        path = getattr(args, "config", None)
        if path is None:
            path = getattr(args, "model", None) or getattr(
                args, "features", None
            )
            if path is not None and not str(path).endswith(CONFIG_SUFFIXES):
                path = None
        if path is not None:
            overrides = getattr(args, "overrides", ())
            configured = of_config(path, overrides)
    # Once Keras is imported (a program calling `main`), KERAS_BACKEND no
    # longer matters: the backend Keras runs on is checked instead.
    environ = {} if "keras" in sys.modules else os.environ
    backend, where = select(args.backend, configured, environ)
    if backend is not None:
        use(backend, where)
    elif environ.get("KERAS_BACKEND"):
        # Keras would fail on import with a traceback: say it here.
        current = environ["KERAS_BACKEND"]
        if current not in BACKENDS:
            raise ConfigError(
                "KERAS_BACKEND",
                f"unknown backend {current!r} in the environment"
                f"{_suggestion(current)} (expected one of "
                f"{', '.join(BACKENDS)}; or pass --backend)",
            )
        installed(current, "KERAS_BACKEND")
    if args.backend is not None and hasattr(args, "overrides"):
        # The config then records the backend the run trains on.
        args.overrides = [*args.overrides, f"backend={args.backend}"]
    return backend, where


def argument(text):
    """The `type` of `--backend`: `"jax"` -> `"jax"`; an unknown name is
    refused with the closest one."""
    try:
        return check(text, "--backend")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(error.message) from None
