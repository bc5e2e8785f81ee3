"""Property-based attacks (issue 16): for generated templates, labels, deltas and option values, hf_cft either
gives the correct result or a typed error naming the culprit — never a silent wrong result or an untyped error.

Each property states the contract against an independent oracle (Python's ``str.format``, numpy, plain math).
"""

import math
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from hf_cft.data import few_shot, from_arrays, split_per_class
from hf_cft.data.templates import format_prompts, validate_templates
from hf_cft.errors import DatasetFormatError, MergeConfigError, NonFiniteError, OptionError, TemplateError
from hf_cft.merging import apply_delta, baselines
from hf_cft.testing import tiny_clip
from hf_cft.validation import PROBE_CLASS_NAME, check_labels, check_number, check_template

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEMPLATE_ALPHABET = string.ascii_letters[:6] + " .{}!:0a"


def _oracle_template_ok(t: str) -> bool:
    """A template is usable iff ``t.format(name)`` works and shows ``name`` exactly once, with one bare ``{}``."""
    try:
        text = t.format(PROBE_CLASS_NAME)
    except (IndexError, KeyError, ValueError, AttributeError, TypeError):  # e.g. "{.0}" (attribute access)
        return False
    bare = t.replace("{{", "").replace("}}", "")
    return text.count(PROBE_CLASS_NAME) == 1 and bare.count("{") == bare.count("}") == 1 and "{}" in bare


@SETTINGS
@example("{.0}")  # attribute access on the class name: found by hypothesis in a CI run
@example("{0.real}")
@example("{[0]}")
@given(st.text(alphabet=TEMPLATE_ALPHABET, max_size=14))
def test_template_validation_agrees_with_formatting(template):
    if _oracle_template_ok(template):
        assert check_template(template) == template
        assert format_prompts(["sea lion"], [template]) == [template.format("sea lion")]
    else:
        with pytest.raises(TemplateError) as info:
            validate_templates([template])
        assert repr(template) in str(info.value)


@SETTINGS
@given(st.text(alphabet=string.ascii_letters + " .,'-", min_size=1, max_size=12), st.text(max_size=10))
def test_an_accepted_template_shows_every_class_name_once(name, prefix):
    assume(name.strip() and "{" not in prefix and "}" not in prefix)
    template = prefix + " {}."
    (prompt,) = format_prompts([name], [template])
    assert prompt == f"{prefix} {name}." and prompt.count(name) >= 1


@SETTINGS
@given(
    st.lists(st.integers(min_value=-3, max_value=8), min_size=1, max_size=20),
    st.integers(min_value=1, max_value=6),
)
def test_labels_are_range_checked(labels, num_classes):
    bad = sorted({v for v in labels if not 0 <= v < num_classes})
    if bad:
        with pytest.raises(DatasetFormatError) as info:
            check_labels(labels, num_classes, "split 'test'")
        assert str(bad[0]) in str(info.value) and "split 'test'" in str(info.value)
    else:
        check_labels(labels, num_classes, "split 'test'")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=-2, max_value=4), min_size=2, max_size=8))
def test_from_arrays_refuses_labels_outside_the_names(labels):
    images = [np.zeros((4, 4, 3), np.uint8)] * len(labels)
    names = ["a", "b", "c"]
    if all(0 <= v < 3 for v in labels):
        ds = from_arrays(images, labels, names, ["a {}."], name="gen")["train"]
        assert list(ds["label"]) == labels
    else:
        with pytest.raises(Exception) as info:  # noqa: PT011 - the typed classes are asserted below
            from_arrays(images, labels, names, ["a {}."], name="gen")
        assert type(info.value).__module__ == "hf_cft.errors", type(info.value)


finite = st.floats(allow_nan=False, allow_infinity=False, width=32, min_value=-1e3, max_value=1e3)
any_float = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308]))


@SETTINGS
@given(any_float, st.floats(min_value=-5, max_value=5), st.floats(min_value=-5, max_value=5))
def test_check_number_is_exactly_the_interval(value, lo, hi):
    assume(lo < hi)
    inside = math.isfinite(value) and lo <= value <= hi
    if inside:
        assert check_number(value, "x", low=lo, high=hi) == value
    else:
        with pytest.raises(OptionError, match=r"\bx\b"):
            check_number(value, "x", low=lo, high=hi)


@SETTINGS
@given(any_float)
def test_ties_k_is_checked_in_the_python_api_as_in_the_cli(k):
    deltas = [{"w": torch.ones(4)}, {"w": -torch.ones(4) * 2}]
    if math.isfinite(k) and 0 < k <= 1:
        out = baselines.ties(deltas, k=k)
        assert torch.isfinite(out["w"]).all()
    else:
        with pytest.raises(MergeConfigError, match=r"\bk\b"):
            baselines.ties(deltas, k=k)


@SETTINGS
@given(st.lists(finite, min_size=3, max_size=3), st.lists(finite, min_size=3, max_size=3), any_float)
def test_task_arithmetic_is_the_weighted_sum_or_a_typed_error(a, b, lam):
    deltas = [{"w": torch.tensor(a)}, {"w": torch.tensor(b)}]
    try:
        out = baselines.task_arithmetic(deltas, lam=lam)
    except MergeConfigError as exc:
        assert "lam" in str(exc)
        # refused only when λ is not finite or scales an entry beyond float32 (the products the merge computes)
        assert not math.isfinite(lam) or max(abs(lam * x) for x in [*a, *b]) > 1e38 or abs(lam) > 1e38
        return
    want = lam * (torch.tensor(a) + torch.tensor(b))
    assert torch.isfinite(out["w"]).all()
    assert torch.allclose(out["w"], want, rtol=1e-5, atol=1e-5 * max(1.0, abs(lam)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_float, st.booleans())
def test_apply_delta_adds_scale_times_delta_or_leaves_the_model(scale, nan_entry):
    model = tiny_clip()
    before = model.text_projection.weight.detach().clone()
    delta = torch.full((16, 32), 0.5)
    if nan_entry:
        delta[3, 4] = math.nan
    try:
        apply_delta(model, {"text_projection.weight": delta}, scale=scale)
    except (NonFiniteError, OptionError) as exc:
        assert "scale" in str(exc) or "text_projection.weight" in str(exc)
        assert torch.equal(model.text_projection.weight, before)  # untouched
        return
    assert not nan_entry and math.isfinite(scale)
    assert torch.allclose(model.text_projection.weight, before + scale * delta, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.integers(min_value=-3, max_value=5), st.floats(min_value=-2, max_value=4)))
def test_few_shot_k_and_fractions_are_checked(k):
    images = [np.zeros((4, 4, 3), np.uint8)] * 9
    ds = from_arrays(images, [0, 1, 2] * 3, ["a", "b", "c"], ["a {}."], name="gen")["train"]
    integral = float(k).is_integer()
    if integral and 1 <= k <= 3:
        assert len(few_shot(ds, k)) == 3 * int(k)
    elif integral and k > 3:
        with pytest.raises(Exception, match="shots") as info:  # FewShotError: a class is short
            few_shot(ds, k)
        assert type(info.value).__module__ == "hf_cft.errors"
    else:
        with pytest.raises(OptionError, match=r"\bk\b"):
            few_shot(ds, k)
    if 0 <= k <= 1:
        a, b = split_per_class(ds, float(k))
        assert len(a) + len(b) == 9
    else:
        with pytest.raises(OptionError, match="fraction"):
            split_per_class(ds, float(k))
