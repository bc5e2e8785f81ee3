"""Preprocessing = the model's own image processor.

``ImageTransform`` against transformers' image processor classes built from configs (no Hub), on random images of
many sizes and modes (benchmarks/preprocessing_parity.py holds the cases and prints the table of
docs/preprocessing.md): max |Δ| ≤ 1e-5 on ``pixel_values``, identical ``spatial_shapes`` and
``pixel_attention_mask``. Training crops are the processor's pipeline applied to a keyed random crop.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_cft.data import (
    ImageClassificationCollator,
    ImageTransform,
    apply_image_transform,
    from_arrays,
    naflex_size,
)
from hf_cft.errors import OptionError

TOL = 1e-5
_spec = importlib.util.spec_from_file_location(
    "preprocessing_parity", Path(__file__).resolve().parents[1] / "benchmarks" / "preprocessing_parity.py"
)
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

CLIP, METACLIP, PADDED, CHINESE, SIGLIP, NAFLEX, NAFLEX_SMALL = parity.PROCESSORS


@pytest.fixture(scope="module")
def images():
    return parity.images(seed=0, n_random=6)


def _rgb(w, h, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_parity_images_cover_sizes_and_modes(images):
    descs = [d for d, _ in images]
    modes = {d.split()[0] for d in descs}
    assert {"RGB", "L", "RGBA", "LA", "P", "CMYK", "1", "I;16", "I", "F", "array"} <= modes
    assert any(d.endswith(" 1x1") for d in descs) and any(d.endswith(" 3x200") for d in descs)
    assert any(d.endswith(" 640x17") for d in descs)


@pytest.mark.parametrize("name", list(parity.PROCESSORS))
def test_transform_equals_processor(name, images):
    row = parity.parity_row(name, images)
    assert row["images"] == len(images)
    assert row["max_abs_8bit"] <= TOL, (row["worst"], row)
    assert row["max_abs_high_clip"] <= TOL, (row["worst"], row)  # high_bit_depth="clip": the processor exactly
    assert row["max_abs_high_scale"] <= TOL, (row["worst"], row)  # default: the processor on the 8-bit image
    assert row["masks_equal"] is ("NaFlex" in name or None), row  # identical where the processor makes them
    # the default departs from the processor on 16-bit images on purpose (it scales where the processor clips)
    assert row["max_abs_high_scale_vs_raw"] > 0.5, row


def test_each_family_gets_its_resize():
    """The three resizes, and why the issue's two examples differ from a plain short-side + centre crop."""
    clip = ImageTransform.from_processor(parity.processor(CLIP))
    siglip = ImageTransform.from_processor(parity.processor(SIGLIP))
    naflex = ImageTransform.from_processor(parity.processor(NAFLEX))
    assert (clip.resize_mode, clip.size, clip.crop_size, clip.resample) == ("shortest_edge", 224, 224, 3)
    assert (siglip.resize_mode, siglip.size, siglip.center_crop, siglip.mean) == ("squash", 384, False, (0.5,) * 3)
    assert (naflex.resize_mode, naflex.patch_size, naflex.max_num_patches, naflex.resample) == ("patches", 16, 256, 2)
    assert ImageTransform.from_processor(parity.processor(METACLIP)).key() == clip.key()  # legacy int sizes
    # CLIP truncates the long side: 420x300 -> 313 (not 314), so the crop starts at column 44
    assert clip._resized_size(420, 300) == (313, 224)
    # SigLIP squashes: a 420x300 image is not centre-cropped, its left and right edges stay in the picture
    img = np.zeros((300, 420, 3), np.uint8)
    img[:, :30] = 255
    x = siglip(img)
    assert x.shape == (3, 384, 384) and x[:, :, :20].min() > 0.9  # white stripe kept (squashed)
    assert clip(img)[:, :, :5].max() < 0  # white stripe cropped away by CLIP
    # NaFlex keeps the aspect ratio on a patch grid of at most 256 patches
    h, w = naflex_size(300, 420, 16, 256)
    assert h % 16 == w % 16 == 0 and (h // 16) * (w // 16) <= 256 and abs(w / h - 420 / 300) < 0.1


def test_naflex_grid_is_the_processors():
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches as ref

    rng = np.random.default_rng(0)
    cases = [(1, 1), (1, 5000), (5000, 1), (17, 640), (384, 384)] + [
        tuple(rng.integers(1, 2000, 2)) for _ in range(60)
    ]
    for h, w in cases:
        for patch, budget in ((16, 256), (14, 64), (16, 1024), (8, 3)):
            assert naflex_size(int(h), int(w), patch, budget) == ref(int(h), int(w), patch, budget), (h, w, patch)


def test_naflex_outputs_are_model_inputs():
    t = ImageTransform.from_processor(parity.processor(NAFLEX_SMALL))
    out = t(_rgb(90, 30))
    assert set(out) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    rows, cols = out["spatial_shapes"].tolist()
    assert cols > rows and rows * cols <= 64
    assert out["pixel_values"].shape == (64, 14 * 14 * 3) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_attention_mask"].dtype == torch.int32 and out["spatial_shapes"].dtype == torch.int64
    assert out["pixel_attention_mask"].tolist() == [1] * (rows * cols) + [0] * (64 - rows * cols)
    assert (out["pixel_values"][rows * cols :] == 0).all()
    assert t.input_names == ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def test_siglip2_processor_itself_cannot_convert_grey():
    """SigLIP2 configs leave do_convert_rgb unset: the processor then fails on a grey image; hf_cft converts it
    as every other processor does (the parity rows compare with do_convert_rgb=True)."""
    from transformers import Siglip2ImageProcessorPil

    grey = _rgb(40, 30).convert("L")
    with pytest.raises(ValueError):
        Siglip2ImageProcessorPil(patch_size=16, max_num_patches=16)(images=[grey], return_tensors="np")
    t = ImageTransform.from_processor(Siglip2ImageProcessorPil(patch_size=16, max_num_patches=16))
    ref = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=16, do_convert_rgb=True)(images=[grey])
    assert np.abs(t(grey)["pixel_values"].numpy() - np.asarray(ref["pixel_values"][0])).max() <= TOL


