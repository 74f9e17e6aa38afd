"""The command line's progress display: one short block per epoch.

Keras's progress bar puts every logged value on one line; with a few taps,
each with a loss and a metric, and their `val_` twins, that line runs to
several hundred columns. `EpochProgress` prints, after each epoch, the
epoch's training values and then its validation values, each wrapped to
the terminal's width (at most 120 columns); on a terminal, a single line
counts the batches while the epoch runs. Only the model's loss terms and
metrics are shown: in-step statistics (`kt.callbacks.TapStatistics`) go to
History, TensorBoard and the plots.
"""

import shutil
import sys
import time

import keras

MAX_COLUMNS = 120


def _columns(stream):
    width = shutil.get_terminal_size((MAX_COLUMNS, 24)).columns
    return max(40, min(MAX_COLUMNS, width))


def wrap(head, items, width, indent=2):
    """`head` then `items`, separated by two spaces, in lines of at most
    `width` columns; continuation lines are indented."""
    lines, line = [], head
    for item in items:
        if len(line) + 2 + len(item) <= width or line.strip() == "":
            line = f"{line}  {item}" if line.strip() else line + item
        else:
            lines.append(line)
            line = " " * indent + item
    lines.append(line)
    return lines


def _value(value):
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


class EpochProgress(keras.callbacks.Callback):
    """Prints each epoch's loss terms and metrics in lines of at most 120
    columns.

    Args:
        stream: where to write (default: `sys.stdout`).
        width: the line width (default: the terminal's, at most 120).
    """

    def __init__(self, stream=None, width=None):
        super().__init__()
        self.stream = stream
        self.width = width

    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def _shown(self, logs):
        # The training batches log the loss terms and metrics; statistics
        # are added to the epoch's logs only, and are left out.
        seen = self._batch_keys or [k for k in logs if k[:4] != "val_"]
        first = [k for k in ("loss", "predictions_loss") if k in seen]
        ordered = first + [k for k in seen if k not in first]
        return [k for k in ordered if k in logs]

    def on_train_begin(self, logs=None):
        self._epochs = self.params.get("epochs")
        self._steps = self.params.get("steps")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batch_keys = []
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._batch_keys = list(logs or {})
        out = self._out()
        if not getattr(out, "isatty", lambda: False)():
            return
        width = self.width or _columns(out)
        steps = f"/{self._steps}" if self._steps else ""
        loss = (logs or {}).get("loss")
        text = f"epoch {self._epoch + 1}/{self._epochs}  {batch + 1}{steps}"
        if loss is not None:
            text += f"  loss {_value(loss)}"
        out.write("\r" + text[: width - 1])
        out.flush()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        out = self._out()
        width = self.width or _columns(out)
        seconds = time.perf_counter() - self._start
        names = self._shown(logs)
        head = f"epoch {epoch + 1}/{self._epochs}  {seconds:.1f}s"
        lines = wrap(head, [f"{n} {_value(logs[n])}" for n in names], width)
        val = [n for n in names if f"val_{n}" in logs]
        if val:
            items = [f"{n} {_value(logs['val_' + n])}" for n in val]
            lines += wrap("  val:", items, width, indent=7)
        if getattr(out, "isatty", lambda: False)():
            out.write("\r" + " " * (width - 1) + "\r")
        out.write("\n".join(lines) + "\n")
        out.flush()
