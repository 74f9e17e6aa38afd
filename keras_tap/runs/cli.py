"""The `keras-tap` command: train, validate, layers, extract and plot.

```
keras-tap train CONFIG [--set KEY.PATH=VALUE ...] [--resume | --overwrite]
keras-tap validate CONFIG [--set KEY.PATH=VALUE ...]
keras-tap layers MODEL_OR_CONFIG
keras-tap extract MODEL_OR_CONFIG --taps TAP[,TAP...] --out FEATS.npz
                  [--data DATA | --split all|train|validation]
                  [--reduce mean|max]
keras-tap plot RUN_DIR [--out DIR]
keras-tap plot --features MODEL_OR_CONFIG --taps TAP[,TAP...] --out DIR
               [--data DATA | --split all|train|validation] [--sample N]
keras-tap --help | --version
```

Every command takes `--backend tensorflow|jax|torch` and `--verbose`.

This module is the front door: it parses the command line without
importing Keras or a backend, so that `--help`, `--version`, a bare
`keras-tap` and argument errors answer at once. A command then picks the
backend (`--backend`, else the config's `backend:` key, else
`KERAS_BACKEND` or Keras's default) and sets `KERAS_BACKEND` from it,
imports Keras, with the backend's start-up lines on stderr hidden unless
`--verbose` is given, and runs from `keras_tap.runs.commands`.

Bad input prints one line, `keras-tap: error: <key path>: <message>`, to
stderr and exits with status 2.
"""

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile

from keras_tap.runs import backends
from keras_tap.runs.keypaths import ConfigError
from keras_tap.version import __version__

_DESCRIPTION = """\
Train, inspect and probe tapped Keras models from config files.

A config (YAML or JSON, see docs/config.md) names a model, its taps (the
intermediate layers to train on or look at), the data and the training.
"""

_EXAMPLES = """\
examples:
  keras-tap validate examples/configs/digits.yaml
  keras-tap train examples/configs/digits.yaml
  keras-tap layers examples/configs/digits.yaml
  keras-tap extract runs/digits --taps conv2 --reduce mean --out feats.npz
  keras-tap plot runs/digits

Run `keras-tap COMMAND --help` for the options of a command.
"""

