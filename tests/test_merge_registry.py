"""The merging-method registry (hf_cft.merging.registry): option validation naming the field, per-input options,
registration, and the per-key kernels of the built-in methods against the one-shot functions of
hf_cft.merging.baselines (which follow the papers' definitions, tested in test_merging_baselines.py)."""

from __future__ import annotations

import re

import pytest
import torch

from hf_cft.errors import MergeConfigError, TaskError
from hf_cft.merging import baselines
from hf_cft.merging.registry import MergeMethod, Option, TensorContext, get_method, method_names, register


def _deltas(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 5), "b.bias": (5,), "c.weight": (3, 4)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


def _run(name, deltas, options=None, inputs=None):
    """The registered kernel key by key over in-memory deltas (no prepare pass)."""
    method = get_method(name)
    opts, per = method.resolve(options or {}, inputs or [{} for _ in deltas])
    out = {}
    for i, key in enumerate(deltas[0]):
        ctx = TensorContext(key, opts, per, [True] * len(deltas), lambda: None, i, len(deltas[0]))
        before = [d[key].clone() for d in deltas]
        out[key] = method.fn([d[key] for d in deltas], ctx)
        for b, d in zip(before, deltas):
            assert torch.equal(b, d[key]), f"{name} modified an input in place at {key}"
    return out


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_builtin_methods_are_registered():
    names = method_names()
    for name in ("task_arithmetic", "ties", "dare", "magmax", "wise", "consensus", "magnitude_prune"):
        assert name in names and get_method(name).kind == "tensor"


@pytest.mark.parametrize(
    ("name", "options", "reference"),
    [
        ("task_arithmetic", {"weight": 0.4}, lambda ds: baselines.task_arithmetic(ds, lam=0.4)),
        ("task_arithmetic", {}, lambda ds: baselines.task_arithmetic(ds, lam=0.3)),
        ("ties", {"density": 0.5}, lambda ds: baselines.ties(ds, k=0.5, lam=1.0)),
        (
            "ties",
            {"density": 0.3, "weight": 0.7, "merge": "max"},
            lambda ds: baselines.ties(ds, k=0.3, lam=0.7, merge="max"),
        ),
        ("dare", {"density": 0.5, "seed": 3}, lambda ds: baselines.dare(ds, rho=0.5, seed=3, then="ta")),
        ("dare", {"density": 0.4, "then": "ties"}, lambda ds: baselines.dare(ds, rho=0.6, then="ties")),
        ("magmax", {}, lambda ds: baselines.magmax(ds, lam=0.5)),
        (
            "magmax",
            {"tie_break": "earlier", "weight": -1.0},
            lambda ds: baselines.magmax(ds, lam=-1.0, tie_break="earlier"),
        ),
        ("consensus", {"k": 2}, lambda ds: baselines.consensus(ds, lambdas=0.4, k=2, lam=0.3)),
        ("magnitude_prune", {"density": 0.4}, lambda ds: baselines.magnitude_prune(ds, k=0.4, lam=0.3)),
    ],
)
def test_kernels_equal_the_one_shot_functions(name, options, reference):
    deltas = _deltas()
    _close(_run(name, deltas, options), reference(deltas))


def test_per_input_weights_and_densities():
    deltas = _deltas()
    got = _run("task_arithmetic", deltas, inputs=[{"weight": 1.0}, {"weight": -0.5}, {}])
    _close(got, {k: deltas[0][k] - 0.5 * deltas[1][k] + 0.3 * deltas[2][k] for k in deltas[0]})
    # TIES with one density per input: each input trimmed to its own top fraction before the election
    dens = [0.2, 0.6, 1.0]
    got = _run("ties", deltas, inputs=[{"density": d} for d in dens])
    for key in deltas[0]:
        trimmed = torch.stack([baselines.trim_top_k(d[key], k) for d, k in zip(deltas, dens)])
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (sign != 0)
        torch.testing.assert_close(got[key], (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1))


