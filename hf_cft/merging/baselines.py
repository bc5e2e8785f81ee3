"""Baseline model-merging methods on dense task deltas (pam.md §9), one-shot and continual.

A *delta* is a ``dict[str, torch.Tensor]`` keyed by the base model's state-dict keys: τ_t = θ_t − θ0 (for LoRA,
τ_t = ΔW_t = s·B_t·A_t per layer, built by :mod:`hf_cft.merging.deltas`). Every function here takes a list of such
deltas and returns a *merged delta* τ_m, key by key, in fp32, so that the deployed model is θ = θ0 + τ_m. All
scaling coefficients (λ, α) are already applied to the returned delta.

Why dense deltas and not LoRA factors: signs, magnitudes, masks and SVDs of A or B alone are meaningless because of
the factor symmetry (B, A) → (BR⁻¹, RA) (pam.md §9). Only PAM merges factors (see :mod:`hf_cft.merging.pam`).

One-shot methods (a list of deltas → one merged delta):

=====================  ==============================================================================
:func:`task_arithmetic`  λ·Σ_t τ_t (λ = 0.3)
:func:`running_mean`     (1/T)·Σ_t τ_t, the uniform soup
:func:`wise_ft`          α·τ for one fine-tuned model (default α = 0.5)
:func:`magnitude_prune`  λ·Σ_t trim_k(τ_t), task arithmetic on top-k trimmed deltas (peft's ``magnitude_prune``)
:func:`ties`             trim top-k %, elect sign, disjoint mean, ×λ (k = 0.2, λ = 1)
:func:`dare`             Bernoulli drop with rate ρ and 1/(1−ρ) rescale, then TA or TIES (ρ = 0.9)
:func:`magmax`           per entry the largest-magnitude τ_t, ×λ (λ = 0.5; τ_t cumulative)
:func:`emr`              unified vector + per-task masks and rescalers (task-aware reference)
:func:`tall_masks`       τ_MTL + per-task TALL masks (task-aware reference)
:func:`consensus`        τ_MTL kept where ≥ k TALL masks agree, ×λ (task-agnostic)
=====================  ==============================================================================

Continual forms (a stream of deltas; ``.add(delta)`` returns the merged delta after that task):
:class:`ContinualTaskArithmetic`, :class:`RunningMean`, :class:`ContinualTIES`, :class:`MagMaxMerger`,
:class:`OPCMMerger`. Their ``state_dict()`` / ``load_state_dict()`` hold everything needed to resume a stream.

Example::

    from hf_cft.merging.baselines import ties, ContinualTaskArithmetic

    merged = ties([delta_1, delta_2, delta_3], k=0.2, lam=1.0)       # {key: fp32 tensor}
    ta = ContinualTaskArithmetic(lam=0.3)
    for delta in stream:
        deployed = ta.add(delta)                                       # θ = θ0 + deployed

Bad input raises typed errors: an empty list → :class:`~hf_cft.errors.TaskError`; keys or shapes that differ
between deltas → :class:`~hf_cft.errors.DeltaError` naming the key; NaN/inf → :class:`~hf_cft.errors.NonFiniteError`
naming the key and the task index.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_cft.errors import DeltaError, MergeConfigError, NonFiniteError, TaskError
from hf_cft.merging import fused
from hf_cft.merging.deltas import all_finite
from hf_cft.merging.masks import PackedMask
from hf_cft.validation import check_choice, check_int, check_number

Delta = dict[str, Tensor]

__all__ = [
    "ContinualMerger",
    "ContinualTIES",
    "ContinualTaskArithmetic",
    "EMRResult",
    "MagMaxMerger",
    "OPCMMerger",
    "RunningMean",
    "TallMasksResult",
    "consensus",
    "dare",
    "emr",
    "emr_task_delta",
    "key_predicate",
    "magmax",
    "magnitude_prune",
    "running_mean",
    "task_arithmetic",
    "tall_masks",
    "ties",
    "trim_top_k",
    "wise_ft",
]


# ------------------------------------------------------------------------------------------------ validation


def _check_delta_against(delta: Mapping[str, Tensor], ref: Mapping[str, tuple], index: int) -> None:
    """Raise unless ``delta`` has exactly the keys of ``ref`` (key → shape), the same shapes and finite values."""
    if not isinstance(delta, Mapping):
        raise DeltaError(f"delta of task {index} is a {type(delta).__name__}, expected a dict of tensors.")
    for key in ref:
        if key not in delta:
            raise DeltaError(f"delta of task {index} lacks key {key!r} that the other deltas have.")
    for key in delta:
        if key not in ref:
            raise DeltaError(f"delta of task {index} has key {key!r} that the other deltas lack.")
        value = delta[key]
        if not isinstance(value, Tensor):
            raise DeltaError(f"key {key!r} of task {index} is a {type(value).__name__}, not a tensor.")
        if tuple(value.shape) != ref[key]:
            raise DeltaError(
                f"key {key!r} has shape {tuple(value.shape)} in task {index} but {ref[key]} in the other deltas."
            )
        if value.is_floating_point() or value.is_complex():
            if not all_finite(value):
                raise NonFiniteError(f"delta of task {index} holds NaN or inf at key {key!r}.")
        elif value.dtype == torch.bool:
            raise DeltaError(f"key {key!r} of task {index} is a bool tensor, not a delta.")


def _check_deltas(deltas: Sequence[Mapping[str, Tensor]], what: str = "deltas") -> list[Mapping[str, Tensor]]:
    """Validate a non-empty list of deltas with identical keys and shapes and finite values."""
    if isinstance(deltas, Mapping):
        raise TaskError(f"{what} must be a list of deltas (dicts), got one dict; wrap it in a list.")
    deltas = list(deltas)
    if not deltas:
        raise TaskError(f"{what} is empty: at least one task delta is needed.")
    first = deltas[0]
    if not isinstance(first, Mapping):
        raise DeltaError(f"delta of task 0 is a {type(first).__name__}, expected a dict of tensors.")
    if not first:
        raise DeltaError("delta of task 0 has no keys.")
    for key, value in first.items():
        if not isinstance(value, Tensor):
            raise DeltaError(f"key {key!r} of task 0 is a {type(value).__name__}, not a tensor.")
    ref = {k: tuple(v.shape) for k, v in first.items() if isinstance(v, Tensor)}
    for i, delta in enumerate(deltas):
        _check_delta_against(delta, ref, i)
    return deltas


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _check_fraction(name: str, value: float, low_open: bool = True) -> float:
    """``value`` as a float in (0, 1] (``low_open``) or [0, 1], else :class:`MergeConfigError` naming ``name``."""
    return check_number(value, name, low=0.0, high=1.0, low_open=low_open, error=MergeConfigError)


def _weights(lam: float | Sequence[float], n: int, name: str = "lam") -> list[float]:
    if isinstance(lam, (int, float, str, bytes)) or not hasattr(lam, "__iter__"):  # one value (a str is not a list)
        return [check_number(lam, name, error=MergeConfigError)] * n
    values = list(lam)
    if len(values) != n:
        raise TaskError(f"{name} has {len(values)} values but there are {n} task deltas.")
    return [check_number(v, f"{name} for task {i}", error=MergeConfigError) for i, v in enumerate(values)]


def _finite_result(delta: Delta, blame: str) -> Delta:
    """``delta`` when every entry is finite; else :class:`MergeConfigError` blaming ``blame`` (the option that
    scaled finite inputs out of float range, e.g. ``alpha=1e308``) and naming the first overflowing key."""
    for key, v in delta.items():
        if not all_finite(v):
            raise MergeConfigError(
                f"{blame} scales the finite delta at key {key!r} beyond the float range (inf); use a smaller value."
            )
    return delta


# ------------------------------------------------------------------------------------------------ building blocks


def trim_top_k(tensor: Tensor, k: float) -> Tensor:
    """Keep the top-``k`` fraction of entries of ``tensor`` by magnitude, zero the rest (TIES step 1, pam.md §9).

    Keeps ``max(1, floor(k·numel))`` entries: every entry above the ``keep``-th largest magnitude and, of the
    entries equal to it, the first ones in flat (row-major) order — a stable sort's choice (:func:`_trim_threshold`).
    peft's ``magnitude_based_pruning`` keeps ``floor(density·numel)``: the two agree except on tensors so small that
    ``floor(k·numel) = 0``, which peft zeroes entirely and this keeps one entry of, and on magnitude ties at the
    threshold, where peft keeps ``torch.topk``'s (implementation-defined) pick.
    """
    k = _check_fraction("k", k)
    if not all_finite(tensor):  # a NaN has no magnitude rank: it would be dropped silently
        raise NonFiniteError("trim_top_k: the tensor holds NaN or inf.")
    return _trim_top_k(tensor, k)


def _trim_top_k(tensor: Tensor, k: float) -> Tensor:
    """:func:`trim_top_k` of a tensor already checked finite, with ``k`` already checked (the merges check their
    inputs once, before trimming)."""
    n = tensor.numel()
    keep = max(1, int(k * n))
    if keep >= n:
        return tensor.clone()
    flat = tensor.reshape(-1)
    threshold, drops = _trim_threshold(flat, keep)
    kept = flat.abs() >= threshold
    if drops is not None:
        kept[drops] = False
    return flat.where(kept, 0.0).view_as(tensor)


def _trim_threshold(flat: Tensor, keep: int) -> tuple[float, Tensor | None]:
    """The trim that keeps the ``keep`` largest magnitudes of a flat tensor (``0 < keep < numel``), ties at the
    threshold by position: ``(kth, drops)`` with ``kth`` the ``keep``-th largest magnitude and ``drops`` the positions
    of the entries equal to ``kth`` beyond the first ``keep − #{|τ| > kth}`` of them in flat order (``None``: none),
    so that ``|τ| ≥ kth`` minus ``drops`` is exactly the top ``keep``. Zeros are kept (a dropped 0 is still 0).

    By selection, O(n), no sort: numpy's introselect in place on the magnitudes on the CPU (several times faster
    than ``torch.kthvalue`` there). Ties at the threshold are common on real-size fp32 tensors (a 768×3072
    ``torch.randn`` tensor has a few entries equal to its 20 % threshold); hf_cft up to issue 18 resolved them with
    ``torch.topk``, whose pick among equal magnitudes is implementation-defined and cost ~20 times the selection."""
    n = flat.numel()
    on_numpy = flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)  # no half types in numpy
    if on_numpy and fused.selects(flat.detach().numpy()):
        import numpy as np

        x = flat.detach().numpy()
        ((kth, greater, equal),) = fused.kth_largest_magnitudes(x, [keep])
        if greater + equal <= keep or kth == 0.0:
            return kth, None
        tied = np.flatnonzero(np.abs(x) == kth)
        return kth, torch.from_numpy(tied[keep - greater :])
    if on_numpy:
        import numpy as np

        values = np.abs(flat.detach().numpy())  # numpy's allocation: reused, not page-faulted, from call to call
        values.partition(n - keep)
        kth = float(values[n - keep])
        tied = values[: n - keep].max() == kth  # the rest is ≤ kth: another entry equals it iff its max does
    else:
        kth = float(flat.abs().kthvalue(n - keep + 1).values)
        tied = True
    if not tied or kth == 0.0:
        return kth, None
    flat_abs = flat.abs()
    equal = torch.nonzero(flat_abs == kth).reshape(-1)
    need = keep - int((flat_abs > kth).sum())
    return kth, (equal[need:] if need < equal.numel() else None)


# Element-wise kernels run block by block over the flattened key (:func:`_blocks`): each step's temporaries are one
# block (1 MiB of fp32), reused from block to block, never a fresh, page-faulted full-size allocation (on the
# development machine a fresh full-size temporary costs as much as copying the tensor), and each op still spans
# enough entries to run on both cores and to keep Python's per-op cost small. (Up to issue 18's second pass the blocks
# were 31 K entries, below torch's intra-op grain, so that every op ran on one thread; on an idle machine that made
# the merges 1.2–1.6 times slower, measured in benchmarks/merge_throughput.py.) Every op is element-wise and in the
# order of the whole-tensor formula, so the results are bit for bit those of the formula
# (tests/test_merging_speed.py).
BLOCK = 256 * 1024


_POOL: tuple[int, object] | None = None
#: inputs smaller than this are selected one after the other (handing them to a thread costs more)
PARALLEL_MIN = 1 << 20


def _per_input(fn: Callable, items: Sequence, n: int) -> list:
    """``[fn(x) for x in items]``, on two threads when there are several inputs of at least :data:`PARALLEL_MIN`
    entries and torch may use two threads: the per-input selections (numpy's introselect releases the GIL) are
    single-threaded and independent. One pool per process, made again after a fork (a forked child must not use its
    parent's threads)."""
    global _POOL
    workers = min(len(items), torch.get_num_threads(), 2)
    if workers < 2 or n < PARALLEL_MIN or fused.available():  # fused: the radix selection uses every core itself
        return [fn(x) for x in items]
    if _POOL is None or _POOL[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="hf_cft-select"))
    return list(_POOL[1].map(fn, items))


def _blocks(n: int, size: int = BLOCK) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of ``size`` entries (the last one shorter)."""
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def _blocked(*tensors: Tensor) -> bool:
    """Whether the blocked CPU kernels apply: fp32 tensors on the CPU (a GPU runs the whole-tensor formulas)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _select_into(out: Tensor, cond: Tensor, value: Tensor, scratch: Tensor) -> Tensor:
    """``out`` ← ``torch.where(cond, value, out)`` in place on fp32 blocks, bit for bit: the int32 views are blended
    as ``out ^ ((out ^ value)·cond)`` (``torch.where``'s CPU kernel is not vectorised: ~15 times a multiplication)."""
    ob = out.view(torch.int32)
    x = torch.bitwise_xor(value.view(torch.int32), ob, out=scratch)
    x.mul_(cond)
    return ob.bitwise_xor_(x).view(torch.float32)


def _keep_where(value: Tensor, cond: Tensor, out: Tensor) -> Tensor:
    """``torch.where(cond, value, 0.0)`` on an fp32 block into ``out``, bit for bit (+0.0 where dropped)."""
    return torch.mul(value.view(torch.int32), cond, out=out.view(torch.int32)).view(torch.float32)


def _stacked_block(rows: int) -> int:
    """Block size of a kernel that works on ``rows`` stacked blocks at once (TIES' sign election): the stack stays
    within one block's entries, so its ops (reductions over the inputs included) stay single-threaded too."""
    return max(1024, BLOCK // max(1, rows) // 1024 * 1024)  # whole vector chunks: a reduction's order stays that
    # of the whole tensor (torch sums a column tail apart from the vectorised body)


class _Scratch:
    """Block-sized temporaries, allocated once per kernel call and reused for every block."""

    def __init__(self, n: int, rows: int = 0, size: int = BLOCK):
        m = min(n, size)
        self.f = [torch.empty(m) for _ in range(3)]
        self.b = torch.empty(m, dtype=torch.bool)
        self.i = torch.empty(m, dtype=torch.int32)
        self.stack = torch.empty(rows, m) if rows else None


#: DARE's and DELLA's drop-mask streams: ``"torch"`` reproduces ``torch.bernoulli`` with a CPU generator (MT19937,
#: sequential); ``"counter"`` is a counter-based hash (:class:`_CounterStream`: any draw computable alone, so the
#: same masks on every device and block size, drawn inside the fused kernels).
DARE_RNGS = ("torch", "counter")


def mask_threshold(keep: float) -> int:
    """The 24-bit draw ``u`` keeps an entry with probability ``keep`` (rounded to fp32, as ``full_like`` does) when
    ``u < mask_threshold(keep)``: u·2⁻²⁴ < p ⇔ u < ⌈p·2²⁴⌉ (u an integer)."""
    import numpy as np

    return math.ceil(float(np.float32(keep)) * 2**24)


class _Stream:
    """A stream of 24-bit draws ``u`` (``_draws``), consumed in order, as Bernoulli masks (``u·2⁻²⁴ < p``) or uniforms."""

    def _draws(self, n: int):  # pragma: no cover - every stream defines it
        raise NotImplementedError

    def mask(self, n: int, keep: float) -> Tensor:
        """``n`` Bernoulli(``keep``) draws as a bool tensor (``keep`` rounded to fp32, as ``full_like`` does)."""
        return torch.from_numpy(self._np.less(self._draws(n), mask_threshold(keep)))

    def uniform(self, n: int) -> Tensor:
        """``n`` uniforms ``u·2⁻²⁴`` (fp32, exact), to compare with per-entry probabilities."""
        return torch.from_numpy(self.uniform_numpy(n))

    def uniform_numpy(self, n: int):
        """:meth:`uniform` as a numpy array."""
        u = self._draws(n).astype(self._np.float32)
        u *= 2.0**-24
        return u


class _BernoulliStream(_Stream):
    """The draws of ``torch.bernoulli(p, generator=g)`` for a CPU generator ``g`` seeded with ``seed``, reproduced from
    the same MT19937 stream, block by block and bit for bit (the compiled :func:`~hf_cft.merging.fused.mt19937_low24`
    where numba is installed, numpy's MT19937 else): torch's CPU kernel draws one 32-bit number per entry, keeps its
    low 24 bits ``u`` and returns ``u·2⁻²⁴ < p`` (``p`` as fp32), one entry at a time (~40 times slower than numpy's
    vectorised MT19937 on the development machine, itself ~10 times slower than the compiled one). Draws are consumed
    in order, as torch does."""

    def __init__(self, seed: int):
        import numpy as np

        seed = int(seed) & 0xFFFFFFFF  # torch seeds with the low 32 bits
        if fused.available():
            key, pos = np.empty(624, dtype=np.uint32), 624
            fused.mt19937_seed(seed, key)
        else:
            _, key, pos, *_ = np.random.RandomState(seed).get_state()
        self._key = np.ascontiguousarray(key, dtype=np.uint32)
        self._pos = np.array([pos], dtype=np.int64)
        self._np = np

    def _draws(self, n: int):
        out = self._np.empty(n, dtype=self._np.uint32)
        self.draws_into(out)
        return out

    def draws_into(self, out) -> None:
        """The next ``out.size`` draws into the uint32 array ``out``: by the fused kernel where numba is available
        (:func:`~hf_cft.merging.fused.mt19937_low24`), else by numpy's MT19937 (the same stream, bit for bit)."""
        np = self._np
        if fused.available():
            fused.mt19937_low24(self._key, self._pos, out)
            return
        bits = np.random.MT19937()
        bits.state = {"bit_generator": "MT19937", "state": {"key": self._key, "pos": int(self._pos[0])}}
        # integers over the full uint32 range are the raw 32-bit outputs
        out[:] = np.random.Generator(bits).integers(0, 1 << 32, size=out.size, dtype=np.uint32)
        out &= np.uint32(0xFFFFFF)
        state = bits.state["state"]
        self._key[:] = state["key"]
        self._pos[0] = state["pos"]


#: SplitMix64's increment (the 64-bit golden ratio) and finaliser multipliers (Steele, Lea, Flood 2014)
COUNTER_STEP = 0x9E3779B97F4A7C15
COUNTER_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def counter_draws(key: int, start: int, n: int):
    """Draws ``start … start + n − 1`` of the counter stream ``key`` (uint32 numpy array of 24-bit values): draw ``i``
    is the top 24 bits of SplitMix64's finaliser of ``key + i·φ`` (mod 2⁶⁴)."""
    import numpy as np

    x = np.arange(start, start + n, dtype=np.uint64)
    x *= np.uint64(COUNTER_STEP)
    x += np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    x ^= x >> np.uint64(30)
    x *= np.uint64(COUNTER_MIX[0])
    x ^= x >> np.uint64(27)
    x *= np.uint64(COUNTER_MIX[1])
    x ^= x >> np.uint64(31)
    x >>= np.uint64(40)
    return x.astype(np.uint32)


class _CounterStream(_Stream):
    """The counter-based stream of ``rng="counter"``: draw ``i`` depends only on (seed, i) (:func:`counter_draws`),
    so it is the same on every device, in any block size, and a fused kernel can compute it in place. Draws are
    consumed in order, as from :class:`_BernoulliStream` (each input's mask takes the next ``numel`` draws)."""

    def __init__(self, seed: int):
        import numpy as np

        self.key = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.pos = 0
        self._np = np

    def _draws(self, n: int):
        start = self.skip(n)
        return counter_draws(self.key, start, n)

    def skip(self, n: int) -> int:
        """Consume ``n`` draws without computing them (a fused kernel computes them); returns the first one's index."""
        start = self.pos
        self.pos += int(n)
        return start


def _stream(rng: str, seed: int) -> _Stream:
    """The CPU stream of drop masks of ``rng`` (:data:`DARE_RNGS`) seeded with ``seed``."""
    return _CounterStream(seed) if rng == "counter" else _BernoulliStream(seed)


TRIM_SCOPES = ("tensor", "model")
DISJOINT_MERGES = ("mean", "sum", "max")


def _elect_disjoint(stacked: Tensor, merge: str = "mean", zero_sign: float | None = None) -> Tensor:
    """TIES steps 2–3 on deltas stacked on dim 0: σ = sign(Σ_t τ_t), then the disjoint merge of the non-zero entries
    whose sign equals σ: their ``"mean"`` (TIES), ``"sum"`` or ``σ·max|·|`` (``"max"``; FusionBench's variants).

    Where Σ_t τ_t = 0 exactly: with ``zero_sign=None`` σ = 0 and the result is 0 (hf_cft's per-tensor rule; peft
    elects + there); with a number, σ takes that value (FusionBench: the model-wide majority sign) and, where that
    is 0 too, the negative entries are kept, as FusionBench's ``where(σ > 0, τ > 0, τ < 0)`` does."""
    elected = torch.sign(stacked.sum(dim=0))
    if zero_sign is None:
        agree = (torch.sign(stacked) == elected) & (elected != 0)
    else:
        elected = torch.where(elected == 0, float(zero_sign), elected)
        agree = torch.where(elected > 0, stacked > 0, stacked < 0)
    selected = stacked * agree
    if merge == "mean":
        return selected.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    if merge == "sum":
        return selected.sum(dim=0)
    return selected.abs().amax(dim=0) * elected


def _elect_blocked(tensors: Sequence[Tensor], merge: str = "mean") -> Tensor:
    """:func:`_elect_disjoint` of the stacked tensors, block by block on fp32 CPU tensors (the election is per entry,
    so the result is the same; the stack and every temporary stay one block)."""
    if not _blocked(*tensors):
        return _elect_disjoint(torch.stack(list(tensors)), merge)
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    size = _stacked_block(len(flats))
    out = torch.empty(n)
    stack = torch.empty(len(flats), min(n, size))
    for s in _blocks(n, size):
        block = stack[:, : s.stop - s.start]
        for row, f in zip(block, flats):
            row.copy_(f[s])
        out[s] = _elect_disjoint(block, merge)
    return out.view(tensors[0].shape)


def model_trim_threshold(delta: Mapping[str, Tensor], k: float) -> float:
    """The TIES paper's / FusionBench's trim over the whole task vector: the magnitude that the top-``k`` fraction
    must reach. With ``d`` the number of entries of all keys together, it is the ``(d − ⌊k·d⌋)``-th smallest
    ``|τ|`` (``kthvalue``), and the trim keeps every entry with ``|τ| ≥`` it, as FusionBench's
    ``topk_values_mask`` does (so ``⌊k·d⌋ + 1`` entries without magnitude ties; at ``k = 1`` every entry, where
    the reference's ``kthvalue(0)`` fails)."""
    flat = torch.cat([_f32(v).reshape(-1).abs() for v in delta.values()])
    rank = flat.numel() - int(flat.numel() * k)
    if rank < 1:
        return 0.0
    return float(flat.kthvalue(rank).values)


def _trimmed(deltas: Sequence[Mapping[str, Tensor]], k: float, trim_scope: str) -> list[dict[str, Tensor]]:
    """Each delta trimmed to its top-``k`` magnitudes per tensor (:func:`trim_top_k`, peft) or over the whole task
    vector (:func:`model_trim_threshold`, TIES paper / FusionBench)."""
    if trim_scope == "tensor":
        return [{key: _trim_top_k(_f32(v), k) for key, v in d.items()} for d in deltas]
    out = []
    for d in deltas:
        threshold = model_trim_threshold(d, k)
        out.append({key: _f32(v) * (_f32(v).abs() >= threshold) for key, v in d.items()})
    return out


def _check_ties_options(k: float, trim_scope: str, merge: str) -> float:
    if trim_scope not in TRIM_SCOPES:
        raise MergeConfigError(f"trim_scope must be one of {TRIM_SCOPES}, got {trim_scope!r}.")
    if merge not in DISJOINT_MERGES:
        raise MergeConfigError(f"merge must be one of {DISJOINT_MERGES}, got {merge!r}.")
    return _check_fraction("k", k)


def _ties_unscaled(deltas: Sequence[Mapping[str, Tensor]], k: float, trim_scope: str, merge: str) -> Delta:
    """TIES steps 1–3 without λ (the deltas already checked)."""
    trimmed = _trimmed(deltas, k, trim_scope)
    keys = list(deltas[0])
    zero_sign = None
    if trim_scope == "model":  # FusionBench: σ = 0 entries take the majority sign of the whole elected vector
        votes = sum(float(torch.sign(sum(t[key] for t in trimmed)).sum(dtype=torch.float64)) for key in keys)
        zero_sign = float(math.copysign(1.0, votes)) if votes != 0 else 0.0
    return {key: _elect_disjoint(torch.stack([t[key] for t in trimmed]), merge, zero_sign) for key in keys}


def _key_seed(seed: int, key: str) -> int:
    """A per-key seed, so that DARE's mask for one key does not depend on the other keys or their order (deltas
    can be merged tensor by tensor)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1)


def _mask_source(seed: int, key: str, device, rng: str = "torch") -> torch.Generator | _Stream:
    """The source of a key's drop masks: one stream seeded from ``(seed, key)``, tasks drawn in order; on the CPU the
    numpy replica of the CPU generator's stream (:class:`_BernoulliStream`, same bits); with ``rng="counter"`` the
    counter stream on every device (:class:`_CounterStream`)."""
    if rng == "counter" or torch.device(device).type == "cpu":
        return _stream(rng, _key_seed(seed, key))
    gen = torch.Generator(device=device)
    gen.manual_seed(_key_seed(seed, key))
    return gen


def _draw_mask(source, like: Tensor, keep: float) -> Tensor:
    """A Bernoulli(``keep``) mask shaped like ``like`` (bool): ``torch.bernoulli(full_like(like, keep))``'s draws."""
    if isinstance(source, _Stream):
        return source.mask(like.numel(), keep).view(like.shape).to(like.device)
    return torch.bernoulli(torch.full_like(like, keep), generator=source).bool()


def _dare_drop(
    tensors: list[Tensor], rho: float | Sequence[float], seed: int, key: str, rng: str = "torch"
) -> list[Tensor]:
    """τ̃ = m ⊙ τ / (1 − ρ), m ~ Bernoulli(1 − ρ), one generator per key seeded from (seed, key), tasks in order;
    ``rho``: one drop rate for all tensors or one each (a tensor with ρ = 0 is kept whole and draws no mask)."""
    rhos = [float(rho)] * len(tensors) if isinstance(rho, (int, float)) else [float(r) for r in rho]
    if all(r == 0.0 for r in rhos):
        return tensors
    source = _mask_source(seed, key, tensors[0].device, rng)
    out = []
    for t, r in zip(tensors, rhos):
        if r == 0.0:
            out.append(t)
            continue
        keep = 1.0 - r
        out.append(t * _draw_mask(source, t, keep) / keep)
    return out


# ------------------------------------------------------------------------------------------------ one-shot methods


def task_arithmetic(deltas: Sequence[Mapping[str, Tensor]], lam: float | Sequence[float] = 0.3) -> Delta:
    """Task arithmetic (arXiv:2212.04089; pam.md §9): τ_m = λ·Σ_t τ_t.

    ``lam`` is one λ for all tasks (default 0.3, lib; tune on validation) or one per task, which is peft's
    ``task_arithmetic(task_tensors, weights)`` with ``weights = lam``.
    """
    deltas = _check_deltas(deltas)
    w = _weights(lam, len(deltas))
    return _finite_result(
        {key: sum(wi * _f32(d[key]) for wi, d in zip(w, deltas)) for key in deltas[0]}, f"lam={lam!r}"
    )


def running_mean(deltas: Sequence[Mapping[str, Tensor]]) -> Delta:
    """Uniform soup (pam.md §9): τ_m = (1/T)·Σ_t τ_t, i.e. θ̄_T of the running mean θ̄_t = ((t−1)/t)θ̄_{t−1} + θ_t/t."""
    deltas = _check_deltas(deltas)
    n = len(deltas)
    return {key: sum(_f32(d[key]) for d in deltas) / n for key in deltas[0]}


def wise_ft(delta: Mapping[str, Tensor], alpha: float = 0.5) -> Delta:
    """WiSE-FT (arXiv:2109.01903; pam.md §9): θ = (1−α)θ0 + αθ_ft, so the merged delta is α·τ (α = 0.5, lib)."""
    (delta,) = _check_deltas([delta])
    alpha = check_number(alpha, "alpha", error=MergeConfigError)
    return _finite_result({key: alpha * _f32(v) for key, v in delta.items()}, f"alpha={alpha!r}")


def magnitude_prune(
    deltas: Sequence[Mapping[str, Tensor]], k: float = 0.2, lam: float | Sequence[float] = 0.3
) -> Delta:
    """Task arithmetic on trimmed deltas: τ_m = Σ_t λ_t·trim_k(τ_t) (peft's ``magnitude_prune`` with
    ``density = k``, ``weights = lam``). The trim is TIES's step 1, per task and per tensor (:func:`trim_top_k`)."""
    deltas = _check_deltas(deltas)
    k = _check_fraction("k", k)
    w = _weights(lam, len(deltas))
    return {key: sum(wi * _trim_top_k(_f32(d[key]), k) for wi, d in zip(w, deltas)) for key in deltas[0]}


def ties(
    deltas: Sequence[Mapping[str, Tensor]],
    k: float = 0.2,
    lam: float = 1.0,
    trim_scope: str = "tensor",
    merge: str = "mean",
) -> Delta:
    """TIES-merging (arXiv:2306.01708; pam.md §9), key by key:

    1. τ̃_t = the top-``k`` fraction of τ_t's entries by magnitude;
    2. σ = sign(Σ_t τ̃_t);
    3. τ_m = the disjoint merge of τ̃_t over the tasks whose entry is non-zero with sign σ (0 where none);

    returns λ·τ_m (k = 0.2, λ = 1; lib).

    Args:
        trim_scope: ``"tensor"`` (default): step 1 per tensor, keeping ``max(1, ⌊k·n⌋)`` entries
            (:func:`trim_top_k`), as peft; equals peft's ``ties(weights=[λ]*T, density=k)`` except where
            Σ_t τ̃_t = 0 exactly (peft elects +, here σ = 0 gives 0) and on tiny tensors. ``"model"``: the TIES
            paper's and FusionBench's trim over the whole task vector (:func:`model_trim_threshold`), with
            FusionBench's sign rule (σ = 0 entries take the majority sign of the elected vector). The default
            stays per tensor: it streams key by key, every tensor keeps its top entries (a model-wide trim can
            empty small-magnitude tensors such as LayerNorms), and it is what peft users get.
        merge: the disjoint merge of step 3: ``"mean"`` (default, the TIES paper), ``"sum"`` or ``"max"``
            (σ·max|τ̃|), FusionBench's ``merge_func`` variants (its configs default to ``"sum"``). The default
            stays the paper's mean.
    """
    deltas = _check_deltas(deltas)
    k = _check_ties_options(k, trim_scope, merge)
    lam = _weights(lam, 1)[0]
    return _finite_result(
        {key: lam * v for key, v in _ties_unscaled(deltas, k, trim_scope, merge).items()}, f"lam={lam!r}"
    )


def dare(
    deltas: Sequence[Mapping[str, Tensor]],
    rho: float = 0.9,
    seed: int = 0,
    then: str = "ta",
    lam: float | None = None,
    rng: str = "torch",
) -> Delta:
    """DARE (arXiv:2311.03099; pam.md §9): τ̃_t = m_t ⊙ τ_t/(1−ρ), m_t ~ Bernoulli(1−ρ), then task arithmetic or TIES.

    Args:
        rho: drop rate ρ ∈ [0, 1) (0.9, lib). peft's ``density`` is 1 − ρ.
        seed: the masks are drawn from a ``torch.Generator`` (on the deltas' device) seeded per key from
            ``(seed, key)``, tasks in list order, so the result is reproducible and independent of the other keys
            (CPU and CUDA generators draw different masks for the same seed).
        then: ``"ta"`` → λ·Σ_t τ̃_t (peft ``dare_linear``); ``"ties"`` → λ·(elect sign + disjoint mean of τ̃_t)
            (peft ``dare_ties``): DARE's random drop replaces TIES's magnitude trim, as in the DARE paper.
        lam: λ; defaults to 0.3 for ``"ta"`` and 1.0 for ``"ties"`` (the defaults of those methods).
        rng: the masks' stream: ``"torch"`` (default) draws what ``torch.bernoulli`` draws with the seeded generator;
            ``"counter"`` a counter-based hash (:class:`_CounterStream`), other masks of the same distribution, the
            same on every device, and on the CPU several times faster in a fused kernel (``hf-cft[fast]``).
    """
    deltas = _check_deltas(deltas)
    rho = check_number(rho, "rho (the drop rate)", low=0.0, high=1.0, high_open=True, error=MergeConfigError)
    check_choice(then, "then", ("ta", "ties"), error=MergeConfigError)
    check_choice(rng, "rng", DARE_RNGS, error=MergeConfigError)
    lam = _weights((0.3 if then == "ta" else 1.0) if lam is None else lam, 1)[0]
    out = {}
    for key in deltas[0]:
        dropped = _dare_drop([_f32(d[key]) for d in deltas], rho, seed, key, rng)
        if then == "ta":
            out[key] = lam * sum(dropped)
        else:
            out[key] = lam * _elect_disjoint(torch.stack(dropped))
    return _finite_result(out, f"lam={lam!r} (with the 1/(1-rho) rescale)")


MAGMAX_TIE_BREAKS = ("later", "earlier")


def _check_tie_break(tie_break: str) -> str:
    if tie_break not in MAGMAX_TIE_BREAKS:
        raise MergeConfigError(f"tie_break must be one of {MAGMAX_TIE_BREAKS}, got {tie_break!r}.")
    return tie_break


def _magmax_step(best: Tensor, value: Tensor, tie_break: str) -> Tensor:
    """One fold of MagMax: ``value`` replaces ``best`` where its magnitude is larger (``"earlier"``) or larger or
    equal (``"later"``: the official ``merge_max_abs``'s ``>=``). A new tensor; ``best`` is not modified."""
    if _blocked(best, value) and best.shape == value.shape:
        return _magmax_into(best.reshape(-1).clone(), value, tie_break).view(best.shape)
    wins = value.abs() >= best.abs() if tie_break == "later" else value.abs() > best.abs()
    return torch.where(wins, value, best)


def _magmax_into(best: Tensor, value: Tensor, tie_break: str, weight: float = 1.0, scratch=None) -> Tensor:
    """:func:`_magmax_step` of ``best`` (a contiguous fp32 tensor of the caller's, updated in place) and
    ``weight·value``, block by block (the same bits as ``torch.where(|w·v| ≥ |best|, w·v, best)``)."""
    b, v = best.view(-1), value.reshape(-1)
    sc = scratch or _Scratch(b.numel())
    compare = torch.ge if tie_break == "later" else torch.gt
    for s in _blocks(b.numel()):
        m = s.stop - s.start
        x = v[s] if weight == 1.0 else torch.mul(v[s], weight, out=sc.f[0][:m])
        wins = compare(torch.abs(x, out=sc.f[1][:m]), torch.abs(b[s], out=sc.f[2][:m]), out=sc.b[:m])
        _select_into(b[s], wins, x, sc.i[:m])
    return best


def magmax(deltas: Sequence[Mapping[str, Tensor]], lam: float = 0.5, tie_break: str = "later") -> Delta:
    """MagMax (danielm1405/magmax; pam.md §9): τ_MM[j] = τ_{t*}[j], t* = argmax_t |τ_t[j]|; returns λ·τ_MM
    (λ = 0.5, the repository default).

    ``tie_break``: which task wins equal magnitudes: ``"later"`` (default since issue 17: the official code folds
    the tasks in order with ``>=``, and so does FusionBench) or ``"earlier"`` (hf_cft before). The default follows
    the reference: exact magnitude ties are rare in trained deltas, so the only effect of the choice is agreeing
    with it (e.g. on τ and −τ).

    MagMax assumes *sequential* fine-tuning: θ_t starts from θ_{t−1} and τ_t = θ_t − θ0 is cumulative. On
    independently fine-tuned deltas it still runs, but it is then not the method of the paper.
    """
    deltas = _check_deltas(deltas)
    lam = _weights(lam, 1)[0]
    tie_break = _check_tie_break(tie_break)
    out = {}
    for key in deltas[0]:
        best = _f32(deltas[0][key])
        if len(deltas) > 1 and _blocked(best):
            best = best.reshape(-1).clone()
            scratch = _Scratch(best.numel())
            for d in deltas[1:]:
                _magmax_into(best, _f32(d[key]), tie_break, scratch=scratch)
            out[key] = best.mul_(lam).view(deltas[0][key].shape)
            continue
        for d in deltas[1:]:
            best = _magmax_step(best, _f32(d[key]), tie_break)
        out[key] = lam * best
    return _finite_result(out, f"lam={lam!r}")


EMR_RESCALERS = ("mean", "global_sum")
EMR_ZERO_SIGNS = (-1, 0)


@dataclass
class EMRResult:
    """EMR-merging output: the unified delta τ_uni, one bit-packed mask M_t per task and one scalar rescaler λ_t.

    The task-t model is θ0 + λ_t·M_t ⊙ τ_uni (:meth:`task_delta`, or :meth:`iter_task_delta` one key at a time).
    It needs the task id at inference, so EMR is a task-aware reference, not comparable with PAM (pam.md §9). The
    masks stay packed (1 bit per entry); :attr:`masks` unpacks all of them (small models, tests).
    """

    unified: Delta
    packed_masks: list[dict[str, PackedMask]]
    rescalers: list[float]

    @property
    def num_tasks(self) -> int:
        return len(self.packed_masks)

    @property
    def masks(self) -> list[dict[str, Tensor]]:
        """Every task's boolean masks, unpacked (T × the model's entries in bytes)."""
        return [{k: pm.unpack() for k, pm in per.items()} for per in self.packed_masks]

    def _index(self, i: int) -> int:
        if not -self.num_tasks <= i < self.num_tasks:
            raise TaskError(f"task index {i} is out of range: EMR merged {self.num_tasks} task(s).")
        return i % self.num_tasks

    def iter_task_delta(self, i: int) -> Iterator[tuple[str, Tensor]]:
        """``(key, λ_i·M_i ⊙ τ_uni)`` one key at a time (one mask unpacked at a time)."""
        from hf_cft.merging.condu import _decoupled

        i = self._index(i)
        for key, u in self.unified.items():
            yield key, _decoupled(u, self.packed_masks[i][key].unpack(u.device), self.rescalers[i])

    def task_delta(self, i: int) -> Delta:
        """λ_i·M_i ⊙ τ_uni, the delta of task ``i`` (0-based)."""
        return dict(self.iter_task_delta(i))


def _check_lazy_deltas(deltas: Sequence[Mapping[str, Tensor]]) -> dict[str, tuple]:
    """Key → shape shared by every delta; a :class:`~hf_cft.merging.LazyDelta` is checked from its header (its
    values are checked for NaN/inf slice by slice as they are read), a dict in full (:func:`_check_delta_against`)."""
    from hf_cft.merging.deltas import LazyDelta

    if isinstance(deltas, Mapping):
        raise TaskError("deltas must be a list of deltas (dicts), got one dict; wrap it in a list.")
    if not deltas:
        raise TaskError("deltas is empty: at least one task delta is needed.")
    ref = None
    for i, d in enumerate(deltas):
        if isinstance(d, LazyDelta):
            shapes = d.shapes()
            if ref is None:
                ref = shapes
            for key in set(ref) ^ set(shapes):
                where = "lacks" if key in ref else "has"
                raise DeltaError(
                    f"delta of task {i} {where} key {key!r} that the other deltas {'have' if key in ref else 'lack'}."
                )
            for key, shape in shapes.items():
                if shape != ref[key]:
                    raise DeltaError(f"key {key!r} has shape {shape} in task {i} but {ref[key]} in the other deltas.")
        elif ref is None:
            (first,) = _check_deltas([d])
            ref = {k: tuple(v.shape) for k, v in first.items()}
        else:
            _check_delta_against(d, ref, i)
    return ref


def emr(deltas: Sequence[Mapping[str, Tensor]], rescaler: str = "mean", zero_sign: int = -1) -> EMRResult:
    """EMR-merging (arXiv:2405.17461; pam.md §9), key by key with ConDU's unify rule (:mod:`hf_cft.merging.condu`):

    * σ = +1 where Σ_t τ_t > 0, −1 where < 0, and ``zero_sign`` where the sum is 0 exactly; ε_j = max |τ_{t,j}|
      over the tasks whose sign agrees with σ_j; τ_uni = σ ⊙ ε; M_t = 1[τ_t ⊙ σ > 0];
    * λ_t = Σ_p mean|τ_{t,p}| / Σ_p mean|M_{t,p} ⊙ τ_uni,p| over the tensors p (``rescaler="mean"``) or
      Σ|τ_t| / Σ|M_t ⊙ τ_uni| over all entries (``"global_sum"``, the EMR paper's formula). Where the denominator
      is 0 (empty mask, or an all-zero delta) the task delta is 0 whatever λ_t is; λ_t is then 0 (the reference
      code gives NaN/inf).

    Defaults (changed in issue 17 from ``"global_sum"`` and σ = 0): ``rescaler="mean"`` and ``zero_sign=-1``, as
    the official EMR code and FusionBench, whose numbers the baseline is compared with; EMR then equals ConDU's
    one-shot :func:`~hf_cft.merging.unify` exactly.

    Memory: a :class:`~hf_cft.merging.LazyDelta` in ``deltas`` (e.g. ``LazyDelta.from_file``) is read slice by
    slice when its key is unified, never whole, and masks are kept bit-packed, so peak memory is τ_uni plus T
    packed masks plus a few slices whatever T (plain dicts are held by the caller anyway).
    """
    from hf_cft.merging.condu import UNIFY_SLICE, _rescalers, _unify_key
    from hf_cft.merging.deltas import LazyDelta
    from hf_cft.utils import release_freed_memory

    if rescaler not in EMR_RESCALERS:
        raise MergeConfigError(f"rescaler must be one of {EMR_RESCALERS}, got {rescaler!r}.")
    if zero_sign not in EMR_ZERO_SIGNS or isinstance(zero_sign, bool):
        raise MergeConfigError(f"zero_sign must be one of {EMR_ZERO_SIGNS}, got {zero_sign!r}.")
    shapes = _check_lazy_deltas(deltas)
    n = len(deltas)
    unified: Delta = {}
    packed: list[dict[str, PackedMask]] = [{} for _ in range(n)]
    num, den = [0.0] * n, [0.0] * n
    for key, shape in sorted(shapes.items()):  # one order whatever the source (a file lists its keys sorted)
        flats = [None if isinstance(d, LazyDelta) else _f32(d[key]).reshape(-1) for d in deltas]
        checked: set[tuple[int, int]] = set()  # each slice is read twice (σ, then M and u): NaN/inf checked once

        def get(i, lo, hi, key=key, flats=flats, checked=checked):
            if flats[i] is not None:
                return flats[i][lo:hi]
            first = (i, lo) not in checked
            checked.add((i, lo))
            return deltas[i].read_flat(key, lo, hi, check=first)

        u, pm, a, b = _unify_key(get, n, shape, rescaler, zero_sign=float(zero_sign))
        del flats, get
        if math.prod(shape) >= UNIFY_SLICE:  # a large key's freed slices: trimmed now, as ConDU's session does
            release_freed_memory()
        unified[key] = u
        for t in range(n):
            packed[t][key] = pm[t]
            num[t] += a[t]
            den[t] += b[t]
    release_freed_memory()
    rescalers, _ = _rescalers(num, den)
    return EMRResult(unified=unified, packed_masks=packed, rescalers=rescalers)


def emr_task_delta(result: EMRResult, i: int) -> Delta:
    """The EMR delta of task ``i``: λ_i·M_i ⊙ τ_uni (same as ``result.task_delta(i)``)."""
    return result.task_delta(i)


@dataclass
class TallMasksResult:
    """TALL masks output: τ_MTL = Σ_t τ_t and one boolean mask m_t per task; task-t model θ0 + m_t ⊙ τ_MTL."""

    mtl: Delta
    masks: list[dict[str, Tensor]]

    @property
    def num_tasks(self) -> int:
        return len(self.masks)

    def task_delta(self, i: int) -> Delta:
        """m_i ⊙ τ_MTL, the delta of task ``i`` (0-based; needs the task id at inference)."""
        if not -self.num_tasks <= i < self.num_tasks:
            raise TaskError(f"task index {i} is out of range: TALL masks were built for {self.num_tasks} task(s).")
        return {key: self.masks[i][key].to(v.dtype) * v for key, v in self.mtl.items()}


def tall_masks(deltas: Sequence[Mapping[str, Tensor]], lambdas: float | Sequence[float] = 0.4) -> TallMasksResult:
    """TALL masks (arXiv:2405.07813; pam.md §9): τ_MTL = Σ_t τ_t, m_t = 1[|τ_t| > λ_t·|τ_MTL − τ_t|].

    ``lambdas`` is one λ_t for all tasks or one per task; the paper picks each in {0.2, …, 0.6} on validation
    data, 0.4 (the middle of that grid) is the library default.
    """
    deltas = _check_deltas(deltas)
    lams = _weights(lambdas, len(deltas), name="lambdas")
    mtl: Delta = {}
    masks: list[dict[str, Tensor]] = [{} for _ in deltas]
    for key in deltas[0]:
        stacked = torch.stack([_f32(d[key]) for d in deltas])
        total = stacked.sum(dim=0)
        mtl[key] = total
        for t, lam_t in enumerate(lams):
            masks[t][key] = stacked[t].abs() > lam_t * (total - stacked[t]).abs()
    return TallMasksResult(mtl=mtl, masks=masks)


def consensus(
    deltas: Sequence[Mapping[str, Tensor]],
    lambdas: float | Sequence[float] = 0.4,
    k: int = 2,
    lam: float = 0.3,
) -> Delta:
    """Consensus merging (arXiv:2405.07813; pam.md §9), task-agnostic: keep the entries of τ_MTL that at least
    ``k`` TALL masks select (k = 2) and return λ·(mask ⊙ τ_MTL) (λ = 0.3, lib: the task-arithmetic default).

    Raises :class:`~hf_cft.errors.TaskError` if ``k`` exceeds the number of tasks (every entry would be dropped).
    """
    deltas = _check_deltas(deltas)
    k = check_int(k, "k", low=0, error=MergeConfigError)
    if k > len(deltas):
        raise TaskError(
            f"consensus k={k} exceeds the number of tasks ({len(deltas)}): no entry could be kept; lower k."
        )
    lam = _weights(lam, 1)[0]
    tall = tall_masks(deltas, lambdas)
    out = {}
    for key, total in tall.mtl.items():
        votes = torch.stack([m[key] for m in tall.masks]).sum(dim=0)
        out[key] = lam * (votes >= k).to(total.dtype) * total
    return out


# ------------------------------------------------------------------------------------------------ continual forms


class ContinualMerger:
    """Base of the continual (stream) forms: ``add(delta)`` after each task returns the merged delta to deploy.

    Subclasses implement ``_add(delta_fp32)`` and ``_merged()``, and list their tensor state in ``_state_names``.
    Every added delta must have the keys and shapes of the first one (else :class:`DeltaError`), and finite values
    (else :class:`NonFiniteError` naming the key and the task index, 0-based).
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.num_tasks = 0
        self._shapes: dict[str, tuple] | None = None

    def add(self, delta: Mapping[str, Tensor]) -> Delta:
        """Fold task ``self.num_tasks``'s delta into the state and return the merged delta (fresh tensors)."""
        if self._shapes is None:
            (delta,) = _check_deltas([delta])
            self._shapes = {k: tuple(v.shape) for k, v in delta.items()}
        else:
            _check_delta_against(delta, self._shapes, self.num_tasks)
        self._add({k: _f32(v) for k, v in delta.items()})
        self.num_tasks += 1
        return self.merged

    @property
    def merged(self) -> Delta:
        """The merged delta after the tasks added so far."""
        if self.num_tasks == 0:
            raise TaskError(f"{type(self).__name__} has no task yet: call add(delta) first.")
        return {k: v.clone() for k, v in self._merged().items()}

    def _add(self, delta: Delta) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _merged(self) -> Delta:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- resume support: a flat dict of tensors (safetensors-friendly)

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume: ``"<state>.<key>"`` tensors plus ``"meta.num_tasks"`` (and extras)."""
        out = {"meta.num_tasks": torch.tensor(self.num_tasks, dtype=torch.int64)}
        for name in self._state_names:
            for key, value in getattr(self, name).items():
                out[f"{name}.{key}"] = value.detach().clone()
        out.update(self._extra_state())
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a state written by :meth:`state_dict`."""
        if "meta.num_tasks" not in state:
            raise DeltaError(f"{type(self).__name__} state lacks 'meta.num_tasks'.")
        num_tasks = int(state["meta.num_tasks"])
        for name in self._state_names:
            prefix = f"{name}."
            values = {k[len(prefix) :]: _f32(v).clone() for k, v in state.items() if k.startswith(prefix)}
            if num_tasks > 0 and not values:
                raise DeltaError(f"{type(self).__name__} state lacks the {name!r} tensors.")
            for key, value in values.items():
                if not bool(torch.isfinite(value).all()):
                    raise NonFiniteError(f"{type(self).__name__} state holds NaN or inf at {name}.{key}.")
            setattr(self, name, values)
        self._load_extra_state(state)
        self.num_tasks = num_tasks
        first = self._state_names[0] if self._state_names else None
        self._shapes = {k: tuple(v.shape) for k, v in getattr(self, first).items()} if num_tasks and first else None

    def _extra_state(self) -> dict[str, Tensor]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        return None


class ContinualTaskArithmetic(ContinualMerger):
    """Task arithmetic, continual form (pam.md §9): θ ← θ + λτ_t after each task, i.e. merged = λ·Σ_{i≤t} τ_i."""

    _state_names = ("total",)

    def __init__(self, lam: float = 0.3) -> None:
        super().__init__()
        self.lam = _weights(lam, 1)[0]
        self.total: Delta = {}

    def _add(self, delta: Delta) -> None:
        for key, value in delta.items():
            self.total[key] = self.total[key] + value if key in self.total else value.clone()

    def _merged(self) -> Delta:
        return {k: self.lam * v for k, v in self.total.items()}


class RunningMean(ContinualMerger):
    """Running mean / uniform soup (pam.md §9): θ̄_t = ((t−1)/t)·θ̄_{t−1} + (1/t)·θ_t, on deltas."""

    _state_names = ("mean",)

    def __init__(self) -> None:
        super().__init__()
        self.mean: Delta = {}

    def _add(self, delta: Delta) -> None:
        t = self.num_tasks + 1
        for key, value in delta.items():
            self.mean[key] = self.mean[key] * ((t - 1) / t) + value / t if key in self.mean else value.clone()

    def _merged(self) -> Delta:
        return self.mean


class ContinualTIES(ContinualMerger):
    """TIES, continual form (pam.md §9): the state m_t is the *unscaled* TIES merge (steps 1–3) of the pair
    (m_{t−1}, τ_t), with m_1 = τ_1 trimmed, and the deployed delta is λ·m_t.

    λ is applied once, on output: for the same delta δ every task, m_t = trim(δ) and the result equals the one-shot
    :func:`ties` of t copies at every λ (issue 17 bug 2: λ used to multiply the already scaled state, giving
    δ, 0.5δ, 0.375δ at λ = 0.5, and task 1 was never trimmed). ``k``, ``trim_scope`` and ``merge`` as in
    :func:`ties`.
    """

    _state_names = ("current",)

    def __init__(self, k: float = 0.2, lam: float = 1.0, trim_scope: str = "tensor", merge: str = "mean") -> None:
        super().__init__()
        self.k = _check_ties_options(k, trim_scope, merge)
        self.trim_scope, self.merge = trim_scope, merge
        self.lam = _weights(lam, 1)[0]
        self.current: Delta = {}

    def _add(self, delta: Delta) -> None:
        pair = [self.current, delta] if self.current else [delta]
        self.current = _ties_unscaled(pair, self.k, self.trim_scope, self.merge)

    def _merged(self) -> Delta:
        return {k: self.lam * v for k, v in self.current.items()}

    def _extra_state(self) -> dict[str, Tensor]:
        # marks a state written since the λ fix (its "current" is unscaled); older states held λ·m_t
        return {"meta.unscaled": torch.tensor(1, dtype=torch.int64)}

    def _load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        if int(state["meta.num_tasks"]) > 0 and "meta.unscaled" not in state:  # load_state_dict checked it is there
            raise DeltaError(
                "ContinualTIES state lacks 'meta.unscaled': it was written before the λ fix (its merged delta "
                "holds λ compounded over the tasks); rebuild it by adding the task deltas again."
            )


class MagMaxMerger(ContinualMerger):
    """MagMax, continual form (pam.md §9): keeps τ_MM[j] = the largest-magnitude value seen so far at entry j (on
    ties the later task, as the official code; ``tie_break="earlier"`` for the first) and returns λ·τ_MM (λ = 0.5).

    Feed it *cumulative* deltas τ_t = θ_t − θ0 of sequential fine-tuning (θ_t starts from θ_{t−1}), as MagMax
    assumes; with independent deltas it runs but is not the published method.
    """

    _state_names = ("best",)

    def __init__(self, lam: float = 0.5, tie_break: str = "later") -> None:
        super().__init__()
        self.lam = _weights(lam, 1)[0]
        self.tie_break = _check_tie_break(tie_break)
        self.best: Delta = {}

    def _add(self, delta: Delta) -> None:
        for key, value in delta.items():
            if key not in self.best:
                self.best[key] = value.clone()
            else:
                self.best[key] = _magmax_step(self.best[key], value, self.tie_break)

    def _merged(self) -> Delta:
        return {k: self.lam * v for k, v in self.best.items()}


def default_opcm_linear_key(key: str, tensor: Tensor) -> bool:
    """Which deltas OPCM projects: 2-D weights that are not embeddings (``nn.Linear`` weights in CLIP/SigLIP)."""
    return tensor.ndim == 2 and key.endswith("weight") and "embed" not in key.lower()


def key_predicate(
    keys: Callable[[str, Tensor], bool] | Iterable[str] | None,
) -> Callable[[str, Tensor], bool]:
    """Which keys a matrix method (OPCM, TSV-M, Iso-C, ...) treats as matrices: ``None`` →
    :func:`default_opcm_linear_key` (2-D weights that are not embeddings), a predicate ``(key, tensor) -> bool``
    as given, or a collection of keys (those of them that are 2-D)."""
    if keys is None:
        return default_opcm_linear_key
    if callable(keys):
        return keys
    if isinstance(keys, str):
        raise MergeConfigError(f"matrix keys must be a predicate or a collection of keys, got the string {keys!r}.")
    chosen = set(keys)
    return lambda key, tensor: key in chosen and tensor.ndim == 2


class OPCMMerger(ContinualMerger):
    """OPCM, orthogonal-projection continual merging (arXiv:2501.09522; pam.md §9).

    For each linear weight, with U S Vᵀ the *full* SVD of the previous merged delta S_{t−1}: P = Uᵀ τ_t V; zero P's
    diagonal and its leading r_α × r_α block, r_α = the number of leading singular values whose cumulative share of
    Σ S does not exceed α (α = 0.5); τ′_t = U P Vᵀ. Other parameters keep τ′_t = τ_t. The running sum
    S_t = S_{t−1} + τ′_t is deployed as S_t · mean_i ‖τ_i‖ / ‖S_t‖, norms over all parameters. (The SVD of the
    deployed, rescaled delta has the same U, V and r_α, so S_{t−1} is used directly.)

    Args:
        alpha: α ∈ [0, 1].
        linear_keys: which keys are linear weights: a predicate ``(key, tensor) -> bool`` or a set of keys
            (default :func:`default_opcm_linear_key`).
        rank_rule: how r_α is read off the cumulative shares c_i = Σ_{j≤i} S_j / Σ S: ``"at_most"`` (default) the
            number of c_i ≤ α; ``"fusion_bench"`` FusionBench's ``argmax(c > α)``, the index of the first c_i > α
            and 0 when there is none. They differ only when no share exceeds α, i.e. at α = 1 (up to rounding):
            ``"at_most"`` zeroes the whole leading block (on a square weight the projected task delta is 0),
            FusionBench zeroes only P's diagonal (rank 0). The default is kept: for α < 1 the rules agree, and at
            α = 1 ``"at_most"`` is the limit of the rule as α → 1, where FusionBench's rank 0 comes from the argmax
            of an all-false comparison.
    """

    _state_names = ("total",)

    RANK_RULES = ("at_most", "fusion_bench")

    def __init__(
        self,
        alpha: float = 0.5,
        linear_keys: Callable[[str, Tensor], bool] | Iterable[str] | None = None,
        rank_rule: str = "at_most",
    ) -> None:
        super().__init__()
        self.alpha = _check_fraction("alpha", alpha, low_open=False)
        if rank_rule not in self.RANK_RULES:
            raise MergeConfigError(f"rank_rule must be one of {self.RANK_RULES}, got {rank_rule!r}.")
        self.rank_rule = rank_rule
        self._is_linear = key_predicate(linear_keys)
        self.total: Delta = {}
        self.norms: list[float] = []

    @staticmethod
    def split_rank(singular_values: Tensor, alpha: float, rule: str = "at_most") -> int:
        """r_α: the number of leading singular values whose cumulative share of their sum is ≤ α (``"at_most"``),
        or the index of the first share > α, 0 if none (``"fusion_bench"``)."""
        total = singular_values.sum()
        if float(total) <= 0.0:
            return 0
        share = singular_values.cumsum(0) / total
        if rule == "fusion_bench":
            return int((share > alpha).to(torch.float32).argmax())
        return int((share <= alpha).sum())

    def project(self, previous: Tensor, delta: Tensor) -> Tensor:
        """τ′ = U P Vᵀ with P = Uᵀ τ V stripped of its diagonal and leading r_α × r_α block."""
        u, s, vh = torch.linalg.svd(previous.double(), full_matrices=True)
        r = self.split_rank(s, self.alpha, self.rank_rule)
        p = u.T @ delta.double() @ vh.T
        p.diagonal().zero_()
        p[:r, :r] = 0
        return (u @ p @ vh).to(torch.float32)

    def _add(self, delta: Delta) -> None:
        self.norms.append(math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values())))
        if not self.total:
            self.total = {k: v.clone() for k, v in delta.items()}
            return
        for key, value in delta.items():
            if self._is_linear(key, value):
                value = self.project(self.total[key], value)
            self.total[key] = self.total[key] + value

    def _merged(self) -> Delta:
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.total.values()))
        scale = (sum(self.norms) / len(self.norms)) / norm if norm > 0 else 0.0
        return {k: scale * v for k, v in self.total.items()}

    def _extra_state(self) -> dict[str, Tensor]:
        return {"meta.norms": torch.tensor(self.norms, dtype=torch.float64)}

    def _load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        if "meta.norms" not in state:
            raise DeltaError("OPCMMerger state lacks 'meta.norms'.")
        norms = [float(x) for x in state["meta.norms"].reshape(-1)]
        if len(norms) != int(state["meta.num_tasks"]):
            raise DeltaError(
                f"OPCMMerger state has {len(norms)} task norms for {int(state['meta.num_tasks'])} task(s)."
            )
        self.norms = norms


