"""ConDU: the property tests of docs/methods/condu.md §8 (random dicts of tensors of several shapes), the λ
formulas by hand, degenerate triggers, bit-packed masks, bundle save/load and its failure modes."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_cft.merging.condu as condu_mod
from hf_cft.errors import BundleError, DeltaError, MergeConfigError, NonFiniteError, TaskError
from hf_cft.merging import (
    CollapsedTaskWarning,
    DeltaFusionMerger,
    PackedMask,
    TaskDelta,
    decouple,
    elected_sign,
    unify,
)

SHAPES = {"w": (6, 5), "b": (7,), "t": (2, 3, 4), "s": (1,)}
FAST = settings(max_examples=12, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)


def rand(seed, n, shapes=SHAPES, kind="normal", sparsity=0.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = {}
        for k, s in shapes.items():
            x = torch.randn(s, generator=g)
            if kind == "positive":
                x = x.abs() + 1e-3
            if sparsity:
                x = torch.where(torch.rand(s, generator=g) < sparsity, 0.0, x)
            d[k] = x
        out.append(d)
    return out


def mass(d, rescaler="mean"):
    """The L1 mass in the rescaler's form (condu.md §3)."""
    return sum(float(t.abs().sum(dtype=torch.float64)) / (t.numel() if rescaler == "mean" else 1) for t in d.values())


def run_sessions(deltas, rescaler="mean", check=None):
    m = DeltaFusionMerger(rescaler=rescaler)
    for t, d in enumerate(deltas):
        m.add_task(d, f"task{t}")
        if check is not None:
            check(m, t)
    return m


# ----------------------------------------------------------------------------------- §8 property tests 1-9


@FAST
@given(seed=seeds, sparsity=st.sampled_from([0.0, 0.3]), rescaler=st.sampled_from(["mean", "global_sum"]))
def test_1_one_task_is_rebuilt_exactly(seed, sparsity, rescaler):
    (d,) = rand(seed, 1, sparsity=sparsity)
    m = run_sessions([d], rescaler)
    rec = m.tasks[0]
    assert rec.lam == 1.0 and not rec.collapsed
    rebuilt = m.expert_delta("task0")
    for k in d:
        assert torch.equal(m.mask("task0", k), d[k] != 0)
        assert torch.equal(rebuilt[k], d[k])


@FAST
@given(seed=seeds, n=st.integers(2, 6))
def test_2_signs_and_masks(seed, n):
    deltas = rand(seed, n, sparsity=0.2)
    res = unify(deltas)
    for k in SHAPES:
        stack = torch.stack([d[k] for d in deltas])
        sigma = elected_sign([d[k] for d in deltas])
        assert torch.equal(sigma == -1, stack.mean(0) <= 0)  # σ = −1 where the mean is ≤ 0 (ties, all-zero)
        for i, d in enumerate(deltas):
            assert torch.equal(res.masks[i][k], sigma * d[k] > 0)
            rebuilt = decouple(res, i)[k]
            assert bool(((torch.sign(rebuilt) == torch.sign(res.unified[k])) | (rebuilt == 0)).all())
    # over sessions, every decoupled expert agrees in sign with u
    m = run_sessions(deltas)
    for name in m.task_names:
        for k, v in m.expert_delta(name).items():
            assert bool(((torch.sign(v) == torch.sign(m.unified_delta[k])) | (v == 0)).all())


@pytest.mark.parametrize("rescaler", ["mean", "global_sum"])
def test_3_mass_is_kept_over_many_sessions(rescaler):
    deltas = rand(7, 20)
    original = [mass(d, rescaler) for d in deltas]

    def check(m, t):
        for i, rec in enumerate(m.tasks):
            if not rec.collapsed:
                got = mass(m.expert_delta(rec.name), rescaler)
                assert abs(got - original[i]) <= 1e-6 * original[i], (t, i, got, original[i])

    m = run_sessions(deltas, rescaler, check)
    assert not any(r.collapsed for r in m.tasks)


@FAST
@given(seed=seeds, n=st.integers(2, 8))
def test_4_same_sign_deltas(seed, n):
    pattern = {k: torch.where(v > 0, 1.0, -1.0) for k, v in rand(seed + 1, 1)[0].items()}
    deltas = [{k: pattern[k] * v for k, v in d.items()} for d in rand(seed, n, kind="positive")]
    envelope = {k: torch.stack([d[k].abs() for d in deltas]).max(0).values for k in SHAPES}

    def check(m, t):
        seen = torch.stack
        for rec in m.tasks:
            assert rec.lam <= 1.0 + 1e-12
            for k in SHAPES:
                assert bool(m.mask(rec.name, k).all())
        for k, u in m.unified_delta.items():
            assert bool((u.abs() <= seen([d[k].abs() for d in deltas[: t + 1]]).max(0).values).all())
            assert bool((u.abs() <= envelope[k]).all())

    run_sessions(deltas, check=check)


@FAST
@given(seed=seeds, n=st.integers(2, 6))
def test_5_disjoint_supports_rebuild_exactly(seed, n):
    g = torch.Generator().manual_seed(seed)
    owner = {k: torch.randint(0, n, s, generator=g) for k, s in SHAPES.items()}
    deltas = [{k: torch.where(owner[k] == i, v, 0.0) for k, v in d.items()} for i, d in enumerate(rand(seed, n))]

    def check(m, t):
        for i, rec in enumerate(m.tasks):
            assert rec.lam == 1.0
            for k, v in m.expert_delta(rec.name).items():
                assert torch.equal(v, deltas[i][k])

    run_sessions(deltas, check=check)


@FAST
@given(seed=seeds, n=st.integers(2, 5), c=st.floats(0.05, 20.0), exp=st.integers(-3, 3))
def test_6_scale_and_permutation_equivariance(seed, n, c, exp):
    deltas = rand(seed, n)
    base = unify(deltas)
    two = 2.0**exp  # exact in floating point: everything scales exactly
    exact = unify([{k: two * v for k, v in d.items()} for d in deltas])
    approx = unify([{k: c * v for k, v in d.items()} for d in deltas])
    for k in SHAPES:
        assert torch.equal(exact.unified[k], two * base.unified[k])
        torch.testing.assert_close(approx.unified[k], c * base.unified[k], rtol=1e-5, atol=0)
        for i in range(n):
            assert torch.equal(exact.masks[i][k], base.masks[i][k])
            assert torch.equal(approx.masks[i][k], base.masks[i][k])
    assert exact.lambdas == base.lambdas
    np.testing.assert_allclose(approx.lambdas, base.lambdas, rtol=1e-6)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    permuted = unify([deltas[p] for p in perm])
    for k in SHAPES:
        torch.testing.assert_close(permuted.unified[k], base.unified[k], rtol=1e-6, atol=0)
        for j, p in enumerate(perm):
            assert torch.equal(permuted.masks[j][k], base.masks[p][k])
    np.testing.assert_allclose(permuted.lambdas, [base.lambdas[p] for p in perm], rtol=1e-6)


@FAST
@given(seed=seeds, sparsity=st.sampled_from([0.0, 0.5]))
def test_7_the_same_delta_twice_is_rebuilt_twice(seed, sparsity):
    (d,) = rand(seed, 1, sparsity=sparsity)
    res = unify([d, d])
    assert res.lambdas == [1.0, 1.0]
    m = run_sessions([d, dict(d)])
    for i, name in enumerate(m.task_names):
        assert m.tasks[i].lam == 1.0
        for k, v in m.expert_delta(name).items():
            assert torch.equal(decouple(res, i)[k], d[k]) and torch.equal(v, d[k])


def test_8_same_sign_iid_sessions_stay_bounded_and_stabilise():
    shapes = {"w": (30, 30), "b": (30,), "t": (2, 5, 6)}
    deltas = rand(3, 30, shapes=shapes, kind="positive")
    envelope_l1, u_l1 = [], []

    def check(m, t):
        env = sum(float(torch.stack([d[k] for d in deltas[: t + 1]]).max(0).values.sum()) for k in shapes)
        envelope_l1.append(env)
        u_l1.append(sum(float(u.abs().sum()) for u in m.unified_delta.values()))
        assert u_l1[-1] <= env * (1 + 1e-6)

    run_sessions(deltas, check=check)
    last, earlier = np.array(u_l1[-10:]), np.array(u_l1[10:20])
    # a bounded, stationary magnitude (condu.md §8: not a fixed point): low variation over the last 10 sessions,
    # the same level as ten sessions before, and well below the still-growing envelope
    assert last.std() / last.mean() < 0.04, last
    assert abs(last.mean() - earlier.mean()) / last.mean() < 0.04
    assert u_l1[-1] < 0.6 * envelope_l1[-1]


