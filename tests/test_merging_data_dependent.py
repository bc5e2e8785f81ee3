"""RegMean and Fisher merging (hf_cft.merging.data_dependent) against references written here from the papers'
definitions: Gram matrices from an explicit forward pass and the closed form solved with NumPy; Fisher diagonals from
the analytic per-example gradient of a softmax classifier. Plus the CLIP path (hooks on the image tower, the
zero-shot log-probabilities) and bad input."""

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from hf_cft.errors import DatasetFormatError, DeltaError, MergeConfigError, TaskError
from hf_cft.merging import apply_delta, delta_from_models
from hf_cft.merging.data_dependent import (
    LinearGrams,
    clip_log_probs,
    fisher_diagonal,
    fisher_merge,
    fisher_merging,
    linear_input_grams,
    regmean,
    regmean_merge,
)
from hf_cft.testing import tiny_clip


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def forward(model, batch):
    return model(batch["x"])


def batches(seed, n=3, b=6):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(b, 4, generator=g), "labels": torch.randint(0, 3, (b,), generator=g)} for _ in range(n)]


def ref_regmean_weight(weights, inputs, alpha):
    """W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹, G_t = X_tᵀX_t with its off-diagonal entries scaled by α (explicit loops)."""
    num, den = 0, 0
    for w, x in zip(weights, inputs):
        g = x.T @ x
        gt = g.copy()
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                if i != j:
                    gt[i, j] = alpha * g[i, j]
        num = num + w @ gt
        den = den + gt
    return num @ np.linalg.inv(den)


@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_regmean_matches_the_closed_form_from_explicit_inputs(alpha):
    base = mlp(0)
    models = [mlp(s) for s in (1, 2)]
    data = [batches(10), batches(11)]
    merged = regmean_merge(base, models, data, alpha=alpha, forward=forward, keys=None)
    inputs1, inputs2 = [], []
    for m, d in zip(models, data):
        x = torch.cat([b["x"] for b in d]).double().numpy()
        inputs1.append(x)
        h = np.tanh(x @ m[0].weight.detach().double().numpy().T + m[0].bias.detach().double().numpy())
        inputs2.append(h)
    for key, inputs, idx in (("0.weight", inputs1, 0), ("2.weight", inputs2, 2)):
        ws = [m[idx].weight.detach().double().numpy() for m in models]
        expected = ref_regmean_weight(ws, inputs, alpha) - base[idx].weight.detach().double().numpy()
        np.testing.assert_allclose(merged[key].double().numpy(), expected, atol=1e-5, rtol=1e-4)
    for key in ("0.bias", "2.bias"):  # no Gram: the plain mean of the deltas
        expected = sum(dict(m.named_parameters())[key] - dict(base.named_parameters())[key] for m in models) / 2
        torch.testing.assert_close(merged[key], expected.detach())


def test_regmean_at_alpha_one_solves_the_least_squares_problem():
    g = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(3, 4, generator=g)} for _ in range(3)]
    xs = [torch.randn(20, 4, generator=g).double() for _ in range(3)]
    grams = [{"w": x.T @ x} for x in xs]
    merged = regmean(deltas, grams, alpha=1.0)["w"].double()
    # the normal equations of min Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²: Σ_t (W − W_t) G_t = 0
    residual = sum((merged - d["w"].double()) @ gr["w"] for d, gr in zip(deltas, grams))
    assert float(residual.abs().max()) < 1e-4
    # with identical Gram matrices RegMean is the plain average
    same = regmean(deltas, [grams[0]] * 3, alpha=0.6)["w"]
    torch.testing.assert_close(same, sum(d["w"] for d in deltas) / 3, atol=1e-5, rtol=1e-5)


def test_regmean_one_task_and_zero_deltas():
    g = torch.Generator().manual_seed(1)
    d = {"w": torch.randn(3, 4, generator=g)}
    x = torch.randn(10, 4, generator=g).double()
    torch.testing.assert_close(regmean([d], [{"w": x.T @ x}])["w"], d["w"], atol=1e-5, rtol=1e-5)
    zero = regmean([{"w": torch.zeros(3, 4)}] * 2, [{"w": x.T @ x}] * 2)["w"]
    assert torch.equal(zero, torch.zeros(3, 4))
    # an input feature that is always 0: singular Σ G̃ at α = 1, solved by the pseudo-inverse (finite)
    x0 = x.clone()
    x0[:, 0] = 0
    out = regmean([d, d], [{"w": x0.T @ x0}] * 2, alpha=1.0)["w"]
    assert torch.isfinite(out).all()


def test_regmean_bad_input_names_the_key():
    d = {"w": torch.ones(3, 4), "b": torch.ones(3)}
    gram = {"w": torch.eye(4)}
    with pytest.raises(DeltaError, match="'w'.*task\\(s\\) \\[1\\]"):
        regmean([d, d], [gram, {}])
    with pytest.raises(DeltaError, match="'w'.*shape"):
        regmean([d, d], [gram, {"w": torch.eye(3)}])
    with pytest.raises(DeltaError, match="'b'"):
        regmean([d, d], [{"b": torch.eye(3)}] * 2)
    with pytest.raises(TaskError, match="2 task deltas"):
        regmean([d, d], [gram])
    with pytest.raises(MergeConfigError, match="alpha"):
        regmean([d, d], [gram, gram], alpha=1.5)
    with pytest.raises(DeltaError, match="'b'"):
        regmean([d, {"w": torch.ones(3, 4)}], [gram, gram])


def test_regmean_normalize_uses_the_per_row_average():
    d1, d2 = {"w": torch.ones(2, 2)}, {"w": -torch.ones(2, 2)}
    g = LinearGrams(grams={"w": 10 * torch.eye(2, dtype=torch.float64)}, rows={"w": 10})
    h = LinearGrams(grams={"w": 2 * torch.eye(2, dtype=torch.float64)}, rows={"w": 2})
    torch.testing.assert_close(regmean([d1, d2], [g, h], alpha=1.0)["w"], torch.full((2, 2), 8 / 12))
    torch.testing.assert_close(regmean([d1, d2], [g, h], alpha=1.0, normalize=True)["w"], torch.zeros(2, 2))


