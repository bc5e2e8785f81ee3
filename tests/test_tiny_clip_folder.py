"""hf_cft.testing.save_tiny_clip: a model folder that loads like any CLIP checkpoint (the README's setup)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hf_cft.testing import save_tiny_clip


def _loads(folder):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    processor = AutoImageProcessor.from_pretrained(str(folder))
    return model, tokenizer, processor


def test_small_tokenizer_folder_round_trip(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip", texts=["a photo of a cat.", "a photo of a dog."], image_size=16)
    model, tokenizer, processor = _loads(folder)
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert processor.crop_size["height"] == 16 and model.config.vision_config.image_size == 16
    enc = tokenizer(["a photo of a cat.", "a photo of a dog."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=torch.zeros(1, 3, 16, 16)
        )
    assert out.logits_per_image.shape == (1, 2) and torch.isfinite(out.logits_per_image).all()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one


def test_same_seed_same_weights_and_overwrite(tmp_path):
    a = save_tiny_clip(tmp_path / "a", seed=3)
    b = save_tiny_clip(tmp_path / "b", seed=3)
    (tmp_path / "b" / "stale.txt").write_text("x")
    b = save_tiny_clip(tmp_path / "b", seed=3)  # replaces the folder whole
    assert not (b / "stale.txt").exists()
    ma, _, _ = _loads(a)
    mb, _, _ = _loads(b)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


@pytest.mark.data
def test_real_clip_tokenizer_folder(tmp_path, shared_data):
    from hf_cft.recipe_utils import load_clip

    folder = save_tiny_clip(tmp_path / "clip", shared_data / "assets" / "bpe_simple_vocab_16e6.txt.gz")
    model, tokenizer, transform = load_clip(str(folder))
    assert len(tokenizer) == 49408 == model.config.text_config.vocab_size
    assert tokenizer("a photo of a cat.")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert transform.crop_size == 32
