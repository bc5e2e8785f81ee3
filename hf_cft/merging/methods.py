"""Current CLIP merging methods on dense task deltas (FusionBench's and recent papers' baselines), key by key.

Every function takes a list of task deltas τ_t = θ_t − θ0 (``dict[str, Tensor]`` with identical keys and shapes;
for LoRA the dense s·B·A, see :mod:`hf_cft.merging.baselines`) and returns the merged delta τ_m in fp32, scaling
already applied, so that the deployed model is θ0 + τ_m. Each key is merged from that key's tensors only, so every
method here can run one tensor at a time (the streaming merge reads one tensor of each input per key).

=====================  ==========================================================================================
:func:`tsv_m`           Task Singular Vectors merge (arXiv:2412.00081): per matrix, each task's top 1/T singular
                        triplets, U and V orthogonalised (Procrustes), reassembled; other keys averaged (α = 1)
:func:`iso_c`           Isotropic merging in the common subspace (arXiv:2502.04959): SVD of Σ_t τ_t, every
                        singular value replaced by their mean; other keys averaged (α = 1)
:func:`iso_cts`         Iso-CTS: the top 80 % directions of Σ_t τ_t plus each task's top directions outside them,
                        orthogonalised, with isotropic singular values (α = 1)
:func:`model_stock`     Model Stock (arXiv:2403.19522): per tensor t·mean_t τ_t, t = T·cos/(1 + (T−1)·cos)
:func:`breadcrumbs`     Model Breadcrumbs (arXiv:2312.06795): per task and tensor drop the top-γ and the smallest
                        magnitudes, keep a ``density`` band, then task arithmetic (γ = 0.01, density 0.1, λ = 0.3)
:func:`della`           DELLA (arXiv:2406.11617): MagPrune (magnitude-ranked drop probabilities, 1/(1−p_i)
                        rescale), then TIES's sign election and disjoint mean, ×λ (density 0.3, ε = 0.1, λ = 1)
:func:`slerp`           spherical interpolation of two deltas (or of two models θ0 + τ with ``base``), per tensor,
                        linear where the two are (nearly) colinear (t = 0.5)
=====================  ==========================================================================================

Continual form: :class:`ContinualSLERP` (m_t = slerp(m_{t−1}, τ_t, 1/t), the spherical running mean). The other
methods are re-run over the experts so far by the continual driver (``hf_cft.continual.baseline_strategies``).

Example::

    from hf_cft.merging.methods import tsv_m, iso_cts, breadcrumbs, slerp

    merged = tsv_m([delta_1, delta_2, delta_3])              # {key: fp32 tensor}, θ = θ0 + merged
    merged = breadcrumbs([delta_1, delta_2], density=0.1, gamma=0.01, lam=0.3)
    halfway = slerp([delta_1, delta_2], t=0.5)

Bad input raises the typed errors of :mod:`hf_cft.merging.baselines`: an empty list → :class:`~hf_cft.errors.TaskError`,
keys or shapes that differ → :class:`~hf_cft.errors.DeltaError` naming the key, NaN/inf →
:class:`~hf_cft.errors.NonFiniteError`, an option out of range → :class:`~hf_cft.errors.MergeConfigError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from hf_cft.errors import DeltaError, MergeConfigError, NonFiniteError, TaskError
from hf_cft.merging import fused
from hf_cft.merging.baselines import (
    DARE_RNGS,
    ContinualMerger,
    Delta,
    _blocked,
    _blocks,
    _check_deltas,
    _check_fraction,
    _counted,
    _elect_blocked,
    _f32,
    _finite_result,
    _mask_source,
    _per_input,
    _Scratch,
    _stacked_block,
    _Stream,
    _weights,
    key_predicate,
)
from hf_cft.validation import check_choice, check_number

__all__ = [
    "ContinualSLERP",
    "breadcrumbs",
    "breadcrumbs_mask",
    "group_ranks",
    "della",
    "iso_c",
    "iso_cts",
    "magprune",
    "model_stock",
    "model_stock_ratio",
    "procrustes",
    "rank_band",
    "slerp",
    "slerp_tensor",
    "tsv_m",
]

MatrixKeys = Callable[[str, Tensor], bool] | Iterable[str] | None


def _scale(name: str, value: float) -> float:
    return check_number(value, name, error=MergeConfigError)


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    return sum(tensors) / len(tensors)


# ------------------------------------------------------------------------------------------------ SVD methods


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``(U, S, Vᴴ)`` of ``x``. LAPACK's default divide-and-conquer driver (``gesdd``, torch's on the
    CPU) can fail to converge on ill-conditioned matrices or ones with many repeated singular values, e.g. the
    concatenated singular vectors of TSV-M; then the SVD is retried in float64, and then with SciPy's slower QR
    driver (``gesvd``) where SciPy is installed; the factors come back in ``x``'s dtype."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError as first:
        try:
            u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        except torch.linalg.LinAlgError:
            try:
                import scipy.linalg
            except ImportError:
                raise first from None
            u, s, vh = (
                torch.from_numpy(a)
                for a in scipy.linalg.svd(x.double().cpu().numpy(), full_matrices=False, lapack_driver="gesvd")
            )
        return u.to(x), s.to(x), vh.to(x)


def procrustes(x: Tensor) -> Tensor:
    """The (semi-)orthogonal matrix nearest to ``x`` in Frobenius norm: P·Qᵀ for x = P·Σ·Qᵀ (the orthogonal
    Procrustes solution; TSV-M and Iso-CTS "whiten" their concatenated singular vectors with it)."""
    p, _, qh = svd(x)
    return p @ qh


def _tsv_matrix(tensors: Sequence[Tensor]) -> Tensor:
    """TSV-M on one matrix: each task's top ⌊r/T⌋ singular triplets (at least one), U and V orthogonalised."""
    n = len(tensors)
    us, ss, vs = [], [], []
    for t in tensors:
        u, s, vh = svd(t)
        k = max(1, s.shape[0] // n)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    return procrustes(u_cat) @ torch.diag(s_cat) @ procrustes(v_cat).T


def tsv_m(deltas: Sequence[Mapping[str, Tensor]], alpha: float = 1.0, matrix_keys: MatrixKeys = None) -> Delta:
    """TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv:2412.00081), key by key:

    * a matrix key (``matrix_keys``; default 2-D weights that are not embeddings): for every task the SVD
      τ_t = U_t S_t V_tᵀ, its top k = ⌊r/T⌋ singular triplets (r = min(m, n)); the concatenations
      U = [U_1,k … U_T,k], V = [V_1,k … V_T,k] are replaced by their nearest orthogonal matrices (:func:`procrustes`)
      and τ_m = U_⊥ · diag(S_1,k … S_T,k) · V_⊥ᵀ;
    * any other key (biases, LayerNorms, embeddings): the mean (1/T)·Σ_t τ_t, as the reference code;

    returns α·τ_m (α = 1, the paper's setting). Where r < T the reference keeps ⌊r/T⌋ = 0 triplets and zeroes the
    matrix; here every task keeps at least one (the concatenation then has T > r columns, and its Procrustes factor
    has orthonormal rows instead).
    """
    return _per_key(deltas, alpha, matrix_keys, _tsv_matrix)


def _iso_c_matrix(tensors: Sequence[Tensor]) -> Tensor:
    """Iso-C on one matrix: mean(S)·U Vᵀ of the SVD of the task sum."""
    u, s, vh = svd(sum(tensors))
    return s.mean() * (u @ vh)


def svd_key(key: str, tensors: Sequence[Tensor], matrix_fn: Callable, is_matrix=None) -> Tensor:
    """One key of an SVD method: ``matrix_fn(tensors)`` for a matrix key (``is_matrix``, default
    :func:`~hf_cft.merging.baselines.default_opcm_linear_key`), else the mean of the tensors."""
    is_matrix = is_matrix or key_predicate(None)
    return matrix_fn(tensors) if is_matrix(key, tensors[0]) else _mean(tensors)


def _per_key(deltas, alpha: float, matrix_keys: MatrixKeys, matrix_fn: Callable) -> Delta:
    deltas = _check_deltas(deltas)
    alpha = _scale("alpha", alpha)
    is_matrix = key_predicate(matrix_keys)
    out = {key: alpha * svd_key(key, [_f32(d[key]) for d in deltas], matrix_fn, is_matrix) for key in deltas[0]}
    return _finite_result(out, f"alpha={alpha!r}")


def iso_c(deltas: Sequence[Mapping[str, Tensor]], alpha: float = 1.0, matrix_keys: MatrixKeys = None) -> Delta:
    """Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025, arXiv:2502.04959):

    * a matrix key: Σ_t τ_t = U S Vᵀ and τ_m = mean(S)·U Vᵀ (every singular value replaced by their mean, so the
      merge acts equally in every direction the task sum spans);
    * any other key: the mean (1/T)·Σ_t τ_t (as the reference code and FusionBench);

    returns α·τ_m (α = 1, FusionBench's default; the paper tunes it on validation data).
    """
    return _per_key(deltas, alpha, matrix_keys, _iso_c_matrix)


def iso_cts_split(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions k_c, directions per task k_t) of Iso-CTS for a matrix of rank ``rank``: k_c starts at
    ⌊f·r⌋, the rest r − k_c is rounded to a multiple of T (so each task gets the same share) and
    k_c = r − T·k_t. The concatenation then has exactly r columns."""
    common = int(rank * common_fraction)
    per_task = round((rank - common) / num_tasks)
    return rank - per_task * num_tasks, per_task


def _iso_cts_matrix(tensors: Sequence[Tensor], common_fraction: float) -> Tensor:
    rank = min(tensors[0].shape)
    k_c, k_t = iso_cts_split(rank, len(tensors), common_fraction)
    u, s, vh = svd(sum(tensors))
    u_c = u[:, :k_c]
    us, ss, vs = [u_c], [s[:k_c]], [vh[:k_c]]
    for t in tensors:
        specific = t - u_c @ (u_c.T @ t)  # the task's part outside the common subspace
        ut, st, vht = svd(specific)
        us.append(ut[:, :k_t])
        ss.append(st[:k_t])
        vs.append(vht[:k_t])
    u_cat, s_cat, vh_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=0)
    return s_cat.mean() * (procrustes(u_cat) @ procrustes(vh_cat.T).T)


def iso_cts(
    deltas: Sequence[Mapping[str, Tensor]],
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    matrix_keys: MatrixKeys = None,
) -> Delta:
    """Iso-CTS, isotropic merging with common and task-specific subspaces (arXiv:2502.04959):

    * a matrix key of rank r: the top k_c singular directions of Σ_t τ_t (k_c ≈ ``common_fraction``·r, see
      :func:`iso_cts_split`), plus for every task the top k_t directions of τ_t − U_c U_cᵀ τ_t (its part outside the
      common subspace); the concatenated U and V are orthogonalised (:func:`procrustes`) and every singular value is
      replaced by the mean of the concatenated ones: τ_m = mean(S)·U_⊥ V_⊥ᵀ;
    * any other key: the mean (1/T)·Σ_t τ_t;

    returns α·τ_m (α = 1, ``common_fraction`` = 0.8: FusionBench's defaults).
    """
    common_fraction = _check_fraction("common_fraction", common_fraction, low_open=False)
    return _per_key(deltas, alpha, matrix_keys, lambda tensors: _iso_cts_matrix(tensors, common_fraction))


# ------------------------------------------------------------------------------------------------ Model Stock

MODEL_STOCK_AVERAGES = ("cosine", "angle")
_ONE_MODEL = (
    "model stock needs at least 2 fine-tuned models (got {}): the angle between the task deltas it interpolates with "
    "is undefined for one."
)


def model_stock_ratio(tensors: Sequence[Tensor], average: str = "cosine") -> float:
    """Model Stock's interpolation ratio t = T·cos θ / (1 + (T−1)·cos θ) for one tensor, cos θ the mean pairwise
    cosine between the task deltas (``average="angle"``: the cosine of the mean pairwise angle, as FusionBench).

    A pair with a zero delta has cosine 0. cos θ < 0 (deltas pointing apart, outside the paper's assumption of a
    common angle below 90°; the formula's denominator can vanish there) is clipped to 0, i.e. t = 0: θ0 for that
    tensor. Needs at least two tensors (:class:`~hf_cft.errors.TaskError` otherwise)."""
    check_choice(average, "average", MODEL_STOCK_AVERAGES, error=MergeConfigError)
    if len(tensors) < 2:
        raise TaskError(_ONE_MODEL.format(len(tensors)))
    gram = _gram(tensors)[0]
    if not bool(torch.isfinite(gram).all()):
        raise NonFiniteError("model_stock_ratio: a tensor holds NaN/inf (or squares beyond the float range).")
    return _stock_ratio(gram, average)


def _gram(tensors: Sequence[Tensor], total: bool = False) -> tuple[Tensor, Tensor | None]:
    """The T×T Gram matrix ⟨τ_i, τ_j⟩ in fp64 and, with ``total``, Σ_t τ_t (summed in list order), in one pass over
    the inputs: block by block on fp32 CPU tensors (a block's products in fp32, summed in fp64 across blocks), fp64
    dot products elsewhere."""
    flat = [t.reshape(-1) for t in tensors]
    if not all(f.device.type == "cpu" and f.dtype == torch.float32 for f in flat):
        stacked = torch.stack([f.double() for f in flat])
        return stacked @ stacked.T, (sum(tensors) if total else None)
    n, rows = flat[0].numel(), len(flat)
    size = _stacked_block(rows)
    gram = torch.zeros(rows, rows, dtype=torch.float64)
    block = torch.empty(rows, min(n, size))
    out = torch.empty(n) if total else None
    for s in _blocks(n, size):
        m = s.stop - s.start
        b = block[:, :m]
        for row, f in zip(b, flat):
            row.copy_(f[s])
        gram += (b @ b.T).double()
        if total:
            o = out[s]
            o.copy_(b[0])
            for row in b[1:]:
                o.add_(row)
    return gram, (out.view(tensors[0].shape) if total else None)


def _stock_ratio(gram: Tensor, average: str) -> float:
    """t of :func:`model_stock_ratio` from the Gram matrix of the task deltas."""
    g = gram.tolist()
    n = len(g)
    values = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = math.sqrt(max(g[i][i], 0.0)) * math.sqrt(max(g[j][j], 0.0))
            cos = g[i][j] / denom if denom > 0 else 0.0
            values.append(min(1.0, max(-1.0, cos)))
    if average == "angle":
        cos = math.cos(sum(math.acos(c) for c in values) / len(values))
    else:
        cos = sum(values) / len(values)
    cos = max(0.0, cos)
    return n * cos / (1.0 + (n - 1) * cos)


def model_stock(deltas: Sequence[Mapping[str, Tensor]], average: str = "cosine") -> Delta:
    """Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522), per tensor: w_H = t·w_avg + (1−t)·w_0 with
    t = T·cos θ/(1 + (T−1)·cos θ), i.e. τ_m = t·(1/T)·Σ_t τ_t (see :func:`model_stock_ratio`).

    Needs T ≥ 2 fine-tuned models (the angle between models is undefined for one): T = 1 raises
    :class:`~hf_cft.errors.TaskError`. ``average``: ``"cosine"`` (default: the mean pairwise cosine, the paper's
    cos θ when the pairwise angles are equal, as it assumes) or ``"angle"`` (FusionBench: the cosine of the mean
    pairwise angle; equal for T = 2).
    """
    deltas = _check_deltas(deltas)
    check_choice(average, "average", MODEL_STOCK_AVERAGES, error=MergeConfigError)
    if len(deltas) < 2:
        raise TaskError(_ONE_MODEL.format(len(deltas)))
    return {key: _model_stock_key([_f32(d[key]) for d in deltas], average)[0] for key in deltas[0]}


def _model_stock_key(tensors: Sequence[Tensor], average: str) -> tuple[Tensor, bool]:
    """t·(Σ_t τ_t / T) for one key, the Gram matrix and the sum in one pass over the inputs, with whether the result
    is known to be finite (the fused pass counts it; ``False``: not known)."""
    tensors = list(tensors)  # each input read once
    flats = [t.reshape(-1) for t in tensors]
    if fused.applies(*flats):  # the Gram matrix and the sum in one pass, then the sum scaled in place
        gram, merged = fused.gram_sum(flats)
        finite = fused.scale_in_place(merged, len(tensors), _stock_ratio(gram, average))
        return merged.view(tensors[0].shape), finite
    gram, total = _gram(tensors, total=True)
    return total.div_(len(tensors)).mul_(_stock_ratio(gram, average)), False


# ------------------------------------------------------------------------------------------------ sparsification


def breadcrumbs_mask(tensor: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask for one tensor: with its entries ranked by magnitude, largest first, drop the top
    ⌊γ·n⌋ (outliers) and keep the next ⌊density·n⌋ (the smallest ones, the rest, are dropped too). Ties in magnitude
    are broken by position (a stable sort's order; :func:`rank_band`)."""
    n = tensor.numel()
    drop_top = int(gamma * n)
    return rank_band(tensor, drop_top, drop_top + int(density * n))


def rank_band(tensor: Tensor, start: int, stop: int) -> Tensor:
    """The bool mask of the entries whose rank by magnitude, largest first and ties by position (flat order), is in
    ``[start, stop)``.

    On the CPU by selection, O(n), no sort (:func:`_band_limits`): the mask is ``lo ≤ |τ| < hi`` and only the
    magnitudes equal to a threshold that straddle it are resolved by position. Elsewhere (a GPU) a stable sort."""
    n = tensor.numel()
    start, stop = max(0, start), min(n, stop)
    flat = tensor.detach().reshape(-1)
    if stop <= start:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
        order = torch.sort(flat.abs(), descending=True, stable=True).indices
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[order[start:stop]] = True
        return mask.view(tensor.shape)
    import numpy as np

    x = flat.numpy()
    lo, hi, ties = _band_limits(x, start, stop)
    mag = np.abs(x)
    mask = np.greater_equal(mag, lo)
    if hi < math.inf:
        mask &= mag < hi
    for equal, kept in ties:
        mask[equal] = False
        mask[kept] = True
    return torch.from_numpy(mask).view(tensor.shape)


def _band_limits(x, start: int, stop: int) -> tuple[float, float, list]:
    """The selection behind :func:`rank_band` on a flat numpy array ``x`` (``0 ≤ start < stop ≤ n``): ``(lo, hi,
    ties)`` such that the band is ``lo ≤ |x| < hi`` (``lo`` the stop-th largest magnitude, −inf when stop = n;
    ``hi`` the start-th largest, +inf when start = 0) corrected by ``ties``: ``(equal, kept)`` position arrays, the
    entries whose magnitude equals a threshold that straddles the band's edge, all set out of the band and then
    ``kept`` (the ones whose rank, #{|x| > value} + their position among the equal ones, is inside) set in.

    With the fused kernels, radix selection (:func:`~hf_cft.merging.fused.kth_largest_magnitudes`, with the counts
    above and at each threshold); else numpy's introselect on the magnitudes, the second selection inside the first's
    top part. A threshold straddles an edge iff entries equal to it lie on both sides."""
    import numpy as np

    n = x.size
    if fused.selects(x):  # radix selection on every core
        ranks = [r for r, needed in ((stop, stop < n), (start, start > 0)) if needed]
        found = dict(zip(ranks, fused.kth_largest_magnitudes(x, ranks)))
        lo, lo_tied = -math.inf, False
        if stop < n:
            lo, greater, equal = found[stop]
            lo_tied = greater + equal > stop
        hi, hi_tied = math.inf, False
        if start > 0:
            hi, greater, equal = found[start]
            hi_tied = greater + equal > start
        return _band_ties_of(x, lo, lo_tied, hi, hi_tied, start, stop)
    top = np.abs(x)
    lo, lo_tied = -math.inf, False
    if stop < n:
        top.partition(n - stop)
        lo = float(top[n - stop])
        lo_tied = bool(top[: n - stop].max() == lo)  # the rest is ≤ lo: another entry equals it iff its max does
        top = top[n - stop :]
    hi, hi_tied = math.inf, False
    if start > 0:
        top.partition(stop - start)
        hi = float(top[stop - start])
        hi_tied = bool(top[: stop - start].max() == hi)
    return _band_ties_of(x, lo, lo_tied, hi, hi_tied, start, stop)


def _band_ties_of(x, lo: float, lo_tied: bool, hi: float, hi_tied: bool, start: int, stop: int):
    """:func:`_band_limits`' result from its thresholds and whether each straddles its edge."""
    if lo == hi:  # one magnitude spans the whole band
        return lo, hi, [_equal_ranks(x, lo, start, stop)]
    ties = []
    if lo_tied:  # entries equal to lo: the first stop − #{|x| > lo} of them are in the top stop
        ties.append(_equal_ranks(x, lo, start, stop))
    if hi_tied:  # entries equal to hi: those beyond the first start − #{|x| > hi} are below the top start
        ties.append(_equal_ranks(x, hi, start, stop))
    return lo, hi, ties


def _equal_ranks(x, value: float, start: int, stop: int):
    """``(equal, kept)``: the positions of the entries of magnitude ``value`` and those of them whose rank
    (#{|x| > value} + their position among the equal ones) is in ``[start, stop)``."""
    import numpy as np

    mag = np.abs(x)
    equal = np.flatnonzero(mag == value)
    above = int(np.count_nonzero(mag > value))
    return equal, equal[max(0, start - above) : max(0, stop - above)]


def breadcrumbs(
    deltas: Sequence[Mapping[str, Tensor]],
    density: float = 0.1,
    gamma: float = 0.01,
    lam: float | Sequence[float] = 0.3,
) -> Delta:
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv:2312.06795): per task and tensor, mask both tails of
    the magnitude distribution (:func:`breadcrumbs_mask`: the top-γ outliers and everything below the ``density``
    band), then task arithmetic τ_m = Σ_t λ_t·(m_t ⊙ τ_t).

    Defaults (lib, mergekit's parameterisation): γ = 0.01 of the largest magnitudes dropped, ``density`` = 0.1 kept
    (90 % sparsity, the paper's setting), λ = 0.3 (task arithmetic's default; tune on validation). ``lam`` is one λ
    or one per task. ``density + gamma`` must not exceed 1.
    """
    deltas = _check_deltas(deltas)
    density = _check_fraction("density", density)
    gamma = _check_fraction("gamma", gamma, low_open=False)
    if density + gamma > 1.0:
        raise MergeConfigError(f"density + gamma must not exceed 1, got density={density!r}, gamma={gamma!r}.")
    w = _weights(lam, len(deltas))
    out = {key: breadcrumbs_key([_f32(d[key]) for d in deltas], w, [density] * len(w), gamma) for key in deltas[0]}
    return _finite_result(out, f"lam={lam!r}")


def breadcrumbs_key(tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float], gamma: float):
    """One key of :func:`breadcrumbs`: Σ_t w_t·(m_t ⊙ τ_t), each task with its own density. On fp32 CPU tensors each
    input's band limits by selection (:func:`_band_limits`), then the masks and the sum block by block (the same fp32
    operations as the formula, every temporary one cache-sized block)."""
    if not _blocked(*tensors):
        total = None
        for v, w, density in zip(tensors, weights, densities):
            term = (v * breadcrumbs_mask(v, density, gamma)).mul_(w)
            total = term if total is None else total.add_(term)
        return total
    flats = [v.reshape(-1) for v in tensors]
    n = flats[0].numel()
    start = int(gamma * n)
    one_pass = _breadcrumbs_one_pass(flats, densities, gamma, weights)
    if one_pass is not None:
        merged, bad, _ = one_pass
        if bad:
            raise NonFiniteError(f"breadcrumbs: an input holds {bad} NaN/inf value(s).")
        return merged.view(tensors[0].shape)

    def limits(pair):
        f, density = pair
        stop = min(n, start + int(density * n))
        if stop <= start:
            return math.inf, math.inf, []  # nothing kept
        lo, hi, ties = _band_limits(f.numpy(), start, stop)
        return lo, hi, [(torch.from_numpy(e), torch.from_numpy(k)) for e, k in ties]

    bands = _per_input(limits, list(zip(flats, densities)), n)
    if fused.applies(*flats):
        return fused.band_sum(flats, bands, weights).view(tensors[0].shape)
    out = torch.empty(n)
    sc = _Scratch(n)
    mag, term = sc.f[0], sc.f[1]
    below, kept = sc.b, torch.empty_like(sc.b)
    for s in _blocks(n):
        m = s.stop - s.start
        a, k, o = mag[:m], kept[:m], out[s]
        for t, (f, w, (lo, hi, ties)) in enumerate(zip(flats, weights, bands)):
            x = f[s]
            torch.ge(torch.abs(x, out=a), lo, out=k)
            if hi < math.inf:
                k.logical_and_(torch.lt(a, hi, out=below[:m]))
            for equal, inside in ties:  # tied entries at an edge, by position
                i, j = torch.searchsorted(equal, torch.tensor([s.start, s.stop])).tolist()
                k[equal[i:j] - s.start] = False
                i, j = torch.searchsorted(inside, torch.tensor([s.start, s.stop])).tolist()
                k[inside[i:j] - s.start] = True
            if t == 0:
                torch.mul(x, k, out=o).mul_(w)
            else:
                o.add_(torch.mul(x, k, out=term[:m]).mul_(w))
    return out.view(tensors[0].shape)


DELLA_RANK_SCOPES = ("row", "tensor")


def _magprune_probabilities(tensor: Tensor, drop: float, epsilon: float, rank_scope: str) -> Tensor:
    """p_i = p − ε/2 + ε·(n − 1 − r_i)/(n − 1) per group of n entries (a row, or the whole tensor), r_i the rank of
    |τ_i| in ascending order within the group (0 = smallest, ties by position): the smallest magnitude gets
    p + ε/2, the largest p − ε/2, linearly in between (one entry: p)."""
    rows = tensor.reshape(tensor.shape[0], -1) if (rank_scope == "row" and tensor.ndim >= 2) else tensor.reshape(1, -1)
    n = rows.shape[1]
    if n == 1:
        return torch.full(tensor.shape, drop, dtype=torch.float32, device=tensor.device)
    ranks = group_ranks(rows)
    return ((drop - epsilon / 2) + epsilon * (n - 1 - ranks).to(torch.float32) / (n - 1)).view_as(tensor)


def group_ranks(rows: Tensor) -> Tensor:
    """Each entry's rank by magnitude within its row, ascending, ties by position (a stable sort's), as int64.

    On the CPU for fp32 (and fp16/bf16) rows, one numpy sort of int64 keys per row — the magnitude's bits (ordered
    as the magnitudes are, for non-negative floats) above the column index, so that equal magnitudes are ordered by
    position — then the ranks scattered back (several times faster than a stable argsort); elsewhere a stable
    sort."""
    n = rows.shape[1]
    if rows.device.type != "cpu" or rows.dtype == torch.float64 or n >= 1 << 31:
        order = torch.sort(rows.abs(), dim=1, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))
        return ranks
    import numpy as np

    return torch.from_numpy(_ranks(np.abs(rows.detach().float().numpy())))


def _ranks(mag):
    """:func:`group_ranks` of non-negative fp32 numpy rows."""
    import numpy as np

    n = mag.shape[1]
    bits = max(1, (n - 1).bit_length())
    keys = mag.view(np.int32).astype(np.int64)  # |x| ≥ 0: its fp32 bits order as its value (NaN above all)
    keys <<= bits
    keys |= np.arange(n, dtype=np.int64)
    keys.sort(axis=1)
    keys &= (1 << bits) - 1  # now the column of each rank
    ranks = np.empty(keys.shape, dtype=np.int64)
    np.put_along_axis(ranks, keys, np.broadcast_to(np.arange(n, dtype=np.int64), keys.shape), axis=1)
    return ranks


def magprune(
    tensor: Tensor, density: float, epsilon: float, generator: torch.Generator, rank_scope: str = "row"
) -> Tensor:
    """DELLA's MagPrune on one tensor: drop entry i with probability p_i (:func:`_magprune_probabilities`, mean drop
    p = 1 − ``density``) and rescale the survivors by 1/(1 − p_i)."""
    if isinstance(generator, _Stream) and tensor.device.type == "cpu" and tensor.dtype == torch.float32:
        return _magprune_numpy(tensor, 1.0 - density, epsilon, generator, rank_scope)
    probs = _magprune_probabilities(tensor, 1.0 - density, epsilon, rank_scope)
    keep = 1.0 - probs
    if isinstance(generator, _Stream) and keep.is_contiguous():
        mask = (generator.uniform(keep.numel()).to(keep.device) < keep.reshape(-1)).view(keep.shape)
    else:
        mask = torch.bernoulli(keep, generator=generator)
    return tensor * mask / keep


def _magprune_numpy(tensor: Tensor, drop: float, epsilon: float, stream: _Stream, rank_scope: str) -> Tensor:
    """:func:`magprune` of an fp32 CPU tensor with the CPU stream, in numpy, op for op the same fp32 arithmetic (so
    bit for bit the torch formula's result; numpy's temporaries cost far less than fresh torch tensors here)."""
    import numpy as np

    if tensor.numel() == 0:
        return tensor.clone()
    x = tensor.detach().contiguous().numpy().reshape(-1)
    rows = x.reshape(tensor.shape[0], -1) if (rank_scope == "row" and tensor.ndim >= 2) else x.reshape(1, -1)
    n = rows.shape[1]
    if n == 1:
        keep = np.full(x.shape, drop, dtype=np.float32)
    else:
        r = _ranks(np.abs(rows))
        np.subtract(n - 1, r, out=r)
        keep = r.astype(np.float32).reshape(-1)
        keep *= epsilon
        keep /= n - 1
        keep += drop - epsilon / 2
    np.subtract(1.0, keep, out=keep)  # the keep probabilities 1 − p_i
    u = stream.uniform_numpy(x.size)
    with np.errstate(invalid="ignore"):  # inf·0 = NaN where an input overflowed: the merge's checks name it
        y = np.multiply(x, np.less(u, keep))
    y /= keep
    return torch.from_numpy(y).view(tensor.shape)


def della(
    deltas: Sequence[Mapping[str, Tensor]],
    density: float = 0.3,
    epsilon: float = 0.1,
    lam: float = 1.0,
    seed: int = 0,
    rank_scope: str = "row",
    rng: str = "torch",
) -> Delta:
    """DELLA-merging (Deep et al., 2024, arXiv:2406.11617), key by key:

    1. **Drop** (MagPrune, :func:`magprune`): entries ranked by magnitude within each row (``rank_scope="row"``,
       the paper's per-node ranking and mergekit's; ``"tensor"`` ranks the whole tensor), dropped with probabilities
       from p + ε/2 (smallest) down to p − ε/2 (largest), p = 1 − ``density``;
    2. **Rescale** the survivors by 1/(1 − p_i);
    3. **Elect and fuse** as TIES: σ = sign(Σ_t τ̃_t), the mean of the entries that agree with σ;

    returns λ·τ_m. Defaults (lib; tune on validation): ``density`` 0.3, ε = 0.1, λ = 1. The masks come from one
    ``torch.Generator`` per key seeded from (``seed``, key), tasks in list order (as :func:`~hf_cft.merging.dare`),
    so a key's result does not depend on the other keys (``rng="counter"``: the counter-based stream of
    :func:`~hf_cft.merging.dare` instead, the same on every device). p ± ε/2 must stay within [0, 1).
    """
    deltas = _check_deltas(deltas)
    density = _check_fraction("density", density)
    epsilon = check_number(epsilon, "epsilon", low=0.0, error=MergeConfigError)
    drop = 1.0 - density
    if drop - epsilon / 2 < 0.0 or drop + epsilon / 2 >= 1.0:
        raise MergeConfigError(
            f"epsilon={epsilon!r} with density={density!r} gives drop probabilities outside [0, 1): "
            f"[{drop - epsilon / 2:g}, {drop + epsilon / 2:g}]; lower epsilon."
        )
    check_choice(rank_scope, "rank_scope", DELLA_RANK_SCOPES, error=MergeConfigError)
    check_choice(rng, "rng", DARE_RNGS, error=MergeConfigError)
    lam = _weights(lam, 1)[0]
    out = {}
    for key in deltas[0]:
        tensors = [_f32(d[key]) for d in deltas]
        out[key] = lam * della_key(
            key, tensors, [1.0] * len(tensors), [density] * len(tensors), epsilon, seed, rank_scope, rng
        )
    return _finite_result(out, f"lam={lam!r} (with the 1/(1-p) rescale)")


def della_key(
    key: str,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilon: float,
    seed: int,
    rank_scope: str,
    rng: str = "torch",
    fused_first: bool = True,
) -> Tensor:
    """One key of :func:`della` (unscaled): MagPrune each w_t·τ_t with its density (one generator seeded from
    (seed, key), tasks in order), then TIES's election and disjoint mean. By the fused kernel where it applies and
    counts no NaN/inf (``fused_first=False``: the reference only, for a caller whose fused try counted some)."""
    if fused_first:
        fast = _della_fused(key, tensors, weights, densities, epsilon, seed, rank_scope, rng)
        if fast is not None and not fast[1]:
            return fast[0]
    gen = _mask_source(seed, key, tensors[0].device, rng)  # on the CPU the generator's stream replayed
    pruned = [
        magprune(w * t if w != 1.0 else t, d, epsilon, gen, rank_scope) for t, w, d in zip(tensors, weights, densities)
    ]
    return _elect_blocked(pruned)


def _della_fused(
    key: str,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilon: float,
    seed: int,
    rank_scope: str,
    rng: str,
) -> tuple[Tensor, int] | None:
    """:func:`della_key` by the fused kernel (:func:`~hf_cft.merging.fused.della`, bit for bit the same masks and
    result) where it applies (fp32 CPU tensors, numba): ``(merged, bad)``, ``bad`` > 0 where an input or the result
    holds NaN/inf (the result is then not defined); ``None`` where the kernel does not apply."""
    flats = [t.reshape(-1) for t in tensors]
    if not (flats[0].numel() and fused.applies(*flats)):
        return None
    rows = tensors[0].shape[0] if (rank_scope == "row" and tensors[0].ndim >= 2) else 1
    gen = _mask_source(seed, key, tensors[0].device, rng)
    merged, bad = fused.della(flats, rows, gen, densities, epsilon, weights)
    return merged.view(tensors[0].shape), bad


# ------------------------------------------------------------------------------------------------ SLERP


def slerp_tensor(a: Tensor, b: Tensor, t: float, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation of two tensors: with ω the angle between them (computed on normalised copies),
    sin((1−t)ω)/sin ω · a + sin(tω)/sin ω · b; the linear (1−t)·a + t·b where |cos ω| > ``dot_threshold`` (nearly
    colinear: sin ω → 0; always where |cos ω| = 1, parallel or opposite, where the angle gives no plane to rotate in)
    or where either tensor is zero (no angle)."""
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = float(fa.norm()), float(fb.norm())
    if not (math.isfinite(na) and math.isfinite(nb)):
        raise NonFiniteError("slerp_tensor: an input holds NaN/inf (no angle to interpolate along).")
    if na == 0.0 or nb == 0.0:
        return (1.0 - t) * a + t * b
    dot = float(fa @ fb) / (na * nb)
    if abs(dot) > dot_threshold or abs(dot) >= 1.0:  # |cos ω| = 1 (even at dot_threshold = 1): sin ω = 0
        return (1.0 - t) * a + t * b
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return (math.sin((1.0 - t) * omega) / sin_omega) * a + (math.sin(t * omega) / sin_omega) * b


