"""Linear probes on every block of a transformer, and its attention.

What does each block of a vision transformer know? A linear probe answers:
fit a linear classifier on one block's tokens and measure its held-out
accuracy. This script taps, in ONE forward pass per batch, every encoder
block of a small keras-hub `ViTBackbone` and the attention probabilities of
every block (`".../mha/softmax"`: Keras fuses attention and never computes
them; keras_tap makes the tapped layers compute them explicitly), then:

- fits a ridge-regression probe per block (closed form, NumPy) and reports
  its held-out accuracy;
- plots the accuracies and, for one image, the attention of the class
  token over the patches, per block.

The task is synthetic (no download): 32x32 images of noise with one bright
8x8 patch in one of the 16 patch positions; the label is the quadrant that
holds it. Run it:

    python examples/probe_transformer.py --out runs/probe
"""

import argparse
import os

import keras
import numpy as np
from keras import ops

import keras_tap as kt

BLOCKS = r"re:vit_encoder/transformer_block_\d+"
ATTENTION = r"re:vit_encoder/transformer_block_\d+/mha/softmax(_\d+)?"


def backbone(num_layers=4, seed=0):
    """A small keras-hub ViT, built from its config (no weights to fetch)."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=num_layers,
        num_heads=2, hidden_dim=32, mlp_dim=64,
    )


def quadrant_images(samples, seed=0):
    """Noise images with one bright 8x8 patch; label: its quadrant."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.5, size=(samples, 32, 32, 3)).astype("float32")
    cells = rng.integers(0, 16, size=samples)
    rows, cols = cells // 4, cells % 4
    for i, (r, c) in enumerate(zip(rows, cols)):
        x[i, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 2.0
    labels = (rows // 2) * 2 + cols // 2
    return x, labels


def summarize(value):
    """Applied to every tapped batch inside the graph: a block's tokens
    stay as they are (flattened); attention keeps the class token's row,
    averaged over heads (`(batch, patches)`)."""
    if len(value.shape) == 4:  # (batch, heads, query, key)
        return ops.mean(value[:, :, 0, 1:], axis=1)
    return ops.reshape(value, (-1, value.shape[1] * value.shape[2]))


def ridge_probe(train_x, train_y, test_x, test_y, classes, alpha=1.0):
    """Held-out accuracy of a closed-form ridge classifier (one-hot)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    b = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
    targets = np.eye(classes)[train_y]
    weights = np.linalg.solve(
        a.T @ a + alpha * np.eye(a.shape[1]), a.T @ targets
    )
    return float(np.mean((b @ weights).argmax(1) == test_y))


def probe(model, x, labels, split=0.75, batch_size=64):
    """Taps every block and its attention in one pass; probes each block.

    Returns:
        `(accuracies, attention)`: `{block path: held-out accuracy}` in
        block order, and `{softmax path: (samples, patches)}` class-token
        attention.
    """
    tap_model = kt.TapModel(model, [BLOCKS, ATTENTION])
    values = tap_model.extract(
        x, batch_size=batch_size, reduce=summarize, verbose=0
    )
    cut = int(len(x) * split)
    classes = int(labels.max()) + 1
    accuracies, attention = {}, {}
    for name, value in values.items():
        if "/mha/" in name:
            attention[name] = value
            continue
        accuracies[name] = ridge_probe(
            value[:cut], labels[:cut], value[cut:], labels[cut:], classes
        )
    return accuracies, attention


def plot(accuracies, attention, path, chance):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(attention)
    figure, axes = plt.subplots(
        1, count + 1, figsize=(3.2 * (count + 1), 3), squeeze=False
    )
    axes = axes[0]
    names = [n.rsplit("_", 1)[-1] for n in accuracies]
    axes[0].plot(names, list(accuracies.values()), marker="o")
    axes[0].axhline(chance, color="gray", linestyle="--", label="chance")
    axes[0].set(xlabel="block", ylabel="probe accuracy", ylim=(0, 1.05))
    axes[0].legend()
    for axis, (name, value) in zip(axes[1:], attention.items()):
        side = int(round(value.shape[1] ** 0.5))
        axis.imshow(value[0].reshape(side, side), cmap="viridis")
        axis.set_title(name.split("/")[1], fontsize=9)
        axis.axis("off")
    figure.suptitle("Linear probes per block; class-token attention")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="runs/probe_transformer")
    args = parser.parse_args(argv)
    model = backbone(args.layers)
    x, labels = quadrant_images(args.samples)
    accuracies, attention = probe(model, x, labels)
    os.makedirs(args.out, exist_ok=True)
    figure = plot(
        accuracies, attention, os.path.join(args.out, "probes.png"),
        chance=1 / (int(labels.max()) + 1),
    )
    for name, accuracy in accuracies.items():
        print(f"{name}: probe accuracy {accuracy:.3f}")
    print(f"plot: {figure}")
    return accuracies, attention, figure


if __name__ == "__main__":
    main()
