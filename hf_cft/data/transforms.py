"""Image transforms and collation for CLIP-like models.

``ImageTransform`` reproduces the preprocessing of a model's image processor (resize the shorter side,
centre crop, rescale to [0, 1], normalise with the processor's mean/std) with PIL + torch only, so it
needs neither torchvision nor the processor object at run time. It decodes images itself, which lets a
corrupt image raise :class:`~hf_cft.errors.ImageDecodeError` naming its source instead of a PIL traceback.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
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
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)
        if arr.size == 0:
            raise ImageDecodeError(f"An image array of shape {arr.shape} from {source} is empty.")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ImageDecodeError(
                f"An image array from {source} holds {int((~np.isfinite(arr)).sum())} NaN/inf pixel value(s)."
            )
        if arr.dtype == np.uint16:  # 16-bit: scaled to 8 bits, not clipped
            arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
        elif arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = np.clip(np.round(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
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
    return to_rgb(img, source)


def to_rgb(img, source: str = "dataset"):
    """An RGB ``PIL.Image`` of ``img`` whatever its mode, as transformers' image processors convert it (alpha and
    palette transparency composited onto white), except that high-bit-depth modes are *scaled* to 8 bits where
    PIL's ``convert`` clips them: 16-bit grey (``I;16*``, and ``I`` holding values above 255) is divided by 257,
    a float image (``F``) in [0, 1] is multiplied by 255 (other float ranges are taken as 0..255). NaN/inf pixels
    raise :class:`~hf_cft.errors.ImageDecodeError` naming ``source``."""
    Image = _pil()
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img)
        if arr.ndim == 3:  # a multi-band integer image: keep PIL's own conversion
            return img.convert("RGB")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ImageDecodeError(f"A {img.mode} image of {source} holds NaN/inf pixel values.")
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
            arr = arr / (65535.0 if arr.max() <= 65535 else arr.max()) * 255.0
        elif img.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _size_value(size, default: int, name: str = "size") -> int:
    from hf_cft.validation import check_int

    if size is None:
        return default
    if isinstance(size, int):
        return check_int(size, f"image processor {name}", low=1)
    if isinstance(size, dict):
        for key in ("shortest_edge", "height", "width"):
            if size.get(key) is not None:
                return check_int(size[key], f"image processor {name}[{key!r}]", low=1)
        return default
    for key in ("shortest_edge", "height"):
        if getattr(size, key, None) is not None:
            return check_int(getattr(size, key), f"image processor {name}.{key}", low=1)
    return default


@dataclass
class ImageTransform:
    """PIL → normalised ``[3, crop, crop]`` float tensor, as a CLIP image processor does it.

    ``train=True`` adds a random resized crop (area ``scale``) and optional horizontal flip, seeded per
    instance (``seed``) so that runs repeat. Called with a per-sample ``key`` (what :func:`apply_image_transform`
    passes: a hash of the encoded image), the random draws of a sample are a function of ``(seed, epoch, key)``
    alone — not of which process or DataLoader worker transforms it, nor of the samples transformed before it — so
    a run sharded over N processes augments every image exactly as one process does. ``epoch`` is advanced by
    :func:`set_transform_epoch` (``ClipClassificationTrainer`` calls it when each epoch starts). Without a key the
    draws come from one stream seeded by ``seed`` (successive calls differ).

    Example::

        t = ImageTransform(size=224, crop_size=224, train=True, seed=1)
        x = t(image, key="sample-7")  # the same crop for sample-7 in epoch 0, in any process
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
    epoch: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        from hf_cft.validation import check_int, check_number

        self._rng = random.Random(self.seed)
        self.size = check_int(self.size, "size (image processor's resize size)", low=1)
        self.crop_size = check_int(self.crop_size, "crop_size (image processor's crop size)", low=1)
        if len(self.mean) != 3 or len(self.std) != 3:
            from hf_cft.errors import OptionError

            raise OptionError(f"image mean and std need 3 values (RGB), got mean={self.mean!r}, std={self.std!r}.")
        self.mean = tuple(check_number(m, f"image mean[{i}]") for i, m in enumerate(self.mean))
        self.std = tuple(check_number(s, f"image std[{i}]", low=0.0, low_open=True) for i, s in enumerate(self.std))
        lo, hi = self.scale
        check_number(lo, "scale[0] (random crop area)", low=0.0, low_open=True, high=1.0)
        check_number(hi, "scale[1] (random crop area)", low=lo, high=1.0)

    @classmethod
    def from_processor(cls, processor, **kwargs) -> ImageTransform:
        """Read size, crop size, mean and std from a transformers image processor (or a ``CLIPProcessor``)."""
        proc = getattr(processor, "image_processor", processor)
        crop = _size_value(getattr(proc, "crop_size", None), 0, "crop_size")
        size = _size_value(getattr(proc, "size", None), crop or 224, "size")
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

    def set_epoch(self, epoch: int) -> None:
        """The training epoch that starts: keyed random draws (see the class docstring) change with it."""
        self.epoch = int(epoch)

    def __call__(self, image, key: str | None = None) -> torch.Tensor:
        Image = _pil()
        img = decode_image(image, self.source)
        if self.train:
            # a str seed is hashed with SHA-512 by `random`: the same stream in every process (no PYTHONHASHSEED)
            rng = self._rng if key is None else random.Random(f"{self.seed}|{self.epoch}|{key}")
            img = self._random_resized_crop(img, rng)
            if self.hflip and rng.random() < 0.5:
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

    def _random_resized_crop(self, img, rng: random.Random):
        Image = _pil()
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
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


