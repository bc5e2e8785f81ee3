"""TSV-M, Iso-C, Iso-CTS, Model Stock, Breadcrumbs, DELLA and SLERP (hf_cft.merging.methods) against references
written here from each paper's definition (NumPy float64, explicit loops; the implementation is never called to
build an expected value), plus the edge cases: T = 1, zero deltas, bf16 inputs, mismatched keys."""

import math

import numpy as np
import pytest
import torch

from hf_cft.errors import DeltaError, MergeConfigError, NonFiniteError, TaskError
from hf_cft.merging.baselines import _key_seed
from hf_cft.merging.methods import (
    ContinualSLERP,
    breadcrumbs,
    breadcrumbs_key,
    della,
    iso_c,
    iso_cts,
    model_stock,
    model_stock_ratio,
    rank_band,
    slerp,
    tsv_m,
)


def rand_deltas(n, shapes=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"enc.fc.weight": (7, 5), "enc.fc.bias": (7,)}
    return [{k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()} for _ in range(n)]


def npy(t):
    return t.double().numpy()


def assert_close_np(actual, expected, atol=1e-5, rtol=1e-4):
    np.testing.assert_allclose(actual.double().numpy(), expected, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------ references


def ref_polar(x):
    """Nearest orthonormal-column matrix by the polar decomposition x (xᵀx)^{-1/2} (full column rank)."""
    w, q = np.linalg.eigh(x.T @ x)
    return x @ (q @ np.diag(w**-0.5) @ q.T)


def ref_tsv_matrix(mats):
    n = len(mats)
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        k = len(s) // n
        us.append(u[:, :k])
        ss.extend(s[:k])
        vs.append(vt[:k].T)
    u = ref_polar(np.concatenate(us, axis=1))
    v = ref_polar(np.concatenate(vs, axis=1))
    return u @ np.diag(ss) @ v.T


def ref_iso_c_matrix(mats):
    u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
    return s.mean() * u @ vt


def ref_iso_cts_matrix(mats, frac):
    r, n = min(mats[0].shape), len(mats)
    k_c = int(r * frac)
    k_t = round((r - k_c) / n)
    k_c = r - k_t * n
    u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
    uc = u[:, :k_c]
    proj = np.eye(mats[0].shape[0]) - uc @ uc.T  # onto the complement of the common subspace
    us, ss, vs = [uc], list(s[:k_c]), [vt[:k_c].T]
    for m in mats:
        ut, st, vtt = np.linalg.svd(proj @ m, full_matrices=False)
        us.append(ut[:, :k_t])
        ss.extend(st[:k_t])
        vs.append(vtt[:k_t].T)
    uo = ref_polar(np.concatenate(us, axis=1))
    vo = ref_polar(np.concatenate(vs, axis=1))
    return np.mean(ss) * uo @ vo.T


def ref_model_stock(tensors):
    flat = [npy(t).ravel() for t in tensors]
    n = len(flat)
    cosines = [
        float(flat[i] @ flat[j] / (np.linalg.norm(flat[i]) * np.linalg.norm(flat[j])))
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos)
    return t * sum(npy(x) for x in tensors) / n


def ref_breadcrumbs_tensor(x, density, gamma):
    flat = list(npy(x).ravel())
    n = len(flat)
    order = sorted(range(n), key=lambda i: -abs(flat[i]))  # stable: ties keep position order
    kept = set(order[int(gamma * n) : int(gamma * n) + int(density * n)])
    return np.array([flat[i] if i in kept else 0.0 for i in range(n)]).reshape(x.shape)


def ref_slerp(a, b, t, threshold=0.9995):
    a, b = npy(a).ravel(), npy(b).ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b


# ------------------------------------------------------------------------------------------------ vs references


@pytest.mark.parametrize("n", [2, 3])
def test_tsv_m_matches_the_papers_construction(n):
    ds = rand_deltas(n, {"enc.fc.weight": (9, 6), "enc.fc.bias": (9,)}, seed=n)
    out = tsv_m(ds, alpha=0.7)
    assert_close_np(out["enc.fc.weight"], 0.7 * ref_tsv_matrix([npy(d["enc.fc.weight"]) for d in ds]))
    assert_close_np(out["enc.fc.bias"], 0.7 * sum(npy(d["enc.fc.bias"]) for d in ds) / n)  # non-matrix: mean
    assert out["enc.fc.weight"].dtype == torch.float32


def test_tsv_m_one_task_gives_the_task_back_and_orthogonal_tasks_are_kept_exactly():
    (d,) = rand_deltas(1)
    torch.testing.assert_close(tsv_m([d])["enc.fc.weight"], d["enc.fc.weight"], atol=1e-5, rtol=1e-5)
    # two rank-2 tasks in orthogonal row and column spaces: TSV-M keeps both whole (no interference)
    # (each of rank r/T = 2, so the triplets kept are exactly theirs)
    e = torch.eye(4)
    a = 3.0 * torch.outer(e[0], e[1]) + 2.0 * torch.outer(e[1], e[0])
    b = 5.0 * torch.outer(e[2], e[3]) + 1.0 * torch.outer(e[3], e[2])
    out = tsv_m([{"x.weight": a}, {"x.weight": b}])
    torch.testing.assert_close(out["x.weight"], a + b, atol=1e-5, rtol=1e-5)


def test_iso_c_matches_the_paper_and_flattens_the_spectrum():
    ds = rand_deltas(3, seed=4)
    out = iso_c(ds, alpha=1.3)
    assert_close_np(out["enc.fc.weight"], 1.3 * ref_iso_c_matrix([npy(d["enc.fc.weight"]) for d in ds]))
    assert_close_np(out["enc.fc.bias"], 1.3 * sum(npy(d["enc.fc.bias"]) for d in ds) / 3)
    s = torch.linalg.svdvals(out["enc.fc.weight"])
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("n", "frac"), [(2, 0.8), (3, 0.5), (4, 0.25)])
def test_iso_cts_matches_the_papers_construction(n, frac):
    ds = rand_deltas(n, {"enc.fc.weight": (12, 10), "enc.fc.bias": (12,)}, seed=10 + n)
    out = iso_cts(ds, common_fraction=frac)
    assert_close_np(out["enc.fc.weight"], ref_iso_cts_matrix([npy(d["enc.fc.weight"]) for d in ds], frac))
    assert_close_np(out["enc.fc.bias"], sum(npy(d["enc.fc.bias"]) for d in ds) / n)