# ------------------------------------------------------------------------------------------------ registry
# The per-key forms of the one-shot methods, registered by name (hf_cft.merging.registry) for ``hf-cft merge``, the
# merge config and the streaming merge. Each input's delta is scaled by its ``weight`` before the method runs, so
# that a per-input λ_t generalises the methods' single λ: with one λ for every input the result is the one-shot
# function's (λ·trim, λ·drop, λ·argmax and the sign election commute with a common λ).


def _present(deltas: Sequence[Tensor], ctx) -> Iterator[tuple[Tensor, dict]]:
    """(delta, per-input options) of the inputs that have a delta at this key (absent inputs add nothing), one at a
    time: a streamed merge reads each input's tensor only when it is reached."""
    return ((deltas[t], inp) for t, (inp, here) in enumerate(zip(ctx.inputs, ctx.present)) if here)


def _scaled(d: Tensor, w: float, fresh: bool = False) -> Tensor:
    """w·d; in place only when ``d`` is a tensor the kernel made itself (``fresh``), never an input."""
    if w == 1.0:
        return d
    return d.mul_(w) if fresh else d * w


def _ta_tensor(deltas: list[Tensor], ctx) -> Tensor:
    """Σ_t w_t·τ_t (task arithmetic; w_t = λ)."""
    items = _present(deltas, ctx)
    first, inp = next(items)
    out = first * inp["weight"]
    for d, inp in items:
        out.add_(d, alpha=inp["weight"])
    return out