def test_linear_input_grams_on_clip_runs_the_image_tower_and_follows_the_delta():
    clip = tiny_clip(seed=0)
    px = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    data = [{"pixel_values": px, "labels": torch.tensor([0, 1])}]
    grams = linear_input_grams(clip, data)
    assert grams.keys() and all(k.startswith(("vision_model.", "visual_projection")) for k in grams)
    q = grams["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (32, 32) and torch.allclose(q, q.T)
    assert grams.rows["vision_model.encoder.layers.0.self_attn.q_proj.weight"] == 2 * (15 * 15 + 1)  # tokens
    delta = {"vision_model.encoder.layers.0.mlp.fc1.weight": 0.3 * torch.ones(37, 32)}
    moved = linear_input_grams(clip, data, delta=delta)
    copy_model = apply_delta(copy.deepcopy(clip), delta)
    expected = linear_input_grams(copy_model, data)
    key = "vision_model.encoder.layers.0.mlp.fc2.weight"  # after the changed fc1
    torch.testing.assert_close(moved[key], expected[key])
    assert not torch.allclose(moved[key], grams[key])
    with pytest.raises(DatasetFormatError, match="no batch"):
        linear_input_grams(clip, [])


def ref_fisher_linear(w, b, xs, ys=None, probs_weighted=False):
    """Diagonal Fisher of log softmax(W x + b): ∂log p_y/∂W = (e_y − p) xᵀ, ∂/∂b = e_y − p (analytic)."""
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for i, x in enumerate(xs):
        z = w @ x + b
        p = np.exp(z - z.max())
        p /= p.sum()
        classes = range(len(b)) if probs_weighted else [ys[i]]
        for c in classes:
            weight = p[c] if probs_weighted else 1.0
            e = np.zeros_like(b)
            e[c] = 1
            gb = e - p
            fw += weight * np.outer(gb, x) ** 2
            fb += weight * gb**2
    return fw / len(xs), fb / len(xs)


@pytest.mark.parametrize("labels", ["empirical", "expected"])
def test_fisher_diagonal_matches_the_analytic_gradient(labels):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = batches(5)
    f = fisher_diagonal(model, data, forward, labels=labels)
    xs = torch.cat([b["x"] for b in data]).double().numpy()
    ys = torch.cat([b["labels"] for b in data]).tolist()
    fw, fb = ref_fisher_linear(
        model.weight.detach().double().numpy(), model.bias.detach().double().numpy(), xs, ys, labels == "expected"
    )
    np.testing.assert_allclose(f["weight"].double().numpy(), fw, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(f["bias"].double().numpy(), fb, atol=1e-6, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # flags untouched


def test_fisher_sampled_labels_converge_to_the_expectation_and_respect_the_delta():
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    x = torch.randn(1, 4)
    data = [{"x": x.repeat(300, 1)}]
    sampled = fisher_diagonal(model, data, forward, labels="sample", seed=3)
    exact = fisher_diagonal(model, data, forward, labels="expected")
    torch.testing.assert_close(sampled["bias"], exact["bias"], atol=0.02, rtol=0.15)
    delta = {"bias": torch.tensor([2.0, 0.0, -1.0])}
    moved = fisher_diagonal(model, data[:1], forward, labels="expected", delta=delta)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.bias += delta["bias"]
    torch.testing.assert_close(moved["bias"], fisher_diagonal(shifted, data, forward, labels="expected")["bias"])


def test_fisher_merging_matches_the_weighted_formula():
    g = torch.Generator().manual_seed(2)
    deltas = [{"w": torch.randn(3, 2, generator=g)} for _ in range(3)]
    fishers = [{"w": torch.rand(3, 2, generator=g)} for _ in range(3)]
    lam = [1.0, 0.5, 2.0]
    out = fisher_merging(deltas, fishers, weights=lam, floor=1e-6)["w"]
    num = sum(w * (f["w"].double() + 1e-6) * d["w"].double() for w, f, d in zip(lam, fishers, deltas))
    den = sum(w * (f["w"].double() + 1e-6) for w, f in zip(lam, fishers))
    torch.testing.assert_close(out.double(), num / den, atol=1e-6, rtol=1e-5)
    # a huge Fisher wins its entry; an entry no data touched falls back to the weighted average
    big = [{"w": torch.tensor([[1e6, 0.0]])}, {"w": torch.tensor([[0.0, 0.0]])}]
    two = [{"w": torch.tensor([[1.0, 1.0]])}, {"w": torch.tensor([[-1.0, 3.0]])}]
    torch.testing.assert_close(fisher_merging(two, big)["w"], torch.tensor([[1.0, 2.0]]), atol=1e-5, rtol=1e-5)
    normalized = fisher_merging(
        two, [{"w": torch.tensor([[3.0, 4.0]])}, {"w": torch.tensor([[6.0, 8.0]])}], normalize=True
    )
    torch.testing.assert_close(normalized["w"], torch.tensor([[0.0, 2.0]]), atol=1e-5, rtol=1e-5)


def test_fisher_merging_normalize_adds_the_floor_before_dividing_by_the_norm():
    """normalize=True is FusionBench's normalize_fisher_weight: task t weighs λ_t·(F_t + floor)/(‖F_t‖ + floor).
    A task whose Fisher is tiny (all entries near the floor) gets the floor's weight, not its shape's."""
    deltas = [{"w": torch.tensor([[1.0, 1.0]])}, {"w": torch.tensor([[-1.0, 3.0]])}]
    fishers = [{"w": torch.tensor([[3e-6, 4e-6]])}, {"w": torch.tensor([[6.0, 8.0]])}]
    floor = 1e-6
    weights = [(f["w"].double() + floor) / (float(f["w"].double().norm()) + floor) for f in fishers]
    want = sum(w * d["w"].double() for w, d in zip(weights, deltas)) / sum(weights)
    got = fisher_merging(deltas, fishers, floor=floor, normalize=True)["w"]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    assert abs(float(got[0, 0]) - 0.0526) < 1e-3  # dividing F by its norm first would give 0 (equal weights)
    # without a floor the two placements agree: F_t / ‖F_t‖
    got = fisher_merging(deltas, fishers, floor=0.0, normalize=True)["w"]
    torch.testing.assert_close(got, torch.tensor([[0.0, 2.0]]), atol=1e-5, rtol=1e-5)


def test_fisher_merging_bad_input():
    d = {"w": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(DeltaError, match="'w'.*task\\(s\\) \\[1\\]"):
        fisher_merging([d, d], [{"w": torch.ones(2)}, {}])
    with pytest.raises(DeltaError, match="'w'.*negative"):
        fisher_merging([d, d], [{"w": -torch.ones(2)}] * 2)
    with pytest.raises(MergeConfigError, match="floor"):
        fisher_merging([d, d], [{"w": torch.zeros(2)}] * 2, floor=0.0)
    with pytest.raises(TaskError):
        fisher_merging([d, d], [{"w": torch.ones(2)}])
    with pytest.raises(MergeConfigError, match="labels"):
        fisher_diagonal(nn.Linear(4, 3), batches(0), forward, labels="hard")
    with pytest.raises(DeltaError, match="'nope'"):
        fisher_diagonal(nn.Linear(4, 3), batches(0), forward, keys=["nope"])


def _tiny_clip_experts(seeds=(1, 2)):
    """A tiny CLIP θ⁰ and copies of it whose image encoder moved by seeded noise (one per seed)."""
    base = tiny_clip(seed=0)
    experts = []
    for s in seeds:
        e = copy.deepcopy(base)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for name, p in e.named_parameters():
                if name.startswith("vision_model.encoder"):
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        experts.append(e)
    return base, experts


def test_fisher_and_regmean_merge_tiny_clip_experts(toy_tokenizer):
    base, experts = _tiny_clip_experts()
    px = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(5))
    data = [{"pixel_values": px, "labels": torch.tensor([0, 1, 2, 0])}]
    names, templates = ["cat", "dog", "bird"], ["a photo of a {}."]
    fn = clip_log_probs(toy_tokenizer, names, templates)
    merged = fisher_merge(base, experts, data, fn, keys=None, labels="expected")
    deltas = [delta_from_models(base, e) for e in experts]
    assert set(merged) == set(deltas[0])
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    lo = torch.minimum(deltas[0][key], deltas[1][key]) - 1e-6
    hi = torch.maximum(deltas[0][key], deltas[1][key]) + 1e-6
    assert bool(((merged[key] >= lo) & (merged[key] <= hi)).all())  # a convex combination per entry
    assert not torch.allclose(merged[key], (deltas[0][key] + deltas[1][key]) / 2)  # not the plain average
    text_key = "text_model.encoder.layers.0.mlp.fc1.weight"  # untouched and Fisher-free: stays 0
    assert torch.equal(merged[text_key], torch.zeros_like(merged[text_key]))
    rm = regmean_merge(base, experts, data, keys=None)
    assert set(rm) == set(deltas[0]) and all(torch.isfinite(v).all() for v in rm.values())


def test_merge_deltas_passes_extra_to_the_data_dependent_methods():
    """``merge_deltas(..., extra=...)`` runs RegMean in memory exactly as ``regmean_merge`` on the same models and
    data; without ``extra`` the method names what it needs."""
    from hf_cft.merging import merge_deltas

    base, experts = _tiny_clip_experts()
    data = [[{"pixel_values": torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(s))}] for s in (5, 6)]
    deltas = [delta_from_models(base, e, keys=None) for e in experts]
    deltas = [{k: v for k, v in d.items() if v.any()} for d in deltas]
    ref = regmean_merge(base, experts, data, keys=None)
    got = merge_deltas(deltas, "regmean", extra={"model": base, "calibration": data})
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7)
    with pytest.raises(MergeConfigError, match="calibration"):
        merge_deltas(deltas, "regmean", extra={"model": base})


# ------------------------------------------------------------------------------------------------ pinned rules
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py).


