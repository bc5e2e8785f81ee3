"""The numba kernels of :mod:`hf_cft.merging.fused` (imported only when numba is installed). Module-level functions,
so numba's on-disk cache (``cache=True``) keeps them compiled across processes."""

import types
from typing import NamedTuple

import numpy as np
from numba import njit, prange


class Kernel(NamedTuple):
    """One kernel compiled twice: on every core, and on one (``serial``, for small inputs: a launch on numba's
    thread pool costs more than it saves there)."""

    parallel: object
    serial: object


def _both(fn) -> Kernel:
    serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    serial.__qualname__ = fn.__qualname__ + "_serial"  # its own entry in numba's disk cache
    serial.__doc__ = fn.__doc__
    return Kernel(njit(cache=True, parallel=True)(fn), njit(cache=True)(serial))


f32 = np.float32
zero = f32(0.0)


@_both
def ties_mean_flagged(xs, thresholds, lows, weights, scaled, out, flags):
    """TIES (per-tensor trim, sign election, disjoint mean) of the inputs ``xs`` into ``out``: per entry, each input
    kept where |x| ≥ its threshold, +0.0 elsewhere, times its weight; σ = sign of the sum; the mean of the kept
    entries whose sign is σ. ``flags[i]`` is True where some input's |x| lies in [lows[t], thresholds[t]) (the bucket
    of its exact threshold: the caller merges those entries again; lows = thresholds flags nothing). Returns the count
    of NaN/inf results. (Written out, without calls or branches on rare cases: numba then vectorises the loop.)"""
    n = out.size
    t_count = len(xs)
    bad = 0
    for i in prange(n):
        total = zero
        flag = False
        for t in range(t_count):
            x = xs[t][i]
            a = abs(x)
            flag = flag | ((a >= lows[t]) & (a < thresholds[t]))
            v = x if a >= thresholds[t] else zero
            if scaled:
                v = v * weights[t]
            total = v if t == 0 else total + v
        elected = f32(1.0) if total > 0 else (f32(-1.0) if total < 0 else zero)
        num = zero
        count = 0
        for t in range(t_count):
            x = xs[t][i]
            v = x if abs(x) >= thresholds[t] else zero
            if scaled:
                v = v * weights[t]
            agree = v * elected > zero  # sign(v) = σ ≠ 0 (one product: σ is ±1 or 0)
            term = v if agree else v * zero
            num = term if t == 0 else num + term
            if agree:
                count += 1
        value = num / f32(max(count, 1))
        out[i] = value
        flags[i] = flag
        bad += value - value != zero
    return bad


@_both
def band_sum_flagged(xs, lows, highs, flag_lows, flag_highs, weights, out, flags):
    """Breadcrumbs' Σ_t w_t·(m_t ⊙ τ_t) with m_t = lows[t] ≤ |x| < highs[t]; ``flags[i]`` True where some input's |x|
    lies in one of its two flag ranges ``[flag_lows[t, e], flag_highs[t, e])`` (the buckets of its exact band edges:
    the caller sums those entries again; empty ranges flag nothing). Returns the count of NaN/inf results."""
    n = out.size
    t_count = len(xs)
    bad = 0
    for i in prange(n):
        acc = zero
        flag = False
        for t in range(t_count):
            x = xs[t][i]
            a = abs(x)
            flag = flag | ((a >= flag_lows[t, 0]) & (a < flag_highs[t, 0])) | ((a >= flag_lows[t, 1]) & (a < flag_highs[t, 1]))
            term = (x if ((a >= lows[t]) & (a < highs[t])) else x * zero) * weights[t]
            acc = term if t == 0 else acc + term
        out[i] = acc
        flags[i] = flag
        bad += acc - acc != zero
    return bad


@_both
def consensus(xs, weights, scaled, lambdas, k, out):
    """Consensus / TALL masks: r_t = w_t·τ_t, total = Σ_t r_t; keep total where at least k inputs have
    |r_t| > λ_t·|total − r_t|."""
    n = out.size
    t_count = len(xs)
    for i in prange(n):
        total = zero
        for t in range(t_count):
            r = xs[t][i] * weights[t] if scaled[t] else xs[t][i]
            total = r if t == 0 else total + r
        votes = 0
        for t in range(t_count):
            r = xs[t][i] * weights[t] if scaled[t] else xs[t][i]
            if abs(r) > abs(total - r) * lambdas[t]:
                votes += 1
        out[i] = total if votes >= k else total * zero