def _magnitude_prune_tensor(deltas: list[Tensor], ctx) -> Tensor:
    """Σ_t w_t·trim_{density_t}(τ_t) (peft's ``magnitude_prune``)."""
    out = None
    for d, inp in _present(deltas, ctx):
        t = _trim_top_k(d, inp["density"])
        out = t.mul_(inp["weight"]) if out is None else out.add_(t, alpha=inp["weight"])
    return out


def _ties_tensor(deltas: list[Tensor], ctx) -> Tensor:
    """TIES steps 1–3 on w_t·τ_t: per-tensor trim to each input's density (or the model-wide thresholds of the
    prepare pass), sign election, disjoint merge; block by block on the CPU (the thresholds first, per tensor)."""
    opts = ctx.options
    model_scope = opts["trim_scope"] == "model"
    if not model_scope and opts["merge"] == "mean" and hasattr(deltas, "unchecked"):  # a streaming merge's key
        merged = _ties_chunked(deltas, ctx)
        if merged is None:
            raw = [deltas.unchecked(t) for t in range(len(deltas))]  # each input read once, checked below
            merged = _ties_fused(raw, ctx)
        if isinstance(merged, int):  # the histograms counted NaN/inf entries: name the input
            deltas.raise_nonfinite()
        if merged is not None:
            return merged
        for t, d in enumerate(raw):
            deltas.verify(t, d)
        deltas = raw
    deltas = [deltas[t] for t in range(len(deltas))]  # each input read once
    if model_scope:
        thresholds = ctx.state["thresholds"]
        zero_sign = ctx.state["zero_sign"]
    else:
        pairs = [(d, inp["density"]) for d, inp in zip(deltas, ctx.inputs)]
        thresholds = _per_input(lambda pair: _tensor_threshold(*pair), pairs, deltas[0].numel())
        zero_sign = None
    if not _blocked(*deltas):
        if model_scope:
            trimmed = [d * (d.abs() >= thr) for d, thr in zip(deltas, thresholds)]
        else:
            trimmed = [_trim_top_k(d, inp["density"]) for d, inp in zip(deltas, ctx.inputs)]
        trimmed = [_scaled(t, inp["weight"], fresh=True) for t, inp in zip(trimmed, ctx.inputs)]
        return _elect_disjoint(torch.stack(trimmed), opts["merge"], zero_sign)
    flats = [d.reshape(-1) for d in deltas]
    if not model_scope and opts["merge"] == "mean" and fused.applies(*flats):
        weights = [inp["weight"] for inp in ctx.inputs]
        drops = [thr[1] for thr in thresholds]
        return fused.ties_mean(flats, [thr[0] for thr in thresholds], drops, weights).view(deltas[0].shape)
    n = flats[0].numel()
    out = torch.empty(n)
    size = _stacked_block(len(flats))
    sc = _Scratch(n, rows=len(flats), size=size)
    drops = [None if model_scope else thr[1] for thr in thresholds]
    # the inputs' thresholds and weights as fp32 columns: the ops run on all T rows of a block at once (the fp32
    # values the scalars would be cast to; × 1.0 is exact, so every row may be scaled)
    limits = torch.tensor([thr if model_scope else thr[0] for thr in thresholds], dtype=torch.float32)[:, None]
    weights = [inp["weight"] for inp in ctx.inputs]
    scale = None if all(w == 1.0 for w in weights) else torch.tensor(weights, dtype=torch.float32)[:, None]
    raw_buf, mag_buf = torch.empty_like(sc.stack), torch.empty_like(sc.stack)
    kept_buf = torch.empty(sc.stack.shape, dtype=torch.bool)
    for s in _blocks(n, size):
        m = s.stop - s.start
        stacked, raw, kept = sc.stack[:, :m], raw_buf[:, :m], kept_buf[:, :m]
        if m == size:
            torch.stack([f[s] for f in flats], out=raw)
        else:  # the last, shorter block: its columns of the buffer are not contiguous
            raw.copy_(torch.stack([f[s] for f in flats]))
        torch.ge(torch.abs(raw, out=mag_buf[:, :m]), limits, out=kept)
        for row, drop in zip(kept, drops):
            if drop is not None:  # tied entries at the threshold beyond the kept ones (by position)
                lo, hi = torch.searchsorted(drop, torch.tensor([s.start, s.stop])).tolist()
                row[drop[lo:hi] - s.start] = False
        if model_scope:  # the model-wide trim multiplies by its mask, the per-tensor one selects (+0.0)
            torch.mul(raw, kept, out=stacked)
        else:
            _keep_where(raw, kept, stacked)
        if scale is not None:
            stacked.mul_(scale)
        out[s] = _elect_disjoint(stacked, opts["merge"], zero_sign)
    return out.view(deltas[0].shape)