def _toy_task(n=6):
    import numpy as np

    from hf_cft.data import from_arrays

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(n)]
    return from_arrays(imgs, [i % 3 for i in range(n)], ["cat", "dog", "car"], ["a photo of a {}."], name="toy")


def test_calibration_batches_wrap_datasets_in_order_and_stop_after_max_batches():
    from hf_cft.data import ImageTransform, apply_image_transform
    from hf_cft.errors import DatasetFormatError
    from hf_cft.merging.data_dependent import calibration_batches

    view = apply_image_transform(_toy_task()["train"], ImageTransform(size=16, crop_size=16))
    batches = list(calibration_batches(view, batch_size=4))
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 2, 0], [1, 2]]  # in order, not shuffled
    assert batches[0]["pixel_values"].shape == (4, 3, 16, 16)
    assert len(list(calibration_batches(view, batch_size=2, max_batches=2))) == 2
    given = [{"pixel_values": torch.zeros(1, 3, 8, 8)}] * 3
    assert list(calibration_batches(given, max_batches=1)) == given[:1]  # a list of batches is taken as it is
    with pytest.raises(MergeConfigError, match=r"^max_batches must be"):
        calibration_batches(given, max_batches=0)
    with pytest.raises(DatasetFormatError) as err:
        calibration_batches(None)
    assert str(err.value) == "no calibration data: pass a DataLoader, an iterable of batches or a dataset."


def test_load_calibration_names_the_default_fields_in_every_refusal():
    from hf_cft.merging.data_dependent import load_calibration

    task = _toy_task()
    cases = [
        (dict(rows=0), r"^calibration.rows must be"),
        (dict(rows=2, batch_size=0), r"^calibration.batch_size must be"),
        (
            dict(rows=7),
            r"^calibration.data 'toy' has 6 row\(s\) in split 'train', fewer than calibration.rows = 7: lower calibration.rows to at most 6",
        ),
        (
            dict(rows=2, split="test"),
            r"^calibration.data 'toy' has no split 'test' \(calibration.split\); it has train.$",
        ),
        (dict(rows=2, classnames=["cat", "dog"]), r"^calibration.classnames: "),
        (dict(rows=2, templates=["no placeholder"]), r"^calibration.templates: "),
    ]
    for kwargs, message in cases:
        with pytest.raises(MergeConfigError, match=message):
            load_calibration(task, **kwargs)
    with pytest.raises(MergeConfigError, match=r"^calibration.data must name a dataset"):
        load_calibration("  ")
    data = load_calibration(task, rows=4, batch_size=3, seed=1)
    assert data.classnames == ["cat", "dog", "car"] and data.templates == ["a photo of a {}."]
    assert [len(b["labels"]) for b in data.loader] == [3, 1]


