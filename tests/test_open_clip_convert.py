"""open_clip -> transformers CLIPModel conversion: parity with open_clip itself (when installed), parity with an
independent re-implementation of open_clip's forward written here (always), typed refusals of unsupported
architectures, and the saved folder loading with the recipes' loader."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hf_cft.errors import UnsupportedArchitectureError
from hf_cft.models import convert_open_clip
from hf_cft.models.clip import image_features, text_features
from hf_cft.models.open_clip_convert import check_open_clip_architecture, convert_open_clip_state_dict

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 99, "width": 24, "heads": 4, "layers": 2},
}


def _random_open_clip_state_dict(cfg, seed=0):
    """Random tensors under open_clip's own CLIP key names (OpenAI layout), every one of them non-trivial."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    vw, tw, e = v["width"], t["width"], cfg["embed_dim"]
    grid = (v["image_size"] // v["patch_size"]) ** 2

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "visual.conv1.weight": r(vw, 3, v["patch_size"], v["patch_size"]),
        "visual.class_embedding": r(vw),
        "visual.positional_embedding": r(grid + 1, vw),
        "visual.proj": r(vw, e),
        "token_embedding.weight": r(t["vocab_size"], tw),
        "positional_embedding": r(t["context_length"], tw),
        "text_projection": r(tw, e),
        "logit_scale": torch.tensor(2.7),
    }
    for name, w in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(w), r(w)
    for prefix, w, n in (
        ("visual.transformer.resblocks", vw, v["layers"]),
        ("transformer.resblocks", tw, t["layers"]),
    ):
        for i in range(n):
            p = f"{prefix}.{i}."
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(w, w), r(w)
            for ln in ("ln_1", "ln_2"):
                sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = 1 + r(w), r(w)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * w, w), r(4 * w)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(w, 4 * w), r(w)
    return sd


