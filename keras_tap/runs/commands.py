"""The commands of `keras-tap`, each a function of the parsed arguments.

`keras_tap.runs.cli` parses the command line and imports Keras first; this
module runs the command and prints what it did. Like the front door, it is
part of the command line, the only place in keras_tap that prints.
"""

import sys
from pathlib import Path

from keras_tap.runs import config as config_lib
from keras_tap.runs.config import ConfigError
from keras_tap.runs.keypaths import CONFIG_SUFFIXES

# ------------------------------------------------------------------ commands


def train(args):
    """`keras-tap train`: trains a config and prints where its files went."""
    from keras_tap.runs import distribute
    from keras_tap.runs import train as training

    # A multi-worker strategy must exist before any other TensorFlow op.
    distribute.prepare(args.config, args.overrides)
    cfg = config_lib.load(args.config, args.overrides)
    extra, verbose = [], None
    if cfg.fit.verbose in ("auto", 1):
        # Keras's progress bar puts every value on one line: show each
        # epoch in lines of at most 120 columns instead.
        from keras_tap.runs.progress import EpochProgress

        extra, verbose = [EpochProgress()], 0
    run = training.train(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        verbose=verbose,
        callbacks=extra,
    )
    if not run.files:
        task = distribute.read_task()
        print(
            f"{task.name} of {task.workers}: trained; the chief writes the "
            f"run directory {_rel(run.dir)}"
        )
        return
    files = {key: _rel(path) for key, path in run.files.items()}
    if run.initial_epoch:
        print(f"resumed after epoch {run.initial_epoch}")
    print(f"run directory: {_rel(run.dir)}")
    print(
        f"  config:  {files['config']}, {files['run']} (backend "
        f"{run.backend})"
    )
    print(f"  model:   {files['model']} (TapModel), {files['base']} (base)")
    print(f"  history: {files['history_csv']}, {files['history_json']}")
    if "logs" in files:
        print(f"  logs:    tensorboard --logdir {files['logs']}")
    features = [p for k, p in files.items() if k.startswith("features_")]
    plots = [
        path
        for key, path in files.items()
        if key.endswith("_png") and not key.startswith("features_")
    ]
    if plots:
        print(f"  plots:   {', '.join(plots)}")
        if features:
            print(f"  features: {', '.join(features)}")
    elif cfg.run.plots:
        print('  plots:   none (pip install "keras-tap[plot]")')
    epochs = len(run.history.get("epoch", []))
    held_out = any(key.startswith("val_") for key in run.history)
    kind = "held-out" if held_out else "training"
    values = [f"{k} {v:.4f}" for k, v in run.metrics.items() if v is not None]
    from keras_tap.runs.progress import MAX_COLUMNS, wrap

    head = f"{kind} metrics after {epochs} epochs:"
    print("\n".join(wrap(head, values, MAX_COLUMNS)))


def validate(args):
    """`keras-tap validate`: builds the model, its taps and data, and runs
    one batch, without training or writing anything."""
    import numpy as np

    from keras_tap.runs import data
    from keras_tap.runs import train as training

    cfg = config_lib.load(args.config, args.overrides)
    tap_model = training.build(cfg)
    train, validation = data.load(cfg.data, cfg.run.seed)
    training.check_inputs(tap_model, train)
    training.compile_model(tap_model, cfg)
    batch = train.take(np.arange(min(len(train), cfg.data.batch_size)))
    try:
        tap_model.evaluate(batch.x, batch.fit_targets(), verbose=0)
    except Exception as error:
        message = (
            f"the model fails on a first batch: {config_lib.message_of(error)}"
        )
        raise ConfigError("data", message) from None
    base = tap_model.base
    print(f"{args.config}: OK")
    print(f"  model: {base.name} ({base.count_params():,} parameters)")
    for name, shape in tap_model.tap_shapes().items():
        layer = cfg.taps[name].layer if name in cfg.taps else name
        print(f"  tap {name}: {layer} -> {shape}")
    held_out = 0 if validation is None else len(validation)
    print(
        f"  data: {len(train)} training and {held_out} held-out samples of "
        f"shape {train.x.shape[1:]}"
    )
    print(f"  run directory: {_rel(cfg.run.dir)}")


def _shape_text(shape):
    """`(None, 3)` -> `"(None, 3)"`; a structure shows each element; a
    point the model never called shows `-`."""
    if shape is None:
        return "-"
    if isinstance(shape, dict):
        inner = ", ".join(f"{k}: {_shape_text(v)}" for k, v in shape.items())
        return "{" + inner + "}"
    if all(d is None or isinstance(d, int) for d in shape):
        text = ", ".join(str(d) for d in shape)
        return f"({text},)" if len(shape) == 1 else f"({text})"
    return "[" + ", ".join(_shape_text(s) for s in shape) + "]"


