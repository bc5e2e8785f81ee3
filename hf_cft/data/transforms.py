"""Image transforms and collation for CLIP-like models.

``ImageTransform`` reproduces the preprocessing of a model's image processor (resize the shorter side,
centre crop, rescale to [0, 1], normalise with the processor's mean/std) with PIL + torch only, so it
needs neither torchvision nor the processor object at run time. It decodes images itself, which lets a
corrupt image raise :class:`~hf_cft.errors.ImageDecodeError` naming its source instead of a PIL traceback.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_cft.errors import DatasetFormatError, ImageDecodeError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is in the vision extra
        raise ImportError("Decoding images needs Pillow: pip install 'hf-cft[vision]'") from exc
    return Image


def decode_image(item, source: str = "dataset"):
    """Return an RGB ``PIL.Image`` from a PIL image, an ``{"bytes", "path"}`` dict, raw bytes, or an array.

    Arrays may be ``HxW``, ``HxWxC`` or ``CxHxW`` (uint8 0..255 or float 0..1).
    """
    Image = _pil()
    if isinstance(item, Image.Image):
        img = item
    elif isinstance(item, (dict, bytes, bytearray)):
        raw = item if isinstance(item, (bytes, bytearray)) else item.get("bytes")
        path = None if isinstance(item, (bytes, bytearray)) else item.get("path")
        try:
            if raw is not None:
                img = Image.open(io.BytesIO(raw))
            elif path:
                img = Image.open(path)
            else:
                raise ValueError("neither bytes nor path")
            img.load()
        except Exception as exc:  # PIL raises many types; turn them into one typed error
            raise ImageDecodeError(f"Cannot decode image {path or '<bytes>'} of {source}: {exc}") from exc
    elif isinstance(item, (np.ndarray, torch.Tensor, list)):
        arr = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        try:
            img = Image.fromarray(arr)
        except Exception as exc:
            raise ImageDecodeError(f"Cannot turn an array of shape {arr.shape} from {source} into an image") from exc
    elif item is None:
        raise ImageDecodeError(f"An image of {source} is missing (None).")
    else:
        raise ImageDecodeError(f"Cannot decode an image of type {type(item).__name__} from {source}.")
    return img if img.mode == "RGB" else img.convert("RGB")


def _size_value(size, default: int) -> int:
    if size is None:
        return default
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        for key in ("shortest_edge", "height", "width"):
            if size.get(key):
                return int(size[key])
    return int(getattr(size, "shortest_edge", None) or getattr(size, "height", None) or default)


@dataclass
class ImageTransform:
    """PIL → normalised ``[3, crop, crop]`` float tensor, as a CLIP image processor does it.

    ``train=True`` adds a random resized crop (area ``scale``) and optional horizontal flip, seeded per
    instance (``seed``) so that runs repeat.
    """

    size: int = 224
    crop_size: int = 224
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    train: bool = False
    scale: tuple[float, float] = (0.9, 1.0)
    hflip: bool = False
    seed: int = 0
    source: str = "dataset"
    _rng: random.Random = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    @classmethod
    def from_processor(cls, processor, **kwargs) -> ImageTransform:
        """Read size, crop size, mean and std from a transformers image processor (or a ``CLIPProcessor``)."""
        proc = getattr(processor, "image_processor", processor)
        crop = _size_value(getattr(proc, "crop_size", None), 0)
        size = _size_value(getattr(proc, "size", None), crop or 224)
        return cls(
            size=size,
            crop_size=crop or size,
            mean=tuple(getattr(proc, "image_mean", None) or OPENAI_CLIP_MEAN),
            std=tuple(getattr(proc, "image_std", None) or OPENAI_CLIP_STD),
            **kwargs,
        )

    @classmethod
    def from_model(cls, model, **kwargs) -> ImageTransform:
        """Defaults for a model without a saved processor: its vision ``image_size`` and CLIP statistics."""
        cfg = getattr(model, "config", None)
        vision = getattr(cfg, "vision_config", cfg)
        image_size = int(getattr(vision, "image_size", 224))
        return cls(size=image_size, crop_size=image_size, **kwargs)

    def __call__(self, image) -> torch.Tensor:
        Image = _pil()
        img = decode_image(image, self.source)
        if self.train:
            img = self._random_resized_crop(img)
            if self.hflip and self._rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            w, h = img.size
            if min(w, h) != self.size:
                r = self.size / min(w, h)
                img = img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BICUBIC)
            img = self._center_crop(img)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (arr - mean) / std

    def _center_crop(self, img):
        w, h = img.size
        c = self.crop_size
        if w < c or h < c:  # pad-free fallback: upscale so the crop fits
            Image = _pil()
            r = c / min(w, h)
            img = img.resize((max(c, round(w * r)), max(c, round(h * r))), Image.Resampling.BICUBIC)
            w, h = img.size
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
        return img.crop((left, top, left + c, top + c))

    def _random_resized_crop(self, img):
        Image = _pil()
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * self._rng.uniform(*self.scale)
            ratio = math.exp(self._rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = self._rng.randint(0, w - cw), self._rng.randint(0, h - ch)
                return img.resize(
                    (self.crop_size, self.crop_size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch)
                )
        return self._center_crop(img.resize((self.crop_size, self.crop_size), Image.Resampling.BICUBIC))

    def key(self) -> str:
        """A string that identifies the deterministic part of this transform (for feature caches)."""
        return (
            f"ImageTransform(size={self.size},crop={self.crop_size},mean={self.mean},std={self.std},"
            f"train={self.train},scale={self.scale},hflip={self.hflip},seed={self.seed})"
        )


def apply_image_transform(
    dataset,
    transform: ImageTransform,
    image_column: str = "image",
    label_column: str = "label",
    name: str | None = None,
):
    """``dataset.with_transform`` that yields ``pixel_values`` (and ``labels``) for each row.

    Images are decoded by :func:`decode_image` (never by ``datasets``) so that a corrupt image raises a typed
    error naming its path.
    """
    import datasets

    if image_column in dataset.column_names and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if name:
        transform.source = f"dataset {name!r}"

    def _fn(batch):
        out = {"pixel_values": [transform(img) for img in batch[image_column]]}
        if label_column in batch:
            out["labels"] = batch[label_column]
        return out

    return dataset.with_transform(_fn)


class ImageClassificationCollator:
    """Stack ``pixel_values`` into ``[B, 3, H, W]`` and labels into a ``long`` tensor.

    Extra integer keys (e.g. ``task_ids``) are stacked too; anything else is dropped.
    """

    def __init__(self, extra_keys: Sequence[str] = ()):
        self.extra_keys = tuple(extra_keys)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise DatasetFormatError("Cannot collate an empty batch (an empty dataset or split?).")
        batch = {"pixel_values": torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows])}
        label_key = "labels" if "labels" in rows[0] else ("label" if "label" in rows[0] else None)
        if label_key is not None:
            batch["labels"] = torch.as_tensor([int(r[label_key]) for r in rows], dtype=torch.long)
        for key in self.extra_keys:
            batch[key] = torch.as_tensor([r[key] for r in rows])
        return batch
