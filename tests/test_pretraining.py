import json
from pathlib import Path

import pytest
import torch

from hf_cft.data.image_pool import BatchAugment

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_clip.py"


@pytest.fixture(scope="module")
def pc():
    from tests_helpers import load_recipe

    return load_recipe("pretrain_clip")


def test_batch_augment_is_seeded_and_bounded():
    x = torch.rand(16, 3, 16, 16)
    a = BatchAugment(shift=2, degrade_prob=0.5)(x, torch.Generator().manual_seed(3))
    b = BatchAugment(shift=2, degrade_prob=0.5)(x, torch.Generator().manual_seed(3))
    c = BatchAugment(shift=2, degrade_prob=0.5)(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    plain = BatchAugment(shift=0, degrade_prob=0.0)(x, torch.Generator())
    assert torch.equal(plain, x)


def test_degraded_grayscale_images_have_equal_channels():
    x = torch.rand(8, 3, 16, 16)
    aug = BatchAugment(shift=0, degrade_prob=1.0, grayscale_prob=1.0, noise=0.0)
    y = aug(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])


def _args(pc, tmp_path, **kw):
    base = dict(
        datasets=["digits"],
        pool_fraction=1.0,
        image_size=16,
        patch_size=4,
        width=32,
        layers=1,
        heads=2,
        projection_dim=16,
        captions="mixed",
        degrade_prob=0.5,
        batch_size=32,
        warmup_steps=2,
        max_steps=6,
        eval_every_minutes=0,
        save_every_minutes=1e9,
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        seed=0,
    )
    base.update(kw)
    return pc.PretrainArguments(**base)


def test_caption_sampling_uses_the_right_class(pc, tmp_path):
    args = _args(pc, tmp_path)
    tok = pc.build_tokenizer(args)
    pool = pc.CaptionedPool(args, tok)
    idx = torch.arange(64)
    ids, mask = pool.caption_ids(idx, torch.Generator().manual_seed(0))
    names = pool.tasks["digits"]["task"].classnames
    for i in range(64):
        text = tok.decode(ids[i][mask[i].bool()], skip_special_tokens=True)
        assert names[int(pool.owner[i, 1])] in text


def test_resume_reproduces_an_uninterrupted_run(pc, tmp_path):
    from safetensors.torch import load_file

    full = pc.main(_args(pc, tmp_path / "a"))
    pc.main(_args(pc, tmp_path / "b", stop_after_steps=3))
    state = json.loads((tmp_path / "b" / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed = pc.main(_args(pc, tmp_path / "b", resume=True))
    a = load_file(str(Path(full) / "model.safetensors"))
    b = load_file(str(Path(resumed) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    summary = json.loads((tmp_path / "a" / "run" / "zeroshot.json").read_text())
    assert summary["steps"] == 6 and "digits" in summary["zeroshot"]
    assert (tmp_path / "a" / "run" / "curve.png").is_file()


def test_saved_model_loads_with_tokenizer_and_processor(pc, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from hf_cft.recipe_utils import load_clip

    path = pc.main(_args(pc, tmp_path, max_steps=2))
    model, tok, transform = load_clip(str(path))
    assert isinstance(model, CLIPModel) and transform.crop_size == 16
    assert AutoTokenizer.from_pretrained(str(path))("zero")["input_ids"] == tok("zero")["input_ids"]


def test_text_tower_can_be_sized_apart_from_the_image_tower(pc, tmp_path):
    args = _args(pc, tmp_path, text_width=48, text_layers=3, text_heads=2)
    tok = pc.build_tokenizer(args)
    cfg = pc.build_model(args, tok).config
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads) == (
        48,
        3,
        2,
    )
    assert cfg.text_config.intermediate_size == 4 * 48
    assert cfg.vision_config.hidden_size == args.width and cfg.vision_config.num_hidden_layers == args.layers
    same = pc.build_model(_args(pc, tmp_path), tok).config  # default: both towers alike
    assert same.text_config.hidden_size == same.vision_config.hidden_size == args.width


def test_web_captions_avoid_the_evaluation_prompts_and_name_the_traits(pc, tmp_path):
    args = _args(pc, tmp_path, captions="web", own_prob=0.0, describe_views=True, describe_prob=1.0)
    tok = pc.build_tokenizer(args)
    pool = pc.CaptionedPool(args, tok)
    n = 48
    idx = torch.arange(n)
    names = pool.tasks["digits"]["task"].classnames
    plain, _ = pool.caption_ids(idx, torch.Generator().manual_seed(0))
    views = {  # every view degraded, blurry, close-up; the first half black and white
        "degraded": torch.ones(n, dtype=torch.bool),
        "crop_area": torch.full((n,), 0.4),
        "blur_sigma": torch.full((n,), 1.5),
        "grayscale": torch.arange(n) < n // 2,
    }
    ids, mask = pool.caption_ids(idx, torch.Generator().manual_seed(0), views)
    web = {t.format("").replace(" ", "") for t in pc.WEB_TEMPLATES}
    for i in range(n):
        text = " ".join(tok.decode(ids[i][mask[i].bool()], skip_special_tokens=True).split())
        name = names[int(pool.owner[i, 1])]
        color = "black and white" if i < n // 2 else "color"
        phrase = f"close-up blurry {color} {name}"
        assert phrase.replace(" ", "") in text.replace(" ", ""), text
        assert "photo" not in text and text.replace(" ", "").replace(phrase.replace(" ", ""), "") in web, text
        first = tok.decode(plain[i], skip_special_tokens=True)
        assert "photo" not in first and name in first.replace(" ", "")


def test_unknown_caption_mode_is_a_typed_error(pc, tmp_path):
    args = _args(pc, tmp_path, captions="webby")
    with pytest.raises(ValueError, match="webby"):
        pc.CaptionedPool(args, pc.build_tokenizer(args))