def test_resolve_names_the_offending_field():
    ties = get_method("ties")
    with pytest.raises(MergeConfigError, match=r"parameters\.density must lie in \(0, 1\]"):
        ties.resolve({"density": 0}, [{}])
    with pytest.raises(MergeConfigError, match=r"inputs\[1\]\.density must lie in \(0, 1\]"):
        ties.resolve({}, [{}, {"density": 1.5}])
    with pytest.raises(MergeConfigError, match=r"parameters\.trim_scope must be one of"):
        ties.resolve({"trim_scope": "layer"}, [{}])
    with pytest.raises(MergeConfigError, match=r"parameters\.lam is not an option of method 'ties'"):
        ties.resolve({"lam": 1.0}, [{}])
    with pytest.raises(MergeConfigError, match=r"inputs\[0\]\.merge is not a per-input option"):
        ties.resolve({}, [{"merge": "sum"}])
    with pytest.raises(MergeConfigError, match=r"merges exactly 1 input"):
        get_method("wise").resolve({}, [{}, {}])
    with pytest.raises(TaskError, match=r"k=3 exceeds the number of inputs \(2\)"):
        get_method("consensus").resolve({"k": 3}, [{}, {}])
    with pytest.raises(MergeConfigError, match=r"method must be one of .*task_arithmetic.*; got 'nope'"):
        get_method("nope")


def test_resolve_fills_defaults_per_input():
    opts, per = get_method("dare").resolve({"then": "ties"}, [{}, {"weight": 2.0, "density": 0.5}])
    assert opts == {"then": "ties", "seed": 0, "rng": "torch"}
    assert per == [{"weight": 1.0, "density": 0.1}, {"weight": 2.0, "density": 0.5}]
    opts, per = get_method("ties").resolve({"density": 0.3}, [{}, {"density": 0.9}])
    assert [p["density"] for p in per] == [0.3, 0.9] and "density" not in opts


def test_register_a_method_and_refuse_a_taken_name():
    def double(deltas, ctx):
        return sum(d for d in deltas) * ctx.options["scale"]

    method = MergeMethod("test_double_sum", "tensor", double, (Option("scale", 2.0, low=0.0),), summary="2·Σ τ")
    register(method)
    try:
        assert "test_double_sum" in method_names()
        deltas = _deltas(2)
        _close(_run("test_double_sum", deltas), {k: 2.0 * (deltas[0][k] + deltas[1][k]) for k in deltas[0]})
        with pytest.raises(MergeConfigError, match="already registered"):
            register(MergeMethod("test_double_sum", "tensor", double))
        with pytest.raises(MergeConfigError, match=r"parameters\.scale must lie in \[0, inf\)"):
            get_method("test_double_sum").resolve({"scale": -1}, [{}])
    finally:
        from hf_cft.merging import registry

        registry._METHODS.pop("test_double_sum", None)
    with pytest.raises(MergeConfigError, match="kind must be one of"):
        MergeMethod("x", "layer", double)


def test_option_and_method_declarations_are_checked_with_messages_naming_them():
    """A method's declaration is checked when it is made: an option's kind, choices for a choice, known calibration
    needs, no option declared twice; register() takes only a MergeMethod; method_names filters by kind."""
    from hf_cft.merging.registry import MergeMethod, Option, method_names, methods, register

    fn = lambda deltas, ctx: deltas[0]  # noqa: E731
    cases = [
        (
            lambda: Option("x", kind="float"),
            r"^Option 'x': kind must be one of \('number', 'int', 'choice', 'bool', 'str', 'numbers'\), got 'float'.$",
        ),
        (lambda: Option("mode", kind="choice"), r"^Option 'mode' of kind 'choice' needs choices.$"),
        (
            lambda: MergeMethod("m", "tensor", fn, calibration=("images", "labels")),
            r"^Method 'm': calibration needs must be among \('images', 'classes'\), got \('labels',\).$",
        ),
        (
            lambda: MergeMethod("m", "tensor", fn, options=(Option("a"), Option("b"), Option("a"))),
            r"^Method 'm' declares an option twice: \['a', 'b', 'a'\].$",
        ),
        (lambda: register("ties"), r"^register\(\) takes a MergeMethod, got str.$"),
    ]
    for make, message in cases:
        with pytest.raises(MergeConfigError, match=message):
            make()
    assert Option("mode", kind="choice", choices=("a", "b")).choices == ("a", "b")
    assert MergeMethod("m", "model", fn, calibration=("images", "classes")).calibration == ("images", "classes")
    table = methods()
    for kind in ("tensor", "model"):
        names = method_names(kind)
        assert names and names == sorted(n for n, m in table.items() if m.kind == kind)
    assert sorted(method_names("tensor") + method_names("model")) == method_names() == sorted(table)


