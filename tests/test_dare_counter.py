"""DARE's and DELLA's counter-based drop masks (``rng="counter"``): the stream against SplitMix64 written out here,
masks independent of how they are drawn, DARE against its definition, the fused kernel bit for bit equal to the
blocked one, and the option reaching every entry point (function, registry/config, continual strategy)."""

import math
import zlib

import pytest
import torch

from hf_cft.errors import ContinualError, MergeConfigError
from hf_cft.merging import baselines as B
from hf_cft.merging import dare
from hf_cft.merging import fused as fused_mod
from hf_cft.merging.methods import della
from hf_cft.merging.streaming import merge_deltas

MASK64 = (1 << 64) - 1


def splitmix_top24(key: int, i: int) -> int:
    """Draw i of the counter stream, in Python integers: SplitMix64's finaliser of key + i·φ, top 24 bits."""
    z = (key + i * 0x9E3779B97F4A7C15) & MASK64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z >> 40


@pytest.mark.parametrize("key", [0, 1, 12345, (1 << 63) - 25, MASK64])
def test_counter_draws_are_splitmix64(key):
    got = B.counter_draws(key, 1000, 64)
    assert got.dtype.name == "uint32"
    assert [int(v) for v in got] == [splitmix_top24(key, 1000 + i) for i in range(64)]
    assert int(got.max()) < 1 << 24


def test_counter_stream_is_the_same_in_any_blocks():
    whole = B._CounterStream(7).mask(10_000, 0.3)
    s = B._CounterStream(7)
    parts = torch.cat([s.mask(3_333, 0.3), s.mask(1, 0.3), s.mask(6_666, 0.3)])
    assert torch.equal(whole, parts)
    s = B._CounterStream(7)
    assert s.skip(4_000) == 0 and s.pos == 4_000
    assert torch.equal(s.mask(6_000, 0.3), whole[4_000:])
    # uniforms of the same draws; another seed gives other draws; the kept fraction is about keep
    u = B._CounterStream(7).uniform(10_000)
    assert torch.equal(u < torch.tensor(0.3), whole)
    assert not torch.equal(B._CounterStream(8).mask(10_000, 0.3), whole)
    assert abs(float(B._CounterStream(3).mask(200_000, 0.1).float().mean()) - 0.1) < 0.003


def _reference_dare(deltas, rho, seed, lam, then="ta"):
    """DARE from its definition with the documented stream: per key one counter stream seeded from
    (seed · 1,000,003 + crc32(key)) mod (2⁶³ − 1); input t's mask takes draws t·n … (t + 1)·n − 1, kept where
    u < ⌈fp32(1 − ρ)·2²⁴⌉; τ̃_t = m_t·τ_t/(1 − ρ); λ·Σ_t τ̃_t (or the TIES election of the τ̃_t)."""
    keep = 1.0 - rho
    threshold = math.ceil(float(torch.tensor(keep, dtype=torch.float32)) * 2**24)
    out = {}
    for key in deltas[0]:
        key_seed = (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)
        n = deltas[0][key].numel()
        dropped = []
        for t, d in enumerate(deltas):
            u = torch.tensor([splitmix_top24(key_seed, t * n + i) for i in range(n)])
            m = (u < threshold).view(d[key].shape)
            dropped.append(d[key] * m / keep)
        if then == "ta":
            out[key] = lam * sum(dropped)
        else:
            out[key] = lam * B._elect_disjoint(torch.stack(dropped))
    return out


@pytest.mark.parametrize("then", ["ta", "ties"])
def test_dare_counter_follows_its_definition(then):
    g = torch.Generator().manual_seed(0)
    deltas = [{"a.weight": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
    got = dare(deltas, rho=0.6, seed=11, then=then, lam=0.7, rng="counter")
    want = _reference_dare(deltas, 0.6, 11, 0.7, then)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    # a different stream from the default one, same distribution
    assert not torch.equal(got["a.weight"], dare(deltas, rho=0.6, seed=11, then=then, lam=0.7)["a.weight"])


@pytest.mark.parametrize("numel", [1000, fused_mod.PARALLEL_MIN + 17])
def test_fused_counter_kernel_equals_the_blocked_one(numel, monkeypatch):
    if not fused_mod.available():
        pytest.skip("numba is not installed: the fused kernels do not run (pip install 'hf-cft[fast]')")
    g = torch.Generator().manual_seed(1)
    deltas = [{"w": torch.randn(numel, generator=g)} for _ in range(3)]
    deltas[1]["w"][:5] = -0.0  # negative zeros keep their sign, as in the blocked kernel
    options = {"rng": "counter", "density": 0.3, "seed": 5}
    inputs = [{"weight": 0.5}, {"weight": 1.0, "density": 1.0}, {"weight": 2.0}]  # the middle one kept whole
    calls = []
    real = fused_mod.dare_ta
    monkeypatch.setattr(fused_mod, "dare_ta", lambda *a: calls.append(1) or real(*a))
    fast = merge_deltas(deltas, "dare", options, inputs=inputs)["w"]
    assert calls, "the fused kernel did not run"
    monkeypatch.setenv("HF_CFT_FUSED", "0")
    slow = merge_deltas(deltas, "dare", options, inputs=inputs)["w"]
    assert torch.equal(fast, slow) and torch.equal(torch.signbit(fast), torch.signbit(slow))  # bit for bit


def test_dare_counter_in_the_registry_equals_the_function(monkeypatch):
    g = torch.Generator().manual_seed(2)
    deltas = [{"w": torch.randn(40, 30, generator=g)} for _ in range(2)]
    for fused_on in ("1", "0"):
        monkeypatch.setenv("HF_CFT_FUSED", fused_on)
        got = merge_deltas(deltas, "dare", {"rng": "counter", "density": 0.2, "seed": 3, "weight": 1.0})["w"]
        want = dare(deltas, rho=0.8, seed=3, lam=1.0, rng="counter")["w"]
        assert torch.equal(got, want)


def test_della_counter_runs_and_differs_from_torch():
    g = torch.Generator().manual_seed(3)
    deltas = [{"w": torch.randn(12, 20, generator=g)} for _ in range(3)]
    a = della(deltas, rng="counter", seed=1)["w"]
    assert torch.equal(a, della(deltas, rng="counter", seed=1)["w"])
    assert not torch.equal(a, della(deltas, seed=1)["w"])
    assert torch.equal(merge_deltas(deltas, "della", {"rng": "counter", "seed": 1})["w"], a)


def test_bad_rng_is_refused_by_name():
    deltas = [{"w": torch.ones(3)}]
    with pytest.raises(MergeConfigError, match="rng"):
        dare(deltas, rng="philox")
    with pytest.raises(MergeConfigError, match="rng"):
        della(deltas, rng="mt")
    with pytest.raises(MergeConfigError, match="rng"):
        merge_deltas(deltas, "dare", {"rng": "numpy"})


def test_continual_strategies_take_rng():
    from hf_cft.continual.baseline_strategies import dare_strategy, della_strategy

    assert "rng" not in dare_strategy().settings()  # the default stays out of the record
    assert dare_strategy(rng="counter").settings()["rng"] == "counter"
    assert della_strategy(rng="counter").settings()["rng"] == "counter"
    with pytest.raises(ContinualError, match="rng"):
        dare_strategy(rng="bad")
