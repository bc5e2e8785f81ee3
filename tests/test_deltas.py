"""Task deltas: from models / state dicts / safetensors (streamed), from LoRA adapters (dense and factors),
validation errors naming the key, base fingerprints, experts θ⁰ + s·δ via functional_call."""

import copy
import json
import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_cft.errors import AdapterError, BundleError, DeltaError, NonFiniteError
from hf_cft.merging import (
    LazyDelta,
    TaskDelta,
    apply_delta,
    base_fingerprint,
    check_compatible,
    delta_from_lora,
    delta_from_models,
    functional_expert,
    iter_delta,
    lora_factor_delta,
    validate_delta,
)
from hf_cft.merging.deltas import _Source
from hf_cft.models import image_features
from hf_cft.testing import tiny_clip

FC1 = "text_model.encoder.layers.0.mlp.fc1.weight"


def _perturbed(model, seed=1, scale=0.01, only=None):
    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if only is None or only in n:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


def _lora(model, seed=3, **cfg):
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], **cfg}
    torch.manual_seed(seed)  # PEFT draws A from the global generator
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # PEFT zero-initialises B: make the adapter do something
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return peft_model


def _merged_minus_base(peft_model, base):
    merged = copy.deepcopy(peft_model).merge_and_unload()
    sd, b = merged.state_dict(), base.state_dict()
    return {k: sd[k] - b[k] for k in b if not torch.equal(sd[k], b[k])}


# ------------------------------------------------------------------------------------------- full models


def test_delta_from_models_is_the_difference_and_excludes_logit_scale(clip_model):
    ft = _perturbed(clip_model)
    with torch.no_grad():
        ft.logit_scale.add_(1.0)
    delta = delta_from_models(clip_model, ft)
    assert isinstance(delta, TaskDelta) and "logit_scale" not in delta
    sd_b, sd_f = clip_model.state_dict(), ft.state_dict()
    assert set(delta) == {k for k in sd_b if k != "logit_scale"}
    for k, d in delta.items():
        assert d.dtype == torch.float32
        torch.testing.assert_close(d, sd_f[k] - sd_b[k], rtol=0, atol=0)
    assert delta.base_fingerprint == base_fingerprint(clip_model)


def test_trainable_keys_and_explicit_keys(clip_model):
    ft = _perturbed(clip_model, only="vision_model")
    for n, p in ft.named_parameters():
        p.requires_grad_("vision_model.encoder" in n)
    delta = delta_from_models(clip_model, ft, keys="trainable")
    assert delta and all(k.startswith("vision_model.encoder") for k in delta)
    assert set(delta_from_models(clip_model, ft, keys=[FC1])) == {FC1}
    for p in ft.parameters():
        p.requires_grad_(False)
    with pytest.raises(DeltaError, match="requires_grad"):
        delta_from_models(clip_model, ft, keys="trainable")
    with pytest.raises(DeltaError, match="trainable"):
        delta_from_models(clip_model.state_dict(), ft.state_dict(), keys="trainable")


def test_state_dicts_and_safetensors_folders_stream_the_same_delta(clip_model, tmp_path):
    ft = _perturbed(clip_model)
    ref = delta_from_models(clip_model, ft)
    clip_model.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft", max_shard_size="60KB")  # sharded: index.json + several files
    assert (tmp_path / "ft" / "model.safetensors.index.json").is_file()
    gen = iter_delta(tmp_path / "base", tmp_path / "ft")
    assert iter(gen) is gen  # a generator: one tensor at a time
    from_disk = delta_from_models(tmp_path / "base", tmp_path / "ft")
    from_sd = delta_from_models(clip_model.state_dict(), ft.state_dict())
    assert set(from_disk) == set(ref) == set(from_sd)
    for k in ref:
        assert torch.equal(from_disk[k], ref[k]) and torch.equal(from_sd[k], ref[k])
    assert from_disk.base_fingerprint == from_sd.base_fingerprint == ref.base_fingerprint
    only = delta_from_models(tmp_path / "base", {FC1: ft.state_dict()[FC1]})  # a trained-keys-only state dict
    assert set(only) == {FC1}


def test_fingerprint_distinguishes_bases_and_check_compatible(clip_model):
    other = tiny_clip(seed=5)
    assert base_fingerprint(other) != base_fingerprint(clip_model)
    a = delta_from_models(clip_model, _perturbed(clip_model))
    b = delta_from_models(other, _perturbed(other))
    with pytest.raises(DeltaError, match="different base models"):
        check_compatible(a, b)
    check_compatible(a, delta_from_models(clip_model, _perturbed(clip_model, seed=2)))


def test_errors_name_the_key(clip_model, tmp_path):
    ft = clip_model.state_dict()
    bad_shape = dict(ft)
    bad_shape[FC1] = torch.zeros(3, 3)
    with pytest.raises(DeltaError, match="mlp.fc1.weight"):
        delta_from_models(clip_model, bad_shape)
    extra = {**ft, "vision_model.extra.weight": torch.zeros(2)}
    with pytest.raises(DeltaError, match="vision_model.extra.weight"):
        delta_from_models(clip_model, extra)
    nan = dict(ft)
    nan[FC1] = ft[FC1].clone()
    nan[FC1][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="mlp.fc1.weight"):
        delta_from_models(clip_model, nan)
    with pytest.raises(NonFiniteError, match="k2"):
        validate_delta({"k1": torch.zeros(2), "k2": torch.tensor([1.0, float("inf")])})
    with pytest.raises(DeltaError, match="lacks key 'b'"):
        validate_delta({"a": torch.zeros(2)}, {"a": (2,), "b": (3,)})
    with pytest.raises(DeltaError, match="'a' .* shape"):
        validate_delta({"a": torch.zeros(3)}, {"a": (2,)})
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(BundleError, match="safetensors only"):
        delta_from_models(clip_model, tmp_path / "pickled")


# ------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT misreads lora_B.bias as a shard
@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"use_rslora": True, "lora_alpha": 1, "r": 4},
        {"alpha_pattern": {"fc2": 3}, "rank_pattern": {"fc2": 2}},
        {"lora_bias": True},
    ],
    ids=["plain", "rslora", "patterns", "lora_bias"],
)
def test_lora_dense_delta_equals_merge_and_unload(clip_model, tmp_path, cfg):
    peft_model = _lora(clip_model, **cfg)
    if cfg.get("lora_bias"):
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.normal_(0, 0.1)
    expected = _merged_minus_base(peft_model, clip_model)
    delta = delta_from_lora(peft_model, clip_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    from_folder = delta_from_lora(tmp_path / "adapter", clip_model)
    assert set(delta) == set(expected) == set(from_folder)
    assert FC1 in delta  # keyed by the base weight key
    for k in expected:
        torch.testing.assert_close(delta[k], expected[k], rtol=1e-5, atol=1e-7)
        assert torch.equal(from_folder[k], delta[k])
    assert delta.base_fingerprint == base_fingerprint(clip_model)


def test_rslora_scaling_is_alpha_over_sqrt_r(clip_model):
    plain = _lora(clip_model, r=4, lora_alpha=2)
    rs = _lora(clip_model, r=4, lora_alpha=2, use_rslora=True)  # same seed: same A and B
    d_plain, d_rs = delta_from_lora(plain, clip_model), delta_from_lora(rs, clip_model)
    # plain: 2/4 = 0.5; rsLoRA: 2/sqrt(4) = 1.0
    torch.testing.assert_close(d_rs[FC1], 2.0 * d_plain[FC1])
    layer = rs.base_model.model.text_model.encoder.layers[0].mlp.fc1
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(d_rs[FC1], (2 / 4**0.5) * b @ a)


def test_dora_and_non_lora_are_refused(clip_model, tmp_path):
    dora = get_peft_model(copy.deepcopy(clip_model), LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    with pytest.raises(AdapterError, match="DoRA"):
        delta_from_lora(dora, clip_model)
    saved = _lora(clip_model, modules_to_save=["visual_projection"])
    with pytest.raises(AdapterError, match="not LoRA A/B factors"):
        delta_from_lora(saved, clip_model)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        delta_from_lora(tmp_path, clip_model)
    peft_model = _lora(clip_model)
    peft_model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="DoRA"):
        delta_from_lora(tmp_path / "a", clip_model)


def test_lora_target_missing_from_base_names_the_key(clip_model):
    peft_model = _lora(clip_model)
    sd = {k: v for k, v in clip_model.state_dict().items() if k != FC1}
    with pytest.raises(DeltaError, match="mlp.fc1.weight"):
        delta_from_lora(peft_model, sd)


def test_lora_factor_delta_rebuilds_the_adapter_through_the_reference(clip_model):
    torch.manual_seed(11)
    reference = get_peft_model(copy.deepcopy(clip_model), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]))
    trained = copy.deepcopy(reference)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    delta = lora_factor_delta(trained, reference)
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in delta)
    assert len(delta) == 2 * 2 * 2  # fc1 in 2 layers of 2 towers, A and B each
    px = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        want = image_features(trained, px)
        got = functional_expert(reference, delta).run(image_features, px)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    other = get_peft_model(copy.deepcopy(clip_model), LoraConfig(r=4, lora_alpha=4, target_modules=["fc1"]))
    with pytest.raises(DeltaError, match="scaling"):
        lora_factor_delta(other, reference)


