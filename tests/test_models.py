import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_cft.data import ImageTransform, from_arrays
from hf_cft.errors import ClassNamesError, NotCLIPLikeError, TemplateError
from hf_cft.models import (
    FeatureCache,
    build_zeroshot_classifier,
    check_clip_like,
    clip_logits,
    evaluate_zeroshot,
    image_features,
    logit_scale,
    text_features,
    tokenize_prompts,
)

CLASSES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def test_text_and_image_features_are_normalised_tensors(clip_model, toy_tokenizer):
    enc = tokenize_prompts(toy_tokenizer, ["a photo of a cat.", "a dog"], clip_model)
    t = text_features(clip_model, enc["input_ids"], enc["attention_mask"])
    assert t.shape == (2, 16)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    i = image_features(clip_model, torch.randn(3, 3, 30, 30))
    assert i.shape == (3, 16)
    raw = image_features(clip_model, torch.randn(3, 3, 30, 30), normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))


def test_legacy_eos_pooling_matches_eos_pooling(clip_model, legacy_clip_model, toy_tokenizer):
    # Same weights; EOS (98) is the largest id and padding (1) is smaller, so the legacy argmax pooling
    # and the first-EOS pooling must pick the same position.
    legacy_clip_model.load_state_dict(clip_model.state_dict())
    enc = tokenize_prompts(toy_tokenizer, ["a cat", "a much longer prompt here"], clip_model)
    a = text_features(clip_model, enc["input_ids"], enc["attention_mask"])
    b = text_features(legacy_clip_model, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(a, b)
    # and pooling really reads the EOS position: changing a token after EOS (padding) changes nothing
    ids = enc["input_ids"].clone()
    ids[0, -1] = 5  # first prompt is padded; overwrite a padding slot
    c = text_features(clip_model, ids, enc["attention_mask"])
    torch.testing.assert_close(a[0], c[0])


def test_classifier_is_normalise_average_normalise(clip_model, toy_tokenizer):
    head = build_zeroshot_classifier(clip_model, toy_tokenizer, CLASSES, TEMPLATES)
    assert head.shape == (3, 16)
    per_t = []
    for t in TEMPLATES:
        enc = tokenize_prompts(toy_tokenizer, [t.format(c) for c in CLASSES], clip_model)
        per_t.append(
            F.normalize(text_features(clip_model, enc["input_ids"], enc["attention_mask"], normalize=False), dim=-1)
        )
    expected = F.normalize(torch.stack(per_t).mean(0), dim=-1)
    torch.testing.assert_close(head, expected, atol=1e-5, rtol=1e-5)


def test_logits_use_logit_scale(clip_model):
    with torch.no_grad():
        clip_model.logit_scale.fill_(2.0)
    feats = F.normalize(torch.randn(4, 16), dim=-1)
    head = F.normalize(torch.randn(3, 16), dim=-1)
    torch.testing.assert_close(clip_logits(clip_model, feats, head), torch.exp(torch.tensor(2.0)) * feats @ head.t())
    assert logit_scale(clip_model).item() == pytest.approx(torch.e**2, rel=1e-5)


def test_not_clip_like():
    with pytest.raises(NotCLIPLikeError, match="Linear"):
        check_clip_like(nn.Linear(3, 3))
    with pytest.raises(NotCLIPLikeError):
        build_zeroshot_classifier(nn.Linear(3, 3), None, CLASSES, TEMPLATES)


def test_bad_templates_and_classnames(clip_model, toy_tokenizer):
    with pytest.raises(TemplateError, match="a photo"):
        build_zeroshot_classifier(clip_model, toy_tokenizer, CLASSES, ["a photo"])
    with pytest.raises(TemplateError, match="empty"):
        build_zeroshot_classifier(clip_model, toy_tokenizer, CLASSES, [])
    with pytest.raises(ClassNamesError, match="empty"):
        build_zeroshot_classifier(clip_model, toy_tokenizer, [], TEMPLATES)
    with pytest.warns(UserWarning, match="'cat' .*twice"):
        build_zeroshot_classifier(clip_model, toy_tokenizer, ["cat", "cat"], TEMPLATES)
    from hf_cft.data import validate_classnames

    with pytest.raises(ClassNamesError, match="'cat' .*twice"):
        validate_classnames(["cat", "cat"], duplicates="error")


def _tiny_dataset(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = [(torch.rand(30, 30, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(n)]
    labels = [i % 3 for i in range(n)]
    return from_arrays(imgs, labels, CLASSES, TEMPLATES, name="tiny")


def test_evaluate_zeroshot_matches_manual(clip_model, toy_tokenizer):
    ds = _tiny_dataset()
    res = evaluate_zeroshot(clip_model, toy_tokenizer, ds, batch_size=5)
    transform = ImageTransform.from_model(clip_model)
    split = ds["train"]
    pixels = torch.stack([transform(split[i]["image"]) for i in range(len(split))])
    with torch.no_grad():
        feats = image_features(clip_model, pixels)
        head = build_zeroshot_classifier(clip_model, toy_tokenizer, CLASSES, TEMPLATES)
        preds = clip_logits(clip_model, feats, head).argmax(-1)
    labels = torch.tensor(split["label"])
    assert res.total == 12
    assert res.correct == int((preds == labels).sum())
    assert res.accuracy == pytest.approx(100.0 * res.correct / 12)
    assert torch.equal(res.predictions, preds)


def test_evaluate_rejects_wrong_classname_count(clip_model, toy_tokenizer):
    with pytest.raises(ClassNamesError, match="2 class names .* 3 classes"):
        evaluate_zeroshot(clip_model, toy_tokenizer, _tiny_dataset(), classnames=["cat", "dog"])


def test_feature_cache_reuses_and_persists(clip_model, toy_tokenizer, tmp_path, monkeypatch):
    ds = _tiny_dataset()
    calls = {"n": 0}
    orig = type(clip_model).get_image_features

    def counting(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(type(clip_model), "get_image_features", counting)
    cache = FeatureCache(tmp_path / "cache")
    r1 = evaluate_zeroshot(clip_model, toy_tokenizer, ds, cache=cache, batch_size=4)
    n_first = calls["n"]
    assert n_first == 3
    r2 = evaluate_zeroshot(clip_model, toy_tokenizer, ds, cache=FeatureCache(tmp_path / "cache"), batch_size=4)
    assert calls["n"] == n_first  # loaded from disk, no image forward
    assert r1.accuracy == r2.accuracy
    assert list((tmp_path / "cache").glob("*.safetensors"))
    # changed vision weights -> different key -> recomputed
    with torch.no_grad():
        clip_model.visual_projection.weight.add_(0.1)
    evaluate_zeroshot(clip_model, toy_tokenizer, ds, cache=cache, batch_size=4)
    assert calls["n"] == 2 * n_first
    # a non-main process of a multi-process run keeps its gathered features in memory but writes nothing
    quiet = FeatureCache(tmp_path / "other")
    quiet.put("k", {"features": torch.ones(2, 3)}, persist=False)
    assert quiet.get("k") is not None and not (tmp_path / "other").exists()


def test_siglip_plugs_in(toy_tokenizer):
    from hf_cft.testing import tiny_siglip

    model = tiny_siglip()
    enc = tokenize_prompts(toy_tokenizer, ["a cat"], model)
    assert enc["input_ids"].shape[1] == 16  # SigLIP pads to max_length
    res = evaluate_zeroshot(model, toy_tokenizer, _tiny_dataset())
    assert res.total == 12 and 0.0 <= res.accuracy <= 100.0
