"""hf_cft's PEFT method types on tiny CLIPs: registration, round trips, multi-adapter use, method semantics."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

import hf_cft  # noqa: F401  (registers the method types)
from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.errors import AdapterError, AdapterMergeError
from hf_cft.models import build_zeroshot_classifier, clip_logits, image_features, text_features, tokenize_prompts
from hf_cft.peft.coop import CoOpLayer
from hf_cft.testing import tiny_clip

CLASSES = ["cat", "dog", "sea lion"]
PIXELS = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))


def _configs(tok):
    return {
        "coop": lambda: CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(tok),
        "coop_init": lambda: CoOpConfig(ctx_init="a photo of a", classnames=CLASSES).set_tokenizer(tok),
        "coop_csc": lambda: CoOpConfig(n_ctx=3, class_specific=True, classnames=CLASSES).set_tokenizer(tok),
        "coop_middle": lambda: CoOpConfig(n_ctx=4, class_token_position="middle", classnames=CLASSES).set_tokenizer(
            tok
        ),
        "coop_front": lambda: CoOpConfig(n_ctx=4, class_token_position="front", classnames=CLASSES).set_tokenizer(tok),
        "vpt": lambda: VPTConfig(n_tokens=3),
        "vpt_deep": lambda: VPTConfig(n_tokens=2, deep=True),
        "head": lambda: LinearHeadConfig(classnames=CLASSES, templates=["a photo of a {}."]).set_tokenizer(tok),
        "lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False),
    }


METHODS = ["coop", "coop_init", "coop_csc", "coop_middle", "coop_front", "vpt", "vpt_deep", "head", "lora"]


def _randomise(model, seed=1):
    """Move every trainable parameter away from its init, so a round trip that loses them is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _outputs(model, tok, method):
    """What each method changes: class text features (CoOp), image features (VPT, LoRA), head logits."""
    with torch.no_grad():
        if method.startswith("coop"):
            return model.class_text_features(tok)
        if method == "head":
            return model.classify(PIXELS)
        enc = tokenize_prompts(tok, [f"a photo of a {c}." for c in CLASSES], model)
        return torch.cat(
            [image_features(model, PIXELS), text_features(model, enc["input_ids"], enc["attention_mask"])]
        )


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_identical_outputs(method, toy_tokenizer, tmp_path):
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)[method]())
    _randomise(model)
    before = _outputs(model, toy_tokenizer, method)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.peft_config["default"])
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    torch.testing.assert_close(_outputs(loaded, toy_tokenizer, method), before, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapter_gives_base_outputs(method, toy_tokenizer):
    base = tiny_clip()
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)[method]())
    _randomise(model)
    enc = tokenize_prompts(toy_tokenizer, ["a photo of a cat.", "a dog"], base)
    with torch.no_grad():
        ref = (image_features(base, PIXELS), text_features(base, enc["input_ids"], enc["attention_mask"]))
        on = (image_features(model, PIXELS), text_features(model, enc["input_ids"], enc["attention_mask"]))
        with model.disable_adapter():
            off = (image_features(model, PIXELS), text_features(model, enc["input_ids"], enc["attention_mask"]))
    torch.testing.assert_close(off[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(off[1], ref[1], rtol=0, atol=0)
    if method in ("vpt", "vpt_deep", "lora"):
        assert not torch.allclose(on[0], ref[0])
    if method.startswith("coop"):  # ordinary prompts (no placeholders) are untouched by CoOp
        torch.testing.assert_close(on[1], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["coop", "vpt", "head", "lora"])
def test_two_adapters_on_one_model(method, toy_tokenizer, tmp_path):
    make = _configs(toy_tokenizer)[method]
    a = get_peft_model(tiny_clip(), make())
    _randomise(a)
    out_a = _outputs(a, toy_tokenizer, method)
    a.save_pretrained(tmp_path / "a")
    b = get_peft_model(tiny_clip(), make())
    _randomise(b, seed=2)
    out_b = _outputs(b, toy_tokenizer, method)
    b.save_pretrained(tmp_path / "b")

    model = PeftModel.from_pretrained(tiny_clip(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert set(model.peft_config) == {"a", "b"}
    model.set_adapter("b")
    torch.testing.assert_close(_outputs(model, toy_tokenizer, method), out_b, rtol=0, atol=0)
    model.set_adapter("a")
    torch.testing.assert_close(_outputs(model, toy_tokenizer, method), out_a, rtol=0, atol=0)
    assert not torch.allclose(out_a, out_b)


@pytest.mark.parametrize("method", ["coop", "coop_csc", "vpt", "vpt_deep", "head"])
def test_merge_and_unload_is_refused_but_unload_works(method, toy_tokenizer):
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)[method]())
    with pytest.raises(AdapterMergeError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert not any("coop_" in n or "vpt_" in n or "head_" in n for n, _ in base.named_parameters())


def test_only_adapter_parameters_train(toy_tokenizer):
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)["coop"]())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["base_model.model.text_model.embeddings.coop_ctx.default"]
    feats = model.class_text_features(toy_tokenizer)
    feats.sum().backward()
    ctx = model.base_model.model.text_model.embeddings.coop_ctx["default"]
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- CoOp semantics


def test_coop_init_reproduces_the_hand_crafted_prompt(toy_tokenizer):
    """Context initialised from 'a photo of a' + class at the end == encoding 'a photo of a <class>.'."""
    base = tiny_clip()
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)["coop_init"]())
    assert model.peft_config["default"].n_ctx == 4
    enc = tokenize_prompts(toy_tokenizer, [f"a photo of a {c}." for c in CLASSES], base)
    with torch.no_grad():
        expected = text_features(base, enc["input_ids"], enc["attention_mask"])
        got = model.class_text_features(toy_tokenizer)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_coop_keeps_input_ids_and_pools_at_eos(toy_tokenizer):
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)["coop"]())
    enc = model.build_prompts(toy_tokenizer, CLASSES)
    ids = enc["input_ids"]
    ph = model.peft_config["default"].placeholder_token_id
    assert ((ids == ph).sum(1) == 4).all() and (ids[:, 1:5] == ph).all()
    # "sea lion" is one token longer: EOS sits one position later, and pooling follows it
    eos = (ids == toy_tokenizer.eos).int().argmax(1)
    assert eos.tolist()[2] == eos.tolist()[0] + 1


def test_coop_class_specific_uses_each_class_context(toy_tokenizer):
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)["coop_csc"]())
    layer = next(m for m in model.modules() if isinstance(m, CoOpLayer))
    assert layer.coop_ctx["default"].shape == (3, 3, 32)
    before = model.class_text_features(toy_tokenizer).detach()
    with torch.no_grad():
        layer.coop_ctx["default"][1].add_(1.0)  # change only the dog context
    after = model.class_text_features(toy_tokenizer).detach()
    changed = (after - before).abs().sum(1) > 1e-6
    assert changed.tolist() == [False, True, False]
    with pytest.raises(AdapterError, match="class-specific"):
        model.class_text_features(toy_tokenizer, ["cat", "dog", "fox"])


def test_coop_shared_context_generalises_to_new_classes(toy_tokenizer):
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)["coop"]())
    feats = model.class_text_features(toy_tokenizer, ["fox", "owl"])
    assert feats.shape == (2, 16)