# ---------------------------------------------------------------------------------------------- experts


def test_functional_expert_equals_applied_delta_and_leaves_base_untouched(clip_model):
    ft = _perturbed(clip_model, scale=0.05)
    with torch.no_grad():
        ft.logit_scale.copy_(clip_model.logit_scale)  # not part of the delta
    delta = delta_from_models(clip_model, ft)
    before = {k: v.clone() for k, v in clip_model.state_dict().items()}
    px = torch.randn(3, 3, 30, 30)
    with torch.no_grad():
        got = functional_expert(clip_model, delta, scale=0.5).run(image_features, px)
        ids = torch.tensor([[97, 5, 6, 98]])
        fwd = functional_expert(clip_model, delta)(input_ids=ids, pixel_values=px).logits_per_image
        want = image_features(apply_delta(copy.deepcopy(clip_model), delta, scale=0.5), px)
        want_fwd = ft(input_ids=ids, pixel_values=px).logits_per_image
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fwd, want_fwd, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in clip_model.state_dict().items())
    with pytest.raises(DeltaError, match="nope.weight"):
        functional_expert(clip_model, {"nope.weight": torch.zeros(1)})
    with pytest.raises(DeltaError, match="another base model"):
        functional_expert(tiny_clip(seed=4), delta)


# ------------------------------------------------------------------------------------------------ pinned rules
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py).


def test_check_compatible_on_plain_dicts_names_the_second_delta_and_both_fingerprints():
    a = {"w": torch.zeros(2, 3)}
    check_compatible(a, {"w": torch.ones(2, 3)})  # plain dicts carry no fingerprint
    with pytest.raises(DeltaError, match=r"^Key 'w' of the new delta has shape \(3, 2\), expected \(2, 3\).$"):
        check_compatible(a, {"w": torch.ones(3, 2)}, names=("old delta", "new delta"))
    with pytest.raises(DeltaError, match=r"^The second lacks key 'w' and has unknown key 'v'"):
        check_compatible(a, {"v": torch.ones(2, 3)}, names=("first", "second"))
    fa, fb = TaskDelta(a, base_fingerprint="aaa"), TaskDelta({"w": torch.ones(2, 3)}, base_fingerprint="bbb")
    message = r"^The first and the second were taken from different base models \(fingerprints aaa and bbb\).$"
    with pytest.raises(DeltaError, match=message):
        check_compatible(fa, fb, names=("first", "second"))
    check_compatible(fa, {"w": torch.ones(2, 3)})  # one side without a fingerprint: not compared


def test_lazy_delta_read_flat_checks_converts_and_names_its_source(tmp_path):
    """``read_flat``: fp32 slices of the flattened tensor from a file (checked for NaN/inf unless check=False,
    the error naming the file), the same from a getter-only lazy delta, KeyError for an unknown key."""
    from safetensors.torch import save_file

    from hf_cft.merging import LazyDelta

    half = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    save_file({"w": half}, str(tmp_path / "d.safetensors"))  # an fp16 file (save_delta would write fp32)
    lazy = LazyDelta.from_file(tmp_path / "d.safetensors")
    got = lazy.read_flat("w", 2, 7)
    assert got.dtype == torch.float32 and got.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    getter_only = LazyDelta({"w": (3, 4)}, lambda key: half.float())
    assert getter_only.read_flat("w", 5, 9).tolist() == [5.0, 6.0, 7.0, 8.0]
    with pytest.raises(KeyError) as err:
        lazy.read_flat("nope", 0, 1)
    assert err.value.args == ("nope",)
    bad = half.clone()
    bad[1, 1] = math.nan
    save_file({"w": bad}, str(tmp_path / "nan.safetensors"))
    nan = LazyDelta.from_file(tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteError, match=r"^Tensor 'w' of .*nan.safetensors.* holds 1 NaN/inf value\(s\).$"):
        nan.read_flat("w", 0, 12)
    assert torch.isnan(nan.read_flat("w", 0, 12, check=False)).sum() == 1


def test_lazy_delta_validation_and_save_delta_name_the_delta(tmp_path):
    from hf_cft.merging import LazyDelta, save_delta
    from hf_cft.merging.deltas import validate_lazy_delta

    one = LazyDelta({"w": (2,)}, lambda key: torch.ones(2))
    assert validate_lazy_delta(one) is one  # a single key is not empty
    with pytest.raises(DeltaError, match=r"^The delta is empty \(no tensors\).$"):
        validate_lazy_delta(LazyDelta({}, lambda key: None))
    with pytest.raises(DeltaError, match=r"^The task 3 lacks key 'v'"):
        validate_lazy_delta(one, {"w": (2,), "v": (1,)}, name="task 3")
    with pytest.raises(NonFiniteError, match=r"delta written to out.safetensors"):
        save_delta({"w": torch.tensor([1.0, math.inf])}, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_functional_expert_passes_positional_arguments_to_the_forward():
    model = torch.nn.Linear(3, 2)
    delta = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(functional_expert(model, delta)(x), x @ (model.weight + 1).t() + model.bias)


def test_checkpoint_paths_single_files_adapters_missing_and_corrupt_are_named(clip_model, tmp_path):
    """A model given as one .safetensors file gives the same delta as its folder; a PEFT adapter folder, a missing
    path and a corrupt file are refused with the path and its role."""
    from safetensors.torch import save_file

    ft = _perturbed(clip_model)
    clip_model.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    single = tmp_path / "ft.safetensors"
    save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(single))
    by_folder = delta_from_models(tmp_path / "base", tmp_path / "ft")
    by_file = delta_from_models(tmp_path / "base", single)
    assert by_folder.keys() == by_file.keys() and all(torch.equal(by_folder[k], by_file[k]) for k in by_file)
    _lora(clip_model).save_pretrained(tmp_path / "adapter")
    with pytest.raises(DeltaError) as err:
        delta_from_models(tmp_path / "base", tmp_path / "adapter")
    assert str(err.value) == (
        f"{str(tmp_path / 'adapter')!r} (fine-tuned model) is a PEFT adapter folder; take its delta with "
        "delta_from_lora(folder, base)."
    )
    with pytest.raises(BundleError) as err:
        delta_from_models(tmp_path / "base", tmp_path / "nowhere")
    assert str(err.value) == f"The fine-tuned model path {str(tmp_path / 'nowhere')!r} does not exist."
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(
        BundleError, match=r"^Cannot read safetensors file '.*bad.safetensors' of the fine-tuned model: "
    ):
        delta_from_models(tmp_path / "base", tmp_path / "bad.safetensors")


