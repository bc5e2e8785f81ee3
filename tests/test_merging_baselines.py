"""Merging baselines (pam.md §9): hand-computed examples per method, agreement with ``peft.utils.merge_utils`` on
stacked dense deltas, the continual forms, and bad-input errors."""

import math

import pytest
import torch
from peft.utils import merge_utils

from hf_cft.errors import DeltaError, NonFiniteError, TaskError
from hf_cft.merging import fused
from hf_cft.merging.baselines import (
    ContinualTaskArithmetic,
    ContinualTIES,
    MagMaxMerger,
    OPCMMerger,
    RunningMean,
    _elect_disjoint,
    _key_seed,
    consensus,
    dare,
    emr,
    emr_task_delta,
    magmax,
    magnitude_prune,
    running_mean,
    tall_masks,
    task_arithmetic,
    ties,
    trim_top_k,
    wise_ft,
)


def T(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, **kw):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k] if torch.is_tensor(b[k]) else T(b[k]), **kw)


D1 = {"w": T([[1.0, -2.0], [3.0, 0.5]]), "b": T([0.2, -0.4])}
D2 = {"w": T([[-1.0, 4.0], [1.0, -0.5]]), "b": T([0.1, 0.3])}


# ------------------------------------------------------------------------------------------------ hand examples


def test_task_arithmetic_running_mean_and_wise_ft_by_hand():
    close(task_arithmetic([D1, D2], lam=0.5), {"w": [[0.0, 1.0], [2.0, 0.0]], "b": [0.15, -0.05]})
    close(task_arithmetic([D1, D2], lam=[1.0, -1.0]), {"w": [[2.0, -6.0], [2.0, 1.0]], "b": [0.1, -0.7]})
    close(task_arithmetic([D1, D2]), {"w": [[0.0, 0.6], [1.2, 0.0]], "b": [0.09, -0.03]})  # λ = 0.3 default
    close(running_mean([D1, D2]), {"w": [[0.0, 1.0], [2.0, 0.0]], "b": [0.15, -0.05]})
    close(
        running_mean([D1, D2, {"w": torch.zeros(2, 2), "b": T([0.6, 0.0])}]),
        {"w": [[0.0, 2 / 3], [4 / 3, 0.0]], "b": [0.3, -0.1 / 3]},
    )
    close(wise_ft(D1), {"w": [[0.5, -1.0], [1.5, 0.25]], "b": [0.1, -0.2]})
    close(wise_ft(D1, alpha=0.2), {"w": [[0.2, -0.4], [0.6, 0.1]], "b": [0.04, -0.08]})


def test_outputs_are_fp32_on_half_inputs():
    half = [{k: v.half() for k, v in D1.items()}, {k: v.bfloat16() for k, v in D2.items()}]
    for out in (task_arithmetic(half), ties(half), magmax(half), running_mean(half)):
        assert all(v.dtype == torch.float32 for v in out.values())


TIES_TASKS = [
    {"x": T([3.0, -1.0, 0.5, -4.0, 0.2])},
    {"x": T([-2.0, 5.0, 0.1, -1.0, 0.3])},
    {"x": T([1.0, -0.5, 2.0, 3.0, -0.1])},
]


def test_trim_top_k_by_hand():
    torch.testing.assert_close(trim_top_k(TIES_TASKS[0]["x"], 0.4), T([3.0, 0.0, 0.0, -4.0, 0.0]))
    torch.testing.assert_close(trim_top_k(T([[1.0, -5.0], [2.0, 0.1]]), 0.5), T([[0.0, -5.0], [2.0, 0.0]]))
    torch.testing.assert_close(trim_top_k(T([0.3, -0.2]), 0.2), T([0.3, 0.0]))  # keeps at least one entry
    torch.testing.assert_close(trim_top_k(T([0.3, -0.2]), 1.0), T([0.3, -0.2]))


def test_ties_by_hand():
    # trimmed (k=0.4, 2 of 5): [3,0,0,-4,0], [-2,5,0,0,0], [0,0,2,3,0]; sum [1,5,2,-1,0] → σ [+,+,+,-,0]
    # disjoint mean over agreeing non-zero entries: [3, 5, 2, -4, 0]
    close(ties(TIES_TASKS, k=0.4), {"x": [3.0, 5.0, 2.0, -4.0, 0.0]})
    close(ties(TIES_TASKS, k=0.4, lam=0.5), {"x": [1.5, 2.5, 1.0, -2.0, 0.0]})
    # no trimming: sum [2, 3.5, 2.6, -2, 0.4] → σ [+,+,+,-,+]; means [(3+1)/2, 5, (0.5+0.1+2)/3, (-4-1)/2, 0.25]
    close(ties(TIES_TASKS, k=1.0), {"x": [2.0, 5.0, 2.6 / 3, -2.5, 0.25]})
    # two equal-and-opposite entries: σ = 0, nothing agrees → 0 (no NaN)
    close(ties([{"x": T([1.0, 2.0])}, {"x": T([-1.0, 2.0])}], k=1.0), {"x": [0.0, 2.0]})


def test_magnitude_prune_by_hand():
    close(magnitude_prune(TIES_TASKS, k=0.4, lam=1.0), {"x": [1.0, 5.0, 2.0, -1.0, 0.0]})


def test_dare_masks_rescale_and_seed():
    big = [{"x": torch.randn(2000, generator=torch.Generator().manual_seed(i)) + 3.0} for i in range(2)]
    out = dare(big, rho=0.5, seed=7, then="ta", lam=1.0)
    # every entry is one of 0, 2τ1, 2τ2, 2(τ1+τ2) — and about a quarter of each
    x1, x2, got = big[0]["x"], big[1]["x"], out["x"]
    options = torch.stack([torch.zeros_like(x1), 2 * x1, 2 * x2, 2 * (x1 + x2)])
    hit = (options - got).abs() < 1e-5
    assert bool(hit.any(0).all())
    shares = hit.float().mean(1)
    assert all(0.2 < float(s) < 0.3 for s in shares)
    # deterministic in the seed, different for another seed
    close(dare(big, rho=0.5, seed=7, then="ta", lam=1.0), out)
    assert not torch.equal(dare(big, rho=0.5, seed=8, then="ta", lam=1.0)["x"], got)
    # rho = 0 keeps everything: DARE-TA is TA, DARE-TIES is TIES without trimming
    close(dare([D1, D2], rho=0.0, then="ta"), task_arithmetic([D1, D2], lam=0.3))
    close(dare(TIES_TASKS, rho=0.0, then="ties"), ties(TIES_TASKS, k=1.0))


def test_dare_mask_of_a_key_does_not_depend_on_other_keys():
    a = [{"x": torch.ones(50), "y": torch.ones(7)}, {"x": torch.ones(50), "y": torch.ones(7)}]
    b = [{"x": torch.ones(50)}, {"x": torch.ones(50)}]
    torch.testing.assert_close(dare(a, rho=0.5, seed=1)["x"], dare(b, rho=0.5, seed=1)["x"])


def test_magmax_by_hand():
    tasks = [{"x": T([1.0, -3.0, 2.0])}, {"x": T([-2.0, 1.0, -2.0])}, {"x": T([0.5, 2.5, -1.0])}]
    # per entry the largest |.|: -2 (task 2), -3 (task 1), tie 2 vs -2 → the later task (official): -2
    close(magmax(tasks, lam=1.0), {"x": [-2.0, -3.0, -2.0]})
    close(magmax(tasks), {"x": [-1.0, -1.5, -1.0]})
    close(magmax(tasks, lam=1.0, tie_break="earlier"), {"x": [-2.0, -3.0, 2.0]})


EMR_TASKS = [
    {"a": T([2.0, -1.0]), "b": T([0.5])},
    {"a": T([1.0, 3.0]), "b": T([-1.0])},
    {"a": T([-1.0, 1.0]), "b": T([0.2])},
]