def _ties_chunked(deltas, ctx) -> Tensor | int | None:
    """TIES (per-tensor trim, mean) of a key of at least ``fused.CHUNK`` entries, reading one chunk of each input at
    a time (:func:`_ties_one_pass` over ranges); ``None`` where it does not apply (no numba, a smaller key, an input
    on a GPU or not fp32)."""
    shape = tuple(deltas.shape)
    n = math.prod(shape)
    if n < max(fused.CHUNK, fused.SELECT_MIN) or not fused.available():
        return None
    buffers = [torch.empty(fused.CHUNK) for _ in range(len(deltas))]  # reused from chunk to chunk

    def read(t: int, start: int, stop: int) -> Tensor:
        x = deltas.range(t, start, stop, buffers[t][: stop - start])
        if not fused.applies(x):
            raise _NotFused
        return x

    try:
        return _ties_one_pass(read, shape, ctx)
    except _NotFused:  # the whole-tensor paths
        return None


def _counted(merged: Tensor, finite: bool) -> Tensor:
    """``merged``, recorded as finite for the streaming merge where its kernel counted it so (no check reads it)."""
    if finite:
        from hf_cft.merging.streaming import mark_finite

        mark_finite(merged)
    return merged


class _NotFused(Exception):
    """An input's range that the fused kernels do not take."""