def test_lora_factor_deltas_refuse_mismatched_adapters_by_name_and_densify_by_the_formula(clip_model):
    """Factor deltas need a PeftModel reference with the same targets and scaling; every refusal names the target.
    ``dense_delta_from_factors`` is s·((B⁰+δ_B)(A⁰+δ_A) − B⁰A⁰) per target, keyed by the base weight, with a
    reference whose B⁰ is not zero."""
    from hf_cft.errors import AdapterError
    from hf_cft.merging import dense_delta_from_factors

    reference = _lora(clip_model, seed=1, target_modules=["fc1"])  # B⁰ ≠ 0
    with pytest.raises(AdapterError, match=r"^lora_merge='factors' needs the reference as a PeftModel"):
        lora_factor_delta(reference, clip_model)
    with pytest.raises(AdapterError, match=r"^dense_delta_from_factors needs the reference as a PeftModel"):
        dense_delta_from_factors({}, clip_model)
    wider = _lora(clip_model, seed=2, target_modules=["fc1", "fc2"])
    with pytest.raises(DeltaError, match=r"^LoRA target '[\w.]+fc2' of the .* is not a target of the reference"):
        lora_factor_delta(wider, reference)
    narrower_ref = _lora(clip_model, seed=1, target_modules=["fc1", "fc2"])
    with pytest.raises(DeltaError, match=r"^The .* lacks the reference's LoRA target '[\w.]+fc2'.$"):
        lora_factor_delta(_lora(clip_model, seed=3, target_modules=["fc1"]), narrower_ref)
    trained = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    delta = lora_factor_delta(trained, reference)
    dense = dense_delta_from_factors(delta, reference)
    params = dict(reference.named_parameters())
    s = 8 / 4
    modules = sorted({k.split(".lora_")[0][len("base_model.model.") :] for k in delta})
    assert sorted(dense) == [f"{m}.weight" for m in modules] and dense.base_fingerprint is None
    for m in modules:
        a0 = params[f"base_model.model.{m}.lora_A.default.weight"].detach()
        b0 = params[f"base_model.model.{m}.lora_B.default.weight"].detach()
        da, db = (
            delta[f"base_model.model.{m}.lora_A.default.weight"],
            delta[f"base_model.model.{m}.lora_B.default.weight"],
        )
        torch.testing.assert_close(dense[f"{m}.weight"], s * ((b0 + db) @ (a0 + da) - b0 @ a0), rtol=1e-5, atol=1e-6)
    half = copy.deepcopy(reference).to(torch.bfloat16)  # a bf16 reference: the same formula, in fp32
    hparams = dict(half.named_parameters())
    for m in modules[:1]:
        a0 = hparams[f"base_model.model.{m}.lora_A.default.weight"].detach().float()
        b0 = hparams[f"base_model.model.{m}.lora_B.default.weight"].detach().float()
        da, db = (
            delta[f"base_model.model.{m}.lora_A.default.weight"],
            delta[f"base_model.model.{m}.lora_B.default.weight"],
        )
        got = dense_delta_from_factors(delta, half)[f"{m}.weight"]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, s * ((b0 + db) @ (a0 + da) - b0 @ a0), rtol=1e-5, atol=1e-6)
    missing = {k: v for k, v in delta.items() if ".lora_B." not in k}
    with pytest.raises(DeltaError, match=r"^The factor delta lacks 'base_model.model.[\w.]+lora_B.default.weight'"):
        dense_delta_from_factors(missing, reference)
    nan = copy.deepcopy(trained)
    with torch.no_grad():
        next(p for n, p in nan.named_parameters() if "lora_A" in n)[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"lora_A.default.weight' of the LoRA factor delta"):
        lora_factor_delta(nan, reference)


class _Conv1DNet(torch.nn.Module):
    """A GPT-2-style layer: ``Conv1D`` stores its weight as (in, out), so its LoRA needs ``fan_in_fan_out=True``."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.c = Conv1D(5, 3)  # weight (3, 5): in 3, out 5

    def forward(self, x):
        return self.c(x)


def _trained_copy(peft_model, seed=5, scale=0.1):
    trained = copy.deepcopy(peft_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return trained


def test_pickle_only_folders_list_every_pickle_and_a_shard_unreadable_mid_stream_is_named(clip_model, tmp_path):
    """A checkpoint folder without safetensors is refused naming the role and the folder and listing every pickle
    it holds (.bin, .pt, .pth, .ckpt; hf_cft *reads* safetensors only); a shard that becomes unreadable while
    ``iter_delta`` streams is refused naming that file and the role."""
    import re

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    for name in ("pytorch_model.bin", "c.pt", "b.pth", "a.ckpt", "notes.txt"):
        (pickles / name).write_bytes(b"not read")
    with pytest.raises(BundleError) as err:
        delta_from_models(clip_model, pickles)
    assert str(err.value) == (
        f"fine-tuned model {str(pickles)!r}: no safetensors weights in {str(pickles)!r}. It holds a.ckpt, b.pth, "
        "c.pt, pytorch_model.bin: hf_cft reads safetensors only (never pickle)."
    )
    _perturbed(clip_model).save_pretrained(tmp_path / "ft", max_shard_size="60KB")
    weight_map = json.loads((tmp_path / "ft" / "model.safetensors.index.json").read_text())["weight_map"]
    first = FC1
    second = next(k for k, f in weight_map.items() if f != weight_map[first] and k != "logit_scale")
    stream = iter_delta(clip_model, tmp_path / "ft", keys=[first, second])
    assert next(stream)[0] == first  # only the first key's shard has been opened
    shard = tmp_path / "ft" / weight_map[second]
    shard.write_bytes(b"\x00" * 16)  # replaced by something unreadable while the delta streams
    message = rf"^Cannot read safetensors file {re.escape(repr(str(shard)))} of the fine-tuned model: \S"
    with pytest.raises(BundleError, match=message):
        next(stream)


def test_lora_factor_delta_reads_the_named_adapter_against_the_references_first_active_one(clip_model):
    """With several adapters: ``adapter_name`` picks the adapter read (its name reaches the messages); a reference
    whose ``active_adapter`` is a list uses the first for both factor functions. The missing-target refusal names
    the first missing target in sorted order, and the factor delta carries the reference's fingerprint."""
    reference = _lora(clip_model, seed=1, target_modules=["fc1", "fc2"])  # B⁰ ≠ 0
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    reference.base_model.set_adapter(["default", "other"])
    reference.active_adapter = ["default", "other"]  # several active adapters
    adapter = _lora(clip_model, seed=2, r=2, target_modules=["q_proj"])  # active "default": not the one merged
    adapter.add_adapter("task", LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    adapter.add_adapter("narrow", LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]))
    ref_params, params = dict(reference.named_parameters()), dict(adapter.named_parameters())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in params.items():
            if ".task." in n:
                p.copy_(ref_params[n.replace(".task.", ".default.")] + 0.1 * torch.randn(p.shape, generator=g))
    delta = lora_factor_delta(adapter, reference, adapter_name="task")
    want = sorted(n for n in ref_params if ".default." in n and "lora_" in n)
    assert sorted(delta) == want and len(want) == 2 * 2 * 2 * 2  # fc1, fc2 × 2 layers × 2 towers × A, B
    for k in want:
        torch.testing.assert_close(delta[k], params[k.replace(".default.", ".task.")] - ref_params[k])
    assert delta.base_fingerprint == base_fingerprint(reference)
    from hf_cft.merging import dense_delta_from_factors

    dense = dense_delta_from_factors(delta, reference)
    module = "text_model.encoder.layers.1.mlp.fc2"
    a, b = (params[f"base_model.model.{module}.{p}.task.weight"].detach() for p in ("lora_A", "lora_B"))
    a0, b0 = (ref_params[f"base_model.model.{module}.{p}.default.weight"].detach() for p in ("lora_A", "lora_B"))
    torch.testing.assert_close(dense[f"{module}.weight"], 2.0 * (b @ a - b0 @ a0), rtol=1e-5, atol=1e-6)
    message = r"^The adapter 'narrow' lacks the reference's LoRA target 'text_model.encoder.layers.0.mlp.fc2'.$"
    with pytest.raises(DeltaError, match=message):  # four fc2 targets missing: the first in sorted order
        lora_factor_delta(adapter, reference, adapter_name="narrow")


