"""Bit-packed boolean masks: 1 bit per entry instead of torch ``bool``'s 1 byte (condu.md §4, §9).

ConDU keeps one mask per task and delta key. The released code stores them as ``torch.bool`` (8× the size of
a bit mask: ≈150 MB per task for ViT-B/16 full fine-tuning); hf_cft packs them 8 entries per ``uint8`` byte
(≈18.7 MB), stores the shape alongside, and unpacks one key at a time when a task's expert is rebuilt.

Bit order is big-endian within a byte (the first entry is the most significant bit), the same as
``numpy.packbits``, so packed masks written by hf_cft can be read with NumPy as well. Packing and unpacking are
torch bit operations and run on the mask's device.

Example::

    packed = PackedMask.pack(delta > 0)      # uint8 [ceil(n/8)] + shape
    mask = packed.unpack()                   # bool tensor of the original shape
    assert packed.nbytes * 8 >= mask.numel()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PackedMask", "pack_mask", "packed_nbytes", "unpack_mask"]

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # bit 7 first: numpy.packbits' "big" order
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def packed_nbytes(shape: tuple[int, ...] | torch.Size) -> int:
    """Bytes taken by a packed mask of ``shape``: ``ceil(numel / 8)``."""
    return -(-math.prod(shape) // 8)


@dataclass(frozen=True)
class PackedMask:
    """A boolean tensor packed to bits: ``bits`` (``uint8 [ceil(numel/8)]``) and the original ``shape``."""

    bits: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.bits.dtype != torch.uint8 or self.bits.ndim != 1:
            raise ValueError(
                f"PackedMask bits must be a 1-d uint8 tensor, got {self.bits.dtype} {tuple(self.bits.shape)}"
            )
        if self.bits.numel() != packed_nbytes(self.shape):
            raise ValueError(
                f"PackedMask of shape {self.shape} needs {packed_nbytes(self.shape)} bytes, got {self.bits.numel()}"
            )

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        """Pack a boolean (or 0/1) tensor. Padding bits of the last byte are zero."""
        flat = mask.reshape(-1).to(torch.bool)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        groups = flat.view(-1, 8).to(torch.uint8)
        bits = (groups << _SHIFTS.to(groups.device)).sum(dim=1, dtype=torch.uint8)  # disjoint bits: sum == OR
        return cls(bits.contiguous(), tuple(mask.shape))

    def unpack(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The boolean tensor, on ``device`` (default: where the bits are)."""
        bits = self.bits if device is None else self.bits.to(device)
        flat = ((bits.unsqueeze(1) >> _SHIFTS.to(bits.device)) & 1).reshape(-1).to(torch.bool)
        return flat[: self.numel].reshape(self.shape)

    def unpack_range(self, start: int, stop: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Entries ``start:stop`` of the flattened mask as a 1-d boolean tensor on ``device`` (default: where the
        bits are), moving and unpacking only their bytes (``start`` must be a multiple of 8; used to rebuild
        experts slice by slice)."""
        if start % 8 or not 0 <= start <= stop <= self.numel:
            raise ValueError(
                f"unpack_range({start}, {stop}) needs 0 <= start <= stop <= {self.numel} and start a multiple of 8"
            )
        bits = self.bits[start // 8 : (stop + 7) // 8]
        if device is not None:
            bits = bits.to(device)
        flat = ((bits.unsqueeze(1) >> _SHIFTS.to(bits.device)) & 1).reshape(-1).to(torch.bool)
        return flat[: stop - start]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def count(self) -> int:
        """Number of ``True`` entries (popcount), without unpacking."""
        return int(_POPCOUNT.to(self.bits.device)[self.bits.long()].sum())

    def to(self, device: torch.device | str) -> PackedMask:
        return PackedMask(self.bits.to(device), self.shape)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, PackedMask)
            and self.shape == other.shape
            and torch.equal(self.bits.cpu(), other.bits.cpu())
        )

    __hash__ = None  # mutable tensor inside: not hashable


def pack_mask(mask: torch.Tensor) -> PackedMask:
    """Pack a boolean tensor to bits (see :class:`PackedMask`)."""
    return PackedMask.pack(mask)


def unpack_mask(packed: PackedMask, device: torch.device | str | None = None) -> torch.Tensor:
    """Unpack a :class:`PackedMask` to a boolean tensor of its stored shape."""
    return packed.unpack(device)