@pytest.mark.parametrize("position, slots", [("middle", [1, 2, 4, 5]), ("front", [2, 3, 4, 5])])
def test_coop_class_token_positions(position, slots, toy_tokenizer):
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)[f"coop_{position}"]())
    ids = model.build_prompts(toy_tokenizer, ["cat"])["input_ids"][0]
    ph = model.peft_config["default"].placeholder_token_id
    assert (ids == ph).nonzero().flatten().tolist() == slots


def test_coop_overflow_names_the_class(toy_tokenizer):
    model = get_peft_model(tiny_clip(max_position_embeddings=12), _configs(toy_tokenizer)["coop"]())
    long_name = "very long class name with many many words"
    with pytest.raises(AdapterError, match=long_name):
        model.class_text_features(toy_tokenizer, ["cat", long_name])


def test_coop_config_errors(toy_tokenizer):
    with pytest.raises(AdapterError, match="classnames"):
        CoOpConfig(class_specific=True)
    with pytest.raises(AdapterError, match="class_token_position"):
        CoOpConfig(class_token_position="left")
    with pytest.raises(AdapterError, match="4 tokens but n_ctx=8"):
        get_peft_model(tiny_clip(), CoOpConfig(n_ctx=8, ctx_init="a photo of a").set_tokenizer(toy_tokenizer))
    with pytest.raises(AdapterError, match="tokenizer"):
        get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4))


def test_coop_class_name_containing_the_placeholder_word(toy_tokenizer):
    """Slots are marked by position, so a class name holding the placeholder token ("x ray", or CLIP's BPE of
    "tsx" ending in "x") keeps its own token embedding: ctx_init reproduces the hand-crafted prompt exactly."""
    base = tiny_clip()
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)["coop_init"]())
    names = ["x ray", "cat"]
    enc = tokenize_prompts(toy_tokenizer, [f"a photo of a {c}." for c in names], base)
    with torch.no_grad():
        expected = text_features(base, enc["input_ids"], enc["attention_mask"])
        got = model.class_text_features(toy_tokenizer, names)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------- VPT, head


def test_vpt_inserts_tokens_after_cls(toy_tokenizer):
    model = get_peft_model(tiny_clip(), VPTConfig(n_tokens=3))
    seen = {}
    enc_layer = model.base_model.model.vision_model.encoder.layers[0]
    handle = enc_layer.register_forward_pre_hook(lambda m, args: seen.update(len=args[0].shape[1]))
    with torch.no_grad():
        image_features(model, PIXELS)
    handle.remove()
    assert seen["len"] == 1 + 3 + (30 // 2) ** 2


def test_vpt_deep_prompts_get_gradients():
    model = get_peft_model(tiny_clip(), VPTConfig(n_tokens=2, deep=True))
    image_features(model, PIXELS).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2  # embeddings + layer 1 (layer 0 sees the embeddings' prompts)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_head_zero_shot_init_matches_zero_shot_logits(toy_tokenizer):
    base = tiny_clip()
    templates = ["a photo of a {}.", "a drawing of a {}."]
    cfg = LinearHeadConfig(classnames=CLASSES, templates=templates).set_tokenizer(toy_tokenizer)
    model = get_peft_model(tiny_clip(), cfg)
    with torch.no_grad():
        expected = clip_logits(
            base, image_features(base, PIXELS), build_zeroshot_classifier(base, toy_tokenizer, CLASSES, templates)
        )
        got = model.classify(PIXELS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_head_errors(toy_tokenizer):
    with pytest.raises(AdapterError, match="num_classes or classnames"):
        LinearHeadConfig(init="zeros")
    with pytest.raises(AdapterError, match="needs a tokenizer"):
        get_peft_model(tiny_clip(), LinearHeadConfig(classnames=CLASSES))
    model = get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=5, init="zeros"))
    assert model.classify(PIXELS).abs().sum() == 0


def test_round_trip_in_a_new_process(toy_tokenizer, tmp_path):
    """Save here, load in a fresh interpreter that only imports hf_cft: same class text features."""
    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)["coop"]())
    _randomise(model)
    torch.save(model.class_text_features(toy_tokenizer).detach(), tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        import hf_cft
        from peft import PeftModel
        from hf_cft.testing import tiny_clip
        from conftest import ToyTokenizer
        m = PeftModel.from_pretrained(tiny_clip(), {str(tmp_path / "adapter")!r})
        got = m.class_text_features(ToyTokenizer())
        exp = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(got, exp), (got - exp).abs().max()
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: CoOpConfig(n_ctx=4, placeholder_token_id=343), 4 * 512),
        (lambda: CoOpConfig(n_ctx=16, placeholder_token_id=343), 16 * 512),
        (
            lambda: CoOpConfig(n_ctx=16, class_specific=True, classnames=list("abcdefghij"), placeholder_token_id=343),
            10 * 16 * 512,
        ),
        (lambda: VPTConfig(n_tokens=8), 8 * 768),
        (lambda: VPTConfig(n_tokens=8, deep=True), 12 * 8 * 768),
        (lambda: LinearHeadConfig(num_classes=10, init="zeros"), 10 * 512 + 10),
        (
            lambda: LoraConfig(r=64, lora_alpha=1, use_rslora=True, target_modules=["fc1", "fc2"]),
            12 * 491_520 + 12 * 327_680,
        ),
    ],
)
def test_trainable_counts_on_vit_b16_shape(make, expected):
    from transformers import CLIPModel

    from hf_cft.testing import clip_vit_b16_config

    with torch.device("meta"):
        model = get_peft_model(CLIPModel(clip_vit_b16_config()), make())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total - trainable == 149_620_737  # CLIP ViT-B/16


def test_methods_on_siglip(toy_tokenizer, tmp_path):
    """CoOp (text embeddings), VPT (no CLS: prompts in front) and the head (on SigLIP's pooling head)."""
    from hf_cft.testing import tiny_siglip

    coop = get_peft_model(tiny_siglip(), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    _randomise(coop)
    feats = coop.class_text_features(toy_tokenizer)
    coop.save_pretrained(tmp_path / "coop")
    again = PeftModel.from_pretrained(tiny_siglip(), tmp_path / "coop").class_text_features(toy_tokenizer)
    torch.testing.assert_close(again, feats, rtol=0, atol=0)
    vpt = get_peft_model(tiny_siglip(), VPTConfig(n_tokens=3))
    with torch.no_grad():
        base = image_features(tiny_siglip(), PIXELS)
        assert not torch.allclose(image_features(vpt, PIXELS), base)
    head = get_peft_model(tiny_siglip(), LinearHeadConfig(classnames=CLASSES).set_tokenizer(toy_tokenizer))
    assert head.classify(PIXELS).shape == (3, 3)


# ------------------------------------------------------------------------------------------------ registration
# register() runs when hf_cft is imported; these call its parts directly, on copies of PEFT's tables.


@pytest.mark.parametrize(
    ("version", "warns"),
    [
        ("0.21.0", False),
        ("0.21.7", False),
        ("0.20.3", True),
        ("0.22.0", True),
        ("1.0.0", True),
        ("0.21.0.dev0", False),
    ],
)
def test_peft_version_check_warns_outside_the_supported_minor(monkeypatch, version, warns):
    import warnings

    import peft

    from hf_cft.peft import registration

    monkeypatch.setattr(peft, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registration._check_version()
    messages = [str(w.message) for w in caught]
    if not warns:
        assert messages == []
        return
    assert messages == [
        "hf_cft registers its PEFT method types through peft's private mapping dictionaries and was tested with "
        f"peft 0.21.x; peft {version} is installed and may have changed them."
    ]
    assert caught[0].category is UserWarning and caught[0].filename == __file__  # the caller's line


def test_peft_deprecation_filter_silences_exactly_that_message():
    import warnings

    from hf_cft.peft import registration

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registration._quiet_peft_deprecation()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated, use `is_activation_checkpointing`", FutureWarning, stacklevel=1
        )
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=1)  # another category: kept
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "`is_gradient_checkpointing` is deprecated"),
        (FutureWarning, "something else is deprecated"),
    ]


