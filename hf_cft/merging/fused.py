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

import math
import os
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_KERNELS: dict | None = None
_LOCK = threading.Lock()


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


#: arrays smaller than this are selected by numpy's introselect (the radix passes cost more there)
SELECT_MIN = 1 << 16


def selects(x) -> bool:
    """Whether :func:`kth_largest_magnitudes` takes this numpy array (fp32, at least :data:`SELECT_MIN` entries, numba
    available)."""
    return x.dtype.name == "float32" and x.size >= SELECT_MIN and available()


def _kernels() -> dict | None:
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _compile()
        except ImportError:
            _KERNELS = {}
    return _KERNELS or None


#: inputs smaller than this run the one-core form of a kernel (a launch on numba's thread pool costs ~0.2 ms: on two
#: cores the parallel form wins only from about 2²¹ entries on)
PARALLEL_MIN = 1 << 21


def _run(name: str, n: int, *args, parallel_min: int | None = None) -> None:
    """Run one kernel on ``n`` entries (its every-core form from ``parallel_min`` entries, :data:`PARALLEL_MIN` by
    default), one call at a time in the process: numba's workqueue pool (see :func:`_compile`) aborts when two
    threads enter it together, so callers in several threads wait for each other here."""
    kernel = _kernels()[name]
    with _LOCK:
        return (kernel.parallel if n >= (PARALLEL_MIN if parallel_min is None else parallel_min) else kernel.serial)(
            *args
        )


#: DELLA's kernel does some 20 times the work per entry of the others (ranks, draws, election): every core pays off
#: from far fewer entries
DELLA_PARALLEL_MIN = 1 << 16


def _threads() -> None:
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _compile() -> dict:
    import numba
    import numpy as np

    # numba's own thread pool, not OpenMP: with numba's OpenMP layer, a process that had run a fused kernel then
    # trained to other float results (torch's intra-op threads run on OpenMP too; tests/test_continual.py's
    # expert-cache tests caught it in the full suite). The workqueue pool must not be entered from two threads at
    # once: _run serialises the calls.
    if numba.config.THREADING_LAYER in ("default", "omp"):
        numba.config.THREADING_LAYER = "workqueue"

    from hf_cft.merging import _fused_kernels as kernels

    names = (
        "ties_mean_flagged",
        "band_sum_flagged",
        "consensus",
        "magmax",
        "magnitude_histogram",
        "bucket_entries",
        "dare_ta",
        "della_elect",
        "gram_sum",
        "scale_in_place",
        "mt19937_low24",
        "mt19937_seed",
        "dare_add",
    )
    return {**{name: getattr(kernels, name) for name in names}, "numba": numba, "np": np}


def ties_mean(
    flats: Sequence[Tensor], thresholds: Sequence[float], drops: Sequence[Tensor | None], weights: Sequence[float]
) -> Tensor:
    """The fused form of the blocked TIES kernel (tensor-scope trim, ``merge="mean"``, no zero sign): flat fp32 inputs,
    each input's ``(threshold, drops)`` from :func:`~hf_cft.merging.baselines._tensor_threshold`. The entries at the
    tied positions (``drops``: equal to the threshold but beyond the kept ones) are merged again on their own with
    those entries zeroed."""
    k = _kernels()
    np = k["np"]
    _threads()
    limits = np.array(thresholds, dtype=np.float32)
    w = np.array(weights, dtype=np.float32)
    scaled = any(x != 1.0 for x in weights)
    out = torch.empty(flats[0].numel())
    _ties_exact(np, tuple(f.numpy() for f in flats), limits, w, scaled, out.numpy())
    tied = [d for d in drops if d is not None and d.numel()]
    if tied:
        where = torch.unique(torch.cat(tied))
        subs = []
        for f, d in zip(flats, drops):
            sub = f[where].contiguous()
            if d is not None and d.numel():
                sub[torch.isin(where, d)] = 0.0  # dropped: +0.0, below the threshold
            subs.append(sub.numpy())
        part = torch.empty(where.numel())
        _ties_exact(np, tuple(subs), limits, w, scaled, part.numpy())
        out[where] = part
    return out


def _ties_exact(np, xs, thresholds, weights, scaled: bool, out) -> int:
    """The TIES kernel with exact thresholds (no bucket flagged): the count of NaN/inf results."""
    flags = np.empty(out.size, dtype=np.bool_)
    return _run("ties_mean_flagged", out.size, xs, thresholds, thresholds, weights, scaled, out, flags)


