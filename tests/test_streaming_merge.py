"""The rules of hf_cft.merging.streaming's merge drivers: what merge_folders / merge_deltas write and return (the
merged weights, the keys copied from θ⁰, the summary, config.json), what a method is handed (θ⁰ as fp32, the key's
index, the lazy base and θ⁰'s folder), the checks on what a method returns (an unknown key, a tensor of the wrong
shape, a non-finite merged delta, a mapping or an iterable of pairs), when the inputs are checked for NaN/inf, and the
refusals, each naming what it refuses. Tiny hand-made model folders; custom methods are registered for one test
only."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_cft.errors import BundleError, DeltaError, MergeConfigError, NonFiniteError
from hf_cft.merging import registry
from hf_cft.merging.registry import MergeMethod, Option
from hf_cft.merging.streaming import _DeltaInput, _merged_keys, merge_deltas, merge_folders

BASE = {
    "a.weight": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
    "b.ids": torch.tensor([7, 8, 9]),  # not floating: copied from θ⁰, never merged
    "c.bias": torch.tensor([0.5, -0.5]),
    "d.weight": torch.tensor([2.0, 4.0]),  # no input has it: copied from θ⁰
}
FT = {
    "a.weight": BASE["a.weight"] + torch.tensor([[2.0, 0.0, -2.0], [4.0, 0.0, 8.0]]),
    "c.bias": torch.tensor([1.5, 0.5]),
}


def _model(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def folders(tmp_path):
    base = _model(tmp_path / "base", BASE, {"model_type": "tiny"})
    ft = _model(tmp_path / "ft", FT, {"model_type": "tiny"})
    return base, ft


@pytest.fixture
def method():
    """``method(name, kind, fn, **fields)`` registers a merging method for this test only."""
    registry.method_names()  # the built-in methods first, so that none is loaded over ours later
    added = []

    def add(name, kind, fn, **fields):
        added.append(name)
        return registry.register(MergeMethod(name, kind, fn, **fields))

    yield add
    for name in added:
        registry._METHODS.pop(name, None)


def _load(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ merge_folders


def test_full_merge_adds_the_merged_delta_copies_the_other_keys_and_returns_its_summary(folders, tmp_path):
    base, ft = folders
    summary = merge_folders(base, [ft], "task_arithmetic", inputs=[{"weight": 0.5}], out=tmp_path / "out")
    assert summary == {
        "method": "task_arithmetic",
        "parameters": {},
        "inputs": [{"weight": 0.5}],
        "keys_merged": 2,
        "files": ["model.safetensors"],
    }
    got = _load(tmp_path / "out")
    assert sorted(got) == ["a.weight", "b.ids", "c.bias", "d.weight"]
    assert torch.equal(got["a.weight"], torch.tensor([[2.0, 2.0, 2.0], [6.0, 5.0, 10.0]]))
    assert torch.equal(got["c.bias"], torch.tensor([1.0, 0.0]))
    # a non-floating key in the middle of θ⁰'s order is copied as is, and the keys after it are still written
    assert got["b.ids"].dtype == torch.int64 and got["b.ids"].tolist() == [7, 8, 9]
    assert torch.equal(got["d.weight"], BASE["d.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "tiny"}


def test_full_merge_refuses_an_unknown_out_dtype_listing_the_choices(folders, tmp_path):
    base, ft = folders
    with pytest.raises(MergeConfigError) as err:
        merge_folders(base, [ft], "task_arithmetic", out=tmp_path / "out", out_dtype="int8")
    assert str(err.value) == "out_dtype must be one of ('float32', 'float16', 'bfloat16') or None, got 'int8'."
    assert not (tmp_path / "out").exists()


def test_a_base_without_weights_or_without_config_json_is_named(folders, tmp_path):
    _, ft = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError) as err:
        merge_folders(empty, [ft], "task_arithmetic", out=tmp_path / "out")
    assert str(err.value).startswith(f"base model {str(empty)!r}: no safetensors weights in {str(empty)!r}.")
    bare = _model(tmp_path / "bare", BASE)  # weights, no config.json
    with pytest.raises(BundleError) as err:
        merge_folders(bare, [ft], "task_arithmetic", out=tmp_path / "out")
    config = bare / "config.json"
    assert str(err.value) == f"config.json of {str(bare)!r}: {str(config)!r} does not exist."
    assert not (tmp_path / "out").exists()


def test_tensor_methods_get_theta0_as_fp32_the_key_index_and_the_number_of_floating_keys(tmp_path, method):
    # θ⁰ stored in fp16: ctx.base() still gives fp32; index / num_keys count the floating keys only
    base = _model(tmp_path / "base", {k: v.half() if v.is_floating_point() else v for k, v in BASE.items()}, {})
    ft = _model(tmp_path / "ft", FT, {})
    seen = []

    def probe(deltas, ctx):
        seen.append((ctx.key, ctx.index, ctx.num_keys, ctx.base().dtype, ctx.base().tolist()))
        return deltas[0].clone()

    method("pinned_probe", "tensor", probe)
    merge_folders(base, [ft], "pinned_probe", out=tmp_path / "out")
    assert seen == [
        ("a.weight", 0, 3, torch.float32, BASE["a.weight"].tolist()),
        ("c.bias", 1, 3, torch.float32, BASE["c.bias"].tolist()),
    ]
    got = _load(tmp_path / "out")
    assert got["a.weight"].dtype == torch.float16 and torch.equal(got["a.weight"], FT["a.weight"].half())


def test_model_methods_get_the_base_folder_the_extra_and_a_lazy_fp32_base_of_the_floating_keys(
    folders, tmp_path, method
):
    base, ft = folders
    seen = {}

    def probe(deltas, ctx):
        seen["folder"] = (ctx.base_model, ctx.extra)
        seen["base"] = (list(ctx.base), len(ctx.base), ctx.shapes)
        seen["a"] = ctx.base["a.weight"]
        with pytest.raises(KeyError) as missing:  # a key θ⁰ has but does not merge (int64) is missing, by name
            ctx.base["b.ids"]
        seen["missing"] = missing.value.args
        return {"c.bias": deltas[0]["c.bias"] * 2}

    method("pinned_model_probe", "model", probe)
    summary = merge_folders(base, [ft], "pinned_model_probe", out=tmp_path / "out", extra={"loader": 1})
    assert seen["folder"] == (Path(base), {"base_model": Path(base), "loader": 1})
    assert seen["base"] == (
        ["a.weight", "c.bias", "d.weight"],
        3,
        {"a.weight": (2, 3), "c.bias": (2,), "d.weight": (2,)},
    )
    assert seen["a"].dtype == torch.float32 and torch.equal(seen["a"], BASE["a.weight"])
    assert seen["missing"] == ("b.ids",)
    got = _load(tmp_path / "out")
    # a key the method leaves out keeps θ⁰; the one it returns is θ⁰ + its merged delta
    assert torch.equal(got["a.weight"], BASE["a.weight"]) and torch.equal(got["c.bias"], torch.tensor([2.5, 1.5]))
    assert summary["keys_merged"] == 1


def test_full_merge_checks_each_merged_delta_naming_method_key_options_and_weights(folders, tmp_path, method):
    base, ft = folders

    def wrong_shape(deltas, ctx):
        return deltas[0].reshape(-1)

    def scaled(deltas, ctx):
        return deltas[0] * ctx.options["gain"] * ctx.inputs[0]["weight"]

    options = (Option("gain", 1.0), Option("weight", 1.0, per_input=True))
    method("pinned_wrong_shape", "tensor", wrong_shape, options=options)
    method("pinned_scaled", "tensor", scaled, options=options)
    with pytest.raises(DeltaError) as err:
        merge_folders(base, [ft], "pinned_wrong_shape", {"gain": 2.0}, out=tmp_path / "out")
    assert str(err.value) == (
        "Method 'pinned_wrong_shape' returned (6,) for key 'a.weight', expected a tensor of shape (2, 3)."
    )
    with pytest.raises(MergeConfigError) as err:
        merge_folders(base, [ft], "pinned_scaled", {"gain": 1e20}, out=tmp_path / "out", inputs=[{"weight": 1e20}])
    assert str(err.value) == (
        "The merged delta of 'pinned_scaled' at key 'a.weight' holds NaN/inf: its options {'gain': 1e+20} or the "
        "inputs' weights [1e+20] scale finite inputs beyond the float range; use smaller values."
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ merge_deltas


def test_merge_deltas_gives_zeros_for_keys_only_shapes_names_and_has_no_theta0(method):
    seen = []

    def probe(deltas, ctx):
        seen.append((ctx.key, ctx.base()))
        return deltas[0] * 2

    def model_probe(deltas, ctx):
        seen.append((ctx.base_model, ctx.base["w"]))
        return {}

    method("pinned_tensor_probe", "tensor", probe)
    method("pinned_model_probe", "model", model_probe)
    out = merge_deltas([{"w": torch.ones(2)}], "pinned_tensor_probe", shapes={"v": (2, 3)})
    assert list(out) == ["v", "w"]
    assert torch.equal(out["v"], torch.zeros(2, 3)) and torch.equal(out["w"], torch.full((2,), 2.0))
    out = merge_deltas([{"w": torch.ones(2)}], "pinned_model_probe")
    assert torch.equal(out["w"], torch.zeros(2))
    assert seen == [("w", None), (None, None)]  # in-memory deltas: no θ⁰, no base folder


class _PairsOnly(Mapping):
    """A mapping read through ``items()`` only (its values are not looked up by key)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __getitem__(self, key):
        raise KeyError(key)

    def __iter__(self):
        return iter(k for k, _ in self.pairs)

    def __len__(self):
        return len(self.pairs)

    def items(self):
        return iter(self.pairs)


