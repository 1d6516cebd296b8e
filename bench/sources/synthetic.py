"""`synthetic`: a tiny in-memory source for fast tests (seeded blob patterns, no files)."""

from __future__ import annotations

import numpy as np

from bench.sources.base import ArraySource


def make_synthetic(n_classes: int = 64, n_examples: int = 20, image_size: int = 28,
                   seed: int = 0, shift: int = 4, noise: float = 0.3) -> ArraySource:
    """A learnable toy dataset: each class is a random smooth pattern; examples add shifts and noise.

    shift: largest circular shift in pixels (each axis); noise: std of the additive Gaussian noise.
    The defaults (4 px, 0.3) make it hard enough that meta-training visibly helps: on 5-way 1-shot
    an untrained 16-filter MAML adapting 10 steps scores ~73% (~95% with the earlier 2 px / 0.15);
    at the conformance suite's settings (3 test steps) it goes from ~53% to ~79% in 60 outer steps.

    Classes split 50% / 20% / 30% into train / val / test, grouped into "scripts" of 8 classes.
    Images: uint8 [n_classes * n_examples, image_size, image_size].
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7])))
    s = image_size
    coarse = rng.random((n_classes, 4, 4))
    # bilinear-ish upsampling by repetition then a box blur gives smooth class prototypes
    proto = np.kron(coarse, np.ones((s // 4 + 1, s // 4 + 1)))[:, :s, :s]
    proto = (proto > 0.5).astype(np.float32)
    images = np.empty((n_classes * n_examples, s, s), dtype=np.uint8)
    for c in range(n_classes):
        for e in range(n_examples):
            dy, dx = rng.integers(-shift, shift + 1, size=2)
            img = np.roll(np.roll(proto[c], dy, axis=0), dx, axis=1)
            img = np.clip(img * 0.8 + rng.normal(0.0, noise, size=(s, s)), 0.0, 1.0)
            images[c * n_examples + e] = (img * 255).astype(np.uint8)
    n_train, n_val = n_classes // 2, n_classes // 5
    ids = np.arange(n_classes, dtype=np.int64)
    return ArraySource(
        name="synthetic", images=images,
        class_start=ids * n_examples, class_count=np.full(n_classes, n_examples, dtype=np.int64),
        class_names=[f"class{c:03d}" for c in range(n_classes)],
        splits={"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]},
        groups=[f"script{c // 8}" for c in range(n_classes)],
        meta={"seed": seed, "image_size": image_size},
    )


def load(root, image_size: int) -> ArraySource:
    """Registry entry: the synthetic source needs no files; `root` is ignored."""
    return make_synthetic(image_size=image_size)
