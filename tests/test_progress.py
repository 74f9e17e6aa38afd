"""The command line's per-epoch progress lines."""

import io

from keras_tap.runs.progress import wrap


def test_wrap_keeps_every_item_within_the_width():
    items = [f"metric_number_{i} 0.{i:04d}" for i in range(12)]
    lines = wrap("epoch 1/20  0.3s", items, 60)
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("epoch 1/20  0.3s  metric_number_0 ")
    assert all(line.startswith("  ") for line in lines[1:])
    joined = " ".join(lines)
    assert all(item in joined for item in items)


def test_wrap_puts_a_long_item_on_its_own_line():
    lines = wrap("head", ["x" * 80, "y 1.0"], 40)
    assert lines == ["head", "  " + "x" * 80, "  y 1.0"]


def test_epoch_progress_writes_wrapped_blocks():
    import keras
    import numpy as np

    from keras_tap.runs.progress import EpochProgress

    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="a_rather_long_output_name")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse", metrics=["mae", "mse"])
    stream = io.StringIO()
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, epochs=2, batch_size=4, validation_data=(x, y),
              verbose=0, callbacks=[EpochProgress(stream, width=40)])
    lines = stream.getvalue().splitlines()
    assert all(len(line) <= 40 for line in lines), lines
    assert lines[0].startswith("epoch 1/2 ")
    text = "\n".join(lines)
    assert text.count("val:") == 2
    assert " loss " in lines[0] or lines[0].endswith("s")
    for key in ("loss", "mae", "mse"):
        assert f"{key} " in text