def test_register_fills_the_three_peft_tables_idempotently_and_refuses_a_taken_type(monkeypatch):
    from peft import mapping

    from hf_cft.errors import HfCftError
    from hf_cft.peft import registration
    from hf_cft.peft.coop import COOP_PEFT_TYPE, CoOpConfig, CoOpModel
    from hf_cft.peft.head import HEAD_PEFT_TYPE, LinearHeadConfig, LinearHeadModel
    from hf_cft.peft.vpt import VPT_PEFT_TYPE, VPTConfig, VPTModel

    names = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
    tables = {name: {"LORA": object()} for name in names}
    for name, table in tables.items():
        monkeypatch.setattr(mapping, name, table)
    registration.register()
    registration.register()  # idempotent
    want = {
        COOP_PEFT_TYPE: (CoOpConfig, CoOpModel, CoOpModel.prefix),
        VPT_PEFT_TYPE: (VPTConfig, VPTModel, VPTModel.prefix),
        HEAD_PEFT_TYPE: (LinearHeadConfig, LinearHeadModel, LinearHeadModel.prefix),
    }
    for type_str, values in want.items():
        assert tuple(tables[name][type_str] for name in names) == values
    assert all(len(t) == 4 and "LORA" in t for t in tables.values())
    assert registration.is_registered()

    class CoOpModel2:  # a class of another name under the same type string: refused
        pass

    tables["PEFT_TYPE_TO_TUNER_MAPPING"][VPT_PEFT_TYPE] = CoOpModel2
    with pytest.raises(
        HfCftError, match=rf"^PEFT type '{VPT_PEFT_TYPE}' is already registered to .*CoOpModel2.*, not "
    ):
        registration.register()
    tables["PEFT_TYPE_TO_TUNER_MAPPING"][VPT_PEFT_TYPE] = type("VPTModel", (), {})  # same name (a reload): taken over
    registration.register()
    assert tables["PEFT_TYPE_TO_TUNER_MAPPING"][VPT_PEFT_TYPE] is VPTModel
    monkeypatch.setattr(mapping, "PEFT_TYPE_TO_PREFIX_MAPPING", None)
    with pytest.raises(HfCftError, match=r"^peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING is missing in peft .*: hf_cft"):
        registration.register()


def test_head_logits_normalise_when_told_add_the_bias_and_default_to_the_plain_template(toy_tokenizer):
    """``head_logits(f)`` takes f as already unit-norm; ``normalized=False`` normalises each row first; the bias is
    added; without templates the zero-shot init uses "a photo of a {}."; a disabled head has no parameters."""
    model = get_peft_model(tiny_clip(), LinearHeadConfig(classnames=CLASSES).set_tokenizer(toy_tokenizer))
    base = tiny_clip()
    with torch.no_grad():
        plain = build_zeroshot_classifier(base, toy_tokenizer, CLASSES, ["a photo of a {}."])
    w, b = model.base_model.head_parameters()
    torch.testing.assert_close(w.detach(), plain * base.logit_scale.exp(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        b.copy_(torch.tensor([0.5, -1.0, 2.0]))
        f = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0)) * 3.0
        unit = torch.nn.functional.normalize(f, dim=-1)
        torch.testing.assert_close(model.base_model.head_logits(f), f @ w.t() + b)
        torch.testing.assert_close(model.base_model.head_logits(f, normalized=False), unit @ w.t() + b)
        torch.testing.assert_close(model.base_model.head_logits(f.double(), normalized=False), unit @ w.t() + b)
    assert model.base_model.head_parameters("default")[0] is w
    with model.disable_adapter(), pytest.raises(AdapterError) as err:
        model.base_model.head_parameters()
    assert str(err.value) == "no linear-head adapter is active (disabled, or set_adapter to another one)"
    with pytest.raises(AdapterError, match="^no linear-head adapter is active"):
        model.base_model.head_parameters("nope")  # a name that is not a head adapter


def test_deep_vpt_replaces_exactly_its_prompt_slots_at_every_layer():
    """Deep VPT: each wrapped encoder layer receives the previous layer's output with the prompt slots
    [s, s + n) replaced by its own prompts, every other token (and the sequence length) unchanged; the wrapped
    layer gets the other arguments as they were passed."""
    from hf_cft.peft.vpt.layer import VPTDeepLayer

    model = get_peft_model(tiny_clip(num_layers=3), VPTConfig(n_tokens=2, deep=True))
    layers = model.base_model.model.vision_model.encoder.layers
    assert [isinstance(m, VPTDeepLayer) for m in layers] == [False, True, True]
    outs, ins, outer = {}, {}, {}
    hooks = []
    for j, layer in enumerate(layers):
        hooks.append(
            layer.register_forward_hook(lambda m, a, o, j=j: outs.__setitem__(j, o[0] if isinstance(o, tuple) else o))
        )
        if isinstance(layer, VPTDeepLayer):
            hooks.append(
                layer.register_forward_pre_hook(lambda m, a, k, j=j: outer.__setitem__(j, sorted(k)), with_kwargs=True)
            )
            hooks.append(
                layer.get_base_layer().register_forward_pre_hook(
                    lambda m, a, k, j=j: ins.__setitem__(j, (a[0].detach().clone(), sorted(k))), with_kwargs=True
                )
            )
    try:
        with torch.no_grad():
            image_features(model, PIXELS)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(ins) == [1, 2]
    for j, (x, kwargs) in ins.items():
        d = layers[j]
        s, prompts = d._start, d.vpt_prompts["default"]
        n, prev = prompts.shape[0], outs[j - 1]
        assert x.shape == prev.shape
        assert torch.equal(x[:, s : s + n], prompts.expand(x.shape[0], -1, -1))
        assert torch.equal(x[:, :s], prev[:, :s]) and torch.equal(x[:, s + n :], prev[:, s + n :])
        assert kwargs == outer[j]  # the other arguments passed on as given


