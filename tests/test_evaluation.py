"""``hf_cft.evaluate`` / ``hf_cft.class_logits``: one call for a plain CLIP, CoOp / VPT / linear-head / LoRA
adapters and ConDU, on raw datasets, with base/novel; checked against direct computations of the same logits.
Also ``evaluate_zeroshot`` refusing to ignore learned prompts, short reprs, and the transformers pipeline."""

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import hf_cft
from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.data import ImageTransform, apply_image_transform, from_arrays, select_classes
from hf_cft.errors import AdapterError, DatasetFormatError, TaskError
from hf_cft.merging import DeltaFusionMerger, SemanticRouter, delta_from_models
from hf_cft.models import build_zeroshot_classifier, clip_logits, evaluate_zeroshot, image_features
from hf_cft.testing import tiny_clip

NAMES = ["cat", "dog", "sea lion", "bird", "fish"]  # 5 classes: base = 3, novel = 2
TEMPLATES = ["a photo of a {}.", "a {} thing."]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = [i % len(NAMES) for i in range(20)]
    images = [rng.integers(0, 255, (30, 30, 3)).astype(np.uint8) for _ in labels]
    return from_arrays(images, labels, NAMES, TEMPLATES, name="toy5", split="test")


def _pixels(ds):
    rows = apply_image_transform(ds, ImageTransform(size=30, crop_size=30))
    return torch.stack([r["pixel_values"] for r in rows]), torch.tensor([r["labels"] for r in rows])


def _accuracy(logits, labels):
    return 100.0 * int((logits.argmax(-1) == labels).sum()) / len(labels)