def test_iso_cts_with_common_fraction_one_is_iso_c():
    ds = rand_deltas(3, seed=5)
    a, b = iso_cts(ds, common_fraction=1.0), iso_c(ds)
    torch.testing.assert_close(a["enc.fc.weight"], b["enc.fc.weight"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_matches_the_papers_formula(n):
    g = torch.Generator().manual_seed(n)
    shared = torch.randn(6, 4, generator=g)  # a common direction: cos θ > 0 as the paper assumes
    ds = [{"w": shared + 0.8 * torch.randn(6, 4, generator=g), "b": torch.randn(3, generator=g) + 1} for _ in range(n)]
    out = model_stock(ds)
    for key in ("w", "b"):
        assert_close_np(out[key], ref_model_stock([d[key] for d in ds]))


def test_model_stock_two_models_is_the_papers_2cos_over_1_plus_cos():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # 45°: cos = 1/√2
    cos = 1 / math.sqrt(2)
    out = model_stock([{"w": a}, {"w": b}], average="angle")
    torch.testing.assert_close(out["w"], (2 * cos / (1 + cos)) * (a + b) / 2)


def test_model_stock_edge_cases():
    with pytest.raises(TaskError, match="at least 2"):
        model_stock(rand_deltas(1))
    # deltas pointing apart (cos < 0): t is clipped to 0, never a negative or exploding ratio
    out = model_stock([{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.2])}])
    assert torch.equal(out["w"], torch.zeros(2))
    with pytest.raises(MergeConfigError, match="average"):
        model_stock(rand_deltas(2), average="median")


@pytest.mark.parametrize(("density", "gamma"), [(0.1, 0.01), (0.5, 0.2), (0.3, 0.0), (1.0, 0.0)])
def test_breadcrumbs_matches_a_naive_two_tailed_mask(density, gamma):
    ds = rand_deltas(3, {"a.weight": (10, 12), "a.bias": (40,)}, seed=7)
    ds[0]["a.bias"][:6] = 0.5  # magnitude ties: broken by position
    out = breadcrumbs(ds, density=density, gamma=gamma, lam=[0.3, 0.5, -0.2])
    for key in ("a.weight", "a.bias"):
        expected = sum(w * ref_breadcrumbs_tensor(d[key], density, gamma) for w, d in zip([0.3, 0.5, -0.2], ds))
        assert_close_np(out[key], expected)


def test_breadcrumbs_drops_both_tails():
    x = torch.arange(1.0, 101.0)  # magnitudes 1..100
    out = breadcrumbs([{"x": x}], density=0.5, gamma=0.1, lam=1.0)["x"]
    kept = out.nonzero().flatten() + 1
    assert kept.min() == 41 and kept.max() == 90  # top 10 dropped, next 50 kept, smallest 40 dropped
    with pytest.raises(MergeConfigError, match="density \\+ gamma"):
        breadcrumbs([{"x": x}], density=0.95, gamma=0.1)


def ref_della_probs(row, drop, eps):
    n = len(row)
    order = sorted(range(n), key=lambda i: abs(row[i]))  # ascending magnitude rank, ties by position
    rank = {i: r for r, i in enumerate(order)}
    if n == 1:
        return [drop]
    return [drop - eps / 2 + eps * (n - 1 - rank[i]) / (n - 1) for i in range(n)]


def test_della_matches_magprune_then_ties_with_the_documented_draws():
    ds = rand_deltas(3, {"m.weight": (4, 6), "m.bias": (6,)}, seed=3)
    density, eps, lam, seed = 0.4, 0.2, 0.8, 11
    out = della(ds, density=density, epsilon=eps, lam=lam, seed=seed)
    for key in ("m.weight", "m.bias"):
        rows = [npy(d[key]).reshape(d[key].shape[0] if d[key].ndim == 2 else 1, -1) for d in ds]
        gen = torch.Generator().manual_seed(_key_seed(seed, key))  # the documented per-key generator
        pruned = []
        for r in rows:
            probs = np.array([ref_della_probs(list(row), 1 - density, eps) for row in r])
            keep = torch.bernoulli(torch.tensor(1 - probs, dtype=torch.float32), generator=gen).double().numpy()
            pruned.append(r * keep / (1 - probs))
        stacked = np.stack(pruned)
        sign = np.sign(stacked.sum(axis=0))
        expected = np.zeros_like(sign)
        for idx in np.ndindex(sign.shape):  # TIES: mean of the non-zero entries whose sign is the elected one
            vals = [
                stacked[(t, *idx)] for t in range(3) if sign[idx] != 0 and np.sign(stacked[(t, *idx)]) == sign[idx]
            ]
            expected[idx] = sum(vals) / len(vals) if vals else 0.0
        assert_close_np(out[key], lam * expected.reshape(ds[0][key].shape))


def test_della_drop_probabilities_favour_large_magnitudes_and_rescale_is_unbiased():
    x = torch.linspace(0.1, 2.0, 20)
    kept = torch.zeros(20)
    mean = torch.zeros(20)
    runs = 3000
    for s in range(runs):
        out = della([{"x": x}], density=0.5, epsilon=0.4, lam=1.0, seed=s)["x"]
        kept += out != 0
        mean += out
    rate = kept / runs  # keep probability 1 − p_i: from 0.3 (smallest) to 0.7 (largest)
    assert abs(float(rate[0]) - 0.3) < 0.05 and abs(float(rate[-1]) - 0.7) < 0.05
    torch.testing.assert_close(mean / runs, x, atol=0.12, rtol=0.1)  # E[τ̃] = τ


def test_della_without_drop_is_ties_without_trim_and_checks_options():
    ds = rand_deltas(2, seed=2)
    out = della(ds, density=1.0, epsilon=0.0, lam=1.0)
    for key in ds[0]:
        st = np.stack([npy(d[key]) for d in ds])
        sign = np.sign(st.sum(0))
        agree = (np.sign(st) == sign) & (sign != 0)
        assert_close_np(out[key], (st * agree).sum(0) / np.maximum(agree.sum(0), 1))
    with pytest.raises(MergeConfigError, match="epsilon"):
        della(ds, density=0.1, epsilon=0.4)  # p + ε/2 = 1.1
    with pytest.raises(MergeConfigError, match="rank_scope"):
        della(ds, rank_scope="layer")


def test_della_key_does_not_depend_on_other_keys():
    ds = rand_deltas(2, seed=9)
    alone = della([{"enc.fc.weight": d["enc.fc.weight"]} for d in ds], seed=4)
    both = della(ds, seed=4)
    assert torch.equal(alone["enc.fc.weight"], both["enc.fc.weight"])


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_the_formula_on_deltas_and_on_full_weights(t):
    a, b = rand_deltas(2, seed=21)
    out = slerp([a, b], t=t)
    for key in a:
        assert_close_np(out[key].reshape(-1), ref_slerp(a[key], b[key], t))
    base = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in a.items()}
    out = slerp([a, b], t=t, base=base)
    for key in a:
        expected = ref_slerp(base[key] + a[key], base[key] + b[key], t) - npy(base[key]).ravel()
        assert_close_np(out[key].reshape(-1), expected)