@pytest.mark.parametrize(
    ("name", "options", "inputs"),
    [
        ("task_arithmetic", {}, [{"weight": 0.5}, {"weight": -2.0}, {}]),
        ("ties", {"density": 0.5}, None),
        ("dare", {"density": 0.5, "seed": 3}, [{"weight": 2.0}, {"density": 1.0}, {"weight": 0.5, "density": 0.25}]),
        ("dare", {"density": 0.5, "then": "ties", "seed": 1}, [{}, {"weight": 2.0}, {"density": 1.0}]),
        ("magmax", {}, [{"weight": 0.5}, {}, {"weight": -1.0}]),
        ("magmax", {"tie_break": "earlier"}, [{"weight": 0.5}, {}, {"weight": -1.0}]),
        ("consensus", {"k": 2}, [{"weight": 0.5}, {}, {"weight": 2.0}]),
    ],
)
def test_whole_tensor_kernels_a_gpu_runs_equal_the_blocked_cpu_kernels(name, options, inputs):
    """The kernels' whole-tensor forms (what a GPU or a non-fp32 input takes) against the blocked fp32 CPU forms,
    on dyadic inputs (exact in both dtypes, many magnitude ties): the same draws, masks, ties and sums, up to the
    rounding of the non-dyadic weights."""
    g = torch.Generator().manual_seed(4)
    shapes = {"a.weight": (7, 5), "b.bias": (5,)}
    deltas = [{k: torch.randint(-6, 7, s, generator=g).float() / 4 for k, s in shapes.items()} for _ in range(3)]
    fp32 = _run(name, deltas, options, inputs)
    fp64 = _run(name, [{k: v.double() for k, v in d.items()} for d in deltas], options, inputs)
    assert fp32.keys() == fp64.keys()
    for k in fp32:
        torch.testing.assert_close(fp64[k].float(), fp32[k], rtol=1e-6, atol=1e-6, msg=f"{name} {k}")
    assert any(fp32[k].abs().sum() > 0 for k in fp32)


def test_magmax_step_on_whole_tensors_breaks_ties_as_told():
    from hf_cft.merging.baselines import _magmax_step

    best = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=torch.float64)
    value = torch.tensor([-1.0, 2.5, -1.0, 0.0], dtype=torch.float64)
    assert _magmax_step(best, value, "later").tolist() == [-1.0, 2.5, 3.0, 0.0]
    assert _magmax_step(best, value, "earlier").tolist() == [1.0, 2.5, 3.0, 0.0]
    assert _magmax_step(best.float(), value.float(), "later").tolist() == [-1.0, 2.5, 3.0, 0.0]  # the blocked form