def model_transform(model, image_processor=None) -> ImageTransform:
    """The evaluation :class:`ImageTransform` of ``model``: from ``image_processor`` (a transformers image processor,
    a ``CLIPProcessor`` or an :class:`ImageTransform`) when given, else from the image processor saved in the
    model's local folder (``model.name_or_path``), else :meth:`ImageTransform.from_model` (the vision config's
    image size, CLIP statistics). Use ``dataclasses.replace(t, train=True, seed=...)`` for the training one."""
    if isinstance(image_processor, ImageTransform):
        return image_processor
    if image_processor is not None:
        return ImageTransform.from_processor(image_processor)
    from hf_cft.models.clip import unwrap_model

    base = unwrap_model(model)
    folder = os.path.expanduser(str(getattr(base, "name_or_path", None) or ""))
    saved = ("preprocessor_config.json", "processor_config.json")  # an image processor, or a whole processor
    if folder and any(os.path.isfile(os.path.join(folder, name)) for name in saved):
        from transformers import AutoImageProcessor

        try:
            return ImageTransform.from_processor(AutoImageProcessor.from_pretrained(folder))
        except (OSError, ValueError):
            pass
    return ImageTransform.from_model(base)


def image_key(item) -> str:
    """A short content hash of an undecoded image (``{"bytes", "path"}`` dict, bytes, array or PIL image): the
    per-sample key of keyed augmentation. Identical images share a key (and so a crop), which is harmless."""
    h = hashlib.blake2b(digest_size=8)
    if isinstance(item, dict):
        raw = item.get("bytes")
        h.update(raw if raw is not None else str(item.get("path")).encode())
    elif isinstance(item, (bytes, bytearray)):
        h.update(item)
    elif hasattr(item, "tobytes") and hasattr(item, "size") and hasattr(item, "mode"):  # PIL image
        h.update(f"{item.mode}|{item.size}".encode())
        h.update(item.tobytes())
    else:
        arr = np.ascontiguousarray(np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item))
        h.update(f"{arr.dtype}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class _ImageBatchTransform:
    """The ``with_transform`` function of :func:`apply_image_transform` (a class, so that
    :func:`set_transform_epoch` can find the :class:`ImageTransform` inside a dataset)."""

    def __init__(self, transform: ImageTransform, image_column: str, label_column: str):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column

    def __call__(self, batch):
        tf = self.transform
        items = batch[self.image_column]
        keys = [image_key(img) for img in items] if tf.train else [None] * len(items)
        out = {"pixel_values": [tf(img, key=k) for img, k in zip(items, keys)]}
        if self.label_column in batch:
            out["labels"] = batch[self.label_column]
        return out


def apply_image_transform(
    dataset,
    transform: ImageTransform,
    image_column: str = "image",
    label_column: str = "label",
    name: str | None = None,
):
    """``dataset.with_transform`` that yields ``pixel_values`` (and ``labels``) for each row.

    Images are decoded by :func:`decode_image` (never by ``datasets``) so that a corrupt image raises a typed
    error naming its path. A training transform is called with each image's :func:`image_key`, so a row's random
    crop depends on (seed, epoch, image) only: the same in a 1-process and an N-process run, and with DataLoader
    workers.
    """
    import datasets

    if image_column in dataset.column_names and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if name:
        transform.source = f"dataset {name!r}"
    return dataset.with_transform(_ImageBatchTransform(transform, image_column, label_column))


def eval_view(dataset):
    """``dataset`` as evaluation sees it: when :func:`apply_image_transform` put a training (augmenting)
    :class:`ImageTransform` on it, the same rows with that transform's ``train=False`` twin (resize + centre crop,
    same size and statistics); any other dataset is returned unchanged."""
    import dataclasses

    fmt = getattr(dataset, "format", None)
    fn = fmt.get("format_kwargs", {}).get("transform") if isinstance(fmt, dict) else None
    if isinstance(fn, _ImageBatchTransform) and fn.transform.train:
        tf = dataclasses.replace(fn.transform, train=False)
        return dataset.with_transform(_ImageBatchTransform(tf, fn.image_column, fn.label_column))
    return dataset


def set_transform_epoch(dataset, epoch: int) -> bool:
    """Set the epoch of the training :class:`ImageTransform` that :func:`apply_image_transform` put on
    ``dataset`` (a ``datasets.Dataset``); ``False`` when it has none (any other dataset: nothing to do).

    Example::

        train = apply_image_transform(ds, ImageTransform(train=True, seed=0))
        set_transform_epoch(train, 3)  # keyed crops of epoch 3 from now on
    """
    fmt = getattr(dataset, "format", None)
    fn = fmt.get("format_kwargs", {}).get("transform") if isinstance(fmt, dict) else None
    if isinstance(fn, _ImageBatchTransform):
        fn.transform.set_epoch(epoch)
        return True
    return False


class ImageClassificationCollator:
    """Stack ``pixel_values`` into ``[B, 3, H, W]`` and labels into a ``long`` tensor.

    Extra integer keys (e.g. ``task_ids``) are stacked too, and so are SigLIP2's NaFlex inputs
    (``pixel_attention_mask``, ``spatial_shapes``) when the rows carry them; anything else is dropped.
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
        from hf_cft.models.families import IMAGE_INPUT_KEYS

        for key in IMAGE_INPUT_KEYS:
            if rows[0].get(key) is not None and key not in batch:
                batch[key] = torch.stack([torch.as_tensor(r[key]) for r in rows])
        return batch