def test_9_degenerate_triggers_follow_the_policy():
    (d,) = rand(0, 1)
    zero = {k: torch.zeros_like(v) for k, v in d.items()}
    m = DeltaFusionMerger()
    with pytest.warns(CollapsedTaskWarning, match="'empty'"):
        m.add_task(zero, "empty")
    assert m.tasks[0].lam == 0.0 and m.tasks[0].collapsed
    m.add_task(d, "real")
    assert not m.tasks[1].collapsed and m.tasks[1].lam == 1.0
    assert all(torch.equal(v, d[k]) for k, v in m.expert_delta("real").items())
    assert all(not bool(v.any()) for v in m.expert_delta("empty").values())
    # total sign conflict: the second delta outweighs the first everywhere, so the first loses every entry
    conflict = DeltaFusionMerger()
    conflict.add_task(d, "a")
    with pytest.warns(CollapsedTaskWarning, match="'a'"):
        conflict.add_task({k: -2 * v for k, v in d.items()}, "b")
    a, b = conflict.tasks
    assert a.collapsed and a.lam == 0.0 and not b.collapsed and b.lam == 1.0
    for merger in (m, conflict):
        for name in merger.task_names:
            assert all(bool(torch.isfinite(v).all()) for v in merger.expert_delta(name).values())
        assert all(math.isfinite(r.lam) for r in merger.tasks)
    # strict: raise, and leave the merger exactly as it was
    strict = DeltaFusionMerger(strict=True)
    strict.add_task(d, "a")
    before = {k: v.clone() for k, v in strict.unified_delta.items()}
    with pytest.raises(TaskError, match="'a'"):
        strict.add_task({k: -2 * v for k, v in d.items()}, "b")
    with pytest.raises(TaskError, match="'z'"):
        strict.add_task(zero, "z")
    assert strict.task_names == ["a"] and strict.tasks[0].lam == 1.0
    assert all(torch.equal(v, before[k]) for k, v in strict.unified_delta.items())
    assert all(torch.equal(strict.mask("a", k), d[k] != 0) for k in d)


# --------------------------------------------------------------------------------------------- λ by hand


@pytest.mark.parametrize("rescaler", ["mean", "global_sum"])
def test_rescaler_formulas_by_hand(rescaler):
    d1 = {"x": torch.tensor([1.0, -2.0, 3.0, 0.0]), "y": torch.tensor([0.5, 0.5])}
    d2 = {"x": torch.tensor([2.0, 1.0, -4.0, 1.0]), "y": torch.tensor([-1.0, 1.5])}
    res = unify([d1, d2], rescaler)
    # σ: x: [+, -, -, +]; y: [-, +]. u = σ·max agreeing |δ|: x [2, -2, -4, 1]; y [-1, 1.5]
    assert torch.equal(res.unified["x"], torch.tensor([2.0, -2.0, -4.0, 1.0]))
    assert torch.equal(res.unified["y"], torch.tensor([-1.0, 1.5]))
    assert res.masks[0]["x"].tolist() == [True, True, False, False]
    assert res.masks[1]["y"].tolist() == [True, True]
    if rescaler == "mean":
        lam1 = (6 / 4 + 1 / 2) / (4 / 4 + 1.5 / 2)
        lam2 = (8 / 4 + 2.5 / 2) / (7 / 4 + 2.5 / 2)
    else:
        lam1 = (6 + 1) / (4 + 1.5)
        lam2 = (8 + 2.5) / (7 + 2.5)
    assert res.lambdas == pytest.approx([lam1, lam2], rel=1e-12)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_named():
    (d,) = rand(0, 1)
    m = DeltaFusionMerger()
    m.add_task(d, "a")
    with pytest.raises(TaskError, match="'a' was already added"):
        m.add_task(d, "a")
    with pytest.raises(DeltaError, match="lacks key 'w'"):
        m.add_task({k: v for k, v in d.items() if k != "w"}, "b")
    with pytest.raises(DeltaError, match="'b' .*shape"):
        m.add_task({**d, "b": torch.zeros(8)}, "c")
    with pytest.raises(NonFiniteError, match="'t'"):
        m.add_task({**d, "t": torch.full((2, 3, 4), float("nan"))}, "d")
    m2 = DeltaFusionMerger()
    m2.add_task(TaskDelta(d, base_fingerprint="one"), "a")
    with pytest.raises(DeltaError, match="task 'b' was taken from another base model"):
        m2.add_task(TaskDelta(d, base_fingerprint="two"), "b")
    with pytest.raises(TaskError, match="Unknown task 'zz'"):
        m.expert_delta("zz")
    with pytest.raises(MergeConfigError, match="rescaler"):
        DeltaFusionMerger(rescaler="median")
    with pytest.raises(MergeConfigError, match="lora_merge"):
        DeltaFusionMerger(lora_merge="sparse")
    with pytest.raises(TaskError, match="prototype rows"):
        m.add_task(d, "p", prototypes=torch.randn(3, 4), classnames=["x", "y"])
    assert m.task_names == ["a"]


