"""Image transforms and collation for CLIP-like models.

``ImageTransform`` reproduces what a model's own transformers image processor does (the PIL backend,
``*ImageProcessorPil``, which is also what transformers uses when torchvision is absent): RGB conversion, the
resize of the processor's ``size`` (the shorter side for CLIP / MetaCLIP / AltCLIP / Chinese-CLIP, the whole image
squashed to the square for SigLIP, a patch grid that keeps the aspect ratio for SigLIP2 NaFlex), centre crop with
zero padding, rescale and normalisation, and for NaFlex the patch tensor with ``pixel_attention_mask`` and
``spatial_shapes``. It runs on PIL + numpy + torch only, so it needs neither torchvision nor the processor object at
run time, decodes images itself (a corrupt image raises :class:`~hf_cft.errors.ImageDecodeError` naming its
source), and adds keyed random crops for training that follow the same resize. ``tests/test_preprocessing.py``
checks it against each processor class (docs/preprocessing.md has the table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_cft.errors import DatasetFormatError, ImageDecodeError, OptionError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("shortest_edge", "squash", "patches")
HIGH_BIT_DEPTH = ("scale", "clip")
# the extra image inputs of a NaFlex (SigLIP2) model, named as transformers' forward kwargs (hf_cft.models.families
# uses them as IMAGE_INPUT_KEYS)
PATCH_INPUT_KEYS = ("pixel_attention_mask", "spatial_shapes")
_BICUBIC, _BILINEAR = 3, 2  # PIL.Image.Resampling codes, as processors store them in their configs


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is in the vision extra
        raise ImportError("Decoding images needs Pillow: pip install 'hf-cft[vision]'") from exc
    return Image


def decode_image(item, source: str = "dataset", high_bit_depth: str = "scale"):
    """Return an RGB ``PIL.Image`` from a PIL image, an ``{"bytes", "path"}`` dict, raw bytes, or an array.

    Arrays may be ``HxW``, ``HxWxC`` or ``CxHxW`` (uint8 0..255 or float 0..1). ``high_bit_depth``: see
    :func:`to_rgb`.
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
    return to_rgb(img, source, high_bit_depth)


def to_rgb(img, source: str = "dataset", high_bit_depth: str = "scale"):
    """An RGB ``PIL.Image`` of ``img`` whatever its mode, as transformers' image processors convert it
    (``convert_to_rgb``: alpha and palette transparency composited onto white, anything else ``convert("RGB")``:
    L, P, CMYK, 1, ...).

    ``high_bit_depth="scale"`` (the default) departs from the processors where their conversion *clips*: 16-bit
    grey (``I;16*``, and ``I`` holding values above 255) is divided by 257 (65535 → 255), a float image (``F``) in
    [0, 1] is multiplied by 255; the processors turn every value above 255 (above 1 for ``F`` in [0, 1]) into
    white, which on a real 16-bit scan is most of the picture. ``high_bit_depth="clip"`` keeps the processors'
    conversion for these too (exact parity). NaN/inf pixels raise :class:`~hf_cft.errors.ImageDecodeError` naming
    ``source`` in both."""
    Image = _pil()
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img)
        if arr.ndim == 2:  # (a multi-band integer image keeps PIL's own conversion)
            arr = arr.astype(np.float64)
            if not np.isfinite(arr).all():
                raise ImageDecodeError(f"A {img.mode} image of {source} holds NaN/inf pixel values.")
            scaled = None
            if high_bit_depth == "scale":
                if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
                    scaled = arr / (65535.0 if arr.max() <= 65535 else arr.max()) * 255.0
                elif img.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
                    scaled = arr * 255.0
            if scaled is not None:
                grey = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
                return Image.fromarray(grey, mode="L").convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """``(height, width)`` that a SigLIP2 NaFlex processor resizes an image of ``height x width`` to: both
    multiples of ``patch_size`` (at least one patch each), the aspect ratio kept as far as the patch grid allows,
    and at most ``max_num_patches`` patches. The scale is the largest one found by bisection on [1e-6, 100] down to
    an interval of 1e-5 whose grid fits, as ``Siglip2ImageProcessor`` finds it (the same steps, hence the same
    grid)."""

    def side(scale: float, n: int) -> int:
        return max(patch_size, math.ceil(n * scale / patch_size) * patch_size)

    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        if (side(mid, height) // patch_size) * (side(mid, width) // patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def _center_crop_or_pad(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre ``height x width`` of an ``HxWxC`` array, zero-padded (centred, the odd pixel after) where the
    array is smaller: what the processors' ``center_crop`` does before rescaling."""
    h, w = arr.shape[:2]
    if h < height or w < width:
        nh, nw = max(h, height), max(w, width)
        top, left = (nh - h + 1) // 2, (nw - w + 1) // 2
        padded = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, nh, nw
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top : top + height, left : left + width]


