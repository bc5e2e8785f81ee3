"""Decode a dataset split once into a uint8 tensor ``[N, 3, S, S]`` (resize shorter side, centre crop) with an
optional on-disk cache, for fast training and evaluation of small models, plus batched augmentations in torch.

Decoding JPEGs every epoch dominates the cost of training a 32-pixel CLIP on 2 CPU cores; decoding once and
augmenting whole batches in torch removes it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hf_cft.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode_image


def decode_split(dataset, size: int, cache_dir: str | os.PathLike | None = None, name: str = "dataset"):
    """``(images uint8 [N, 3, size, size], labels int64 [N])`` of a ``datasets.Dataset`` with image/label columns."""
    import datasets as hfds
    from PIL import Image

    key = hashlib.blake2b(f"{name}|{dataset._fingerprint}|{len(dataset)}|{size}".encode(), digest_size=12).hexdigest()
    path = Path(cache_dir) / f"{name.replace('/', '_')}-{size}px-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        d = load_file(str(path))
        return d["images"], d["labels"]
    ds = dataset.cast_column("image", hfds.Image(decode=False)) if "image" in dataset.column_names else dataset
    n = len(ds)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    labels = torch.as_tensor(np.asarray(ds.select_columns(["label"]).with_format("numpy")["label"]), dtype=torch.long)
    for start in range(0, n, 512):
        rows = ds.select_columns(["image"])[start : start + 512]["image"]
        for j, item in enumerate(rows):
            img = decode_image(item, f"dataset {name!r}")
            w, h = img.size
            r = size / min(w, h)
            img = img.resize((max(size, round(w * r)), max(size, round(h * r))), Image.Resampling.BICUBIC)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            images[start + j] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    if path is not None:
        from hf_cft.utils import atomic_save_safetensors

        atomic_save_safetensors({"images": images, "labels": labels}, path)
    return images, labels


def normalize_batch(images_u8: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    x = images_u8.float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@dataclass
class BatchAugment:
    """Batched augmentations on ``[B, 3, S, S]`` floats in [0, 1], all driven by one ``torch.Generator``.

    Every image gets a random shift of up to ``shift`` pixels. With probability ``degrade_prob`` an image is
    *degraded*: a random resized crop covering ``crop_scale`` of its area, then grayscale with probability
    ``grayscale_prob``, Gaussian blur with σ in ``blur_sigma``, and Gaussian noise of std ``noise``.
    """

    shift: int = 2
    degrade_prob: float = 0.0
    crop_scale: tuple[float, float] = (0.35, 1.0)
    grayscale_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.2)
    noise: float = 0.05

    def __call__(self, x: torch.Tensor, g: torch.Generator, return_info: bool = False):
        """Augment a batch. With ``return_info`` also return what was done to each image: a dict of ``[B]``
        tensors ``degraded``, ``grayscale``, ``blur_sigma`` and ``crop_area`` (1 and 0 for clean images), so that
        captions can describe the view."""
        B, _, S, _ = x.shape
        info = {
            "degraded": torch.zeros(B, dtype=torch.bool),
            "grayscale": torch.zeros(B, dtype=torch.bool),
            "blur_sigma": torch.zeros(B),
            "crop_area": torch.ones(B),
        }
        if self.shift:
            pad = F.pad(x, (self.shift,) * 4, mode="replicate")
            dx = torch.randint(0, 2 * self.shift + 1, (B,), generator=g)
            dy = torch.randint(0, 2 * self.shift + 1, (B,), generator=g)
            idx = torch.arange(S)
            rows = (dy[:, None] + idx[None]).view(B, 1, S, 1).expand(B, 3, S, S + 2 * self.shift)
            pad = pad.gather(2, rows)
            cols = (dx[:, None] + idx[None]).view(B, 1, 1, S).expand(B, 3, S, S)
            x = pad.gather(3, cols)
        if self.degrade_prob <= 0:
            return (x, info) if return_info else x
        sel = torch.rand(B, generator=g) < self.degrade_prob
        if not bool(sel.any()):
            return (x, info) if return_info else x
        x = x.clone()
        x[sel], sub = self._degrade(x[sel], g)
        info["degraded"] = sel
        for k, v in sub.items():
            info[k][sel] = v
        return (x, info) if return_info else x

    def _degrade(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        n, _, S, _ = x.shape
        area = torch.empty(n).uniform_(*self.crop_scale, generator=g)
        side = (area.sqrt() * S).clamp(2, S)
        cx = torch.rand(n, generator=g) * (S - side) + side / 2
        cy = torch.rand(n, generator=g) * (S - side) + side / 2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = side / S
        theta[:, 1, 1] = side / S
        theta[:, 0, 2] = (2 * cx / S) - 1
        theta[:, 1, 2] = (2 * cy / S) - 1
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        gray = torch.rand(n, generator=g) < self.grayscale_prob
        if bool(gray.any()):
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x[gray] = (x[gray] * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        sigma = torch.empty(n).uniform_(*self.blur_sigma, generator=g)
        x = _gaussian_blur(x, sigma)
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, generator=g)
        return x.clamp_(0, 1), {"grayscale": gray, "blur_sigma": sigma, "crop_area": area}


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    n, c, S, _ = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [n, K]
    weight = k.repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = x.reshape(1, n * c, S, S)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), weight.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), weight.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, S, S)