def test_unsupported_processor_configs_are_refused():
    from transformers import CLIPImageProcessorPil

    longest = CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 300})
    with pytest.raises(OptionError, match=r"CLIPImageProcessorPil resizes with size=.*longest_edge"):
        ImageTransform.from_processor(longest)
    with pytest.raises(OptionError, match=r"do_resize=False"):
        ImageTransform.from_processor(CLIPImageProcessorPil(do_resize=False))
    with pytest.raises(OptionError, match=r"resample"):
        ImageTransform(resample=9)
    with pytest.raises(OptionError, match=r"resize_mode"):
        ImageTransform(resize_mode="letterbox")
    with pytest.raises(OptionError, match=r"size"):
        ImageTransform(size=(224, 200))  # shortest_edge takes one number
    with pytest.raises(OptionError, match=r"high_bit_depth"):
        ImageTransform(high_bit_depth="wrap")


@pytest.mark.parametrize("name", [CLIP, PADDED, SIGLIP, NAFLEX])
def test_to_processor_round_trip(name, tmp_path):
    """The processor a transform writes beside a model reads back as the same transform, from the folder."""
    from transformers import AutoImageProcessor

    t = ImageTransform.from_processor(parity.processor(name))
    t.to_processor().save_pretrained(tmp_path)
    assert ImageTransform.from_processor(AutoImageProcessor.from_pretrained(tmp_path)).key() == t.key()


def _keyed_box(t: ImageTransform, size, key: str):
    """The box the training transform draws for ``key`` (the same draws, outside the transform)."""
    return t._random_box(size, random.Random(f"{t.seed}|{t.epoch}|{key}"))


