"""`kt.train(config)`: build, train and record a run from a config.

`train` builds the config's `TapModel` (`build`, with the model sources of
`keras_tap.sources`), compiles it (`compile_model`), trains it on the
config's data and writes the run directory that `keras_tap.runs`
describes; with `resume=True` it continues a run from its last checkpoint.
"""

import dataclasses
import inspect
from contextlib import nullcontext
from pathlib import Path

import keras

from keras_tap.runs import backends, distribute
from keras_tap.runs import config as config_lib
from keras_tap.runs import data as data_lib
from keras_tap.runs import rundir as runs
from keras_tap.runs.config import ConfigError, key_path
from keras_tap.runs.rundir import (
    BASE,
    CHECKPOINTS,
    CONFIG,
    FEATURES,
    HISTORY_CSV,
    HISTORY_JSON,
    LOGS,
    MODEL,
    STATE,
    EpochScalars,
    final_metrics,
    read_state,
    write_feature_maps,
    write_plots,
)
from keras_tap.runs.sources import (
    build_model,
    deserialize_layer,
    import_builder,
)

__all__ = [
    "BASE",
    "CHECKPOINTS",
    "CONFIG",
    "FEATURES",
    "HISTORY_CSV",
    "HISTORY_JSON",
    "LOGS",
    "MODEL",
    "STATE",
    "EpochScalars",
    "Run",
    "build",
    "build_callbacks",
    "build_model",
    "check_inputs",
    "compile_model",
    "deserialize_layer",
    "final_metrics",
    "import_builder",
    "load_run",
    "read_state",
    "restore",
    "seed_everything",
    "train",
    "write_feature_maps",
    "write_plots",
]


@dataclasses.dataclass
class Run:
    """What `train` produced.

    Attributes:
        dir: the run directory.
        model: the trained `TapModel`.
        history: `{key: [value per epoch]}`, with an `epoch` key (0-based).
        files: `{what: path}` of the files written (`model`, `base`,
            `config`, `run` (`run.json`, with the backend), `history_json`,
            `history_csv`, `logs`, plots:
            `history_png`, `statistics_png`, `features_<tap>_png`).
        metrics: the last epoch's held-out values (`val_` keys, prefix
            removed), or its training values without a validation split.
        initial_epoch: the epoch this call started from (0 unless resumed).
        backend: the Keras backend it trained on (`"tensorflow"`, `"jax"`
            or `"torch"`).
    """

    dir: Path
    model: keras.Model
    history: dict
    files: dict
    metrics: dict
    initial_epoch: int = 0
    backend: str = None


def train(
    config, *, resume=False, overwrite=False, verbose=None, callbacks=None
):
    """Builds the config's `TapModel`, trains it and writes a run directory.

    The config's `distribution` section picks where it trains. Under
    `multi_worker` every worker calls `train` with the same config (each
    with its `TF_CONFIG`); the chief writes the run directory, the other
    workers a temporary folder that is removed. With a backup left by a
    worker that was killed, `train` continues after the backup's epoch
    (`resume` and `overwrite` aside).

    Args:
        config: a `Config`, a dict or a path to a YAML/JSON config.
        resume: continue the run in `config.run.dir` from its last
            checkpoint (start it when there is none).
        overwrite: delete a previous run in `config.run.dir` first.
        verbose: `fit`'s verbosity; defaults to `config.fit.verbose`.
        callbacks: further callbacks for `fit`, after the config's.

    Returns:
        A `Run`. On a worker other than the chief, `files` is empty.

    Raises:
        ConfigError: for a bad config, a non-empty run directory without
            `resume` or `overwrite`, a resume with a different config, or
            a config whose `backend` is not the one Keras runs on (Keras
            chooses its backend when first imported: set `KERAS_BACKEND`
            before importing it, or run `keras-tap train`).
    """
    backends.check_active(backends.of_config(config))
    # A multi-worker strategy must exist before any other TensorFlow op.
    distribute.prepare(config)
    cfg = config_lib.load(config)
    strategy = distribute.strategy(cfg.distribution)
    placement = distribute.Placement(cfg.run.dir, cfg.distribution)
    try:
        return _train(
            cfg, placement, strategy, resume, overwrite, verbose, callbacks
        )
    finally:
        placement.close()


