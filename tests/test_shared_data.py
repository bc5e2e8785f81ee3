"""End-to-end checks on ../shared/data (skipped, with the reason printed, when it is absent)."""

import json

import numpy as np
import pytest

from hf_cft.data import SHARED_DATASETS, few_shot, labels_of, load_classification_dataset, split_per_class

pytestmark = pytest.mark.data


@pytest.mark.parametrize("name", SHARED_DATASETS)
def test_shared_dataset_loads_with_meta(shared_data, name):
    meta = json.loads((shared_data / name / "meta.json").read_text())
    ds = load_classification_dataset(name, data_dir=shared_data)
    assert ds.classnames == meta["classnames"] and ds.templates == meta["templates"]
    for split in ("train", "test"):
        assert len(ds[split]) == meta["counts"][split]
        assert (
            np.bincount(labels_of(ds[split]), minlength=meta["num_classes"]).tolist()
            == meta["counts"][f"{split}_per_class"]
        )


def test_pools_and_few_shot_on_real_data(shared_data):
    ds = load_classification_dataset("dtd10", data_dir=shared_data)
    pre, down = split_per_class(ds["train"], 0.7, seed=0)
    assert len(pre) == 560 and len(down) == 240  # 80 per class -> 56 / 24
    shots = few_shot(down, 16, seed=1)
    assert np.bincount(labels_of(shots)).tolist() == [16] * 10


def test_zero_shot_end_to_end_on_dtd10(shared_data, clip_tokenizer):
    from hf_cft.models import evaluate_zeroshot
    from hf_cft.testing import tiny_clip_for_tokenizer

    ds = load_classification_dataset("dtd10", data_dir=shared_data)
    model = tiny_clip_for_tokenizer(image_size=32, patch_size=4)
    res = evaluate_zeroshot(model, clip_tokenizer, ds, batch_size=128)
    assert res.total == 400 and len(res.per_class_accuracy) == 10
    assert 0.0 <= res.accuracy <= 100.0
    print(f"tiny random CLIP, dtd10 test: zero-shot accuracy {res.accuracy:.2f}% (chance 10%)")