def slerp(
    deltas: Sequence[Mapping[str, Tensor]],
    t: float = 0.5,
    base: Mapping[str, Tensor] | None = None,
    dot_threshold: float = 0.9995,
) -> Delta:
    """SLERP of exactly two inputs, per tensor (:func:`slerp_tensor`; t = 0 gives the first, t = 1 the second).

    Without ``base`` the task deltas τ_a, τ_b are interpolated (their angle is that of the two updates). With
    ``base`` (θ0's tensors for the delta keys) the full weights θ0 + τ_a and θ0 + τ_b are, as mergekit and FusionBench
    do, and the result is returned as a delta from θ0. ``dot_threshold`` (mergekit's 0.9995) switches to the linear
    interpolation for nearly colinear tensors.
    """
    deltas = _check_deltas(deltas)
    if len(deltas) != 2:
        raise TaskError(f"slerp interpolates exactly 2 inputs, got {len(deltas)}.")
    t = check_number(t, "t", low=0.0, high=1.0, error=MergeConfigError)
    dot_threshold = check_number(dot_threshold, "dot_threshold", low=0.0, high=1.0, error=MergeConfigError)
    a, b = deltas
    out = {}
    for key in a:
        va, vb = _f32(a[key]), _f32(b[key])
        if base is None:
            out[key] = slerp_tensor(va, vb, t, dot_threshold)
            continue
        if key not in base:
            raise DeltaError(f"base lacks key {key!r} that the deltas have.")
        w0 = _f32(base[key]).to(va.device)
        if w0.shape != va.shape:
            raise DeltaError(f"key {key!r} has shape {tuple(w0.shape)} in base but {tuple(va.shape)} in the deltas.")
        out[key] = slerp_tensor(w0 + va, w0 + vb, t, dot_threshold) - w0
    return out