def _perturbed(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _adapter(kind, tok, classnames=NAMES):
    configs = {
        "coop": lambda: CoOpConfig(n_ctx=2, classnames=classnames).set_tokenizer(tok),
        "vpt": lambda: VPTConfig(n_tokens=2),
        "head": lambda: LinearHeadConfig(classnames=classnames, templates=TEMPLATES).set_tokenizer(tok),
        "lora": lambda: LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    }
    return _perturbed(get_peft_model(tiny_clip(), configs[kind]())).eval()


def _direct_logits(kind, model, tok, px, classnames):
    """The logits of each kind computed by hand from the model's own pieces."""
    with torch.no_grad():
        if kind == "head":
            cols = [NAMES.index(c) for c in classnames]
            return model.classify(px)[:, cols]
        head = (
            model.class_text_features(tok, classnames)
            if kind == "coop"
            else build_zeroshot_classifier(model, tok, classnames, TEMPLATES)
        )
        return clip_logits(tiny_clip(), image_features(model, px), head)


@pytest.mark.parametrize("kind", ["plain", "coop", "vpt", "head", "lora"])
def test_evaluate_uses_what_the_model_carries(kind, data, toy_tokenizer):
    model = tiny_clip() if kind == "plain" else _adapter(kind, toy_tokenizer)
    px, labels = _pixels(data["test"])
    res = hf_cft.evaluate(model, toy_tokenizer, data)
    expected = _direct_logits(kind, model, toy_tokenizer, px, NAMES)
    assert math.isclose(res.accuracy, _accuracy(expected, labels), abs_tol=1e-9)
    assert torch.equal(res.splits["all"].predictions, expected.argmax(-1))
    torch.testing.assert_close(hf_cft.class_logits(model, toy_tokenizer, px, NAMES, TEMPLATES), expected)
    assert res.base is None and res.hm is None and res.dataset == "toy5" and res.split == "test"
    assert res.rows() == [{"name": "toy5", "num_classes": 5, "accuracy": res.accuracy, "split": "test"}]
    text = repr(res)
    assert "tensor" not in text and len(text) < 200 and "toy5 test" in text
    if kind != "plain":
        assert "adapter 'default'" in res.evaluated


@pytest.mark.parametrize("kind", ["plain", "coop", "head"])
def test_base_novel_evaluates_each_part_over_its_own_classes(kind, data, toy_tokenizer):
    model = tiny_clip() if kind == "plain" else _adapter(kind, toy_tokenizer)
    res = hf_cft.evaluate(model, toy_tokenizer, data["test"], templates=TEMPLATES, base_novel=True)
    assert res.classnames == {"base": NAMES[:3], "novel": NAMES[3:]}
    for part, ids in (("base", [0, 1, 2]), ("novel", [3, 4])):
        px, labels = _pixels(select_classes(data["test"], ids))
        expected = _accuracy(_direct_logits(kind, model, toy_tokenizer, px, [NAMES[i] for i in ids]), labels)
        assert math.isclose(getattr(res, part), expected, abs_tol=1e-9), part
    assert res.hm == pytest.approx(hf_cft.harmonic_mean(res.base, res.novel))
    assert res.accuracy is None and set(res.metrics) == {"base", "novel", "hm"}
    assert [r["name"] for r in res.rows()] == ["base", "novel"]
    assert "HM" in repr(res) and "tensor" not in repr(res)
    assert res.to_dict()["splits"]["novel"]["num_classes"] == 2


def test_adapters_that_cannot_classify_other_classes_raise(data, toy_tokenizer):
    base_head = _adapter("head", toy_tokenizer, classnames=NAMES[:3])
    with pytest.raises(AdapterError, match="no output for 'bird'"):
        hf_cft.evaluate(base_head, toy_tokenizer, data, base_novel=True)
    base_test = select_classes(data["test"], [0, 1, 2])  # the classes it was trained on: fine
    px, labels = _pixels(base_test)
    with torch.no_grad():
        expected = _accuracy(base_head.classify(px), labels)
    assert hf_cft.evaluate(base_head, toy_tokenizer, base_test, limit=100).accuracy == pytest.approx(expected)
    specific = get_peft_model(
        tiny_clip(), CoOpConfig(n_ctx=2, classnames=NAMES[:3], class_specific=True).set_tokenizer(toy_tokenizer)
    )
    with pytest.raises(AdapterError, match="class-specific"):
        hf_cft.evaluate(specific, toy_tokenizer, data, base_novel=True)


def test_evaluate_zeroshot_never_ignores_learned_prompts_or_heads(data, toy_tokenizer):
    for kind in ("coop", "head"):
        model = _adapter(kind, toy_tokenizer)
        with pytest.raises(AdapterError, match=r"hf_cft\.evaluate\(model, tokenizer, dataset\)"):
            evaluate_zeroshot(model, toy_tokenizer, data)
        with model.disable_adapter():  # the zero-shot baseline, asked for explicitly
            baseline = evaluate_zeroshot(model, toy_tokenizer, data)
            assert hf_cft.evaluate(model, toy_tokenizer, data).accuracy == baseline.accuracy
        assert baseline.accuracy == evaluate_zeroshot(tiny_clip(), toy_tokenizer, data).accuracy
    coop = _adapter("coop", toy_tokenizer)
    with torch.no_grad():
        head = coop.class_text_features(toy_tokenizer, NAMES)
    assert (
        evaluate_zeroshot(coop, toy_tokenizer, data, head=head).accuracy
        == hf_cft.evaluate(coop, toy_tokenizer, data).accuracy
    )
    # VPT and LoRA change the features a zero-shot head sees: evaluate_zeroshot already uses them
    lora = _adapter("lora", toy_tokenizer)
    assert evaluate_zeroshot(lora, toy_tokenizer, data).accuracy == hf_cft.evaluate(lora, toy_tokenizer, data).accuracy


def test_zero_shot_result_repr_is_short(data, toy_tokenizer):
    res = evaluate_zeroshot(tiny_clip(), toy_tokenizer, data)
    text = repr(res)
    assert text.startswith("ZeroShotResult(accuracy=") and "tensor" not in text and len(text) < 120
    assert str(res) == text and f"{res.correct}/20" in text


def _merger(base, tok):
    merger = DeltaFusionMerger(base_model=base)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (30, 30, 3)).astype(np.uint8) for _ in NAMES]
    px, _ = _pixels(from_arrays(images, list(range(len(NAMES))), NAMES)["train"])
    z = image_features(base, px).detach()  # one prototype per class
    for t, name in enumerate(("task_a", "task_b")):
        expert = _perturbed(tiny_clip(), seed=10 + t, scale=0.05)
        merger.add_task(
            delta_from_models(base, expert, keys=["text_projection.weight", "visual_projection.weight"]),
            name,
            prototypes=z,
            classnames=NAMES,
            templates=TEMPLATES,
        )
    return merger


