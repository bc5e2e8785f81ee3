"""Load image-classification datasets from the Hub, a local Parquet folder or an ImageFolder.

Every loader returns a :class:`ClassificationDataset`: a ``datasets.DatasetDict`` whose splits have an
``image`` column (``datasets.Image``) and a ``label`` column (``datasets.ClassLabel``), plus the class names
and prompt templates to build a zero-shot head with.

Resolution of ``load_classification_dataset(source)``:

1. ``source`` is an existing folder: Parquet files (``train.parquet``, ``<split>-*.parquet`` or
   ``data/<split>-*.parquet``, optional ``meta.json`` with ``classnames``/``templates``) or an ImageFolder
   (``<split>/<class>/<image>`` or ``<class>/<image>``).
2. A plain name found in ``data_dir`` (or ``$HF_CFT_DATA_DIR``, or ``../shared/data``) loads that folder.
3. A registered spec name (``mtil/dtd``, ``base_to_novel/eurosat``) loads the spec's Hub dataset.
4. Any other string containing ``/`` is treated as a Hub dataset id.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from hf_cft.data.specs import DatasetSpec, get_spec, has_spec
from hf_cft.data.templates import DEFAULT_TEMPLATES, validate_classnames, validate_templates
from hf_cft.errors import ClassNamesError, DatasetFormatError, UnknownDatasetError
from hf_cft.utils import user_stacklevel
from hf_cft.validation import check_labels

SHARED_DATASETS = (
    "aid30",
    "caltech101",
    "cifar10",
    "dtd10",
    "flowers5",
    "gtsrb",
    "hymenoptera",
    "mnist",
    "oxford_pets3",
    "stanford_cars",
)
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ClassificationDataset:
    """Splits with ``image`` + ``label`` columns, and the text side (class names, templates)."""

    name: str
    splits: datasets.DatasetDict
    classnames: list[str]
    templates: list[str]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, split: str) -> datasets.Dataset:
        if split not in self.splits:
            raise DatasetFormatError(f"Dataset {self.name!r} has no split {split!r}; it has {list(self.splits)}.")
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"ClassificationDataset({self.name!r}, {self.num_classes} classes, {len(self.templates)} templates, {sizes})"


def default_data_dir() -> Path | None:
    """``$HF_CFT_DATA_DIR``, else ``../shared/data`` from the working directory, if it exists."""
    env = os.environ.get("HF_CFT_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def load_classification_dataset(
    source: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    splits: Sequence[str] | None = None,
    name: str | None = None,
) -> ClassificationDataset:
    """Load a dataset by folder, shared-data name, spec name or Hub id (see the module docstring).

    ``classnames`` / ``templates`` override what the folder or spec provides; ``splits`` keeps only those.
    """
    source_str = str(source)
    path = Path(source_str)
    if path.is_dir():
        ds = _load_folder(path, name or path.name, image_column, label_column, classnames, templates)
    else:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        local = root / source_str if root is not None else None
        if local is not None and "/" not in source_str and local.is_dir():
            ds = _load_folder(local, name or source_str, image_column, label_column, classnames, templates)
        elif has_spec(source_str):
            ds = _load_spec(get_spec(source_str), classnames, templates)
        elif "/" in source_str and not source_str.startswith((".", "/")) and not has_spec(source_str.split("/")[0]):
            ds = _load_hub(source_str, None, None, image_column, label_column, classnames, templates, name)
        else:
            hint = "Pass a folder, a Hub dataset id (owner/name), or a spec name."
            if root is None:
                hint += " No local data folder was found (set HF_CFT_DATA_DIR)."
            try:
                get_spec(source_str)
            except UnknownDatasetError as exc:
                if "ambiguous" in str(exc):
                    raise
            raise UnknownDatasetError(
                source_str, known=[*SHARED_DATASETS, "mtil/<name>", "base_to_novel/<name>"], hint=hint
            )
    if splits is not None:
        missing = [s for s in splits if s not in ds.splits]
        if missing:
            raise DatasetFormatError(f"Dataset {ds.name!r} has no split(s) {missing}; it has {list(ds.splits)}.")
        ds.splits = datasets.DatasetDict({s: ds.splits[s] for s in splits})
    return ds


# ----------------------------------------------------------------------------------------------------------
# folders


def _parquet_files(folder: Path) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for sub in (folder, folder / "data"):
        if not sub.is_dir():
            continue
        for f in sorted(sub.glob("*.parquet")):
            split = re.split(r"[-.]", f.name, maxsplit=1)[0]
            files.setdefault(split, []).append(str(f))
    return files


def _load_folder(folder, name, image_column, label_column, classnames, templates) -> ClassificationDataset:
    meta: dict = {}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        from hf_cft.utils import read_json_object

        meta = read_json_object(meta_path, DatasetFormatError, f"meta.json of dataset {name!r}")
        for key in ("classnames", "templates"):
            value = meta.get(key)
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                if key == "classnames" and isinstance(value, list):
                    continue  # validate_classnames names the entry that is not a string
                raise DatasetFormatError(
                    f"meta.json of dataset {name!r}: {key!r} must be a list of strings, got {value!r:.80}."
                )
    files = _parquet_files(folder)
    if files:
        dd = datasets.load_dataset("parquet", data_files=files)
    elif _looks_like_imagefolder(folder):
        dd = datasets.load_dataset("imagefolder", data_dir=str(folder), drop_labels=False)
    else:
        raise DatasetFormatError(
            f"Folder {str(folder)!r} (dataset {name!r}) holds neither Parquet files nor an ImageFolder layout "
            "(<split>/<class>/<image> or <class>/<image>)."
        )
    if classnames is None and "classnames" in meta:
        classnames = meta["classnames"]
    if templates is None:
        templates = meta.get("templates")
    return _finalize(name, dd, image_column, label_column, classnames, templates, meta, folder_names_as_classes=True)


def _looks_like_imagefolder(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in _IMAGE_EXTS for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------------------------
# Hub


def _load_hub(hub_id, config, split_map, image_column, label_column, classnames, templates, name, spec=None):
    try:
        dd = datasets.load_dataset(hub_id, config)
    except Exception as exc:  # offline, unknown id, gated, ...
        raise UnknownDatasetError(
            hub_id,
            hint=f"Loading it from the Hugging Face Hub failed ({type(exc).__name__}: {exc}). "
            "Offline, download it once and pass the local folder instead.",
        ) from exc
    if not isinstance(dd, datasets.DatasetDict):
        dd = datasets.DatasetDict({"train": dd})
    if split_map:  # rename hub splits to train/test
        dd = datasets.DatasetDict({ours: dd[theirs] for ours, theirs in split_map.items() if theirs in dd})
    return _finalize(
        name or hub_id, dd, image_column, label_column, classnames, templates, {"hub_id": hub_id}, spec=spec
    )


def _load_spec(spec: DatasetSpec, classnames, templates) -> ClassificationDataset:
    if not spec.hub_id:
        raise UnknownDatasetError(
            spec.qualified_name,
            hint="This dataset has no public Hub copy registered; download it and pass its local folder "
            f"(with classnames/templates from hf_cft.get_spec({spec.qualified_name!r})).",
        )
    return _load_hub(
        spec.hub_id,
        spec.hub_config,
        spec.hub_splits,
        spec.image_column,
        spec.label_column,
        list(classnames) if classnames is not None else list(spec.classnames),
        list(templates) if templates is not None else list(spec.templates),
        spec.qualified_name,
        spec=spec,
    )


# ----------------------------------------------------------------------------------------------------------
# normalisation to image + label(ClassLabel)


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, name: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DatasetFormatError(f"Dataset {name!r} has no {what} column {wanted!r}; its columns are {columns}.")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise DatasetFormatError(
        f"Dataset {name!r} has no {what} column (looked for {list(candidates)}); its columns are {columns}. "
        f"Pass {what}_column=..."
    )


def _finalize(
    name, dd, image_column, label_column, classnames, templates, meta, folder_names_as_classes=False, spec=None
) -> ClassificationDataset:
    if len(dd) == 0:
        raise DatasetFormatError(f"Dataset {name!r} has no splits.")
    first = next(iter(dd.values()))
    cols = first.column_names
    img_col = _pick(cols, image_column, ("image", "img", "pixel_values", "jpg", "png"), "image", name)
    lab_col = _pick(cols, label_column, ("label", "labels", "fine_label", "cls", "class"), "label", name)
    out = {}
    for split, ds in dd.items():
        if len(ds) == 0:
            raise DatasetFormatError(f"Split {split!r} of dataset {name!r} is empty.")
        rename = {}
        if img_col != "image":
            rename[img_col] = "image"
        if lab_col != "label":
            rename[lab_col] = "label"
        drop = [c for c in ds.column_names if c not in (img_col, lab_col)]
        if drop:
            ds = ds.remove_columns(drop)
        if rename:
            ds = ds.rename_columns(rename)
        out[split] = ds
    dd = datasets.DatasetDict(out)
    label_feature = next(iter(dd.values())).features["label"]

    if isinstance(label_feature, datasets.ClassLabel):
        label_names = list(label_feature.names)
        if classnames is None:
            classnames = [n.replace("_", " ") for n in label_names] if folder_names_as_classes else label_names
        if spec is not None:
            dd, label_names = _align_to_spec(dd, label_names, spec)
            label_feature = next(iter(dd.values())).features["label"]
        # a ClassLabel cannot hold a name twice: duplicates are an error here, not a warning
        validate_classnames(
            classnames, owner=f"dataset {name!r}", num_labels=label_feature.num_classes, duplicates="error"
        )
        # a ClassLabel does not check the stored ints (Parquet written by other tools): values outside the names
        # would be scored as errors of a class that does not exist
        for split, ds in dd.items():
            check_labels(ds.unique("label"), label_feature.num_classes, f"split {split!r} of dataset {name!r}")
        if list(classnames) != label_names:  # keep the ClassLabel names in line with the prompt names
            new = datasets.ClassLabel(names=list(classnames))
            dd = datasets.DatasetDict({k: v.cast_column("label", new) for k, v in dd.items()})
    else:
        if classnames is None:
            raise DatasetFormatError(
                f"The label column of dataset {name!r} is not a ClassLabel and no class names were given; pass "
                "classnames=[...] in label-id order."
            )
        classnames = validate_classnames(classnames, owner=f"dataset {name!r}", duplicates="error")
        for split, ds in dd.items():
            labels = ds.unique("label")
            bad = [lab for lab in labels if not isinstance(lab, int) or not 0 <= lab < len(classnames)]
            if bad:
                raise DatasetFormatError(
                    f"Split {split!r} of dataset {name!r} has label(s) {sorted(map(str, bad))[:5]} outside "
                    f"0..{len(classnames) - 1} ({len(classnames)} class names)."
                )
        new = datasets.ClassLabel(names=list(classnames))
        dd = datasets.DatasetDict({k: v.cast_column("label", new) for k, v in dd.items()})

    if not isinstance(next(iter(dd.values())).features["image"], datasets.Image):
        try:
            dd = datasets.DatasetDict({k: v.cast_column("image", datasets.Image()) for k, v in dd.items()})
        except Exception as exc:
            raise DatasetFormatError(f"The image column of dataset {name!r} cannot be read as images: {exc}") from exc
    templates = validate_templates(
        templates if templates is not None else list(DEFAULT_TEMPLATES), f"dataset {name!r}"
    )
    return ClassificationDataset(name=name, splits=dd, classnames=list(classnames), templates=templates, meta=meta)


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _align_to_spec(dd: datasets.DatasetDict, hub_names: list[str], spec: DatasetSpec):
    """Map a Hub copy's label ids onto the spec's label order *by name*.

    Hub copies often order (or spell) classes differently from the torchvision/CoOp order the class names
    assume (Food-101 swaps cheesecake/cheese plate, a SUN397 copy swaps two jail classes, Caltech-101 copies
    add a background class). Each Hub label name is matched, case- and punctuation-insensitively, against the
    spec's source label names and class names; rows of unmatched Hub classes (e.g. a background class) are
    dropped with a warning; one leftover on each side is paired with a warning (a typo such as CIFAR-100's
    "cra" for "crab"); anything else that stays unmatched is an error naming the classes.
    """
    ours = {}
    for names in (spec.source_label_names, spec.classnames):
        for i, n in enumerate(names or ()):
            ours.setdefault(_norm(n), i)
    mapping = {h: ours.get(_norm(n)) for h, n in enumerate(hub_names)}
    if any(v is not None for v in mapping.values()):
        covered = {v for v in mapping.values() if v is not None}
        left_ours = [i for i in range(spec.num_classes) if i not in covered]
        left_hub = [h for h, v in mapping.items() if v is None]
        if len(left_ours) == 1 and len(left_hub) == 1:
            h, o = left_hub[0], left_ours[0]
            warnings.warn(
                f"{spec.qualified_name}: Hub label {hub_names[h]!r} matched to class {spec.classnames[o]!r} "
                "(the only unmatched name on each side).",
                stacklevel=user_stacklevel(),
            )
            mapping[h], left_ours, left_hub = o, [], []
        if left_ours:
            raise DatasetFormatError(
                f"The Hub copy of {spec.qualified_name!r} ({spec.hub_id}) has no label for class(es) "
                f"{[spec.classnames[i] for i in left_ours][:10]}; its labels are {hub_names[:10]}..."
            )
        if left_hub:
            warnings.warn(
                f"{spec.qualified_name}: dropping rows of Hub classes not in the spec: {[hub_names[h] for h in left_hub]}",
                stacklevel=user_stacklevel(),
            )
    elif len(hub_names) == spec.num_classes:
        warnings.warn(
            f"{spec.qualified_name}: no Hub label name matches a class name; assuming the same label order.",
            stacklevel=user_stacklevel(),
        )
        mapping = {h: h for h in range(len(hub_names))}
    else:
        raise DatasetFormatError(
            f"The Hub copy of {spec.qualified_name!r} ({spec.hub_id}) has {len(hub_names)} labels and none matches "
            f"the spec's {spec.num_classes} class names."
        )
    if all(mapping[h] == h for h in mapping) and len(mapping) == spec.num_classes:
        return dd, list(hub_names)
    new_feature = datasets.ClassLabel(names=list(spec.classnames))
    table = [mapping[h] if mapping[h] is not None else -1 for h in range(len(hub_names))]
    out = {}
    for split, ds in dd.items():
        ds = ds.filter(lambda labs: [table[x] >= 0 for x in labs], input_columns="label", batched=True)
        features = ds.features.copy()
        features["label"] = new_feature
        out[split] = ds.map(
            lambda labs: {"label": [table[x] for x in labs]}, input_columns="label", batched=True, features=features
        )
    return datasets.DatasetDict(out), list(spec.classnames)


def from_arrays(
    images,
    labels: Sequence[int],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    name: str = "in-memory",
    split: str = "train",
) -> ClassificationDataset:
    """Build a ClassificationDataset from in-memory images (PIL images or HxW(xC) uint8 arrays) and labels."""
    import numpy as np

    classnames = validate_classnames(
        classnames, owner=f"dataset {name!r}", duplicates="error"
    )  # ClassLabel needs unique
    if len(images) != len(labels):
        raise DatasetFormatError(f"Dataset {name!r}: {len(images)} images but {len(labels)} labels.")
    if len(images) == 0:
        raise DatasetFormatError(f"Dataset {name!r} is empty.")
    labels = [int(x) for x in labels]
    if min(labels) < 0 or max(labels) >= len(classnames):
        raise ClassNamesError(
            f"{len(classnames)} class names were given for dataset {name!r}, but its labels span "
            f"{min(labels)}..{max(labels)} ({max(labels) + 1} classes)."
        )
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classnames))})
    imgs = [np.asarray(im) if not hasattr(im, "save") else im for im in images]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=features)
    templates = validate_templates(templates, f"dataset {name!r}")
    return ClassificationDataset(
        name=name, splits=datasets.DatasetDict({split: ds}), classnames=list(classnames), templates=templates
    )