class ContinualSLERP(ContinualMerger):
    """SLERP, continual form: m_1 = τ_1, m_t = slerp(m_{t−1}, τ_t, 1/t) per tensor, the spherical counterpart of the
    running mean (each new task gets the weight 1/t, as in the uniform soup). ``dot_threshold`` as :func:`slerp`."""

    _state_names = ("current",)

    def __init__(self, dot_threshold: float = 0.9995) -> None:
        super().__init__()
        self.dot_threshold = check_number(dot_threshold, "dot_threshold", low=0.0, high=1.0, error=MergeConfigError)
        self.current: Delta = {}

    def _add(self, delta: Delta) -> None:
        if not self.current:
            self.current = {k: v.clone() for k, v in delta.items()}
            return
        t = 1.0 / (self.num_tasks + 1)
        self.current = {k: slerp_tensor(self.current[k], v, t, self.dot_threshold) for k, v in delta.items()}

    def _merged(self) -> Delta:
        return self.current


# ------------------------------------------------------------------------------------------------ registry
# Per-key kernels of the methods above, registered by name (hf_cft.merging.registry) for ``hf-cft merge``, the merge
# config and the streaming merge. An input without a delta at a key counts as zeros there (ctx.present).


def _tsv_m_kernel(deltas: list[Tensor], ctx) -> Tensor:
    return ctx.options["alpha"] * svd_key(ctx.key, deltas, _tsv_matrix)