@pytest.mark.parametrize("name", [CLIP, SIGLIP, NAFLEX_SMALL])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
def test_training_crop_is_the_processor_on_the_crop(name, mode):
    """A keyed random crop goes through the processor's own pipeline: squashed for SigLIP, short side + centre
    crop for CLIP, its own patch grid for NaFlex."""
    from PIL import Image

    from hf_cft.data.transforms import to_rgb

    proc = parity.processor(name)
    t = ImageTransform.from_processor(proc, train=True, seed=3, scale=(0.3, 0.6))
    img = _rgb(300, 120, seed=1).convert(mode) if mode != "I;16" else None
    if mode == "I;16":
        img = Image.fromarray(np.random.default_rng(1).integers(0, 65536, (120, 300)).astype(np.uint16))
    box = _keyed_box(t, img.size, "k")
    assert box is not None and (box[2] - box[0]) * (box[3] - box[1]) < 0.65 * 300 * 120
    ref = proc(images=[to_rgb(img).crop(box)], return_tensors="np")
    ours = t.inputs(img, key="k")
    assert np.abs(ours["pixel_values"].numpy() - np.asarray(ref["pixel_values"][0])).max() <= TOL
    if "spatial_shapes" in ref:
        assert ours["spatial_shapes"].tolist() == list(ref["spatial_shapes"][0])
        w, h = box[2] - box[0], box[3] - box[1]
        assert ours["spatial_shapes"].tolist() == [s // t.patch_size for s in naflex_size(h, w, 14, 64)]


@pytest.mark.parametrize("name", [CLIP, SIGLIP, NAFLEX])
def test_full_scale_training_view_is_the_evaluation_view(name):
    t = ImageTransform.from_processor(parity.processor(name))
    tt = dataclasses.replace(t, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=5)
    img = _rgb(97, 61)
    a, b = t.inputs(img), tt.inputs(img, key="x")
    assert all(torch.equal(a[k], b[k]) for k in t.input_names)


def test_training_draws_are_keyed_and_flip_mirrors():
    t = ImageTransform.from_processor(parity.processor(SIGLIP), train=True, seed=2, scale=(0.3, 0.6))
    img = _rgb(200, 80)
    a, b, c = t(img, key="a"), t(img, key="a"), t(img, key="b")
    assert torch.equal(a, b) and not torch.equal(a, c)
    t.set_epoch(1)
    assert not torch.equal(t(img, key="a"), a)
    flip = dataclasses.replace(t, hflip=True)
    noflip = dataclasses.replace(t, hflip=False)
    outs = [(flip(img, key=str(k)), noflip(img, key=str(k))) for k in range(12)]
    flipped = [torch.equal(f, n.flip(-1)) for f, n in outs]
    assert any(flipped) and not all(flipped)
    assert all(torch.equal(f, n) or torch.equal(f, n.flip(-1)) for f, n in outs)


def test_dataset_rows_and_collator_carry_naflex_inputs():
    """apply_image_transform + ImageClassificationCollator give the batch the processor gives for the same images,
    under transformers' keyword names."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 70), (64, 32), (33, 33)]]
    ds = from_arrays(arrays, [0, 1, 0], ["a", "b"])
    proc = parity.processor(NAFLEX_SMALL)
    t = ImageTransform.from_processor(proc)
    batch = ImageClassificationCollator()(list(apply_image_transform(ds["train"], t)))
    ref = proc(images=[ds["train"][i]["image"] for i in range(3)], return_tensors="pt")
    assert batch["pixel_values"].shape == ref["pixel_values"].shape == (3, 64, 14 * 14 * 3)
    assert (batch["pixel_values"] - ref["pixel_values"]).abs().max() <= TOL
    assert torch.equal(batch["pixel_attention_mask"], ref["pixel_attention_mask"])
    assert torch.equal(batch["spatial_shapes"], ref["spatial_shapes"])
    assert batch["labels"].tolist() == [0, 1, 0]
    assert set(batch) == {"pixel_values", "pixel_attention_mask", "spatial_shapes", "labels"}
    clip_batch = ImageClassificationCollator()(list(apply_image_transform(ds["train"], ImageTransform(size=16))))
    assert set(clip_batch) == {"pixel_values", "labels"} and clip_batch["pixel_values"].shape == (3, 3, 16, 16)


def test_from_model_follows_the_family():
    from transformers import CLIPConfig, Siglip2Config, SiglipConfig

    def model(cfg):
        return types.SimpleNamespace(config=cfg)

    siglip = ImageTransform.from_model(model(SiglipConfig(vision_config={"image_size": 64})))
    assert (siglip.resize_mode, siglip.size, siglip.mean, siglip.resample) == ("squash", 64, (0.5,) * 3, 3)
    naflex = ImageTransform.from_model(model(Siglip2Config(vision_config={"patch_size": 8, "num_patches": 49})))
    assert (naflex.resize_mode, naflex.patch_size, naflex.max_num_patches, naflex.resample) == ("patches", 8, 49, 2)
    clip = ImageTransform.from_model(model(CLIPConfig(vision_config={"image_size": 32})))
    assert (clip.resize_mode, clip.size, clip.crop_size) == ("shortest_edge", 32, 32)


def test_feature_cache_key_names_every_option():
    a = ImageTransform(size=32)
    assert a.key() != dataclasses.replace(a, resample=2).key() != dataclasses.replace(a, high_bit_depth="clip").key()
    assert "resize_mode='shortest_edge'" in a.key() and "source" not in a.key()


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_raw_dataset_evaluation_is_the_processor_path(family):
    """evaluate() on raw images (transform → rows → collator → model, NaFlex inputs included) predicts exactly
    what the model predicts on the family's own processor outputs; from_model gives that family's resize."""
    from hf_cft.evaluation import class_logits, evaluate
    from hf_cft.testing import tiny_family, tiny_family_image_processor

    model, tok = tiny_family(family)
    proc = tiny_family_image_processor(family)
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(30, 30), (18, 47), (61, 25), (9, 9)] * 3]
    classes = ["cat", "dog", "sea lion"]
    ds = from_arrays(arrays, [i % 3 for i in range(len(arrays))], classes)
    res = evaluate(
        model,
        tok,
        ds,
        split="train",
        templates=["a photo of a {}."],
        transform=ImageTransform.from_processor(proc),
        batch_size=5,
    )
    ref = proc(images=[ds["train"][i]["image"] for i in range(len(arrays))], return_tensors="pt")
    extra = {k: ref[k] for k in ("pixel_attention_mask", "spatial_shapes") if k in ref}
    with torch.no_grad():
        logits = class_logits(model, tok, ref["pixel_values"], classes, ["a photo of a {}."], **extra)
    assert torch.equal(res.splits["all"].predictions.cpu(), logits.argmax(-1).cpu())
    expected = {"clip": "shortest_edge", "siglip": "squash", "siglip2": "patches"}[family]
    assert ImageTransform.from_model(model).resize_mode == expected


def test_parity_script_never_drops_a_column_of_the_results_it_would_overwrite(tmp_path, monkeypatch):
    """Issue 18: run without torchvision, the script rewrote the committed results without their torchvision column.
    It now stops, naming the file and the column, before any work, and leaves the file as it was."""
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "preprocessing_parity.json"
    (tmp_path / "preprocessing_parity.json").write_bytes(committed.read_bytes())
    before = (tmp_path / "preprocessing_parity.json").read_bytes()
    assert "max_abs_torchvision" in json.loads(before)["rows"][CLIP]

    def no_work(*args, **kwargs):
        raise AssertionError("computed rows it could not write")

    real_row = parity.parity_row

    monkeypatch.setattr(parity, "parity_row", no_work)
    with pytest.raises(SystemExit, match=r"refusing to overwrite .*preprocessing_parity\.json.*max_abs_torchvision"):
        parity.main(["--out", str(tmp_path)])
    assert (tmp_path / "preprocessing_parity.json").read_bytes() == before
    assert not (tmp_path / "preprocessing_parity.md").exists()
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(SystemExit, match="--torchvision needs torchvision, which is not installed"):
            parity.main(["--out", str(tmp_path), "--torchvision"])
    # a results file with only the columns this run computes is rewritten (one small image keeps it fast)
    monkeypatch.setattr(parity, "parity_row", real_row)
    monkeypatch.setattr(parity, "images", lambda seed, n: [("RGB 9x7", _rgb(9, 7))])
    fresh = tmp_path / "fresh"
    parity.main(["--out", str(fresh)])
    first = json.loads((fresh / "preprocessing_parity.json").read_text())
    assert set(first["rows"][CLIP]) == set(parity.columns(False))
    parity.main(["--out", str(fresh)])  # same columns: overwritten without complaint
    assert json.loads((fresh / "preprocessing_parity.json").read_text())["rows"] == first["rows"]