@_both
def magmax(xs, weights, scaled, later, out):
    """MagMax's fold: best = w_0·τ_0, then each w_t·τ_t replaces it where its magnitude is ≥ (``later``) or >.
    Returns the counts of NaN/inf input entries and results (x − x is NaN there: no other check is needed)."""
    n = out.size
    t_count = len(xs)
    bad = 0
    bad_out = 0
    for i in prange(n):
        best = xs[0][i] * weights[0]
        bad += xs[0][i] - xs[0][i] != zero
        for t in range(1, t_count):
            x = xs[t][i] * weights[t] if scaled[t] else xs[t][i]
            bad += xs[t][i] - xs[t][i] != zero
            if (abs(x) >= abs(best)) if later else (abs(x) > abs(best)):
                best = x
        out[i] = best
        bad_out += best - best != zero
    return bad, bad_out


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot64(a, b):
    """Σ_i a_i·b_i of two fp32 arrays, each product exact in fp64, summed in fp64 in any order (vectorised)."""
    acc = 0.0
    for i in range(a.size):
        acc += np.float64(a[i]) * np.float64(b[i])
    return acc


@njit(cache=True, fastmath={"reassoc", "contract"})
def _sum_gram2(x0, x1, out):
    """T = 2 in one loop: ``out`` = x0 + x1 (fp32) and ``(⟨x0, x0⟩, ⟨x0, x1⟩, ⟨x1, x1⟩)`` as :func:`_dot64` sums them
    (each input read once, where three dots and a sum read it three times)."""
    s00 = 0.0
    s01 = 0.0
    s11 = 0.0
    for i in range(out.size):
        a = x0[i]
        b = x1[i]
        out[i] = a + b
        da = np.float64(a)
        db = np.float64(b)
        s00 += da * da
        s01 += da * db
        s11 += db * db
    return s00, s01, s11


#: the entries of one block of :func:`gram_sum` (T blocks of it stay in the core's cache for the T(T+1)/2 products)
GRAM_BLOCK = 4096


@_both
def gram_sum(xs, grams, out):
    """In one pass over the inputs, block by block: ``out`` = Σ_t x_t (fp32, in list order)
    and block b's Gram matrix ⟨x_a, x_b⟩ (fp64, :func:`_dot64`) into ``grams[b]`` (the caller sums the blocks); two
    inputs in one loop (:func:`_sum_gram2`)."""
    n = out.size
    t_count = len(xs)
    for blk in prange(grams.shape[0]):
        lo = blk * GRAM_BLOCK
        hi = min(n, lo + GRAM_BLOCK)
        first = xs[0][lo:hi]
        part = out[lo:hi]
        if t_count == 2:
            g00, g01, g11 = _sum_gram2(first, xs[1][lo:hi], part)
            grams[blk, 0, 0] = g00
            grams[blk, 0, 1] = g01
            grams[blk, 1, 0] = g01
            grams[blk, 1, 1] = g11
            continue
        for i in range(hi - lo):
            part[i] = first[i]
        for t in range(1, t_count):
            x = xs[t][lo:hi]
            for i in range(hi - lo):
                part[i] = part[i] + x[i]
        for a in range(t_count):
            xa = xs[a][lo:hi]
            for b in range(a, t_count):
                g = _dot64(xa, xs[b][lo:hi])
                grams[blk, a, b] = g
                grams[blk, b, a] = g


@_both
def scale_in_place(out, divisor, factor):
    """``out`` = out / divisor · factor (fp32: the torch kernels' division, then product); returns the count of
    NaN/inf results."""
    bad = 0
    for i in prange(out.size):
        value = out[i] / divisor * factor
        out[i] = value
        bad += value - value != zero
    return bad


BUCKETS = 1 << 16


@_both
def magnitude_histogram(bits, chunks, hist):
    """Per chunk of entries, the count of each top-16-bit bucket of |x| (``bits``: the fp32 bit patterns as uint32;
    without the sign bit they order as the magnitudes do), chunk c's counts at ``hist[c·2¹⁶:]`` (one flat array: the
    loop then indexes it directly)."""
    n = bits.size
    size = (n + chunks - 1) // chunks
    for c in prange(chunks):
        part = bits[c * size : min(n, (c + 1) * size)]  # indexed from 0: no negative-index wraparound in the loop
        base = c * BUCKETS
        for i in range(part.size):
            hist[base + ((part[i] & np.uint32(0x7FFFFFFF)) >> np.uint32(15))] += 1


@njit(cache=True)
def rank_bucket(counts, rank):
    """``(bucket, higher)``: the highest bucket with at least ``rank`` entries at or above it, and the count of the
    entries above it (scanning down from the top bucket)."""
    higher = 0
    for b in range(counts.size - 1, -1, -1):
        if higher + counts[b] >= rank:
            return b, higher
        higher += counts[b]
    return 0, higher