def test_lora_factor_delta_scalings_agree_to_1e_12_and_factor_shapes_are_compared_before_subtracting(clip_model):
    """Scalings must agree to a relative 1e-12 (a 1e-10 difference is refused, naming both); a factor of another
    rank with the same scaling is refused naming both shapes — also a rank-1 factor, which would broadcast against
    the reference's; a reference whose factors are tied cannot address the second by name."""
    reference = _lora(clip_model, seed=1, target_modules=["fc1"])
    trained = _trained_copy(reference)
    close = copy.deepcopy(trained)
    close.peft_config["default"].lora_alpha = 8 * (1 + 1e-13)
    assert lora_factor_delta(close, reference).keys() == lora_factor_delta(trained, reference).keys()
    off = copy.deepcopy(trained)
    off.peft_config["default"].lora_alpha = 8 * (1 + 1e-10)
    message = (
        f"LoRA target 'text_model.encoder.layers.0.mlp.fc1': scaling {8 * (1 + 1e-10) / 4} differs from the "
        "reference's 2.0; factor deltas need the same r / lora_alpha / use_rslora."
    )
    with pytest.raises(DeltaError) as err:
        lora_factor_delta(off, reference)
    assert str(err.value) == message
    key = "base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.default.weight"
    for r in (1, 2, 8):  # scaling 2 as the reference's: only the shapes differ
        other = _lora(clip_model, seed=2, r=r, lora_alpha=2 * r, target_modules=["fc1"])
        with pytest.raises(DeltaError) as err:
            lora_factor_delta(other, reference)
        assert str(err.value) == f"Factor {key!r} has shape ({r}, 32), reference (4, 32)."
    tied = copy.deepcopy(reference)
    layers = tied.base_model.model.text_model.encoder.layers
    layers[1].mlp.fc1.lora_A["default"].weight = layers[0].mlp.fc1.lora_A["default"].weight
    with pytest.raises(DeltaError) as err:
        lora_factor_delta(trained, tied)
    assert str(err.value) == (
        "The reference PeftModel has no parameter "
        "'base_model.model.text_model.encoder.layers.1.mlp.fc1.lora_A.default.weight'."
    )


def test_factor_deltas_are_fp32_from_float64_inputs_and_rank_errors_name_the_adapter_or_the_reference(
    clip_model, tmp_path
):
    """Factor deltas and their dense form are fp32 whatever the adapter's, the reference's or the factor delta's
    dtype (float64 included). A config whose r disagrees with the factors is refused naming the adapter folder, or
    the reference adapter by name in both factor functions."""
    from hf_cft.merging import dense_delta_from_factors

    reference = _lora(clip_model, seed=1, target_modules=["fc1"])
    trained = _trained_copy(reference)
    want = lora_factor_delta(trained, reference)
    for adapter, ref in ((copy.deepcopy(trained).double(), reference), (trained, copy.deepcopy(reference).double())):
        got = lora_factor_delta(adapter, ref)
        assert got.keys() == want.keys() and all(t.dtype == torch.float32 for t in got.values())
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    dense = dense_delta_from_factors(want, reference)
    dense64 = dense_delta_from_factors({k: v.double() for k, v in want.items()}, reference)
    assert dense64.keys() == dense.keys() and all(t.dtype == torch.float32 for t in dense64.values())
    for k in dense:
        torch.testing.assert_close(dense64[k], dense[k], rtol=1e-6, atol=1e-7)
    module = "text_model.encoder.layers.0.mlp.fc1"
    trained.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["r"] = 2
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError) as err:
        lora_factor_delta(tmp_path / "adapter", reference)
    assert str(err.value) == (
        f"Module {module!r} of the adapter folder {str(tmp_path / 'adapter')!r}: lora_A has rank 4 and lora_B rank 4 "
        "but the config says r=2."
    )
    wrong = copy.deepcopy(reference)
    wrong.peft_config["default"].r = 2
    message = (
        f"Module {module!r} of the reference adapter 'default': lora_A has rank 4 and lora_B rank 4 but the config "
        "says r=2."
    )
    with pytest.raises(AdapterError) as err:
        lora_factor_delta(trained, wrong)
    assert str(err.value) == message
    with pytest.raises(AdapterError) as err:
        dense_delta_from_factors(want, wrong)
    assert str(err.value) == message


def test_fan_in_fan_out_adapters_give_the_transposed_delta(tmp_path):
    """A LoRA of a GPT-2-style ``Conv1D`` (``fan_in_fan_out=True``, weight stored as (in, out)): the dense delta and
    the dense form of its factor deltas are ``(s·B@A)ᵀ``, shaped like the weight, equal to what merge_and_unload
    adds."""
    from hf_cft.merging import dense_delta_from_factors

    torch.manual_seed(0)
    base = _Conv1DNet()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c"], fan_in_fan_out=True, init_lora_weights=False)
    reference = get_peft_model(copy.deepcopy(base), cfg)
    trained = _trained_copy(reference)
    merged_trained = copy.deepcopy(trained).merge_and_unload().c.weight.detach()
    merged_reference = copy.deepcopy(reference).merge_and_unload().c.weight.detach()
    dense = delta_from_lora(trained, base)
    assert list(dense) == ["c.weight"] and dense["c.weight"].shape == (3, 5)
    torch.testing.assert_close(dense["c.weight"], merged_trained - base.c.weight.detach(), rtol=1e-5, atol=1e-6)
    from_factors = dense_delta_from_factors(lora_factor_delta(trained, reference), reference)
    assert list(from_factors) == ["c.weight"] and from_factors["c.weight"].shape == (3, 5)
    torch.testing.assert_close(from_factors["c.weight"], merged_trained - merged_reference, rtol=1e-5, atol=1e-6)