def test_option_describe_formats_kind_range_choices_per_input_default_and_help():
    """``Option.describe()``: ``"name (what[, per input]; default <repr>|required): help"``, without ``": "`` when
    there is no help. ``what``: a choice's choices joined by ``|`` (as ``str``); a number/int/numbers option with a
    bound ``"<kind> in <range>"``, each end ``[``/``]`` when closed, ``(``/``)`` when open or missing (shown as
    ``-inf``/``inf``), bounds in ``%g``; otherwise the kind alone (unbounded numbers, bool, str)."""
    cases = [
        (Option("lam"), "lam (number; default None)"),
        (Option("lam", 0.3, help="scale"), "lam (number; default 0.3): scale"),
        (Option("lam", 0.3, help="the scale X:"), "lam (number; default 0.3): the scale X:"),  # kept as written
        (
            Option("density", 1.0, low=0.0, high=1.0, low_open=True, per_input=True, help="kept fraction"),
            "density (number in (0, 1], per input; default 1.0): kept fraction",
        ),
        (Option("k", 0.5, low=0.0, high=1.0), "k (number in [0, 1]; default 0.5)"),
        (Option("rho", 0.9, low=0.0, high=1.0, high_open=True), "rho (number in [0, 1); default 0.9)"),
        (Option("eps", 1e-6, low=1e-06), "eps (number in [1e-06, inf); default 1e-06)"),
        (Option("eps", 1e-6, low=2.5, low_open=True), "eps (number in (2.5, inf); default 1e-06)"),
        (Option("top", 3.0, high=1234567.0), "top (number in (-inf, 1.23457e+06]; default 3.0)"),
        (Option("cap", None, high=2.0, high_open=True), "cap (number in (-inf, 2); default None)"),
        (Option("n", 2, kind="int", low=1, required=True), "n (int in [1, inf); required)"),
        (Option("n", 2, kind="int", help="count"), "n (int; default 2): count"),
        (
            Option("alphas", [0.5], kind="numbers", low=0.0, high=1.0, help="per layer"),
            "alphas (numbers in [0, 1]; default [0.5]): per layer",
        ),
        (Option("alphas", kind="numbers", required=True), "alphas (numbers; required)"),
        (
            Option("mode", "a", kind="choice", choices=("a", "b"), per_input=True, help="how"),
            "mode (a|b, per input; default 'a'): how",
        ),
        (Option("k", 2, kind="choice", choices=(1, 2, 4), low=0.0), "k (1|2|4; default 2)"),
        (Option("flag", False, kind="bool", low=0.0, help="on?"), "flag (bool; default False): on?"),
        (Option("name", "x", kind="str", per_input=True), "name (str, per input; default 'x')"),
    ]
    for option, line in cases:
        assert option.describe() == line
    dare = get_method("dare")
    assert [o.describe() for o in dare.options] == [
        "weight (number, per input; default None): λ_t (default 0.3 with then=ta, 1.0 with then=ties)",
        "density (number in (0, 1], per input; default 0.1): kept fraction 1 − ρ (--rho ρ: drop rate)",
        "then (ta|ties; default 'ta'): task arithmetic or TIES after the drop",
        "seed (int; default 0): seed of the drop masks (drawn per key)",
        "rng (torch|counter; default 'torch'): masks from torch's CPU generator (reproduces torch.bernoulli) or a "
        "counter-based hash (the same on every device; fused, several times faster on a CPU)",
    ]


def test_option_check_converts_and_refuses_naming_the_field():
    """Option.check: a required option without a value, a number at an open bound (also for a list of numbers),
    a string or a scalar where a list of numbers is expected, and a list entry out of range are refused with exact
    messages naming the field (and the entry); a list of numbers comes back as a list of floats."""
    with pytest.raises(MergeConfigError, match=r"^methods\.x\.lam is required\.$"):
        Option("lam", required=True).check(None, "methods.x.lam")
    assert Option("lam").check(None, "lam") is None
    with pytest.raises(MergeConfigError, match=r"^p must lie in \[0, 1\), got 1.0.$"):
        Option("p", 0.5, low=0.0, high=1.0, high_open=True).check(1.0, "p")
    assert Option("p", 0.5, low=0.0, high=1.0).check(1.0, "p") == 1.0
    with pytest.raises(MergeConfigError, match=r"^d must lie in \(0, 1\], got 0.0.$"):
        Option("d", 0.5, low=0.0, high=1.0, low_open=True).check(0.0, "d")
    with pytest.raises(MergeConfigError, match=r"^ds\[0\] must lie in \(0, 1\], got 0.0.$"):
        Option("ds", [0.5], kind="numbers", low=0.0, high=1.0, low_open=True).check([0.0], "ds")
    many = Option("ks", [0.5], kind="numbers", low=0.0, high=1.0, high_open=True)
    assert many.check((0.25, 0.5), "ks") == [0.25, 0.5]
    for bad in ("0.5", 0.5, b"x"):
        with pytest.raises(MergeConfigError, match=rf"^ks must be a list of numbers, got {re.escape(repr(bad))}.$"):
            many.check(bad, "ks")
    with pytest.raises(MergeConfigError, match=r"^ks\[1\] must lie in \[0, 1\), got 1.0.$"):
        many.check([0.5, 1.0], "ks")  # the open upper bound, per entry
    with pytest.raises(MergeConfigError, match=r"^ks\[0\] must be a number"):
        many.check(["a"], "ks")


