"""Benchmark `TapModel.fit` on each Keras backend, side by side.

An alias of `python benchmarks/train.py --all-backends`: each backend
(TensorFlow, JAX, PyTorch) runs `train.py` in its own subprocess, with
`KERAS_BACKEND` set, and one markdown table gives the step times and
ratios of every backend side by side: `TapModel.fit` against a
hand-written step of the same math on that backend, a plain multi-output
Keras model trained by Keras's own trainer, and
`keras.distillation.Distiller` (see `train.py`). Users pick a backend from
it; there is no target across backends.

Usage:

    python benchmarks/backends.py [--steps 12] [--rounds 7]
        [--backends tensorflow,jax,torch]
    python benchmarks/backends.py --backend jax   # one backend
"""

import os
import runpy
import sys

if __name__ == "__main__":
    argv = sys.argv[1:]
    selects = ("--backend", "--backends", "--all-backends")
    if not any(arg.split("=")[0] in selects for arg in argv):
        argv.append("--all-backends")
    train = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    sys.argv = [train] + argv
    runpy.run_path(train, run_name="__main__")