def _hw(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _check_hw(value, name: str, allow_pair: bool = True):
    """``value`` as an int ≥ 1 or (when ``allow_pair``) a ``(height, width)`` pair of them."""
    from hf_cft.validation import check_int

    if allow_pair and isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise OptionError(f"{name} must be an int or a (height, width) pair, got {value!r}.")
        h, w = (check_int(v, f"{name}[{i}]", low=1) for i, v in enumerate(value))
        return h if h == w else (h, w)
    return check_int(value, name, low=1)


def _resample_code(value, owner: str) -> int:
    """A PIL resampling code (0..5) from an int, a ``PILImageResampling`` or a torchvision ``InterpolationMode``."""
    Image = _pil()
    value = getattr(value, "value", value)  # enums
    try:
        if isinstance(value, str):
            return int(Image.Resampling[value.upper()])
        if isinstance(value, bool):
            raise ValueError(value)
        return int(Image.Resampling(int(value)))
    except (KeyError, ValueError, TypeError):
        raise OptionError(
            f"{owner}: resample must be a PIL resampling filter (0..5 or its name), got {value!r}."
        ) from None


def _size_dict(size, default_to_square: bool) -> dict:
    """A processor's ``size`` / ``crop_size`` (dict, ``SizeDict`` or a legacy int) as a dict of its set keys."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return {k: get(k) for k in keys if get(k) is not None}


@dataclass
class ImageTransform:
    """PIL → the model's image inputs, as its transformers image processor makes them.

    ``resize_mode`` picks the processor's resize: ``"shortest_edge"`` (CLIP, MetaCLIP, AltCLIP, Chinese-CLIP:
    the shorter side to ``size``, the longer one ``int(size * long / short)``, truncated as the processor does,
    then a ``crop_size`` centre crop, zero-padded where the image is smaller), ``"squash"`` (SigLIP, and any
    processor whose ``size`` is a height and width: the whole image to ``size``, aspect ratio not kept), or
    ``"patches"`` (SigLIP2 NaFlex: a ``patch_size`` grid of at most ``max_num_patches`` patches that keeps the
    aspect ratio, see :func:`naflex_size`; the output is ``pixel_values [max_num_patches, patch_size² · 3]``
    zero-padded, ``pixel_attention_mask [max_num_patches]`` (int32, 1 for real patches) and ``spatial_shapes [2]``
    (int64, the grid's rows and columns)). Then ``rescale_factor`` (``None``: no rescale) and normalisation with
    ``mean`` / ``std`` (``normalize=False``: none). ``resample`` is the PIL filter (3 bicubic for CLIP and SigLIP,
    2 bilinear for SigLIP2). :meth:`from_processor` reads all of it from a processor, :meth:`from_model` from a
    model's family. ``size`` and ``crop_size`` are an int or ``(height, width)``; ``crop_size=None`` means
    ``size``.

    ``train=True`` draws a random box of the image (area fraction ``scale``, aspect ratio the image's times a
    log-uniform factor in ``ratio``) and passes the crop through the *same* pipeline (so SigLIP squashes its crops,
    CLIP keeps their aspect and centre-crops, NaFlex gives them their own patch grid), then an optional horizontal
    flip (``hflip``) of the result.
    Called with a per-sample ``key`` (what :func:`apply_image_transform` passes: a hash of the encoded image), the
    random draws of a sample are a function of ``(seed, epoch, key)`` alone — not of which process or DataLoader
    worker transforms it, nor of the samples transformed before it — so a run sharded over N processes augments
    every image exactly as one process does. ``epoch`` is advanced by :func:`set_transform_epoch`
    (``ClipClassificationTrainer`` calls it when each epoch starts). Without a key the draws come from one stream
    seeded by ``seed`` (successive calls differ). Ten boxes that do not fit the image fall back to the whole image.

    ``high_bit_depth`` is how 16-bit and float images become 8-bit (see :func:`to_rgb`): ``"scale"`` (default)
    or the processors' own ``"clip"``.

    Calling the transform returns the ``[3, H, W]`` ``pixel_values`` tensor, or for ``"patches"`` the dict of the
    three inputs; :meth:`inputs` always returns the dict (``pixel_values`` alone for the fixed-size modes).

    Example::

        t = ImageTransform.from_processor(AutoImageProcessor.from_pretrained("google/siglip-base-patch16-224"))
        x = t(image)                                        # [3, 224, 224], as the processor makes it
        tt = dataclasses.replace(t, train=True, seed=1)
        x = tt(image, key="sample-7")  # the same crop for sample-7 in epoch 0, in any process
    """

    size: int | tuple[int, int] = 224
    crop_size: int | tuple[int, int] | None = None
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    train: bool = False
    scale: tuple[float, float] = (0.9, 1.0)
    hflip: bool = False
    seed: int = 0
    source: str = "dataset"
    resize_mode: str = "shortest_edge"
    resample: int = _BICUBIC
    center_crop: bool = True
    rescale_factor: float | None = 1 / 255
    normalize: bool = True
    patch_size: int = 16
    max_num_patches: int = 256
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    high_bit_depth: str = "scale"
    _rng: random.Random = field(default=None, init=False, repr=False, compare=False)
    epoch: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        from hf_cft.validation import check_choice, check_int, check_number

        self._rng = random.Random(self.seed)
        self.resize_mode = check_choice(self.resize_mode, "resize_mode", RESIZE_MODES)
        self.high_bit_depth = check_choice(self.high_bit_depth, "high_bit_depth", HIGH_BIT_DEPTH)
        square_only = self.resize_mode == "shortest_edge"
        self.size = _check_hw(self.size, "size (image processor's resize size)", allow_pair=not square_only)
        if self.crop_size is not None:
            self.crop_size = _check_hw(self.crop_size, "crop_size (image processor's crop size)")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise OptionError(f"image mean and std need 3 values (RGB), got mean={self.mean!r}, std={self.std!r}.")
        self.mean = tuple(check_number(m, f"image mean[{i}]") for i, m in enumerate(self.mean))
        self.std = tuple(check_number(s, f"image std[{i}]", low=0.0, low_open=True) for i, s in enumerate(self.std))
        self.resample = _resample_code(self.resample, "ImageTransform")
        if self.rescale_factor is not None:
            self.rescale_factor = check_number(self.rescale_factor, "rescale_factor", low=0.0, low_open=True)
        self.patch_size = check_int(self.patch_size, "patch_size", low=1)
        self.max_num_patches = check_int(self.max_num_patches, "max_num_patches", low=1)
        lo, hi = self.scale
        check_number(lo, "scale[0] (random crop area)", low=0.0, low_open=True, high=1.0)
        check_number(hi, "scale[1] (random crop area)", low=lo, high=1.0)
        rlo, rhi = self.ratio
        check_number(rlo, "ratio[0] (random crop aspect factor)", low=0.0, low_open=True)
        check_number(rhi, "ratio[1] (random crop aspect factor)", low=rlo)

    @classmethod
    def from_processor(cls, processor, **kwargs) -> ImageTransform:
        """The transform that reproduces a transformers image processor (or a processor holding one): its resize
        (``size`` ``{"shortest_edge"}`` → ``"shortest_edge"``, ``{"height", "width"}`` → ``"squash"``, a NaFlex
        ``patch_size`` / ``max_num_patches`` processor → ``"patches"``), ``resample``, centre crop, rescale and
        normalisation. ``kwargs`` override fields (``train=True, seed=...``). A resize hf_cft does not reproduce
        (``longest_edge``, ``max_height`` / ``max_width``, pixel budgets, ``do_resize=False``) raises
        :class:`~hf_cft.errors.OptionError` naming the processor and its ``size``. RGB conversion is always done
        (SigLIP2's processor leaves ``do_convert_rgb`` unset and then fails on grey, RGBA or CMYK images)."""
        proc = getattr(processor, "image_processor", processor)
        name = type(proc).__name__
        if getattr(proc, "do_resize", True) is False:
            raise OptionError(f"{name} has do_resize=False: hf_cft needs a processor that resizes to a fixed shape.")
        mean = getattr(proc, "image_mean", None)
        std = getattr(proc, "image_std", None)
        resample = getattr(proc, "resample", None)
        opts = dict(
            resample=_BILINEAR if resample is None else _resample_code(resample, name),
            rescale_factor=getattr(proc, "rescale_factor", 1 / 255) if getattr(proc, "do_rescale", True) else None,
            normalize=bool(getattr(proc, "do_normalize", True)),
            mean=tuple(OPENAI_CLIP_MEAN if mean is None else ([mean] * 3 if isinstance(mean, float) else mean)),
            std=tuple(OPENAI_CLIP_STD if std is None else ([std] * 3 if isinstance(std, float) else std)),
        )
        if getattr(proc, "max_num_patches", None) is not None and getattr(proc, "patch_size", None) is not None:
            opts.update(resize_mode="patches", patch_size=proc.patch_size, max_num_patches=proc.max_num_patches)
            opts.update(center_crop=False)
            return cls(**{**opts, **kwargs})
        square = bool(getattr(proc, "default_to_square", True))
        size = _size_dict(getattr(proc, "size", None), square)
        if set(size) == {"shortest_edge"}:
            opts.update(resize_mode="shortest_edge", size=size["shortest_edge"])
        elif set(size) == {"height", "width"}:
            opts.update(resize_mode="squash", size=(size["height"], size["width"]))
        else:
            raise OptionError(
                f"{name} resizes with size={size}: hf_cft reproduces processors whose size is a shortest_edge, a "
                "height and width, or a NaFlex patch budget."
            )
        opts["center_crop"] = bool(getattr(proc, "do_center_crop", False))
        if opts["center_crop"]:
            crop = _size_dict(getattr(proc, "crop_size", None), True)
            if set(crop) != {"height", "width"}:
                raise OptionError(f"{name} centre-crops with crop_size={crop}: it needs a height and a width.")
            opts["crop_size"] = (crop["height"], crop["width"])
        return cls(**{**opts, **kwargs})

    @classmethod
    def from_model(cls, model, **kwargs) -> ImageTransform:
        """Defaults for a model without a saved processor, those of its family's processor at the vision config's
        ``image_size``: SigLIP squashes to the square (bicubic, mean/std 0.5), SigLIP2 makes NaFlex patches
        (``patch_size``, ``num_patches`` as the budget, bilinear, mean/std 0.5), everything else is CLIP (shorter
        side and centre crop, bicubic, CLIP statistics)."""
        cfg = getattr(model, "config", None)
        vision = getattr(cfg, "vision_config", cfg)
        image_size = int(getattr(vision, "image_size", 224))
        family = getattr(cfg, "model_type", "")
        if family == "siglip":
            opts = dict(resize_mode="squash", size=image_size, center_crop=False, mean=SIGLIP_MEAN, std=SIGLIP_STD)
        elif family == "siglip2":
            opts = dict(
                resize_mode="patches",
                patch_size=int(getattr(vision, "patch_size", 16)),
                max_num_patches=int(getattr(vision, "num_patches", 256)),
                resample=_BILINEAR,
                center_crop=False,
                mean=SIGLIP_MEAN,
                std=SIGLIP_STD,
            )
        else:
            opts = dict(size=image_size, crop_size=image_size)
        return cls(**{**opts, **kwargs})

    def to_processor(self):
        """The transformers image processor (PIL backend) that this transform reproduces, to save beside a model
        (``save_pretrained`` writes it under the processor's own type: ``CLIPImageProcessor``,
        ``SiglipImageProcessor``, ``Siglip2ImageProcessor``). Training fields (random crops) are not part of it."""
        common = dict(
            resample=self.resample,
            do_rescale=self.rescale_factor is not None,
            rescale_factor=self.rescale_factor if self.rescale_factor is not None else 1 / 255,
            do_normalize=self.normalize,
            image_mean=list(self.mean),
            image_std=list(self.std),
            do_convert_rgb=True,
        )
        if self.resize_mode == "patches":
            from transformers import Siglip2ImageProcessorPil

            return Siglip2ImageProcessorPil(patch_size=self.patch_size, max_num_patches=self.max_num_patches, **common)
        crop_h, crop_w = _hw(self.crop_size if self.crop_size is not None else self.size)
        crop = dict(do_center_crop=self.center_crop, crop_size={"height": crop_h, "width": crop_w})
        if self.resize_mode == "shortest_edge":
            from transformers import CLIPImageProcessorPil

            return CLIPImageProcessorPil(size={"shortest_edge": self.size}, **crop, **common)
        from transformers import SiglipImageProcessorPil

        h, w = _hw(self.size)
        return SiglipImageProcessorPil(size={"height": h, "width": w}, **crop, **common)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model inputs :meth:`inputs` returns: ``pixel_values``, plus ``pixel_attention_mask`` and
        ``spatial_shapes`` for ``"patches"`` (transformers' keyword names for a SigLIP2 forward)."""
        return ("pixel_values", *PATCH_INPUT_KEYS) if self.resize_mode == "patches" else ("pixel_values",)

    def set_epoch(self, epoch: int) -> None:
        """The training epoch that starts: keyed random draws (see the class docstring) change with it."""
        self.epoch = int(epoch)

    def __call__(self, image, key: str | None = None):
        out = self.inputs(image, key)
        return out if self.resize_mode == "patches" else out["pixel_values"]

    def inputs(self, image, key: str | None = None) -> dict[str, torch.Tensor]:
        """The model inputs of one image (see :attr:`input_names`), without a batch dimension."""
        Image = _pil()
        img = decode_image(image, self.source, self.high_bit_depth)
        flip = False
        if self.train:
            # a str seed is hashed with SHA-512 by `random`: the same stream in every process (no PYTHONHASHSEED)
            rng = self._rng if key is None else random.Random(f"{self.seed}|{self.epoch}|{key}")
            box = self._random_box(img.size, rng)
            if box is not None:
                img = img.crop(box)  # the processor's pipeline applied to the crop, exactly
            flip = self.hflip and rng.random() < 0.5
        img = img.resize(self._resized_size(*img.size), Image.Resampling(self.resample))
        arr = np.asarray(img, dtype=np.uint8)
        if self.center_crop and self.resize_mode != "patches":
            arr = _center_crop_or_pad(arr, *_hw(self.crop_size if self.crop_size is not None else self.size))
        if flip:
            arr = arr[:, ::-1]
        x = arr.astype(np.float64)  # the processors rescale and normalise in float64
        if self.rescale_factor is not None:
            x = x * self.rescale_factor
        if self.normalize:
            x = (x - np.asarray(self.mean, dtype=np.float64)) / np.asarray(self.std, dtype=np.float64)
        x = x.astype(np.float32)
        if self.resize_mode == "patches":
            return self._patches(x)
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))}

    def _resized_size(self, w: int, h: int) -> tuple[int, int]:
        """``(width, height)`` that the processor resizes a ``w x h`` image to."""
        if self.resize_mode == "shortest_edge":
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.size * long / short)  # truncated, as transformers' get_resize_output_image_size
            return (self.size, new_long) if w <= h else (new_long, self.size)
        if self.resize_mode == "squash":
            height, width = _hw(self.size)
            return width, height
        height, width = naflex_size(h, w, self.patch_size, self.max_num_patches)
        return width, height

    def _patches(self, x: np.ndarray) -> dict[str, torch.Tensor]:
        """``HxWx3`` (multiples of ``patch_size``) → NaFlex inputs: patches in row-major grid order, each flattened
        as (row, column, channel), zero-padded to ``max_num_patches``."""
        p = self.patch_size
        rows, cols = x.shape[0] // p, x.shape[1] // p
        patches = x.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
        values = np.zeros((self.max_num_patches, p * p * 3), dtype=np.float32)
        values[: rows * cols] = patches
        mask = np.zeros(self.max_num_patches, dtype=np.int32)
        mask[: rows * cols] = 1
        return {
            "pixel_values": torch.from_numpy(values),
            "pixel_attention_mask": torch.from_numpy(mask),
            "spatial_shapes": torch.tensor([rows, cols], dtype=torch.int64),
        }

    def _random_box(self, image_size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int] | None:
        """A random ``(left, top, right, bottom)`` box of the image, or ``None`` (the whole image) when ten draws
        do not fit."""
        w, h = image_size
        area = w * h
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = (w / h) * math.exp(rng.uniform(log_lo, log_hi))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return left, top, left + cw, top + ch
        return None

    def key(self) -> str:
        """A string that identifies the deterministic part of this transform (for feature caches)."""
        names = [f.name for f in dataclasses.fields(self) if f.init and f.name != "source"]
        return "ImageTransform(" + ",".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"