@_both
def bucket_entries(bits, chunks, bucket, offsets, out):
    """The |x| bit patterns of the entries in ``bucket``, chunk c's from ``offsets[c]`` on (its count in the
    histogram gives the room)."""
    n = bits.size
    size = (n + chunks - 1) // chunks
    for c in prange(chunks):
        j = offsets[c]
        part = bits[c * size : min(n, (c + 1) * size)]
        for i in range(part.size):
            b = part[i] & np.uint32(0x7FFFFFFF)
            if (b >> np.uint32(15)) == bucket:
                out[j] = b
                j += 1


u64 = np.uint64
COUNTER_STEP = u64(0x9E3779B97F4A7C15)
COUNTER_MIX0 = u64(0xBF58476D1CE4E5B9)
COUNTER_MIX1 = u64(0x94D049BB133111EB)


@njit(cache=True)
def _counter_draw(key, c):
    """Draw ``c`` of the counter stream with ``key``: the top 24 bits of SplitMix64's finaliser of key + c·φ."""
    h = c * COUNTER_STEP + key
    h = h ^ (h >> u64(30))
    h = h * COUNTER_MIX0
    h = h ^ (h >> u64(27))
    h = h * COUNTER_MIX1
    h = h ^ (h >> u64(31))
    return h >> u64(40)


#: dare_ta's entries per block: each block's output stays in L1 while every input is added to it
DARE_BLOCK = 2048


