"""Fixed, deterministic domain shifts of a batch of images, for domain-generalisation tests (Protocol D).

Each shift maps uint8 images ``[N, 3, H, W]`` to uint8 images of the same shape, with fixed parameters (nothing
is tuned to a result) and, where it draws random numbers, a fixed seed: the same input always gives the same
output. The shifts and their parameters (:data:`SHIFT_PARAMETERS`):

- ``grayscale``: luma 0.299·R + 0.587·G + 0.114·B copied to the three channels;
- ``blur``: Gaussian blur, σ = 2 pixels (replicate padding);
- ``low_contrast``: each channel pulled towards its own mean, x' = m + 0.3·(x − m), so its standard deviation
  shrinks to 0.3 of what it was and its mean stays;
- ``noise``: additive Gaussian noise, σ = 0.2 of the intensity range, clipped (``seed`` draws it);
- ``jpeg``: JPEG re-encoding at quality 10 (blocking and colour bleeding; Pillow's encoder);
- ``sketch``: a pencil-sketch-like edge map: the Sobel gradient magnitude of the luma, divided by the image's
  largest magnitude, drawn dark on white (1 − magnitude) in the three channels.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from hf_cft.errors import ImageInputsError, OptionError

#: The shifts, in the order the benchmark reports them.
DOMAIN_SHIFTS = ("grayscale", "blur", "low_contrast", "noise", "jpeg", "sketch")
#: Each shift's fixed parameters.
SHIFT_PARAMETERS = {
    "grayscale": {"weights": (0.299, 0.587, 0.114)},
    "blur": {"sigma": 2.0},
    "low_contrast": {"factor": 0.3},
    "noise": {"std": 0.2},
    "jpeg": {"quality": 10},
    "sketch": {"operator": "sobel"},
}


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(SHIFT_PARAMETERS["grayscale"]["weights"], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.view(n, c, h, w)


def _sketch(x: torch.Tensor) -> torch.Tensor:
    gray = _luma(x)
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype)
    kernels = torch.stack([sx, sx.t()]).unsqueeze(1)  # [2, 1, 3, 3]: horizontal and vertical gradients
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    mag = g.pow(2).sum(1, keepdim=True).sqrt()
    peak = mag.amax(dim=(1, 2, 3), keepdim=True)
    edges = torch.where(peak > 0, mag / peak.clamp_min(1e-12), torch.zeros_like(mag))
    return (1.0 - edges).expand(-1, 3, -1, -1)


def _jpeg(images_u8: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    out = torch.empty_like(images_u8)
    for i, im in enumerate(images_u8):
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = torch.from_numpy(np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def domain_shift(images_u8: torch.Tensor, name: str, seed: int = 0) -> torch.Tensor:
    """``images_u8`` (uint8 ``[N, 3, H, W]``) under the shift ``name`` (one of :data:`DOMAIN_SHIFTS`), as uint8
    of the same shape. Deterministic: ``seed`` only matters for ``noise``; images are processed independently
    except that ``noise`` draws its values for the whole batch from one generator."""
    if name not in SHIFT_PARAMETERS:
        raise OptionError(f"unknown domain shift {name!r}; choose from {list(DOMAIN_SHIFTS)}")
    if not isinstance(images_u8, torch.Tensor) or images_u8.dtype != torch.uint8:
        got = images_u8.dtype if isinstance(images_u8, torch.Tensor) else type(images_u8).__name__
        raise ImageInputsError(f"domain_shift({name!r}) needs a uint8 tensor [N, 3, H, W]; got {got}")
    if images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise ImageInputsError(f"domain_shift({name!r}) needs uint8 images [N, 3, H, W]; got {list(images_u8.shape)}")
    p = SHIFT_PARAMETERS[name]
    if name == "jpeg":
        return _jpeg(images_u8.cpu(), p["quality"])
    x = images_u8.cpu().double() / 255.0
    if name == "grayscale":
        y = _luma(x).expand(-1, 3, -1, -1)
    elif name == "blur":
        y = _blur(x, p["sigma"])
    elif name == "low_contrast":
        m = x.mean(dim=(2, 3), keepdim=True)
        y = m + p["factor"] * (x - m)
    elif name == "noise":
        g = torch.Generator().manual_seed(seed)
        y = x + p["std"] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    else:  # sketch
        y = _sketch(x)
    return (y.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
