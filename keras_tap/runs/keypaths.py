"""Key paths: how a config error names a value, and `--set` overrides.

A key path joins section keys with `.` and list indices in brackets:
`taps.early.weight`, `callbacks[0].config.patience`. Keys that are not
plain names (tap names holding `.` or `/`) are quoted in brackets:
`taps["resnet50/conv3_block1_out"].weight`. Every config problem raises
`ConfigError`, whose message starts with such a path.
"""

import difflib
import json
import re

import yaml

# The suffixes of a config file (YAML or JSON), as opposed to a model file
# or a run directory.
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

# The keys of a section of which only one may be given: setting one with
# `--set` removes the others.
SOURCE_KEYS = {
    "model": ("application", "file", "builder"),
    "teacher": ("application", "file", "builder"),
    "data": ("dataset", "npz", "npy", "directory"),
}
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_TOKEN = re.compile(
    r"""\[\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|(\d+))\s*\]"""
    r"""|(?:^|\.)([A-Za-z0-9_\-@]+)"""
)


class ConfigError(ValueError):
    """A config value is wrong; the message starts with its key path.

    Attributes:
        path: the key path, e.g. `taps.early.weight`.
        message: what was wrong, without the key path.
    """

    def __init__(self, path, message):
        message = plain(message)  # e.g. a Keras error's ANSI bold
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def key_path(*parts, prefix=""):
    """Joins keys and list indices into a key path, quoting odd keys.

    Args:
        *parts: keys (`str`) and list indices (`int`).
        prefix: a key path to extend.

    Example:

    >>> key_path("taps", "a/b", "weight"), key_path(0, prefix="callbacks")
    ('taps["a/b"].weight', 'callbacks[0]')
    """
    text = prefix
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


def parse_key_path(text):
    """Splits a key path such as `taps["a/b"].weight` into its parts."""
    parts, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ConfigError(
                "--set",
                f"cannot parse the key path {text!r} at character {pos + 1}; "
                'expected keys joined by "." and odd names quoted in '
                'brackets: taps["a/b"].weight=0.5',
            )
        double, single, index, name = match.groups()
        if double is not None:
            parts.append(json.loads(f'"{double}"'))
        elif index is not None:
            parts.append(int(index))
        else:
            parts.append(single if single is not None else name)
        pos = match.end()
    if not parts:
        raise ConfigError("--set", "expected key.path=value, got no key path")
    return parts


def apply_override(raw, assignment):
    """Applies one `key.path=value` assignment to a raw config dict.

    The value is parsed with `yaml.safe_load`: `3`, `0.5`, `true`, `[1, 2]`
    and `null` give an int, a float, a bool, a list and `None`. Mappings
    missing on the way are created, a tap written as a bare layer path
    becomes `{layer: path}`, and setting a source (`data.npz`,
    `model.file`, ...) removes the section's other source. Modifies and
    returns `raw`.
    """
    if not isinstance(assignment, str) or "=" not in assignment:
        raise ConfigError(
            "--set", f"expected key.path=value, got {assignment!r} (no '=')"
        )
    text, _, value_text = assignment.partition("=")
    parts = parse_key_path(text.strip())
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as error:
        message = f"cannot parse the --set value: {message_of(error)}"
        raise ConfigError(key_path(*parts), message) from None
    node = raw
    for depth, part in enumerate(parts):
        here = key_path(*parts[: depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                raise ConfigError(here, "no such list item")
        elif not isinstance(node, dict):
            raise ConfigError(here, f"cannot set a key in {show(node)}")
        if depth == len(parts) - 1:
            if (
                depth == 1
                and value is not None
                and part in SOURCE_KEYS.get(parts[0], ())
            ):
                keep = parts[0] == "data"
                for key in list(node):
                    if key != part and (not keep or key in SOURCE_KEYS["data"]):
                        del node[key]
            node[part] = value
        elif isinstance(part, str) and node.get(part) is None:
            node[part] = {}
            node = node[part]
        else:
            if (
                parts[0] == "taps"
                and depth == 1
                and isinstance(node[part], str)
            ):
                node[part] = {"layer": node[part]}
            node = node[part]
    return raw


# ------------------------------------------------------- wording messages


def hint(name, candidates):
    """`"; did you mean 'x'?"` for the closest candidate, or `""`."""
    close = difflib.get_close_matches(str(name), list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def show(value):
    """A short text of a config value for a message: a `repr` for strings,
    JSON (cut to 80 characters) for anything else."""
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value, default=lambda v: type(v).__name__)
    return text if len(text) <= 80 else text[:77] + "..."


# An ANSI escape sequence (CSI, e.g. Keras's bold `\x1b[1m`), or a lone ESC.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b")


def plain(text):
    """`text` without ANSI escape codes (colours, bold)."""
    return _ANSI.sub("", str(text))


def message_of(error):
    """One line of an exception's message, without Keras's config dumps,
    argument listings and ANSI escape codes."""
    message = " ".join(plain(error).split())
    markers = (
        " Full object config:",
        " config={",
        " Received: config=",
        " Arguments received by ",
    )
    for marker in markers:
        message = message.split(marker)[0]
    if len(message) > 400:
        message = message[:397] + "..."
    return message or type(error).__name__
