"""The base-to-novel benchmark's KgCoOp, KgCoOp + MergeTune and VPT (+ MergeTune) rows, end to end on a tiny CLIP
with synthetic images (one epoch, one seed): they run, report (base, novel) per seed, train what they say, and the
row filter computes only what is asked for."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_cft.models import image_features
from hf_cft.testing import tiny_clip

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
CLASSES = ["cat", "dog", "sea lion", "owl", "fox", "eel"]


@pytest.fixture(scope="module")
def b2n():
    spec = importlib.util.spec_from_file_location("b2n", BENCH / "b2n.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("b2n", mod)
    spec.loader.exec_module(mod)
    return mod


def _images(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    images = torch.randint(0, 60, (len(labels), 3, 30, 30), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):  # a class is a colour pattern: learnable in a step or two
        images[i, c % 3] += 120 + 20 * (c // 3)
    return images, labels


@torch.no_grad()
def _feats(model, images):
    from hf_cft.data.image_pool import normalize_batch

    return image_features(model, normalize_batch(images))


def test_new_rows_run_end_to_end(b2n, toy_tokenizer):
    model = tiny_clip()
    down_im, down_y = _images(20, 0)
    test_im, test_y = _images(4, 1)
    feats = {
        "down_f": _feats(model, down_im), "down_y": down_y, "down_im": down_im,
        "test_f": _feats(model, test_im), "test_y": test_y, "test_im": test_im,
    }  # fmt: skip
    task = SimpleNamespace(name="toy", classnames=CLASSES, templates=["a photo of a {}."], num_classes=len(CLASSES))
    hp = {"optimizer": "adamw", "lr": 0.05, "epochs": 2, "batch_size": 16, "lam": 8.0, "beta": 0.5, "tau": 0.3}
    rows = ("zs_single", "coop", *b2n.EXTRA_ROWS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = b2n.run_dataset(model, toy_tokenizer, task, feats, [1], hp, log=lambda m: None, rows=rows)
    assert set(out) == set(rows)
    for row in rows:
        assert len(out[row]) == 1 and all(0.0 <= a <= 100.0 for a in out[row][0])
    # the shared model is left as it was (adapters live on copies or are unloaded)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    summary = b2n.summarise({"toy": out}, rows)
    assert set(summary["average"]) == set(rows) and b2n.markdown(summary, rows)[2].startswith("| zs_single")
    with pytest.raises(ValueError, match="unknown base-to-novel rows"):
        b2n.run_dataset(model, toy_tokenizer, task, feats, [1], hp, rows=("zs_single", "kgcop"))
    no_images = {k: v for k, v in feats.items() if not k.endswith("_im")}
    with pytest.raises(ValueError, match="images"):
        b2n.run_dataset(model, toy_tokenizer, task, no_images, [1], hp, log=lambda m: None, rows=("vpt",))