_MODEL_OR_CONFIG = (
    "a .keras file, a run directory (its model.keras) or a config (the "
    "trained model of its run directory, else the model it builds)"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and examples."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message):
    print(f"keras-tap: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None):
    """Runs the `keras-tap` command line.

    Args:
        argv: the arguments, without the program name; defaults to
            `sys.argv[1:]`.

    Returns:
        0 when the command succeeded. Bad input exits with status 2 after
        printing one line to stderr; an interrupt exits with status 130.

    Example:

    ```python
    from keras_tap.runs import cli
    cli.main(["validate", "examples/configs/digits.yaml"])
    ```
    """
    parser = parser_of_commands()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        backend, where = backends.choose(args)
        # Training reads its data with tf.data on every backend.
        tf_data = args.command == "train"
        import_keras(verbose=args.verbose, tf_data=tf_data)
        backends.check_active(backend, where)
        from keras_tap.runs import commands

        getattr(commands, args.command)(args)
    except ConfigError as error:
        _fail(str(error))
    except ImportError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        print("keras-tap: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return 0


# ------------------------------------------------------------ the backend

def import_keras(verbose=False, tf_data=False):
    """Imports Keras and its backend, hiding the backend's start-up lines.

    TensorFlow writes lines such as `oneDNN custom operations are on`,
    `Could not find cuda drivers` and `failed call to cuInit` to the
    process's stderr from C++ while it is imported and while it first
    looks for devices, before its log level applies. Unless `verbose`,
    stderr (file descriptor 2) is sent to a temporary file for that time
    and `TF_CPP_MIN_LOG_LEVEL` defaults to `3`, which also hides the C++
    log lines of training (such as tf.data's `NodeDef mentions attribute
    use_unbounded_threadpool`); set it yourself to choose another level.
    Python warnings and errors still show. When the import fails, the
    hidden lines are written out before the error.

    This changes the environment of the process, so only the command line
    calls it; `import keras_tap` changes nothing. It does nothing when
    Keras is already imported.

    Args:
        verbose: import Keras as it is, with every start-up line.
        tf_data: also import TensorFlow (when installed) on another
            backend, for a command that uses `tf.data`, so that its
            start-up lines are hidden too.
    """
    if verbose or "keras" in sys.modules:
        import keras  # noqa: F401

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_hidden() as hidden:
        try:
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices()
            elif tf_data and importlib.util.find_spec("tensorflow"):
                importlib.import_module("tensorflow")
        except BaseException:
            hidden.replay = True
            raise


class _Hidden:
    replay = False


@contextlib.contextmanager
def _stderr_hidden():
    """Sends file descriptor 2 to a temporary file, and restores it."""
    sys.stderr.flush()
    saved = os.dup(2)
    hidden = _Hidden()
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        try:
            yield hidden
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if hidden.replay:
                file.seek(0)
                sys.stderr.write(file.read().decode(errors="replace"))
                sys.stderr.flush()


# ------------------------------------------------------------- the parser


def parser_of_commands():
    """The `argparse` parser of `keras-tap`; building it imports nothing
    beyond the standard library."""
    parser = _Parser(
        prog="keras-tap",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"keras-tap {__version__}",
        help="print the version and exit",
    )
    parser.set_defaults(command=None, verbose=False, backend=None)
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=_Parser
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        help="show the backend's start-up log lines on stderr (hidden by "
        "default)",
    )
    common.add_argument(
        "--backend",
        type=backends.argument,
        metavar="BACKEND",
        help="the Keras backend to run on: tensorflow, jax or torch; "
        "overrides the config's backend: key and KERAS_BACKEND (default: "
        "the config's backend:, else KERAS_BACKEND, else Keras's default)",
    )

    def command(name, help, examples):
        sub = commands.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog="examples:\n" + examples,
            formatter_class=_Formatter,
            parents=[common],
        )
        sub.set_defaults(command=name)
        return sub

    def config_argument(sub):
        sub.add_argument(
            "config",
            metavar="CONFIG",
            help="a YAML or JSON config (see docs/config.md), e.g. "
            "examples/configs/digits.yaml",
        )
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a config value, parsed as YAML; repeatable, "
            "applied in order; relative paths are relative to the "
            "current directory; e.g. --set fit.epochs=5 or --set "
            "'taps[\"a/b\"].weight=0.5'",
        )

    sub = command(
        "train",
        "train a config and write its run directory",
        "  keras-tap train examples/configs/digits.yaml\n"
        "  keras-tap train examples/configs/digits.yaml --set fit.epochs=5 "
        "--set run.dir=runs/digits-5\n"
        "  keras-tap train examples/configs/digits.yaml --resume\n",
    )
    config_argument(sub)
    group = sub.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.dir from its last checkpoint (start "
        "it when there is none)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in run.dir first (a directory that holds no "
        "keras-tap run is never deleted)",
    )

    sub = command(
        "validate",
        "check a config, its model, taps and data without training",
        "  keras-tap validate examples/configs/digits.yaml\n"
        "  keras-tap validate examples/configs/digits.yaml --set "
        "data.batch_size=64\n",
    )
    config_argument(sub)

    sub = command(
        "layers",
        "list the layer paths a model can tap",
        "  keras-tap layers examples/configs/digits.yaml\n"
        "  keras-tap layers runs/digits/base.keras\n"
        "  keras-tap layers vit.keras --depth 2\n",
    )
    sub.add_argument("model", metavar="MODEL_OR_CONFIG", help=_MODEL_OR_CONFIG)
    sub.add_argument(
        "--depth",
        type=_positive_int,
        default=None,
        metavar="N",
        help="list paths of at most N segments (1: the outer graph alone; "
        "default: every depth, inside layers too)",
    )

    sub = command(
        "extract",
        "write the activations of taps to an .npz file",
        "  keras-tap extract runs/digits --taps conv2 --reduce mean "
        "--out feats.npz\n"
        "  keras-tap extract runs/digits --split validation --taps gap "
        "--out held_out.npz\n"
        "  keras-tap extract model.keras --data x.npy --taps conv1,conv2 "
        "--out feats.npz\n",
    )
    sub.add_argument("model", metavar="MODEL_OR_CONFIG", help=_MODEL_OR_CONFIG)
    _data_options(sub)
    sub.add_argument(
        "--reduce",
        choices=("mean", "max"),
        help="pool each activation over its spatial axes (default: keep "
        "the full activation)",
    )
    sub.add_argument(
        "--out",
        required=True,
        metavar="FEATS.npz",
        help="the .npz file to write, one array per tap, e.g. feats.npz",
    )

    sub = command(
        "plot",
        "plot a run's history, or the feature maps of taps",
        "  keras-tap plot runs/digits\n"
        "  keras-tap plot --features runs/digits --taps conv2 --sample 3 "
        "--out maps/\n",
    )
    sub.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        nargs="?",
        help="a run directory: draws history.png (and statistics.png), "
        "e.g. runs/digits",
    )
    sub.add_argument(
        "--features",
        metavar="MODEL_OR_CONFIG",
        help="draw a feature-map grid of each tap on one sample instead: "
        + _MODEL_OR_CONFIG,
    )
    _data_options(sub)
    sub.add_argument(
        "--sample",
        type=int,
        default=0,
        help="the index of the sample drawn with --features (default: "
        "%(default)s)",
    )
    sub.add_argument(
        "--out",
        metavar="DIR",
        help="the output directory (default: RUN_DIR; needed with "
        "--features)",
    )
    sub = command(
        "gradcam",
        "write Grad-CAM heatmaps of images, drawn over them, as PNGs",
        "  keras-tap gradcam model.keras --tap backbone/out_relu "
        "--images cat.jpg dog.png --out cams/\n"
        "  keras-tap gradcam runs/digits --tap conv2 --images x.npy "
        "--class 3 --out cams/\n",
    )
    sub.add_argument("model", metavar="MODEL_OR_CONFIG", help=_MODEL_OR_CONFIG)
    sub.add_argument(
        "--tap",
        required=True,
        metavar="PATH",
        help="the layer path of a convolutional activation (batch, "
        "*spatial, channels), e.g. the backbone's last convolution",
    )
    sub.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="IMAGE",
        help="image files (.png, .jpg, ...; resized to the model's input), "
        "image directories, or .npy/.npz arrays of inputs",
    )
    sub.add_argument(
        "--class",
        dest="class_index",
        type=int,
        default=None,
        metavar="N",
        help="the class to explain (default: each image's top class)",
    )
    sub.add_argument(
        "--x-key",
        default="x",
        help="the array of inputs in an .npz file (default: %(default)s)",
    )
    sub.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="images per forward pass (default: %(default)s)",
    )
    sub.add_argument(
        "--out",
        default="gradcam",
        metavar="DIR",
        help="the output directory (default: %(default)s)",
    )
    return parser


