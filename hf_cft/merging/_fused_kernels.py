"""The numba kernels of :mod:`hf_cft.merging.fused` (imported only when numba is installed). Module-level functions,
so numba's on-disk cache (``cache=True``) keeps them compiled across processes."""

import numpy as np
from numba import njit, prange

f32 = np.float32
zero = f32(0.0)


@njit(cache=True, inline="always")
def _sign(v):
    if v > 0:
        return f32(1.0)
    if v < 0:
        return f32(-1.0)
    return v  # ±0 (as torch.sign)


@njit(cache=True, inline="always")
def _dropped(drops, i):
    """Whether position i is in the sorted int64 array ``drops`` (binary search)."""
    lo, hi = 0, drops.size
    while lo < hi:
        mid = (lo + hi) // 2
        if drops[mid] < i:
            lo = mid + 1
        else:
            hi = mid
    return lo < drops.size and drops[lo] == i


@njit(cache=True, inline="always")
def _trimmed(x, threshold, drops, i):
    """x kept by the trim (|x| ≥ threshold, the tied positions in ``drops`` dropped), +0.0 otherwise."""
    if abs(x) < threshold:
        return zero
    if abs(x) == threshold and drops.size and _dropped(drops, i):
        return zero
    return x


@njit(cache=True, parallel=True)
def ties_mean(xs, thresholds, drops, weights, scaled, out):
    """TIES (per-tensor trim, sign election, disjoint mean) of the inputs ``xs`` into ``out``: per entry, each
    input kept where |x| ≥ its threshold (less its ``drops``, ties by position), +0.0 elsewhere, times its
    weight; σ = sign of the sum; the mean of the kept entries whose sign is σ."""
    n = out.size
    t_count = len(xs)
    for i in prange(n):
        total = zero
        for t in range(t_count):
            v = _trimmed(xs[t][i], thresholds[t], drops[t], i)
            if scaled:
                v = v * weights[t]
            total = v if t == 0 else total + v
        elected = _sign(total)
        num = zero
        count = 0
        for t in range(t_count):
            v = _trimmed(xs[t][i], thresholds[t], drops[t], i)
            if scaled:
                v = v * weights[t]
            agree = elected != 0 and _sign(v) == elected
            s = v if agree else v * zero
            num = s if t == 0 else num + s
            count += agree
        out[i] = num / f32(max(count, 1))


@njit(cache=True, parallel=True)
def band_sum(xs, lows, highs, tie_values, tie_inside, tie_owner, weights, out):
    """Breadcrumbs' Σ_t w_t·(m_t ⊙ τ_t): m_t = lo_t ≤ |x| < hi_t, except entries whose magnitude equals one of
    the input's tie values, kept iff their position is in that value's sorted ``tie_inside`` array."""
    n = out.size
    t_count = len(xs)
    g_count = len(tie_values)
    for i in prange(n):
        acc = zero
        for t in range(t_count):
            x = xs[t][i]
            a = abs(x)
            keep = a >= lows[t] and a < highs[t]
            for g in range(g_count):
                if tie_owner[g] == t and a == tie_values[g]:
                    keep = _dropped(tie_inside[g], i)
            term = (x if keep else x * zero) * weights[t]
            acc = term if t == 0 else acc + term
        out[i] = acc


@njit(cache=True, parallel=True)
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


@njit(cache=True, parallel=True)
def magmax(xs, weights, scaled, later, out):
    """MagMax's fold: best = w_0·τ_0, then each w_t·τ_t replaces it where its magnitude is ≥ (``later``) or >."""
    n = out.size
    t_count = len(xs)
    for i in prange(n):
        best = xs[0][i] * weights[0]
        for t in range(1, t_count):
            x = xs[t][i] * weights[t] if scaled[t] else xs[t][i]
            if (abs(x) >= abs(best)) if later else (abs(x) > abs(best)):
                best = x
        out[i] = best


@njit(cache=True, parallel=True)
def gram_sum(xs, chunks, partial, out):
    """Σ_t τ_t (in list order, fp32) into ``out`` and, per chunk of entries, the T×T products in fp64."""
    n = out.size
    t_count = len(xs)
    size = (n + chunks - 1) // chunks
    for c in prange(chunks):
        for i in range(c * size, min(n, (c + 1) * size)):
            total = xs[0][i]
            for t in range(1, t_count):
                total = total + xs[t][i]
            out[i] = total
            for a in range(t_count):
                xa = np.float64(xs[a][i])
                for b in range(a, t_count):
                    partial[c, a, b] += xa * np.float64(xs[b][i])


@njit(cache=True, parallel=True)
def scale(out, divisor, factor):
    """out ← out / divisor · factor (fp32, in place)."""
    for i in prange(out.size):
        out[i] = out[i] / divisor * factor
