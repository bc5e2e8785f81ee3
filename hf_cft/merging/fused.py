"""Fused merge kernels: one pass over the inputs per key, on every core, with numba (optional: ``pip install
'hf-cft[fast]'``).

The blocked torch kernels of :mod:`hf_cft.merging.baselines` run about ten torch ops per block and input; on an idle
machine their cost is the ops' own overhead and passes over the block, not memory traffic. These kernels do the same
fp32 arithmetic, op for op and in the same order, in one compiled loop per entry (``prange`` over the entries, the
inputs in list order inside), so their results are bit for bit those of the torch kernels (tests/test_merging_fused.py
checks it on random and tie-heavy tensors). Where numba is not installed, or ``HF_CFT_FUSED=0``, or a tensor is not a
contiguous fp32 CPU tensor, the torch kernels run instead: same results, slower.

Compiled on first use and cached on disk (numba's ``cache=True``), so a new process pays the compilation once per
machine, not per call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

_KERNELS: dict | None = None


def available() -> bool:
    """Whether the fused kernels can run: numba importable and ``HF_CFT_FUSED`` is not ``0``."""
    if os.environ.get("HF_CFT_FUSED", "1") == "0":
        return False
    return _kernels() is not None


def applies(*tensors: Tensor) -> bool:
    """Whether the fused kernels apply to these tensors (contiguous fp32 CPU tensors, numba available)."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and available()
    )


def _kernels() -> dict | None:
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _compile()
        except ImportError:
            _KERNELS = {}
    return _KERNELS or None


def _threads() -> None:
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _compile() -> dict:
    import numba
    import numpy as np

    from hf_cft.merging import _fused_kernels as kernels

    names = ("ties_mean", "band_sum", "consensus", "magmax", "gram_sum", "scale")
    return {**{name: getattr(kernels, name) for name in names}, "numba": numba, "np": np}


def ties_mean(
    flats: Sequence[Tensor], thresholds: Sequence[float], drops: Sequence[Tensor | None], weights: Sequence[float]
) -> Tensor:
    """The fused form of the blocked TIES kernel (tensor-scope trim, ``merge="mean"``, no zero sign): flat fp32 inputs,
    each input's ``(threshold, drops)`` from :func:`~hf_cft.merging.baselines._tensor_threshold`."""
    k = _kernels()
    np = k["np"]
    _threads()
    out = torch.empty(flats[0].numel())
    empty = np.zeros(0, dtype=np.int64)
    k["ties_mean"](
        tuple(f.numpy() for f in flats),
        np.array(thresholds, dtype=np.float32),
        tuple(empty if d is None else d.numpy().astype(np.int64) for d in drops),
        np.array(weights, dtype=np.float32),
        any(w != 1.0 for w in weights),
        out.numpy(),
    )
    return out


def band_sum(flats: Sequence[Tensor], bands: Sequence[tuple], weights: Sequence[float]) -> Tensor:
    """The fused form of breadcrumbs' blocked sum: ``bands[t] = (lo, hi, ties)`` from
    :func:`~hf_cft.merging.methods._band_limits` (``ties``: ``(equal, inside)`` position tensors)."""
    k = _kernels()
    np = k["np"]
    _threads()
    values, inside, owner = [], [], []
    for t, (f, (_, _, ties)) in enumerate(zip(flats, bands)):
        for equal, kept in ties:
            if equal.numel():
                values.append(abs(float(f[int(equal[0])])))
                inside.append(kept.numpy().astype(np.int64))
                owner.append(t)
    out = torch.empty(flats[0].numel())
    k["band_sum"](
        tuple(f.numpy() for f in flats),
        np.array([b[0] for b in bands], dtype=np.float32),
        np.array([b[1] for b in bands], dtype=np.float32),
        np.array(values, dtype=np.float32),
        tuple(inside) if inside else (np.zeros(0, dtype=np.int64),),
        np.array(owner, dtype=np.int64),
        np.array(weights, dtype=np.float32),
        out.numpy(),
    )
    return out


def consensus(flats: Sequence[Tensor], weights: Sequence[float], lambdas: Sequence[float], k: int) -> Tensor:
    """The fused form of the blocked consensus kernel (TALL masks on w_t·τ_t, at least ``k`` votes)."""
    kern = _kernels()
    np = kern["np"]
    _threads()
    out = torch.empty(flats[0].numel())
    kern["consensus"](
        tuple(f.numpy() for f in flats),
        np.array(weights, dtype=np.float32),
        np.array([w != 1.0 for w in weights]),
        np.array(lambdas, dtype=np.float32),
        int(k),
        out.numpy(),
    )
    return out


def magmax(flats: Sequence[Tensor], weights: Sequence[float], tie_break: str) -> Tensor:
    """The fused form of MagMax's fold (``tie_break`` ``"later"``: ≥, ``"earlier"``: >)."""
    kern = _kernels()
    np = kern["np"]
    _threads()
    out = torch.empty(flats[0].numel())
    kern["magmax"](
        tuple(f.numpy() for f in flats),
        np.array(weights, dtype=np.float32),
        np.array([w != 1.0 for w in weights]),
        tie_break == "later",
        out.numpy(),
    )
    return out


def gram_sum(flats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The T×T Gram matrix (fp64 products and sums) and Σ_t τ_t (fp32, list order) in one pass over the inputs."""
    kern = _kernels()
    np = kern["np"]
    _threads()
    t_count = len(flats)
    chunks = 64
    partial = np.zeros((chunks, t_count, t_count))
    out = torch.empty(flats[0].numel())
    kern["gram_sum"](tuple(f.numpy() for f in flats), chunks, partial, out.numpy())
    upper = partial.sum(axis=0)
    gram = np.triu(upper) + np.triu(upper, 1).T
    return torch.from_numpy(gram), out


def scale_(out: Tensor, divisor: int, factor: float) -> Tensor:
    """``out.div_(divisor).mul_(factor)`` in one pass (the same fp32 operations)."""
    kern = _kernels()
    np = kern["np"]
    _threads()
    kern["scale"](out.view(-1).numpy(), np.float32(divisor), np.float32(factor))
    return out