def _iso_c_kernel(deltas: list[Tensor], ctx) -> Tensor:
    return ctx.options["alpha"] * svd_key(ctx.key, deltas, _iso_c_matrix)


def _iso_cts_kernel(deltas: list[Tensor], ctx) -> Tensor:
    fraction = ctx.options["common_fraction"]
    return ctx.options["alpha"] * svd_key(ctx.key, deltas, lambda ts: _iso_cts_matrix(ts, fraction))


def _model_stock_kernel(deltas: list[Tensor], ctx) -> Tensor:
    return _counted(*_model_stock_key(deltas, ctx.options["average"]))


def _breadcrumbs_one_pass(flats: list[Tensor], densities: Sequence[float], gamma: float, weights: Sequence[float]):
    """:func:`~hf_cft.merging.fused.band_sum_trimmed` (one histogram pass per input, one summing pass) where it applies
    (numba, contiguous fp32 CPU tensors of at least ``fused.SELECT_MIN`` entries): ``(merged, NaN/inf input count,
    whether the result is finite)``; ``None`` elsewhere. Each input's band of descending ranks is ``[start, stop)``:
    the top γ·n dropped, the next density·n kept."""
    n = flats[0].numel()
    if n < fused.SELECT_MIN or not fused.applies(*flats):
        return None
    start = int(gamma * n)
    return fused.band_sum_trimmed(flats, [(start, min(n, start + int(d * n))) for d in densities], weights)


