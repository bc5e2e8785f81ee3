"""Issue 18's methods in the merging registry (hf_cft.merging.registry): each per-key kernel equals its one-shot
function (tested against the papers' definitions in test_merging_methods.py / test_merging_data_dependent.py),
per-input options, option errors naming the field, and the data-dependent ``kind="model"`` entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_cft.errors import MergeConfigError
from hf_cft.merging import data_dependent, methods
from hf_cft.merging.registry import ModelContext, TensorContext, get_method, method_names


def _deltas(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 5), "b.bias": (5,), "c.weight": (3, 4)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


def _run(name, deltas, options=None, inputs=None, base=None):
    method = get_method(name)
    opts, per = method.resolve(options or {}, inputs or [{} for _ in deltas])
    out = {}
    for i, key in enumerate(deltas[0]):
        ctx = TensorContext(key, opts, per, [True] * len(deltas), lambda key=key: base[key], i, len(deltas[0]))
        before = [d[key].clone() for d in deltas]
        out[key] = method.fn([d[key] for d in deltas], ctx)
        assert all(torch.equal(b, d[key]) for b, d in zip(before, deltas)), f"{name} modified an input at {key}"
    return out


@pytest.mark.parametrize(
    ("name", "options", "reference"),
    [
        ("tsv_m", {}, lambda ds: methods.tsv_m(ds)),
        ("tsv_m", {"alpha": 0.5}, lambda ds: methods.tsv_m(ds, alpha=0.5)),
        ("iso_c", {"alpha": 1.5}, lambda ds: methods.iso_c(ds, alpha=1.5)),
        ("iso_cts", {"common_fraction": 0.5}, lambda ds: methods.iso_cts(ds, common_fraction=0.5)),
        ("model_stock", {}, lambda ds: methods.model_stock(ds)),
        ("model_stock", {"average": "angle"}, lambda ds: methods.model_stock(ds, average="angle")),
        ("breadcrumbs", {}, lambda ds: methods.breadcrumbs(ds)),
        (
            "breadcrumbs",
            {"density": 0.4, "gamma": 0.1, "weight": 0.5},
            lambda ds: methods.breadcrumbs(ds, 0.4, 0.1, 0.5),
        ),
        ("della", {"seed": 2}, lambda ds: methods.della(ds, seed=2)),
        (
            "della",
            {"density": 0.6, "epsilon": 0.2, "rank_scope": "tensor"},
            lambda ds: methods.della(ds, 0.6, 0.2, rank_scope="tensor"),
        ),
    ],
)
def test_kernels_equal_the_one_shot_functions(name, options, reference):
    ds = _deltas()
    got, want = _run(name, ds, options), reference(ds)
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_slerp_kernel_on_weights_and_on_deltas():
    ds = _deltas(2)
    base = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in ds[0].items()}
    on_weights = _run("slerp", ds, {"t": 0.3}, base=base)
    want = methods.slerp(ds, t=0.3, base=base)
    for k in want:
        torch.testing.assert_close(on_weights[k], want[k])
    on_deltas = _run("slerp", ds, {"t": 0.3, "space": "delta"}, base=base)
    want = methods.slerp(ds, t=0.3)
    for k in want:
        torch.testing.assert_close(on_deltas[k], want[k])


def test_per_input_options_and_errors_name_the_field():
    ds = _deltas(2)
    got = _run("breadcrumbs", ds, inputs=[{"weight": 1.0, "density": 0.5}, {"weight": -0.5, "density": 0.2}])
    for k in got:
        want = methods.breadcrumbs_key([d[k] for d in ds], [1.0, -0.5], [0.5, 0.2], 0.01)
        torch.testing.assert_close(got[k], want)
    with pytest.raises(MergeConfigError, match="parameters.alpha"):
        get_method("tsv_m").resolve({"alpha": "x"}, [{}, {}])
    with pytest.raises(MergeConfigError, match=r"inputs\[1\].density \+ parameters.gamma"):
        get_method("breadcrumbs").resolve({"gamma": 0.5}, [{}, {"density": 0.6}])
    with pytest.raises(MergeConfigError, match="parameters.epsilon"):
        get_method("della").resolve({"epsilon": 0.9}, [{}, {}])
    with pytest.raises(MergeConfigError, match="exactly 2"):
        get_method("slerp").resolve({}, [{}, {}, {}])
    with pytest.raises(MergeConfigError, match="at least 2"):
        get_method("model_stock").resolve({}, [{}])
    with pytest.raises(MergeConfigError, match="parameters.alpha"):
        get_method("regmean").resolve({"alpha": 2.0}, [{}, {}])
    for name in ("tsv_m", "iso_c", "iso_cts", "model_stock", "breadcrumbs", "della", "slerp", "regmean", "fisher"):
        assert name in method_names()
    assert get_method("regmean").kind == "model" and get_method("fisher").kind == "model"


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_model_kind_regmean_and_fisher_match_the_functions():
    base = _mlp(0)
    experts = [_mlp(1), _mlp(2)]
    g = torch.Generator().manual_seed(0)
    data = [[{"x": torch.randn(6, 4, generator=g), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}] for _ in range(2)]
    deltas = [{k: (dict(e.named_parameters())[k] - p).detach() for k, p in base.named_parameters()} for e in experts]
    shapes = {k: tuple(p.shape) for k, p in base.named_parameters()}

    def forward(model, batch):
        return model(batch["x"])

    for name, extra, want in (
        (
            "regmean",
            {"forward": forward},
            lambda: data_dependent.regmean_merge(base, experts, data, 0.6, forward, None),
        ),
        (
            "fisher",
            {"log_probs": forward},
            lambda: data_dependent.fisher_merge(base, experts, data, forward, keys=None),
        ),
    ):
        method = get_method(name)
        opts, per = method.resolve({}, [{}, {}])
        ctx = ModelContext(opts, per, {}, shapes, base_model=base, extra={"calibration": data, **extra})
        got = dict(method.fn(deltas, ctx))
        expected = want()
        assert got.keys() == expected.keys()
        for k in got:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
        ctx.extra = {}
        with pytest.raises(MergeConfigError, match="calibration"):
            method.fn(deltas, ctx)


def test_an_unknown_method_lists_every_registered_name_exactly():
    with pytest.raises(MergeConfigError) as err:
        get_method("nope", where="merge.method")
    assert str(err.value) == f"merge.method must be one of {', '.join(method_names())}; got 'nope'."


def test_consensus_tall_masks_are_strict_so_an_exact_tie_is_not_a_vote():
    """A TALL mask keeps t where |τ_t| > λ_t·|τ_MTL − τ_t|: with two equal deltas and λ = 1 every entry ties
    (|τ_t| = |τ_MTL − τ_t|), so no mask selects it and k = 1 keeps nothing; λ just below 1 keeps everything."""
    d = {"w": torch.tensor([1.0, -2.0, 0.5])}
    tied = _run("consensus", [d, dict(d)], {"k": 1, "weight": 1.0, "tall_lambda": 1.0})
    assert tied["w"].tolist() == [0.0, 0.0, 0.0]
    kept = _run("consensus", [d, dict(d)], {"k": 1, "weight": 1.0, "tall_lambda": 0.75})
    assert kept["w"].tolist() == [2.0, -4.0, 1.0]


def test_consensus_and_magmax_whole_tensor_kernels_keep_the_blocked_rules_in_fp64():
    """Off the blocked fp32 CPU kernels (what a GPU runs; here fp64 tensors given to the kernels directly) the
    rules stay: a TALL mask is strict (an exact tie is no vote), and MagMax's ``later`` fold keeps the larger or equal
    magnitude, whichever input is fp64."""
    a, b = {"w": torch.tensor([2.0, 3.0])}, {"w": torch.tensor([2.0, 1.0])}  # x[0]: |τ_t| = |Σ − τ_t| = 2 for both
    for dtype in (torch.float32, torch.float64):
        pair = [{"w": d["w"].to(dtype)} for d in (a, b)]
        got = _run("consensus", pair, {"k": 1, "weight": 1.0, "tall_lambda": 1.0})
        assert got["w"].tolist() == [0.0, 4.0], dtype
    best, value = torch.tensor([1.0, -2.0, 3.0, -0.5]), torch.tensor([-1.0, 1.0, -4.0, 0.25])
    want = [-2.0, -4.0, -8.0, -1.0]  # 2·(−1: the later wins the tie; −2; −4; −0.5)
    for first, second in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        got = _run("magmax", [{"w": best.to(first)}, {"w": value.to(second)}], {"weight": 2.0})
        assert got["w"].tolist() == want, (first, second)


def test_method_providers_are_imported_once_on_the_first_look_up(tmp_path, monkeypatch):
    """The modules in PROVIDERS are imported on the first look-up (registering their methods) and not again: a
    provider dropped from sys.modules afterwards is not re-run by later look-ups."""
    import sys

    from hf_cft.merging import registry

    (tmp_path / "hf_cft_test_provider.py").write_text(
        "from hf_cft.merging.registry import MergeMethod, register\n"
        "register(MergeMethod(name='test_provider_sum', kind='tensor', fn=lambda deltas, ctx: sum(deltas)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the table as it was comes back afterwards
    monkeypatch.setattr(registry, "PROVIDERS", ["hf_cft.merging.baselines", "hf_cft_test_provider"])
    monkeypatch.setattr(registry, "_LOADED", False)
    try:
        assert "test_provider_sum" in method_names() and "ties" in method_names()
        del sys.modules["hf_cft_test_provider"]
        del registry._METHODS["test_provider_sum"]
        assert "test_provider_sum" not in method_names()
        with pytest.raises(MergeConfigError, match="got 'test_provider_sum'"):
            get_method("test_provider_sum")
    finally:
        sys.modules.pop("hf_cft_test_provider", None)
