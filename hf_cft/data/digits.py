"""scikit-learn's handwritten digits (1,797 8×8 images, shipped inside scikit-learn) as a
:class:`ClassificationDataset`: the embedded offline default of the recipes and the demo model's data.

The test split is a deterministic 30% of each class (seed 0); images are 8×8 grayscale upscaled to
``image_size`` (nearest) and stored as PNG in a ``datasets.Image`` column.
"""

from __future__ import annotations

import numpy as np

from hf_cft.data.loading import ClassificationDataset, from_arrays
from hf_cft.data.sampling import split_per_class_indices

DIGIT_CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ('a photo of the number: "{}".', "a handwritten digit {}.", "a blurry image of the digit {}.")


def load_digits_dataset(image_size: int = 16, test_fraction: float = 0.3, seed: int = 0) -> ClassificationDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - in the demo extra
        raise ImportError("The digits dataset needs scikit-learn: pip install 'hf-cft[demo]'") from exc
    import datasets

    bunch = load_digits()
    images = (bunch.images / 16.0 * 255.0).round().astype(np.uint8)  # [N, 8, 8], 0..16 → 0..255
    reps = max(1, image_size // 8)
    images = images.repeat(reps, axis=1).repeat(reps, axis=2)
    labels = bunch.target.astype(np.int64)
    test_idx, train_idx = split_per_class_indices(labels, test_fraction, seed)
    parts = {
        split: from_arrays(list(images[idx]), labels[idx], DIGIT_CLASSNAMES, DIGIT_TEMPLATES, "digits", split)
        for split, idx in (("train", train_idx), ("test", test_idx))
    }
    splits = datasets.DatasetDict({k: v.splits[k] for k, v in parts.items()})
    return ClassificationDataset(
        name="digits",
        splits=splits,
        classnames=list(DIGIT_CLASSNAMES),
        templates=list(DIGIT_TEMPLATES),
        meta={"source": "sklearn.datasets.load_digits", "image_size": image_size},
    )