def test_vpt_on_siglip2_grows_the_patch_mask_by_ones_at_the_prompt_slots():
    """SigLIP2 (NaFlex) hands ``pixel_attention_mask`` [B, N] to its tower: with a VPT adapter active the tower sees
    the mask with n ones inserted at the prompt slots (same dtype); disabled, the mask as given; the hook that does
    it is registered once however many adapters are made."""
    import numpy as np

    from hf_cft.peft.vpt.layer import VPTEmbeddingLayer
    from hf_cft.peft.vpt.model import _extend_patch_mask
    from hf_cft.testing import tiny_family, tiny_family_image_processor

    model = get_peft_model(tiny_family("siglip2")[0], VPTConfig(n_tokens=3))
    proc = tiny_family_image_processor("siglip2")
    rng = np.random.default_rng(0)
    enc = proc(images=[rng.integers(0, 255, (20, 28, 3), dtype=np.uint8) for _ in range(2)], return_tensors="pt")
    mask = enc["pixel_attention_mask"]
    assert not mask.all()  # padded patches: zeros to keep
    tower = model.base_model.model.vision_model
    layer = next(m for m in tower.modules() if isinstance(m, VPTEmbeddingLayer))
    seen = []
    handle = tower.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["pixel_attention_mask"].clone()), with_kwargs=True
    )
    try:
        _extend_patch_mask(tower, "embeddings")  # again: still one hook
        with torch.no_grad():
            image_features(model, enc["pixel_values"], pixel_attention_mask=mask, spatial_shapes=enc["spatial_shapes"])
            with model.disable_adapter():
                image_features(
                    model, enc["pixel_values"], pixel_attention_mask=mask, spatial_shapes=enc["spatial_shapes"]
                )
    finally:
        handle.remove()
    s = layer._start
    want = torch.cat([mask[:, :s], torch.ones(2, 3, dtype=mask.dtype), mask[:, s:]], dim=1)
    assert len(seen) == 2 and seen[0].dtype == mask.dtype
    assert torch.equal(seen[0], want) and torch.equal(seen[1], mask)