def _train(
    cfg, placement, strategy, resume, overwrite, verbose, extra_callbacks
):
    target, run_dir = Path(cfg.run.dir), placement.run_dir
    backup_epoch = placement.backup_epoch()
    continuing = backup_epoch > 0
    if placement.is_chief:
        state, replace = runs.check_run_dir(
            target,
            cfg,
            resume=resume or continuing,
            overwrite=overwrite and not continuing,
        )
    else:
        state, replace = (runs.read_state(target) if resume else None), False
    seed_everything(cfg.run)
    train_data, val_data = data_lib.load(cfg.data, cfg.run.seed)
    scope = strategy.scope() if strategy is not None else nullcontext()
    with scope:
        tap_model = build(cfg)
        check_inputs(tap_model, train_data)
        compile_model(tap_model, cfg)
    history, initial_epoch = {}, 0
    if continuing:
        # `BackupAndRestore` restores the weights and optimizer state of
        # the backup's epoch; the history is the run directory's, up to it.
        history = _history_before(state, backup_epoch)
        initial_epoch = backup_epoch
    elif state is not None:
        # The config rebuilds the model; the checkpoint restores its weights
        # and the optimizer's state (iterations, moments).
        with scope:
            restore(tap_model, target / CHECKPOINTS / state["checkpoint"])
        history, initial_epoch = state["history"], state["epoch"] + 1
    runs.start_run_dir(run_dir, state, replace)
    run_info = runs.write_run_info(run_dir, initial_epoch)
    if state is None or not placement.is_chief:
        runs.write_text(run_dir / CONFIG, runs.MARKER + cfg.to_yaml())
    epochs = cfg.fit.epochs
    steps = data_lib.steps_per_epoch(
        train_data, cfg.data.batch_size, cfg.fit.steps_per_epoch
    )
    recorder = runs.Recorder(run_dir, history, cfg.run.keep_checkpoints)
    # The backup comes last: it marks an epoch done once it is recorded.
    callbacks = build_callbacks(cfg, run_dir=run_dir)
    callbacks += list(extra_callbacks or []) + [recorder]
    callbacks += placement.callbacks()
    if initial_epoch < epochs:
        dataset = data_lib.training_dataset(
            train_data,
            batch_size=cfg.data.batch_size,
            seed=cfg.data.seed if cfg.data.seed is not None else cfg.run.seed,
            shuffle=cfg.data.shuffle,
            initial_epoch=initial_epoch,
            epochs=epochs,
            steps=steps,
        )
        validation = None
        if val_data is not None:
            validation = (val_data.x, val_data.fit_targets())
            if strategy is not None:
                validation = distribute.batched(
                    validation, cfg.data.batch_size
                )
        if strategy is not None:
            dataset = distribute.shard_by_data(dataset)
        tap_model.fit(
            dataset,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            validation_data=validation,
            validation_batch_size=(
                None if strategy is not None else cfg.data.batch_size
            ),
            callbacks=callbacks,
            shuffle=False,
            verbose=cfg.fit.verbose if verbose is None else verbose,
        )
    files = {"config": run_dir / CONFIG, "run": run_info}
    files["model"] = runs.save(tap_model, run_dir / MODEL)
    files["base"] = runs.save(tap_model.base, run_dir / BASE)
    files.update(runs.write_history(run_dir, recorder.history))
    if cfg.run.tensorboard:
        files["logs"] = run_dir / LOGS
    if cfg.run.plots:
        files.update(write_plots(run_dir))
        held_out = val_data is not None
        files.update(
            write_feature_maps(
                tap_model,
                (val_data if held_out else train_data).x,
                run_dir / FEATURES,
                sample=f"first {'held-out' if held_out else 'training'} sample",
            )
        )
    return Run(
        dir=target,
        model=tap_model,
        history=recorder.history,
        files=files if placement.is_chief else {},
        metrics=final_metrics(recorder.history, tap_model.tap_names),
        initial_epoch=initial_epoch,
        backend=keras.backend.backend(),
    )


def _history_before(state, epoch):
    """The history of a checkpoint `state`, up to (without) `epoch`."""
    history = (state or {}).get("history") or {}
    epochs = history.get("epoch", [])
    keep = sum(1 for e in epochs if e is not None and e < epoch)
    return {key: list(values[:keep]) for key, values in history.items()}