# ------------------------------------------------------------------------------------------------ masks


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=3), seed=seeds, p=st.floats(0, 1))
def test_packed_masks_round_trip_at_one_bit_per_entry(shape, seed, p):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(tuple(shape), generator=g) < p
    packed = PackedMask.pack(mask)
    assert packed.bits.dtype == torch.uint8 and packed.nbytes == -(-mask.numel() // 8)
    assert torch.equal(packed.unpack(), mask) and packed.unpack().shape == mask.shape
    assert packed.count() == int(mask.sum())
    np.testing.assert_array_equal(packed.bits.numpy(), np.packbits(mask.numpy().reshape(-1)))


def test_storage_report_uses_one_bit_masks():
    m = run_sessions(rand(1, 3, shapes={"w": (64, 32), "b": (64,)}))
    s = m.storage_bytes()
    assert s["masks_packed"] == 3 * (64 * 32 + 64) // 8 and s["masks_bool"] == 3 * (64 * 32 + 64)
    assert s["unified"] == 4 * (64 * 32 + 64) and s["experts"] == 3 * s["unified"]
    assert s["bundle"] == s["unified"] + s["masks_packed"] + s["prototypes"] < s["bundle_bool_masks"] < s["experts"]


# ------------------------------------------------------------------------------------------------ bundles


def _merger_with_prototypes():
    deltas = rand(4, 3)
    m = DeltaFusionMerger(rescaler="global_sum")
    for i, d in enumerate(deltas):
        protos = torch.randn(2 + i, 5) if i != 1 else None
        m.add_task(d, f"task{i}", prototypes=protos, classnames=[f"c{j}" for j in range(2 + i)], templates=["{}"])
    return m


def test_save_load_round_trip_is_exact(tmp_path):
    m = _merger_with_prototypes()
    m.save_pretrained(tmp_path / "bundle")
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert files == ["manifest.json", "masks.safetensors", "prototypes.safetensors", "unified.safetensors"]
    loaded = DeltaFusionMerger.from_pretrained(tmp_path / "bundle")
    assert loaded.config == m.config and loaded.tasks == m.tasks and loaded.base_fingerprint == m.base_fingerprint
    for k, u in m.unified_delta.items():
        assert torch.equal(loaded.unified_delta[k], u)
    for name in m.task_names:
        for k in SHAPES:
            assert loaded.packed_mask(name, k) == m.packed_mask(name, k)
        assert (loaded.prototypes(name) is None) == (m.prototypes(name) is None)
        if m.prototypes(name) is not None:
            assert torch.equal(loaded.prototypes(name), m.prototypes(name))
        assert all(torch.equal(v, m.expert_delta(name)[k]) for k, v in loaded.expert_delta(name).items())
    (extra,) = rand(9, 1)  # the loaded merger continues exactly like the original
    m.add_task(extra, "next")
    loaded.add_task(extra, "next")
    assert all(torch.equal(loaded.unified_delta[k], u) for k, u in m.unified_delta.items())
    assert [r.lam for r in loaded.tasks] == [r.lam for r in m.tasks]


def test_corrupt_or_missing_bundle_files_raise_bundle_error(tmp_path):
    m = _merger_with_prototypes()
    folder = m.save_pretrained(tmp_path / "b")
    blob = (folder / "masks.safetensors").read_bytes()
    (folder / "masks.safetensors").write_bytes(blob[:-3] + bytes(3 * [255]))
    with pytest.raises(BundleError, match="masks.safetensors does not match the checksum"):
        DeltaFusionMerger.from_pretrained(folder)
    (folder / "masks.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(BundleError, match="cannot read masks.safetensors"):
        DeltaFusionMerger.from_pretrained(folder, verify=False)
    (folder / "masks.safetensors").write_bytes(blob)
    DeltaFusionMerger.from_pretrained(folder)  # restored: loads again
    (folder / "unified.safetensors").unlink()
    with pytest.raises(BundleError, match="lacks unified.safetensors"):
        DeltaFusionMerger.from_pretrained(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        DeltaFusionMerger.from_pretrained(folder)
    manifest["tasks"][0]["lam"] = float("nan")
    m.save_pretrained(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest.json does not match its checksum"):  # an edited manifest
        DeltaFusionMerger.from_pretrained(folder)
    with pytest.raises(BundleError, match="task0"):  # and its λ is still checked without verification
        DeltaFusionMerger.from_pretrained(folder, verify=False)
    (folder / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing|not a local bundle"):
        DeltaFusionMerger.from_pretrained(folder)
    with pytest.raises(BundleError, match="no-such-user/no-such-bundle"):  # offline Hub id
        DeltaFusionMerger.from_pretrained("no-such-user/no-such-bundle")


def test_save_is_atomic(tmp_path, monkeypatch):
    m = _merger_with_prototypes()
    folder = m.save_pretrained(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    old_names = m.task_names
    (extra,) = rand(5, 1)
    m.add_task(extra, "more")
    import hf_cft.utils

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_cft.utils, "atomic_write_json", boom)  # crash before the manifest is written
    with pytest.raises(RuntimeError):
        m.save_pretrained(folder)
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    # the new tensors were only staged (no commit): the folder still holds the old bundle, whole
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert DeltaFusionMerger.from_pretrained(folder).task_names == old_names
    monkeypatch.undo()
    m.save_pretrained(folder)  # the next save drops the uncommitted staging folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)
    assert DeltaFusionMerger.from_pretrained(folder).task_names == [*old_names, "more"]


def test_warnings_only_for_newly_collapsed_tasks():
    (d,) = rand(0, 1)
    m = DeltaFusionMerger()
    with pytest.warns(CollapsedTaskWarning):
        m.add_task({k: torch.zeros_like(v) for k, v in d.items()}, "zero")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedTaskWarning)
        m.add_task(d, "ok")  # "zero" stays collapsed; no new warning
    assert m.tasks[0].collapsed


def test_model_card_lists_tasks_storage_and_results(monkeypatch):
    from pathlib import Path

    import hf_cft.hub.cards as cards

    repo_cards = Path(__file__).resolve().parents[1] / "model_cards"  # this checkout's templates
    monkeypatch.setattr(cards.resources, "files", lambda pkg: repo_cards)
    m = DeltaFusionMerger(base_model_name_or_path="openai/clip-vit-base-patch16")
    (d,) = rand(0, 1)
    m.add_task(d, "dtd", classnames=["a", "b"], dataset="dtd")
    with pytest.warns(CollapsedTaskWarning):
        m.add_task({k: torch.zeros_like(v) for k, v in d.items()}, "mnist", dataset="mnist")
    card = cards.condu_card(m, results=[{"name": "dtd", "accuracy": 71.25}], summary={"Last": 80.5})
    text = str(card)
    assert "| 0 | dtd | dtd | 2 | 1.0000 |" in text and "| 1 | mnist | mnist |  | 0.0000 | yes |" in text
    assert "| dtd | 71.25 |" in text and "| Last | 80.50 |" in text
    assert "base_model: openai/clip-vit-base-patch16" in text and "value: 71.25" in text
    assert f"{m.storage_bytes()['bundle'] / 1e6:.2f}" in text


# ------------------------------------------------------------------------------- slicing and streamed deltas


@given(seeds, st.integers(1, 5), st.sampled_from(["mean", "global_sum"]))
@FAST
def test_slice_by_slice_unify_equals_one_slice(seed, n, rescaler):
    """Unifying in slices of 8 entries gives the same u, masks and λ as one slice per key (the rule is
    element-wise and λ's terms are sums), across several sessions of the merger."""
    import hf_cft.merging.condu as condu_mod

    deltas = rand(seed, n, sparsity=0.3)
    results = []
    for size in (8, 1 << 20):
        old = condu_mod.UNIFY_SLICE
        condu_mod.UNIFY_SLICE = size
        try:
            m = DeltaFusionMerger(rescaler=rescaler)
            for i, d in enumerate(deltas):
                m.add_task(d, f"t{i}")
            results.append(m)
        finally:
            condu_mod.UNIFY_SLICE = old
    a, b = results
    for k in SHAPES:
        assert torch.equal(a.unified_delta[k], b.unified_delta[k])
        for name in a.task_names:
            assert a.packed_mask(name, k) == b.packed_mask(name, k)
    for ra, rb in zip(a.tasks, b.tasks):
        assert ra.lam == pytest.approx(rb.lam, rel=1e-12)


def test_packed_mask_unpack_range_matches_full_unpack():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 13, generator=g) > 0.5
    pm = PackedMask.pack(m)
    flat = m.reshape(-1)
    for lo, hi in [(0, 65), (8, 16), (16, 61), (64, 65), (24, 24)]:
        assert torch.equal(pm.unpack_range(lo, hi), flat[lo:hi])
    with pytest.raises(ValueError, match="multiple of 8"):
        pm.unpack_range(3, 10)
    with pytest.raises(ValueError):
        pm.unpack_range(0, 66)


def test_delta_files_are_streamed_and_give_the_same_bundle(tmp_path):
    """add_task(path) / LazyDelta: the same bundle as in-memory deltas; the base fingerprint travels in the file's
    metadata; a second base's delta file is refused; keys are read one at a time."""
    from hf_cft.merging import LazyDelta, save_delta

    deltas = [TaskDelta(d, base_fingerprint="base-a") for d in rand(3, 3, sparsity=0.2)]
    paths = [save_delta(d, tmp_path / f"d{i}.safetensors") for i, d in enumerate(deltas)]
    mem, disk = DeltaFusionMerger(), DeltaFusionMerger()
    for i, (d, p) in enumerate(zip(deltas, paths)):
        mem.add_task(d, f"t{i}")
        disk.add_task(str(p) if i % 2 else LazyDelta.from_file(p), f"t{i}")
    assert disk.base_fingerprint == "base-a"
    for k in SHAPES:
        assert torch.equal(mem.unified_delta[k], disk.unified_delta[k])
    # λ's float64 sums run over the keys in the file's (sorted) order: equal up to the last bits
    assert [r.lam for r in mem.tasks] == pytest.approx([r.lam for r in disk.tasks], rel=1e-12)

    lazy = LazyDelta.from_file(paths[0])
    assert lazy.shapes() == {k: tuple(s) for k, s in SHAPES.items()} and len(lazy) == len(SHAPES)
    reads = []
    counting = LazyDelta(lazy.shapes(), lambda k: reads.append(k) or lazy[k], "base-a", "counting")
    DeltaFusionMerger().add_task(counting, "t")
    assert sorted(set(reads)) == sorted(SHAPES) and len(reads) == 2 * len(SHAPES)  # check pass + session pass

    other = dict(rand(4, 1)[0])
    save_delta(TaskDelta(other, base_fingerprint="base-b"), tmp_path / "other.safetensors")
    with pytest.raises(DeltaError, match="another base model"):
        disk.add_task(str(tmp_path / "other.safetensors"), "t9")
    assert disk.task_names == ["t0", "t1", "t2"]


def test_streamed_delta_bad_input_is_named_and_leaves_the_merger_unchanged(tmp_path):
    from safetensors.torch import save_file

    from hf_cft.merging import LazyDelta

    m = DeltaFusionMerger()
    m.add_task(rand(5, 1)[0], "a")
    before = {k: v.clone() for k, v in m.unified_delta.items()}
    bad = dict(rand(6, 1)[0])
    bad["t"][0, 1, 2] = float("nan")
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteError, match="'t'"):
        m.add_task(str(tmp_path / "nan.safetensors"), "b")
    wrong = dict(rand(6, 1)[0])
    wrong["w"] = torch.randn(5, 6)
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(DeltaError, match="'w'.*shape"):
        m.add_task(LazyDelta.from_file(tmp_path / "shape.safetensors"), "b")
    missing = {k: v for k, v in rand(6, 1)[0].items() if k != "b"}
    save_file({k: v.contiguous() for k, v in missing.items()}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(DeltaError, match="lacks key 'b'"):
        m.add_task(str(tmp_path / "missing.safetensors"), "b")
    with pytest.raises(BundleError, match="does not exist"):
        m.add_task(str(tmp_path / "absent.safetensors"), "b")
    assert m.task_names == ["a"] and all(torch.equal(before[k], m.unified_delta[k]) for k in before)


# ------------------------------------------------------------------------ compute device (issue 18 item 6)

DEVICE_SHAPES = {"w": (300, 250), "b": (700,), "t": (2, 3, 4)}  # 75 000 entries: several slices, threaded ops


def _device_sessions(device=None, threads=None, n=4, slice_size=1 << 14, monkeypatch=None):
    """n sessions of correlated random deltas (signs partly agree), sliced finely so that slices are exercised."""
    monkeypatch.setattr(condu_mod, "UNIFY_SLICE", slice_size)
    g = torch.Generator().manual_seed(7)
    common = {k: torch.randn(s, generator=g) for k, s in DEVICE_SHAPES.items()}
    deltas = [{k: 0.5 * common[k] + torch.randn(s, generator=g) for k, s in DEVICE_SHAPES.items()} for _ in range(n)]
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        m = DeltaFusionMerger(device=device)
        for t, d in enumerate(deltas):
            m.add_task(d, f"task{t}")
    finally:
        torch.set_num_threads(before)
    return m


def _assert_same_up_to_rounding(a, b):
    """u and the masks equal up to float rounding of λ's float64 sums (which only the summation order changes):
    λ to 1e-12 relative; u to fp32 rounding; masks may differ only at the rare entries where a 1-ulp change of a
    decoupled expert flips an elected sign (none expected at these sizes, ≤ 1e-4 tolerated)."""
    for ra, rb in zip(a.tasks, b.tasks):
        assert ra.lam == pytest.approx(rb.lam, rel=1e-12)
    for k in DEVICE_SHAPES:
        torch.testing.assert_close(a.unified_delta[k], b.unified_delta[k].cpu(), rtol=1e-6, atol=1e-7)
        assert a.unified_delta[k].device.type == "cpu" and b.unified_delta[k].device.type == "cpu"
        for name in a.task_names:
            diff = (a.mask(name, k) != b.mask(name, k)).float().mean()
            assert float(diff) <= 1e-4


@pytest.mark.threads
def test_unify_on_one_or_two_cpu_threads_gives_the_same_bundle(monkeypatch):
    """The CI-runnable half of the device check: the session does not depend on how the CPU splits its work."""
    one = _device_sessions("cpu", threads=1, monkeypatch=monkeypatch)
    two = _device_sessions(None, threads=2, monkeypatch=monkeypatch)
    assert one.device == two.device == torch.device("cpu")
    _assert_same_up_to_rounding(one, two)
    assert one.tasks[0].lam != 1.0  # the sessions did unify overlapping deltas (not a trivial one-task bundle)


def test_decoupled_slice_cache_changes_nothing(monkeypatch):
    """Stored experts' decoupled slices kept between the σ and the M/u pass (or, over budget, rebuilt): the same
    bundle bit for bit."""
    kept = _device_sessions(monkeypatch=monkeypatch)
    monkeypatch.setattr(condu_mod, "DECOUPLED_CACHE_BYTES", 0)
    rebuilt = _device_sessions(monkeypatch=monkeypatch)
    for k in DEVICE_SHAPES:
        assert torch.equal(kept.unified_delta[k].view(torch.int32), rebuilt.unified_delta[k].view(torch.int32))
        for name in kept.task_names:
            assert kept.packed_mask(name, k) == rebuilt.packed_mask(name, k)
    assert [r.lam for r in kept.tasks] == [r.lam for r in rebuilt.tasks]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_weights_are_base_plus_the_decoupled_delta(monkeypatch, dtype):
    """iter_expert_weights (formed chunk by chunk) gives exactly θ⁰ + δ̃ rounded once to θ⁰'s dtype, as
    FunctionalExpert does with iter_expert_delta; a key the base lacks, or of another shape, is named."""
    monkeypatch.setattr(condu_mod, "EXPERT_CHUNK", 1 << 10)  # several chunks per key, one for the small keys
    m = _device_sessions(n=3, monkeypatch=monkeypatch)
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in DEVICE_SHAPES.items()}
    for name in m.task_names:
        got = dict(m.iter_expert_weights(name, base))
        for k, d in m.iter_expert_delta(name):
            want = (base[k].float() + d).to(dtype)
            assert got[k].dtype == dtype and torch.equal(got[k], want), (name, k)
    with pytest.raises(DeltaError, match="'b' is missing"):
        list(m.iter_expert_weights("task0", {k: v for k, v in base.items() if k != "b"}))
    with pytest.raises(DeltaError, match=r"'w' has shape \(250, 300\)"):
        list(m.iter_expert_weights("task0", {**base, "w": base["w"].t()}))


@pytest.mark.parametrize("bad", ["meta", "bogus", "mps", 3, "cuda:99"])
def test_a_bad_compute_device_is_refused_by_name(bad, tmp_path):
    msg = "bogus" if bad == "bogus" else str(bad)
    with pytest.raises(MergeConfigError, match=msg):
        DeltaFusionMerger(device=bad)
    with pytest.raises(MergeConfigError, match=msg):
        unify(rand(0, 2), device=bad)
    with pytest.raises(MergeConfigError, match=msg):  # refused before the (absent) bundle is looked at
        DeltaFusionMerger.from_pretrained(tmp_path / "no-bundle", device=bad)
    with pytest.raises(MergeConfigError, match=msg):
        list(run_sessions(rand(0, 2)).iter_expert_delta("task0", device=bad))


def test_condu_strategy_passes_its_merge_device_and_refuses_a_bad_one():
    from hf_cft.continual import ConDUStrategy
    from hf_cft.testing import tiny_clip

    with pytest.raises(MergeConfigError, match="meta"):
        ConDUStrategy(merge_device="meta")

    class OnTinyClip(ConDUStrategy):
        _merge_base = tiny_clip(seed=0)  # stands in for the run's θ⁰ (no runner needed to build the merger)

    strategy = OnTinyClip(merge_device="cpu")
    assert strategy.new_merger().device == torch.device("cpu")
    assert "merge_device" not in strategy.settings()  # a runtime choice: a run may resume on another device


def test_one_shot_unify_takes_the_device_option():
    deltas = rand(5, 3)
    a, b = unify(deltas), unify(deltas, device="cpu")
    assert a.lambdas == b.lambdas
    for k in SHAPES:
        assert torch.equal(a.unified[k], b.unified[k])


# Runs only on a machine with a CUDA device (CI pins CPU torch): the same code path with device="cuda".
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unify_on_cuda_matches_the_cpu(monkeypatch):
    cpu = _device_sessions(None, monkeypatch=monkeypatch)
    gpu = _device_sessions("cuda", monkeypatch=monkeypatch)
    assert gpu.device.type == "cuda"
    _assert_same_up_to_rounding(cpu, gpu)
    base = {k: torch.randn(s).cuda() for k, s in DEVICE_SHAPES.items()}
    for name in gpu.task_names:  # experts formed on the GPU: θ⁰ + the CPU's δ̃ exactly
        got = dict(gpu.iter_expert_weights(name, base))
        for k, d in gpu.iter_expert_delta(name, device="cuda"):
            assert d.device.type == "cuda" and got[k].device.type == "cuda"
            assert torch.equal(got[k], base[k] + d)
        assert all(d.device.type == "cpu" for _, d in gpu.iter_expert_delta(name))
    res_cpu, res_gpu = unify(rand(1, 3)), unify(rand(1, 3), device="cuda")
    for k in SHAPES:
        torch.testing.assert_close(res_gpu.unified[k], res_cpu.unified[k], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ pinned rules
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py).


def test_elected_sign_sums_in_fp32_and_is_exactly_plus_or_minus_one():
    """bf16 deltas are summed in fp32 (in bf16, 256 + 1 rounds back to 256 and the sum 256 + 1 − 256 would be 0);
    the sign is ±1 exactly; one delta alone is its own sign."""
    from hf_cft.merging.condu import elected_sign

    ds = [torch.tensor([256.0, 1.0]), torch.tensor([1.0, -2.0]), torch.tensor([-256.0, 1.0])]
    sign = elected_sign([d.bfloat16() for d in ds])
    assert sign.dtype == torch.float32 and sign.tolist() == [1.0, -1.0]  # sums 1 and 0: a zero sum elects −1
    assert elected_sign(ds).tolist() == [1.0, -1.0]
    assert elected_sign([torch.tensor([0.5, -0.5, 0.0])]).tolist() == [1.0, -1.0, -1.0]


def test_unify_checks_its_options_and_names_the_offending_delta():
    d = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    with pytest.raises(MergeConfigError, match="rescaler must be one of"):
        unify([d], rescaler="median")
    with pytest.raises(MergeConfigError, match="rescaler_groups must be one of"):
        unify([d], rescaler_groups="layer")
    with pytest.raises(MergeConfigError, match="needs rescaler='mean'"):  # groups mean nothing to global sums
        unify([d], rescaler="global_sum", rescaler_groups="openai")
    with pytest.raises(TaskError, match=r"^unify\(\) needs at least one delta.$"):
        unify([])
    with pytest.raises(NonFiniteError, match=r"^Tensor 'w' of the delta 0 holds 6 NaN/inf value\(s\).$"):
        unify([{"w": torch.full((2, 3), math.nan), "b": torch.ones(3)}, d])
    with pytest.raises(NonFiniteError, match=r"^Tensor 'b' of the delta 2 holds 1 NaN/inf value\(s\).$"):
        unify([d, d, {"w": torch.ones(2, 3), "b": torch.tensor([1.0, math.inf, 0.0])}])
    with pytest.raises(DeltaError, match=r"^Key 'w' of the delta 1 has shape \(3, 2\), expected \(2, 3\).$"):
        unify([d, {"w": torch.ones(3, 2), "b": torch.ones(3)}])


def test_storage_report_counts_the_prototypes_in_the_bundle():
    m = _merger_with_prototypes()  # prototypes of 2 and 4 classes (task 1 has none), d = 5, fp32
    s = m.storage_bytes()
    assert s["prototypes"] == 4 * 5 * (2 + 4)
    assert s["bundle"] == s["unified"] + s["masks_packed"] + 4 * 5 * 6
    assert s["bundle_bool_masks"] == s["unified"] + s["masks_bool"] + 4 * 5 * 6


def test_hub_bundles_are_downloaded_with_the_revision_and_only_the_bundle_files(tmp_path, monkeypatch):
    """``from_pretrained("user/repo", revision=...)`` asks the Hub for the manifest, the safetensors and the card
    only, at that revision; a failure names the repo and the error's type."""
    import huggingface_hub

    folder = _merger_with_prototypes().save_pretrained(tmp_path / "bundle")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = DeltaFusionMerger.from_pretrained("someone/bundle", revision="v1")
    assert loaded.task_names == ["task0", "task1", "task2"]
    assert calls == [
        ("someone/bundle", {"revision": "v1", "allow_patterns": ["manifest.json", "*.safetensors", "*.md"]})
    ]

    def offline(repo_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        BundleError, match=r"^'someone/bundle' is neither .* Hub repo \(ConnectionError: no network\).$"
    ):
        DeltaFusionMerger.from_pretrained("someone/bundle")


def test_set_prototypes_normalises_replaces_refuses_by_name_and_bumps_the_version(tmp_path):
    """``set_prototypes(name, P)``: P ([C, d], any float dtype) is stored for that task as unit rows in fp32, a
    copy (the caller's tensor is neither kept nor modified), read back by ``prototypes(name)``, replacing earlier
    ones (of any width while no other task has prototypes); the record gets ``has_prototypes`` (so the bundle saves
    and loads them) and ``version`` goes up by one per call. Refused exactly, the merger left as it was: an
    unknown task (naming the held ones), not a non-empty 2-D tensor, NaN/inf, an all-zero row, a row count other
    than the task's class names, a width other than another task's prototypes."""
    d0, d1 = rand(3, 2)
    m = DeltaFusionMerger()
    m.add_task(d0, "a", classnames=["x", "y"])
    m.add_task(d1, "b")
    version = m.version
    assert m.prototypes("a") is None and not m.record("a").has_prototypes
    given = torch.tensor([[3.0, 4.0, 0.0], [0.0, -2.0, 0.0]], dtype=torch.float64)
    m.set_prototypes("a", given)
    got = m.prototypes("a")
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert got.tolist() == [[0.6000000238418579, 0.800000011920929, 0.0], [0.0, -1.0, 0.0]]
    assert given.tolist() == [[3.0, 4.0, 0.0], [0.0, -2.0, 0.0]]  # the caller's tensor is untouched
    assert m.record("a").has_prototypes and not m.record("b").has_prototypes and m.prototypes("b") is None
    assert m.version == version + 1
    mine = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    m.set_prototypes("a", mine)  # replaced, at another width: no other task has prototypes
    assert m.prototypes("a").tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]
    mine.mul_(7.0)
    assert m.prototypes("a").tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]  # a copy
    m.set_prototypes("b", torch.tensor([[0.0, 0.0, 0.0, 0.0, -0.5]], dtype=torch.float16))  # no class names: any C
    assert m.prototypes("b").tolist() == [[0.0, 0.0, 0.0, 0.0, -1.0]] and m.record("b").has_prototypes
    assert m.version == version + 3

    before = {n: m.prototypes(n).clone() for n in ("a", "b")}
    cases = [
        ("zz", torch.ones(2, 5), TaskError, r"^Unknown task 'zz'; the merger holds \['a', 'b'\]\.$"),
        ("a", torch.ones(5), TaskError, r"^Prototypes of task 'a' must be a non-empty \[C, d\] tensor\.$"),
        ("a", torch.ones(0, 5), TaskError, r"^Prototypes of task 'a' must be a non-empty \[C, d\] tensor\.$"),
        ("a", [[1.0, 0.0]], TaskError, r"^Prototypes of task 'a' must be a non-empty \[C, d\] tensor\.$"),
        (
            "a",
            torch.tensor([[1.0, 0, 0, 0, 0], [math.inf, 0, 0, 0, 0]]),
            NonFiniteError,
            r"^Prototypes of task 'a' hold NaN/inf values\.$",
        ),
        (
            "a",
            torch.tensor([[1.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0]]),
            TaskError,
            r"^Prototypes of task 'a' contain an all-zero row \(cannot be normalised\)\.$",
        ),
        ("a", torch.ones(3, 5), TaskError, r"^Task 'a' has 2 class names but 3 prototype rows\.$"),
        ("b", torch.ones(1, 4), TaskError, r"^Prototypes of task 'b' are 4-d but task 'a''s are 5-d\.$"),
    ]
    for name, protos, error, message in cases:
        with pytest.raises(error, match=message):
            m.set_prototypes(name, protos)
        assert m.version == version + 3
        assert all(torch.equal(m.prototypes(n), p) for n, p in before.items())

    m.save_pretrained(tmp_path / "bundle")
    loaded = DeltaFusionMerger.from_pretrained(tmp_path / "bundle")
    assert loaded.record("b").has_prototypes
    assert all(torch.equal(loaded.prototypes(n), p) for n, p in before.items())