@pytest.mark.parametrize("method", ["coop", "vpt", "head"])
def test_unload_restores_the_plain_model_and_merge_is_refused_with_the_reason(method, toy_tokenizer):
    """CoOp, VPT and the head add tokens or a head: ``merge_and_unload`` is refused with the whole reason;
    ``unload`` returns the base model with every wrapped module replaced by its original (same outputs as a fresh
    base) and without PEFT's config attribute."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from hf_cft.errors import AdapterMergeError

    model = get_peft_model(tiny_clip(), _configs(toy_tokenizer)[method]())
    with pytest.raises(AdapterMergeError) as err:
        model.merge_and_unload()
    assert str(err.value).endswith(
        "adapters cannot be merged into the base weights: they add learned tokens or a classification head, not a "
        "weight update. Use unload() to get the base model back, or keep the PeftModel for inference."
    )
    plain = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert not hasattr(plain, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(image_features(plain, PIXELS), image_features(tiny_clip(), PIXELS))


def test_head_and_vpt_configs_refuse_bad_values_with_their_messages():
    cases = [
        (lambda: LinearHeadConfig(num_classes=3, init="uniform"), r"^init must be one of "),
        (
            lambda: LinearHeadConfig(num_classes=0, init="zeros"),
            r"^LinearHeadConfig needs num_classes or classnames.$",
        ),
        (lambda: LinearHeadConfig(num_classes=2, classnames=CLASSES), r"^num_classes=2 but 3 classnames were given.$"),
        (lambda: LinearHeadConfig(num_classes=3), r"^init='zeroshot' needs classnames \(and templates\) to build"),
        (lambda: VPTConfig(n_tokens=0), r"^n_tokens must be at least 1, got 0$"),
    ]
    for make, message in cases:
        with pytest.raises(AdapterError, match=message):
            make()
    assert LinearHeadConfig(num_classes=1, init="zeros").num_classes == 1  # one class is allowed
    assert VPTConfig(n_tokens=1).n_tokens == 1


def test_head_random_init_scale_bias_and_repr():
    """``init="random"``: N(0, 1/d) entries (d the feature size); the bias starts at 0; the wrapped layer shows as
    ``linear_head.``."""
    from hf_cft.peft.head.layer import LinearHeadLayer

    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=200, init="random"))
    w, b = model.base_model.head_parameters()
    d = w.shape[1]
    assert w.dtype == torch.float32 and 0.8 * d**-0.5 < float(w.std()) < 1.2 * d**-0.5 and abs(float(w.mean())) < 0.02
    assert b is not None and not b.any() and b.dtype == torch.float32
    layer = next(m for m in model.modules() if isinstance(m, LinearHeadLayer))
    assert repr(layer).startswith("linear_head.")


def test_vpt_prompts_are_uniform_in_the_papers_range_and_layers_show_their_kind():
    """VPT's prompts start U(−r, r) with r = √(6 / (3·p² + h)) (Xavier over a patch and the hidden size), in fp32;
    the wrapped layers show as ``vpt.`` and ``vpt_deep.``."""
    from hf_cft.peft.vpt.layer import VPTDeepLayer, VPTEmbeddingLayer, default_init_range

    assert default_init_range(16, 768) == pytest.approx(math.sqrt(6 / (3 * 16 * 16 + 768)))
    assert default_init_range(14, 1024, channels=1) == pytest.approx(math.sqrt(6 / (14 * 14 + 1024)))
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), VPTConfig(n_tokens=400, deep=True))
    cfg = model.base_model.model.config.vision_config
    r = default_init_range(cfg.patch_size, cfg.hidden_size)
    emb = next(m for m in model.modules() if isinstance(m, VPTEmbeddingLayer))
    p = emb.vpt_prompts["default"]
    assert p.dtype == torch.float32 and p.shape == (400, cfg.hidden_size)
    assert float(p.abs().max()) <= r and float(p.abs().max()) > 0.95 * r
    assert float(p.std()) == pytest.approx(r / math.sqrt(3), rel=0.05)  # the std of U(−r, r)
    assert repr(emb).startswith("vpt.") and repr(
        next(m for m in model.modules() if isinstance(m, VPTDeepLayer))
    ).startswith("vpt_deep.")


# ------------------------------------------------------------------------------------------------ pinned rules (2)
# Each test below fails on a small plausible change that the tests above let through (scripts/mutation.py).


def test_vpt_keeps_the_cls_token_first_and_passes_the_embeddings_keyword_arguments():
    """The prompts sit right after CLS (CLS stays at position 0, the patches follow the prompts); keyword arguments
    such as ``interpolate_pos_encoding`` reach the embeddings."""
    from hf_cft.peft.vpt.layer import VPTEmbeddingLayer

    base = tiny_clip()
    with torch.no_grad():
        plain = base.vision_model.embeddings(PIXELS)
    model = get_peft_model(base, VPTConfig(n_tokens=3))
    layer = next(m for m in model.modules() if isinstance(m, VPTEmbeddingLayer))
    with torch.no_grad():
        out = layer(PIXELS)
    prompts = layer.vpt_prompts["default"]
    torch.testing.assert_close(out[:, 0], plain[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:4], prompts.expand(3, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(out[:, 4:], plain[:, 1:], rtol=0, atol=0)
    big = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert layer(big, interpolate_pos_encoding=True).shape[:2] == (2, 1 + 3 + (40 // 2) ** 2)


def test_vpt_prompts_follow_the_model_dtype_and_need_a_vision_tower():
    """fp32 prompts on a bf16 model are cast to the activations' dtype (shallow and deep); a model without a
    ``vision_model.embeddings`` module (here a bare vision transformer) is refused with the reason."""
    from transformers import CLIPVisionModel

    for deep in (False, True):
        model = get_peft_model(tiny_clip().to(torch.bfloat16), VPTConfig(n_tokens=2, deep=deep))
        with torch.no_grad():
            assert image_features(model, PIXELS.to(torch.bfloat16)).dtype == torch.bfloat16
    bare = CLIPVisionModel(tiny_clip().config.vision_config)
    with pytest.raises(
        AdapterError, match=r"^VPT needs a vision tower with an `embeddings` module \(CLIPVisionEmbeddings\).$"
    ):
        get_peft_model(bare, VPTConfig(n_tokens=2, target_modules=["embeddings"]))


def test_one_adapter_at_a_time_is_said_by_each_method():
    """VPT (embeddings and deep layers) and the linear head run one adapter at a time and say which are active."""
    from hf_cft.peft.vpt.layer import VPTDeepLayer

    vpt = get_peft_model(tiny_clip(), VPTConfig(n_tokens=2, deep=True))
    vpt.add_adapter("b", VPTConfig(n_tokens=2, deep=True))
    deep = next(m for m in vpt.modules() if isinstance(m, VPTDeepLayer))
    deep.set_adapter(["default", "b"])  # only the deep layer: the embeddings still run one adapter
    with pytest.raises(
        AdapterError, match=r"^VPT runs one adapter at a time; active adapters are \['default', 'b'\].$"
    ):
        image_features(vpt, PIXELS)
    vpt.base_model.set_adapter(["default", "b"])
    with pytest.raises(
        AdapterError, match=r"^VPT runs one adapter at a time; active adapters are \['default', 'b'\].$"
    ):
        image_features(vpt, PIXELS)
    head = get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=3, init="zeros"))
    head.add_adapter("b", LinearHeadConfig(num_classes=3, init="zeros"))
    head.base_model.set_adapter(["default", "b"])
    with pytest.raises(
        AdapterError, match=r"^Linear head runs one adapter at a time; active adapters are \['default', 'b'\].$"
    ):
        head.classify(PIXELS)


def test_adapter_targets_and_configs_are_refused_with_their_messages(toy_tokenizer):
    import re

    with pytest.raises(
        AdapterError,
        match=r"^VPT adapter 'default': target '[\w.]*text_model.embeddings' \(CLIPTextEmbeddings\) is neither the "
        r"vision embeddings nor an encoder layer.$",
    ):
        get_peft_model(tiny_clip(), VPTConfig(n_tokens=2, target_modules=["text_model.embeddings"]))
    with pytest.raises(
        AdapterError,
        match=r"^Linear-head adapter 'default': target '[\w.]*activation_fn' \(QuickGELUActivation\) has no parameters; target the "
        r"module that produces the image features \(visual_projection\).$",
    ):
        get_peft_model(
            tiny_clip(),
            LinearHeadConfig(
                num_classes=3, init="zeros", target_modules=["vision_model.encoder.layers.0.mlp.activation_fn"]
            ),
        )
    with pytest.raises(
        AdapterError,
        match=re.escape(
            "Linear-head adapter 'default' with init='zeroshot' needs a tokenizer: call config.set_tokenizer(tokenizer) "
            "or set tokenizer_name_or_path (or use init='zeros')."
        )
        + "$",
    ):
        get_peft_model(tiny_clip(), LinearHeadConfig(classnames=CLASSES))
    for bad in (0, -0.1, float("nan")):
        with pytest.raises(AdapterError, match=rf"^init_range must be a positive number, got {bad}$"):
            VPTConfig(n_tokens=2, init_range=bad)
    assert VPTConfig(n_tokens=2, init_range=0.5).init_range == 0.5  # also above 0 and below 1
    assert VPTConfig(n_tokens=2, init_range=2.0).init_range == 2.0


def test_head_logits_of_one_feature_vector_and_without_a_head_layer():
    """head_logits normalises along the feature axis, also for a single feature vector; a tuner whose head was
    unloaded says it has no head layer."""
    from hf_cft.peft.head.layer import LinearHeadLayer

    model = get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=3, init="random"))
    feats = torch.randn(4, model.base_model.head_parameters()[0].shape[1], generator=torch.Generator().manual_seed(2))
    both = model.base_model.head_logits(feats, normalized=False)
    torch.testing.assert_close(model.base_model.head_logits(feats[1], normalized=False), both[1])
    layer = LinearHeadLayer(torch.nn.Linear(4, 4), "a", num_classes=3, dim=4, bias=True)
    assert not layer.head_weight["a"].any()  # the default init is zeros
    tuner = model.base_model
    tuner.unload()
    with pytest.raises(AdapterError, match=r"^this model has no linear-head layer$"):
        tuner.head_parameters()


def test_register_names_a_missing_peft_table_and_a_prefix_taken_by_another_method(monkeypatch):
    import sys

    import peft
    from peft import mapping

    from hf_cft.errors import HfCftError
    from hf_cft.peft.registration import register

    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_PREFIX_MAPPING")
    with pytest.raises(
        HfCftError,
        match=rf"^peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING is missing in peft {peft.__version__}: hf_cft cannot "
        r"register its method types with this PEFT release.$",
    ):
        register()
    monkeypatch.undo()
    monkeypatch.setitem(mapping.PEFT_TYPE_TO_PREFIX_MAPPING, "HF_CFT_VPT", "someone_else_")
    with pytest.raises(
        HfCftError, match=r"^PEFT type 'HF_CFT_VPT' is already registered to 'someone_else_', not 'vpt_'.$"
    ):
        register()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(HfCftError, match=r"^hf_cft's PEFT methods need peft installed$"):
        register()


def test_vpt_on_siglip2_with_two_active_adapters_says_so_before_the_tower_runs():
    """The SigLIP2 patch-mask hook runs one VPT adapter at a time, like the layers, and says which are active."""
    import numpy as np

    from hf_cft.testing import tiny_family, tiny_family_image_processor

    model = get_peft_model(tiny_family("siglip2")[0], VPTConfig(n_tokens=3))
    model.add_adapter("b", VPTConfig(n_tokens=2))
    model.base_model.set_adapter(["default", "b"])
    enc = tiny_family_image_processor("siglip2")(
        images=[np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)], return_tensors="pt"
    )
    message = r"^VPT runs one adapter at a time; active adapters are \['default', 'b'\].$"
    with pytest.raises(AdapterError, match=message), torch.no_grad():
        image_features(
            model,
            enc["pixel_values"],
            pixel_attention_mask=enc["pixel_attention_mask"],
            spatial_shapes=enc["spatial_shapes"],
        )


def test_is_registered_says_whether_peft_knows_every_method_type(monkeypatch):
    from peft import mapping

    from hf_cft.peft.registration import is_registered

    assert is_registered()
    monkeypatch.delitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "HF_CFT_VPT")
    assert not is_registered()


def test_head_classify_passes_the_familys_image_inputs():
    """On SigLIP2 (NaFlex) the head's classify passes pixel_attention_mask and spatial_shapes to the image tower:
    its logits are the head's logits of those image features."""
    import numpy as np

    from hf_cft.testing import tiny_family, tiny_family_image_processor

    model = get_peft_model(tiny_family("siglip2")[0], LinearHeadConfig(num_classes=3, init="random"))
    enc = tiny_family_image_processor("siglip2")(
        images=[np.random.default_rng(1).integers(0, 255, (20, 28, 3), dtype=np.uint8)], return_tensors="pt"
    )
    inputs = {"pixel_attention_mask": enc["pixel_attention_mask"], "spatial_shapes": enc["spatial_shapes"]}
    with torch.no_grad():
        want = model.base_model.head_logits(image_features(model, enc["pixel_values"], **inputs))
        torch.testing.assert_close(model.classify(enc["pixel_values"], **inputs), want)


# ------------------------------------------------------------------------------------------------ CoOp prompt rules