def model_transform(model, image_processor=None) -> ImageTransform:
    """The evaluation :class:`ImageTransform` of ``model``: from ``image_processor`` (a transformers image processor,
    a ``CLIPProcessor`` or an :class:`ImageTransform`) when given, else from the image processor saved in the
    model's local folder (``model.name_or_path``), else :meth:`ImageTransform.from_model` (the defaults of the
    model's family at its vision config's image size). Use ``dataclasses.replace(t, train=True, seed=...)`` for the training one."""
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
        rows = [tf.inputs(img, key=k) for img, k in zip(items, keys)]
        out = {name: [r[name] for r in rows] for name in tf.input_names}
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
    """``dataset.with_transform`` that yields ``pixel_values`` (and ``labels``) for each row, plus
    ``pixel_attention_mask`` and ``spatial_shapes`` for a NaFlex (``resize_mode="patches"``) transform.

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

    NaFlex rows (see :class:`ImageTransform`'s ``"patches"``) give ``pixel_values [B, max_num_patches, D]`` and
    carry ``pixel_attention_mask [B, max_num_patches]`` and ``spatial_shapes [B, 2]`` into the batch (the keyword
    names of a SigLIP2 forward) when the rows carry them. Extra integer keys (e.g. ``task_ids``) are stacked too;
    anything else is dropped.
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
        for key in PATCH_INPUT_KEYS:
            if rows[0].get(key) is not None and key not in batch:
                batch[key] = torch.stack([torch.as_tensor(r[key]) for r in rows])
        return batch