def _breadcrumbs_kernel(deltas: list[Tensor], ctx) -> Tensor:
    densities = [inp["density"] for inp in ctx.inputs]
    if not hasattr(deltas, "unchecked"):
        return breadcrumbs_key(deltas, ctx.weights, densities, ctx.options["gamma"])
    raw = [deltas.unchecked(t) for t in range(len(deltas))]  # each input read once, checked below
    one_pass = _breadcrumbs_one_pass([d.reshape(-1) for d in raw], densities, ctx.options["gamma"], ctx.weights)
    if one_pass is not None:  # the histograms count NaN/inf: no other check
        merged, bad, finite = one_pass
        if bad:
            deltas.raise_nonfinite()
        return _counted(merged.view(raw[0].shape), finite)
    for t, d in enumerate(raw):
        deltas.verify(t, d)
    return breadcrumbs_key(raw, ctx.weights, densities, ctx.options["gamma"])


def _breadcrumbs_check(options: dict, inputs: list[dict], where: str) -> None:
    for t, inp in enumerate(inputs):
        if inp["density"] + options["gamma"] > 1.0:
            raise MergeConfigError(
                f"inputs[{t}].density + {where}.gamma must not exceed 1, got {inp['density']} + {options['gamma']}."
            )


def _della_kernel(deltas: list[Tensor], ctx) -> Tensor:
    opts = ctx.options
    densities = [inp["density"] for inp in ctx.inputs]
    args = (ctx.weights, densities, opts["epsilon"], opts["seed"], opts["rank_scope"], opts["rng"])
    if hasattr(deltas, "unchecked"):
        raw = [deltas.unchecked(t) for t in range(len(deltas))]  # each input read once, checked below
        fast = _della_fused(ctx.key, raw, *args)
        if fast is not None:  # the kernel counts NaN/inf inputs and results: no other check where there is none
            merged, bad = fast
            if not bad:
                return _counted(merged, True)
            deltas.check_inputs()  # names a non-finite input; else the weights overflowed: the reference shows it
            return della_key(ctx.key, raw, *args, fused_first=False)
        for t, d in enumerate(raw):
            deltas.verify(t, d)
        deltas = raw
    return della_key(ctx.key, deltas, *args)


