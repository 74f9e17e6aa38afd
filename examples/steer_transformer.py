"""Steer a causal LM while it generates, and patch activations per block.

Two things researchers do with a transformer's residual stream, on a tiny
keras-hub `GPT2CausalLM` built from a config (random weights, no download;
token ids stand for words, so no tokenizer is needed):

1. Steering: the steering vector is the difference of the mean activations
   of one block between two sets of prompts ("A" prompts use tokens 1-15,
   "B" prompts tokens 16-31). Added to that block with
   `kt.edit(lm, {block: kt.edits.Add(vector, scale)})` while `generate`
   runs, including its cached decoding, it changes the continuation.
2. Activation patching: run a corrupted prompt (one token changed) with one
   block's output at that token replaced by the clean run's
   (`kt.edits.Replace(value, where=mask)`), and
   measure how much of the clean run's logit difference (clean next token
   minus corrupted next token) each block restores: 0 is the corrupted
   run, 1 the clean run. A bar chart per block is written.

Run it:

    python examples/steer_transformer.py --out runs/steer
"""

import argparse
import os

import keras
import numpy as np

import keras_tap as kt

LENGTH = 12  # tokens per sequence: the prompt, then what is generated


def build_lm(num_layers=4, seed=0):
    """A tiny GPT-2 causal LM (random weights), greedy decoding."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=num_layers, num_heads=2,
        hidden_dim=32, intermediate_dim=64, max_sequence_length=32,
        dropout=0.0,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def batch(prompts):
    """`{"token_ids", "padding_mask"}` for prompts of equal length, padded
    to `LENGTH` for `generate` to fill in."""
    prompts = np.asarray(prompts, "int32")
    ids = np.zeros((len(prompts), LENGTH), "int32")
    ids[:, : prompts.shape[1]] = prompts
    mask = np.zeros((len(prompts), LENGTH), bool)
    mask[:, : prompts.shape[1]] = True
    return {"token_ids": ids, "padding_mask": mask}


def block_paths(lm):
    return [f"transformer_layer_{i}" for i in range(
        len(lm.backbone.transformer_layers))]


def steering_vector(lm, block, prompts_a, prompts_b):
    """Mean activation of `block` over the A prompts minus the B ones."""
    tap_model = kt.TapModel(lm.backbone, {"block": block})

    def mean(prompts):
        inputs = {
            "token_ids": np.asarray(prompts, "int32"),
            "padding_mask": np.ones(np.shape(prompts), bool),
        }
        _, taps = tap_model(inputs)
        return keras.ops.convert_to_numpy(taps["block"]).mean(axis=(0, 1))

    return mean(prompts_a) - mean(prompts_b)


def steer(lm, block, vector, prompt, scale=8.0):
    """The continuations of `prompt` without and with the steering."""
    inputs = batch([prompt])
    plain = lm.generate(inputs, stop_token_ids=None)["token_ids"][0]
    with kt.edit(lm, {block: kt.edits.Add(vector, scale=scale)}):
        steered = lm.generate(inputs, stop_token_ids=None)["token_ids"][0]
    return plain, steered


def last_logits(lm, prompts):
    prompts = np.asarray(prompts, "int32")
    inputs = {"token_ids": prompts, "padding_mask": np.ones_like(prompts)}
    return keras.ops.convert_to_numpy(lm(inputs))[:, -1]


def patching(lm, clean, corrupted):
    """`{block: fraction of the clean logit difference restored}`."""
    clean_logits = last_logits(lm, [clean])[0]
    corrupt_logits = last_logits(lm, [corrupted])[0]
    good, bad = int(np.argmax(clean_logits)), int(np.argmax(corrupt_logits))
    if good == bad:  # any other token: the difference is still defined
        bad = int(np.argsort(clean_logits)[-2])

    def difference(logits):
        return float(logits[good] - logits[bad])

    clean_diff, corrupt_diff = (
        difference(clean_logits), difference(corrupt_logits))
    names = block_paths(lm)
    tap_model = kt.TapModel(lm.backbone, {n: n for n in names})
    _, clean_taps = tap_model({
        "token_ids": np.asarray([clean], "int32"),
        "padding_mask": np.ones((1, len(clean)), "int32"),
    })
    # Patch the corrupted position only: how much of the clean run's
    # information still flows through it, after each block.
    where = (np.asarray(clean) != np.asarray(corrupted))[None, :, None]
    restored = {}
    for name in names:
        patch = kt.edits.Replace(clean_taps[name], where=where)
        with kt.edit(lm, {name: patch}):
            patched = difference(last_logits(lm, [corrupted])[0])
        restored[name] = (patched - corrupt_diff) / (clean_diff - corrupt_diff)
    return restored


def plot_restored(restored, path):
    """A bar chart of the restored fraction per block."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(restored)), list(restored.values()))
    ax.set_xticks(range(len(restored)))
    ax.set_xticklabels([n.rsplit("_", 1)[-1] for n in restored])
    ax.set_xlabel("patched block (transformer_layer_i)")
    ax.set_ylabel("clean logit difference restored")
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main(out="runs/steer", num_layers=4):
    lm = build_lm(num_layers)
    rng = np.random.default_rng(0)
    prompts_a = rng.integers(1, 16, size=(8, 6))
    prompts_b = rng.integers(16, 32, size=(8, 6))
    block = block_paths(lm)[(num_layers - 1) // 2]
    vector = steering_vector(lm, block, prompts_a, prompts_b)
    plain, steered = steer(lm, block, vector, prompts_b[0])
    print(f"steering {block}: {plain[6:]} -> {steered[6:]}")
    clean = rng.integers(1, 64, size=8)
    corrupted = clean.copy()
    corrupted[2] = (clean[2] + 32) % 64
    restored = patching(lm, clean, corrupted)
    for name, value in restored.items():
        print(f"patching {name}: {value:.3f} of the logit difference")
    path = plot_restored(restored, os.path.join(out, "patching.png"))
    print(f"plot -> {path}")
    return {"plain": plain, "steered": steered, "vector": vector,
            "restored": restored, "plot": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/steer")
    parser.add_argument("--num-layers", type=int, default=4)
    args = parser.parse_args()
    main(args.out, args.num_layers)
