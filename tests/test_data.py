import json
import warnings

import datasets
import numpy as np
import pytest
import torch

from hf_cft.data import (
    ImageClassificationCollator,
    ImageTransform,
    apply_image_transform,
    base_novel_classes,
    base_novel_split,
    benchmark_order,
    few_shot,
    from_arrays,
    get_spec,
    labels_of,
    list_specs,
    load_classification_dataset,
    load_digits_dataset,
    select_classes,
    split_per_class,
)
from hf_cft.errors import (
    ClassNamesError,
    DatasetFormatError,
    FewShotError,
    ImageDecodeError,
    TemplateError,
    UnknownDatasetError,
)


def _arrays(n_per_class=(5, 3, 8), size=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    rng.shuffle(labels)
    imgs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in labels]
    return imgs, labels


@pytest.fixture
def small():
    imgs, labels = _arrays()
    return from_arrays(imgs, labels, ["ant", "bee", "wasp"], ["a photo of a {}."], name="small")


# ---------------------------------------------------------------------------------------------- loaders


def test_parquet_folder_with_meta(tmp_path, small):
    folder = tmp_path / "mini"
    folder.mkdir()
    small["train"].to_parquet(str(folder / "train.parquet"))
    small["train"].select(range(4)).to_parquet(str(folder / "test.parquet"))
    (folder / "meta.json").write_text(json.dumps({"classnames": ["ant", "honey bee", "wasp"], "templates": ["x {}."]}))
    ds = load_classification_dataset(folder)
    assert ds.name == "mini" and set(ds.splits) == {"train", "test"}
    assert ds.classnames == ["ant", "honey bee", "wasp"] and ds.templates == ["x {}."]
    assert isinstance(ds["train"].features["image"], datasets.Image)
    assert ds["train"].features["label"].names == ["ant", "honey bee", "wasp"]
    assert len(ds["train"]) == 16 and len(ds["test"]) == 4
    # the same folder reached by name through data_dir
    ds2 = load_classification_dataset("mini", data_dir=tmp_path)
    assert ds2.classnames == ds.classnames


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("golden_retriever", "tabby_cat"):
            d = tmp_path / "pets" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    ds = load_classification_dataset(tmp_path / "pets")
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert len(ds["train"]) == 4 and len(ds["test"]) == 4
    assert ds.templates == ["a photo of a {}."]


def test_hub_path_renames_columns(monkeypatch):
    raw = datasets.Dataset.from_dict(
        {"img": [np.zeros((4, 4, 3), np.uint8)] * 4, "fine_label": [0, 1, 2, 1], "coarse_label": [0, 0, 1, 1]},
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "fine_label": datasets.ClassLabel(names=["a", "b", "c"]),
                "coarse_label": datasets.Value("int64"),
            }
        ),
    )
    seen = {}

    def fake_load_dataset(path, name=None, **kw):
        seen["args"] = (path, name)
        return datasets.DatasetDict({"train": raw, "test": raw})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_classification_dataset("someone/cifar-like", templates=["a {} photo."])
    assert seen["args"] == ("someone/cifar-like", None)
    assert ds["train"].column_names == ["image", "label"]
    assert ds.classnames == ["a", "b", "c"] and ds.templates == ["a {} photo."]


