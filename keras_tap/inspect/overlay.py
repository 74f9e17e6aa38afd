"""`kt.plot.overlay`: a heatmap (Grad-CAM, saliency) drawn over an image."""

import importlib
import os
from pathlib import Path

import keras
import numpy as np

_MISSING_MATPLOTLIB = 'kt.plot needs matplotlib: pip install "keras-tap[plot]"'


def overlay(image, heatmap, path, *, alpha=0.4, cmap="jet"):
    """Draws `heatmap`, resized to `image`, over it and writes a PNG.

    As keras-io's Grad-CAM example does: the heatmap is colored with
    `cmap`, resized (bilinear) to the image's height and width, and added
    to the image with weight `alpha`; the sum is rescaled to `[0, 255]`.
    The PNG has the image's size in pixels.

    Args:
        image: one image `(H, W, 3)` or `(H, W)` (or `(H, W, 1)`), uint8 or
            float in `[0, 255]`.
        heatmap: a 2-D array `(h, w)` in `[0, 1]`, e.g. one of
            `kt.attribution.grad_cam`'s maps.
        path: where to write the PNG (`str` or `os.PathLike`); parent
            directories are created.
        alpha: the weight of the colored heatmap.
        cmap: a matplotlib colormap name.

    Returns:
        The path written, as a `str`.

    Raises:
        ValueError: for an image or heatmap of another rank.
        ImportError: if matplotlib is not installed.

    Example:

    >>> import numpy as np, keras_tap as kt
    >>> kt.plot.overlay(np.zeros((32, 32, 3), "uint8"),
    ...                 np.eye(4), "/tmp/overlay.png")
    '/tmp/overlay.png'
    """
    image = np.asarray(image, dtype="float32")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(
            "`image` must be one image (H, W, 3), (H, W, 1) or (H, W); "
            f"received shape {image.shape}."
        )
    heatmap = np.asarray(heatmap, dtype="float32")
    if heatmap.ndim != 2:
        raise ValueError(
            "`heatmap` must be a 2-D map (h, w), one sample's; received "
            f"shape {heatmap.shape}."
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`path` must be a str or os.PathLike; received {path!r}."
        )
    try:
        colormaps = importlib.import_module("matplotlib").colormaps
        pyimage = importlib.import_module("matplotlib.image")
    except ImportError as error:
        raise ImportError(_MISSING_MATPLOTLIB) from error
    height, width = image.shape[:2]
    resized = keras.ops.image.resize(
        heatmap[..., None], (height, width), interpolation="bilinear"
    )
    resized = np.clip(keras.ops.convert_to_numpy(resized)[..., 0], 0, 1)
    colored = colormaps[cmap](resized)[..., :3] * 255.0
    blended = image[..., :3] + alpha * colored
    blended = blended * (255.0 / max(float(blended.max()), 1e-12))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pyimage.imsave(path, blended.astype("uint8"), format="png")
    return str(path)