def test_model_methods_may_return_a_mapping_or_pairs_but_no_key_theta0_lacks(method):
    d = {"w": torch.tensor([1.0, -2.0]), "v": torch.tensor([3.0])}
    method("pinned_pairs", "model", lambda deltas, ctx: ((k, deltas[0][k] * 3) for k in ("w", "v")))
    method("pinned_items", "model", lambda deltas, ctx: _PairsOnly([("w", deltas[0]["w"] + 1)]))
    method(
        "pinned_extra", "model", lambda deltas, ctx: {"w": deltas[0]["w"], "zzz": torch.ones(1), "yy": torch.ones(1)}
    )
    out = merge_deltas([d], "pinned_pairs")
    assert out["w"].tolist() == [3.0, -6.0] and out["v"].tolist() == [9.0]
    out = merge_deltas([d], "pinned_items")  # a mapping is read through its items()
    assert out["w"].tolist() == [2.0, -1.0] and out["v"].tolist() == [0.0]
    with pytest.raises(DeltaError) as err:
        merge_deltas([d], "pinned_extra")
    assert str(err.value) == "Method 'pinned_extra' returned key 'zzz', which θ⁰ does not have."


# ------------------------------------------------------------------------------------------------ NaN/inf checks

GOOD = {"w": torch.tensor([1.0, 2.0])}
BAD = {"w": torch.tensor([float("nan"), 2.0])}