def test_hub_failure_is_typed(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(UnknownDatasetError, match="someone/missing.*offline"):
        load_classification_dataset("someone/missing")


def test_unknown_dataset_name():
    with pytest.raises(UnknownDatasetError, match="no_such_dataset"):
        load_classification_dataset("no_such_dataset", data_dir="/nonexistent-dir-for-tests")


def test_classnames_count_mismatch(small):
    with pytest.raises(ClassNamesError, match=r"2 class names .*'x'.*\(3 classes\)"):
        from_arrays(*_arrays(), ["ant", "bee"], name="x")
    imgs, labels = _arrays()
    with pytest.raises(ClassNamesError, match="empty"):
        from_arrays(imgs, labels, [], name="x")


def test_template_without_placeholder():
    imgs, labels = _arrays()
    with pytest.raises(TemplateError, match="'a photo'.*small"):
        from_arrays(imgs, labels, ["ant", "bee", "wasp"], ["a photo"], name="small")


def test_empty_dataset_and_missing_columns(tmp_path):
    with pytest.raises(DatasetFormatError, match="empty"):
        from_arrays([], [], ["a"], name="e")
    folder = tmp_path / "nolabel"
    folder.mkdir()
    datasets.Dataset.from_dict(
        {"image": [np.zeros((4, 4, 3), np.uint8)]}, features=datasets.Features({"image": datasets.Image()})
    ).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(DatasetFormatError, match="no label column"):
        load_classification_dataset(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetFormatError, match="neither Parquet"):
        load_classification_dataset(empty)


def test_int_labels_need_classnames_and_range(tmp_path):
    folder = tmp_path / "ints"
    folder.mkdir()
    datasets.Dataset.from_dict(
        {"image": [np.zeros((4, 4, 3), np.uint8)] * 3, "label": [0, 1, 5]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    ).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(DatasetFormatError, match="not a ClassLabel"):
        load_classification_dataset(folder)
    with pytest.raises(DatasetFormatError, match="outside 0..1"):
        load_classification_dataset(folder, classnames=["a", "b"])


# ---------------------------------------------------------------------------------------------- specs


def test_specs_registry():
    mtil = list_specs("mtil")
    b2n = list_specs("base_to_novel")
    assert len(mtil) == 11 and len(b2n) == 11
    assert benchmark_order("mtil", "order_i")[0] == "aircraft"
    assert sorted(benchmark_order("mtil", "order_i")) == sorted(benchmark_order("mtil", "order_ii"))
    expected = {
        "aircraft": 100,
        "cifar100": 100,
        "dtd": 47,
        "eurosat": 10,
        "flowers": 102,
        "food": 101,
        "mnist": 10,
        "oxford_pet": 37,
        "stanford_cars": 196,
        "sun397": 397,
    }
    for name, n in expected.items():
        assert get_spec(f"mtil/{name}").num_classes == n, name
    assert get_spec("base_to_novel/imagenet").num_classes == 1000
    for q in mtil + b2n:
        spec = get_spec(q)
        assert all(t.count("{}") == 1 for t in spec.templates)
    with pytest.raises(UnknownDatasetError, match="ambiguous"):
        get_spec("caltech101")
    with pytest.raises(UnknownDatasetError, match="mtil/nope"):
        get_spec("mtil/nope")


# ---------------------------------------------------------------------------------------------- sampling


def test_few_shot_deterministic_and_exact(small):
    ds = small["train"]
    a = few_shot(ds, 3, seed=1)
    b = few_shot(ds, 3, seed=1)
    c = few_shot(ds, 3, seed=2)
    assert np.bincount(labels_of(a)).tolist() == [3, 3, 3]
    assert a["label"] == b["label"] and a.to_dict()["image"] == b.to_dict()["image"]
    assert a._indices is not None and c._indices is not None
    assert a._indices.to_pydict() != c._indices.to_pydict()


def test_few_shot_short_class(small):
    with pytest.raises(FewShotError, match=r"'bee' \(id 1\).*only 3 example\(s\) but 5 shots"):
        few_shot(small["train"], 5, seed=0, name="small")
    with pytest.warns(UserWarning, match="bee"):
        sub = few_shot(small["train"], 5, seed=0, on_short="take_all")
    assert np.bincount(labels_of(sub)).tolist() == [5, 3, 5]


def test_split_per_class(small):
    ds = small["train"]
    a, b = split_per_class(ds, 0.7, seed=0)
    ia, ib = a._indices.column(0).to_pylist(), b._indices.column(0).to_pylist()
    assert not set(ia) & set(ib) and sorted(ia + ib) == list(range(len(ds)))
    assert np.bincount(labels_of(a)).tolist() == [4, 2, 6]  # floor(0.7 n + 0.5) of 5, 3, 8
    a2, _ = split_per_class(ds, 0.7, seed=0)
    assert a2._indices.column(0).to_pylist() == ia


def test_base_novel():
    assert base_novel_classes(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    base, novel = base_novel_classes(101)
    assert len(base) == 51 and len(novel) == 50 and novel[0] == 51
    with pytest.raises(ValueError):
        base_novel_classes(1)


def test_base_novel_split_relabels(small):
    base_ds, novel_ds, base, novel = base_novel_split(small["train"])
    assert base == [0, 1] and novel == [2]
    assert base_ds.features["label"].names == ["ant", "bee"]
    assert novel_ds.features["label"].names == ["wasp"]
    assert set(labels_of(novel_ds).tolist()) == {0} and len(novel_ds) == 8
    sub = select_classes(small["train"], [2, 0])
    assert sub.features["label"].names == ["wasp", "ant"] and len(sub) == 13


# ---------------------------------------------------------------------------------------------- transforms


def test_image_transform_matches_clip_processor():
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    t = ImageTransform.from_processor(proc)
    assert (t.size, t.crop_size) == (24, 24)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    ours = t(img)
    theirs = proc(images=img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 24, 24)
    assert (ours - theirs).abs().max() <= 1e-5  # tests/test_preprocessing.py: every processor class and mode


def test_train_transform_is_seeded():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    a = ImageTransform(size=16, crop_size=16, train=True, scale=(0.3, 1.0), hflip=True, seed=3)
    b = ImageTransform(size=16, crop_size=16, train=True, scale=(0.3, 1.0), hflip=True, seed=3)
    xs, ys = [a(img) for _ in range(3)], [b(img) for _ in range(3)]
    assert all((x == y).all() for x, y in zip(xs, ys)) and not (xs[0] == xs[1]).all()


def test_grayscale_and_arrays_become_rgb():
    t = ImageTransform(size=8, crop_size=8)
    assert t(np.zeros((10, 10), np.uint8)).shape == (3, 8, 8)
    assert t(np.zeros((3, 10, 10), np.float32)).shape == (3, 8, 8)


def test_corrupt_image_names_its_path(small):
    bad = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": "imgs/broken.jpg"}], "label": [0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])}),
    )
    out = apply_image_transform(bad, ImageTransform(size=8, crop_size=8), name="bad")
    with pytest.raises(ImageDecodeError, match="imgs/broken.jpg.*'bad'"):
        out[0]


def test_collator(small):
    out = apply_image_transform(small["train"], ImageTransform(size=8, crop_size=8))
    batch = ImageClassificationCollator()([out[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["labels"].dtype.is_floating_point is False
    assert batch["labels"].tolist() == small["train"]["label"][:4]


def test_digits_dataset():
    ds = load_digits_dataset(image_size=16)
    assert ds.num_classes == 10 and len(ds["train"]) + len(ds["test"]) == 1797
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = ds["test"][0]["image"]
    assert img.size == (16, 16)
    assert abs(len(ds["test"]) / 1797 - 0.3) < 0.01


@pytest.mark.parametrize(
    "hub_names, hub_labels, expected, warned",
    [
        # swapped order and an extra background class (dropped)
        (["background", "cheesecake", "cheese_plate", "crab"], [0, 1, 2, 3, 1], [2, 1, 0, 2], "background"),
        # a typo: the only unmatched name on each side is paired
        (["cheesecake", "cra", "cheese_plate"], [0, 1, 2, 1], [2, 0, 1, 0], "'cra' matched to class 'crab'"),
    ],
)
def test_hub_labels_are_aligned_by_name(monkeypatch, hub_names, hub_labels, expected, warned):
    from hf_cft.data import loading
    from hf_cft.data.specs import DatasetSpec

    spec = DatasetSpec(
        name="toy",
        classnames=("crab", "cheese plate", "cheesecake"),
        templates=("a {}.",),
        hub_id="someone/toy",
        source_label_names=("crab", "cheese_plate", "cheesecake"),
    )
    raw = datasets.Dataset.from_dict(
        {"image": [np.zeros((4, 4, 3), np.uint8)] * len(hub_labels), "label": hub_labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=hub_names)}),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": raw, "test": raw}))
    with pytest.warns(UserWarning, match=warned):
        ds = loading._load_spec(spec, None, None)
    assert ds["train"].features["label"].names == ["crab", "cheese plate", "cheesecake"]
    assert ds["train"]["label"] == expected


def test_hub_missing_class_is_named(monkeypatch):
    from hf_cft.data import loading
    from hf_cft.data.specs import DatasetSpec

    spec = DatasetSpec(name="toy", classnames=("ant", "bee", "wasp"), templates=("a {}.",), hub_id="x/toy")
    raw = datasets.Dataset.from_dict(
        {"image": [np.zeros((4, 4, 3), np.uint8)] * 2, "label": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "fly"])}),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": raw}))
    with pytest.raises(DatasetFormatError, match=r"no label for class\(es\) \['bee', 'wasp'\]"):
        loading._load_spec(spec, None, None)


def test_keyed_train_crops_depend_on_seed_epoch_and_image_only():
    """A row's random crop is a function of (seed, epoch, image): fetched alone, in another batch, or by another
    transform instance (another process, a DataLoader worker) it is the same; a new epoch or seed changes it."""
    from hf_cft.data import image_key, set_transform_epoch

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(6)]
    raw = from_arrays(images, [i % 3 for i in range(6)], ["a", "b", "c"])["train"]

    def train_ds(seed=1):
        return apply_image_transform(
            raw, ImageTransform(size=16, crop_size=16, train=True, scale=(0.3, 1.0), seed=seed)
        )

    one = train_ds()
    whole = one[list(range(6))]["pixel_values"]
    shard = train_ds()[[4, 1]]["pixel_values"]  # "rank 1" sees rows 4 and 1 only, in its own order
    assert torch.equal(shard[0], whole[4]) and torch.equal(shard[1], whole[1])
    assert torch.equal(one[1]["pixel_values"], whole[1])  # repeated calls: the same draw, not the next one
    assert not torch.equal(whole[0], train_ds(seed=2)[0]["pixel_values"])
    assert set_transform_epoch(one, 1)
    epoch1 = one[list(range(6))]["pixel_values"]
    assert not all(torch.equal(a, b) for a, b in zip(whole, epoch1))
    set_transform_epoch(one, 0)
    assert torch.equal(one[4]["pixel_values"], whole[4])
    assert not set_transform_epoch(raw, 1)  # no hf_cft transform on it: nothing to set
    assert image_key(images[0]) == image_key(images[0].copy()) != image_key(images[1])