def _della_check(options: dict, inputs: list[dict], where: str) -> None:
    eps = options["epsilon"]
    for t, inp in enumerate(inputs):
        drop = 1.0 - inp["density"]
        if drop - eps / 2 < 0.0 or drop + eps / 2 >= 1.0:
            raise MergeConfigError(
                f"{where}.epsilon={eps} with inputs[{t}].density={inp['density']} gives drop probabilities outside "
                "[0, 1); lower epsilon."
            )


def _slerp_kernel(deltas: list[Tensor], ctx) -> Tensor:
    a, b = deltas
    t, threshold = ctx.options["t"], ctx.options["dot_threshold"]
    if ctx.options["space"] == "delta":
        return slerp_tensor(a, b, t, threshold)
    w0 = ctx.base().to(a.device)
    return slerp_tensor(w0 + a, w0 + b, t, threshold) - w0


def _register() -> None:
    from hf_cft.merging.registry import MergeMethod, Option, register

    alpha = Option("alpha", 1.0, help="α: scale of the merged delta")
    for name, kernel, summary, ref in (
        (
            "tsv_m",
            _tsv_m_kernel,
            "per matrix each task's top r/T singular triplets, U and V orthogonalised; other keys averaged (α = 1)",
            "Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv:2412.00081)",
        ),
        (
            "iso_c",
            _iso_c_kernel,
            "per matrix mean(S)·U Vᵀ of the SVD of Σ_t τ_t; other keys averaged (α = 1)",
            "Marczak et al., No Task Left Behind (Iso-C), ICML 2025 (arXiv:2502.04959)",
        ),
    ):
        register(MergeMethod(name, "tensor", kernel, (alpha,), summary=summary, reference=ref))
    register(
        MergeMethod(
            "iso_cts",
            "tensor",
            _iso_cts_kernel,
            (alpha, Option("common_fraction", 0.8, low=0.0, high=1.0, help="share of the rank kept common")),
            summary="common top directions of Σ_t τ_t + each task's own, orthogonalised, isotropic (defaults α = 1, 0.8)",
            reference="Marczak et al., No Task Left Behind (Iso-CTS), ICML 2025 (arXiv:2502.04959)",
        )
    )
    register(
        MergeMethod(
            "model_stock",
            "tensor",
            _model_stock_kernel,
            (
                Option(
                    "average", "cosine", "choice", choices=MODEL_STOCK_AVERAGES, help="mean pairwise cosine or angle"
                ),
            ),
            min_inputs=2,
            nonfinite_propagates=True,  # the mean carries a NaN/inf (a NaN cosine clips to t = 0: NaN·0, inf·0 = NaN)
            summary="per tensor t·mean_t τ_t, t = T·cos/(1 + (T−1)·cos)",
            reference="Jang et al., Model Stock, ECCV 2024 (arXiv:2403.19522)",
        )
    )
    register(
        MergeMethod(
            "breadcrumbs",
            "tensor",
            _breadcrumbs_kernel,
            (
                Option("weight", 0.3, per_input=True, help="λ_t of Σ_t λ_t·(m_t ⊙ τ_t)"),
                Option("density", 0.1, low=0.0, high=1.0, low_open=True, per_input=True, help="fraction kept"),
                Option("gamma", 0.01, low=0.0, high=1.0, help="fraction of the largest magnitudes dropped"),
            ),
            summary="drop the top-γ and the smallest magnitudes, keep a density band, Σ_t λ_t (defaults γ 0.01, 0.1, λ 0.3)",
            reference="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
            check=_breadcrumbs_check,
        )
    )
    register(
        MergeMethod(
            "della",
            "tensor",
            _della_kernel,
            (
                Option("weight", 1.0, per_input=True, help="λ_t: each input's delta is scaled by it first"),
                Option("density", 0.3, low=0.0, high=1.0, low_open=True, per_input=True, help="mean kept fraction"),
                Option("epsilon", 0.1, low=0.0, help="spread of the drop probabilities"),
                Option("seed", 0, "int", help="seed of the drop masks (drawn per key)"),
                Option("rank_scope", "row", "choice", choices=DELLA_RANK_SCOPES, help="rank per row or per tensor"),
                Option("rng", "torch", "choice", choices=DARE_RNGS, help="drop-mask stream, as dare's rng"),
            ),
            summary="MagPrune (magnitude-ranked drop, 1/(1−p_i) rescale), elect sign, disjoint mean (defaults 0.3, ε 0.1)",
            reference="Deep et al., DELLA-Merging, 2024 (arXiv:2406.11617)",
            check=_della_check,
        )
    )
    register(
        MergeMethod(
            "slerp",
            "tensor",
            _slerp_kernel,
            (
                Option("t", 0.5, low=0.0, high=1.0, help="0 gives the first input, 1 the second"),
                Option("dot_threshold", 0.9995, low=0.0, high=1.0, help="|cos| above which it interpolates linearly"),
                Option(
                    "space",
                    "weights",
                    "choice",
                    choices=("weights", "delta"),
                    help="interpolate θ0 + τ (mergekit, FusionBench) or the deltas τ",
                ),
            ),
            min_inputs=2,
            max_inputs=2,
            summary="per tensor spherical interpolation of two models (default t = 0.5), linear when nearly colinear",
            reference="Shoemake 1985; mergekit's slerp",
        )
    )


_register()