def band_sum(flats: Sequence[Tensor], bands: Sequence[tuple], weights: Sequence[float]) -> Tensor:
    """The fused form of breadcrumbs' blocked sum: ``bands[t] = (lo, hi, ties)`` from
    :func:`~hf_cft.merging.methods._band_limits` (``ties``: ``(equal, inside)`` position tensors). The entries at
    the tied positions are summed again on their own, their masks resolved by position."""
    k = _kernels()
    np = k["np"]
    _threads()
    out = torch.empty(flats[0].numel())
    lows = [b[0] for b in bands]
    highs = [b[1] for b in bands]
    none = np.zeros((len(flats), 2), dtype=np.float32)  # empty flag ranges: the exact edges are given
    _run(
        "band_sum_flagged",
        out.numel(),
        tuple(f.numpy() for f in flats),
        np.array(lows, dtype=np.float32),
        np.array(highs, dtype=np.float32),
        none,
        none,
        np.array(weights, dtype=np.float32),
        out.numpy(),
        np.empty(out.numel(), dtype=np.bool_),
    )
    groups = [equal for _, _, ties in bands for equal, _ in ties if equal.numel()]
    if groups:
        where = torch.unique(torch.cat(groups))
        total = None
        for f, w, lo, hi, (_, _, ties) in zip(flats, weights, lows, highs, bands):
            x = f[where]
            a = x.abs()
            keep = (a >= lo) & (a < hi)
            for equal, inside in ties:
                keep[torch.isin(where, equal)] = False
                keep[torch.isin(where, inside)] = True
            term = (x * keep).mul_(w)
            total = term if total is None else total.add_(term)
        out[where] = total
    return out


def _weight_arrays(np, weights: Sequence[float]):
    """``(weights, scaled)`` as the kernels take them: fp32 weights, and which inputs the torch kernels multiply
    (those whose weight is not 1)."""
    return np.array(weights, dtype=np.float32), np.array([w != 1.0 for w in weights])


def _weighted(name: str, flats: Sequence[Tensor], weights: Sequence[float], *options) -> tuple[Tensor, object]:
    """Run a kernel of signature ``(xs, weights, scaled, *options, out)`` into a new flat fp32 tensor:
    ``(out, what the kernel returned)``."""
    np = _kernels()["np"]
    _threads()
    out = torch.empty(flats[0].numel())
    arrays = tuple(f.numpy() for f in flats)
    returned = _run(name, out.numel(), arrays, *_weight_arrays(np, weights), *options, out.numpy())
    return out, returned


def consensus(flats: Sequence[Tensor], weights: Sequence[float], lambdas: Sequence[float], k: int) -> Tensor:
    """The fused form of the blocked consensus kernel (TALL masks on w_t·τ_t, at least ``k`` votes)."""
    np = _kernels()["np"]
    return _weighted("consensus", flats, weights, np.array(lambdas, dtype=np.float32), int(k))[0]


def magmax(flats: Sequence[Tensor], weights: Sequence[float], tie_break: str) -> tuple[Tensor, int, bool]:
    """The fused form of MagMax's fold (``tie_break`` ``"later"``: ≥, ``"earlier"``: >): ``(merged, the count of
    NaN/inf input entries, whether the merged delta is finite)``."""
    out, (bad, bad_out) = _weighted("magmax", flats, weights, tie_break == "later")
    return out, int(bad), not bad_out