def _ties_fused(deltas: list[Tensor], ctx) -> Tensor | int | None:
    """TIES (per-tensor trim, mean) of whole contiguous fp32 CPU tensors of at least ``fused.SELECT_MIN`` entries
    (:func:`_ties_one_pass`); ``None`` elsewhere."""
    flats = [d.reshape(-1) for d in deltas]
    if flats[0].numel() < fused.SELECT_MIN or not fused.applies(*flats):
        return None
    return _ties_one_pass(lambda t, start, stop: flats[t][start:stop], tuple(deltas[0].shape), ctx)


def _ties_one_pass(read, shape: tuple, ctx) -> Tensor | int:
    """TIES in one histogram pass per input and one merge pass (:func:`~hf_cft.merging.fused.ties_trim_mean_ranges`,
    ``read(t, start, stop)`` giving input t's flat entries): the merged delta (recorded as finite where the kernel
    counted it so), or the count of NaN/inf entries the inputs hold."""
    n = math.prod(shape)
    keeps = [max(1, int(inp["density"] * n)) for inp in ctx.inputs]
    merged, bad, finite = fused.ties_trim_mean_ranges(read, n, keeps, [inp["weight"] for inp in ctx.inputs])
    return bad if merged is None else _counted(merged.view(shape), finite)