def test_slerp_keeps_unit_norm_and_falls_back_to_lerp():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp([{"w": e0}, {"w": e1}])["w"]
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # on the circle, not the chord
    colinear = slerp([{"w": e0}, {"w": 3 * e0}], t=0.5)["w"]
    torch.testing.assert_close(colinear, 2 * e0)
    zero = slerp([{"w": torch.zeros(2)}, {"w": e1}], t=0.5)["w"]
    torch.testing.assert_close(zero, 0.5 * e1)
    with pytest.raises(TaskError, match="exactly 2"):
        slerp(rand_deltas(3))
    with pytest.raises(MergeConfigError, match="t must"):
        slerp(rand_deltas(2), t=1.5)
    with pytest.raises(DeltaError, match="enc.fc.bias"):
        slerp(rand_deltas(2), base={"enc.fc.weight": torch.zeros(7, 5)})


def test_continual_slerp_is_the_spherical_running_mean():
    ds = rand_deltas(3, seed=8)
    m = ContinualSLERP()
    first = m.add(ds[0])
    torch.testing.assert_close(first["enc.fc.weight"], ds[0]["enc.fc.weight"])
    second = m.add(ds[1])
    third = m.add(ds[2])
    for key in ds[0]:
        assert_close_np(second[key].reshape(-1), ref_slerp(ds[0][key], ds[1][key], 0.5))
        expected = ref_slerp(second[key], ds[2][key], 1 / 3)
        assert_close_np(third[key].reshape(-1), expected)
    resumed = ContinualSLERP()
    resumed.load_state_dict(m.state_dict())
    assert resumed.num_tasks == 3 and torch.equal(resumed.merged["enc.fc.bias"], third["enc.fc.bias"])


# ------------------------------------------------------------------------------------------------ edge cases

METHODS = {
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "model_stock": model_stock,
    "breadcrumbs": breadcrumbs,
    "della": della,
    "slerp": slerp,
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_zero_deltas_merge_to_zero_without_nan(name):
    zeros = [{"enc.fc.weight": torch.zeros(7, 5), "enc.fc.bias": torch.zeros(7)} for _ in range(2)]
    out = METHODS[name](zeros)
    for v in out.values():
        assert torch.equal(v, torch.zeros_like(v))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_inputs_give_the_fp32_merge_of_the_same_values(name):
    ds = rand_deltas(2, seed=6, dtype=torch.bfloat16)
    up = [{k: v.float() for k, v in d.items()} for d in ds]
    out, ref = METHODS[name](ds), METHODS[name](up)
    for key in ref:
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], ref[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mismatched_keys_and_bad_values_raise_typed_errors_naming_the_key(name):
    a, b = rand_deltas(2)
    extra = dict(b, **{"enc.extra.weight": torch.zeros(2, 2)})
    with pytest.raises(DeltaError, match="enc.extra.weight"):
        METHODS[name]([a, extra])
    with pytest.raises(DeltaError, match="enc.fc.bias"):
        METHODS[name]([a, {"enc.fc.weight": b["enc.fc.weight"]}])
    bad = dict(b, **{"enc.fc.bias": torch.full((7,), float("nan"))})
    with pytest.raises(NonFiniteError, match="enc.fc.bias"):
        METHODS[name]([a, bad])
    with pytest.raises(TaskError):
        METHODS[name]([])


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "breadcrumbs", "della"])
def test_one_task(name):
    (d,) = rand_deltas(1, seed=12)
    out = METHODS[name]([d])
    assert set(out) == set(d) and all(torch.isfinite(v).all() for v in out.values())
    if name in ("iso_c", "iso_cts"):  # one task: its own singular vectors with the mean singular value
        u, s, vh = torch.linalg.svd(d["enc.fc.weight"], full_matrices=False)
        torch.testing.assert_close(out["enc.fc.weight"], s.mean() * u @ vh, atol=1e-5, rtol=1e-4)


def test_matrix_keys_choose_what_is_decomposed():
    ds = rand_deltas(2, seed=13)
    out = iso_c(ds, matrix_keys=[])  # nothing is a matrix: every key is averaged
    torch.testing.assert_close(out["enc.fc.weight"], (ds[0]["enc.fc.weight"] + ds[1]["enc.fc.weight"]) / 2)
    with pytest.raises(MergeConfigError, match="string"):
        tsv_m(ds, matrix_keys="enc.fc.weight")