def test_emr_by_hand():
    res = emr(EMR_TASKS)
    # σ = sign([2, 3 | -0.3]) = [+, + | -]; ε = [2, 3 | 1]; τ_uni = [2, 3 | -1]
    close(res.unified, {"a": [2.0, 3.0], "b": [-1.0]})
    assert [res.masks[t]["a"].tolist() + res.masks[t]["b"].tolist() for t in range(3)] == [
        [True, False, False],
        [True, True, True],
        [False, True, False],
    ]
    # default (official EMR / FusionBench): λ_t = Σ_p mean|τ_t,p| / Σ_p mean|M_t,p ⊙ τ_uni,p|
    assert res.rescalers == pytest.approx([(1.5 + 0.5) / 1.0, (2.0 + 1.0) / (2.5 + 1.0), (1.0 + 0.2) / 1.5])
    close(res.task_delta(1), {"a": [2 * 6 / 7, 3 * 6 / 7], "b": [-6 / 7]})
    # the EMR paper's formula: λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| over all keys
    res = emr(EMR_TASKS, rescaler="global_sum")
    assert res.rescalers == pytest.approx([3.5 / 2, 5 / 6, 2.2 / 3])
    close(res.task_delta(0), {"a": [3.5, 0.0], "b": [0.0]})
    close(emr_task_delta(res, 1), {"a": [5 / 3, 2.5], "b": [-5 / 6]})
    close(res.task_delta(2), {"a": [0.0, 2.2], "b": [0.0]})
    with pytest.raises(TaskError, match="task index 3"):
        res.task_delta(3)


def test_emr_task_with_no_agreeing_entry_gets_zero_not_nan():
    res = emr([{"x": T([2.0, -1.0])}, {"x": T([-3.0, 3.0])}])  # σ = [-, +]: task 0 disagrees everywhere
    assert res.rescalers[0] == 0.0
    close(res.task_delta(0), {"x": [0.0, 0.0]})
    close(res.task_delta(1), {"x": [-3.0, 3.0]})


TALL_TASKS = [{"x": T([1.0, 0.1, 2.0])}, {"x": T([0.5, 1.0, 3.0])}]


def test_tall_masks_and_consensus_by_hand():
    res = tall_masks(TALL_TASKS, lambdas=0.4)
    close(res.mtl, {"x": [1.5, 1.1, 5.0]})
    # m_1 = |τ1| > 0.4|τ2| = [1>.2, .1>.4, 2>1.2]; m_2 = |τ2| > 0.4|τ1| = [.5>.4, 1>.04, 3>.8]
    assert res.masks[0]["x"].tolist() == [True, False, True]
    assert res.masks[1]["x"].tolist() == [True, True, True]
    close(res.task_delta(0), {"x": [1.5, 0.0, 5.0]})
    close(consensus(TALL_TASKS, lambdas=0.4, k=2, lam=1.0), {"x": [1.5, 0.0, 5.0]})
    close(consensus(TALL_TASKS, lambdas=0.4, k=1, lam=0.3), {"x": [0.45, 0.33, 1.5]})
    # per-task λ: λ_2 = 0.6 drops entry 0 from m_2 (0.5 > 0.6 is false)
    assert tall_masks(TALL_TASKS, lambdas=[0.4, 0.6]).masks[1]["x"].tolist() == [False, True, True]
    close(consensus(TALL_TASKS, lambdas=[0.4, 0.6], k=2, lam=1.0), {"x": [0.0, 0.0, 5.0]})
    with pytest.raises(TaskError, match="k=3"):
        consensus(TALL_TASKS, k=3)
    with pytest.raises(TaskError, match="lambdas has 3 values"):
        tall_masks(TALL_TASKS, lambdas=[0.2, 0.3, 0.4])


# ------------------------------------------------------------------------------------------------ OPCM


def test_opcm_two_tasks_by_hand():
    m = OPCMMerger(alpha=0.5)
    t1 = {"fc.weight": T([[3.0, 0.0], [0.0, 1.0]]), "fc.bias": T([1.0, 0.0])}
    t2 = {"fc.weight": T([[1.0, 2.0], [3.0, 4.0]]), "fc.bias": T([0.0, 1.0])}
    close(m.add(t1), t1)  # first task: S_1 = τ_1, scale ‖τ_1‖/‖S_1‖ = 1
    # S_1 = diag(3, 1): shares .75, 1 → r_α = 0; U = V = I → only P's diagonal is zeroed: τ'_2 = [[0,2],[3,0]]
    # S_2 = [[3,2],[3,1]], bias [1,1]: ‖S_2‖ = 5; mean norm (√11 + √31)/2
    scale = (math.sqrt(11) + math.sqrt(31)) / 2 / 5
    close(m.add(t2), {"fc.weight": [[3 * scale, 2 * scale], [3 * scale, scale]], "fc.bias": [scale, scale]})