def test_evaluate_condu_router_merger_and_known_task(data, toy_tokenizer):
    base = tiny_clip()
    merger = _merger(base, toy_tokenizer)
    router = SemanticRouter(merger, base, toy_tokenizer, top_k=1)
    px, labels = _pixels(data["test"])
    for task in (None, "task_b"):
        expected = router.logits(px, NAMES, TEMPLATES, task=task)
        got = hf_cft.evaluate(router, toy_tokenizer, data, task=task)
        assert math.isclose(got.accuracy, _accuracy(expected, labels), abs_tol=1e-9)
        torch.testing.assert_close(
            hf_cft.class_logits(router, toy_tokenizer, px, NAMES, TEMPLATES, task=task), expected
        )
        via_merger = hf_cft.evaluate(merger, toy_tokenizer, data, task=task, top_k=1)
        assert via_merger.accuracy == got.accuracy
    assert "routing, top-1" in repr(hf_cft.evaluate(router, toy_tokenizer, data))
    with pytest.raises(TaskError):
        hf_cft.evaluate(router, toy_tokenizer, data, task="nope")
    with pytest.raises(AdapterError, match="base_model"):
        hf_cft.evaluate(DeltaFusionMerger(), toy_tokenizer, data)
    with pytest.raises(AdapterError, match="task='task_a' selects the expert of a ConDU bundle"):
        hf_cft.evaluate(base, toy_tokenizer, data, task="task_a")


def test_evaluate_bad_datasets_raise_typed_errors(data, toy_tokenizer):
    with pytest.raises(DatasetFormatError, match="'image' and 'label'"):
        hf_cft.evaluate(tiny_clip(), toy_tokenizer, data["test"].rename_column("image", "img"))
    with pytest.raises(DatasetFormatError, match="no split 'val'"):
        hf_cft.evaluate(tiny_clip(), toy_tokenizer, data, split="val")
    with pytest.raises(DatasetFormatError, match="got list"):
        hf_cft.evaluate(tiny_clip(), toy_tokenizer, [1, 2])


def test_pipeline_zero_shot_image_classification_on_a_saved_clip_and_merged_lora(tmp_path):
    """A CLIP folder as hf_cft saves it (model + tokenizer + image processor) works in transformers' pipeline, with
    the scores of ``class_logits``; so does a LoRA adapter after ``merge_and_unload``."""
    from PIL import Image
    from transformers import CLIPImageProcessor, pipeline

    from hf_cft.recipe_utils import demo_clip

    template = "This is a photo of {}."  # the pipeline's default hypothesis template
    model, tok = demo_clip([template.format(c) for c in NAMES], image_size=16)
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc.save_pretrained(tmp_path / "clip")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3)).astype(np.uint8))
    px = proc(images=image, return_tensors="pt")["pixel_values"]

    def scores(pipe):
        return {r["label"]: r["score"] for r in pipe(image, candidate_labels=NAMES)}

    got = scores(pipeline("zero-shot-image-classification", model=str(tmp_path / "clip")))
    probs = hf_cft.class_logits(model, tok, px, NAMES, [template]).softmax(-1)[0]
    assert got == pytest.approx({c: float(p) for c, p in zip(NAMES, probs)}, abs=1e-5)

    lora = _perturbed(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), scale=0.5).eval()
    probs = hf_cft.class_logits(lora, tok, px, NAMES, [template]).softmax(-1)[0]
    merged = lora.merge_and_unload()
    got = scores(pipeline("zero-shot-image-classification", model=merged, tokenizer=tok, image_processor=proc))
    assert got == pytest.approx({c: float(p) for c, p in zip(NAMES, probs)}, abs=1e-5)
