"""Train a small TapModel on the backend of `KERAS_BACKEND` (a subprocess of
`test_backends.py`).

Usage: `python tests/backend_worker.py FOLDER MODE...`, each `MODE` one of
`train` (build from `FOLDER/student.weights.h5` and
`FOLDER/teacher.weights.h5`, train three SGD steps, write
`FOLDER/<backend>.npz` and save `FOLDER/<backend>.keras`) and
`resume:<backend>` (load `FOLDER/<backend>.keras`, train one more step,
write `FOLDER/<backend>_to_<this backend>.npz`) and `data_parallel` (JAX:
`train` under `keras.distribution.DataParallel` over every device, written
to `FOLDER/data_parallel.npz`).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tap as kt  # noqa: E402

LEARNING_RATE = 0.1
REG = 0.01
FEAT_WEIGHT = 0.5
TEACHER_WEIGHT = 2.0


def student():
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    feat = keras.layers.Dense(3, name="feat")(hidden)
    mid = keras.layers.Dense(5, activation="tanh", name="mid")(feat)
    outputs = keras.layers.Dense(2, name="out")(mid)
    return keras.Model(inputs, outputs, name="student")


def teacher():
    inputs = keras.Input((4,), name="tx")
    mid = keras.layers.Dense(5, activation="tanh", name="t_mid")(inputs)
    outputs = keras.layers.Dense(2, name="t_out")(mid)
    return keras.Model(inputs, outputs, name="teacher")


def tap_model(base, teacher_model):
    taps = {
        "hidden": kt.Tap("hidden", regularizer=keras.regularizers.L1(REG)),
        "feat": kt.Tap("feat", loss="mse", weight=FEAT_WEIGHT),
        "mid": kt.Tap(
            "mid", loss="mse", teacher="t_mid", weight=TEACHER_WEIGHT
        ),
    }
    return kt.TapModel(base, taps, teacher=teacher_model)


def data(folder):
    arrays = np.load(os.path.join(folder, "data.npz"))
    return arrays["x"], {"predictions": arrays["y"], "feat": arrays["t"]}


def weights(model):
    return {w.path: np.asarray(keras.ops.convert_to_numpy(w))
            for w in model.weights}


def main(folder, mode):
    backend = keras.backend.backend()
    x, y = data(folder)
    if mode == "data_parallel":
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=keras.distribution.list_devices()
        ))
        backend = "data_parallel"
    if mode in ("train", "data_parallel"):
        base, teach = student(), teacher()
        base.load_weights(os.path.join(folder, "student.weights.h5"))
        teach.load_weights(os.path.join(folder, "teacher.weights.h5"))
        model = tap_model(base, teach)
        model.compile(
            optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse"
        )
        model.fit(x, y, batch_size=len(x), epochs=3, shuffle=False,
                  verbose=0)
        np.savez(os.path.join(folder, f"{backend}.npz"),
                 **weights(model.base))
        if mode == "train":
            model.save(os.path.join(folder, f"{backend}.keras"))
    else:
        source = mode.split(":", 1)[1]
        model = keras.saving.load_model(
            os.path.join(folder, f"{source}.keras")
        )
        model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False,
                  verbose=0)
        np.savez(os.path.join(folder, f"{source}_to_{backend}.npz"),
                 **weights(model.base))


if __name__ == "__main__":
    for argument in sys.argv[2:]:
        main(sys.argv[1], argument)
