"""Shared test data builders (importable from tests as ``tests_helpers``)."""

import numpy as np

from hf_cft.data import ImageTransform, apply_image_transform, from_arrays

CLASSES = ["cat", "dog", "sea lion"]


def colour_dataset(n=24, seed=0, size=30):
    """Images whose dominant colour channel is the class: learnable in a few steps by any method."""
    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    imgs = []
    for lab in labels:
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        img[..., lab] += 150
        imgs.append(img)
    ds = from_arrays(imgs, labels, CLASSES, ["a photo of a {}."], name="toy")["train"]
    return apply_image_transform(ds, ImageTransform(size=size, crop_size=size))