def gram_sum(flats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(gram, total)`` in one pass over the inputs: the T×T Gram matrix ⟨τ_a, τ_b⟩ (fp64 sums of exact products,
    per block, the blocks summed in order) and Σ_t τ_t (fp32, list order), to scale with :func:`scale_in_place`."""
    from hf_cft.merging._fused_kernels import GRAM_BLOCK

    np = _kernels()["np"]
    _threads()
    t_count, n = len(flats), flats[0].numel()
    grams = np.empty((-(-n // GRAM_BLOCK), t_count, t_count))
    out = torch.empty(n)
    _run("gram_sum", n, tuple(f.numpy() for f in flats), grams, out.numpy())
    return torch.from_numpy(grams.sum(axis=0)), out


def scale_in_place(out: Tensor, divisor: int, factor: float) -> bool:
    """``out`` = out / divisor · factor in fp32, in place (the torch kernels' operations): whether it is finite."""
    np = _kernels()["np"]
    _threads()
    return not _run("scale_in_place", out.numel(), out.numpy(), np.float32(divisor), np.float32(factor))


def dare_ta(flats: Sequence[Tensor], stream, rhos: Sequence[float], weights: Sequence[float]) -> Tensor:
    """The fused form of DARE + task arithmetic (each input with ρ > 0 takes the next ``numel`` draws of ``stream``,
    in list order, as the blocked kernel draws them). With the counter stream (a
    :class:`~hf_cft.merging.baselines._CounterStream`) one pass computes every draw in place; with the CPU
    generator's, each input's draws are taken (:func:`mt19937_low24`) and the input added in its own pass."""
    from hf_cft.merging.baselines import _CounterStream, mask_threshold

    np = _kernels()["np"]
    _threads()
    n = flats[0].numel()
    dropped = np.array([r != 0.0 for r in rhos])
    keeps = np.array([np.float32(1.0 - r) if d else 1.0 for r, d in zip(rhos, dropped)], dtype=np.float32)
    thresholds = np.array([mask_threshold(k) for k in keeps], dtype=np.uint64)
    w, scaled = _weight_arrays(np, weights)
    out = torch.empty(n)
    if not isinstance(stream, _CounterStream):
        draws = np.empty(n, dtype=np.uint32)  # reused by every dropped input
        for t, f in enumerate(flats):
            if dropped[t]:
                stream.draws_into(draws)
            _run("dare_add", n, f.numpy(), dropped[t], draws, thresholds[t], keeps[t], w[t], scaled[t], t == 0,
                 out.numpy())
        return out
    starts = np.array([stream.skip(n) if d else 0 for d in dropped], dtype=np.uint64)
    _run(
        "dare_ta",
        n,
        tuple(f.numpy() for f in flats),
        np.uint64(stream.key),
        starts,
        thresholds,
        keeps,
        dropped,
        w,
        scaled,
        out.numpy(),
    )
    return out


def mt19937_low24(key, pos, out) -> None:
    """The next ``out.size`` outputs of an MT19937 state (numpy's layout: ``key`` its 624 uint32 words, ``pos`` a
    one-entry int64 array; both advanced in place), each kept to its low 24 bits: numpy's MT19937 stream, about ten
    times faster than ``Generator.integers``. (A one-core kernel: it never enters numba's pool, so it takes no lock
    and merges in other threads draw beside it.)"""
    _kernels()["mt19937_low24"](key, pos, out)


def mt19937_seed(seed: int, key) -> None:
    """The 624 words of an MT19937 state seeded with the 32-bit ``seed`` into the uint32 array ``key`` (numpy's
    ``RandomState(seed)``'s words, without its Python-level set-up: ~1 µs against ~150; one core, no lock)."""
    _kernels()["mt19937_seed"](seed, key)


def della(
    flats: Sequence[Tensor], rows: int, stream, densities: Sequence[float], epsilon: float, weights: Sequence[float]
) -> tuple[Tensor, int]:
    """The fused form of DELLA on one key (MagPrune of each w_t·τ_t ranked within each of ``rows`` rows, then TIES's
    election and disjoint mean): ``(merged, bad)``, ``bad`` > 0 where an input or the result holds NaN/inf (the merge
    is then not defined: rerun the reference). ``stream``: a counter stream (the kernel computes its draws) or the CPU
    generator's (its draws taken first); each input takes the next ``numel`` draws, in list order."""
    from hf_cft.merging.baselines import _CounterStream

    np = _kernels()["np"]
    _threads()
    t_count, n = len(flats), flats[0].numel()
    counter = isinstance(stream, _CounterStream)
    if counter:
        starts = np.array([stream.skip(n) for _ in flats], dtype=np.uint64)
        draws = np.zeros((0, 0), dtype=np.uint32)
    else:
        starts = np.zeros(t_count, dtype=np.uint64)
        draws = np.empty((t_count, n), dtype=np.uint32)
        stream.draws_into(draws.reshape(-1))  # each input's numel draws in turn
    drops = [1.0 - d for d in densities]
    out = torch.empty(n)
    bad = _run(
        "della_elect",
        t_count * n if rows > 1 else 0,  # one row: one chunk, nothing to share out
        tuple(f.numpy() for f in flats),
        rows,
        *_weight_arrays(np, weights),
        np.array(drops, dtype=np.float32),
        np.array([p - epsilon / 2 for p in drops], dtype=np.float32),
        np.float32(epsilon),
        np.uint64(stream.key if counter else 0),
        starts,
        draws,
        counter,
        out.numpy(),
        parallel_min=DELLA_PARALLEL_MIN,
    )
    return out, int(bad)


def kth_largest_magnitudes(x, ranks: Sequence[int]) -> list[tuple[float, int, int]]:
    """For each ``r`` in ``ranks`` (1 ≤ r ≤ n) the r-th largest magnitude of the fp32 numpy array ``x`` with the
    number of entries above it and equal to it, ``(value, greater, equal)``, exactly, by radix selection
    (:func:`_radix_select`; numpy's introselect of all n magnitudes costs several times more, from 2¹⁶ entries on)."""
    np = _kernels()["np"]
    _threads()
    found, _ = _radix_select(np, x.reshape(-1).view(np.uint32), list(dict.fromkeys(ranks)))
    return [found[r] for r in ranks]


#: entries below this select on one core: on two cores, the histogram's threads cost more than they save below it
SELECT_PARALLEL_MIN = 1 << 22


def _run_chunked(name: str, chunks: int, *args):
    """Run a kernel that splits its entries into ``chunks`` (one per thread): its one-core form for one chunk."""
    kernel = _kernels()[name]
    with _LOCK:
        return (kernel.serial if chunks == 1 else kernel.parallel)(*args)


def _histogram(np, bits):
    """``(counts, per_chunk)``: the top-16-bit bucket counts of |x| (``bits``: the fp32 bit patterns), summed and per
    chunk; one chunk per numba thread from :data:`SELECT_PARALLEL_MIN` entries, else one."""
    from hf_cft.merging._fused_kernels import BUCKETS

    chunks = 1 if bits.size < SELECT_PARALLEL_MIN else _kernels()["numba"].get_num_threads()
    hist = np.zeros(chunks * BUCKETS, dtype=np.int64)
    _run_chunked("magnitude_histogram", chunks, bits, chunks, hist)
    per_chunk = hist.reshape(chunks, BUCKETS)
    return (hist if chunks == 1 else per_chunk.sum(axis=0)), per_chunk


def _nonfinite(counts) -> int:
    return int(counts[0x7F800000 >> 15 :].sum())  # the buckets of inf and NaN


def _radix_select(np, bits, ranks: Sequence[int]) -> tuple[dict, int]:
    """Radix selection of every rank (its ``(value, greater, equal)``), with the count of NaN/inf entries (free: they
    have buckets of their own): one pass counts the top 16 bits of each |x| (:func:`_histogram`), a second collects
    the entries of the bucket that holds each rank, and a selection among those few gives the value."""
    from hf_cft.merging._fused_kernels import rank_bucket

    counts, per_chunk = _histogram(np, bits)
    chunks = per_chunk.shape[0]
    found = {}
    for r in ranks:
        bucket, higher = rank_bucket(counts, r)
        offsets = np.zeros(chunks, dtype=np.int64)
        offsets[1:] = np.cumsum(per_chunk[:-1, bucket])
        members = np.empty(int(counts[bucket]), dtype=np.uint32)
        _run_chunked("bucket_entries", chunks, bits, chunks, np.uint32(bucket), offsets, members)
        found[r] = _rank_among(np, members, r - higher, higher)
    return found, _nonfinite(counts)


def _rank_among(np, members, inside: int, higher: int) -> tuple[float, int, int]:
    """``(value, greater, equal)`` of the ``inside``-th largest of ``members`` (|x| bit patterns), ``higher`` entries
    lying above them all."""
    members.partition(members.size - inside)
    value = members[members.size - inside]
    greater = higher + int(np.count_nonzero(members > value))
    equal = int(np.count_nonzero(members == value))
    return float(np.array([value], dtype=np.uint32).view(np.float32)[0]), greater, equal


#: keys of at least this many entries are merged by TIES in chunks of as many entries per input, read one chunk of
#: each input at a time (a streaming merge's model folders read only that range): T·chunk entries in memory, not T·n
CHUNK = 1 << 22


def ties_trim_mean_ranges(
    read: Callable[[int, int, int], Tensor], n: int, keeps: Sequence[int], weights: Sequence[float]
) -> tuple[Tensor | None, int, bool]:
    """TIES with the per-tensor trim (``merge="mean"``) of T inputs of ``n`` entries each, ``read(t, start, stop)``
    giving input t's flat fp32 entries ``[start, stop)`` (contiguous), ``keeps[t]`` the number of entries input t
    keeps (≥ n: all): ``(merged, 0, whether it is finite)``, or ``(None, count, False)`` when the inputs hold
    ``count`` NaN/inf entries (counted by the histograms, so neither the inputs nor the result need another check).

    The same result, bit for bit, as :func:`~hf_cft.merging.baselines._trim_threshold` then :func:`ties_mean`, in one
    histogram pass per input and one merge pass, each over chunks of :data:`CHUNK` entries: each input's threshold is
    first known only to its top-16-bit bucket (:func:`_radix_select` without the pass that collects the bucket);
    the merge keeps the entries above that bucket and flags the positions where some input's entry lies inside it (a
    few per mille of them), whose entries it keeps aside; those positions are merged again with the exact thresholds
    and ties, found among their own entries (every entry of a bucket is at a flagged position)."""
    from hf_cft.merging._fused_kernels import rank_bucket

    np = _kernels()["np"]
    _threads()
    count = len(keeps)
    spans = [(a, min(n, a + CHUNK)) for a in range(0, n, CHUNK)] or [(0, 0)]
    lows = np.zeros(count, dtype=np.float32)
    highs = np.zeros(count, dtype=np.float32)  # [0, 0) flags nothing; |x| ≥ 0 keeps all
    highers: list[int | None] = []  # per input: the count above its threshold's bucket (None: keeps all)
    bad = 0
    for t in range(count):
        if keeps[t] >= n:
            highers.append(None)
            continue
        counts = None
        for a, b in spans:
            part, _ = _histogram(np, read(t, a, b).numpy().view(np.uint32))
            counts = part.copy() if counts is None else counts + part
        bad += _nonfinite(counts)
        bucket, higher = rank_bucket(counts, keeps[t])
        lows[t], highs[t] = _bucket_range(np, bucket)
        highers.append(higher)
    if bad:
        return None, bad, False
    w = np.array(weights, dtype=np.float32)
    scaled = any(v != 1.0 for v in weights)
    out = torch.empty(n)
    flags = np.empty(spans[0][1] - spans[0][0], dtype=np.bool_)
    bad_out = 0
    where, kept = [], [[] for _ in range(count)]  # the flagged positions and each input's entries there
    for a, b in spans:
        xs = tuple(read(t, a, b).numpy() for t in range(count))
        bad_out += _run("ties_mean_flagged", b - a, xs, highs, lows, w, scaled, out.numpy()[a:b], flags[: b - a])
        here = np.flatnonzero(flags[: b - a])
        where.append(here + a)
        for t in range(count):
            kept[t].append(xs[t][here])
    where = np.concatenate(where)
    if where.size:
        limits = np.zeros(count, dtype=np.float32)
        subs = []
        for t in range(count):
            sub = np.concatenate(kept[t])
            if highers[t] is not None:
                mags = np.abs(sub)
                kth, greater, equal = _rank_in_bucket(np, mags, (lows[t], highs[t]), keeps[t], highers[t])
                limits[t] = kth
                if greater + equal > keeps[t] and kth != 0.0:  # ties at the threshold: the first ones by position
                    tied = np.flatnonzero(mags == np.float32(kth))  # all at flagged positions, in position order
                    sub[tied[keeps[t] - greater :]] = 0.0  # dropped: +0.0, below the threshold
            subs.append(sub)
        part = np.empty(where.size, dtype=np.float32)
        _ties_exact(np, tuple(subs), limits, w, scaled, part)
        out.numpy()[where] = part
        bad_out += int(not np.isfinite(part).all())  # (a non-finite first-pass result may be replaced: "not known")
    return out, 0, not bad_out


def _rank_in_bucket(np, mags, bounds: tuple, rank: int, higher: int) -> tuple[float, int, int]:
    """``(value, greater, equal)`` of the ``rank``-th largest magnitude of a tensor, from ``mags``, the magnitudes at
    its flagged positions (which hold every entry of the rank's bucket ``bounds`` = ``[low, high)``), ``higher``
    entries lying above the bucket."""
    members = mags[(mags >= bounds[0]) & (mags < bounds[1])].view(np.uint32).copy()
    return _rank_among(np, members, rank - higher, higher)


def _bucket_range(np, bucket: int) -> tuple:
    """The fp32 magnitudes ``[low, high)`` of a top-16-bit bucket."""
    return tuple(np.array([bucket << 15, (bucket + 1) << 15], dtype=np.uint32).view(np.float32))


def band_sum_trimmed(
    flats: Sequence[Tensor], bands: Sequence[tuple[int, int]], weights: Sequence[float]
) -> tuple[Tensor | None, int, bool]:
    """Breadcrumbs' Σ_t w_t·(m_t ⊙ τ_t) of flat fp32 inputs of at least :data:`SELECT_MIN` entries, m_t the ranks
    ``bands[t] = (start, stop)`` of |τ_t| in descending order, ties by position (stop ≤ start: nothing kept):
    ``(merged, 0, whether it is finite)``, or ``(None, count, False)`` when the inputs hold ``count`` NaN/inf entries
    (counted by the histograms).

    The same result, bit for bit, as :func:`~hf_cft.merging.methods._band_limits` then :func:`band_sum`, in one
    histogram pass per input and one summing pass: each band edge is first known only to its top-16-bit bucket; the
    sum keeps the entries strictly between the two buckets and flags the positions where some input's entry lies in
    one of them; those positions are summed again with the exact edges and ties, found among their own entries."""
    from hf_cft.merging._fused_kernels import rank_bucket

    np = _kernels()["np"]
    _threads()
    xs = [f.numpy() for f in flats]
    n = xs[0].size
    count = len(xs)
    lows = np.full(count, np.inf, dtype=np.float32)  # [inf, inf): nothing kept
    highs = np.full(count, np.inf, dtype=np.float32)
    flag_lows = np.zeros((count, 2), dtype=np.float32)  # [0, 0): no flag
    flag_highs = np.zeros((count, 2), dtype=np.float32)
    edges: list[list] = []  # per input: (edge index, rank, bucket's higher count) of each edge it has
    bad = 0
    for t, (x, (start, stop)) in enumerate(zip(xs, bands)):
        edges.append([])
        counts, _ = _histogram(np, x.view(np.uint32))  # (also where no edge needs it: the NaN/inf count)
        bad += _nonfinite(counts)
        if stop <= start:
            continue
        lows[t] = 0.0
        if stop < n:  # the lower edge: the stop-th largest magnitude
            bucket, higher = rank_bucket(counts, stop)
            flag_lows[t, 0], flag_highs[t, 0] = _bucket_range(np, bucket)
            lows[t] = flag_highs[t, 0]
            edges[t].append((0, stop, higher))
        if start > 0:  # the upper edge: the start-th largest
            bucket, higher = rank_bucket(counts, start)
            flag_lows[t, 1], flag_highs[t, 1] = _bucket_range(np, bucket)
            highs[t] = flag_lows[t, 1]
            edges[t].append((1, start, higher))
    if bad:
        return None, bad, False
    w = np.array(weights, dtype=np.float32)
    out = torch.empty(n)
    flags = np.empty(n, dtype=np.bool_)
    bad_out = _run("band_sum_flagged", n, tuple(xs), lows, highs, flag_lows, flag_highs, w, out.numpy(), flags)
    where = np.flatnonzero(flags)
    if not where.size:
        return out, 0, not bad_out
    total = None
    for t, (x, (start, stop)) in enumerate(zip(xs, bands)):
        sub = torch.from_numpy(x[where])
        mags = sub.abs().numpy()
        if stop <= start:
            keep = torch.zeros(where.size, dtype=torch.bool)
        else:
            found = {}
            for e, rank, higher in edges[t]:
                found[e] = _rank_in_bucket(np, mags, (flag_lows[t, e], flag_highs[t, e]), rank, higher)
            lo = found[0][0] if 0 in found else -math.inf
            hi = found[1][0] if 1 in found else math.inf
            keep = torch.from_numpy((mags >= np.float32(lo)) & (mags < np.float32(hi)))
            tied = [found[e] for e in found if found[e][1] + found[e][2] > (stop if e == 0 else start)]
            if lo == hi:
                tied = [found[0]]
            for value, greater, _ in dict.fromkeys(tied):  # entries equal to an edge that straddles the band
                equal = np.flatnonzero(mags == np.float32(value))  # all at flagged positions, in position order
                keep[torch.from_numpy(equal)] = False
                keep[torch.from_numpy(equal[max(0, start - greater) : max(0, stop - greater)])] = True
        term = (sub * keep).mul_(float(w[t]))
        total = term if total is None else total.add_(term)
    out.numpy()[where] = total.numpy()
    # finite where both passes were (a non-finite first-pass result may have been replaced: then "not known")
    return out, 0, not bad_out and bool(torch.isfinite(total).all())