def test_lazy_delta_from_models_reads_each_key_on_access_as_delta_from_models_does(clip_model, tmp_path):
    """``LazyDelta.from_models``: its keys are every floating-point entry of the fine-tuned model in its order (keys
    the fine-tuning left unchanged included; ``exclude``, by default ``logit_scale``, dropped; ``keys=`` a list picks
    them), with the fine-tuned shapes; each access computes a fresh fp32(θ_ft) − fp32(θ⁰) (each side cast to fp32
    before subtracting; nothing cached, so a later change of the source shows); description ``"<ft> − <base>"``
    and the base fingerprint; equal to ``delta_from_models`` on the same pair (modules, state dicts, folders).
    Refused when built, exactly: a key missing from the base, another shape, an integer entry (``iter_delta``'s
    rule); NaN/inf is named on access, as is a source that changed shape."""
    from safetensors.torch import save_file

    from hf_cft.merging import LazyDelta

    base = {
        "h": torch.tensor([1.0, 2.0], dtype=torch.float16),
        "d": torch.tensor([1.0, 4.0], dtype=torch.float64),
        "same": torch.zeros(2, 3),
        "logit_scale": torch.tensor(2.0),
        "n": torch.tensor([1, 2]),
    }
    ft = {
        "same": torch.zeros(2, 3),
        "n": torch.tensor([3, 5]),
        "d": torch.tensor([1.0 + 1e-10, 6.5], dtype=torch.float64),  # 1 + 1e-10 is 1.0 in fp32: a 0 delta
        "logit_scale": torch.tensor(3.0),
        "h": torch.tensor([1.5, -2.0], dtype=torch.float16),
    }
    lazy = LazyDelta.from_models(base, ft)
    assert list(lazy) == ["same", "d", "h"] and len(lazy) == 3
    assert lazy.shapes() == {"same": (2, 3), "d": (2,), "h": (2,)}
    assert lazy.description == "dict − dict" and lazy.base_fingerprint == base_fingerprint(base)
    assert repr(lazy) == f"LazyDelta(3 tensors from dict − dict, base={base_fingerprint(base)})"
    got = lazy["d"]
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 2.5]
    assert lazy["h"].dtype == torch.float32 and lazy["h"].tolist() == [0.5, -4.0]
    assert torch.equal(lazy["same"], torch.zeros(2, 3))
    got.add_(1.0)  # a fresh tensor: neither the sources nor the next read change
    assert lazy["d"].tolist() == [0.0, 2.5] and ft["d"].tolist() == [1.0 + 1e-10, 6.5]
    ft["h"][0] = 3.0  # computed on access: a later change of the source shows
    assert lazy["h"].tolist() == [2.0, -4.0]
    assert list(LazyDelta.from_models(base, ft, keys=["h", "same"])) == ["h", "same"]
    assert list(LazyDelta.from_models(base, ft, exclude=("d", "logit_scale"))) == ["same", "h"]
    assert list(LazyDelta.from_models(base, ft, exclude=())) == ["same", "d", "logit_scale", "h"]

    tuned = _perturbed(clip_model)
    eager = delta_from_models(clip_model, tuned)
    for b, f in ((clip_model, tuned), (clip_model.state_dict(), tuned.state_dict())):
        lazy = LazyDelta.from_models(b, f)
        assert list(lazy) == list(eager) and lazy.base_fingerprint == eager.base_fingerprint
        assert lazy.shapes() == {k: tuple(v.shape) for k, v in eager.items()}
        for k in eager:
            assert torch.equal(lazy[k], eager[k]), k
    assert LazyDelta.from_models(clip_model, tuned).description == "CLIPModel − CLIPModel"
    clip_model.save_pretrained(tmp_path / "base")
    save_file({FC1: tuned.state_dict()[FC1]}, str(tmp_path / "ft.safetensors"))
    on_disk = LazyDelta.from_models(tmp_path / "base", tmp_path / "ft.safetensors")
    assert list(on_disk) == [FC1] and torch.equal(on_disk[FC1], eager[FC1])
    assert on_disk.description == f"{tmp_path / 'ft.safetensors'} − {tmp_path / 'base'}"
    assert on_disk.base_fingerprint == eager.base_fingerprint

    with pytest.raises(DeltaError, match=r"^Key 'x' of the fine-tuned model is not in the base model \(dict\)\.$"):
        LazyDelta.from_models(base, {**ft, "x": torch.zeros(1)})
    with pytest.raises(
        DeltaError, match=r"^Key 'same' has shape \(3, 2\) in the fine-tuned model but \(2, 3\) in the base\.$"
    ):
        LazyDelta.from_models(base, {**ft, "same": torch.zeros(3, 2)})
    with pytest.raises(DeltaError, match=r"^Key 'n' is not a floating-point tensor; it cannot have a task delta\.$"):
        LazyDelta.from_models(base, ft, keys=["h", "n"])
    with pytest.raises(DeltaError, match=r"^Key 'h' is not a floating-point tensor; it cannot have a task delta\.$"):
        LazyDelta.from_models({**base, "h": torch.tensor([1, 2])}, ft)
    nan = LazyDelta.from_models(base, {**ft, "same": torch.tensor([[0.0, math.nan, 0.0], [math.inf, 0.0, 0.0]])})
    assert list(nan) == ["same", "d", "h"]  # checked on access, not when built
    with pytest.raises(NonFiniteError, match=r"^Tensor 'same' of dict − dict holds 2 NaN/inf value\(s\)\.$"):
        nan["same"]
    moving_base, moving_ft = {**base}, {**ft}
    lazy = LazyDelta.from_models(moving_base, moving_ft)
    moving_base["h"], moving_ft["h"] = torch.zeros(3), torch.ones(3)  # both re-shaped after it was built
    with pytest.raises(DeltaError, match=r"^Key 'h' of dict − dict changed shape while being read\.$"):
        lazy["h"]


def test_task_delta_counts_its_entries_and_bytes_and_shows_them():
    """TaskDelta.numel sums the entries of every tensor, nbytes their bytes in each tensor's own dtype, and the repr
    shows the tensor count, the entries (with thousands separators) and the base fingerprint."""
    from hf_cft.merging.deltas import TaskDelta

    d = TaskDelta({"a": torch.zeros(40, 30), "b": torch.zeros(5, dtype=torch.float16)}, base_fingerprint="abc")
    assert d.numel() == 1205 and d.nbytes() == 1200 * 4 + 5 * 2
    assert repr(d) == "TaskDelta(2 tensors, 1,205 entries, base=abc)"
    assert TaskDelta().numel() == 0 and TaskDelta().nbytes() == 0 and repr(TaskDelta()).endswith("base=None)")


def test_packed_masks_move_and_unpack_to_a_device():
    """PackedMask.to keeps the shape and bits on the given device; unpack_mask gives the boolean tensor back, on the
    device asked for."""
    from hf_cft.merging.masks import PackedMask, unpack_mask

    mask = torch.tensor([[True, False, True], [False, False, True], [True, True, False]])
    packed = PackedMask.pack(mask)
    moved = packed.to("cpu")
    assert moved == packed and moved.shape == (3, 3) and moved.bits is not None
    assert torch.equal(unpack_mask(packed), mask) and unpack_mask(packed, "cpu").device.type == "cpu"
    assert unpack_mask(packed).dtype == torch.bool and unpack_mask(packed).shape == (3, 3)
    meta = packed.to("meta")
    assert meta.bits.device.type == "meta" and meta.shape == (3, 3)
    # unpacking onto another device moves the bits first (the "meta" device stands in for a GPU on a CPU machine),
    # and from a device unpacks there; whole tensors and ranges alike, always boolean
    for got in (packed.unpack("meta"), packed.unpack_range(0, 9, "meta"), meta.unpack(), meta.unpack_range(8, 9)):
        assert (got.device.type, got.dtype) == ("meta", torch.bool)
    assert packed.unpack_range(0, 9).dtype == torch.bool and packed.unpack_range(8, 9).tolist() == [False]


def test_packed_mask_refuses_bits_of_the_wrong_type_or_length_naming_both():
    from hf_cft.merging.masks import PackedMask

    with pytest.raises(ValueError, match=r"^PackedMask of shape \(3, 3\) needs 2 bytes, got 3$"):
        PackedMask(torch.zeros(3, dtype=torch.uint8), (3, 3))
    with pytest.raises(ValueError, match=r"^PackedMask bits must be a 1-d uint8 tensor, got torch.int32 \(2,\)$"):
        PackedMask(torch.zeros(2, dtype=torch.int32), (3, 3))
    float_mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # a 0/1 mask packs like a boolean one
    assert PackedMask.pack(float_mask) == PackedMask.pack(float_mask.bool())


def test_lazy_delta_from_models_names_which_side_cannot_be_read(tmp_path, clip_model):
    """A missing base or fine-tuned checkpoint is refused naming its role."""
    from hf_cft.merging.deltas import LazyDelta

    missing = re.escape(repr(str(tmp_path / "missing")))
    with pytest.raises(BundleError, match=rf"^The base model path {missing} does not exist.$"):
        LazyDelta.from_models(tmp_path / "missing", clip_model)
    with pytest.raises(BundleError, match=rf"^The fine-tuned model path {missing} does not exist.$"):
        LazyDelta.from_models(clip_model, tmp_path / "missing")


def test_delta_from_lora_refusals_name_the_key_the_adapter_and_the_base(clip_model):
    """A base tensor of another shape, a base folder that does not exist and a NaN factor are refused naming the key,
    the adapter and the base model."""
    import re

    from hf_cft.errors import BundleError, NonFiniteError

    peft_model = _lora(clip_model)
    want = tuple(delta_from_lora(peft_model, clip_model)[FC1].shape)
    base = dict(clip_model.state_dict())
    base[FC1] = torch.zeros(3, 3)
    with pytest.raises(
        DeltaError,
        match=rf"^LoRA delta for {re.escape(repr(FC1))} has shape {re.escape(str(want))} but the base weight is \(3, 3\).$",
    ):
        delta_from_lora(peft_model, base)
    with pytest.raises(BundleError, match=r"^The base model path '/nonexistent/base' does not exist.$"):
        delta_from_lora(peft_model, "/nonexistent/base")
    with torch.no_grad():
        peft_model.base_model.model.text_model.encoder.layers[0].mlp.fc1.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(
        NonFiniteError,
        match=rf"^Tensor {re.escape(repr(FC1))} of the LoRA delta \(adapter 'default'\) holds \d+ NaN/inf value\(s\).$",
    ):
        delta_from_lora(peft_model, clip_model)