def test_repr_names_tasks_keys_and_every_option():
    """``repr(merger)``: its number of tasks and keys, then rescaler, rescaler_groups (a named grouping by its
    name, a mapping or callable as ``'custom'``), lora_merge and strict, in that order."""
    assert repr(DeltaFusionMerger()) == (
        "DeltaFusionMerger(0 tasks, 0 keys, rescaler='mean', rescaler_groups='tensor', lora_merge='dense', "
        "strict=False)"
    )
    m = DeltaFusionMerger(rescaler="global_sum", lora_merge="factors", strict=True)
    for i, d in enumerate(rand(5, 2)):
        m.add_task(d, f"t{i}")
    assert repr(m) == (
        "DeltaFusionMerger(2 tasks, 4 keys, rescaler='global_sum', rescaler_groups='tensor', lora_merge='factors', "
        "strict=True)"
    )
    assert repr(DeltaFusionMerger(rescaler_groups="openai")) == (
        "DeltaFusionMerger(0 tasks, 0 keys, rescaler='mean', rescaler_groups='openai', lora_merge='dense', "
        "strict=False)"
    )
    for groups in ({"w": "g", "b": "g"}, lambda key: "g"):
        assert repr(DeltaFusionMerger(rescaler_groups=groups)) == (
            "DeltaFusionMerger(0 tasks, 0 keys, rescaler='mean', rescaler_groups='custom', lora_merge='dense', "
            "strict=False)"
        )