def test_option_check_of_ints_bools_and_strings_and_unknown_options_by_flag():
    """An int option's bounds are rounded inwards (ceil of the low, floor of the high) and refused naming the
    field; bool and str options take only their type, with exact messages; an unknown method option is named by
    its flag when the caller maps it, and a method without options says "none"."""
    k = Option("k", 2, kind="int", low=0.5, high=3.7)
    assert k.check(1, "k") == 1 and k.check(3, "k") == 3
    with pytest.raises(MergeConfigError, match=r"^k must be"):
        k.check(0, "k")
    with pytest.raises(MergeConfigError, match=r"^k must be"):
        k.check(4, "k")
    assert Option("k", 2, kind="int").check(-7, "k") == -7  # no bounds
    with pytest.raises(MergeConfigError, match=r"^flag must be true or false, got 'yes'.$"):
        Option("flag", False, kind="bool").check("yes", "flag")
    assert Option("flag", False, kind="bool").check(True, "flag") is True
    with pytest.raises(MergeConfigError, match=r"^name must be a string, got 3 \(int\).$"):
        Option("name", "a", kind="str").check(3, "name")
    assert Option("name", "a", kind="str").check("b", "name") == "b"
    plain = MergeMethod("plain_for_test", "tensor", lambda deltas, ctx: deltas[0])
    with pytest.raises(
        MergeConfigError, match=r"^--lam is not an option of method 'plain_for_test'; its options: none.$"
    ):
        plain.resolve({"lam": 1.0}, [{}], names={"lam": "--lam"})
    with pytest.raises(MergeConfigError, match=r"^parameters.lam is not an option of method 'plain_for_test'"):
        plain.resolve({"lam": 1.0}, [{}])


def test_resolve_fills_per_input_options_from_the_input_the_method_level_or_the_default():
    """resolve: a per-input option comes from the input, else the method level (checked under its method-level
    field name, flag if mapped), else the default (None allowed unless required, named by input); per-input options
    leave the method-level dict; a method-level-only key at an input, or a method without per-input options, is
    refused naming the allowed ones ("none"); the input count is checked against min/max."""
    method = MergeMethod(
        "resolve_for_test",
        "tensor",
        lambda deltas, ctx: deltas[0],
        options=(
            Option("lam", 1.0, low=0.0),
            Option("weight", 1.0, per_input=True, low=0.0),
            Option("density", None, per_input=True, low=0.0, high=1.0),
            Option("seed", None, kind="int", per_input=True, required=True),
        ),
        min_inputs=2,
        max_inputs=3,
    )
    options, per = method.resolve({"weight": 0.5}, [{"seed": 1}, {"seed": 2, "weight": 2.0, "density": 0.3}])
    assert options == {"lam": 1.0}
    assert per == [{"weight": 0.5, "density": None, "seed": 1}, {"weight": 2.0, "density": 0.3, "seed": 2}]
    with pytest.raises(MergeConfigError, match=r"^--weight must lie in \[0, inf\), got -1.0.$"):
        method.resolve({"weight": -1.0}, [{"seed": 1}, {"seed": 2}], names={"weight": "--weight"})
    with pytest.raises(MergeConfigError, match=r"^parameters.weight must lie in \[0, inf\), got -1.0.$"):
        method.resolve({"weight": -1.0}, [{"seed": 1}, {"seed": 2}])
    with pytest.raises(MergeConfigError, match=r"^inputs\[1\].seed is required by method 'resolve_for_test'.$"):
        method.resolve({}, [{"seed": 1}, {}])
    with pytest.raises(
        MergeConfigError,
        match=r"^inputs\[0\].lam is not a per-input option of method 'resolve_for_test' \(per-input options: "
        r"weight, density, seed\).$",
    ):
        method.resolve({}, [{"lam": 1.0, "seed": 1}, {"seed": 2}])
    plain = MergeMethod("plain_for_test", "tensor", lambda deltas, ctx: deltas[0], options=(Option("lam", 1.0),))
    with pytest.raises(
        MergeConfigError,
        match=r"^inputs\[0\].weight is not a per-input option of method 'plain_for_test' \(per-input options: none\).$",
    ):
        plain.resolve({}, [{"weight": 1.0}])
    for n, want in ((1, "2 to 3"), (4, "2 to 3")):
        with pytest.raises(MergeConfigError, match=rf"^method 'resolve_for_test' merges {want} input\(s\); got {n}.$"):
            method.resolve({}, [{"seed": 1}] * n)
    at_least = MergeMethod("open_for_test", "tensor", lambda deltas, ctx: deltas[0], min_inputs=2)
    with pytest.raises(MergeConfigError, match=r"^method 'open_for_test' merges at least 2 input\(s\); got 1.$"):
        at_least.resolve({}, [{}])
    assert at_least.resolve({}, [{}] * 9) == ({}, [{}] * 9)