def test_a_bf16_adapters_dense_delta_is_computed_in_fp32(clip_model):
    """A bf16 LoRA adapter (factors and a lora_B bias in bf16): ΔW = s·B·A and s·b in fp32 from the bf16 values."""
    peft_model = _lora(clip_model, lora_bias=True)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                p.normal_(0, 0.1)
    half = copy.deepcopy(peft_model).to(torch.bfloat16)
    got = delta_from_lora(half, clip_model)
    layer = half.base_model.model.text_model.encoder.layers[0].mlp.fc1
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    s = layer.scaling["default"]
    assert got[FC1].dtype == torch.float32
    torch.testing.assert_close(got[FC1], s * b @ a, rtol=1e-6, atol=1e-7)
    bias = FC1[: -len("weight")] + "bias"
    torch.testing.assert_close(got[bias], s * layer.lora_B["default"].bias.float(), rtol=0, atol=0)


def test_delta_from_lora_refuses_bad_adapters_with_exact_messages(clip_model, tmp_path):
    """Not an adapter folder, only adapter_model.bin, no weights, an unreadable config or weights file, another
    object, an adapter name the model lacks, a non-LoRA adapter: each refused naming it."""
    import re

    from hf_cft.errors import BundleError

    peft_model = _lora(clip_model)
    peft_model.save_pretrained(tmp_path / "ok")
    config = (tmp_path / "ok" / "adapter_config.json").read_text()

    def folder(name, files):
        path = tmp_path / name
        path.mkdir()
        for fname, data in files.items():
            (path / fname).write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    weights = (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    empty = folder("empty", {})
    only_bin = folder("bin", {"adapter_config.json": config, "adapter_model.bin": b"x"})
    no_weights = folder("now", {"adapter_config.json": config})
    bad_json = folder("json", {"adapter_config.json": "{x", "adapter_model.safetensors": weights})
    garbage = folder("garbage", {"adapter_config.json": config, "adapter_model.safetensors": b"junk"})
    q = lambda p: re.escape(repr(str(p)))  # noqa: E731
    cases = [
        (empty, AdapterError, rf"^{q(empty)} is not a PEFT adapter folder \(no adapter_config.json\).$"),
        (only_bin, AdapterError, rf"^Adapter folder {q(only_bin)} has no adapter_model.safetensors \(only "
         r"adapter_model.bin: hf_cft reads safetensors only\).$"),
        (no_weights, AdapterError, rf"^Adapter folder {q(no_weights)} has no adapter_model.safetensors.$"),
        (bad_json, AdapterError, rf"^Adapter folder {q(bad_json)}: adapter_config.json is not valid JSON \("),
        (garbage, BundleError, rf"^Cannot read {q(garbage / 'adapter_model.safetensors')}: "),
        (3, AdapterError, r"^Expected a PeftModel or an adapter folder, got int.$"),
    ]  # fmt: skip
    for adapter, error, message in cases:
        with pytest.raises(error, match=message):
            delta_from_lora(adapter, clip_model)
    with pytest.raises(AdapterError, match=r"^Adapter 'x' is not in the PEFT model \(it has \['default'\]\).$"):
        delta_from_lora(peft_model, clip_model, adapter_name="x")


# ------------------------------------------------------------- exact refusals and dtypes (pinned by mutation tests)


def _adapter_folder(path, config, tensors):
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_lora_adapter_folders_that_are_not_plain_lora_linears_are_refused_with_exact_messages(tmp_path):
    """Another PEFT type, DoRA, tensors that are not LoRA factors (counted), no tensors, a missing factor, a factor
    that is not a matrix (naming which), a rank that is not a positive integer or disagrees with either factor,
    a lora_alpha that is not a number: each an AdapterError naming the adapter folder and the module."""
    fc1 = "text_model.encoder.layers.0.mlp.fc1"
    a, b = torch.ones(4, 8), torch.ones(8, 4)
    lora = {f"base_model.model.{fc1}.lora_A.weight": a, f"base_model.model.{fc1}.lora_B.weight": b}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    cases = [
        ("ia3", {"peft_type": "IA3"}, lora, "is a 'IA3' adapter; only LoRA adapters have a delta here."),
        ("dora", {**config, "use_dora": True}, lora, "uses DoRA (use_dora=True): its weight is a magnitude-"
         "normalised direction, not θ⁰ + s·B@A, so it has no LoRA delta. Merge it with merge_and_unload() and use "
         "delta_from_models instead."),
        ("extra", config, {**lora, "z.bias": torch.ones(2), "y.weight": torch.ones(2)},
         "holds tensors that are not LoRA A/B factors, e.g. 'y.weight' (2 in all: modules_to_save, trained biases, "
         "embedding or token adapters); hf_cft takes deltas of LoRA linears only."),
        ("none", config, {}, "holds no LoRA tensors."),
        ("only_a", config, {f"base_model.model.{fc1}.lora_A.weight": a}, f"lacks lora_A or lora_B for module {fc1!r}."),
        ("only_b", config, {f"base_model.model.{fc1}.lora_B.weight": b}, f"lacks lora_A or lora_B for module {fc1!r}."),
    ]  # fmt: skip
    for name, cfg, tensors, tail in cases:
        folder = _adapter_folder(tmp_path / name, cfg, tensors)
        with pytest.raises(AdapterError) as err:
            delta_from_lora(folder, {f"{fc1}.weight": torch.zeros(8, 8)})
        assert str(err.value) == f"The adapter folder {str(folder)!r} {tail}", name
    where = lambda folder: f"adapter folder {str(folder)!r}"  # noqa: E731
    cube = torch.ones(8, 4, 1)
    per_module = [
        ("cube_b", config, {**lora, f"base_model.model.{fc1}.lora_B.weight": cube},
         lambda f: f"Module {fc1!r} of the {where(f)} is not a linear LoRA (lora_B has 3 dims)."),
        ("cube_a", config, {**lora, f"base_model.model.{fc1}.lora_A.weight": cube},
         lambda f: f"Module {fc1!r} of the {where(f)} is not a linear LoRA (lora_A has 3 dims)."),
        ("r0", {**config, "r": 0}, lora,
         lambda f: f"LoRA rank 'r' of module {fc1!r} ({where(f)}'s adapter_config.json) must be at least 1, got 0."),
        ("rstr", {**config, "r": "4"}, lora,
         lambda f: f"LoRA rank 'r' of module {fc1!r} ({where(f)}'s adapter_config.json) must be an integer, got '4' "
         "(str)."),
        ("rank_b", config, {**lora, f"base_model.model.{fc1}.lora_B.weight": torch.ones(8, 3)},
         lambda f: f"Module {fc1!r} of the {where(f)}: lora_A has rank 4 and lora_B rank 3 but the config says r=4."),
        ("rank_a", config, {**lora, f"base_model.model.{fc1}.lora_A.weight": torch.ones(3, 8)},
         lambda f: f"Module {fc1!r} of the {where(f)}: lora_A has rank 3 and lora_B rank 4 but the config says r=4."),
        ("alpha", {**config, "lora_alpha": "8"}, lora,
         lambda f: f"lora_alpha of module {fc1!r} ({where(f)}'s adapter_config.json) must be a number, got '8' (str)."),
    ]  # fmt: skip
    for name, cfg, tensors, message in per_module:
        folder = _adapter_folder(tmp_path / name, cfg, tensors)
        with pytest.raises(AdapterError) as err:
            delta_from_lora(folder, {f"{fc1}.weight": torch.zeros(8, 8)})
        assert str(err.value) == message(folder), name


def test_delta_from_lora_reads_a_peft_models_active_adapter_whatever_its_name_and_a_tuner_model(clip_model):
    """A PeftModel whose only adapter is not called 'default' gives that adapter's delta; its tuner
    (``peft_model.base_model``, a LoraModel) with several active adapters gives the first one's."""
    peft_model = get_peft_model(copy.deepcopy(clip_model), LoraConfig(r=2, target_modules=["fc1"]), "task")
    peft_model.add_adapter("other", LoraConfig(r=3, lora_alpha=6, target_modules=["fc2"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    task = delta_from_lora(peft_model, clip_model)
    assert sorted(task) == sorted(k for k in clip_model.state_dict() if k.endswith("fc1.weight"))
    peft_model.base_model.set_adapter(["other", "task"])
    other = delta_from_lora(peft_model.base_model, clip_model)
    assert sorted(other) == sorted(k for k in clip_model.state_dict() if k.endswith("fc2.weight"))
    for k, d in delta_from_lora(peft_model, clip_model, adapter_name="other").items():
        torch.testing.assert_close(other[k], d, rtol=0, atol=0)
    fc2 = "text_model.encoder.layers.0.mlp.fc2"
    layer = peft_model.base_model.model.get_submodule(fc2)
    want = 2.0 * layer.lora_B["other"].weight @ layer.lora_A["other"].weight
    torch.testing.assert_close(other[f"{fc2}.weight"], want.detach())


def test_key_selection_exclusions_and_their_refusals_are_exact(clip_model, tmp_path):
    """``exclude`` drops a full key or every key whose last component matches (so ``("bias",)`` drops every bias,
    and a full key drops only itself); the refusals of keys / exclusions and the base-model role are exact."""
    ft = _perturbed(clip_model)
    no_bias = delta_from_models(clip_model, ft, exclude=("bias",))
    floating = [k for k, t in ft.state_dict().items() if t.is_floating_point()]
    assert sorted(no_bias) == sorted(k for k in floating if not k.endswith(".bias"))
    no_fc1 = delta_from_models(clip_model, ft, exclude=(FC1,))
    assert sorted(no_fc1) == sorted(k for k in floating if k != FC1)
    lazy = LazyDelta.from_models(clip_model, ft, exclude=("bias",))
    assert sorted(lazy) == sorted(no_bias)
    frozen = copy.deepcopy(ft).requires_grad_(False)
    refusals = [
        (dict(keys="all"), "keys must be None, 'trainable' or a list of state-dict keys, got 'all'."),
        (dict(keys=["nope.weight"]), "Key 'nope.weight' is not in the fine-tuned model (CLIPModel)."),
        (dict(keys=[FC1], exclude=("weight",)), "No delta keys left after selection and exclusions."),
    ]
    for kwargs, message in refusals:
        with pytest.raises(DeltaError) as err:
            delta_from_models(clip_model, ft, **kwargs)
        assert str(err.value) == message
    with pytest.raises(DeltaError) as err:
        delta_from_models(clip_model, frozen, keys="trainable")
    assert str(err.value) == (
        "The fine-tuned model (CLIPModel) has no parameter with requires_grad=True; pass the trained keys explicitly."
    )
    missing = tmp_path / "nope"
    for take in (delta_from_models, lambda b, f: dict(iter_delta(b, f))):
        with pytest.raises(BundleError) as err:
            take(missing, ft)
        assert str(err.value) == f"The base model path {str(missing)!r} does not exist."
    sd = ft.state_dict()
    with pytest.raises(DeltaError) as err:
        dict(iter_delta({k: v for k, v in sd.items() if k != FC1}, sd))
    assert str(err.value) == (
        f"Key {FC1!r} of the fine-tuned model is not in the base model (dict); are they the same architecture? "
        "(A PEFT-wrapped model needs delta_from_lora.)"
    )
    nan = dict(sd)
    nan[FC1] = sd[FC1].clone()
    nan[FC1][0, :2] = float("inf")
    with pytest.raises(NonFiniteError) as err:
        dict(iter_delta(sd, nan))
    assert str(err.value) == f"Tensor {FC1!r} of the delta (fine-tuned − base) holds 2 NaN/inf value(s)."


def test_deltas_of_float64_and_bf16_inputs_are_fp32_and_exact():
    """θ_ft − θ⁰ is taken in fp32 whatever the inputs' dtype: float64 inputs give fp32, and two bf16 tensors give
    their exact difference (257), not the bf16-rounded one."""
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "v": torch.tensor([0.5], dtype=torch.float64)}
    ft = {"w": torch.tensor([258.0, 2.0], dtype=torch.bfloat16), "v": torch.tensor([0.75], dtype=torch.float64)}
    for delta in (delta_from_models(base, ft), dict(iter_delta(base, ft))):
        assert {k: t.dtype for k, t in delta.items()} == {"w": torch.float32, "v": torch.float32}
        assert delta["w"].tolist() == [257.0, 0.0] and delta["v"].tolist() == [0.25]
    lazy = LazyDelta({"v": (1,)}, lambda key: ft["v"] - base["v"])
    assert lazy["v"].dtype == torch.float32


def test_validate_delta_counts_every_missing_and_unknown_key():
    with pytest.raises(DeltaError) as err:
        validate_delta({"x": torch.zeros(1)}, {"a": (1,), "b": (1,), "c": (1,)}, name="task 2")
    assert str(err.value) == (
        "The task 2 lacks key 'a' (and 2 more) and has unknown key 'x'; all task deltas must share the same keys."
    )
    with pytest.raises(DeltaError) as err:
        validate_delta({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": (1,), "b": (1,), "c": (1,)})
    assert str(err.value) == "The delta lacks key 'c'; all task deltas must share the same keys."


def test_lazy_delta_files_refuse_missing_unreadable_and_integer_files_and_name_a_tensor_gone_since(tmp_path):
    """``LazyDelta.from_file``: a missing file, a file that is not safetensors, integer entries (the first named),
    and a tensor that cannot be read when accessed (the file replaced since) are refused with exact messages; the
    default description, KeyError of an unknown key and ``materialize`` keeping the fingerprint."""
    from safetensors.torch import save_file

    from hf_cft.merging import LazyDelta, save_delta

    q = lambda p: repr(str(p))  # noqa: E731
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(BundleError) as err:
        LazyDelta.from_file(missing)
    assert str(err.value) == f"Delta file {q(missing)} does not exist."
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(BundleError) as err:
        LazyDelta.from_file(junk)
    assert str(err.value).startswith(f"Cannot read safetensors file {q(junk)}: ")
    ints = tmp_path / "ints.safetensors"
    save_file({"a": torch.ones(2, dtype=torch.int64), "b": torch.ones(2, dtype=torch.int32), "w": torch.ones(2)},
              str(ints))  # fmt: skip
    with pytest.raises(DeltaError) as err:
        LazyDelta.from_file(ints)
    assert str(err.value) == f"Entry 'a' of the delta file {q(ints)} is not a floating-point tensor."
    path = tmp_path / "d.safetensors"
    delta = TaskDelta({"w": torch.arange(6.0).reshape(2, 3)}, base_fingerprint="abc")
    save_delta(delta, path)
    lazy = LazyDelta.from_file(path)
    assert lazy.materialize().base_fingerprint == "abc" and lazy.materialize()["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(KeyError) as err:
        lazy["nope"]
    assert err.value.args == ("nope",)
    save_file({"other": torch.ones(1)}, str(path))  # the file is replaced by one without 'w'
    for read in (lambda: lazy["w"], lambda: lazy.read_flat("w", 0, 2)):
        with pytest.raises(BundleError) as err:
            read()
        assert str(err.value).startswith(f"Cannot read tensor 'w' of the delta file {q(path)}: ")
    plain = LazyDelta({"w": (2,)}, lambda key: torch.tensor([1.0, math.nan]))
    assert repr(plain) == "LazyDelta(1 tensors from lazy delta, base=None)"
    with pytest.raises(NonFiniteError) as err:
        plain["w"]
    assert str(err.value) == "Tensor 'w' of lazy delta holds 1 NaN/inf value(s)."


def test_a_checkpoint_shard_replaced_after_indexing_is_named_with_its_tensor(clip_model, tmp_path):
    """A shard replaced by another valid safetensors file (without the key) after the folder was indexed: reading
    the key's shape or values is a BundleError naming the tensor, the role and the file (it was safetensors' own
    error type)."""
    from safetensors.torch import save_file

    clip_model.save_pretrained(tmp_path / "ft")
    file = tmp_path / "ft" / "model.safetensors"
    source = _Source(tmp_path / "ft", "fine-tuned model")  # what iter_delta reads through
    save_file({"other": torch.ones(1)}, str(file))
    for read in (source.shape, source.is_floating, source.get, lambda key: source.head_values(key, 3)):
        with pytest.raises(BundleError) as err:
            read(FC1)
        assert str(err.value).startswith(f"Cannot read tensor {FC1!r} of the fine-tuned model ({str(file)}): ")


def test_applied_and_functional_experts_refuse_mismatches_exactly_and_round_bf16_once(clip_model):
    """``apply_delta`` names the key and both shapes; ``FunctionalExpert.from_weights`` names the key and both
    dtypes/shapes/devices, or the model class; a bf16 model's expert weights stay bf16 and are θ⁰ + s·δ rounded
    once from fp32, even for a bf16 δ (rounding s·δ to bf16 first gives other values)."""
    from hf_cft.merging import FunctionalExpert

    with pytest.raises(DeltaError) as err:
        apply_delta(clip_model, {FC1: torch.zeros(3, 3)})
    shape = tuple(clip_model.state_dict()[FC1].shape)
    assert str(err.value) == f"Delta key {FC1!r} has shape (3, 3) but the model's is {shape}."
    with pytest.raises(DeltaError) as err:
        FunctionalExpert.from_weights(clip_model, [("nope.weight", torch.zeros(1))])
    assert str(err.value) == "Expert weight 'nope.weight' is not a parameter or buffer of CLIPModel."
    with pytest.raises(DeltaError) as err:
        FunctionalExpert.from_weights(clip_model, [(FC1, torch.zeros(3, 3, dtype=torch.float64))])
    assert str(err.value) == (
        f"Expert weight {FC1!r} is torch.float64 (3, 3) on cpu; the model's is torch.float32 {shape} on cpu."
    )
    linear = torch.nn.Linear(64, 64).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    expert = FunctionalExpert(linear, {"weight": d}, scale=0.37)
    want = (linear.weight.double() + 0.37 * d.double()).to(torch.bfloat16)
    got = expert.params["weight"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    twice = (linear.weight + (0.37 * d)).to(torch.bfloat16)  # s·δ rounded to bf16 first
    assert not torch.equal(twice, want)  # the check above can tell the two apart


def test_base_fingerprints_stay_what_earlier_versions_wrote_and_agree_across_sources(tmp_path):
    """A base fingerprint is stored in delta files (safetensors metadata) and compared with the base a delta is
    applied to, so its value must not change between versions: a fixed state dict keeps the fingerprint this
    version writes (keys, shapes and the first values of the first, middle and last key in sorted order). The
    same dict saved as a file gives the same fingerprint, reading only the head rows of 1-d and 2-d tensors."""
    from safetensors.torch import save_file

    state = {
        "a.weight": torch.arange(3000.0).reshape(1000, 3) / 7,
        "b.bias": torch.arange(2000.0) / 3,
        "c.weight": torch.arange(20.0).reshape(4, 5) / 8 - 1,
        "d.scale": torch.tensor(2.5),
        "e.ids": torch.arange(5),  # not floating: not part of the fingerprint
    }
    fp = base_fingerprint(state)
    assert fp == "e3ec0ac5b0d894bba96ae74d"
    save_file(state, str(tmp_path / "model.safetensors"))
    assert base_fingerprint(tmp_path / "model.safetensors") == fp == base_fingerprint(tmp_path)
    one_d = {"x": torch.arange(3000.0), "y": torch.arange(5.0), "z": torch.tensor(1.0)}
    save_file(one_d, str(tmp_path / "one_d.safetensors"))
    assert base_fingerprint(tmp_path / "one_d.safetensors") == base_fingerprint(one_d)
    for other in ({**state, "c.weight": state["c.weight"] + 1}, {**state, "a.weight": state["a.weight"] + 1},
                  {**state, "d.scale": torch.tensor(2.0)}):  # fmt: skip
        assert base_fingerprint(other) != fp  # the first, middle and last key each count
    missing = tmp_path / "nope"
    with pytest.raises(BundleError) as err:
        base_fingerprint(missing)
    assert str(err.value) == f"The base model path {str(missing)!r} does not exist."
    with pytest.raises(DeltaError) as err:
        delta_from_models(3, state)
    assert str(err.value) == "The base model must be an nn.Module, a state dict or a safetensors file/folder, got int."


def test_validate_delta_refuses_non_mappings_empty_and_non_float_entries_and_converts_to_fp32():
    from hf_cft.merging.deltas import all_finite

    refusals = [
        ([1], None, "The delta must be a mapping from state-dict keys to tensors, got list."),
        ({}, None, "The delta is empty (no tensors)."),
        ({"w": [1.0]}, None, "Entry 'w' of the delta is not a floating-point tensor (list)."),
        ({"w": torch.ones(2, dtype=torch.int64)}, None, "Entry 'w' of the delta is not a floating-point tensor (Tensor)."),
        ({"x": torch.zeros(1)}, {"a": (1,), "b": (1,)}, "The delta lacks key 'a' (and 1 more) and has unknown key "
         "'x'; all task deltas must share the same keys."),
        ({"a": torch.zeros(1), "x": torch.zeros(1), "y": torch.zeros(1)}, {"a": (1,)}, "The delta has unknown key "
         "'x' (and 1 more); all task deltas must share the same keys."),
        ({"x": torch.zeros(1), "y": torch.zeros(1), "z": torch.zeros(1)}, {"x": (1,), "y": (1,), "a": (1,)},
         "The delta lacks key 'a' and has unknown key 'z'; all task deltas must share the same keys."),
    ]  # fmt: skip
    for delta, reference, message in refusals:
        with pytest.raises(DeltaError) as err:
            validate_delta(delta, reference)
        assert str(err.value) == message
    out = validate_delta({"w": torch.ones(2, dtype=torch.float64)})
    assert out["w"].dtype == torch.float32 and isinstance(out, TaskDelta)
    assert TaskDelta(w=torch.ones(1), base_fingerprint="f").keys() == {"w"}
    assert all_finite(torch.ones(3, dtype=torch.int64)) and all_finite(torch.ones(2))
    assert not all_finite(torch.tensor([1.0, math.inf])) and not all_finite(torch.tensor([complex(0, math.nan)]))
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows, every entry is finite


def test_apply_delta_names_the_model_class_and_an_expert_takes_pairs_or_an_unchecked_mapping():
    """``apply_delta`` refuses a key the model lacks naming the key and the model's class. ``FunctionalExpert``
    takes (key, δ) pairs as well as a mapping (each key checked as it comes); ``check=False`` skips the up-front
    check of a mapping, the base fingerprint included."""
    from hf_cft.merging import FunctionalExpert

    linear = torch.nn.Linear(2, 2)
    with pytest.raises(DeltaError) as err:
        apply_delta(linear, {"nope": torch.zeros(1)})
    assert str(err.value) == "Delta key 'nope' is not a parameter or buffer of Linear."
    d = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    want = linear.weight.detach() + 0.5 * d
    assert torch.equal(FunctionalExpert(linear, [("weight", d)], scale=0.5).params["weight"], want)
    other_base = TaskDelta(weight=d, base_fingerprint="0" * 24)
    with pytest.raises(DeltaError, match="another base model"):
        FunctionalExpert(linear, other_base, scale=0.5)
    assert torch.equal(FunctionalExpert(linear, other_base, scale=0.5, check=False).params["weight"], want)