def test_coop_prompt_helpers_placeholders_leading_specials_and_context_runs():
    """The placeholder's ids alone and after a space (SigLIP2's tokenizer spells them differently: both count), the
    number of special tokens before the text (CLIP's BOS: 1, SigLIP: 0, 1 when the placeholder is not found), and
    the number of runs of context slots in a mask."""
    from hf_cft.peft.coop.model import _contiguous_runs, _leading_specials, _placeholder_ids, _word_ids
    from hf_cft.testing import tiny_family_tokenizer

    siglip2 = tiny_family_tokenizer("siglip2")
    alone, spaced = _word_ids(siglip2, "X"), _word_ids(siglip2, "X X")[1:]
    assert alone != spaced and _placeholder_ids(siglip2, "X") == sorted(set(alone) | set(spaced))
    for family, lead in (("clip", 1), ("siglip", 0)):
        tok = tiny_family_tokenizer(family)
        assert _leading_specials(tok, "X", torch.tensor(_placeholder_ids(tok, "X"))) == lead, family
    assert _leading_specials(tiny_family_tokenizer("siglip"), "X", torch.tensor([10**6])) == 1
    runs = {(0, 0, 0): 0, (1, 1, 0): 1, (0, 1, 1): 1, (1, 0, 1): 2, (0, 1, 0, 1, 0, 1): 3}
    for mask, want in runs.items():
        assert _contiguous_runs(torch.tensor(mask, dtype=torch.bool)) == want, mask


def test_coop_refusals_name_the_class_and_the_adapter(toy_tokenizer):
    """A class name too long for the text tower's positions is named; a class-specific context asked for other
    classes lists three of each."""
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    long = " ".join(["cat"] * 100)
    with pytest.raises(
        AdapterError,
        match=rf"^CoOp adapter 'default': 4 context tokens plus class '{long}' do not fit the text tower's positions \(",
    ):
        model.class_text_features(toy_tokenizer, ["dog", long])
    names = ["a", "b", "c", "d", "e"]
    cs = get_peft_model(
        tiny_clip(), CoOpConfig(n_ctx=2, class_specific=True, classnames=names).set_tokenizer(toy_tokenizer)
    )
    with pytest.raises(
        AdapterError,
        match=r"^CoOp adapter 'default' has class-specific contexts for 5 classes \(\['a', 'b', 'c'\]...\); it cannot "
        r"encode other classes \(\['v', 'w', 'x'\]...\).$",
    ):
        cs.class_text_features(toy_tokenizer, ["v", "w", "x", "y", "z"])