def build(config):
    """The config's `TapModel`, uncompiled (with freshly built weights).

    Raises:
        ConfigError: for a model that cannot be built or a tap whose layer
            path matches nothing, named by key path.
    """
    import keras_tap as kt

    cfg = config_lib.load(config)
    model = build_model(cfg.model, "model")
    teacher = (
        None if cfg.teacher is None else build_model(cfg.teacher, "teacher")
    )
    taps = {}
    for name, tap in cfg.taps.items():
        where = key_path("taps", name)
        kwargs = tap.to_dict()
        for key, module in (("loss", keras.losses), ("regularizer", None)):
            if isinstance(kwargs[key], dict):
                module = module or keras.regularizers
                kwargs[key] = config_lib.with_module(kwargs[key], module)
        if kwargs["adapter"] is not None:
            kwargs["adapter"] = deserialize_layer(
                kwargs["adapter"], f"{where}.adapter"
            )
        if cfg.distribution.cross_replica_moments and kwargs["regularizer"]:
            kwargs["regularizer"] = cross_replica(kwargs["regularizer"])
        taps[name] = kt.Tap(**kwargs)
    try:
        return kt.TapModel(model, taps, teacher=teacher)
    except (ValueError, TypeError, KeyError) as error:
        message = config_lib.message_of(error)
        found = [
            (message.find(repr(path)), key_path("taps", name, field))
            for name, tap in cfg.taps.items()
            for field, path in (("layer", tap.layer), ("teacher", tap.teacher))
            if path is not None and repr(path) in message
        ]
        where = min(found)[1] if found else "taps"
        raise ConfigError(where, message) from None


def cross_replica(regularizer):
    """`regularizer` (an identifier, dict or object) computing its batch
    moments over all replicas, when it has such moments (a
    `cross_replica` argument); otherwise as it is."""
    from keras_tap.training import regularizers

    regularizer = regularizers.get(regularizer)
    parameters = inspect.signature(type(regularizer).__init__).parameters
    if "cross_replica" not in parameters:
        return regularizer
    config = {**regularizer.get_config(), "cross_replica": True}
    return type(regularizer).from_config(config)


def compile_model(tap_model, config):
    """Compiles `tap_model` with the config's `compile` section."""
    cfg = config_lib.load(config).compile
    loss = cfg.loss
    if isinstance(loss, dict):
        loss = config_lib.resolve("loss", loss, "compile.loss")
    metrics = [
        config_lib.with_module(m, keras.metrics) if isinstance(m, dict) else m
        for m in cfg.metrics
    ]
    optimizer = config_lib.resolve(
        "optimizer", cfg.optimizer, "compile.optimizer"
    )
    tap_model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=metrics or None,
        jit_compile=cfg.jit_compile,
    )
    return tap_model


def build_callbacks(config, run_dir=None):
    """The config's callbacks, then TensorBoard (when `run.tensorboard`),
    logging into `run_dir` (default: the config's `run.dir`)."""
    cfg = config_lib.load(config)
    callbacks = [
        config_lib.resolve_callback(spec, f"callbacks[{i}]")
        for i, spec in enumerate(cfg.callbacks)
    ]
    if cfg.run.tensorboard:
        run_dir = Path(run_dir or cfg.run.dir)
        callbacks.append(EpochScalars(run_dir / LOGS))
    return callbacks


def check_inputs(tap_model, arrays):
    """Raises `ConfigError` when the data's inputs do not fit the model."""
    inputs = tap_model.base.inputs
    if not inputs or len(inputs) != 1:
        return
    expected = tuple(inputs[0].shape[1:])
    got = tuple(arrays.x.shape[1:])
    if len(expected) != len(got) or any(
        e is not None and e != g for e, g in zip(expected, got)
    ):
        shape = tuple(None if e is None else e for e in expected)
        message = f"the inputs have shape {got}, but the model expects {shape}"
        raise ConfigError("data", message)


def seed_everything(run_config):
    """Seeds Python, NumPy and the backend; with `deterministic`, makes TF
    ops deterministic (process-wide)."""
    keras.utils.set_random_seed(run_config.seed)
    if run_config.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def restore(tap_model, path):
    """Loads the weights and optimizer state of a `.keras` file this config
    wrote (a checkpoint or `model.keras`) into `tap_model`, built and
    compiled from the same config."""
    if not tap_model.built:
        tap_model.build(tap_model.base.input_shape)
    tap_model.optimizer.build(tap_model.trainable_variables)
    tap_model.load_weights(path)
    return tap_model


def load_run(run_dir, checkpoint=None):
    """The compiled `TapModel` of a run directory, with the weights and
    optimizer state of its `model.keras` (or of `checkpoint`)."""
    run_dir = Path(run_dir)
    cfg = config_lib.load(run_dir / CONFIG)
    tap_model = compile_model(build(cfg), cfg)
    return restore(tap_model, checkpoint or run_dir / MODEL)