def test_opcm_zeroes_the_leading_block_and_keeps_the_complement_of_rectangular_weights():
    m = OPCMMerger(alpha=0.5)
    assert OPCMMerger.split_rank(T([3.0, 2.0, 1.75, 1.5, 1.25, 0.5]), 0.5) == 2  # shares .3, .5, .675, ...
    prev = torch.diag(T([3.0, 2.0, 1.75, 1.5, 1.25, 0.5]))
    new = torch.arange(36, dtype=torch.float32).view(6, 6) + 1
    want = new.clone()
    want.diagonal().zero_()
    want[:2, :2] = 0
    torch.testing.assert_close(m.project(prev, new), want, atol=1e-4, rtol=1e-5)
    # 3x2: the full SVD keeps the row outside the previous delta's column space
    got = m.project(T([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), T([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    torch.testing.assert_close(got, T([[0.0, 2.0], [3.0, 0.0], [5.0, 6.0]]), atol=1e-5, rtol=1e-5)


def test_opcm_projects_only_linear_weights():
    m = OPCMMerger()
    e1 = {"emb.position_embedding.weight": torch.eye(2), "fc.weight": torch.eye(2) * T([2.0, 1.0])}
    e2 = {"emb.position_embedding.weight": torch.ones(2, 2), "fc.weight": torch.ones(2, 2)}
    m.add(e1)
    m.add(e2)
    torch.testing.assert_close(m.total["emb.position_embedding.weight"], T([[2.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(m.total["fc.weight"], T([[2.0, 1.0], [1.0, 1.0]]), atol=1e-6, rtol=1e-6)
    keyed = OPCMMerger(linear_keys=["emb.position_embedding.weight"])
    keyed.add(e1)
    keyed.add(e2)
    torch.testing.assert_close(keyed.total["fc.weight"], T([[3.0, 1.0], [1.0, 2.0]]))


# ------------------------------------------------------------------------------------------------ peft agreement


def _random_tasks(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.fc1.weight": (8, 6), "enc.fc1.bias": (10,), "enc.conv.weight": (4, 3, 2)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


def test_agrees_with_peft_task_arithmetic_ties_and_magnitude_prune():
    tasks = _random_tasks()
    w = torch.tensor([0.7, 0.7, 0.7])
    ta, ti, mp = task_arithmetic(tasks, lam=0.7), ties(tasks, k=0.3, lam=0.7), magnitude_prune(tasks, 0.3, 0.7)
    for key in tasks[0]:
        stack = [d[key] for d in tasks]
        torch.testing.assert_close(ta[key], merge_utils.task_arithmetic(stack, w))
        torch.testing.assert_close(ti[key], merge_utils.ties(stack, w, density=0.3))
        torch.testing.assert_close(mp[key], merge_utils.magnitude_prune(stack, w, density=0.3))
    # per-task weights map to peft's weights for task arithmetic and magnitude pruning
    lam = [0.5, -1.0, 2.0]
    for key, value in task_arithmetic(tasks, lam=lam).items():
        torch.testing.assert_close(value, merge_utils.task_arithmetic([d[key] for d in tasks], torch.tensor(lam)))


def test_agrees_with_peft_dare_linear_and_dare_ties():
    """peft draws DARE masks from the global RNG with density = 1 − ρ; seeding it with our per-key seed before each
    key's call reproduces our masks exactly."""
    tasks = _random_tasks(seed=1)
    rho, seed = 0.6, 3
    for then, fn, lam in (("ta", merge_utils.dare_linear, 0.3), ("ties", merge_utils.dare_ties, 1.0)):
        ours = dare(tasks, rho=rho, seed=seed, then=then)
        for key in tasks[0]:
            torch.manual_seed(_key_seed(seed, key))
            theirs = fn([d[key] for d in tasks], torch.tensor([lam] * 3), density=1 - rho)
            torch.testing.assert_close(ours[key], theirs)


# ------------------------------------------------------------------------------------------------ continual forms


def test_continual_forms_match_their_one_shot_counterparts():
    tasks = _random_tasks(n=3, seed=2)
    ta, rm, mm = ContinualTaskArithmetic(lam=0.5), RunningMean(), MagMaxMerger(lam=0.5)
    for t, delta in enumerate(tasks, start=1):
        close(ta.add(delta), task_arithmetic(tasks[:t], lam=0.5))
        close(rm.add(delta), running_mean(tasks[:t]))
        close(mm.add(delta), magmax(tasks[:t], lam=0.5))
    assert ta.num_tasks == rm.num_tasks == mm.num_tasks == 3


def test_continual_ties_is_ties_on_the_pair():
    c = ContinualTIES(k=0.4, lam=1.0)
    close(c.add(TIES_TASKS[0]), {"x": [3.0, 0.0, 0.0, -4.0, 0.0]})  # first task: trimmed too (issue 17 bug 2)
    m2 = c.add(TIES_TASKS[1])
    # trimmed [3,0,0,-4,0] and [-2,5,0,0,0]: sum [1,5,0,-4,0] → [3, 5, 0, -4, 0]
    close(m2, {"x": [3.0, 5.0, 0.0, -4.0, 0.0]})
    # trimmed m2 → [0,5,0,-4,0]; τ3 → [0,0,2,3,0]: sum [0,5,2,-1,0] → [0, 5, 2, -4, 0]
    close(c.add(TIES_TASKS[2]), {"x": [0.0, 5.0, 2.0, -4.0, 0.0]})


@pytest.mark.parametrize("make", [ContinualTaskArithmetic, RunningMean, ContinualTIES, MagMaxMerger, OPCMMerger])
def test_continual_state_dict_round_trip_resumes_the_stream(make):
    tasks = _random_tasks(n=3, seed=3)
    full = make()
    for d in tasks:
        want = full.add(d)
    half = make()
    half.add(tasks[0])
    half.add(tasks[1])
    resumed = make()
    resumed.load_state_dict(half.state_dict())
    assert resumed.num_tasks == 2
    close(resumed.merged, half.merged)
    close(resumed.add(tasks[2]), want)


def test_continual_rejects_bad_deltas_and_keeps_its_state():
    c = ContinualTaskArithmetic(lam=1.0)
    with pytest.raises(TaskError, match="no task yet"):
        _ = c.merged
    c.add(D1)
    with pytest.raises(DeltaError, match="'b'"):
        c.add({"w": D2["w"]})
    with pytest.raises(DeltaError, match="'w'.*shape"):
        c.add({"w": torch.zeros(3, 2), "b": D2["b"]})
    with pytest.raises(NonFiniteError, match=r"task 1 .*'b'"):
        c.add({"w": D2["w"], "b": T([float("nan"), 0.0])})
    close(c.merged, D1)
    assert c.num_tasks == 1


# ------------------------------------------------------------------------------------------------ bad input

ONE_SHOT = [
    lambda ds: task_arithmetic(ds),
    lambda ds: running_mean(ds),
    lambda ds: ties(ds),
    lambda ds: dare(ds),
    lambda ds: magmax(ds),
    lambda ds: emr(ds),
    lambda ds: tall_masks(ds),
    lambda ds: consensus(ds, k=1),
    lambda ds: magnitude_prune(ds),
]


@pytest.mark.parametrize("fn", ONE_SHOT)
def test_one_shot_methods_reject_bad_input(fn):
    with pytest.raises(TaskError, match="empty"):
        fn([])
    with pytest.raises(DeltaError, match="task 1 lacks key 'b'"):
        fn([D1, {"w": D2["w"]}])
    with pytest.raises(DeltaError, match="task 1 has key 'extra'"):
        fn([D1, {**D2, "extra": torch.zeros(1)}])
    with pytest.raises(DeltaError, match=r"'w' has shape \(2, 3\) in task 1"):
        fn([D1, {"w": torch.zeros(2, 3), "b": D2["b"]}])
    with pytest.raises(NonFiniteError, match="task 1 .*'w'"):
        fn([D1, {"w": T([[1.0, float("inf")], [0.0, 0.0]]), "b": D2["b"]}])


def test_wise_ft_and_parameter_validation():
    with pytest.raises(NonFiniteError, match="'b'"):
        wise_ft({"b": T([float("nan")])})
    with pytest.raises(TaskError, match="one dict"):
        task_arithmetic(D1)
    with pytest.raises(ValueError, match="k must lie in"):
        ties([D1, D2], k=0.0)
    with pytest.raises(ValueError, match="rho"):
        dare([D1, D2], rho=1.0)
    with pytest.raises(ValueError, match="then"):
        dare([D1, D2], then="mean")
    with pytest.raises(TaskError, match="lam has 1 values but there are 2"):
        task_arithmetic([D1, D2], lam=[0.3])
    with pytest.raises(ValueError, match="alpha"):
        OPCMMerger(alpha=1.5)


def test_scalar_and_integer_keys_are_merged_too():
    a = {"logit_scale": T(2.0), "w": T([1.0, -1.0]), "count": torch.tensor([2, 4])}
    b = {"logit_scale": T(-1.0), "w": T([3.0, 1.0]), "count": torch.tensor([0, 2])}
    assert float(task_arithmetic([a, b], lam=1.0)["logit_scale"]) == 1.0
    assert float(ties([a, b], k=0.2)["logit_scale"]) == 2.0  # one entry: kept; σ = +; only task 0 agrees
    assert float(magmax([a, b], lam=1.0)["logit_scale"]) == 2.0
    torch.testing.assert_close(running_mean([a, b])["count"], T([1.0, 3.0]))
    assert float(emr([a, b]).task_delta(1)["logit_scale"]) == 0.0
    with pytest.raises(DeltaError, match="'w' of task 0 is a list"):
        ties([{"w": [1.0]}, b])


def _dare_by_hand(deltas, rhos, weights, seed, key, then):
    """DARE from its definition: per input in order, m ~ Bernoulli(1 − ρ) drawn from one CPU ``torch.Generator``
    seeded with ``(seed·1000003 + crc32(key)) mod (2⁶³ − 1)`` (an input with ρ = 0 is kept whole and draws nothing),
    τ̃ = w·(m ⊙ τ / (1 − ρ)); then Σ_t τ̃_t (``"ta"``) or, per entry, the mean of the non-zero τ̃_t whose sign is
    sign(Σ_t τ̃_t) (0 where that sum is 0; ``"ties"``)."""
    import zlib

    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1))
    dropped = []
    for x, rho, w in zip(deltas, rhos, weights):
        if rho == 0.0:
            dropped.append(w * x)
            continue
        m = torch.bernoulli(torch.full(x.shape, 1.0 - rho), generator=g).to(x.dtype)
        dropped.append(w * (x * m / (1.0 - rho)))
    if then == "ta":
        return sum(dropped[1:], dropped[0].clone())
    out = torch.zeros_like(dropped[0]).reshape(-1)
    for j, column in enumerate(zip(*[t.reshape(-1).tolist() for t in dropped])):
        sigma = math.copysign(1.0, sum(column)) if sum(column) != 0 else 0.0
        kept = [v for v in column if v != 0 and math.copysign(1.0, v) == sigma]
        out[j] = sum(kept) / len(kept) if kept and sigma != 0 else 0.0
    return out.view(dropped[0].shape)


def test_dare_whole_tensor_path_is_dare_by_its_definition_and_draws_the_blocked_paths_masks():
    """``_dare_whole`` (the whole-tensor DARE kernel: a GPU, or on the CPU any non-fp32 input, e.g. fp64/bf16):
    each input τ_t with drop rate ρ_t = 1 − density_t becomes w_t·m_t ⊙ τ_t/(1 − ρ_t), m_t ~ Bernoulli(1 − ρ_t)
    drawn from the key's generator seeded from (seed, key), inputs in order (``_dare_by_hand``, bit for bit in
    fp64); ρ = 0 keeps an input whole and draws no mask; then Σ (``then="ta"``) or TIES' election (``"ties"``); the
    result keeps the inputs' dtype and no input is modified (not with every ρ = 0 and w = 1 either, where it is the
    plain sum in a new tensor); another seed or key draws other masks. ``_dare_tensor`` sends fp64 and bf16 there,
    and on dyadic inputs it equals the blocked fp32 kernel exactly: the same masks for the same seed and key."""
    from hf_cft.merging.baselines import _dare_tensor, _dare_whole
    from hf_cft.merging.registry import TensorContext, get_method

    def ctx(key, seed, then, densities, weights):
        inputs = [{"density": d, "weight": w} for d, w in zip(densities, weights)]
        opts, per = get_method("dare").resolve({"seed": seed, "then": then}, inputs)
        return TensorContext(key, opts, per, [True] * len(per), lambda: None)

    g = torch.Generator().manual_seed(11)
    deltas = [torch.randn(9, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    originals = [d.clone() for d in deltas]
    densities, weights = [0.3, 1.0, 0.125], [0.7, -2.0, 1.0]
    rhos = [1.0 - d for d in densities]
    for then in ("ta", "ties"):
        for key, seed in (("a.weight", 5), ("b.bias", 5), ("a.weight", 6)):
            got = _dare_whole(deltas, ctx(key, seed, then, densities, weights), rhos)
            assert got.dtype == torch.float64 and got.shape == (9, 7)
            want = _dare_by_hand(deltas, rhos, weights, seed, key, then)
            if then == "ta":
                assert torch.equal(got, want), (then, key, seed)
            else:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=0, msg=f"{then} {key} {seed}")
            assert all(torch.equal(d, o) for d, o in zip(deltas, originals))
            via_dispatch = _dare_tensor(deltas, ctx(key, seed, then, densities, weights))
            assert torch.equal(via_dispatch, got)
        other_key = _dare_whole(deltas, ctx("b.bias", 5, then, densities, weights), rhos)
        other_seed = _dare_whole(deltas, ctx("a.weight", 6, then, densities, weights), rhos)
        first = _dare_whole(deltas, ctx("a.weight", 5, then, densities, weights), rhos)
        assert not torch.equal(other_key, first) and not torch.equal(other_seed, first)
    kept = _dare_whole(deltas[:2], ctx("k", 5, "ta", [1.0, 1.0], [1.0, 1.0]), [0.0, 0.0])
    assert torch.equal(kept, deltas[0] + deltas[1]) and kept is not deltas[0]
    assert all(torch.equal(d, o) for d, o in zip(deltas, originals))
    single = _dare_whole(deltas[:1], ctx("k", 5, "ta", [1.0], [1.0]), [0.0])
    assert torch.equal(single, deltas[0]) and single is not deltas[0]
    survivors = _dare_whole(deltas[:1], ctx("k", 5, "ta", [0.125], [1.0]), [0.875])
    nonzero = survivors != 0
    assert 0 < int(nonzero.sum()) < 63 and torch.equal(survivors[nonzero], deltas[0][nonzero] * 8)

    dyadic = [torch.randint(-6, 7, (9, 7), generator=g).float() / 4 for _ in range(3)]
    densities, weights = [0.5, 1.0, 0.25], [2.0, 0.5, 1.0]
    for then in ("ta", "ties"):
        blocked = _dare_tensor(dyadic, ctx("a.weight", 5, then, densities, weights))
        assert blocked.dtype == torch.float32
        for dtype in (torch.float64, torch.bfloat16):
            whole = _dare_tensor([d.to(dtype) for d in dyadic], ctx("a.weight", 5, then, densities, weights))
            assert whole.dtype == dtype, (then, dtype)
            if dtype == torch.float64:  # exact; bf16 rounds TIES' means (÷3), but not which entries survive
                assert torch.equal(whole.float(), blocked), then
            else:
                torch.testing.assert_close(whole.float(), blocked, rtol=1e-2, atol=0, msg=then)
        assert blocked.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ exact refusals


R1 = {"a": T([1.0, -2.0, 3.0]), "b": T([0.5, 0.0])}

REFUSALS = [
    (lambda: wise_ft(R1, alpha="x"), r"^alpha must be a number, got 'x' \(str\).$"),
    (lambda: dare([R1, R1], rho=1.0), r"^rho \(the drop rate\) must lie in \[0, 1\), got 1.0.$"),
    (lambda: dare([R1, R1], rho=-0.1), r"^rho \(the drop rate\) must lie in \[0, 1\), got -0.1.$"),
    (lambda: dare([R1, R1], then="x"), r"^then must be one of \('ta', 'ties'\), got 'x'.$"),
    (lambda: consensus([R1, R1], k=-1), r"^k must be at least 0, got -1.$"),
    (lambda: consensus([R1, R1], k=1.5), r"^k must be an integer, got 1.5.$"),
    (lambda: magnitude_prune([R1], k=2), r"^k must lie in \(0, 1\], got 2.$"),
    (lambda: trim_top_k(R1["a"], k=0), r"^k must lie in \(0, 1\], got 0.$"),
    (lambda: emr([R1, R1], zero_sign="x"), r"^zero_sign must be one of \(-1, 0\), got 'x'.$"),
    (lambda: emr([R1, R1], zero_sign=True), r"^zero_sign must be one of \(-1, 0\), got True.$"),
    (lambda: ties([R1, R1], trim_scope="x"), r"^trim_scope must be one of \('tensor', 'model'\), got 'x'.$"),
    (lambda: ties([R1, R1], merge="x"), r"^merge must be one of \('mean', 'sum', 'max'\), got 'x'.$"),
    (lambda: magmax([R1, R1], tie_break="x"), r"^tie_break must be one of \('later', 'earlier'\), got 'x'.$"),
]


@pytest.mark.parametrize("case", range(len(REFUSALS)))
def test_option_refusals_name_the_option_its_range_and_the_value(case):
    from hf_cft.errors import MergeConfigError

    call, message = REFUSALS[case]
    with pytest.raises(MergeConfigError, match=message):
        call()


def test_option_bounds_are_inclusive_where_documented():
    """rho = 0 (nothing dropped) and k = 0 (every entry with any vote) are accepted; k = 1 keeps every entry."""
    close(dare([R1, R1], rho=0.0, lam=1.0), {k: 2 * v for k, v in R1.items()})
    assert set(consensus([R1, R1], k=0)) == set(R1)
    close(magnitude_prune([R1], k=1.0, lam=1.0), R1)


def test_lazy_deltas_are_checked_from_their_headers_with_exact_messages():
    """EMR over LazyDelta inputs: one delta instead of a list, an empty list, a key only in the first or only in a
    later delta, or another shape are refused naming the task and the key; nothing is read to find out."""
    from hf_cft.merging.deltas import LazyDelta

    reads = []

    def lazy(shapes):
        return LazyDelta(shapes, lambda key: reads.append(key) or torch.ones(shapes[key]))

    ab = {"a": (3,), "b": (2,)}
    cases = [
        (lazy(ab), TaskError, r"^deltas must be a list of deltas \(dicts\), got one dict; wrap it in a list.$"),
        ([], TaskError, r"^deltas is empty: at least one task delta is needed.$"),
        ([lazy(ab), lazy({"a": (3,)})], DeltaError, r"^delta of task 1 lacks key 'b' that the other deltas have.$"),
        ([lazy(ab), lazy({**ab, "c": (1,)})], DeltaError, r"^delta of task 1 has key 'c' that the other deltas lack.$"),
        ([lazy(ab), lazy({"a": (3,), "b": (4,)})], DeltaError,
         r"^key 'b' has shape \(4,\) in task 1 but \(2,\) in the other deltas.$"),
    ]  # fmt: skip
    for deltas, error, message in cases:
        with pytest.raises(error, match=message):
            emr(deltas)
    assert reads == []


def test_continual_state_refusals_and_a_restored_state_keeps_its_shapes():
    merger = ContinualTaskArithmetic(lam=1.0)
    merger.add(R1)
    state = merger.state_dict()
    assert state["meta.num_tasks"].dtype == torch.int64
    cases = [
        ({}, DeltaError, r"^ContinualTaskArithmetic state lacks 'meta.num_tasks'.$"),
        ({"meta.num_tasks": torch.tensor(2)}, DeltaError, r"^ContinualTaskArithmetic state lacks the 'total' tensors.$"),
        ({"meta.num_tasks": torch.tensor(1)}, DeltaError, r"^ContinualTaskArithmetic state lacks the 'total' tensors.$"),
        ({"meta.num_tasks": torch.tensor(1), "total.a": T([float("nan")])}, NonFiniteError,
         r"^ContinualTaskArithmetic state holds NaN or inf at total.a.$"),
    ]  # fmt: skip
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            ContinualTaskArithmetic().load_state_dict(bad)
    empty = ContinualTaskArithmetic()
    empty.load_state_dict({"meta.num_tasks": torch.tensor(0)})  # no task yet: no tensors needed
    assert empty.num_tasks == 0
    close(empty.add(R1), {k: 0.3 * v for k, v in R1.items()})  # and no shapes to hold the first task to
    restored = ContinualTaskArithmetic(lam=1.0)
    restored.load_state_dict(state)
    assert restored.num_tasks == 1
    with pytest.raises(DeltaError, match="'b'"):  # the restored shapes hold: a delta of another shape is refused
        restored.add({"a": T([1.0, 1.0, 1.0]), "b": T([1.0, 1.0, 1.0])})
    restored.add(R1)
    close(restored.merged, {k: 2 * v for k, v in R1.items()})


def test_tall_task_delta_accepts_negative_indices_and_refuses_out_of_range():
    res = tall_masks([R1, {k: -v for k, v in R1.items()}], lambdas=0.4)
    for i in (-2, -1, 0, 1):
        assert set(res.task_delta(i)) == set(R1)
    close(res.task_delta(-2), res.task_delta(0))
    for i in (-3, 2):
        with pytest.raises(
            TaskError, match=rf"^task index {i} is out of range: TALL masks were built for 2 task\(s\).$"
        ):
            res.task_delta(i)


def test_key_predicate_forms_and_opcm_split_rank_edges():
    from hf_cft.merging.baselines import key_predicate

    def mine(key, tensor):
        return key == "x"

    assert key_predicate(mine) is mine
    chosen = key_predicate(["a", "b"])
    assert chosen("a", torch.zeros(2, 3)) and chosen("b", torch.zeros(1, 1))
    assert (
        not chosen("a", torch.zeros(3))
        and not chosen("a", torch.zeros(1, 2, 3))
        and not chosen("c", torch.zeros(2, 2))
    )
    split = OPCMMerger.split_rank
    assert split(T([0.3, 0.2]), 0.7) == 1  # shares 0.6, 1.0 (a sum below 1 is still a sum)
    assert split(T([0.3, 0.2]), 0.7, "fusion_bench") == 1
    assert split(T([0.0, 0.0]), 0.5) == 0 and split(T([0.0, 0.0]), 0.5, "fusion_bench") == 0


def test_opcm_options_state_and_a_small_or_zero_norm():
    from hf_cft.errors import MergeConfigError

    assert OPCMMerger(alpha=0.0).alpha == 0.0 and OPCMMerger(alpha=1.0).alpha == 1.0  # a closed interval
    with pytest.raises(MergeConfigError, match=r"^alpha must lie in \[0, 1\], got 1.5.$"):
        OPCMMerger(alpha=1.5)
    with pytest.raises(MergeConfigError, match=r"^rank_rule must be one of \('at_most', 'fusion_bench'\), got 'x'.$"):
        OPCMMerger(rank_rule="x")
    small = {"w": T([[0.1, 0.0], [0.0, 0.2]]), "b": T([0.05, 0.0])}  # ‖τ‖ < 1: rescaled all the same
    m = OPCMMerger()
    m.add(small)
    close(m.merged, small)
    zero = OPCMMerger()
    zero.add({k: torch.zeros_like(v) for k, v in small.items()})
    close(zero.merged, {k: torch.zeros_like(v) for k, v in small.items()})
    state = m.state_dict()
    assert state["meta.norms"].dtype == torch.float64
    restored = OPCMMerger()
    restored.load_state_dict(state)
    assert restored.norms == m.norms
    with pytest.raises(DeltaError, match=r"^OPCMMerger state lacks 'meta.norms'.$"):
        OPCMMerger().load_state_dict({k: v for k, v in state.items() if k != "meta.norms"})
    with pytest.raises(DeltaError, match=r"^OPCMMerger state has 1 task norms for 2 task\(s\).$"):
        OPCMMerger().load_state_dict({**state, "meta.num_tasks": torch.tensor(2)})


def test_continual_ties_state_marks_its_unscaled_form_and_refuses_an_old_state():
    m = ContinualTIES()
    m.add(R1)
    state = m.state_dict()
    assert state["meta.unscaled"].dtype == torch.int64 and int(state["meta.unscaled"]) == 1
    old = {k: v for k, v in state.items() if k != "meta.unscaled"}
    with pytest.raises(
        DeltaError,
        match=r"^ContinualTIES state lacks 'meta.unscaled': it was written before the λ fix \(its merged delta "
        r"holds λ compounded over the tasks\); rebuild it by adding the task deltas again.$",
    ):
        ContinualTIES().load_state_dict(old)
    empty = ContinualTIES()
    empty.load_state_dict({"meta.num_tasks": torch.tensor(0)})  # no task yet: nothing to have been rescaled
    assert empty.num_tasks == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("fused_kernel", [True, False])
def test_trim_threshold_by_its_definition_on_every_path(dtype, fused_kernel, monkeypatch):
    """_trim_threshold(flat, keep) = (the keep-th largest magnitude, the positions of the entries equal to it beyond
    the first keep − #{|τ| > kth} in flat order), with ties, on every implementation: the fused kernel, numpy's
    selection (fp32/fp64 without the kernel) and torch.kthvalue (half precision)."""
    from hf_cft.merging import baselines

    if not fused_kernel:
        monkeypatch.setattr(baselines.fused, "selects", lambda x: False)
    flat = T([0.5, -2.0, 1.0, -1.0, 3.0, 1.0, 0.0, -1.0, 0.25, 2.0]).to(dtype)
    mags = flat.abs().double()
    for keep in range(1, flat.numel()):
        kth_want = float(mags.sort(descending=True).values[keep - 1])
        greater = int((mags > kth_want).sum())
        tied = torch.nonzero(mags == kth_want).reshape(-1)[keep - greater :]
        kth, drops = baselines._trim_threshold(flat, keep)
        assert kth == kth_want, (keep, kth)
        if kth_want == 0.0 or tied.numel() == 0:
            assert drops is None or drops.numel() == 0, keep
        else:
            assert drops is not None and drops.tolist() == tied.tolist(), (keep, drops)
        kept = (flat.abs().double() >= kth).clone()
        if drops is not None:
            kept[drops] = False
        assert int(kept.sum()) == keep or kth == 0.0, keep


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trim_top_k_of_a_half_precision_tensor_keeps_what_fp32_keeps(dtype):
    """A bf16 / fp16 tensor is trimmed (it used to raise numpy's TypeError "unsupported ScalarType BFloat16"), keeping
    the same entries as its fp32 copy, in its own dtype."""
    x = torch.randn(200, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = trim_top_k(x, 0.2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), trim_top_k(x.float(), 0.2), rtol=0, atol=0)


@pytest.mark.parametrize("fused_draws", ["0", "1"])
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**32 - 1, 3_141_592_653])
def test_the_numpy_bernoulli_stream_is_torchs_cpu_stream_bit_for_bit(monkeypatch, seed, fused_draws):
    """_BernoulliStream(seed) draws what torch.bernoulli draws from a CPU generator seeded with ``seed`` (its low 32
    bits, as torch keeps them): masks over consecutive calls (within one block of MT19937's 624 words, across
    several, ending on a block's edge) and uniforms; _draw_mask gives the same mask from either source. Both the
    fused MT19937 (numba: its seeding too) and numpy's draw them."""
    from hf_cft.merging.baselines import _BernoulliStream, _draw_mask

    if fused_draws == "1" and not fused.available():
        pytest.skip("numba is not installed (optional: pip install 'hf-cft[fast]')")
    monkeypatch.setenv("HF_CFT_FUSED", fused_draws)
    stream, gen = _BernoulliStream(seed), torch.Generator().manual_seed(seed)
    for n, keep in ((7, 0.3), (1000, 0.9), (33, 0.5), (5000, 0.4), (200, 0.5), (1, 0.8)):  # 6240 = 10·624
        want = torch.bernoulli(torch.full((n,), keep), generator=gen).bool()
        assert torch.equal(stream.mask(n, keep), want)
    like = torch.zeros(4, 25)
    a = _draw_mask(torch.Generator().manual_seed(seed), like, 0.6)
    b = _draw_mask(_BernoulliStream(seed), like, 0.6)
    assert a.dtype == b.dtype == torch.bool and a.shape == like.shape and torch.equal(a, b)
    u = _BernoulliStream(seed).uniform(500)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    import numpy as np  # the raw MT19937 outputs of the same seed, low 24 bits, times 2⁻²⁴

    raw = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=500, dtype=np.uint64) & 0xFFFFFF
    assert torch.equal(u, torch.from_numpy((raw.astype(np.float64) * 2.0**-24).astype(np.float32)))
    for keep in (0.25, 0.7):  # u < keep is exactly the mask torch draws
        assert torch.equal(
            u < keep, torch.bernoulli(torch.full((500,), keep), generator=torch.Generator().manual_seed(seed)).bool()
        )


def test_per_key_seeds_are_a_fixed_formula():
    """DARE's per-key seed (seed·1000003 + crc32(key)) mod (2⁶³ − 1): masks stay reproducible across releases."""
    import zlib

    assert _key_seed(3, "w") == 3 * 1_000_003 + zlib.crc32(b"w")
    big = 2**62
    assert _key_seed(big, "layer.0.weight") == (big * 1_000_003 + zlib.crc32(b"layer.0.weight")) % (2**63 - 1)
    assert _key_seed(big, "w") < 2**63 - 1


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
def test_blocked_election_equals_the_whole_tensor_election_in_every_dtype(merge):
    """_elect_blocked (DELLA's and MagPrune's election) is TIES' sign election + disjoint merge of the stacked
    tensors: block by block for fp32 on the CPU, whole for fp64 / bf16 (what a GPU runs), the same values."""
    from hf_cft.merging.baselines import _elect_blocked

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randint(-4, 5, (6, 7), generator=g).float() / 4 for _ in range(3)]  # dyadic: exact in all dtypes
    want = _elect_disjoint(torch.stack(tensors), merge)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        got = _elect_blocked([t.to(dtype) for t in tensors], merge)
        assert got.shape == (6, 7) and got.dtype == dtype
        tol = 1e-2 if dtype == torch.bfloat16 else 0.0  # a mean's division rounds in bf16
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol, msg=f"{merge} {dtype}")
    assert not torch.equal(want, _elect_disjoint(torch.stack(tensors), "sum" if merge != "sum" else "max"))


OVERFLOWS = [
    (lambda d: task_arithmetic(d, lam=1e10), "lam=10000000000.0"),
    (lambda d: wise_ft(d[0], alpha=1e10), "alpha=10000000000.0"),
    (lambda d: ties(d, lam=1e10), "lam=10000000000.0"),
    (lambda d: dare(d, rho=0.5, lam=1e10), r"lam=10000000000.0 \(with the 1/\(1-rho\) rescale\)"),
    (lambda d: magmax(d, lam=1e10), "lam=10000000000.0"),
]


@pytest.mark.parametrize("case", range(len(OVERFLOWS)))
def test_a_scale_that_overflows_finite_inputs_is_blamed_by_name(case):
    from hf_cft.errors import MergeConfigError

    call, blame = OVERFLOWS[case]
    deltas = [{"a": T([1e30, -2.0])}, {"a": T([1e30, 1.0])}]
    with pytest.raises(
        MergeConfigError,
        match=rf"^{blame} scales the finite delta at key 'a' beyond the float range \(inf\); use a smaller value.$",
    ):
        call(deltas)


DEFAULTS = [  # the documented defaults (pam.md §9, the docstrings): a call without them equals one spelling them out
    (lambda ds: task_arithmetic(ds), lambda ds: task_arithmetic(ds, lam=0.3)),
    (lambda ds: ties(ds), lambda ds: ties(ds, k=0.2, lam=1.0, trim_scope="tensor", merge="mean")),
    (lambda ds: dare(ds), lambda ds: dare(ds, rho=0.9, seed=0, then="ta", lam=0.3)),
    (lambda ds: magmax(ds), lambda ds: magmax(ds, lam=0.5, tie_break="later")),
    (lambda ds: consensus(ds), lambda ds: consensus(ds, lambdas=0.4, k=2, lam=0.3)),
    (lambda ds: tall_masks(ds).task_delta(1), lambda ds: tall_masks(ds, lambdas=0.4).task_delta(1)),
    (lambda ds: magnitude_prune(ds), lambda ds: magnitude_prune(ds, k=0.2, lam=0.3)),
    (lambda ds: wise_ft(ds[0]), lambda ds: wise_ft(ds[0], alpha=0.5)),
    (lambda ds: emr_task_delta(emr(ds), 1), lambda ds: emr_task_delta(emr(ds, rescaler="mean", zero_sign=-1), 1)),
]


@pytest.mark.parametrize("case", range(len(DEFAULTS)))
def test_documented_defaults(case):
    implicit, explicit = DEFAULTS[case]
    tasks = _random_tasks(n=3, seed=4)
    close(implicit(tasks), explicit(tasks))


def test_documented_defaults_of_the_continual_forms():
    assert ContinualTaskArithmetic().lam == 0.3 and MagMaxMerger().lam == 0.5 and MagMaxMerger().tie_break == "later"
    ct = ContinualTIES()
    assert (ct.k, ct.lam, ct.trim_scope, ct.merge) == (0.2, 1.0, "tensor", "mean")
    assert ct.current == {} and ContinualTaskArithmetic().total == {}


@pytest.mark.parametrize(
    ("y_a", "y_b", "zero_entry"),
    [
        ([], [], 1.0),  # votes: x's (0, +1) → +1: the tie at x[0] takes +, only task a's +1 agrees
        ([-1.0], [-2.0], -1.0),  # votes +1 − 1 = 0: σ stays 0 at x[0] and, as FusionBench, the negative is kept
        ([-1.0, -3.0], [-2.0, 1.0], -1.0),  # votes +1 − 2 = −1: the tie takes −, task b's −1 agrees
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_scope_ties_gives_exact_ties_the_majority_sign_of_the_whole_vector(y_a, y_b, zero_entry, dtype):
    """FusionBench's model-wide TIES: an entry whose deltas sum to exactly 0 takes the sign of Σ sign(Σ_t τ_t) over
    every entry of every key (0 when that is 0 too: the negative entries are kept); the one-shot function and the
    registry's two-pass form (merge_deltas, prepare then per key; fp64 runs its whole-tensor path) agree."""
    from hf_cft.merging.streaming import merge_deltas

    a = {"x": T([1.0, 2.0]), **({"y": T(y_a)} if y_a else {})}
    b = {"x": T([-1.0, 3.0]), **({"y": T(y_b)} if y_b else {})}
    deltas = [{k: v.to(dtype) for k, v in d.items()} for d in (a, b)]
    one_shot = ties(deltas, k=1.0, lam=1.0, trim_scope="model")
    streamed = merge_deltas(deltas, "ties", {"trim_scope": "model", "density": 1.0})
    assert float(one_shot["x"][0]) == zero_entry and float(one_shot["x"][1]) == 2.5
    for k in one_shot:
        torch.testing.assert_close(streamed[k].float(), one_shot[k].float(), rtol=0, atol=0)


def test_emr_task_index_range_and_tall_masks_drop_an_exact_tie():
    res = emr([{"a": T([1.0, -2.0])}, {"a": T([-1.0, 3.0])}])
    close(emr_task_delta(res, -2), emr_task_delta(res, 0))
    close(emr_task_delta(res, -1), emr_task_delta(res, 1))
    for i in (-3, 2):
        with pytest.raises(TaskError, match=rf"^task index {i} is out of range: EMR merged 2 task\(s\).$"):
            emr_task_delta(res, i)
    tie = tall_masks([{"x": T([2.0, 3.0])}, {"x": T([2.0, 1.0])}], lambdas=1.0)  # |τ_t| = λ·|Σ − τ_t| at x[0]
    assert tie.masks[0]["x"].tolist() == [False, True] and tie.masks[1]["x"].tolist() == [False, False]  # strict >


@pytest.mark.parametrize("weight", [1.0, 2.0, -0.5])
@pytest.mark.parametrize("tie_break", ["later", "earlier"])
def test_blocked_magmax_over_several_blocks_with_a_weight_equals_torch_where(weight, tie_break):
    """_magmax_into over more than one block (the last one shorter) with a per-input weight (the registry's):
    best ← where(|w·v| ≥ |best| (later) or > (earlier), w·v, best), bit for bit; magmax and MagMaxMerger agree."""
    from hf_cft.merging.baselines import BLOCK, _magmax_into

    g = torch.Generator().manual_seed(1)
    n = BLOCK + 1000
    best = torch.randint(-8, 9, (n,), generator=g).float() / 4  # dyadic, many magnitude ties
    value = torch.randint(-8, 9, (n,), generator=g).float() / 4
    x = weight * value
    wins = x.abs() >= best.abs() if tie_break == "later" else x.abs() > best.abs()
    want = torch.where(wins, x, best)
    got = _magmax_into(best.clone(), value, tie_break, weight)
    assert torch.equal(got, want)
    deltas = [{"w": best}, {"w": value}]
    close(magmax(deltas, lam=1.0, tie_break=tie_break), {"w": _magmax_into(best.clone(), value, tie_break)})


BAD_DELTAS = [
    (lambda d: [d, [1.0]], DeltaError, r"^delta of task 1 is a list, expected a dict of tensors.$"),
    (lambda d: [[1.0], d], DeltaError, r"^delta of task 0 is a list, expected a dict of tensors.$"),
    (lambda d: [d, {"a": [1.0, 2.0]}], DeltaError, r"^key 'a' of task 1 is a list, not a tensor.$"),
    (lambda d: [{"a": [1.0]}, d], DeltaError, r"^key 'a' of task 0 is a list, not a tensor.$"),
    (lambda d: [d, {"a": torch.ones(2, dtype=torch.bool)}], DeltaError, r"^key 'a' of task 1 is a bool tensor, not a delta.$"),
    (lambda d: [{}, d], DeltaError, r"^delta of task 0 has no keys.$"),
    (lambda d: d, TaskError, r"^deltas must be a list of deltas \(dicts\), got one dict; wrap it in a list.$"),
    (lambda d: [], TaskError, r"^deltas is empty: at least one task delta is needed.$"),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(BAD_DELTAS)))
def test_bad_deltas_are_refused_naming_the_task_and_the_key(case):
    build, error, message = BAD_DELTAS[case]
    with pytest.raises(error, match=message):
        task_arithmetic(build({"a": torch.ones(2)}))


def test_lambda_refusals_one_value_or_one_per_task():
    """λ is one number (a string is one bad value, not a list of characters) or one number per task."""
    from hf_cft.errors import MergeConfigError

    ds = [{"a": torch.ones(2)}, {"a": torch.ones(2)}]
    for lam, error, message in (
        ("x", MergeConfigError, r"^lam must be a number, got 'x' \(str\).$"),
        (None, MergeConfigError, r"^lam must be a number, got None \(NoneType\).$"),
        ([0.1, "x"], MergeConfigError, r"^lam for task 1 must be a number, got 'x' \(str\).$"),
        ([0.1], TaskError, r"^lam has 1 values but there are 2 task deltas.$"),
    ):
        with pytest.raises(error, match=message):
            task_arithmetic(ds, lam=lam)
    close(task_arithmetic(ds, lam=[0.25, 0.5]), {"a": torch.full((2,), 0.75)})


def test_per_input_selections_run_on_two_named_threads_without_the_fused_kernels(monkeypatch):
    """Without numba, several large inputs' thresholds are computed on the two threads of the process's pool
    ("hf_cft-select"), in input order; a small input, one input or one torch thread stays on the caller's thread."""
    import threading

    from hf_cft.merging import baselines

    monkeypatch.setattr(baselines.fused, "available", lambda: False)
    monkeypatch.setattr(baselines.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(baselines, "_POOL", None)
    seen = []

    def fn(x):
        seen.append(threading.current_thread().name)
        return 2 * x

    big = baselines.PARALLEL_MIN
    assert baselines._per_input(fn, [1, 2, 3], big) == [2, 4, 6]
    assert len(seen) == 3 and all(s.startswith("hf_cft-select") for s in seen) and len(set(seen)) <= 2
    pool = baselines._POOL
    assert pool[0] == __import__("os").getpid() and pool[1]._max_workers == 2
    assert baselines._per_input(fn, [5, 6], big) == [10, 12] and baselines._POOL is pool  # one pool per process
    seen.clear()
    assert baselines._per_input(fn, [1, 2], big - 1) == [2, 4]  # small inputs
    assert baselines._per_input(fn, [7], big) == [14]  # one input
    monkeypatch.setattr(baselines.torch, "get_num_threads", lambda: 1)
    assert baselines._per_input(fn, [1, 2], big) == [2, 4]
    assert seen == [threading.current_thread().name] * 5
    monkeypatch.setattr(baselines.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(baselines, "_POOL", (-1, pool[1]))  # a pool made by another process (a fork's parent)
    assert baselines._per_input(fn, [1, 2], big) == [2, 4] and baselines._POOL[0] != -1


def test_model_wide_trim_at_k_one_keeps_every_entry_however_small():
    small = [{"a": T([0.5, -0.25, 2.0])}, {"a": T([0.125, 0.5, -1.0])}]
    kept = ties(small, k=1.0, lam=1.0, trim_scope="model", merge="sum")
    close(kept, ties(small, k=1.0, lam=1.0, trim_scope="tensor", merge="sum"))
    assert float(kept["a"][0]) == 0.625  # both small positive entries kept


def test_emr_refuses_an_unknown_rescaler_and_a_lazy_delta_holding_nan():
    from hf_cft.errors import MergeConfigError
    from hf_cft.merging.deltas import LazyDelta

    ds = [{"a": T([1.0, -2.0])}, {"a": T([-1.0, 3.0])}]
    with pytest.raises(MergeConfigError, match=r"^rescaler must be one of \('mean', 'global_sum'\), got 'max'.$"):
        emr(ds, rescaler="max")
    bad = LazyDelta({"a": (2,)}, lambda key: T([float("nan"), 1.0]))
    with pytest.raises(NonFiniteError, match="'a'"):
        emr([ds[0], bad])


@pytest.mark.parametrize("name", ["dare", "magmax"])
def test_registry_kernels_with_every_weight_two_and_mixed_dtypes(name):
    """The registered DARE scales each kept entry by its input's weight also when that weight is 2.0 (with drops, and
    with density 1 where the input is kept whole); MagMax of an fp32 and an fp64 input equals the one-shot
    function."""
    from hf_cft.merging.streaming import merge_deltas

    g = torch.Generator().manual_seed(6)
    deltas = [{"w": torch.randint(-8, 9, (40,), generator=g).float() / 4} for _ in range(2)]
    if name == "dare":
        got = merge_deltas(deltas, "dare", {"density": 0.5, "seed": 1}, [{"weight": 2.0}, {"weight": 2.0}])
        want = dare([{"w": 2.0 * d["w"]} for d in deltas], rho=0.5, seed=1, lam=1.0)
        whole = merge_deltas(deltas, "dare", {"density": 1.0}, [{"weight": 2.0}, {"weight": 2.0}])  # nothing dropped
        torch.testing.assert_close(whole["w"], 2.0 * (deltas[0]["w"] + deltas[1]["w"]), rtol=0, atol=0)
    else:
        mixed = [deltas[0], {"w": deltas[1]["w"].double()}]
        got = merge_deltas(mixed, "magmax", {"weight": 1.0})
        want = magmax(deltas, lam=1.0)
    torch.testing.assert_close(got["w"].float(), want["w"], rtol=0, atol=0)


def test_two_pass_model_ties_counts_votes_over_every_key_and_keeps_the_sign_unit():
    """The registry's prepare pass sums the elected signs of every key (here a negative key before the tied one:
    the majority is −), and the zero sign is a unit sign (merge="max" multiplies by it)."""
    from hf_cft.merging.streaming import merge_deltas

    a = {"y": T([-1.0, -1.0, -1.0]), "x": T([1.0, 2.0])}
    b = {"y": T([-2.0, -1.0, -3.0]), "x": T([-1.0, 3.0])}
    balanced_a = {"x": T([1.0, 2.0]), "y": T([1.0, -1.0])}  # y's signs cancel: the majority is x's +
    balanced_b = {"x": T([-1.0, 3.0]), "y": T([1.0, -1.0])}
    streamed = merge_deltas([balanced_a, balanced_b], "ties", {"trim_scope": "model", "density": 1.0})
    assert float(streamed["x"][0]) == 1.0
    for merge in ("mean", "max"):
        one_shot = ties([a, b], k=1.0, lam=1.0, trim_scope="model", merge=merge)
        streamed = merge_deltas([a, b], "ties", {"trim_scope": "model", "density": 1.0, "merge": merge})
        for k in one_shot:
            torch.testing.assert_close(streamed[k], one_shot[k], rtol=0, atol=0)
        assert float(one_shot["x"][0]) == -1.0  # votes −3 + 1 = −2: the tie takes −, task b's −1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_trim_top_k_refuses_a_nan_instead_of_dropping_it(dtype):
    with pytest.raises(NonFiniteError, match=r"^trim_top_k: the tensor holds NaN or inf.$"):
        trim_top_k(T([float("nan"), 1.0, 2.0, 3.0]).to(dtype), 0.5)


def test_registry_ties_and_consensus_torch_kernels_scale_every_input_by_a_weight_of_two_over_several_blocks(
    monkeypatch,
):
    """The blocked torch kernels (HF_CFT_FUSED=0) over more than one stacked block (the last one shorter), every
    input's weight 2.0: TIES equals the whole-tensor formula on 2·trim(τ_t), its tied drops resolved by position in
    every block; consensus equals Σ_t 2·τ_t kept where ≥ k masks |2·τ_t| > λ·|Σ − 2·τ_t| select it."""
    from hf_cft.merging.baselines import BLOCK
    from hf_cft.merging.streaming import merge_deltas

    monkeypatch.setenv("HF_CFT_FUSED", "0")
    g = torch.Generator().manual_seed(8)
    n = BLOCK // 2 + 5000  # two inputs: stacked blocks of BLOCK / 2 entries, so two blocks
    flats = [torch.randint(-8, 9, (n,), generator=g).float() / 4 for _ in range(2)]  # dyadic: exact sums, many ties
    deltas = [{"w": f} for f in flats]
    twice = [{"weight": 2.0}, {"weight": 2.0}]
    got = merge_deltas(deltas, "ties", {"density": 0.3}, twice)["w"]
    want = _elect_disjoint(torch.stack([2.0 * trim_top_k(f, 0.3) for f in flats]), "mean")
    assert torch.equal(got, want)
    got = merge_deltas(deltas, "consensus", {"k": 2, "tall_lambda": 0.5}, twice)["w"]
    scaled = [2.0 * f for f in flats]
    total = scaled[0] + scaled[1]
    votes = sum((s.abs() > 0.5 * (total - s).abs()).int() for s in scaled)
    assert torch.equal(got, total * (votes >= 2))


def test_small_inputs_are_trimmed_on_the_calling_thread_when_torch_runs_two(monkeypatch):
    """Below PARALLEL_MIN entries the registry's TIES selects each input's threshold on the calling thread (no pool
    is made) even where torch runs two threads and numba is absent; the merge is the whole-tensor formula."""
    from hf_cft.merging import baselines
    from hf_cft.merging.streaming import merge_deltas

    monkeypatch.setenv("HF_CFT_FUSED", "0")
    monkeypatch.setattr(baselines.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(baselines, "_POOL", None)
    a, b = T([4.0, -1.0, 2.0, 0.5]), T([-3.0, 2.0, 1.0, -0.25])
    got = merge_deltas([{"w": a}, {"w": b}], "ties", {"density": 0.5})["w"]
    assert got.tolist() == [4.0, 2.0, 2.0, 0.0]  # kept: a's 4, 2 and b's −3, 2; σ = (+, +, +, 0)
    assert baselines._POOL is None


def test_blocked_magmax_reuses_its_block_buffers_without_resizing_them():
    """_magmax_into over two blocks (the last one shorter) writes each step into the first m entries of its block
    buffers: torch warns (a deprecated resize) when an out= tensor has another size, so none may be raised."""
    import warnings

    from hf_cft.merging.baselines import BLOCK, _magmax_into

    g = torch.Generator().manual_seed(2)
    best = torch.randint(-8, 9, (BLOCK + 1000,), generator=g).float() / 4
    value = torch.randint(-8, 9, (BLOCK + 1000,), generator=g).float() / 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _magmax_into(best.clone(), value, "later", 2.0)
    x = 2.0 * value
    assert torch.equal(got, torch.where(x.abs() >= best.abs(), x, best))


def test_model_scope_ties_counts_an_input_without_a_key_or_without_any_key_as_zeros():
    """The registry's model-wide trim (prepare pass): an input lacking a key counts zeros there in its ranking, and
    an input with no key at all has threshold 0; the majority sign counts the entries equal to a threshold as kept."""
    from hf_cft.merging.streaming import merge_deltas

    a = {"x": T([1.0, -2.0, 3.0, -4.0]), "y": T([5.0, 0.5])}
    b = {"x": T([0.25, -3.0, 2.0, -1.0])}  # no y: two zeros in its ranking
    # b: |τ| of 6 entries [0, 0, 0.25, 1, 2, 3], keep int(6·0.5) = 3: the 3rd smallest, 0.25, is the threshold
    # a: [0.5, 1, 2, 3, 4, 5]: the 3rd smallest, 2
    got = merge_deltas([a, b], "ties", {"trim_scope": "model", "density": 0.5, "merge": "sum"})
    assert got["x"].tolist() == [0.25, -5.0, 5.0, -5.0] and got["y"].tolist() == [5.0, 0.0]
    close(got, ties([a, {**b, "y": T([0.0, 0.0])}], k=0.5, lam=1.0, trim_scope="model", merge="sum"))
    alone = merge_deltas([a, {}], "ties", {"trim_scope": "model", "density": 0.5, "merge": "sum"})
    close(alone, {"x": T([0.0, -2.0, 3.0, -4.0]), "y": T([5.0, 0.0])})
    # a's threshold is 1 (the smallest of 4, keep 3) and only its entry equal to it votes +: σ = + at the exact ties
    c, d = {"x": T([1.0, 4.0, -4.0, 2.0])}, {"x": T([0.0, -4.0, 4.0, -2.0])}
    got = merge_deltas([c, d], "ties", {"trim_scope": "model", "density": 0.75})
    assert got["x"].tolist() == [1.0, 4.0, 4.0, 2.0]