def test_svd_falls_back_when_lapack_does_not_converge(monkeypatch):
    """torch's CPU SVD (gesdd) can fail to converge on ill-conditioned input (seen in TSV-M on ViT-B/16-shaped
    random deltas, T = 4): the SVD is retried in float64, then with SciPy's gesvd; TSV-M's result is unchanged."""
    import hf_cft.merging.methods as methods

    g = torch.Generator().manual_seed(0)
    deltas = [{"mlp.fc1.weight": torch.randn(12, 9, generator=g)} for _ in range(3)]
    want = methods.tsv_m(deltas)["mlp.fc1.weight"]
    real = torch.linalg.svd
    calls = {"n": 0}

    def flaky(x, *a, failing=(torch.float32,), **k):
        calls["n"] += 1
        if x.dtype in failing:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated)")
        return real(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = methods.tsv_m(deltas)["mlp.fc1.weight"]
    assert got.dtype == torch.float32 and calls["n"] > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # float64 fails too: SciPy's gesvd driver
    monkeypatch.setattr(
        torch.linalg, "svd", lambda x, *a, **k: flaky(x, *a, failing=(torch.float32, torch.float64), **k)
    )
    scipy_linalg = pytest.importorskip("scipy.linalg")
    drivers = []
    real_scipy = scipy_linalg.svd

    def spy(*a, **k):
        drivers.append(k.get("lapack_driver", "gesdd"))  # SciPy's default is gesdd, the driver that just failed
        return real_scipy(*a, **k)

    monkeypatch.setattr(scipy_linalg, "svd", spy)
    torch.testing.assert_close(methods.tsv_m(deltas)["mlp.fc1.weight"], want, rtol=1e-4, atol=1e-5)
    assert drivers and set(drivers) == {"gesvd"}


# ------------------------------------------------------------------ selection without a sort: ties by position


def _tie_heavy(kind, n, g):
    if kind == "randn":
        return torch.randn(n, generator=g)
    if kind == "small ints":  # many equal magnitudes, both signs
        return torch.randint(-3, 4, (n,), generator=g).float()
    if kind == "halves":  # mostly ±0.5 and zeros
        return torch.randint(-1, 2, (n,), generator=g).float() * 0.5
    x = torch.zeros(n)  # a block of equal values, the rest exact zeros (-0.0 included)
    x[: n // 3] = 1.0
    x[n // 3 : n // 2] = -0.0
    return x


@pytest.mark.parametrize("kind", ["randn", "small ints", "halves", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_band_is_the_stable_sort_band_on_tie_heavy_tensors(kind, dtype):
    """The selection (two introselects, ties resolved by position only where a threshold straddles an edge) equals
    the band of a stable descending sort, for every band edge, on tensors full of equal magnitudes and zeros: a
    tie at either edge resolved the other way, or ties at both edges that cancel in the count, would differ."""
    g = torch.Generator().manual_seed(7)
    for n in (1, 2, 5, 17, 40):
        x = _tie_heavy(kind, n, g).to(dtype)
        order = torch.sort(x.abs(), descending=True, stable=True).indices
        for start in range(n + 1):
            for stop in range(start, n + 2):
                expected = torch.zeros(n, dtype=torch.bool)
                expected[order[start:stop]] = True
                assert torch.equal(rank_band(x, start, stop), expected), (kind, n, start, stop, x.tolist())


@pytest.mark.parametrize("fused", ["0", "1"])
def test_breadcrumbs_blocked_kernel_equals_the_naive_mask_on_a_tie_heavy_tensor(monkeypatch, fused):
    """The CPU kernels (limits by selection, then the masks block by block on torch or in one fused pass) on a
    tensor spanning several blocks with ties at both band edges inside different blocks: the naive stable-sort
    reference, entry for entry."""
    monkeypatch.setenv("HF_CFT_FUSED", fused)
    g = torch.Generator().manual_seed(3)
    n = 600_000  # > two blocks
    a = torch.randint(0, 40, (n,), generator=g).float() * torch.sign(torch.randn(n, generator=g))
    b = torch.randn(n, generator=g)
    out = breadcrumbs_key([a, b], [0.7, -0.3], [0.2, 0.1], 0.05)
    for x, w, d in ((a, 0.7, 0.2), (b, -0.3, 0.1)):
        order = torch.sort(x.abs(), descending=True, stable=True).indices
        start = int(0.05 * n)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[start : start + int(d * n)]] = True
        x.mul_(mask).mul_(w)
    assert torch.equal(out, a + b)


def test_group_ranks_equal_a_stable_argsort_and_magprune_is_the_torch_formula_bit_for_bit():
    """DELLA's ranks (one int64-key sort per row) are a stable sort's, ties by position; MagPrune in numpy draws the
    same stream and gives the torch formula's fp32 result bit for bit (signed zeros included)."""
    from hf_cft.merging.baselines import _BernoulliStream
    from hf_cft.merging.methods import _magprune_probabilities, group_ranks, magprune

    g = torch.Generator().manual_seed(5)
    for kind in ("randn", "small ints", "halves", "block"):
        rows = torch.stack([_tie_heavy(kind, 33, g) for _ in range(4)])
        order = torch.sort(rows.abs(), dim=1, stable=True).indices
        expected = torch.empty_like(order).scatter_(1, order, torch.arange(33).expand_as(order))
        assert torch.equal(group_ranks(rows), expected), kind
        for scope in ("row", "tensor"):
            keep = 1.0 - _magprune_probabilities(rows, 0.6, 0.2, scope)
            draws = _BernoulliStream(9).uniform(keep.numel()).view(keep.shape)
            want = rows * (draws < keep) / keep
            got = magprune(rows, 0.4, 0.2, _BernoulliStream(9), scope)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (kind, scope)


def test_model_stock_blocked_gram_matches_fp64_cosines_over_many_blocks():
    """Model stock's one-pass Gram (fp32 block products summed in fp64) on tensors spanning many blocks: the ratio of
    the fp64 reference to 1e-6, the result to fp32 rounding."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(700_000, generator=g)
    ds = [{"w": base + 0.8 * torch.randn(700_000, generator=g)} for _ in range(3)]
    out = model_stock(ds)["w"]
    flat = [d["w"].double() for d in ds]
    cos = [float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())) for i in range(3) for j in range(i + 1, 3)]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    assert model_stock_ratio([d["w"] for d in ds]) == pytest.approx(t, rel=1e-6)
    torch.testing.assert_close(out, (t * sum(f for f in flat) / 3).float(), rtol=1e-5, atol=1e-6)


def test_the_paths_other_dtypes_and_devices_take_equal_the_fp32_cpu_path():
    """The whole-tensor forms that a GPU, fp64 or fp16 input takes (stable sorts, fp64 Gram, torch's Bernoulli draws)
    against the fp32 CPU kernels: the same masks, ranks, sums and draws."""
    from hf_cft.merging.baselines import _BernoulliStream
    from hf_cft.merging.methods import _gram, _magprune_probabilities, group_ranks, magprune

    g = torch.Generator().manual_seed(8)
    x = torch.randint(-6, 7, (7, 9), generator=g).float() / 4  # exact in fp16, many ties
    for start, stop in ((0, 10), (4, 40), (20, 63), (0, 63)):
        assert torch.equal(rank_band(x.half(), start, stop), rank_band(x, start, stop)), (start, stop)
    assert torch.equal(group_ranks(x.double()), group_ranks(x))
    ys = [torch.randint(-6, 7, (7, 9), generator=g).float() / 4 for _ in range(3)]
    fp64 = breadcrumbs_key([y.double() for y in ys], [0.5, -1.0, 2.0], [0.3, 0.5, 0.2], 0.1)
    assert torch.equal(fp64.float(), breadcrumbs_key(ys, [0.5, -1.0, 2.0], [0.3, 0.5, 0.2], 0.1))
    gram64, total64 = _gram([y.double() for y in ys], total=True)
    gram32, total32 = _gram(ys, total=True)
    assert torch.equal(gram64, gram32) and torch.equal(total64.float(), total32)  # small integers: exact sums
    assert gram64.shape == (3, 3) and float(gram64[0, 1]) == float((ys[0].double() * ys[1].double()).sum())
    # MagPrune with a torch generator (the GPU's path) draws torch.bernoulli of the same probabilities
    probs = _magprune_probabilities(x, 0.6, 0.2, "row")
    keep = 1.0 - probs
    want = x * torch.bernoulli(keep, generator=torch.Generator().manual_seed(4)) / keep
    got = magprune(x, 0.4, 0.2, torch.Generator().manual_seed(4), "row")
    assert torch.equal(got, want)
    assert torch.equal(
        magprune(x, 0.4, 0.2, _BernoulliStream(4), "row"),
        magprune(x.double(), 0.4, 0.2, _BernoulliStream(4), "row").float(),
    )


def test_option_checks_name_the_option_and_hold_at_their_exact_edges():
    """Each option's range, at its edges, with the message naming it: DELLA's drop probabilities p ± ε/2 must stay
    in [0, 1) (0 allowed, 1 refused), in the function and in the config check; ε ≥ 0; λ is one number; density in
    (0, 1]; γ in [0, 1]; SLERP's t and dot threshold in [0, 1], for the function and the continual form."""
    from hf_cft.merging.methods import ContinualSLERP
    from hf_cft.merging.registry import get_method

    ds = rand_deltas(2, {"w": (4, 6)})
    della(ds, density=0.75, epsilon=0.5)  # drop 0.25: p − ε/2 = 0 exactly, allowed
    della(ds, density=0.25, epsilon=0.48)  # p + ε/2 = 0.99
    edges = [
        (
            lambda: della(ds, density=0.25, epsilon=0.5),
            r"^epsilon=0.5 with density=0.25 gives drop probabilities "
            r"outside \[0, 1\): \[0.5, 1\]; lower epsilon.$",
        ),
        (
            lambda: della(ds, density=0.75, epsilon=0.52),
            r"^epsilon=0.52 with density=0.75 gives drop probabilities "
            r"outside \[0, 1\): \[-0.01, 0.51\]; lower epsilon.$",
        ),
        (lambda: della(ds, epsilon=-0.1), r"^epsilon must lie in \[0, inf\), got -0.1.$"),
        (lambda: della(ds, density=0.0), r"^density must lie in \(0, 1\], got 0.0.$"),
        (lambda: della(ds, rank_scope="x"), r"^rank_scope must be one of"),
        (lambda: breadcrumbs(ds, density=0.0), r"^density must lie in \(0, 1\], got 0.0.$"),
        (lambda: breadcrumbs(ds, gamma=-0.1), r"^gamma must lie in \[0, 1\], got -0.1.$"),
        (lambda: slerp(ds, t=-0.1), r"^t must lie in \[0, 1\], got -0.1.$"),
        (lambda: slerp(ds, dot_threshold=1.5), r"^dot_threshold must lie in \[0, 1\], got 1.5.$"),
        (lambda: slerp(ds, dot_threshold=-0.1), r"^dot_threshold must lie in \[0, 1\], got -0.1.$"),
        (lambda: ContinualSLERP(dot_threshold=1.5), r"^dot_threshold must lie in \[0, 1\], got 1.5.$"),
        (lambda: ContinualSLERP(dot_threshold=-0.1), r"^dot_threshold must lie in \[0, 1\], got -0.1.$"),
        (
            lambda: get_method("della").resolve({"epsilon": 0.5}, [{"density": 0.25}] * 2),
            r"^parameters.epsilon=0.5 with inputs\[0\].density=0.25 gives drop probabilities outside \[0, 1\); lower epsilon.$",
        ),
        (lambda: get_method("della").resolve({"epsilon": 0.52}, [{"density": 0.75}] * 2), r"inputs\[0\].density=0.75"),
    ]
    for call, message in edges:
        with pytest.raises(MergeConfigError, match=message):
            call()
    get_method("della").resolve({"epsilon": 0.5}, [{"density": 0.75}] * 2)  # p − ε/2 = 0: allowed
    with pytest.raises(TaskError, match="lam has 2 values"):
        della(ds, lam=[1.0, 2.0])  # DELLA scales the merged delta by one λ
    assert slerp(ds, dot_threshold=1.0)["w"].shape == (4, 6) and slerp(ds, t=0.0)["w"].shape == (4, 6)
    assert ContinualSLERP(dot_threshold=0.0).current == {}


# ------------------------------------------------------------------------------------------------ pinned edges
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py); the change it catches is named in its docstring.


def test_group_ranks_of_fp64_rows_resolve_what_fp32_would_tie_and_break_ties_by_position():
    """fp64 rows are ranked in fp64 (rounded to fp32 first, 1 + 1e-12 and 1 tie), ties by position even where torch's
    unstable sort would reorder them; the ranks are int64."""
    from hf_cft.merging.methods import group_ranks

    rows = torch.tensor([[1.0 + 1e-12, 1.0, 3.0, -1.0 - 2e-12]], dtype=torch.float64)
    assert group_ranks(rows).tolist() == [[1, 0, 3, 2]]
    ties = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 2, 2, 1, 1] * 100], dtype=torch.float64)
    col = np.arange(ties.shape[1])
    want = np.empty_like(col)
    want[sorted(col, key=lambda i: (abs(float(ties[0, i])), i))] = col  # ascending, ties by position
    got = group_ranks(ties)
    assert got.dtype == torch.int64 and got[0].tolist() == want.tolist()
    assert group_ranks(torch.tensor([[0.5, -0.25, 0.5]])).dtype == torch.int64  # the numpy path too


def test_rank_band_on_bf16_an_empty_band_and_infinite_magnitudes():
    """bf16 (which numpy cannot hold) takes the sorting path and still gives a bool mask; an empty band is an
    all-False bool mask; an infinite magnitude ranks first and is inside a band that starts at 0."""
    x = torch.tensor([0.5, -2.0, 1.0, 0.25, -1.0])
    for start, stop in ((0, 2), (1, 4), (2, 5)):
        band = rank_band(x.bfloat16(), start, stop)
        assert band.dtype == torch.bool and torch.equal(band, rank_band(x, start, stop))
    empty = rank_band(x, 3, 3)
    assert empty.dtype == torch.bool and not empty.any() and empty.shape == x.shape
    inf = torch.tensor([1.0, math.inf, 2.0, -3.0])
    assert rank_band(inf, 0, 2).tolist() == [False, True, False, True]
    assert rank_band(inf.double(), 0, 1).tolist() == [False, True, False, False]


@pytest.mark.parametrize("start", [1, 2])
def test_rank_band_by_radix_selection_with_a_band_that_starts_at_one(start):
    """Large fp32 tensors take the radix selection (fused kernels): a band that drops only the top 1 (or 2) entries
    must leave them out — a threshold looked up only for start > 1 keeps the top entry or fails."""
    from hf_cft.merging import fused

    g = torch.Generator().manual_seed(5)
    x = torch.randn(fused.SELECT_MIN + 3, generator=g)
    if not fused.selects(x.numpy()):
        pytest.skip("numba not installed: no radix selection (the numpy path is tested above)")
    stop = start + 1000
    band = rank_band(x, start, stop)
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    want = torch.zeros(x.numel(), dtype=torch.bool)
    want[order[start:stop]] = True
    assert torch.equal(band, want)


def test_blocked_breadcrumbs_one_input_infinities_threads_and_no_resize_warnings(monkeypatch):
    """The blocked torch kernel (fused kernels off) over several blocks with a short last one: one input alone, an
    infinite entry kept at rank 0 (the band has no upper edge: hi = inf must not drop it), inputs selected on two
    threads of the selection pool (torch reporting two threads); it reuses its buffers (torch warns when an ``out=``
    buffer of the wrong size is resized, which the test turns into an error)."""
    import warnings

    from hf_cft.merging import baselines

    monkeypatch.setenv("HF_CFT_FUSED", "0")
    monkeypatch.setattr(baselines, "PARALLEL_MIN", 16)
    monkeypatch.setattr(baselines, "_POOL", None)
    # what _per_input reads; torch's own thread count is left alone (mutation runs fork, and a forked OpenMP team hangs)
    monkeypatch.setattr(baselines.torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(baselines.BLOCK + 300, generator=g) for _ in range(2)]  # two blocks, the second short
    xs[0][7] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = breadcrumbs_key([xs[1]], [0.5], [0.3], 0.0)
        two = breadcrumbs_key(xs, [1.0, -0.5], [0.3, 0.2], 0.0)
    assert baselines._POOL is not None  # the two inputs were selected on the pool
    torch.testing.assert_close(one, 0.5 * torch.from_numpy(ref_breadcrumbs_tensor(xs[1], 0.3, 0.0)).float())
    assert two[7] == math.inf
    finite = xs[0].clone()
    finite[7] = 1e6  # the same rank as inf
    want = torch.from_numpy(ref_breadcrumbs_tensor(finite, 0.3, 0.0)).float()
    want[7] = math.inf
    want = want - 0.5 * torch.from_numpy(ref_breadcrumbs_tensor(xs[1], 0.2, 0.0)).float()
    torch.testing.assert_close(two, want)


def test_magprune_of_one_entry_groups_and_of_a_single_entry_tensor():
    """A group of one entry (a 1-column row) is dropped with probability p exactly; a tensor of one entry is pruned
    too (not returned as it was); n = 2 groups get p ± ε/2. Both the numpy and the torch forms."""
    from hf_cft.merging.baselines import _BernoulliStream
    from hf_cft.merging.methods import _magprune_probabilities, magprune

    col = torch.tensor([[0.5], [-2.0], [1.0]])
    probs = _magprune_probabilities(col, 0.6, 0.2, "row")
    assert probs.dtype == torch.float32 and probs.shape == (3, 1)
    assert torch.equal(probs, torch.full((3, 1), 0.6))
    pair = _magprune_probabilities(torch.tensor([[0.5, -2.0]]), 0.6, 0.2, "row")
    torch.testing.assert_close(pair, torch.tensor([[0.7, 0.5]]))
    for x in (col, torch.tensor([3.0]), torch.tensor([[0.5, -2.0], [4.0, 1.0]])):
        keep = 1.0 - _magprune_probabilities(x, 0.6, 0.2, "row")
        u = _BernoulliStream(3).uniform(x.numel()).view(x.shape)
        want = x * (u < keep) / keep
        got = magprune(x, 0.4, 0.2, _BernoulliStream(3), "row")
        assert torch.equal(got, want), x
        assert torch.equal(magprune(x.double(), 0.4, 0.2, _BernoulliStream(3), "row").float(), want)
    single = magprune(torch.tensor([3.0]), 0.4, 0.2, _BernoulliStream(3), "row")
    assert float(single) in (0.0, pytest.approx(3.0 / 0.4))


def test_della_key_uses_the_input_weight_and_the_rank_scope():
    """A weight of exactly 2 still scales its input; ``rank_scope`` reaches MagPrune (row and tensor ranks differ)."""
    from hf_cft.merging.baselines import _BernoulliStream, _key_seed
    from hf_cft.merging.methods import della_key, magprune

    ds = rand_deltas(2, {"w": (4, 6)}, seed=4)
    ts = [d["w"] for d in ds]
    got = della_key("w", ts, [2.0, 1.0], [0.5, 0.5], 0.2, 3, "tensor")
    stream = _BernoulliStream(_key_seed(3, "w"))
    pruned = [magprune(2.0 * ts[0], 0.5, 0.2, stream, "tensor"), magprune(ts[1], 0.5, 0.2, stream, "tensor")]
    stacked = torch.stack(pruned)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    want = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(got, want)
    row = della_key("w", ts, [2.0, 1.0], [0.5, 0.5], 0.2, 3, "row")
    assert not torch.equal(row, got)


def test_non_finite_results_blame_the_scaling_option_by_name():
    """An overflow to inf names the option that scaled finite inputs out of range, for every method that checks."""
    ds = rand_deltas(2, {"w": (4, 6)})
    calls = [
        (lambda: breadcrumbs(ds, density=0.5, lam=1e300), r"^lam=1e\+300 scales"),
        (lambda: della(ds, lam=1e300), r"^lam=1e\+300 \(with the 1/\(1-p\) rescale\) scales"),
        (lambda: iso_c(ds, alpha=1e300), r"^alpha=1e\+300 scales"),
        (lambda: tsv_m(ds, alpha=1e300), r"^alpha=1e\+300 scales"),
    ]
    for call, message in calls:
        with pytest.raises(MergeConfigError, match=message):
            call()
    with pytest.raises(MergeConfigError, match=r"^alpha must be finite, got (nan|inf).$"):
        tsv_m(ds, alpha=math.nan)


def test_slerp_edges_zero_inputs_threshold_exactly_and_parallel_or_opposite_tensors():
    """A zero tensor gives the linear (1 − t)·a + t·b; at |cos ω| equal to the threshold the spherical formula still
    applies (only above it the linear one); with the threshold at 1, parallel or opposite tensors (sin ω = 0) are
    interpolated linearly instead of dividing by zero; the default threshold is 0.9995."""
    from hf_cft.merging.methods import slerp_tensor

    a = torch.tensor([1.0, 2.0, -1.0])
    zero = torch.zeros(3)
    torch.testing.assert_close(slerp_tensor(a, zero, 0.25), 0.75 * a)
    torch.testing.assert_close(slerp_tensor(zero, a, 0.25), 0.25 * a)
    b = torch.tensor([0.5, 2.0, 1.0])
    fa, fb = a.double(), b.double()
    cos = float(fa @ fb) / (float(fa.norm()) * float(fb.norm()))
    at = slerp_tensor(a, b, 0.3, dot_threshold=cos)
    torch.testing.assert_close(at, torch.from_numpy(ref_slerp(a, b, 0.3, threshold=1.0)).float())
    assert not torch.allclose(at, 0.7 * a + 0.3 * b)
    c = torch.tensor([1.0, 2.0, 3.0])  # cos ω of (c, c) computes to 1.0 exactly (of (a, a) to 1 + 2⁻⁵²)
    for x, other in ((c, c), (a, 2.0 * a), (a, -a)):
        got = slerp_tensor(x, other, 0.3, dot_threshold=1.0)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, 0.7 * x + 0.3 * other)
    e, near = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0245, 0.0])  # cos ω ≈ 0.9997 > 0.9995: linear
    torch.testing.assert_close(slerp_tensor(e, near, 0.3), 0.7 * e + 0.3 * near, rtol=0, atol=1e-7)
    assert not torch.allclose(
        slerp_tensor(e, near, 0.3, dot_threshold=0.9999), 0.7 * e + 0.3 * near, rtol=0, atol=1e-5
    )