def test_fisher_merging_against_its_formula_with_normalisation_weights_and_refusals():
    """τ* = Σ λ_t s_t (F_t + floor) τ_t / Σ λ_t s_t (F_t + floor), s_t = 1/(‖F_t‖ + floor) with ``normalize`` (the norm
    over the delta keys only), 1 otherwise; weights default to 1 for every task; refusals name the option."""
    from hf_cft.merging.data_dependent import fisher_merging

    g = torch.Generator().manual_seed(2)
    deltas = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(2)]
    fishers = [
        {"w": torch.rand(3, 4, generator=g) * 5, "b": torch.rand(4, generator=g), "unused": torch.full((2,), 100.0)},
        {"w": torch.rand(3, 4, generator=g), "b": torch.rand(4, generator=g) * 3, "unused": torch.zeros(2)},
    ]
    floor = 1e-3

    def ref(lam, normalize):
        scales = [1.0, 1.0]
        if normalize:
            scales = [
                1.0 / (math.sqrt(sum(float((f[k].double() ** 2).sum()) for k in ("w", "b"))) + floor) for f in fishers
            ]
        out = {}
        for k in ("w", "b"):
            num = sum(
                lw * s * (f[k].double() + floor) * d[k].double() for lw, s, f, d in zip(lam, scales, fishers, deltas)
            )
            den = sum(lw * s * (f[k].double() + floor) for lw, s, f in zip(lam, scales, fishers))
            out[k] = (num / den).float()
        return out

    for lam, normalize in (([1.0, 1.0], False), ([0.25, 2.0], False), ([1.0, 1.0], True), ([0.5, 1.5], True)):
        got = fisher_merging(
            deltas, fishers, weights=lam if lam != [1.0, 1.0] else 1.0, floor=floor, normalize=normalize
        )
        want = ref(lam, normalize)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{lam} {normalize} {k}")
    default = fisher_merging(deltas, fishers)  # weights 1, floor 1e-6
    torch.testing.assert_close(
        default["w"],
        ((fishers[0]["w"] + 1e-6) * deltas[0]["w"] + (fishers[1]["w"] + 1e-6) * deltas[1]["w"])
        / (fishers[0]["w"] + fishers[1]["w"] + 2e-6),
    )
    cases = [
        (
            lambda: fisher_merging(deltas, fishers[:1]),
            TaskError,
            r"^fisher_merging got 1 Fisher sets for 2 task deltas.$",
        ),
        (
            lambda: fisher_merging(deltas, fishers, weights=[1.0, -1.0]),
            MergeConfigError,
            r"^fisher_merging weights sum to 0: the merge is undefined.$",
        ),
        (
            lambda: fisher_merging(deltas, fishers, weights=[1.0]),
            TaskError,
            r"^weights has 1 values but there are 2 task deltas.$",
        ),
        (
            lambda: fisher_merging(deltas, fishers, floor=-1.0),
            MergeConfigError,
            r"^floor must lie in \[0, inf\), got -1.0.$",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    fisher_merging(deltas, fishers, floor=0.0)  # no floor: allowed


class _TwoLayers(nn.Module):
    """x → b(act(a(x))): two linear layers of 3 → 4 → ``outputs`` features, the calibration tests' small model."""

    def __init__(self, outputs, act):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(3, 4), nn.Linear(4, outputs), act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_linear_input_grams_by_hand_with_module_selection_row_counts_and_batch_limits():
    """XᵀX of each selected linear layer's inputs over every row (all leading dimensions), the row counts, module
    selection by names or a predicate, ``batch_size`` / ``max_batches`` reaching the loader; no batch is refused."""
    from hf_cft.merging.data_dependent import linear_input_grams

    torch.manual_seed(0)
    net = _TwoLayers(2, torch.relu)
    xs = [torch.randn(2, 5, 3) for _ in range(3)]  # [batch, tokens, features]
    forward = lambda model, batch: model(batch)  # noqa: E731
    grams = linear_input_grams(net, xs, forward=forward)
    flat = torch.cat([x.reshape(-1, 3) for x in xs]).double()
    hidden = torch.relu(net.a(flat.float())).double()
    torch.testing.assert_close(grams["a.weight"], flat.T @ flat)
    torch.testing.assert_close(grams["b.weight"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    assert grams.rows == {"a.weight": 30, "b.weight": 30}
    assert set(linear_input_grams(net, xs, forward=forward, modules=["b"]).grams) == {"b.weight"}
    assert set(linear_input_grams(net, xs, forward=forward, modules=lambda n, m: m.in_features == 3).grams) == {
        "a.weight"
    }
    two = linear_input_grams(net, xs, forward=forward, max_batches=2)
    assert two.rows["a.weight"] == 20
    with pytest.raises(DatasetFormatError, match=r"^the calibration data yielded no batch: RegMean has no statistics"):
        linear_input_grams(net, [], forward=forward)


def test_fisher_merge_from_models_is_fisher_diagonal_then_fisher_merging_with_every_option():
    """fisher_merge = each model's delta (``keys``), its diagonal Fisher on its own data with ``labels``, ``seed``,
    ``max_batches`` and ``batch_size``, then :func:`fisher_merging` with ``weights``, ``floor`` and ``normalize``:
    every option reaches its stage."""
    from hf_cft.merging.data_dependent import fisher_diagonal, fisher_merging

    base, models = _two_layer_experts()
    data = [[{"x": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])} for _ in range(3)] for _ in models]

    def log_probs(model, batch):
        return torch.log_softmax(model(batch["x"]), dim=-1)

    opts = dict(labels="sample", seed=7, max_batches=2, batch_size=4)
    got = fisher_merge(
        base, models, data, log_probs, weights=[0.5, 2.0], keys=["a.weight", "b.bias"], floor=1e-3, normalize=True,
        **opts,
    )  # fmt: skip
    deltas = [delta_from_models(base, m, keys=["a.weight", "b.bias"]) for m in models]
    fishers = [fisher_diagonal(m, d, log_probs, keys=["a.weight", "b.bias"], **opts) for m, d in zip(models, data)]
    want = fisher_merging(deltas, fishers, weights=[0.5, 2.0], floor=1e-3, normalize=True)
    assert set(got) == {"a.weight", "b.bias"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    for changed in (dict(seed=8), dict(max_batches=3), dict(labels="expected")):
        other = fisher_merge(
            base, models, data, log_probs, weights=[0.5, 2.0], keys=["a.weight", "b.bias"], floor=1e-3,
            normalize=True, **{**opts, **changed},
        )  # fmt: skip
        assert not torch.allclose(other["a.weight"], got["a.weight"]), changed
    with pytest.raises(TaskError, match=r"^got 1 log_probs functions for 2 models.$"):
        fisher_merge(base, models, data, [log_probs])


def test_batch_length_is_the_first_batched_tensors_leading_size():
    from hf_cft.merging.data_dependent import _batch_len

    assert _batch_len(torch.zeros(4, 3, 8, 8)) == 4
    assert (
        _batch_len({"scale": torch.tensor(2.0), "labels": torch.tensor([1, 0, 2]), "pixel_values": torch.zeros(3, 1)})
        == 3
    )
    with pytest.raises(
        DatasetFormatError, match=r"^a calibration batch holds no batched tensor \(keys \['name', 'scale'\]\).$"
    ):
        _batch_len({"scale": torch.tensor(2.0), "name": "x"})


# ------------------------------------------------------------------------------------------------ more pinned rules
# Defaults, pass-through options and exact messages that the tests above let through (mutation testing of
# hf_cft/merging/data_dependent.py).


def _toy_view(n=20):
    """``n`` rows of the toy task as 16-pixel ``pixel_values`` + ``labels`` (a dataset, not a list of batches)."""
    from hf_cft.data import ImageTransform, apply_image_transform

    return apply_image_transform(_toy_task(n)["train"], ImageTransform(size=16, crop_size=16))


def _collate(view, rows):
    from hf_cft.data.transforms import ImageClassificationCollator

    return ImageClassificationCollator()([view[i] for i in rows])


def _pixel_forward(model, batch):
    """A _TwoLayers forward on images: the per-channel mean of ``pixel_values`` as 3 features."""
    return model(batch["pixel_values"].mean(dim=(2, 3)))


def _pixel_log_probs(model, batch):
    return torch.log_softmax(_pixel_forward(model, batch), dim=-1)


def _two_layer_experts(seeds=(2, 3), outputs=3):
    torch.manual_seed(1)
    base = _TwoLayers(outputs, torch.tanh)
    models = []
    for s in seeds:
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        models.append(m)
    return base, models


def test_calibration_defaults_batches_of_16_seed_0_label_column_and_describe_keys():
    """calibration_batches wraps a dataset in batches of 16 by default, with hf_cft's collator (a row's ``label``
    becomes the batch's ``labels``); calibration_rows' default seed is 0; CalibrationData.describe()'s keys."""
    from hf_cft.merging.data_dependent import CalibrationData, calibration_batches, calibration_rows

    view = _toy_view(20)
    sizes = [len(b["labels"]) for b in calibration_batches(view)]
    assert sizes == [16, 4]

    class Rows:  # a map-style dataset whose rows say "label", not "labels"
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"pixel_values": torch.full((3, 2, 2), float(i)), "label": i}

    (batch,) = list(calibration_batches(Rows()))
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["labels"].tolist() == [0, 1, 2] and batch["labels"].dtype == torch.long

    default = calibration_rows(20, 5)
    assert default == calibration_rows(20, 5, seed=0) == sorted(default) and len(set(default)) == 5
    assert default != calibration_rows(20, 5, seed=1)

    data = CalibrationData("toy", "train", [], ["cat", "dog", "car"], ["a {}."], [0, 3], 6)
    assert data.describe() == {"dataset": "toy", "split": "train", "rows": 2, "available": 6, "classes": 3}


def _split_task():
    """The toy task with three splits: ``train`` (6 rows), ``test`` (1 row) and ``empty`` (0 rows)."""
    import datasets

    from hf_cft.data import ClassificationDataset

    toy = _toy_task()
    train = toy["train"]
    splits = datasets.DatasetDict({"train": train, "test": train.select([4]), "empty": train.select([])})
    return ClassificationDataset(name="toy", splits=splits, classnames=toy.classnames, templates=toy.templates)


def test_load_calibration_bounds_splits_names_and_messages():
    """load_calibration accepts rows = 1, batch_size = 1 and rows = every row of the split (also of a 1-row split);
    refuses an empty split and a missing one listing every split; class names and templates are checked against
    the data (duplicates are an error) with messages naming ``calibration.data 'toy'``; the result carries the
    dataset's name and split; a corrupt image's error names the dataset."""
    import datasets

    from hf_cft.data import ClassificationDataset
    from hf_cft.errors import ImageDecodeError
    from hf_cft.merging.data_dependent import load_calibration

    task = _split_task()
    one = load_calibration(task, rows=1, batch_size=1)
    assert [len(b["labels"]) for b in one.loader] == [1]
    every = load_calibration(task, rows=6, batch_size=4)
    assert every.rows == [0, 1, 2, 3, 4, 5] and every.available == 6
    assert (every.name, every.split) == ("toy", "train")
    assert every.describe() == {"dataset": "toy", "split": "train", "rows": 6, "available": 6, "classes": 3}
    single = load_calibration(task, rows=1, split="test")
    assert single.rows == [0] and [b["labels"].tolist() for b in single.loader] == [[1]]
    assert single.split == "test"
    cases = [
        (
            dict(split="val"),
            "calibration.data 'toy' has no split 'val' (calibration.split); it has train, test, empty.",
        ),
        (dict(split="empty"), "calibration.data 'toy': split 'empty' is empty, no calibration data."),
        (
            dict(classnames=["cat", "dog"]),
            "calibration.classnames: 2 class names were given of calibration.data 'toy', but its labels have 3 "
            "classes.",
        ),
        (
            dict(classnames=["cat", "cat", "car"]),
            "calibration.classnames: Class name 'cat' of calibration.data 'toy' appears twice (ids 0 and 1).",
        ),
        (
            dict(templates=["no placeholder"]),
            "calibration.templates: Template 'no placeholder' of calibration.data 'toy' must contain exactly one "
            "'{}' placeholder for the class name.",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(MergeConfigError, match=f"^{re.escape(message)}$"):
            load_calibration(task, rows=1, **kwargs)

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat"])})
    bad = datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": None}], "label": [0]}, features)
    broken = ClassificationDataset(
        name="broken", splits=datasets.DatasetDict({"train": bad}), classnames=["cat"], templates=["a {}."]
    )
    loader = load_calibration(broken, rows=1).loader
    with pytest.raises(ImageDecodeError, match=r"^Cannot decode image <bytes> of dataset 'broken': "):
        next(iter(loader))


def test_load_calibration_reads_a_named_dataset_under_data_dir(tmp_path):
    """A dataset name is looked up under ``data_dir`` (not only $HF_CFT_DATA_DIR / ../shared/data)."""
    from hf_cft.merging.data_dependent import load_calibration

    folder = tmp_path / "toyparquet"
    folder.mkdir()
    _toy_task()["train"].to_parquet(str(folder / "train.parquet"))
    data = load_calibration("toyparquet", data_dir=tmp_path, rows=4, batch_size=4)
    assert (data.name, data.available, data.classnames) == ("toyparquet", 6, ["cat", "dog", "car"])
    assert [b["labels"].tolist() for b in data.loader] == [[_toy_task()["train"][i]["label"] for i in data.rows]]


def test_batch_helpers_slice_rows_pass_non_tensors_through_and_name_bad_batches():
    """_row slices example i of every batched tensor and leaves 0-d tensors and non-tensors alone; _batch_len reads a
    1-D tensor's length; batches may carry non-tensor values through RegMean and Fisher; a batch that is neither a
    dict nor a tensor, and a batch without ``pixel_values`` for the image forward, are refused by name."""
    from hf_cft.merging.data_dependent import _batch_len, _row, image_forward

    t = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(_row(t, 2), t[2:3])
    row = _row({"x": t, "scale": torch.tensor(2.0), "name": "abc"}, 1)
    assert torch.equal(row["x"], t[1:2]) and torch.equal(row["scale"], torch.tensor(2.0)) and row["name"] == "abc"
    assert _batch_len({"labels": torch.tensor([1, 0, 2])}) == 3

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    xs = torch.randn(3, 4)
    plain = [{"x": xs, "labels": torch.tensor([0, 2, 1])}]
    tagged = [{**plain[0], "name": "batch-0"}]
    torch.testing.assert_close(
        linear_input_grams(model, tagged, forward=forward)["weight"], (xs.T @ xs).double(), rtol=1e-6, atol=1e-6
    )
    want = fisher_diagonal(model, plain, forward, labels="empirical")
    got = fisher_diagonal(model, tagged, forward, labels="empirical")
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    with pytest.raises(
        DatasetFormatError,
        match=r"^a calibration batch must be a dict of tensors or a tensor of pixel values, got list\.$",
    ):
        linear_input_grams(model, [[xs]], forward=forward)
    with pytest.raises(
        DatasetFormatError, match=r"^a calibration batch lacks 'pixel_values' \(it has \['labels', 'x'\]\)\.$"
    ):
        image_forward(tiny_clip(seed=0), plain[0])


def test_gram_means_and_linear_input_grams_default_batch_size():
    """LinearGrams.mean divides by the row count (by 1 when there are none); linear_input_grams wraps a dataset in
    batches of 16 by default, of ``batch_size`` when given."""
    g = torch.full((2, 2), 6.0, dtype=torch.float64)
    means = LinearGrams(grams={"w": g, "z": g}, rows={"w": 1, "z": 0}).mean()
    assert torch.equal(means["w"], g) and torch.equal(means["z"], g)
    assert torch.equal(LinearGrams(grams={"w": g}, rows={"w": 3}).mean()["w"], g / 3)

    view = _toy_view(20)
    base, _ = _two_layer_experts()
    first = linear_input_grams(base, view, forward=_pixel_forward, max_batches=1)
    assert first.rows == {"a.weight": 16, "b.weight": 16}
    want = linear_input_grams(base, [_collate(view, range(16))], forward=_pixel_forward)
    torch.testing.assert_close(first["a.weight"], want["a.weight"])
    assert linear_input_grams(base, view, forward=_pixel_forward, batch_size=5, max_batches=2).rows["a.weight"] == 10


def test_regmean_refusals_name_alpha_the_key_and_the_overflow():
    """regmean refuses α < 0 and normalize=True without row counts, a NaN Gram matrix naming key and task, and a
    finite merge that overflows float32 blaming alpha, each with its exact message."""
    d = {"w": torch.ones(1, 2)}
    eye = {"w": torch.eye(2, dtype=torch.float64)}
    with pytest.raises(MergeConfigError, match=r"^alpha must lie in \[0, 1\], got -0\.5\.$"):
        regmean([d, d], [eye, eye], alpha=-0.5)
    with pytest.raises(
        MergeConfigError,
        match=r"^regmean\(normalize=True\) needs LinearGrams \(they carry the row counts\)\.$",
    ):
        regmean([d, d], [eye, eye], normalize=True)
    nan = {"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=torch.float64)}
    with pytest.raises(DeltaError, match=r"^the Gram matrix of key 'w' of task 1 holds NaN or inf\.$"):
        regmean([d, d], [eye, nan])
    # two nearly collinear inputs x1 = (1, 1), x2 = (1, 1.001): at α = 1 the merge interpolates both exactly,
    # W x1 = 1e36, W x2 = 0, so W = (1e36 + 1e39, -1e39): finite deltas, an overflowing (float32) merge
    x1, x2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.001]])
    grams = [{"w": (x1.T @ x1).double()}, {"w": (x2.T @ x2).double()}]
    big = [{"w": torch.tensor([[1e36, 0.0]])}, {"w": torch.zeros(1, 2)}]
    message = "alpha=1.0 scales the finite delta at key 'w' beyond the float range (inf); use a smaller value."
    with pytest.raises(MergeConfigError, match=f"^{re.escape(message)}$"):
        regmean(big, grams, alpha=1.0)


def test_regmean_merge_passes_keys_batch_size_and_max_batches_and_counts_models():
    """regmean_merge = regmean of the ``keys`` deltas with each model's Gram matrices on its data in batches of
    ``batch_size`` (16 by default), at most ``max_batches``; one model is allowed (its delta comes back), none or a
    wrong number of calibration sources is refused with the exact message."""
    from hf_cft.merging.data_dependent import regmean_merge

    base, models = _two_layer_experts()
    view = _toy_view(20)
    keys = ["a.weight", "b.weight"]
    deltas = [delta_from_models(base, m, keys=keys) for m in models]

    def expected(rows):
        grams = [linear_input_grams(m, [_collate(view, rows)], forward=_pixel_forward) for m in models]
        return regmean(deltas, grams)

    got = regmean_merge(base, models, view, forward=_pixel_forward, keys=keys, max_batches=1)
    assert set(got) == set(keys)
    want = expected(range(16))
    for k in keys:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    got = regmean_merge(base, models, view, forward=_pixel_forward, keys=keys, max_batches=2, batch_size=5)
    want = expected(range(10))
    for k in keys:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    alone = regmean_merge(base, models[:1], view, forward=_pixel_forward, keys=keys, max_batches=1)
    for k in keys:
        torch.testing.assert_close(alone[k], deltas[0][k], rtol=1e-4, atol=1e-5)
    with pytest.raises(TaskError, match=r"^no models to merge\.$"):
        regmean_merge(base, [], view, forward=_pixel_forward)
    with pytest.raises(
        TaskError, match=r"^got 3 calibration sources for 2 models: give one per model, or one for all\.$"
    ):
        regmean_merge(base, models, [view, view, view], forward=_pixel_forward)


def test_regmean_on_a_bare_linear_model_keys_its_gram_matrix_weight():
    """A model that is itself an ``nn.Linear`` has its Gram matrix under ``"weight"`` (its parameter's name), so
    regmean_merge of such models is RegMean, not the plain average of the deltas (it was ``".weight"``)."""
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    models = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        models[0].weight.add_(1.0)
        models[1].weight.sub_(0.5)
    data = [batches(20), batches(21)]
    grams = [linear_input_grams(m, d, forward=forward) for m, d in zip(models, data)]
    assert list(grams[0]) == ["weight"]
    got = regmean_merge(base, models, data, forward=forward, keys=["weight"])
    inputs = [torch.cat([b["x"] for b in d]).double().numpy() for d in data]
    want = ref_regmean_weight([m.weight.detach().double().numpy() for m in models], inputs, 0.6)
    np.testing.assert_allclose(got["weight"].double().numpy(), want - base.weight.detach().double().numpy(), atol=1e-5)


def test_clip_log_probs_rebuilds_the_text_head_for_another_model(toy_tokenizer):
    """The zero-shot head is cached per model (and its text projection's storage): a second model that shares the
    first one's text projection but has another text encoder gets its own head, not the first model's."""
    first = tiny_clip(seed=0)
    second = copy.deepcopy(first)
    with torch.no_grad():
        for name, p in second.named_parameters():
            if name.startswith("text_model.encoder"):
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    second.text_projection = first.text_projection
    batch = {"pixel_values": torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))}
    names, templates = ["cat", "dog", "bird"], ["a photo of a {}."]
    fn = clip_log_probs(toy_tokenizer, names, templates)
    on_first = fn(first, batch)
    on_second = fn(second, batch)
    fresh = clip_log_probs(toy_tokenizer, names, templates)(second, batch)
    torch.testing.assert_close(on_second, fresh)
    assert not torch.allclose(on_second, on_first, atol=1e-4)