def _tensor_threshold(d: Tensor, density: float) -> tuple[float, Tensor | None]:
    """:func:`trim_top_k`'s rule as ``(threshold, drops)`` (:func:`_trim_threshold`; ``(0.0, None)`` keeps all)."""
    n = d.numel()
    keep = max(1, int(density * n))
    return (0.0, None) if keep >= n else _trim_threshold(d.reshape(-1), keep)


def _ties_prepare(deltas, ctx) -> dict:
    """``trim_scope="model"``: each input's model-wide trim threshold (:func:`model_trim_threshold` over the keys that
    some input changes, those an input has no delta for counting as zeros; one input's delta in memory at a time), then the
    majority sign of the elected vector over every key (FusionBench's rule for σ = 0), key by key."""
    if ctx.options["trim_scope"] != "model":
        return {}
    keys = [k for k in ctx.shapes if any(k in d for d in deltas)]  # the task vector: keys some input changes
    total_entries = sum(math.prod(ctx.shapes[k]) for k in keys)
    thresholds = []
    for d, inp in zip(deltas, ctx.inputs):
        flat = torch.cat([d[k].reshape(-1).abs() for k in d]) if len(d) else torch.zeros(0)
        zeros = total_entries - flat.numel()
        rank = total_entries - int(total_entries * inp["density"])  # the rank-th smallest |τ| is the threshold
        thresholds.append(0.0 if rank <= zeros else float(flat.kthvalue(rank - zeros).values))
        del flat
    votes = 0.0
    for key in keys:
        total = None
        for d, thr, inp in zip(deltas, thresholds, ctx.inputs):
            if key in d:
                v = d[key]
                v = (v * (v.abs() >= thr)).mul_(inp["weight"])
                total = v if total is None else total.add_(v)
        if total is not None:
            votes += float(torch.sign(total).sum(dtype=torch.float64))
    return {"thresholds": thresholds, "zero_sign": float(math.copysign(1.0, votes)) if votes != 0 else 0.0}


