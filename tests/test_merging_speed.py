"""The fast merge kernels (issue 18, item 2) give the bits of the formulas they replace.

Each reference below is the whole-tensor implementation that the blocked CPU kernel replaced, kept here as the
definition: ``torch.where`` selections, ``torch.bernoulli`` masks from a seeded CPU generator, full-size temporaries.
The kernels must equal them bit for bit (int32 views compared, so even the sign of a zero counts), on tensors larger
than a block and not a multiple of it, with several inputs, unequal weights, absent inputs and ties.
"""

import numpy as np
import pytest
import torch

from hf_cft.merging import baselines
from hf_cft.merging.baselines import BLOCK, _BernoulliStream, _elect_disjoint, _key_seed, _magmax_step, magmax
from hf_cft.merging.methods import della_key, magprune
from hf_cft.merging.streaming import merge_deltas


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """These tests pin the blocked torch kernels. The fused (numba) ones are pinned against them in
    tests/test_merging_fused.py: they sum an entry's T terms in list order, where torch sums T ≥ 5 rows in an order
    of its own, so for T ≥ 5 the two agree to fp32 rounding, not bit for bit."""
    monkeypatch.setenv("HF_CFT_FUSED", "0")


SHAPES = {"a.weight": (3, BLOCK + 517), "b.bias": (7,), "c.weight": (2 * BLOCK // 64, 64), "d.scale": (1,)}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def assert_bits(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert bits_equal(got[key], want[key]), key


def random_deltas(n: int, seed: int = 0, with_zeros: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        d = {k: torch.randn(s, generator=g) * 0.01 for k, s in SHAPES.items()}
        if with_zeros and t == 1:
            d["a.weight"][0, :100] = 0.0  # exact zeros: sign election and magnitude ties
            d["a.weight"][1, :50] = -d["a.weight"][1, :50]
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------------ references


def ref_bernoulli(tensors, keeps, seed, key):
    gen = torch.Generator()
    gen.manual_seed(_key_seed(seed, key))
    return [
        None if k == 1.0 else torch.bernoulli(torch.full_like(t, k), generator=gen) for t, k in zip(tensors, keeps)
    ]


def ref_dare(tensors, weights, densities, seed, key, then):
    masks = ref_bernoulli(tensors, densities, seed, key)
    dropped = [t if m is None else t * m / k for t, m, k in zip(tensors, masks, densities)]
    dropped = [d if w == 1.0 else (d.mul_(w) if d is not t else d * w) for d, t, w in zip(dropped, tensors, weights)]
    if then == "ta":
        out = dropped[0].clone()
        for d in dropped[1:]:
            out.add_(d)
        return out
    return _elect_disjoint(torch.stack(dropped))


def ref_magmax(tensors, weights, tie_break):
    best = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        value = t if w == 1.0 else t * w
        wins = value.abs() >= best.abs() if tie_break == "later" else value.abs() > best.abs()
        best = torch.where(wins, value, best)
    return best


def ref_trim_topk(tensor, k):
    """trim_top_k up to issue 18 (ties at the threshold resolved by torch.topk)."""
    n = tensor.numel()
    keep = max(1, int(k * n))
    if keep >= n:
        return tensor.clone()
    flat = tensor.reshape(-1)
    magnitude = flat.abs()
    kth = float(np.partition(magnitude.numpy(), n - keep)[n - keep])
    selected = magnitude >= kth
    if int(selected.sum()) == keep:
        return flat.where(selected, 0.0).view_as(tensor)
    idx = torch.topk(magnitude, keep, largest=True, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(tensor)


def ref_trim(tensor, k):
    """The definition: the first max(1, ⌊k·n⌋) entries of a stable descending sort of |τ| (ties by position)."""
    n = tensor.numel()
    keep = max(1, int(k * n))
    if keep >= n:
        return tensor.clone()
    flat = tensor.reshape(-1)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]] = True
    return flat.where(kept, 0.0).view_as(tensor)


def ref_ties(tensors, weights, densities, merge):
    trimmed = [ref_trim(t, k) for t, k in zip(tensors, densities)]
    trimmed = [t if w == 1.0 else t.mul_(w) for t, w in zip(trimmed, weights)]
    return _elect_disjoint(torch.stack(trimmed), merge)


def ref_consensus(tensors, weights, lambdas, k):
    scaled = [t if w == 1.0 else t * w for t, w in zip(tensors, weights)]
    total = scaled[0].clone()
    for t in scaled[1:]:
        total.add_(t)
    votes = torch.zeros(total.shape, dtype=torch.int32)
    for t, lam in zip(scaled, lambdas):
        votes += t.abs() > lam * (total - t).abs()
    return total.mul_(votes >= k)


def per_key(deltas, fn):
    return {key: fn(key, [d[key] for d in deltas]) for key in deltas[0]}


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("seed", [0, 12345678901234, 2**63 - 2])
def test_bernoulli_stream_is_torch_cpu_generator_stream(seed):
    """Masks of scalar and per-entry probabilities, drawn in several calls, are those of one CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    want = [
        torch.bernoulli(torch.full((BLOCK + 3,), 0.1), generator=gen),
        torch.bernoulli(torch.full((5,), 0.7), generator=gen),
        torch.bernoulli(probs, generator=gen),
    ]
    stream = _BernoulliStream(seed)
    first = torch.cat([stream.mask(1000, 0.1), stream.mask(BLOCK + 3 - 1000, 0.1)])
    got = [first, stream.mask(5, 0.7), stream.uniform(1000) < probs]
    for g, w in zip(got, want):
        assert torch.equal(g, w.bool())


@pytest.mark.parametrize("then", ["ta", "ties"])
def test_dare_kernel_equals_torch_bernoulli_formula(then):
    deltas = random_deltas(3, seed=1)
    inputs = [{"weight": 0.3, "density": 0.1}, {"weight": 1.0, "density": 0.5}, {"weight": -0.7, "density": 1.0}]
    got = merge_deltas(deltas, "dare", {"then": then, "seed": 4}, inputs=inputs)
    want = per_key(
        deltas,
        lambda key, ts: ref_dare(ts, [i["weight"] for i in inputs], [i["density"] for i in inputs], 4, key, then),
    )
    assert_bits(got, want)
    # the one-shot function draws the same masks
    one_shot = baselines.dare(deltas, rho=0.6, seed=9, then="ta", lam=1.0)
    assert_bits(
        one_shot, per_key(deltas, lambda key, ts: sum(ref_dare(ts, [1.0] * 3, [0.4] * 3, 9, key, "ta") for _ in [0]))
    )


def test_dare_absent_input_still_draws_its_mask():
    """An input without a key counts as zeros there and still consumes its mask draws (the old stream)."""
    deltas = random_deltas(3, seed=2)
    del deltas[1]["a.weight"]
    got = merge_deltas(deltas, "dare", {"density": 0.3, "seed": 1})
    ts = [deltas[0]["a.weight"], torch.zeros(SHAPES["a.weight"]), deltas[2]["a.weight"]]
    assert bits_equal(got["a.weight"], ref_dare(ts, [0.3] * 3, [0.3] * 3, 1, "a.weight", "ta"))


@pytest.mark.parametrize("tie_break", ["later", "earlier"])
def test_magmax_kernel_equals_where_fold(tie_break):
    deltas = random_deltas(4, seed=3)
    deltas[2]["a.weight"][0, :100] = -deltas[0]["a.weight"][0, :100]  # equal magnitudes, opposite signs
    weights = [0.5, 0.5, 1.0, 0.25]
    got = merge_deltas(deltas, "magmax", {"tie_break": tie_break}, inputs=[{"weight": w} for w in weights])
    assert_bits(got, per_key(deltas, lambda key, ts: ref_magmax(ts, weights, tie_break)))
    one_shot = magmax(deltas, lam=0.3, tie_break=tie_break)
    assert_bits(one_shot, per_key(deltas, lambda key, ts: 0.3 * ref_magmax(ts, [1.0] * 4, tie_break)))
    a, b = deltas[0]["a.weight"], deltas[2]["a.weight"]
    assert bits_equal(_magmax_step(a, b, tie_break), ref_magmax([a, b], [1.0, 1.0], tie_break))
    assert bits_equal(a, random_deltas(4, seed=3)[0]["a.weight"])  # the fold never writes into an input


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
def test_ties_kernel_equals_trim_and_elect(merge):
    deltas = random_deltas(9, seed=4)
    weights = [1.0, 0.5, 2.0, 1.0, 1.0, 0.3, 1.0, 1.0, 0.7]
    densities = [0.2, 0.5, 1.0, 0.01, 0.2, 0.2, 0.9, 0.2, 0.3]
    inputs = [{"weight": w, "density": k} for w, k in zip(weights, densities)]
    got = merge_deltas(deltas, "ties", {"merge": merge}, inputs=inputs)
    assert_bits(got, per_key(deltas, lambda key, ts: ref_ties(ts, weights, densities, merge)))
    for key, d in deltas[1].items():
        assert bits_equal(baselines.trim_top_k(d, 0.2), ref_trim(d, 0.2)), key
        assert bits_equal(baselines.magnitude_prune([{key: d}], k=0.2, lam=1.0)[key], ref_trim(d, 0.2)), key


def test_trim_ties_keep_the_first_entries_by_position():
    """Magnitude ties at the threshold keep the first tied entries in flat order (a stable sort's choice), in
    trim_top_k and in the TIES kernel; without ties the trim is the earlier topk-based one, bit for bit."""
    tied = [{"x": torch.tensor([1.0, -1.0, 1.0, 0.5] * 9000)}, {"x": torch.linspace(-1, 1, 36001)[:36000]}]
    got = merge_deltas(tied, "ties", {"density": 0.2})
    assert bits_equal(got["x"], ref_ties([d["x"] for d in tied], [1.0, 1.0], [0.2, 0.2], "mean"))
    trimmed = baselines.trim_top_k(tied[0]["x"], 0.2)
    assert bits_equal(trimmed, ref_trim(tied[0]["x"], 0.2))
    assert int((trimmed != 0).sum()) == 7200 and not trimmed[9600:].any()  # the first 7200 of the 27000 ±1
    g = torch.Generator().manual_seed(8)
    distinct = (torch.randperm(BLOCK * 3, generator=g).float() + 1) * torch.sign(torch.randn(BLOCK * 3, generator=g))
    for k in (0.01, 0.2, 0.5):
        assert bits_equal(baselines.trim_top_k(distinct, k), ref_trim_topk(distinct, k))
        assert bits_equal(baselines.trim_top_k(distinct, k), ref_trim(distinct, k))


def test_consensus_kernel_equals_tall_votes():
    deltas = random_deltas(5, seed=5)
    weights, lambdas = [0.3, 0.3, 1.0, 0.5, 0.3], [0.4, 0.2, 0.4, 1.0, 0.4]
    inputs = [{"weight": w, "tall_lambda": lam} for w, lam in zip(weights, lambdas)]
    got = merge_deltas(deltas, "consensus", {"k": 2}, inputs=inputs)
    assert_bits(got, per_key(deltas, lambda key, ts: ref_consensus(ts, weights, lambdas, 2)))


def test_della_masks_are_the_torch_generator_stream():
    ts = [d["a.weight"] for d in random_deltas(3, seed=6)]
    got = della_key("a.weight", ts, [1.0, 0.5, 1.0], [0.3, 0.3, 0.5], 0.1, 2, "row")
    gen = torch.Generator().manual_seed(_key_seed(2, "a.weight"))
    pruned = [magprune(t if w == 1.0 else w * t, d, 0.1, gen) for t, w, d in zip(ts, [1.0, 0.5, 1.0], [0.3, 0.3, 0.5])]
    assert bits_equal(got, _elect_disjoint(torch.stack(pruned)))


def _run(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_merge_command_starts_without_transformers_and_peft_registers_on_import():
    """``hf-cft merge`` loads neither transformers nor PEFT (most of its start-up before); hf_cft's PEFT types are
    registered as soon as PEFT is imported, whichever import brings it in."""
    out = _run(
        "import sys, hf_cft.cli, hf_cft.hub, hf_cft.merging.streaming\n"
        "from hf_cft.merging.registry import methods\nmethods()\n"
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n"
        "import peft\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
        "print(sorted(k for k in M if str(k).startswith('HF_CFT')))\n"
        "from peft import PeftModel\nprint(getattr(PeftModel.create_or_update_model_card, '_hf_cft', False))\n"
    )
    assert out.split("\n")[:3] == ["[]", "['HF_CFT_COOP', 'HF_CFT_HEAD', 'HF_CFT_VPT']", "True"]
    out = _run(  # hf_cft.peft's own import pulls PEFT in: registered once it is complete
        "from hf_cft.peft import CoOpConfig\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
        "print(M['HF_CFT_COOP'] is CoOpConfig)\n"
    )
    assert out.strip() == "True"


@pytest.mark.parametrize("method", ["task_arithmetic", "dare", "consensus", "wise", "model_stock"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_methods_that_skip_input_checks_still_name_a_nonfinite_input(method, bad):
    """Methods flagged ``nonfinite_propagates`` check their inputs only when the merged delta is not finite: a NaN/inf
    in an input (even one dropped by a mask or weighted 0) still raises NonFiniteError naming the input and key."""
    from hf_cft.errors import NonFiniteError
    from hf_cft.merging.registry import get_method

    assert get_method(method).nonfinite_propagates
    n = 1 if method == "wise" else 3
    deltas = random_deltas(n, seed=7)
    deltas[n - 1]["a.weight"][1, 5] = bad
    inputs = [{"weight": 0.0 if method != "consensus" else 1.0} for _ in range(n)]
    if method == "model_stock":  # no weights: a NaN/inf makes the mean non-finite, whatever the ratio
        inputs = None
    for params in ({}, {"then": "ties"} if method == "dare" else {}):
        with pytest.raises(NonFiniteError, match=rf"input {n - 1} .*'a\.weight'"):
            merge_deltas(deltas, method, params, inputs=inputs)