def test_coop_class_text_features_of_a_named_adapter_use_its_own_prompts(toy_tokenizer):
    """class_text_features(adapter_name=...) of an adapter that is not the active one builds that adapter's prompts
    (here 2 context tokens, the active one has 4) and equals its features once it is active."""
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    model.add_adapter("two", CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    with torch.no_grad():
        named = model.class_text_features(toy_tokenizer, CLASSES, adapter_name="two")
        model.set_adapter("two")
        active = model.class_text_features(toy_tokenizer, CLASSES)
    torch.testing.assert_close(named, active)


def test_coop_named_adapter_features_leave_trainability_and_disabled_adapters_alone(toy_tokenizer):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    model.add_adapter("two", CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        model.class_text_features(toy_tokenizer, CLASSES, adapter_name="two")
        with model.disable_adapter():  # the base layer runs, whichever adapter is named
            plain = text_features(model, **tokenize_prompts(toy_tokenizer, ["a photo of a cat."], model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.active_adapter == "default"
    with torch.no_grad():
        base = text_features(tiny_clip(), **tokenize_prompts(toy_tokenizer, ["a photo of a cat."], tiny_clip()))
    torch.testing.assert_close(plain, base)


@pytest.mark.parametrize("position", ["end", "front", "middle"])
def test_coop_context_slots_follow_left_padding(position):
    """With a left-padding tokenizer the prompts' first real token moves right: the context slots found by
    build_prompts are still exactly the placeholder positions of each prompt."""
    from hf_cft.peft.coop.model import _placeholder_ids
    from hf_cft.testing import tiny_family

    model, tok = tiny_family("clip")[:2]
    tok.padding_side = "left"
    names = ["cat", "sea lion", "dog"]
    coop = get_peft_model(
        model, CoOpConfig(n_ctx=4, classnames=names, class_token_position=position).set_tokenizer(tok)
    )
    enc = coop.base_model.build_prompts(tok, names)
    assert bool((enc["attention_mask"][:, 0] == 0).any())  # some prompt is padded on the left
    placeholders = torch.isin(enc["input_ids"], torch.tensor(_placeholder_ids(tok, "X")))
    assert torch.equal(enc["ctx_mask"], placeholders) and enc["ctx_mask"].sum(1).tolist() == [4, 4, 4]


def test_coop_context_slots_without_a_leading_special_token():
    """SigLIP's T5-style prompts start with the text itself (no BOS): the context slots begin at position 0."""
    from hf_cft.peft.coop.model import _placeholder_ids
    from hf_cft.testing import tiny_family

    model, tok = tiny_family("siglip")[:2]
    names = ["cat", "dog"]
    coop = get_peft_model(model, CoOpConfig(n_ctx=3, classnames=names).set_tokenizer(tok))
    enc = coop.base_model.build_prompts(tok, names)
    placeholders = torch.isin(enc["input_ids"], torch.tensor(_placeholder_ids(tok, "X")))
    assert torch.equal(enc["ctx_mask"], placeholders) and enc["ctx_mask"][:, :3].all()


def test_coop_layer_forward_rules_on_the_embedding_layer(toy_tokenizer):
    """The CoOp embedding layer called directly: custom position ids and given input embeddings reach the base
    layer (adapter active or disabled); a one-token context is inserted; a wrong placeholder count and a
    class-specific context without row classes are refused with their exact reasons; two active CoOp adapters are
    refused naming the method; its repr is prefixed like PEFT's layers."""
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=1, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    layer = model.base_model._coop_layer()
    base = layer.get_base_layer()
    ph = layer.coop_placeholder_id["default"]
    ids = torch.tensor([[97, ph, 5, 98], [97, 6, 7, 98]])
    positions = torch.tensor([[3, 2, 1, 0], [3, 2, 1, 0]])
    with torch.no_grad():
        got = layer(input_ids=ids, position_ids=positions)
        embeds = base.token_embedding(ids).clone()
        embeds[0, 1] = layer.coop_ctx["default"][0]
        torch.testing.assert_close(got, base(input_ids=ids, position_ids=positions, inputs_embeds=embeds))
        assert not torch.allclose(got[0], base(input_ids=ids, position_ids=positions)[0])  # the context went in
        given = torch.randn(2, 4, embeds.shape[-1])
        torch.testing.assert_close(layer(inputs_embeds=given), base(inputs_embeds=given))
        with model.disable_adapter():
            torch.testing.assert_close(
                layer(input_ids=ids, position_ids=positions), base(input_ids=ids, position_ids=positions)
            )
    with pytest.raises(
        AdapterError,
        match=r"^CoOp adapter 'default': a prompt holds 2 placeholder tokens but the adapter has 1 context vectors "
        r"\(does a class name contain the placeholder word\? encode class prompts through class_text_features\(\), "
        r"which marks the slots by position\).$",
    ):
        layer(input_ids=torch.tensor([[97, 5, 6, 98], [97, ph, ph, 98]]))
    assert repr(layer).startswith("coop.")
    cs = get_peft_model(
        tiny_clip(), CoOpConfig(n_ctx=1, class_specific=True, classnames=CLASSES).set_tokenizer(toy_tokenizer)
    )
    with pytest.raises(
        AdapterError,
        match=r"^CoOp adapter 'default' is class-specific: encode prompts through class_text_features\(\), which tells "
        r"the layer which class each prompt belongs to.$",
    ):
        cs.base_model._coop_layer()(input_ids=ids)
    model.add_adapter("two", CoOpConfig(n_ctx=1, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    model.base_model.set_adapter(["default", "two"])
    with pytest.raises(
        AdapterError, match=r"^CoOp runs one adapter at a time; active adapters are \['default', 'two'\].$"
    ):
        layer(input_ids=ids)


def test_coop_configuration_refusals_name_the_adapter_and_the_fix(toy_tokenizer):
    """A placeholder that is several tokens, a ctx_init without a tokenizer (n_ctx unset) and a target module without a
    token-embedding table are refused with their exact reasons; a second CoOp adapter on the same embeddings layer
    gets its own context next to the first one's."""
    cases = [
        (CoOpConfig(n_ctx=2, placeholder_token="hello world", classnames=["a"]).set_tokenizer(toy_tokenizer),
         r"^CoOp adapter 'default': placeholder 'hello world' is 2 tokens for this tokenizer; choose a word that is "
         r"a single token \(CoOp uses 'X'\).$"),
        (CoOpConfig(ctx_init="a photo", classnames=["a"]),
         r"^CoOp adapter 'default': ctx_init='a photo' needs a tokenizer; call config.set_tokenizer\(tokenizer\) or "
         r"set tokenizer_name_or_path.$"),
        (CoOpConfig(n_ctx=2, classnames=["a"], target_modules=["text_model.encoder.layers.0.mlp.fc1"]).set_tokenizer(toy_tokenizer),
         r"^CoOp adapter 'default': target 'text_model.encoder.layers.0.mlp.fc1' is a Linear, not a text embeddings "
         r"module with a token-embedding table \(token_embedding or word_embeddings\).$"),
    ]  # fmt: skip
    for config, message in cases:
        with pytest.raises(AdapterError, match=message):
            get_peft_model(tiny_clip(), config)
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    model.add_adapter("two", CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    layer = model.base_model._coop_layer()
    assert isinstance(layer.get_base_layer(), torch.nn.Module) and not isinstance(layer.get_base_layer(), CoOpLayer)
    assert {k: tuple(v.shape[:-1]) for k, v in layer.coop_ctx.items()} == {"default": (4,), "two": (2,)}


def test_coop_features_of_an_adapter_the_model_lacks_are_refused(toy_tokenizer):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    for call in (model.class_text_features, model.base_model.build_prompts):
        with pytest.raises(AdapterError, match=r"^No adapter named 'nope'; this model has \['default'\].$"):
            call(toy_tokenizer, CLASSES, adapter_name="nope")


# ----------------------------------------------------------- exact rules of the CoOp config (pinned by mutation tests)


def test_resolve_tokenizer_tries_the_tokenizer_path_then_the_base_model_path(tmp_path):
    """An attached tokenizer wins; else ``tokenizer_name_or_path``, else ``base_model_name_or_path`` (a path
    that does not load falls through to the next); ``None`` when neither loads."""
    from hf_cft.peft.base import resolve_tokenizer
    from hf_cft.testing import tiny_family_tokenizer

    tok = tiny_family_tokenizer("clip")
    tok.save_pretrained(tmp_path / "tok")
    good, bad = str(tmp_path / "tok"), str(tmp_path / "missing")
    vocab = tok.get_vocab()
    cases = [(good, bad), (bad, good), (None, good), (good, None)]
    for tokenizer_path, base_path in cases:
        config = CoOpConfig(n_ctx=2, tokenizer_name_or_path=tokenizer_path, base_model_name_or_path=base_path)
        loaded = resolve_tokenizer(config)
        assert loaded is not None and loaded.get_vocab() == vocab, (tokenizer_path, base_path)
    assert resolve_tokenizer(CoOpConfig(n_ctx=2, tokenizer_name_or_path=bad, base_model_name_or_path=bad)) is None
    attached = CoOpConfig(n_ctx=2, tokenizer_name_or_path=bad).set_tokenizer(tok)
    assert resolve_tokenizer(attached) is tok


def test_coop_config_refusals_are_exact_and_init_std_zero_gives_a_zero_context(toy_tokenizer):
    """n_ctx < 1, a negative or NaN init_std, class_specific without classnames: exact messages. init_std is the
    context's initial standard deviation (0 allowed: an all-zero context); n_ctx defaults to 16 without ctx_init."""
    refusals = [
        (dict(n_ctx=0), "n_ctx must be at least 1, got 0"),
        (dict(init_std=-0.1), "init_std must be a non-negative number, got -0.1"),
        (dict(init_std=math.nan), "init_std must be a non-negative number, got nan"),
        (dict(class_specific=True), "class_specific=True (CSC) needs classnames: one context is learned per class."),
    ]
    for kwargs, message in refusals:
        with pytest.raises(AdapterError) as err:
            CoOpConfig(**kwargs)
        assert str(err.value) == message
    zero = get_peft_model(tiny_clip(max_position_embeddings=40), CoOpConfig(init_std=0.0).set_tokenizer(toy_tokenizer))
    ctx = zero.base_model.model.text_model.embeddings.coop_ctx["default"]
    assert tuple(ctx.shape) == (16, tiny_clip().config.text_config.hidden_size) and not ctx.any()
    assert zero.peft_config["default"].n_ctx == 16
    torch.manual_seed(0)
    wide = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=8, init_std=2.0).set_tokenizer(toy_tokenizer))
    std = float(wide.base_model.model.text_model.embeddings.coop_ctx["default"].std())
    assert 1.6 < std < 2.4  # 8 × hidden entries drawn with std 2 (the default 0.02 is a hundred times smaller)


def test_a_model_without_a_coop_layer_is_refused_by_name():
    from types import SimpleNamespace

    from hf_cft.peft.coop.model import CoOpModel

    with pytest.raises(AdapterError) as err:
        CoOpModel._coop_layer(SimpleNamespace(model=torch.nn.Linear(2, 2)))
    assert str(err.value) == "this model has no CoOp layer"


def test_coop_rewrites_only_the_default_target_to_a_familys_text_embeddings():
    """On AltCLIP the text embeddings are ``text_model.roberta.embeddings``: the default target is rewritten to
    them, a target the user names (here by suffix) is kept as given; both adapt the same layer."""
    from hf_cft.testing import tiny_family

    model, tok = tiny_family("altclip")
    default = get_peft_model(model, CoOpConfig(n_ctx=2, init_std=0.0).set_tokenizer(tok))
    assert list(default.peft_config["default"].target_modules) == ["text_model.roberta.embeddings"]
    model, tok = tiny_family("altclip")
    named = get_peft_model(
        model, CoOpConfig(n_ctx=2, target_modules=["roberta.embeddings"], init_std=0.0).set_tokenizer(tok)
    )
    assert set(named.peft_config["default"].target_modules) == {"roberta.embeddings"}
    with torch.no_grad():
        torch.testing.assert_close(default.class_text_features(tok, ["cat"]), named.class_text_features(tok, ["cat"]))


def test_vpt_finds_the_vision_embeddings_of_a_wrapped_model_and_names_what_it_needs():
    from types import SimpleNamespace

    from hf_cft.peft.vpt.model import VPTModel

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = tiny_clip()

    wrapper = Wrapper()
    found = VPTModel._vision_embeddings(SimpleNamespace(model=wrapper))
    assert found is wrapper.clip.vision_model.embeddings
    with pytest.raises(AdapterError) as err:
        VPTModel._vision_embeddings(SimpleNamespace(model=torch.nn.Linear(2, 2)))
    assert str(err.value) == "VPT needs a vision tower with an `embeddings` module (CLIPVisionEmbeddings)."


def test_coop_features_without_classnames_anywhere_are_refused_exactly(toy_tokenizer):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2).set_tokenizer(toy_tokenizer))
    with pytest.raises(AdapterError) as err:
        model.class_text_features(toy_tokenizer)
    assert str(err.value) == "CoOp adapter 'default' has no classnames; pass classnames=[...]."


# ----------------------------------------------------------- layer and config rules (pinned by mutation tests)


def test_coop_layer_hands_input_ids_and_every_keyword_to_the_wrapped_embeddings():
    """AltCLIP's RoBERTa embeddings derive positions from input_ids (padding keeps the padding index) and take
    extra keywords (past_key_values_length shifts the positions): the CoOp layer passes input_ids with its
    context-filled inputs_embeds and every keyword on, with the adapter active or disabled."""
    from hf_cft.testing import tiny_family

    model, tok = tiny_family("altclip")
    coop = get_peft_model(model, CoOpConfig(n_ctx=2, init_std=0.5, classnames=["cat", "sea lion"]).set_tokenizer(tok))
    layer = coop.base_model._coop_layer()
    base = layer.get_base_layer()
    ids = coop.base_model.build_prompts(tok, ["cat", "sea lion"])["input_ids"]
    assert bool((ids == tok.pad_token_id).any())  # "cat" is padded: its positions differ from a plain count
    ph = layer.coop_placeholder_id["default"]
    with torch.no_grad():
        embeds = base.word_embeddings(ids).clone()
        embeds[ids == ph] = layer.coop_ctx["default"].repeat(2, 1)
        for kwargs in ({}, {"past_key_values_length": 2}):
            want = base(input_ids=ids, inputs_embeds=embeds, **kwargs)
            torch.testing.assert_close(layer(input_ids=ids, **kwargs), want, rtol=0, atol=0)
            assert not torch.allclose(base(inputs_embeds=embeds, **kwargs), want)  # input_ids count
        with coop.disable_adapter():
            want = base(input_ids=ids, past_key_values_length=2)
            torch.testing.assert_close(layer(input_ids=ids, past_key_values_length=2), want, rtol=0, atol=0)
            assert not torch.allclose(base(input_ids=ids), want)  # the keyword counts


def test_coop_features_keep_the_attention_mask_and_normalise_only_when_asked():
    """On a bidirectional text tower (AltCLIP) padding is seen unless masked: CoOp's class features of a
    ctx_init adapter equal the hand-crafted prompts' features with their attention mask, raw with normalize=False
    and unit-norm by default."""
    import torch.nn.functional as F

    from hf_cft.testing import tiny_family

    base, tok = tiny_family("altclip")
    names = ["cat", "sea lion"]
    coop = get_peft_model(tiny_family("altclip")[0], CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok))
    enc = tokenize_prompts(tok, [f"a photo of a {c}." for c in names], base)
    assert not bool(enc["attention_mask"].all())  # "cat" is padded
    with torch.no_grad():
        want = text_features(base, enc["input_ids"], enc["attention_mask"], normalize=False)
        unmasked = text_features(base, enc["input_ids"], None, normalize=False)
        raw = coop.class_text_features(tok, names, normalize=False)
        unit = coop.class_text_features(tok, names)
    assert (unmasked - want).abs().max() > 1e-5  # the mask matters on this tower
    torch.testing.assert_close(raw, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2), atol=1e-3)
    torch.testing.assert_close(unit, F.normalize(want, dim=-1), rtol=1e-6, atol=1e-6)


def test_deep_vpt_layer_passes_keyword_arguments_to_the_wrapped_layer():
    """A deep VPT layer called with the attention mask as a keyword gives the wrapped encoder layer's output on the
    prompt-replaced hidden states with that mask."""
    model = get_peft_model(tiny_clip(), VPTConfig(n_tokens=2, deep=True))
    layer = model.base_model.model.vision_model.encoder.layers[1]
    base = layer.get_base_layer()
    hidden = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 20, 20)
    mask[..., -5:] = torch.finfo(torch.float32).min  # the last five tokens are not attended to
    s, prompts = layer._start, layer.vpt_prompts["default"]
    replaced = hidden.clone()
    replaced[:, s : s + prompts.shape[0]] = prompts
    with torch.no_grad():
        want = base(replaced, mask)
        torch.testing.assert_close(layer(hidden, attention_mask=mask), want, rtol=0, atol=0)
        assert not torch.allclose(base(replaced, None), want)  # the mask counts