def _drop_nonfinite(deltas, ctx):
    return sum(torch.nan_to_num(d, nan=0.0) for d in deltas)


def test_a_method_that_can_drop_a_nan_has_every_delta_it_reads_checked(method):
    method("pinned_dropper", "tensor", _drop_nonfinite)
    with pytest.raises(NonFiniteError) as err:
        merge_deltas([GOOD, BAD], "pinned_dropper")
    assert str(err.value) == "The delta of input 1 holds NaN/inf at key 'w'."


def test_a_propagating_method_has_its_inputs_checked_only_when_its_merged_delta_is_not_finite(method):
    # nonfinite_propagates trusts the method: a finite merged delta is taken as is, its inputs are not re-read
    method("pinned_trusted", "tensor", _drop_nonfinite, nonfinite_propagates=True)
    out = merge_deltas([GOOD, BAD], "pinned_trusted")
    assert out["w"].tolist() == [1.0, 4.0]
    method("pinned_sum", "tensor", lambda deltas, ctx: deltas[0] + deltas[1], nonfinite_propagates=True)
    with pytest.raises(NonFiniteError) as err:
        merge_deltas([GOOD, BAD], "pinned_sum")
    assert str(err.value) == "The delta of input 1 holds NaN/inf at key 'w'."


def test_an_overflow_of_a_method_that_can_drop_a_nan_blames_the_scale_not_an_input_it_never_read(method):
    method("pinned_first_huge", "tensor", lambda deltas, ctx: deltas[0] * 1e39)
    with pytest.raises(MergeConfigError) as err:
        merge_deltas([GOOD, BAD], "pinned_first_huge")
    assert str(err.value) == (
        "The merged delta of 'pinned_first_huge' at key 'w' holds NaN/inf: its inputs scale finite inputs beyond the "
        "float range; use smaller values."
    )


def test_theta0_of_a_key_is_read_once_however_often_the_method_asks():
    reads = []

    def base_read(key):
        reads.append(key)
        return torch.full((2,), 10.0)

    def twice(deltas, ctx):
        return deltas[0] + ctx.base() - ctx.base()

    m = MergeMethod("pinned_twice", "tensor", twice)
    inputs = [_DeltaInput({"w": torch.ones(2), "v": torch.ones(2)}, "input 0")]
    merged = dict(_merged_keys(m, inputs, {"v": (2,), "w": (2,)}, base_read, {}, [{}], {}))
    assert reads == ["v", "w"]
    assert merged["v"].tolist() == [1.0, 1.0] and merged["w"].tolist() == [1.0, 1.0]