# ------------------------------------------------------------------------------------------------ tampered bundles


def _bundle_with_base(tmp_path):
    """A saved bundle of a merger built on a small base model (name and fingerprint recorded), four keys, three
    tasks (task1 without prototypes)."""
    base = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(base.weight, 0.5)
    m = DeltaFusionMerger(base_model=base, base_model_name_or_path="org/base", rescaler="global_sum")
    for i, d in enumerate(rand(4, 3)):
        protos = torch.randn(2 + i, 5) if i != 1 else None
        m.add_task(d, f"task{i}", prototypes=protos, classnames=[f"c{j}" for j in range(2 + i)], templates=["{}"])
    return m, base, m.save_pretrained(tmp_path / "b")


def _rewrite(folder, name, edit):
    from safetensors.torch import load_file, save_file

    tensors = dict(load_file(str(folder / name)))
    edit(tensors)
    save_file(tensors, str(folder / name))


def _manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


TAMPERS = {
    "no config": (lambda f: _manifest(f, lambda m: m.pop("config")), r"malformed manifest.json \(KeyError\('config'\)\)."),
    "task orders": (lambda f: _manifest(f, lambda m: m["tasks"][1].update(order=0)),
                    "task order/names in manifest.json are inconsistent."),
    "task names": (lambda f: _manifest(f, lambda m: m["tasks"][1].update(name="task0")),
                   "task order/names in manifest.json are inconsistent."),
    "negative λ": (lambda f: _manifest(f, lambda m: m["tasks"][2].update(lam=-1.0)),
                   r"task 'task2' has an invalid rescaler λ=-1.0."),
    "text λ": (lambda f: _manifest(f, lambda m: m["tasks"][2].update(lam="1")), r"task 'task2' has an invalid rescaler λ='1'."),
    "extra unified key": (lambda f: _rewrite(f, "unified.safetensors", lambda t: t.update(z=torch.zeros(1))),
                          "unified.safetensors and the manifest disagree on key 'z'."),
    "missing unified key": (lambda f: _rewrite(f, "unified.safetensors", lambda t: t.pop("b")),
                            "unified.safetensors and the manifest disagree on key 'b'."),
    "fp16 unified": (lambda f: _rewrite(f, "unified.safetensors", lambda t: t.update(b=t["b"].half())),
                     r"unified tensor 'b' is torch.float16 \(7,\), expected fp32 \(7,\)."),
    "reshaped unified": (lambda f: _rewrite(f, "unified.safetensors", lambda t: t.update(b=torch.zeros(1, 7))),
                         r"unified tensor 'b' is torch.float32 \(1, 7\), expected fp32 \(7,\)."),
    "nan unified": (lambda f: _rewrite(f, "unified.safetensors", lambda t: t["b"].__setitem__(0, float("nan"))),
                    "unified tensor 'b' holds NaN/inf."),
    "missing mask": (lambda f: _rewrite(f, "masks.safetensors", lambda t: t.pop("1/w")),
                     "mask of task 'task1' for key 'w' is missing or malformed."),
    "int32 mask": (lambda f: _rewrite(f, "masks.safetensors", lambda t: t.update({"1/w": t["1/w"].int()})),
                   "mask of task 'task1' for key 'w' is missing or malformed."),
    "2-d mask": (lambda f: _rewrite(f, "masks.safetensors", lambda t: t.update({"1/w": t["1/w"][None]})),
                 "mask of task 'task1' for key 'w' is missing or malformed."),
    "short mask": (lambda f: _rewrite(f, "masks.safetensors", lambda t: t.update({"1/w": t["1/w"][:-1]})),
                   "mask of task 'task1' for key 'w' is missing or malformed."),
    "extra mask": (lambda f: _rewrite(f, "masks.safetensors", lambda t: t.update({"3/w": t["0/w"].clone()})),
                   "masks.safetensors holds masks the manifest does not list."),
    "unexpected prototypes": (lambda f: _rewrite(f, "prototypes.safetensors", lambda t: t.update({"1": torch.ones(2, 5)})),
                              "prototypes of task 'task1' missing or unexpected."),
    "missing prototypes": (lambda f: _rewrite(f, "prototypes.safetensors", lambda t: t.pop("2")),
                           "prototypes of task 'task2' missing or unexpected."),
    "1-d prototypes": (lambda f: _rewrite(f, "prototypes.safetensors", lambda t: t.update({"2": torch.ones(5)})),
                       "prototypes of task 'task2' are malformed."),
    "nan prototypes": (lambda f: _rewrite(f, "prototypes.safetensors", lambda t: t["2"].__setitem__((0, 0), float("inf"))),
                       "prototypes of task 'task2' are malformed."),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_tampered_bundle_is_refused_naming_the_folder_and_the_culprit(case, tmp_path):
    """With verify=False (no checksum to catch the edit) every inconsistency between the manifest and the tensor
    files is still a BundleError that starts with the bundle's folder."""
    import re

    _, _, folder = _bundle_with_base(tmp_path)
    tamper, message = TAMPERS[case]
    tamper(folder)
    with pytest.raises(BundleError, match=rf"^Bundle {re.escape(repr(str(folder)))}: {message}"):
        DeltaFusionMerger.from_pretrained(folder, verify=False)


def test_a_bundle_keeps_its_base_model_name_and_fingerprint_and_checks_a_given_base(tmp_path):
    """The base model's name and fingerprint come back from the manifest; a given base model with that fingerprint
    is attached, another one is refused naming both fingerprints; a zero rescaler (a collapsed task) loads."""
    import re

    m, base, folder = _bundle_with_base(tmp_path)
    loaded = DeltaFusionMerger.from_pretrained(folder)
    assert loaded.base_model_name_or_path == "org/base" and loaded.base_fingerprint == m.base_fingerprint is not None
    assert loaded.base_model is None
    assert DeltaFusionMerger.from_pretrained(folder, base_model=base).base_model is base
    other = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(other.weight, -0.5)
    from hf_cft.merging.deltas import base_fingerprint

    with pytest.raises(
        DeltaError,
        match=rf"^Bundle {re.escape(repr(str(folder)))} was built on another base model \(fingerprint "
        rf"{m.base_fingerprint}, given model {base_fingerprint(other)}\).$",
    ):
        DeltaFusionMerger.from_pretrained(folder, base_model=other)
    _manifest(folder, lambda man: man["tasks"][0].update(lam=0.0))
    assert DeltaFusionMerger.from_pretrained(folder, verify=False).tasks[0].lam == 0.0


def _resign(edit):
    """A manifest edit followed by a fresh manifest checksum (the edit passes verification's first check)."""
    from hf_cft.merging.condu import MANIFEST_CHECKSUM, _manifest_digest

    def apply(manifest):
        edit(manifest)
        manifest[MANIFEST_CHECKSUM] = _manifest_digest(manifest)

    return apply


VERIFIED_TAMPERS = {
    "no manifest checksum": (lambda f: _manifest(f, lambda m: m.pop("manifest_sha256")),
                             r": manifest.json has no checksum \(manifest_sha256\): it was edited or is corrupt; "
                             r"re-save the bundle \(or load with verify=False to accept it as is\).$"),
    "edited manifest": (lambda f: _manifest(f, lambda m: m["tasks"][0].update(lam=2.0)),
                        r": manifest.json does not match its checksum \(manifest_sha256\): it was edited or is corrupt; "),
    "no files": (lambda f: _manifest(f, _resign(lambda m: m.pop("files"))), r": manifest.json has no 'files' checksums.$"),
    "a file's checksum missing": (lambda f: _manifest(f, _resign(lambda m: m["files"].pop("masks.safetensors"))),
                                  r": manifest.json has no checksum for masks.safetensors in 'files'.$"),
    "another format": (lambda f: _manifest(f, _resign(lambda m: m.update(format="other"))),
                       r": manifest.json is not a hf_cft.condu_bundle manifest.$"),
    "a newer version": (lambda f: _manifest(f, _resign(lambda m: m.update(format_version=99))),
                        r" has format version 99; this hf_cft reads 1.$"),
    "changed tensors": (lambda f: _rewrite(f, "unified.safetensors", lambda t: t["b"].mul_(2)),
                        r": unified.safetensors does not match the checksum in manifest.json \(corrupt, or a save was "
                        r"interrupted\).$"),
    "no unified file": (lambda f: (f / "unified.safetensors").unlink(), r" lacks unified.safetensors.$"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(VERIFIED_TAMPERS))
def test_verification_refuses_each_kind_of_edit_naming_the_folder(case, tmp_path):
    import re

    _, _, folder = _bundle_with_base(tmp_path)
    tamper, message = VERIFIED_TAMPERS[case]
    tamper(folder)
    with pytest.raises(BundleError, match=rf"^Bundle {re.escape(repr(str(folder)))}{message}"):
        DeltaFusionMerger.from_pretrained(folder)


def test_a_missing_manifest_and_a_committed_staging_folder(tmp_path):
    """No manifest: not a bundle, named. A save killed after its commit point left the new bundle in the staging
    folder: loading reads it from there; a staging folder that is a symlink (not a save of this bundle) is never
    followed."""
    import re
    import shutil

    from hf_cft.merging.condu import STAGING_DIR

    m, _, folder = _bundle_with_base(tmp_path)
    other = _merger_with_prototypes()
    other_folder = other.save_pretrained(tmp_path / "other")
    shutil.copytree(other_folder, folder / STAGING_DIR)
    assert DeltaFusionMerger.from_pretrained(folder).tasks == other.tasks
    shutil.rmtree(folder / STAGING_DIR)
    (folder / STAGING_DIR).symlink_to(other_folder, target_is_directory=True)
    assert DeltaFusionMerger.from_pretrained(folder).tasks == m.tasks
    (folder / STAGING_DIR).unlink()
    (folder / "manifest.json").unlink()
    with pytest.raises(
        BundleError, match=rf"^{re.escape(repr(str(folder)))} is not a ConDU bundle: manifest.json is missing.$"
    ):
        DeltaFusionMerger.from_pretrained(folder)


def test_config_dict_refusals_and_an_unknown_mask_key():
    from hf_cft.errors import MergeConfigError
    from hf_cft.merging.condu import DeltaFusionMergerConfig

    with pytest.raises(MergeConfigError, match=r"^Unknown DeltaFusionMergerConfig option\(s\): \['scale', 'zeta'\].$"):
        DeltaFusionMergerConfig.from_dict({"rescaler": "mean", "zeta": 1, "scale": 2})
    with pytest.raises(
        MergeConfigError,
        match=r"^rescaler_groups is a callable that no task has resolved yet; add a task \(or pass a mapping\) first.$",
    ):
        DeltaFusionMergerConfig(rescaler_groups=lambda key: key.split(".")[0]).to_dict()
    assert "rescaler_groups" not in DeltaFusionMergerConfig().to_dict()  # the default stays out of bundles
    m = _merger_with_prototypes()
    with pytest.raises(DeltaError, match=r"^Unknown delta key 'nope'.$"):
        m.mask("task0", "nope")


def test_functional_expert_from_a_stream_of_pairs_checks_each_key_as_it_comes():
    """FunctionalExpert given (key, δ) pairs (or a dict with check=False) forms θ⁰ + s·δ per key like the checked
    dict form; an unknown key or a shape mismatch in the stream is refused naming it."""
    from hf_cft.merging.deltas import FunctionalExpert

    model = torch.nn.Linear(3, 2)
    delta = {"weight": torch.ones(2, 3), "bias": torch.full((2,), 0.5)}
    checked = FunctionalExpert(model, delta, scale=2.0)
    for source in (iter(delta.items()), delta):
        streamed = FunctionalExpert(model, source, scale=2.0, check=False)
        assert set(streamed.params) == {"weight", "bias"}
        for k in delta:
            torch.testing.assert_close(streamed.params[k], checked.params[k])
            torch.testing.assert_close(streamed.params[k], dict(model.named_parameters())[k].detach() + 2.0 * delta[k])
    with pytest.raises(DeltaError, match=r"^Delta key 'nope' is not a parameter or buffer of Linear.$"):
        FunctionalExpert(model, iter([("nope", torch.ones(1))]), check=False)
    with pytest.raises(DeltaError, match=r"^Delta key 'bias' has shape \(3,\), not the model's of Linear.$"):
        FunctionalExpert(model, iter([("bias", torch.ones(3))]), check=False)


def test_saving_needs_a_task_makes_parent_folders_and_survives_a_reordered_manifest(tmp_path):
    """An empty merger has nothing to save; a bundle folder's missing parents are made; the manifest records the
    masks' bit order; a manifest rewritten with its keys in another order still verifies (its checksum is over
    the sorted keys); a loaded merger keeps its keys' shapes for the next task."""
    with pytest.raises(TaskError, match=r"^Nothing to save: no task was added to the merger.$"):
        DeltaFusionMerger().save_pretrained(tmp_path / "empty")
    m = _merger_with_prototypes()
    folder = m.save_pretrained(tmp_path / "a" / "b" / "bundle")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["mask_bit_order"] == "big"
    (folder / "manifest.json").write_text(json.dumps(dict(reversed(list(manifest.items())))))
    loaded = DeltaFusionMerger.from_pretrained(folder)
    (wrong,) = rand(3, 1, shapes={"w": (6, 5), "b": (8,), "t": (2, 3, 4), "s": (1,)})
    with pytest.raises(DeltaError, match="'b'"):
        loaded.add_task(wrong, "next")


# ------------------------------------------------ exact refusals, the version counter (pinned by mutation tests)


def test_version_counts_sessions_and_prototype_changes_and_a_load_starts_at_one(tmp_path):
    """``version`` (routers drop cached heads when it changes): 0 when new, +1 per add_task and per
    set_prototypes, 1 after a load; ``expert_delta`` carries the merger's base fingerprint."""
    base = torch.nn.Linear(3, 2)
    m = DeltaFusionMerger(base_model=base)
    assert m.version == 0
    shapes = {"weight": (2, 3), "bias": (2,)}
    for i, d in enumerate(rand(5, 2, shapes)):
        m.add_task(TaskDelta(d, base_fingerprint=m.base_fingerprint), f"t{i}")
        assert m.version == i + 1
    m.set_prototypes("t0", torch.randn(2, 4))
    assert m.version == 3
    expert = m.expert_delta("t1")
    assert expert.base_fingerprint == m.base_fingerprint is not None and sorted(expert) == ["bias", "weight"]
    assert DeltaFusionMerger.from_pretrained(m.save_pretrained(tmp_path / "b")).version == 1


def test_add_task_refusals_name_the_task_exactly(tmp_path):
    """A LoRA adapter without base_model, an object that is no delta, a NaN in a dict or a streamed delta, an
    all-zero prototype row, a strict collapse: each refused naming the task, with the exact message; after an
    interrupted session every use names the interruption."""
    from hf_cft.merging import LazyDelta, save_delta

    m = DeltaFusionMerger()
    (tmp_path / "adapter").mkdir()
    refusals = [
        (tmp_path / "adapter", DeltaError, "Task 'x' was given as a LoRA adapter; the merger needs base_model= to turn "
         "it into a delta (or pass delta_from_lora(adapter, base_model))."),
        (3, DeltaError, "Task 'x': expected a delta (dict of tensors), a PeftModel or an adapter folder, got int."),
        ({"w": torch.tensor([1.0, math.nan])}, NonFiniteError,
         "Tensor 'w' of the delta of task 'x' holds 1 NaN/inf value(s)."),
    ]  # fmt: skip
    for delta, error, message in refusals:
        with pytest.raises(error) as err:
            m.add_task(delta, "x")
        assert str(err.value) == message
    save_delta({"w": torch.ones(2)}, tmp_path / "ok.safetensors")
    lazy = LazyDelta({"w": (2,)}, lambda key: torch.tensor([math.inf, 1.0]))
    with pytest.raises(NonFiniteError) as err:
        m.add_task(lazy, "x")
    assert str(err.value) == "Tensor 'w' of lazy delta holds 1 NaN/inf value(s). (the delta of task 'x')"
    with pytest.raises(TaskError) as err:
        m.add_task(tmp_path / "ok.safetensors", "x", prototypes=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert str(err.value) == "Prototypes of task 'x' contain an all-zero row (cannot be normalised)."
    strict = DeltaFusionMerger(strict=True)
    with pytest.raises(TaskError) as err:
        strict.add_task({"w": torch.zeros(2)}, "zero")
    assert str(err.value) == (
        "strict=True: the trigger of task(s) ['zero'] would collapse (all-zero delta, or no entry agreeing with the "
        "elected sign; λ would be 0/0 or x/0). Nothing was changed."
    )
    assert len(strict) == 0
    with pytest.warns(CollapsedTaskWarning) as caught:
        DeltaFusionMerger().add_task({"w": torch.zeros(2)}, "zero")
    assert str(caught[0].message) == (
        "ConDU trigger of task(s) ['zero'] collapsed (all-zero delta, or no entry agrees with the elected sign): "
        "λ = 0, so the decoupled expert is θ⁰ (condu.md §3)."
    )
    m.add_task({"w": torch.ones(2), "v": torch.ones(1)}, "a")
    calls = []

    def flaky(key):  # the second key of the session cannot be read
        calls.append(key)
        if len(calls) > 2:
            raise OSError("disk gone")
        return torch.ones(shapes[key])

    shapes = {"w": (2,), "v": (1,)}
    with pytest.raises(OSError, match="disk gone"):
        m.add_task(LazyDelta(shapes, flaky), "b")
    interrupted = (
        "A previous add_task() was interrupted while it rewrote the unified delta; this merger is inconsistent. "
        "Reload the last saved bundle with DeltaFusionMerger.from_pretrained()."
    )
    for use in (lambda: m.unified_delta, lambda: m.add_task({"w": torch.ones(2), "v": torch.ones(1)}, "c"),
                lambda: m.expert_delta("a")):  # fmt: skip
        with pytest.raises(TaskError) as err:
            use()
        assert str(err.value) == interrupted


def test_a_committed_staging_folder_is_read_from_there_and_a_symlinked_one_never(tmp_path):
    """The staging folder of a save killed after its commit point holds the newer bundle (here one with other
    tasks): it is what loads; the same bundle behind a symlink is never followed."""
    import shutil

    from hf_cft.merging.condu import STAGING_DIR

    m, _, folder = _bundle_with_base(tmp_path)
    newer = DeltaFusionMerger(rescaler="global_sum")
    for i, d in enumerate(rand(9, 2)):
        newer.add_task(d, f"newer{i}")
    newer_folder = newer.save_pretrained(tmp_path / "newer")
    shutil.copytree(newer_folder, folder / STAGING_DIR)
    loaded = DeltaFusionMerger.from_pretrained(folder)
    assert loaded.task_names == ["newer0", "newer1"]
    torch.testing.assert_close(loaded.unified_delta, newer.unified_delta, rtol=0, atol=0)
    shutil.rmtree(folder / STAGING_DIR)
    (folder / STAGING_DIR).symlink_to(newer_folder, target_is_directory=True)
    assert DeltaFusionMerger.from_pretrained(folder).task_names == m.task_names == ["task0", "task1", "task2"]


def test_decoupled_forms_lambda_times_u_in_float64_and_rounds_once():
    """δ̃ = λ·M⊙u: the product in float64 rounded once to fp32, not λ rounded to fp32 first (the two differ on
    some entries; the first keeps the experts' L1 mass exact over many sessions)."""
    u = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(4096, generator=torch.Generator().manual_seed(1)) < 0.5
    lam = 1 / 3
    got = condu_mod._decoupled(u, mask, lam)
    want = torch.where(mask, (u.double() * lam).float(), torch.zeros(()))
    assert torch.equal(got, want)
    assert not torch.equal(torch.where(mask, u * lam, torch.zeros(())), want)  # fp32 λ·u is told apart


def test_unreadable_manifest_and_bundle_files_name_the_bundle(tmp_path):
    m = _merger_with_prototypes()
    folder = m.save_pretrained(tmp_path / "b")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError) as err:
        DeltaFusionMerger.from_pretrained(folder)
    manifest = folder / "manifest.json"
    assert str(err.value).startswith(f"Bundle {str(folder)!r}: manifest.json: {str(manifest)!r} is not valid JSON (")
    folder = m.save_pretrained(tmp_path / "c")
    (folder / "unified.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BundleError) as err:
        DeltaFusionMerger.from_pretrained(folder, verify=False)
    assert str(err.value).startswith(f"Bundle {str(folder)!r}: cannot read unified.safetensors (")


def _groups_of_a_and_b(spec):
    from hf_cft.merging.condu import resolve_rescaler_groups

    return resolve_rescaler_groups(spec, ["a", "b"])


def test_compute_device_slice_size_rescaler_groups_and_config_refusals_are_exact():
    from hf_cft.merging.condu import DeltaFusionMergerConfig, _rescalers, _unify_key, compute_device

    refusals = [
        (lambda: compute_device(3), "device must be a device name such as 'cpu' or 'cuda:0' (or a torch.device), got "
         "int 3."),
        (lambda: compute_device("meta"), "device 'meta': meta tensors hold no values, so nothing can be unified on "
         "them; use 'cpu' or 'cuda'."),
        (lambda: _groups_of_a_and_b({"a": 3, "b": ""}), "rescaler_groups gives delta key 'a' the group 3, not a name."),
        (lambda: _groups_of_a_and_b({"a": "g", "b": ""}), "rescaler_groups gives delta key 'b' the group '', not a name."),
        (lambda: _groups_of_a_and_b(3), "rescaler_groups must be a string, a mapping or a callable, got int."),
        (lambda: DeltaFusionMergerConfig(rescaler_groups=3), "rescaler_groups must be a string, a mapping or a "
         "callable, got int."),
        (lambda: DeltaFusionMergerConfig(rescaler="global_sum", rescaler_groups="openai"), "rescaler_groups='openai' "
         "needs rescaler='mean': the 'global_sum' rescaler sums over every entry, so grouping tensors changes nothing."),
        (lambda: DeltaFusionMergerConfig(strict=1), "strict must be a bool, got 1."),
    ]  # fmt: skip
    for call, message in refusals:
        with pytest.raises(MergeConfigError) as err:
            call()
        assert str(err.value) == message
    if not torch.cuda.is_available():
        with pytest.raises(MergeConfigError) as err:
            compute_device("cuda")
        assert str(err.value) == "device 'cuda': CUDA is not available on this machine."
    for bad in (0, 7, -8):
        with pytest.raises(ValueError) as err:
            _unify_key(lambda i, lo, hi: torch.ones(hi - lo), 1, (16,), "mean", slice_size=bad)
        assert str(err.value) == f"slice_size must be a positive multiple of 8, got {bad}"
    # λ = num/den needs both positive and a finite ratio: 0/1 collapses, so does 1e300/1e-10 (inf)
    assert _rescalers([0.0, 1e300, 3.0], [1.0, 1e-10, 2.0]) == ([0.0, 0.0, 1.5], [True, True, False])


def test_merger_options_override_a_given_config_and_the_base_name_comes_from_its_config():
    from types import SimpleNamespace

    from hf_cft.merging.condu import DeltaFusionMergerConfig

    m = DeltaFusionMerger(config=DeltaFusionMergerConfig(rescaler="mean", strict=True), rescaler="global_sum")
    assert (m.config.rescaler, m.config.strict) == ("global_sum", True)
    base = torch.nn.Linear(2, 2)
    base.config = SimpleNamespace(_name_or_path="org/clip")
    assert DeltaFusionMerger(base_model=base).base_model_name_or_path == "org/clip"
    base.config = SimpleNamespace(_name_or_path="", name_or_path="org/other")
    assert DeltaFusionMerger(base_model=base).base_model_name_or_path == "org/other"
    assert DeltaFusionMerger(base_model=base, base_model_name_or_path="mine").base_model_name_or_path == "mine"
    assert DeltaFusionMerger(base_model=torch.nn.Linear(2, 2)).base_model_name_or_path is None
    assert DeltaFusionMerger().base_model_name_or_path is None


def test_task_names_must_be_non_empty_strings_exactly(tmp_path):
    m = DeltaFusionMerger()
    for bad in ("", "  ", 3, None):
        with pytest.raises(TaskError) as err:
            m.add_task({"w": torch.ones(2)}, bad)
        assert str(err.value) == f"Task names must be non-empty strings, got {bad!r}."
    assert len(m) == 0
    # bundle checksums are the sha256 of the whole file, read in chunks (here one of 9 MiB: three chunks)
    import hashlib

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (9 * 4096))
    assert condu_mod._sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()