def _dare_tensor(deltas: list[Tensor], ctx) -> Tensor:
    """DARE on every input (drop rate 1 − density_t, seeded per key), scaled by w_t, then TA or TIES; block by block
    on the CPU, one input at a time for TA (the masks drawn in the same order as :func:`_dare_drop`)."""
    rhos = [1.0 - inp["density"] for inp in ctx.inputs]
    first = deltas[0]
    if not _blocked(first):
        return _dare_whole(deltas, ctx, rhos)
    n = first.numel()
    rng = ctx.options["rng"]
    source = None if all(r == 0.0 for r in rhos) else _stream(rng, _key_seed(ctx.options["seed"], ctx.key))
    if source is not None and ctx.options["then"] == "ta":
        flats = [(first if t == 0 else deltas[t]).reshape(-1) for t in range(len(rhos))]
        if fused.applies(*flats):  # counter: one pass, each draw computed in place; torch: one pass per input
            weights = [inp["weight"] for inp in ctx.inputs]
            return fused.dare_ta(flats, source, rhos, weights).view(first.shape)
    sc = _Scratch(n)
    out = torch.empty(n)

    def dropped(x: Tensor, rho: float, weight: float, mask: Tensor | None, buf: Tensor) -> Tensor:
        if rho == 0.0:  # kept whole: no mask drawn
            return x if weight == 1.0 else torch.mul(x, weight, out=buf)
        keep = 1.0 - rho
        y = torch.mul(x, mask, out=buf).div_(keep)
        return y if weight == 1.0 else y.mul_(weight)

    if ctx.options["then"] == "ta":
        for t, (rho, inp) in enumerate(zip(rhos, ctx.inputs)):
            f = (first if t == 0 else deltas[t]).reshape(-1)
            for s in _blocks(n):
                m = s.stop - s.start
                mask = None if rho == 0.0 else source.mask(m, 1.0 - rho)
                y = dropped(f[s], rho, inp["weight"], mask, sc.f[0][:m])
                if t == 0:
                    out[s] = y
                else:
                    out[s].add_(y)
        return out.view(first.shape)
    flats = [(first if t == 0 else deltas[t]).reshape(-1) for t in range(len(rhos))]
    masks = [None if rho == 0.0 else source.mask(n, 1.0 - rho) for rho in rhos]  # each input's mask in turn
    size = _stacked_block(len(flats))
    stack = torch.empty(len(flats), min(n, size))
    for s in _blocks(n, size):
        m = s.stop - s.start
        for row, f, rho, mask, inp in zip(stack[:, :m], flats, rhos, masks, ctx.inputs):
            row.copy_(dropped(f[s], rho, inp["weight"], None if mask is None else mask[s], row))
        out[s] = _elect_disjoint(stack[:, :m])
    return out.view(first.shape)


