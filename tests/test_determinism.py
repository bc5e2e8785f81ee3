"""Same seed, same numbers: a short ClipClassificationTrainer run and short MergeTune runs (prompt and LoRA
families) repeated with one seed give identical losses, metrics and weights, bit for bit; another seed gives
other numbers (so the seed really drives every random choice: adapter init, shuffling, random crops, the random
α grid, sampled Fisher labels)."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests_helpers import CLASSES, trainer_kwargs
from transformers import set_seed

from hf_cft import CoOpConfig, VPTConfig
from hf_cft.data import ImageTransform, apply_image_transform, from_arrays
from hf_cft.testing import tiny_clip
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer

TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
_SKIP = ("runtime", "per_second", "total_flos")


def _images(n=12):
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        img = rng.integers(0, 60, (36, 36, 3)).astype(np.uint8)
        img[..., i % 3] += 150
        images.append(img)
    return from_arrays(images, [i % 3 for i in range(n)], CLASSES, TEMPLATES, name="colours")["train"]


def _data(seed):
    """Training data with a seeded random-resized-crop transform, and fixed evaluation data."""
    raw = _images()
    train = apply_image_transform(raw, ImageTransform(size=30, crop_size=30, train=True, seed=seed, scale=(0.5, 1.0)))
    evald = apply_image_transform(raw, ImageTransform(size=30, crop_size=30))
    return train, evald


def _record(trainer, model, metrics) -> dict:
    history = [{k: v for k, v in h.items() if not any(s in k for s in _SKIP)} for h in trainer.state.log_history]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "history": history,
        "metrics": {k: v for k, v in metrics.items() if not any(s in k for s in _SKIP)},
        "weights": weights,
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["history"] == b["history"]
        and a["metrics"] == b["metrics"]
        and a["weights"].keys() == b["weights"].keys()
        and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    )


def _clip_run(tok, tmp_path, seed):
    set_seed(seed)  # the adapter's random init comes from the global generator, as in a user's script
    model = get_peft_model(tiny_clip(seed=0), VPTConfig(n_tokens=2))
    train, evald = _data(seed)
    args = ClipTrainingArguments(**trainer_kwargs(tmp_path / f"clip{seed}", seed=seed, max_steps=3, learning_rate=0.1))
    trainer = ClipClassificationTrainer(model, args, CLASSES, TEMPLATES, tok, train_dataset=train, eval_dataset=evald)
    trainer.train()
    return _record(trainer, model, trainer.evaluate())


def test_clip_trainer_same_seed_same_numbers(toy_tokenizer, tmp_path):
    first, second = _clip_run(toy_tokenizer, tmp_path, 3), _clip_run(toy_tokenizer, tmp_path, 3)
    assert any("loss" in h for h in first["history"]) and "eval_accuracy" in first["metrics"]
    assert all(np.isfinite(h["loss"]) for h in first["history"] if "loss" in h)
    assert _same(first, second)
    assert not _same(first, _clip_run(toy_tokenizer, tmp_path, 4))


def _finetuned(kind, tok, folder, seed=11):
    if kind == "coop":
        ft = get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a", classnames=CLASSES).set_tokenizer(tok))
    else:
        ft = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ft.save_pretrained(folder)
    return folder


def _mergetune_run(kind, tok, tmp_path, seed):
    set_seed(seed)
    if kind == "coop":
        model = get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a", classnames=CLASSES).set_tokenizer(tok))
        extra = {"anchor": "fisher", "fisher_labels": "sample"}  # sampled Fisher labels: another seeded draw
    else:
        model = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        extra = {"anchor_weight": 1e-2}
    train, evald = _data(seed)
    args = MergeTuneConfig(
        **trainer_kwargs(
            tmp_path / f"mt{kind}{seed}", seed=seed, max_steps=2, alpha_grid="random", num_alphas=2, **extra
        )
    )
    ft = tmp_path / f"ft_{kind}"
    trainer = MergeTuneTrainer(
        model, args, CLASSES, TEMPLATES, tok, finetuned=ft, train_dataset=train, eval_dataset=evald
    )
    trainer.train()
    return _record(trainer, model, trainer.evaluate())


@pytest.mark.parametrize("kind", ["coop", "lora"])
def test_mergetune_same_seed_same_numbers(kind, toy_tokenizer, tmp_path):
    _finetuned(kind, toy_tokenizer, tmp_path / f"ft_{kind}")
    first = _mergetune_run(kind, toy_tokenizer, tmp_path, 5)
    second = _mergetune_run(kind, toy_tokenizer, tmp_path, 5)
    terms = {k for h in first["history"] for k in h}
    assert {"train_loss_task", "train_loss_anchor", "train_loss_path"} <= terms
    assert _same(first, second)
    assert not _same(first, _mergetune_run(kind, toy_tokenizer, tmp_path, 6))