def test_dot_threshold_reaches_every_slerp_form():
    """``dot_threshold = 0`` makes every pair of non-orthogonal tensors linear: in the function (on deltas and on
    weights), the continual form and the registry kernel (both spaces) — a dropped argument falls back to 0.9995."""
    from hf_cft.merging.registry import TensorContext, get_method

    ds = rand_deltas(2, {"w": (4, 6)}, seed=6)
    a, b = ds[0]["w"], ds[1]["w"]
    base = {"w": torch.randn(4, 6, generator=torch.Generator().manual_seed(1))}
    lin = 0.7 * a + 0.3 * b
    torch.testing.assert_close(slerp(ds, t=0.3, dot_threshold=0.0)["w"], lin)
    torch.testing.assert_close(slerp(ds, t=0.3, base=base, dot_threshold=0.0)["w"], lin, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(slerp(ds, t=0.3)["w"], lin, atol=1e-4)
    merger = ContinualSLERP(dot_threshold=0.0)
    merger.add(ds[0])
    merger.add(ds[1])
    torch.testing.assert_close(merger.merged["w"], 0.5 * a + 0.5 * b)
    method = get_method("slerp")
    for space in ("delta", "weights"):
        opts, per = method.resolve({"t": 0.3, "dot_threshold": 0.0, "space": space}, [{}, {}])
        ctx = TensorContext("w", opts, per, [True, True], lambda: base["w"], 0, 1)
        torch.testing.assert_close(method.fn([a, b], ctx), lin, rtol=1e-5, atol=1e-5)


def test_slerp_with_base_names_the_key_and_both_shapes():
    ds = rand_deltas(2, {"w": (4, 6)})
    with pytest.raises(DeltaError, match=r"^key 'w' has shape \(6, 4\) in base but \(4, 6\) in the deltas.$"):
        slerp(ds, base={"w": torch.zeros(6, 4)})


def test_model_stock_angle_average_small_and_zero_deltas_and_cosine_rounding():
    """The ``angle`` average (cosine of the mean pairwise angle) for T = 3 in every form; cosines of small deltas
    (norms below 1); a zero delta has cosine 0; a cosine that rounds just past ±1 is clipped (acos would fail)."""
    from hf_cft.merging.registry import TensorContext, get_method

    g = torch.Generator().manual_seed(3)
    ts = [0.1 * torch.randn(6, 5, generator=g) + 0.05 for _ in range(3)]

    def ref_ratio(tensors, average):
        flat = [npy(t).ravel() for t in tensors]
        cos = []
        for i in range(len(flat)):
            for j in range(i + 1, len(flat)):
                den = np.linalg.norm(flat[i]) * np.linalg.norm(flat[j])
                cos.append(float(flat[i] @ flat[j] / den) if den > 0 else 0.0)
        c = math.cos(np.mean(np.arccos(cos))) if average == "angle" else float(np.mean(cos))
        c = max(c, 0.0)
        return len(flat) * c / (1 + (len(flat) - 1) * c)

    for average in ("cosine", "angle"):
        t = ref_ratio(ts, average)
        assert model_stock_ratio(ts, average) == pytest.approx(t, rel=1e-6)
        want = t * sum(ts) / 3
        for fused_on in ("0", "1"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("HF_CFT_FUSED", fused_on)
                got = model_stock([{"w": x} for x in ts], average=average)["w"]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        method = get_method("model_stock")
        opts, per = method.resolve({"average": average}, [{}] * 3)
        ctx = TensorContext("w", opts, per, [True] * 3, None, 0, 1)
        torch.testing.assert_close(method.fn(ts, ctx), want, rtol=1e-5, atol=1e-7)
    assert ref_ratio(ts, "angle") != pytest.approx(ref_ratio(ts, "cosine"), rel=1e-6)
    with_zero = [ts[0], ts[1], torch.zeros(6, 5)]
    assert model_stock_ratio(with_zero) == pytest.approx(ref_ratio(with_zero, "cosine"), rel=1e-6)
    ones = torch.ones(3)  # ⟨x, x⟩ = 3 but √3·√3 = 2.9999999999999996: the cosine rounds to 1 + 2⁻⁵²
    assert model_stock_ratio([ones, ones], "angle") == 1.0
    assert model_stock_ratio([ones, -ones], "angle") == 0.0
    assert model_stock_ratio([ones, ones]) == 1.0


def test_model_stock_checks_average_and_needs_two_models_in_every_form():
    ts = [torch.ones(3), torch.ones(3)]
    for call in (lambda: model_stock_ratio(ts, "mean"), lambda: model_stock([{"w": t} for t in ts], average="mean")):
        with pytest.raises(MergeConfigError, match=r"^average must be one of"):
            call()
    message = r"^model stock needs at least 2 fine-tuned models \(got 1\): the angle .* is undefined for one.$"
    with pytest.raises(TaskError, match=message):
        model_stock_ratio(ts[:1])
    with pytest.raises(TaskError, match=message):
        model_stock([{"w": ts[0]}])


def test_gram_is_fp64_dot_products_for_fp64_inputs_and_fp64_for_fp32_ones():
    """fp64 inputs get fp64 dot products (a pass through fp32 blocks would round them); the Gram is fp64 either way."""
    from hf_cft.merging.methods import _gram

    x = torch.tensor([1.0 + 1e-12, 1.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 1e-12, 1.0], dtype=torch.float64)
    gram, total = _gram([x, y], total=True)
    assert gram.dtype == torch.float64 and float(gram[0, 1]) == float(x @ y) and float(gram[0, 1]) != 1.0
    assert float(gram[0, 0]) == float(x @ x)
    assert torch.equal(total, x + y)
    g32, t32 = _gram([x.float(), y.float()], total=True)
    assert g32.dtype == torch.float64 and g32.shape == (2, 2) and torch.equal(t32, (x + y).float())


def test_iso_cts_checks_common_fraction_by_name_and_honours_matrix_keys():
    ds = rand_deltas(2, {"m.weight": (6, 5)}, seed=2)
    zero = iso_cts(ds, common_fraction=0.0)["m.weight"]  # 0 allowed: every direction task-specific
    assert_close_np(zero, ref_iso_cts_matrix([npy(d["m.weight"]) for d in ds], 0.0))
    for bad in (-0.1, 1.5):
        with pytest.raises(MergeConfigError, match=rf"^common_fraction must lie in \[0, 1\], got {bad}.$"):
            iso_cts(ds, common_fraction=bad)
    averaged = iso_cts(ds, matrix_keys=[])["m.weight"]  # no key is a matrix: the mean
    torch.testing.assert_close(averaged, (ds[0]["m.weight"] + ds[1]["m.weight"]) / 2)
    with pytest.raises(MergeConfigError, match=r"^alpha must be finite, got (nan|inf).$"):
        iso_cts(ds, alpha=math.inf)


def test_tsv_m_keeps_one_triplet_per_task_when_rank_over_tasks_is_one():
    """r = 3, T = 2: ⌊r/T⌋ = 1 triplet per task (not 2)."""
    ds = rand_deltas(2, {"m.weight": (3, 3)}, seed=9)
    mats = [npy(d["m.weight"]) for d in ds]
    assert_close_np(tsv_m(ds)["m.weight"], ref_tsv_matrix(mats))


def test_breadcrumbs_config_allows_density_plus_gamma_of_exactly_one():
    from hf_cft.merging.registry import get_method

    get_method("breadcrumbs").resolve({"gamma": 0.1}, [{"density": 0.9}] * 2)  # 0.9 + 0.1 == 1.0: allowed
    with pytest.raises(MergeConfigError, match=r"^inputs\[1\].density \+ parameters.gamma must not exceed 1"):
        get_method("breadcrumbs").resolve({"gamma": 0.2}, [{"density": 0.8}, {"density": 0.9}])


def test_magprune_keeps_an_entry_only_when_its_draw_is_below_the_keep_probability():
    """torch.bernoulli keeps where u·2⁻²⁴ < p, strictly: draw 4,679,876 of the stream seeded 2 is exactly 0.5, so an
    entry kept with probability 0.5 (density 0.5, ε = 0) at that draw is dropped, in the numpy and the torch forms."""
    from hf_cft.merging.baselines import _BernoulliStream
    from hf_cft.merging.methods import magprune

    skip = 4_679_875
    probe = _BernoulliStream(2)
    probe.uniform_numpy(skip)
    assert float(probe.uniform_numpy(1)[0]) == 0.5
    for dtype in (torch.float32, torch.float64):  # fp32: numpy form; fp64: torch form
        stream = _BernoulliStream(2)
        stream.uniform_numpy(skip)
        x = torch.tensor([1.0, 1.0], dtype=dtype)
        got = magprune(x, 0.5, 0.0, stream, "tensor")
        reference = _BernoulliStream(2)
        reference.uniform_numpy(skip)
        u = reference.uniform(2)
        assert got[0] == 0.0 and got[1] == (2.0 if u[1] < 0.5 else 0.0), (dtype, got)


def test_rank_band_by_radix_selection_on_a_tie_heavy_tensor():
    """The radix selection on a tensor of few distinct magnitudes (every band edge inside a long run of ties):
    the counts above and at each threshold decide which tied entries are in, as a stable sort's ranks do."""
    from hf_cft.merging import fused

    g = torch.Generator().manual_seed(6)
    x = torch.randint(-40, 41, (fused.SELECT_MIN + 5,), generator=g).float() / 8
    if not fused.selects(x.numpy()):
        pytest.skip("numba not installed: no radix selection (the numpy path is tested above)")
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    for start, stop in ((0, 1000), (1, 333_333), (12_345, 700_001), (500_000, x.numel())):
        want = torch.zeros(x.numel(), dtype=torch.bool)
        want[order[start:stop]] = True
        assert torch.equal(rank_band(x, start, stop), want), (start, stop)
    # two runs of ties in one radix bucket (1 and the next float up share their top 16 bits): the entries above the
    # threshold inside its own bucket count too when deciding that its ties straddle the band's edge
    one, up = 1.0, float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    y = torch.cat([torch.full((300_000,), up), torch.full((300_000,), -one), torch.full((fused.SELECT_MIN,), 0.25)])
    y = y[torch.randperm(y.numel(), generator=g)]
    order = torch.sort(y.abs(), descending=True, stable=True).indices
    for start, stop in ((0, 450_000), (100_000, 450_000)):
        want = torch.zeros(y.numel(), dtype=torch.bool)
        want[order[start:stop]] = True
        assert torch.equal(rank_band(y, start, stop), want), (start, stop)


def test_the_tensor_level_helpers_refuse_nan_and_inf_instead_of_returning_a_number():
    """``slerp_tensor`` and ``model_stock_ratio`` are public: a NaN/inf input is refused, not turned into a NaN
    tensor or a ratio of 0."""
    from hf_cft.merging.methods import slerp_tensor

    a, bad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, math.nan, 0.0])
    with pytest.raises(NonFiniteError, match=r"^slerp_tensor: an input holds NaN/inf"):
        slerp_tensor(a, bad, 0.5)
    with pytest.raises(NonFiniteError, match=r"^slerp_tensor: an input holds NaN/inf"):
        slerp_tensor(torch.tensor([math.inf, 0.0, 0.0]), a, 0.5)
    with pytest.raises(NonFiniteError, match=r"^model_stock_ratio: a tensor holds NaN/inf"):
        model_stock_ratio([a, torch.tensor([math.inf, 0.0, 0.0])])
    with pytest.raises(NonFiniteError, match=r"^model_stock_ratio: a tensor holds NaN/inf"):
        model_stock_ratio([a.double(), bad.double()])
