"""hf_cft's merging methods against FusionBench's own functions on random CLIP-shaped task vectors
(``benchmarks/fusionbench_parity.py``, smaller: T = 2, 3, one seed).

Runs only where FusionBench imports (``pip install --no-deps fusion-bench`` plus the few modules its top level
needs, listed in the benchmark's docstring); CI does not install it, and the test skips with the reason.
"""

from __future__ import annotations

import math

import pytest
from tests_helpers import load_benchmark

pytest.importorskip(
    "fusion_bench",
    reason="fusion_bench is not installed (optional, for parity checks only: pip install --no-deps fusion-bench "
    "and the modules listed in benchmarks/fusionbench_parity.py; its full dependency set does not install beside "
    "the pinned torch, so CI does not install it)",
)


@pytest.fixture(scope="module")
def parity():
    mod = load_benchmark("fusionbench_parity", "fusionbench_parity")
    reason = mod.missing_reason()
    if reason:
        pytest.skip(reason)
    return mod


SMALL = {"tasks": (2, 3), "seeds": (0,)}


def _run(parity, name, **kwargs):
    rows = parity.COMPARISONS[name](**kwargs)
    for r in rows:
        print(f"{r['method']}: max rel {r['max_rel']}, {r['verdict']}")
        assert r["verdict"] != "DIFFERS", r
        if r["verdict"].startswith("equal") and r["max_rel"] is not None:
            assert r["max_rel"] <= parity.TOL, r
    return {r["method"]: r for r in rows}


@pytest.mark.parametrize(
    "name", ["ties", "task_arithmetic", "emr", "tall", "fisher", "regmean", "regmean_models", "iso"]
)
def test_equal_to_fusion_bench(parity, name):
    rows = _run(parity, name, **SMALL)
    for r in rows.values():
        if r["cases"]:
            assert r["verdict"].startswith("equal"), r


def test_tsv_m_equal_and_rank_below_t_differs_by_design(parity):
    rows = _run(parity, "tsv_m", **SMALL)
    assert rows["tsv_m"]["verdict"] == "equal (convention)"
    small = rows["tsv_m, rank r < T"]["cases"][0]
    assert small["fb_norm"] == 0.0 and small["ours_norm"] > 0.0  # FusionBench keeps ⌊3/4⌋ = 0 triplets


def test_model_stock_equal_with_angle_average_and_clipped_below_zero(parity):
    rows = _run(parity, "model_stock", **SMALL)
    assert rows["model_stock"]["verdict"] == "equal (convention)"
    apart = rows["model_stock, cos θ < 0"]["cases"][0]
    assert apart["ours_norm"] == 0.0 and apart["fb_norm"] > 0.0  # hf_cft: t = 0; FusionBench: t < 0


def test_slerp_equal_except_on_a_zero_tensor(parity):
    rows = _run(parity, "slerp", seeds=(0,))
    zero = rows["slerp, a zero tensor"]["cases"][0]
    assert zero["ours_value"] == pytest.approx(0.5)  # linear: t·b
    assert zero["fb_value"] == pytest.approx(math.sin(math.pi / 4), rel=1e-6)  # ω = 90°: sin(tπ/2)·b


def test_dare_drop_rate_rescale_and_mean_agree(parity):
    rows = _run(parity, "dare", rho=0.8, num_seeds=100)
    case = rows["dare (drop and rescale)"]["cases"][0]
    assert rows["dare (drop and rescale)"]["verdict"] == "differs by design"  # the random streams only
    assert case["survivor_rescale_max_abs_ours"] == 0.0 and case["survivor_rescale_max_abs_fb"] == 0.0