def _data_options(sub):
    sub.add_argument(
        "--taps",
        action="extend",
        type=_tap_list,
        metavar="TAP[,TAP...]",
        help="tap names or layer paths, comma-separated or repeated "
        "(--taps conv1,conv2 or --taps conv1 --taps conv2); a 're:' "
        "pattern is taken whole (default: every tap of a TapModel)",
    )
    sub.add_argument(
        "--data",
        help="a dataset name (sklearn_digits, mnist, ...), an .npz or .npy "
        "file or an image directory, read whole (default: the data section "
        "of the config, or of the run directory's config, with its limit, "
        "seed and rescale: the samples training used, see --split)",
    )
    sub.add_argument(
        "--split",
        choices=("all", "train", "validation"),
        metavar="SPLIT",
        help="which of the config's samples to read without --data: all "
        "(the training and held-out samples, in source order), train, or "
        "validation (the held-out share, data.validation_split) (default: "
        "all)",
    )
    sub.add_argument(
        "--x-key",
        default=None,
        help="the array of inputs in an .npz file given with --data "
        "(default: x)",
    )
    sub.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="the batch size of the forward passes (default: %(default)s)",
    )


def _positive_int(text):
    """`--depth 2` -> `2`; anything but a positive integer is refused."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer (1: the outer graph alone), got "
            f"{text!r}"
        )
    return value


def _tap_list(text):
    """`--taps a,b` -> `["a", "b"]`; a `re:` pattern is one tap."""
    if text.startswith("re:"):
        return [text]
    taps = [tap.strip() for tap in text.split(",")]
    if not all(taps):
        raise argparse.ArgumentTypeError(
            f"expected tap names separated by commas, got {text!r}"
        )
    return taps


if __name__ == "__main__":
    sys.exit(main())