def test_fisher_diagonal_defaults_dtypes_and_messages():
    """fisher_diagonal: sampled labels with seed 0 by default; a dataset in batches of 16 by default (of
    ``batch_size`` when given); a float64 delta gives fp32 Fishers equal to the fp32 delta's; one example is
    enough; exact messages for a bad ``labels``, an unknown key, a delta key outside ``keys``, batches without
    labels for ``labels='empirical'`` and data without examples."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = batches(7, n=2, b=8)
    default = fisher_diagonal(model, data, forward)
    seeded = fisher_diagonal(model, data, forward, seed=0)
    other = fisher_diagonal(model, data, forward, seed=1)
    torch.testing.assert_close(default["weight"], seeded["weight"])
    assert not torch.allclose(default["weight"], other["weight"])

    base, _ = _two_layer_experts()
    view = _toy_view(20)
    got = fisher_diagonal(base, view, _pixel_log_probs, labels="expected", max_batches=1)
    want = fisher_diagonal(base, [_collate(view, range(16))], _pixel_log_probs, labels="expected")
    got5 = fisher_diagonal(base, view, _pixel_log_probs, labels="expected", max_batches=2, batch_size=5)
    want5 = fisher_diagonal(base, [_collate(view, range(10))], _pixel_log_probs, labels="expected")
    for k in want:
        torch.testing.assert_close(got[k], want[k])
        torch.testing.assert_close(got5[k], want5[k])

    delta = {"bias": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    wide = fisher_diagonal(model, data, forward, labels="expected", delta=delta)
    narrow = fisher_diagonal(model, data, forward, labels="expected", delta={"bias": delta["bias"].float()})
    for k in narrow:
        assert wide[k].dtype == torch.float32
        torch.testing.assert_close(wide[k], narrow[k])

    x, y = torch.randn(1, 4), 2
    one = fisher_diagonal(model, [{"x": x, "labels": torch.tensor([y])}], forward, labels="empirical")
    fw, fb = ref_fisher_linear(
        model.weight.detach().double().numpy(), model.bias.detach().double().numpy(), x.double().numpy(), [y]
    )
    np.testing.assert_allclose(one["weight"].double().numpy(), fw, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(one["bias"].double().numpy(), fb, atol=1e-6, rtol=1e-4)

    cases = [
        (
            dict(labels="hard"),
            MergeConfigError,
            "labels must be one of ('sample', 'expected', 'empirical'), got 'hard'.",
        ),
        (dict(keys=["nope"]), DeltaError, "key 'nope' is not a parameter of Linear."),
        (
            dict(keys=["weight"], delta={"bias": torch.zeros(3)}),
            DeltaError,
            "delta key 'bias' is not among the Fisher keys.",
        ),
        (
            dict(labels="empirical", data=[{"x": x}]),
            DatasetFormatError,
            "fisher_diagonal(labels='empirical') needs batches with 'labels'.",
        ),
        (dict(data=[]), DatasetFormatError, "the calibration data yielded no example: no Fisher to merge with."),
    ]
    for kwargs, error, message in cases:
        kwargs = {"data": data, **kwargs}
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            fisher_diagonal(model, kwargs.pop("data"), forward, **kwargs)


def test_fisher_merging_edge_cases_by_hand():
    """fisher_merging by hand: one task (also normalised) returns its delta; a task whose Fisher is all zero (floor 0)
    has scale 1 and weight 0 under ``normalize``; a key no Fisher has is the λ-weighted mean and the keys after it are
    merged too; float64 Fishers below float32's range are accumulated in float64; refusals and the overflow of
    negative weights name the key and the Fisher weights."""
    g = torch.Generator().manual_seed(4)
    d1 = {"b": torch.tensor([1.0, -2.0]), "w": torch.randn(2, 3, generator=g)}
    d2 = {"b": torch.tensor([5.0, 2.0]), "w": torch.randn(2, 3, generator=g)}
    f1, f2 = {"w": torch.rand(2, 3, generator=g) + 0.1}, {"w": torch.rand(2, 3, generator=g) + 0.1}
    for normalize in (False, True):
        alone = fisher_merging([d1], [f1], normalize=normalize)
        for k in d1:
            torch.testing.assert_close(alone[k], d1[k])
    zero = fisher_merging([d1, d2], [{"w": torch.zeros(2, 3)}, f2], floor=0.0, normalize=True)
    torch.testing.assert_close(zero["w"], d2["w"])
    mixed = fisher_merging([d1, d2], [f1, f2], weights=[1.0, 3.0])
    torch.testing.assert_close(mixed["b"], torch.tensor([4.0, 1.0]))  # (1·d1 + 3·d2) / 4: no Fisher for "b"
    want = (1.0 * (f1["w"] + 1e-6) * d1["w"] + 3.0 * (f2["w"] + 1e-6) * d2["w"]) / (
        1.0 * (f1["w"] + 1e-6) + 3.0 * (f2["w"] + 1e-6)
    )
    torch.testing.assert_close(mixed["w"], want)
    tiny = [
        {"w": torch.full((2, 3), 1e-50, dtype=torch.float64)},
        {"w": torch.full((2, 3), 3e-50, dtype=torch.float64)},
    ]
    torch.testing.assert_close(
        fisher_merging([d1, d2], tiny, floor=0.0)["w"], (d1["w"] + 3 * d2["w"]) / 4, rtol=1e-6, atol=1e-6
    )

    w = {"w": torch.ones(2)}
    cases = [
        (
            lambda: fisher_merging([w, w], [{"w": torch.ones(2)}, {"w": torch.ones(3)}]),
            DeltaError,
            "the Fisher of key 'w' of task 1 has shape (3,), not the delta's.",
        ),
        (
            lambda: fisher_merging([w, w], [{"w": torch.zeros(2)}] * 2, floor=0.0),
            MergeConfigError,
            "the Fisher weights of key 'w' sum to 0 somewhere (floor=0 and no task's data touched it); use floor > 0.",
        ),
        (  # λ = (2, −1) extrapolates: 2·3e38 + 3e38 = 9e38 is beyond float32
            lambda: fisher_merging(
                [{"w": torch.full((2,), 3e38)}, {"w": torch.full((2,), -3e38)}], [w, w], weights=[2.0, -1.0]
            ),
            MergeConfigError,
            "the Fisher weights scales the finite delta at key 'w' beyond the float range (inf); use a smaller value.",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            call()


def test_fisher_merge_wraps_datasets_in_batches_of_16_or_batch_size():
    """fisher_merge hands ``batch_size`` (16 by default) to every model's Fisher on a dataset."""
    base, models = _two_layer_experts()
    view = _toy_view(20)
    keys = ["a.weight", "b.bias"]
    deltas = [delta_from_models(base, m, keys=keys) for m in models]
    for kwargs, rows in ((dict(max_batches=1), range(16)), (dict(max_batches=2, batch_size=5), range(10))):
        got = fisher_merge(base, models, view, _pixel_log_probs, keys=keys, labels="expected", **kwargs)
        fishers = [
            fisher_diagonal(m, [_collate(view, rows)], _pixel_log_probs, keys=keys, labels="expected") for m in models
        ]
        want = fisher_merging(deltas, fishers)
        for k in keys:
            torch.testing.assert_close(got[k], want[k])