@_both
def dare_ta(xs, key, starts, thresholds, keeps, dropped, weights, scaled, out):
    """DARE then task arithmetic with the counter stream: per entry, each input's draw ``starts[t] + i``
    (:func:`hf_cft.merging.baselines.counter_draws`: the top 24 bits of SplitMix64's finaliser of key + c·φ) keeps
    x where it is below its threshold (x·0 elsewhere), divided by its keep probability (inputs not ``dropped`` are
    taken whole), times its weight where ``scaled``, summed in list order: the blocked torch kernel's fp32 operations.

    Block by block, one input at a time inside a block: the inner loop then reads one array, which LLVM vectorises
    on one core too (an entry-major loop over the tuple of inputs ran 5× slower there)."""
    n = out.size
    t_count = len(xs)
    for b in prange((n + DARE_BLOCK - 1) // DARE_BLOCK):
        lo = b * DARE_BLOCK
        hi = min(lo + DARE_BLOCK, n)
        o = out[lo:hi]
        for t in range(t_count):
            x = xs[t][lo:hi]
            start = starts[t] + u64(lo)
            threshold, keep, weight, drop, scale = thresholds[t], keeps[t], weights[t], dropped[t], scaled[t]
            for i in range(hi - lo):
                v = x[i]
                if drop:
                    v = v if _counter_draw(key, start + u64(i)) < threshold else v * zero
                    v = v / keep
                if scale:
                    v = v * weight
                o[i] = v if t == 0 else o[i] + v


u32 = np.uint32
MT_N, MT_M = 624, 397
MT_UPPER, MT_LOWER, MT_MATRIX = u32(0x80000000), u32(0x7FFFFFFF), u32(0x9908B0DF)


@njit(cache=True)
def mt19937_seed(seed, key):
    """MT19937's 624 state words for a 32-bit ``seed`` into ``key`` (Matsumoto & Nishimura's initialisation, as
    numpy's ``RandomState(seed)`` and torch's CPU generator seed it; the next word to temper is then past the end)."""
    x = u32(seed)
    for k in range(MT_N):
        key[k] = x
        x = u32(u32(1812433253) * (x ^ (x >> u32(30))) + u32(k + 1))  # mod 2³²


@njit(cache=True)
def _mt_twist(key):
    """MT19937's next 624 state words, in place (Matsumoto & Nishimura 1998), in the three runs that read no word
    the same run writes later (each vectorised)."""
    for k in range(MT_N - MT_M):
        y = (key[k] & MT_UPPER) | (key[k + 1] & MT_LOWER)
        key[k] = key[k + MT_M] ^ (y >> u32(1)) ^ ((y & u32(1)) * MT_MATRIX)
    for k in range(MT_N - MT_M, MT_N - 1):
        y = (key[k] & MT_UPPER) | (key[k + 1] & MT_LOWER)
        key[k] = key[k + MT_M - MT_N] ^ (y >> u32(1)) ^ ((y & u32(1)) * MT_MATRIX)
    y = (key[MT_N - 1] & MT_UPPER) | (key[0] & MT_LOWER)
    key[MT_N - 1] = key[MT_M - 1] ^ (y >> u32(1)) ^ ((y & u32(1)) * MT_MATRIX)


@njit(cache=True)
def _mt_temper_low24(words, out):
    """MT19937's tempered outputs of ``words``, their low 24 bits (torch's Bernoulli draw) into ``out``."""
    for k in range(words.size):
        y = words[k]
        y ^= y >> u32(11)
        y ^= (y << u32(7)) & u32(0x9D2C5680)
        y ^= (y << u32(15)) & u32(0xEFC60000)
        y ^= y >> u32(18)
        out[k] = y & u32(0xFFFFFF)


@njit(cache=True)
def mt19937_low24(key, pos, out):
    """The next ``out.size`` 32-bit outputs of the MT19937 state (``key``: its 624 words, ``pos[0]``: the next word
    to temper; both advanced in place, numpy's ``MT19937`` state layout), each kept to its low 24 bits."""
    p = pos[0]
    i = 0
    n = out.size
    while i < n:
        if p >= MT_N:
            _mt_twist(key)
            p = 0
        m = min(MT_N - p, n - i)
        _mt_temper_low24(key[p : p + m], out[i : i + m])
        i += m
        p += m
    pos[0] = p


@_both
def dare_add(x, dropped, draws, threshold, keep, weight, scaled, first, out):
    """One input of DARE + task arithmetic with given draws (the CPU generator's stream): where ``dropped``, x where
    its draw is below ``threshold`` (x·0 elsewhere) divided by ``keep`` (else x whole), times ``weight`` where
    ``scaled``, written to ``out`` where ``first``, else added to it: :func:`dare_ta`'s operations for one input."""
    for i in prange(out.size):
        v = x[i]
        if dropped:
            v = v if u64(draws[i]) < threshold else v * zero
            v = v / keep
        if scaled:
            v = v * weight
        out[i] = v if first else out[i] + v


#: a row whose largest magnitude bucket holds more entries than this is ranked by a sort instead (a row of equal or
#: clustered magnitudes: an insertion sort inside one bucket would cost its size squared)
RANK_BUCKET_MAX = 48


@_both
def della_elect(xs, rows, weights, scaled, drops, bases, eps, key, starts, draws, counter, out):
    """DELLA on the inputs ``xs`` (each ``rows`` rows of n entries, flat) into ``out``: per row and input, v = x (times
    its weight where ``scaled``), each entry's rank r by |v| in its row (ties by position), its keep probability
    q = 1 − ((n−1−r)·ε / (n−1) + base) (fp32, the numpy MagPrune's operations; one entry: 1 − drop), kept where its
    draw u·2⁻²⁴ < q (the counter stream's draw ``starts[t] + i`` where ``counter``, else ``draws[t, i]``), v/q kept and
    v·0/q dropped; then TIES's election and disjoint mean over the inputs, as :func:`ties_mean_flagged`.

    The ranks come from a counting sort: |v|·B/max|v| buckets (B ≥ 2n, monotone in |v|), each entry placed at its
    bucket's next slot, then an insertion sort that only ever moves an entry inside its bucket (few share one; equal
    magnitudes keep their order of position); a row with a crowded bucket is sorted instead. Only the entries that
    may be kept (u below the largest q) read their rank. Returns the count of rows with NaN/inf inputs
    plus NaN/inf results (their values are not defined: the caller reruns the reference there)."""
    t_count = len(xs)
    n = out.size // rows
    big = 16
    while big < 2 * n:  # about one entry in three buckets: few share one (n buckets: 2.5 ns more per entry to sort)
        big *= 2
    chunks = min(rows, 256)
    bad = 0
    unit = f32(2.0**-24)
    # q by rank, per input: the same in every row
    keep_by_rank = np.empty((t_count, n), dtype=np.float32)
    for t in range(t_count):
        for r in range(n):
            if n == 1:
                keep_by_rank[t, r] = f32(1.0) - drops[t]
            else:
                keep_by_rank[t, r] = f32(1.0) - (f32(n - 1 - r) * eps / f32(n - 1) + bases[t])
    for c in prange(chunks):
        ys = np.empty((t_count, n), dtype=np.float32)
        mags = np.empty(n, dtype=np.float32)
        bucket = np.empty(n, dtype=np.int32)
        counts = np.empty(big, dtype=np.int32)
        order = np.empty(n, dtype=np.int32)
        sorted_mags = np.empty(n, dtype=np.float32)
        ranks = np.empty(n, dtype=np.int32)
        sort_keys = np.empty(n, dtype=np.int64)
        uniforms = np.empty(n, dtype=np.float32)
        candidates = np.empty(n, dtype=np.int32)
        results = np.empty(n, dtype=np.float32)
        mag_bits = mags.view(np.int32)
        top_bits = np.empty(1, dtype=np.int32)
        top_mag = top_bits.view(np.float32)
        local_bad = 0
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            off = r * n
            row_bad = False
            for t in range(t_count):
                x = xs[t]
                y = ys[t]
                w = weights[t]
                row = x[off : off + n]
                if scaled[t]:
                    for i in range(n):
                        y[i] = row[i] * w
                else:
                    for i in range(n):
                        y[i] = row[i]
                for i in range(n):
                    mags[i] = abs(y[i])
                top = np.int32(0)
                for i in range(n):
                    top = max(top, mag_bits[i])  # |v|'s bits order as |v| does, inf and NaN above every finite
                if top >= np.int32(0x7F800000):
                    row_bad = True
                    continue
                top_bits[0] = top
                amax = top_mag[0]
                q_by_rank = keep_by_rank[t]
                q_max = q_by_rank[n - 1]  # q falls with the rank, op by op
                # each entry's bucket, the buckets' sizes
                scale = np.float64(big) / np.float64(amax) if amax > zero else 0.0  # fp64: no overflow
                for i in range(n):
                    bucket[i] = min(np.int32(np.float64(mags[i]) * scale), np.int32(big - 1))
                for b in range(big):
                    counts[b] = 0
                for i in range(n):
                    counts[bucket[i]] += 1
                crowded = 0
                for b in range(big):
                    crowded = max(crowded, counts[b])
                if crowded > RANK_BUCKET_MAX:
                    for i in range(n):
                        sort_keys[i] = (np.int64(mag_bits[i]) << 32) | i
                    sort_keys.sort()
                    for s in range(n):
                        ranks[sort_keys[s] & 0xFFFFFFFF] = s
                else:
                    total = 0
                    for b in range(big):
                        size = counts[b]
                        counts[b] = total
                        total += size
                    for i in range(n):
                        b = bucket[i]
                        s = counts[b]
                        order[s] = i
                        sorted_mags[s] = mags[i]
                        counts[b] = s + 1
                    # buckets are in order of magnitude: sorting inside each finishes the sort. Strict comparisons
                    # keep equal magnitudes in order of position (their order in the bucket)
                    for s in range(1, n):
                        m = sorted_mags[s]
                        if m < sorted_mags[s - 1]:
                            i = order[s]
                            j = s
                            while j > 0 and sorted_mags[j - 1] > m:
                                sorted_mags[j] = sorted_mags[j - 1]
                                order[j] = order[j - 1]
                                j -= 1
                            sorted_mags[j] = m
                            order[j] = i
                    for s in range(n):
                        ranks[order[s]] = s
                # the draws as fp32 uniforms (below 2²⁴: exact through int32), then the entries that may be kept (u
                # below the largest q) gathered without a branch; every entry is first dropped (v·0: the sign of
                # zero kept)
                if counter:
                    first_draw = starts[t] + u64(off)
                    for i in range(n):
                        uniforms[i] = f32(np.int32(_counter_draw(key, first_draw + u64(i)))) * unit
                else:
                    row_draws = draws[t, off : off + n]
                    for i in range(n):
                        uniforms[i] = f32(np.int32(row_draws[i])) * unit
                kept = 0
                for i in range(n):
                    candidates[kept] = i
                    kept += uniforms[i] < q_max
                for k in range(kept):
                    i = candidates[k]
                    q = q_by_rank[ranks[i]]
                    v = y[i]
                    results[k] = (v if uniforms[i] < q else v * zero) / q
                for i in range(n):
                    y[i] = y[i] * zero
                for k in range(kept):
                    y[candidates[k]] = results[k]
            if row_bad:
                local_bad += 1
                continue
            for i in range(n):
                total = zero
                for t in range(t_count):
                    total = ys[t, i] if t == 0 else total + ys[t, i]
                elected = f32(1.0) if total > 0 else (f32(-1.0) if total < 0 else zero)
                num = zero
                count = 0
                for t in range(t_count):
                    v = ys[t, i]
                    agree = v * elected > zero
                    term = v if agree else v * zero
                    num = num + term  # from +0.0, as torch's sum over the stacked inputs
                    if agree:
                        count += 1
                value = num / f32(max(count, 1))
                out[off + i] = value
                local_bad += value - value != zero
        bad += local_bad
    return bad