def layers(args):
    """`keras-tap layers`: prints the `kt.list_layers` table of a model."""
    import keras_tap as kt

    model = _load_model(args.model, base_only=True)
    rows = [("path", "class", "output shape", "params", "calls")]
    for record in kt.list_layers(model, depth=getattr(args, "depth", None)):
        rows.append(
            (
                record.path,
                record.class_name,
                _shape_text(record.output_shape),
                f"{record.params:,}",
                record.calls,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    for row in rows:
        cells = [str(cell) for cell in row]
        line = "  ".join(
            cell.rjust(w) if i >= 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        )
        print(line.rstrip())


def extract(args):
    """`keras-tap extract`: writes the activations of taps to an `.npz`."""
    import numpy as np

    tap_model, x = _model_and_inputs(args)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError("--out", f"expected a .npz path, got {args.out!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = tap_model.extract(
            x,
            taps=args.taps,
            batch_size=args.batch_size,
            reduce=args.reduce,
            to=str(out),
            verbose=0,
        )
    except (ValueError, KeyError) as error:
        raise ConfigError("--taps", config_lib.message_of(error)) from None
    with np.load(path) as arrays:
        shapes = {key: arrays[key].shape for key in arrays.files}
    print(f"wrote {_rel(path)}:")
    for key, shape in shapes.items():
        print(f"  {key}: {shape}")


def plot(args):
    """`keras-tap plot`: draws a run's history, or feature maps of taps."""
    from keras_tap.inspect import plot
    from keras_tap.runs import rundir as runs

    if args.features is None:
        if args.run_dir is None:
            raise ConfigError(
                "RUN_DIR", "give a run directory, or --features MODEL"
            )
        run_dir = Path(args.run_dir)
        if not (run_dir / runs.HISTORY_JSON).is_file():
            message = f"no {runs.HISTORY_JSON} in {args.run_dir!r}: not a run"
            raise ConfigError("RUN_DIR", message)
        files = runs.write_plots(run_dir, args.out, optional=False)
        for path in files.values():
            print(f"wrote {_rel(path)}")
        return
    if args.run_dir is not None:
        raise ConfigError(
            "RUN_DIR", "give either a run directory or --features"
        )
    if args.out is None:
        raise ConfigError("--out", "--features needs --out DIR")
    args.model = args.features
    tap_model, x = _model_and_inputs(args)
    if not 0 <= args.sample < len(x):
        message = f"expected a sample index in [0, {len(x)}), got {args.sample}"
        raise ConfigError("--sample", message)
    try:
        features = tap_model.extract(
            x[args.sample : args.sample + 1], taps=args.taps, verbose=0
        )
    except (ValueError, KeyError) as error:
        raise ConfigError("--taps", config_lib.message_of(error)) from None
    out = Path(args.out)
    for name, activation in features.items():
        path = out / f"{runs.file_name(name)}.png"
        path = plot.feature_maps(activation[0], path, title=name)
        print(f"wrote {_rel(path)}")


def gradcam(args):
    """`keras-tap gradcam`: writes Grad-CAM overlays of images as PNGs."""
    import numpy as np

    import keras_tap as kt

    model = _load_model(args.model, base_only=True)
    images, names = _gradcam_images(args, model)
    try:
        tap_model = kt.TapModel(model, {"gradcam": args.tap})
    except (ValueError, TypeError) as error:
        raise ConfigError("--tap", config_lib.message_of(error)) from None
    maps = []
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        try:
            maps.append(kt.attribution.grad_cam(
                tap_model, chunk, "gradcam", class_index=args.class_index
            ))
        except ValueError as error:
            message = config_lib.message_of(error)
            raise ConfigError("--tap", message) from None
    maps = np.concatenate(maps, axis=0)
    shown = images if images.max() > 1.0 else images * 255.0
    out = Path(args.out)
    for name, image, heatmap in zip(names, shown, maps):
        path = kt.plot.overlay(
            np.clip(image, 0, 255), heatmap, out / f"{name}_gradcam.png"
        )
        print(f"wrote {_rel(path)}")


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _gradcam_images(args, model):
    """`(images, names)`: image files resized to the model's input, and
    the inputs in image directories and .npy/.npz files."""
    import keras
    import numpy as np

    from keras_tap.runs import data

    shape = tuple(getattr(model, "input_shape", None) or ())
    if len(shape) != 4:
        raise ConfigError(
            "MODEL_OR_CONFIG",
            f"gradcam needs a model of images (batch, H, W, C); its input "
            f"shape is {shape or 'unknown'}",
        )
    size = shape[1:3] if None not in shape[1:3] else None
    mode = {1: "grayscale", 4: "rgba"}.get(shape[3], "rgb")
    arrays, names = [], []
    for spec in args.images:
        path = Path(spec)
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            if not path.is_file():
                raise ConfigError("--images", f"no such file: {spec!r}")
            image = keras.utils.load_img(
                path, target_size=size, color_mode=mode
            )
            arrays.append(keras.utils.img_to_array(image)[None])
            names.append(path.stem)
        else:
            x = data.inputs(
                spec, x_key=args.x_key, image_size=list(size) if size else None
            )
            arrays.append(np.asarray(x, "float32"))
            names.extend(f"{path.stem}_{i}" for i in range(len(x)))
        given = arrays[-1].shape[1:]
        fits = len(given) == 3 and all(
            want is None or want == got for want, got in zip(shape[1:], given)
        )
        if not fits:
            raise ConfigError(
                "--images",
                f"{spec!r} holds images of shape {_shape_text(given)}, but "
                f"the model expects images of shape {_shape_text(shape[1:])}",
            )
    try:
        images = np.concatenate(arrays, axis=0).astype("float32")
    except ValueError as error:
        raise ConfigError(
            "--images", f"the images differ in shape: {error}"
        ) from None
    return images, names


# ------------------------------------------------------------------ helpers


def _load_model(spec, *, base_only=False):
    """A model from a `.keras` file, a run directory or a config.

    With a config, the trained model of its run directory is used when it
    exists; otherwise the model is built from the config (fresh weights).
    Returns the model and, for a config, the `Config`.
    """
    import keras

    from keras_tap.runs import rundir as runs
    from keras_tap.runs import sources
    from keras_tap.runs import train as training

    path = Path(spec)
    if path.is_dir() and (path / runs.MODEL).is_file():
        path = path / runs.MODEL
    if path.suffix in CONFIG_SUFFIXES:
        cfg = config_lib.load(path)
        trained = Path(cfg.run.dir) / runs.MODEL
        if trained.is_file():
            path = trained
        elif base_only:
            return sources.build_model(cfg.model, "model")
        else:
            print(
                f"keras-tap: note: no trained model at {_rel(trained)}; "
                "using the config's model with freshly built weights",
                file=sys.stderr,
            )
            return training.build(cfg)
    if path.suffix != ".keras":
        message = "expected a .keras file, a run directory or a config"
        raise ConfigError("MODEL_OR_CONFIG", f"{message}, got {spec!r}")
    if not path.is_file():
        raise ConfigError("MODEL_OR_CONFIG", f"no such file: {str(path)!r}")
    import keras_tap

    # `keras_tap` was imported before Keras here (by the command line), so
    # its serializable classes (`TapModel`, losses, ...) are registered
    # only once their modules load: load them all before reading the file.
    keras_tap._load_all()
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        message = f"cannot load {str(path)!r}: {config_lib.message_of(error)}"
        raise ConfigError("MODEL_OR_CONFIG", message) from None
    return getattr(model, "base", model) if base_only else model


def _model_and_inputs(args):
    """The `TapModel` to extract from and the input array.

    `--data` is read whole. Without it, a config (or a run directory's
    config) gives the samples its `data` section describes, as training
    read them (`limit`, the seed of the split and `rescale` applied), in
    source order: with `--split all` (the default) the training and
    held-out samples together, with `train` or `validation` one split.
    """
    import keras_tap as kt
    from keras_tap.runs import data
    from keras_tap.runs import rundir as runs

    split = getattr(args, "split", None)
    if args.data is not None and split is not None:
        raise ConfigError(
            "--split", "selects the config's samples; --data is read whole"
        )
    x_key = getattr(args, "x_key", None)
    if args.data is None and x_key is not None:
        raise ConfigError(
            "--x-key", "names the array of an .npz file given with --data"
        )
    model = _load_model(args.model)
    source = Path(args.model)
    if source.is_dir() and (source / runs.CONFIG).is_file():
        source = source / runs.CONFIG  # A run directory: its data.
    if args.data is not None:
        x = data.inputs(args.data, x_key=x_key or "x")
    elif source.suffix in CONFIG_SUFFIXES:
        cfg = config_lib.load(source)
        x = data.samples(cfg.data, cfg.run.seed, split or "all").x
    else:
        raise ConfigError("--data", "a model file needs --data")
    if not isinstance(model, kt.TapModel):
        if not args.taps:
            raise ConfigError("--taps", "name the layers to extract")
        try:
            model = kt.TapModel(model, list(args.taps))
        except (ValueError, TypeError) as error:
            raise ConfigError("--taps", config_lib.message_of(error)) from None
    return model, x


def _rel(path):
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