def test_resolve_checks_defaults_and_required_method_options_and_lists_the_known_ones():
    """A required method-level option left out is refused; a default is converted like a given value (a tuple of
    numbers becomes a list); an unknown option lists the method's options."""
    method = MergeMethod(
        "defaults_for_test",
        "tensor",
        lambda deltas, ctx: deltas[0],
        options=(
            Option("scale", required=True),
            Option("ks", (0.5, 1), kind="numbers", per_input=True),
            Option("lam", 1.0),
        ),
    )
    with pytest.raises(MergeConfigError, match=r"^parameters.scale is required.$"):
        method.resolve({}, [{}])
    options, per = method.resolve({"scale": 2}, [{}])
    assert options == {"scale": 2.0, "lam": 1.0} and per == [{"ks": [0.5, 1.0]}] and isinstance(per[0]["ks"], list)
    with pytest.raises(
        MergeConfigError,
        match=r"^parameters.nope is not an option of method 'defaults_for_test'; its options: ks, lam, scale.$",
    ):
        method.resolve({"scale": 2, "nope": 1}, [{}])


@pytest.mark.parametrize("density", [0.4, 1.0])
def test_model_scope_ties_kernel_whole_tensor_form_equals_the_blocked_form(density):
    """The model-wide TIES kernel with its prepare pass's state (thresholds, zero sign), in its whole-tensor form (fp64
    inputs: what a GPU runs) and its blocked fp32 form, on dyadic inputs with ties at the thresholds and an exact
    zero sum: the same result, which is the one-shot function's."""
    from hf_cft.merging.registry import ModelContext

    g = torch.Generator().manual_seed(8)
    deltas = [{"a.weight": torch.randint(-4, 5, (6, 5), generator=g).float() / 2} for _ in range(3)]
    deltas[0]["a.weight"][0, 0], deltas[1]["a.weight"][0, 0], deltas[2]["a.weight"][0, 0] = 0.0, 1.0, -1.0
    method = get_method("ties")
    opts, per = method.resolve({"trim_scope": "model", "density": density}, [{} for _ in deltas])
    out = {}
    for dtype in (torch.float32, torch.float64):
        ds = [{k: v.to(dtype) for k, v in d.items()} for d in deltas]
        state = method.prepare(ds, ModelContext(opts, per, {}, {"a.weight": (6, 5)}))
        ctx = TensorContext("a.weight", opts, per, [True] * 3, lambda: None, state=state)
        out[dtype] = method.fn([d["a.weight"] for d in ds], ctx)
    assert out[torch.float64].dtype == torch.float64
    torch.testing.assert_close(out[torch.float64].float(), out[torch.float32], rtol=0, atol=0)
    want = baselines.ties(deltas, k=density, lam=1.0, trim_scope="model")["a.weight"]
    torch.testing.assert_close(out[torch.float32], want, rtol=0, atol=0)