def _reference_blocks(sd, prefix, x, heads, n_layers, mask, quick_gelu):
    """open_clip's ResidualAttentionBlock (nn.MultiheadAttention's functional form), batch first."""
    for i in range(n_layers):
        p = f"{prefix}.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(
            h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None,
            False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], need_weights=False,
            attn_mask=mask,
        )  # fmt: skip
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def _reference_image(sd, cfg, pixels, quick_gelu=False):
    v = cfg["vision_cfg"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    heads = v["width"] // v["head_width"]
    x = _reference_blocks(sd, "visual.transformer.resblocks", x, heads, v["layers"], None, quick_gelu)
    x = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"]


def _reference_text(sd, cfg, ids, quick_gelu=False):
    t = cfg["text_cfg"]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    x = _reference_blocks(sd, "transformer.resblocks", x, t["heads"], t["layers"], mask, quick_gelu)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def _token_ids(vocab, length, n=5, seed=1):
    """Prompts as open_clip's tokenizer lays them out: BOS, words, EOT (the highest id), zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    for row in range(n):
        k = 2 + row % (length - 2)
        ids[row, 0] = vocab - 2
        ids[row, 1:k] = torch.randint(1, vocab - 2, (k - 1,), generator=g)
        ids[row, k] = vocab - 1
    return ids


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_conversion_matches_a_reimplementation_of_open_clips_forward(quick_gelu):
    cfg = {**TINY, "quick_gelu": quick_gelu}
    sd = _random_open_clip_state_dict(cfg)
    model = convert_open_clip(sd, cfg)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = _token_ids(99, 12)
    with torch.no_grad():
        img = image_features(model, pixels, normalize=False)
        txt = text_features(model, ids, normalize=False)
        ref_img, ref_txt = _reference_image(sd, cfg, pixels, quick_gelu), _reference_text(sd, cfg, ids, quick_gelu)
    assert (img - ref_img).abs().max() <= 1e-5
    assert (txt - ref_txt).abs().max() <= 1e-5
    assert ref_img.abs().mean() > 0.1 and ref_txt.abs().mean() > 0.1  # features that can disagree
    assert float(model.logit_scale.detach()) == pytest.approx(2.7)
    # a wrong activation is caught: the same weights under the other GELU differ well beyond the tolerance
    with torch.no_grad():
        other = _reference_image(sd, cfg, pixels, not quick_gelu)
    assert (img - other).abs().max() > 1e-3


def test_custom_text_and_ddp_prefixes_and_a_training_checkpoint_convert():
    sd = _random_open_clip_state_dict(TINY)
    wrapped = {
        "state_dict": {
            ("module.text." + k if not k.startswith(("visual", "logit")) else "module." + k): v for k, v in sd.items()
        }
    }
    a, b = convert_open_clip_state_dict(sd, TINY), convert_open_clip_state_dict(wrapped, TINY)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~30 s on a busy 2-core machine (the 49,408-token tokenizer and embedding)
@pytest.mark.data
def test_saved_folder_loads_with_the_recipes_loader(tmp_path, shared_data):
    from transformers import CLIPModel

    from hf_cft.recipe_utils import load_clip

    cfg = {
        "model_cfg": {**TINY, "text_cfg": {**TINY["text_cfg"], "vocab_size": 49408}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    sd = _random_open_clip_state_dict(cfg["model_cfg"])
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    out = tmp_path / "hf"
    model = convert_open_clip(
        tmp_path / "open_clip_model.safetensors",
        tmp_path / "open_clip_config.json",
        out,
        bpe_path=shared_data / "assets" / "bpe_simple_vocab_16e6.txt.gz",
    )
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".bin") == []  # safetensors only
    reloaded = CLIPModel.from_pretrained(str(out))
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    loaded, tokenizer, transform = load_clip(str(out))
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 12
    assert transform.mean == (0.5, 0.5, 0.5) and transform.size == 32
    ids = tokenizer(["a photo of a cat."], return_tensors="pt")["input_ids"]
    assert ids[0, -1] == 49407 and loaded.config.text_config.eos_token_id == 49407


def test_cli_converts_and_refuses_by_name(tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import CLIPModel

    from hf_cft.cli import main

    sd = _random_open_clip_state_dict(TINY)
    save_file(sd, str(tmp_path / "oc.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(TINY))
    out = tmp_path / "hf"
    argv = [
        "convert-open-clip",
        "--checkpoint",
        str(tmp_path / "oc.safetensors"),
        "--config",
        str(tmp_path / "cfg.json"),
    ]
    assert main([*argv, "--out", str(out)]) == 0
    reference = convert_open_clip(sd, TINY)
    loaded = CLIPModel.from_pretrained(str(out))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in reference.state_dict().items())
    assert "converted" in capsys.readouterr().out
    assert main([*argv, "--out", str(out)]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    (tmp_path / "cfg.json").write_text(json.dumps({**TINY, "vision_cfg": {"timm_model_name": "convnext_base"}}))
    assert main([*argv, "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "convnext_base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"vision_cfg": {"timm_model_name": "convnext_base", "timm_pool": ""}}, "convnext_base"),
        ({"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}}, "modified ResNet"),
        ({"text_cfg": {"hf_model_name": "xlm-roberta-base"}}, "xlm-roberta-base"),
        ({"multimodal_cfg": {"width": 32}}, "CoCa"),
        ({"init_logit_bias": -10}, "SigLIP"),
        ({"vision_cfg": {"attentional_pool": True}}, "attentional pooling"),
        ({"vision_cfg": {"ls_init_value": 1e-5}}, "layer scale"),
        ({"text_cfg": {"no_causal_mask": True, "pool_type": "last"}}, "bidirectional"),
        ({"text_cfg": {"pool_type": "first"}}, "pool_type='first'"),
        ({"vision_cfg": {"qk_norm": True}}, "QK-norm"),
        ({"vision_cfg": {"image_size": [32, 48]}}, "non-square"),
    ],
)
def test_unsupported_architectures_are_refused_by_name(change, named):
    cfg = json.loads(json.dumps(TINY))
    for key, value in change.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    with pytest.raises(UnsupportedArchitectureError, match=named.replace("[", r"\[")):
        check_open_clip_architecture(cfg)
    with pytest.raises(UnsupportedArchitectureError):
        convert_open_clip(_random_open_clip_state_dict(TINY), cfg)


def test_stray_or_missing_tensors_are_named():
    sd = _random_open_clip_state_dict(TINY)
    with pytest.raises(UnsupportedArchitectureError, match="visual.attn_pool.query"):
        convert_open_clip_state_dict({**sd, "visual.attn_pool.query": torch.zeros(2)}, TINY)
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(UnsupportedArchitectureError, match=r"transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        convert_open_clip_state_dict(sd, TINY)
    sd = _random_open_clip_state_dict(TINY)
    wider = json.loads(json.dumps(TINY))
    wider["text_cfg"]["width"] = 32
    with pytest.raises(UnsupportedArchitectureError, match="shape mismatch"):
        convert_open_clip(sd, wider)


def test_parity_with_open_clip():
    open_clip = pytest.importorskip(
        "open_clip",
        reason="open_clip_torch is not installed (optional: pip install 'hf-cft[open_clip]'; it needs torchvision, "
        "whose PyPI build does not import beside the CPU torch of constraints/dev.txt, so CI does not install it)",
    )
    results = {}
    for quick_gelu in (False, True):
        torch.manual_seed(0)
        oc = open_clip.CLIP(quick_gelu=quick_gelu, **TINY).eval()
        with torch.no_grad():  # open_clip leaves LayerNorms at 1 / 0 and biases at 0: perturb every tensor
            for p in oc.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model = convert_open_clip(oc, {**TINY, "quick_gelu": quick_gelu})
        pixels = torch.randn(4, 3, 32, 32)
        ids = _token_ids(99, 12)
        with torch.no_grad():
            d_img = (image_features(model, pixels, normalize=False) - oc.encode_image(pixels)).abs().max()
            d_txt = (text_features(model, ids, normalize=False) - oc.encode_text(ids)).abs().max()
        results[quick_gelu] = (float(d_img), float(d_txt))
        assert d_img <= 1e-5 and d_txt <= 1e-5, results
    print(f"open_clip parity, max |Δ| (image, text): GELU {results[False]}, QuickGELU {results[True]}")
