"""TensorFlow's legacy bilinear resize with align_corners=True, in numpy (no TensorFlow).

The official Meta-Dataset decoder (meta_dataset/data/decoder.py) resizes every decoded image with
`tf.image.resize_images(image, [size, size], BILINEAR, align_corners=True)`. Output pixel (i, j)
samples the input at (i, j) * (in - 1) / (size - 1) and interpolates between its neighbours,
x first: top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx, out = top + (bottom - top) * dy
(no antialiasing; corner pixels map onto corner pixels). TF computes in float32, this module in
float64. Used when a Meta-Dataset cache is built at a benchmark's size, and when a source stored
at its native size is gathered (`ArraySource.gather_size`).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=64)
def _axis(n_in: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source index and interpolation weight of each output index (align_corners)."""
    scale = (n_in - 1) / (size - 1) if size > 1 else 0.0
    pos = np.arange(size) * scale
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), pos - lo


def resize_batch_tf(images: np.ndarray, size: int) -> np.ndarray:
    """TF's legacy bilinear resize (align_corners=True) of a batch: uint8 [N, H, W(, C)] -> float64
    [N, size, size(, C)]."""
    y0, y1, fy = _axis(images.shape[1], size)
    x0, x1, fx = _axis(images.shape[2], size)
    src = images.astype(np.float64)
    trail = (1,) * (src.ndim - 3)
    left, right = src[:, :, x0], src[:, :, x1]
    rows = left + (right - left) * fx.reshape((1, 1, -1) + trail)
    top, bottom = rows[:, y0], rows[:, y1]
    return top + (bottom - top) * fy.reshape((1, -1, 1) + trail)


def resize_bilinear_tf(img: np.ndarray, size: int) -> np.ndarray:
    """TF's legacy bilinear resize with align_corners=True: uint8 [H, W(, C)] -> float64 [size, size(, C)]."""
    return resize_batch_tf(img[None], size)[0]