def _registry_case():
    """θ⁰ (a _TwoLayers), two inputs' deltas (the second without ``b.weight``) and their calibration batches (of
    different sizes, two each), for the registry's ``regmean`` / ``fisher``."""
    base, models = _two_layer_experts()
    deltas = [delta_from_models(base, m, keys=["a.weight", "b.weight"]) for m in models]
    del deltas[1]["b.weight"]
    dense = [deltas[0], {**deltas[1], "b.weight": torch.zeros(3, 4)}]
    g = torch.Generator().manual_seed(9)
    data = [
        [{"x": torch.randn(n, 3, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)} for n in sizes]
        for sizes in ((2, 4), (6, 3))
    ]
    return base, deltas, dense, data


def _x_forward(model, batch):
    return model(batch["x"])


def _x_log_probs(model, batch):
    return torch.log_softmax(model(batch["x"]), dim=-1)


def _non_finite_message(method, what, key, name):
    return (
        f"{method}: the {what} of key {key!r} gathered on {name} holds NaN/inf (the model's activations or gradients "
        "overflow on that data, or the input's weights hold NaN/inf); check that input and its data."
    )


def test_registry_regmean_passes_its_options_fills_missing_keys_and_names_what_is_missing():
    """``merge_deltas(..., "regmean")`` = regmean of the inputs' deltas (a key an input lacks counts as zeros) with
    Gram matrices of θ⁰ + δ_t on input t's data, with the ``alpha``, ``normalize`` and ``max_batches`` options; a
    CalibrationData is unwrapped to its loader; refusals name the missing model or data and the input whose
    statistics are not finite."""
    from hf_cft.errors import NonFiniteError
    from hf_cft.merging import merge_deltas
    from hf_cft.merging.data_dependent import CalibrationData

    base, deltas, dense, data = _registry_case()
    extra = {"model": base, "calibration": data, "forward": _x_forward}
    got = merge_deltas(deltas, "regmean", {"alpha": 0.8, "normalize": True, "max_batches": 1}, extra=extra)
    grams = [linear_input_grams(base, d, _x_forward, delta=t, max_batches=1) for d, t in zip(data, dense)]
    want = regmean(dense, grams, alpha=0.8, normalize=True)
    assert set(got) == {"a.weight", "b.weight"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    wrapped = CalibrationData("toy", "train", data[0], ["a", "b", "c"], ["a {}."], [0, 1], 2)
    shared = merge_deltas(deltas, "regmean", extra={**extra, "calibration": data[0]})
    unwrapped = merge_deltas(deltas, "regmean", extra={**extra, "calibration": wrapped})
    for k in shared:
        torch.testing.assert_close(unwrapped[k], shared[k])

    no_model = (
        "this method runs the model on calibration data: pass the base model (a folder, or extra={'model': ...})."
    )
    with pytest.raises(MergeConfigError, match=f"^{re.escape(no_model)}$"):
        merge_deltas(deltas, "regmean", extra={"calibration": data})
    for method in ("regmean", "fisher"):
        no_data = (
            f"method {method!r} needs calibration data: pass extra={{'calibration': loader}} (one for every input, "
            "or a list with one per input), or a merge config's calibration sections."
        )
        with pytest.raises(MergeConfigError, match=f"^{re.escape(no_data)}$"):
            merge_deltas(deltas, method, extra={"model": base, "log_probs": _x_log_probs})
    bad = [data[0], [{"x": torch.full((2, 3), float("inf"))}]]
    with pytest.raises(
        NonFiniteError, match=f"^{re.escape(_non_finite_message('regmean', 'Gram matrix', 'a.weight', 'input 1'))}$"
    ):
        merge_deltas(deltas, "regmean", extra={**extra, "calibration": bad})


def test_registry_fisher_passes_its_options_and_checks_the_classifier_count_and_statistics():
    """``merge_deltas(..., "fisher")`` = fisher_merging of the inputs' deltas (zeros where one lacks a key) with the
    Fisher of θ⁰ + δ_t on input t's data, with the ``labels``, ``max_batches``, ``floor``, ``normalize`` options and
    per-input weights; a wrong number of log_probs functions and a non-finite Fisher are refused by name."""
    from hf_cft.errors import NonFiniteError
    from hf_cft.merging import merge_deltas

    base, deltas, dense, data = _registry_case()
    extra = {"model": base, "calibration": data, "log_probs": _x_log_probs}
    params = {"labels": "expected", "max_batches": 1, "floor": 0.5, "normalize": True}
    got = merge_deltas(deltas, "fisher", params, inputs=[{"weight": 1.0}, {"weight": 2.0}], extra=extra)
    fishers = [
        fisher_diagonal(base, d, _x_log_probs, keys=list(t), labels="expected", delta=t, max_batches=1)
        for d, t in zip(data, dense)
    ]
    want = fisher_merging(dense, fishers, weights=[1.0, 2.0], floor=0.5, normalize=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    with pytest.raises(MergeConfigError, match=r"^got 3 log_probs functions for 2 inputs\.$"):
        merge_deltas(deltas, "fisher", extra={**extra, "log_probs": [_x_log_probs] * 3})
    bad = [data[0], [{"x": torch.full((2, 3), float("nan")), "labels": torch.tensor([0, 1])}]]
    with pytest.raises(
        NonFiniteError, match=f"^{re.escape(_non_finite_message('fisher', 'Fisher', 'a.weight', 'input 1'))}$"
    ):
        merge_deltas(deltas, "fisher", {"labels": "empirical"}, extra={**extra, "calibration": bad})


def test_registry_fisher_builds_the_clip_head_from_tokenizer_classnames_and_templates(toy_tokenizer):
    """With ``tokenizer`` + ``classnames`` (one list for all inputs, or one per input) and no ``templates``, the
    Fisher head uses CLIP's ``"a photo of a {}."`` exactly (a case-sensitive tokenizer tells it from a variant);
    a tokenizer without class names, or lists of names / templates not one per input, are refused by name."""
    from hf_cft.merging import merge_deltas

    class CaseSensitive(type(toy_tokenizer)):
        def _ids(self, text, special=True):
            words = [2 + (sum(map(ord, w)) * 7 + len(w)) % 95 for w in text.split()]
            return [self.bos, *words, self.eos] if special else words

    tok = CaseSensitive()
    base, experts = _tiny_clip_experts()
    keys = ["visual_projection.weight", "vision_model.encoder.layers.1.mlp.fc2.weight"]
    deltas = [delta_from_models(base, e, keys=keys) for e in experts]
    data = [[{"pixel_values": torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(s))}] for s in (5, 6)]
    names = ["cat", "dog", "bird"]
    extra = {"model": base, "calibration": data, "tokenizer": tok, "classnames": names}
    default = merge_deltas(deltas, "fisher", extra=extra)
    explicit = merge_deltas(
        deltas,
        "fisher",
        extra={**extra, "classnames": [names, names], "templates": ["a photo of a {}."]},
    )
    other = merge_deltas(deltas, "fisher", extra={**extra, "templates": ["A PHOTO OF A {}."]})
    for k in keys:
        torch.testing.assert_close(default[k], explicit[k])
    assert not torch.allclose(default[keys[1]], other[keys[1]])

    no_names = (
        "method 'fisher' needs the classifier: extra={'log_probs': fn} or extra={'tokenizer': ..., "
        "'classnames': [...], 'templates': [...]} (class names and templates: one list, or one per input)."
    )
    with pytest.raises(MergeConfigError, match=f"^{re.escape(no_names)}$"):
        merge_deltas(deltas, "fisher", extra={"model": base, "calibration": data, "tokenizer": tok})
    for what, field, value in (
        ("class names", "classnames", [names] * 3),
        ("templates", "templates", [["a {}."]] * 3),
    ):
        with pytest.raises(
            MergeConfigError, match=f"^got 3 lists of {what} for 2 inputs: give one, or one per input\\.$"
        ):
            merge_deltas(deltas, "fisher", extra={**extra, field: value})


def test_registry_loads_a_base_model_given_as_a_folder(tmp_path):
    """``extra={'model': '<folder>'}`` loads θ⁰ from that folder: the same merge as with the module itself."""
    from hf_cft.merging import merge_deltas

    base, experts = _tiny_clip_experts()
    base.save_pretrained(tmp_path / "base")
    keys = ["vision_model.encoder.layers.1.mlp.fc2.weight"]
    deltas = [delta_from_models(base, e, keys=keys) for e in experts]
    data = [{"pixel_values": torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(5))}]
    from_module = merge_deltas(deltas, "regmean", extra={"model": base, "calibration": data})
    from_folder = merge_deltas(deltas, "regmean", extra={"model": str(tmp_path / "base"), "calibration": data})
    torch.testing.assert_close(from_folder[keys[0]], from_module[keys[0]])
