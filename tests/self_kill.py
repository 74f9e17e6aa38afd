"""Runs the `keras-tap` command line and signals its own process at a set
training step, so that a test kills a run in the middle of an epoch
whatever the machine's speed (a kill timed from outside lands anywhere on a
loaded machine, or after the run has ended).

    python tests/self_kill.py EPOCH BATCH SIGNAL [keras-tap arguments...]

sends SIGNAL (a name such as SIGKILL) before batch BATCH of epoch EPOCH
(both counted from 0, epochs as `fit` numbers them, so across a resume).
Everything else is `python -m keras_tap.runs.cli`: the callback is added to
the ones the command passes to `keras_tap.runs.train.train`.
"""

import os
import signal
import sys


def main(argv):
    epoch, batch, name, *args = argv
    epoch, batch, number = int(epoch), int(batch), getattr(signal, name)

    from keras_tap.runs import cli
    from keras_tap.runs import train as training

    train = training.train

    def train_then_signal(*positional, callbacks=None, **keywords):
        import keras  # imported by the command line by now

        class SignalAt(keras.callbacks.Callback):
            current = None

            def on_epoch_begin(self, index, logs=None):
                self.current = index

            def on_train_batch_begin(self, index, logs=None):
                if (self.current, index) == (epoch, batch):
                    os.kill(os.getpid(), number)

        callbacks = [*(callbacks or []), SignalAt()]
        return train(*positional, callbacks=callbacks, **keywords)

    training.train = train_then_signal
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