def test_a_head_on_a_model_without_a_vision_tower_keeps_its_named_target():
    """A linear head on a custom model that has neither visual_projection nor vision_model: the target the user
    names is kept and the head is sized from config.hidden_size."""
    from types import SimpleNamespace

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 8)
            self.config = SimpleNamespace(hidden_size=8)

    model = get_peft_model(Custom(), LinearHeadConfig(num_classes=3, init="random", target_modules=["fc"]))
    assert list(model.peft_config["default"].target_modules) == ["fc"]
    assert tuple(model.base_model.model.fc.head_weight["default"].shape) == (3, 8)


def test_resolve_tokenizer_of_a_config_without_tokenizer_fields_is_none():
    """A config object lacking tokenizer_name_or_path and base_model_name_or_path has no tokenizer (None, no error)."""
    from types import SimpleNamespace

    from hf_cft.peft.base import resolve_tokenizer

    assert resolve_tokenizer(SimpleNamespace()) is None
    assert resolve_tokenizer(SimpleNamespace(base_model_name_or_path=None)) is None
    assert resolve_tokenizer(SimpleNamespace(tokenizer_name_or_path=None)) is None


@pytest.mark.parametrize("position, names", [("end", ["cat", "owl"]), ("front", ["owl", "cat"])])
def test_coop_refuses_context_slots_broken_by_a_stray_token(position, names, toy_tokenizer):
    """A tokenizer that puts a stray token inside the placeholder run of one class's prompt: at the end the fixed
    slots hold the stray token (the refusal names that class, not the first one); in front the last n_ctx
    placeholders form two runs although they are n_ctx placeholders (refused as well)."""

    class StrayToken(type(toy_tokenizer)):
        def _ids(self, text, special=True):
            ids = super()._ids(text, special)
            ph = super()._ids("X", special=False)[0]
            if "owl" in text:  # a stray token after the second placeholder
                at = [i for i, t in enumerate(ids) if t == ph][1] + 1
                ids = ids[:at] + [50] + ids[at:]
            return ids

    tok = StrayToken()
    model = get_peft_model(
        tiny_clip(), CoOpConfig(n_ctx=4, classnames=names, class_token_position=position).set_tokenizer(tok)
    )
    with pytest.raises(AdapterError) as err:
        model.base_model.build_prompts(tok, names)
    assert str(err.value) == (
        "CoOp adapter 'default': the context slots of the prompt of class 'owl' do not hold the placeholder 'X'; the "
        "tokenizer does not split it as a separate word."
    )
    assert model.base_model.build_prompts(tok, ["cat"])["ctx_mask"].sum().item() == 4  # other classes are fine