def _dare_whole(deltas, ctx, rhos) -> Tensor:
    """:func:`_dare_tensor` on whole tensors (off the CPU)."""
    dropped = _dare_drop(deltas, rhos, ctx.options["seed"], ctx.key, ctx.options["rng"])
    dropped = [_scaled(t, inp["weight"], fresh=t is not d) for t, d, inp in zip(dropped, deltas, ctx.inputs)]
    if ctx.options["then"] == "ta":
        out = dropped[0].clone() if dropped[0] is deltas[0] else dropped[0]
        for t in dropped[1:]:
            out.add_(t)
        return out
    return _elect_disjoint(torch.stack(dropped))


def _dare_check(options: dict, inputs: list[dict], where: str) -> None:
    for inp in inputs:  # λ's default follows the combination, as in dare()
        if inp["weight"] is None:
            inp["weight"] = 0.3 if options["then"] == "ta" else 1.0


def _magmax_tensor(deltas: list[Tensor], ctx) -> Tensor:
    """Per entry the largest-magnitude w_t·τ_t (ties: ``tie_break``), folded one input at a time."""
    streamed = hasattr(deltas, "unchecked")  # a streaming merge's key: the fused kernel counts NaN/inf itself
    present = [t for t, here in enumerate(ctx.present) if here]
    if streamed and fused.available():
        raw = [deltas.unchecked(t) for t in present]
        flats = [d.reshape(-1) for d in raw]
        if fused.applies(*flats):  # one pass over every present input
            weights = [ctx.inputs[t]["weight"] for t in present]
            merged, bad, finite = fused.magmax(flats, weights, ctx.options["tie_break"])
            if bad:
                deltas.raise_nonfinite()
            return _counted(merged.view(raw[0].shape), finite)
        for t, d in zip(present, raw):
            deltas.verify(t, d)
        items = ((d, ctx.inputs[t]) for t, d in zip(present, raw))
    else:
        items = _present(deltas, ctx)
    first, inp = next(items)
    if fused.applies(first.reshape(-1)):  # one pass over every present input
        rest = list(items)
        flats = [first.reshape(-1)] + [d.reshape(-1) for d, _ in rest]
        if fused.applies(*flats):
            weights = [inp["weight"]] + [i["weight"] for _, i in rest]
            return fused.magmax(flats, weights, ctx.options["tie_break"])[0].view(first.shape)
        items = iter(rest)
    best = (first * inp["weight"]).contiguous()
    scratch = _Scratch(best.numel()) if _blocked(best) else None
    for d, inp in items:
        if scratch is not None and _blocked(d):
            _magmax_into(best, d, ctx.options["tie_break"], inp["weight"], scratch)
        else:
            best = _magmax_step(best, _scaled(d, inp["weight"]), ctx.options["tie_break"])
    return best


def _consensus_tensor(deltas: list[Tensor], ctx) -> Tensor:
    """Consensus (TALL masks) on w_t·τ_t: keep the entries of Σ_t w_t·τ_t selected by at least k masks."""
    deltas = [deltas[t] for t in range(len(deltas))]  # each input read once
    if not _blocked(*deltas):
        scaled = [_scaled(d, inp["weight"]) for d, inp in zip(deltas, ctx.inputs)]
        total = scaled[0].clone()
        for t in scaled[1:]:
            total.add_(t)
        votes = torch.zeros(total.shape, dtype=torch.int32)
        for t, inp in zip(scaled, ctx.inputs):
            votes += t.abs() > inp["tall_lambda"] * (total - t).abs()
        return total.mul_(votes >= ctx.options["k"])
    flats = [d.reshape(-1) for d in deltas]
    if fused.applies(*flats):
        weights = [inp["weight"] for inp in ctx.inputs]
        lambdas = [inp["tall_lambda"] for inp in ctx.inputs]
        return fused.consensus(flats, weights, lambdas, ctx.options["k"]).view(deltas[0].shape)
    n = flats[0].numel()
    out = torch.empty(n)
    sc = _Scratch(n, rows=len(flats))
    for s in _blocks(n):
        m = s.stop - s.start
        rows = sc.stack[:, :m]
        for row, f, inp in zip(rows, flats, ctx.inputs):
            if inp["weight"] != 1.0:
                torch.mul(f[s], inp["weight"], out=row)
            else:
                row.copy_(f[s])
        total = out[s]
        total.copy_(rows[0])
        for row in rows[1:]:
            total.add_(row)
        votes = sc.i[:m].zero_()
        for row, inp in zip(rows, ctx.inputs):
            rest = torch.sub(total, row, out=sc.f[0][:m]).abs_().mul_(inp["tall_lambda"])
            votes.add_(torch.gt(torch.abs(row, out=sc.f[1][:m]), rest, out=sc.b[:m]))
        total.mul_(torch.ge(votes, ctx.options["k"], out=sc.b[:m]))
    return out.view(deltas[0].shape)


def _consensus_check(options: dict, inputs: list[dict], where: str) -> None:
    if options["k"] > len(inputs):
        raise TaskError(
            f"{where}.k={options['k']} exceeds the number of inputs ({len(inputs)}): no entry could be kept; lower k."
        )


def _register_builtins() -> None:
    from hf_cft.merging.registry import MergeMethod, Option, register

    def weight(default, help="λ_t: each input's delta is scaled by it before merging"):
        return Option("weight", default, per_input=True, help=help)

    def density(default, help):
        return Option("density", default, low=0.0, high=1.0, low_open=True, per_input=True, help=help)

    register(
        MergeMethod(
            "task_arithmetic",
            "tensor",
            _ta_tensor,
            (weight(0.3, "λ_t of Σ_t λ_t·τ_t (one λ for all: --lam)"),),
            summary="Σ_t λ_t·τ_t (default λ = 0.3)",
            reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
            nonfinite_propagates=True,
        )
    )
    register(
        MergeMethod(
            "magnitude_prune",
            "tensor",
            _magnitude_prune_tensor,
            (weight(0.3), density(0.2, "fraction of each tensor's entries kept, by magnitude")),
            summary="Σ_t λ_t·trim_{density}(τ_t) (defaults λ = 0.3, density 0.2; peft's magnitude_prune)",
            reference="peft add_weighted_adapter(combination_type='magnitude_prune')",
        )
    )
    register(
        MergeMethod(
            "ties",
            "tensor",
            _ties_tensor,
            (
                weight(1.0),
                density(0.2, "TIES k: fraction of entries kept by magnitude (--k)"),
                Option("trim_scope", "tensor", "choice", choices=TRIM_SCOPES, help="trim per tensor or model-wide"),
                Option("merge", "mean", "choice", choices=DISJOINT_MERGES, help="disjoint merge (--disjoint_merge)"),
            ),
            summary="trim to density, elect sign, disjoint mean of λ_t·τ̃_t (defaults density 0.2, λ = 1)",
            prepare=_ties_prepare,
            reference="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)",
        )
    )
    register(
        MergeMethod(
            "dare",
            "tensor",
            _dare_tensor,
            (
                weight(None, "λ_t (default 0.3 with then=ta, 1.0 with then=ties)"),
                Option(
                    "density",
                    0.1,
                    low=0.0,
                    high=1.0,
                    low_open=True,
                    per_input=True,
                    help="kept fraction 1 − ρ (--rho ρ: drop rate)",
                ),
                Option("then", "ta", "choice", choices=("ta", "ties"), help="task arithmetic or TIES after the drop"),
                Option("seed", 0, "int", help="seed of the drop masks (drawn per key)"),
                Option(
                    "rng",
                    "torch",
                    "choice",
                    choices=DARE_RNGS,
                    help="masks from torch's CPU generator (reproduces torch.bernoulli) or a counter-based hash "
                    "(the same on every device; fused, several times faster on a CPU)",
                ),
            ),
            summary="drop with rate 1 − density and rescale, then TA or TIES (default density 0.1)",
            reference="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
            check=_dare_check,
            nonfinite_propagates=True,  # NaN·0 = NaN: a dropped NaN still shows, in TA and in the election
        )
    )
    register(
        MergeMethod(
            "magmax",
            "tensor",
            _magmax_tensor,
            (
                weight(0.5),
                Option("tie_break", "later", "choice", choices=MAGMAX_TIE_BREAKS, help="which input wins equal |τ|"),
            ),
            summary="per entry the largest-magnitude λ_t·τ_t (default λ = 0.5)",
            reference="Marczak et al., MagMax, ECCV 2024 (danielm1405/magmax)",
        )
    )
    register(
        MergeMethod(
            "wise",
            "tensor",
            _ta_tensor,
            (weight(0.5, "α: θ = (1 − α)θ⁰ + α·θ_ft (--alpha)"),),
            min_inputs=1,
            max_inputs=1,
            summary="α·τ of one fine-tuned model (default α = 0.5)",
            reference="Wortsman et al., Robust fine-tuning of zero-shot models (WiSE-FT), CVPR 2022 (arXiv:2109.01903)",
            nonfinite_propagates=True,
        )
    )
    register(
        MergeMethod(
            "consensus",
            "tensor",
            _consensus_tensor,
            (
                weight(0.3),
                Option("tall_lambda", 0.4, low=0.0, per_input=True, help="TALL mask λ_t"),
                Option("k", 2, "int", low=0, help="masks that must agree"),
            ),
            summary="Σ_t λ_t·τ_t kept where ≥ k TALL masks agree (defaults λ = 0.3, TALL λ 0.4, k = 2)",
            reference="Wang et al., Localizing Task Information (TALL masks / consensus), ICML 2024 (arXiv:2405.07813)",
            check=_consensus_check,
            nonfinite_propagates=True,  # the sum carries it; a masked-out NaN/inf is NaN·0 = NaN
        )
    )


_register_builtins()
