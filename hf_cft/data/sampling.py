"""Deterministic subsets: few-shot sampling, per-class pool splits, base/novel class splits.

All functions take a ``datasets.Dataset`` with a ``ClassLabel`` column and return ``Dataset.select`` views
(row order = original order), so they are cheap and reproducible: the same seed gives the same rows on any
machine (numpy's PCG64 generator).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import datasets
import numpy as np

from hf_cft.errors import DatasetFormatError, FewShotError
from hf_cft.utils import user_stacklevel
from hf_cft.validation import check_choice, check_int, check_number


def labels_of(ds: datasets.Dataset, label_column: str = "label") -> np.ndarray:
    """The label column as an int64 numpy array (respecting any ``select`` index mapping)."""
    if label_column not in ds.column_names:
        raise DatasetFormatError(f"Dataset has no {label_column!r} column; its columns are {ds.column_names}.")
    return np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column], dtype=np.int64)


def _class_name(ds: datasets.Dataset, c: int, label_column: str) -> str:
    feat = ds.features.get(label_column)
    return feat.int2str(int(c)) if isinstance(feat, datasets.ClassLabel) else str(c)


def _num_classes(ds: datasets.Dataset, labels: np.ndarray, label_column: str) -> int:
    feat = ds.features.get(label_column)
    if isinstance(feat, datasets.ClassLabel):
        return feat.num_classes
    return int(labels.max()) + 1 if labels.size else 0


def few_shot_indices(
    labels: np.ndarray,
    k: int,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    on_short: str = "error",
    class_names: Sequence[str] | None = None,
    dataset_name: str = "",
) -> np.ndarray:
    """Indices of ``k`` examples per class, drawn without replacement with ``np.random.default_rng(seed)``.

    Classes are visited in sorted id order and each draws a permutation of its rows, so adding a class never
    changes the rows drawn for another. ``on_short``: ``"error"`` raises :class:`FewShotError` naming the class;
    ``"take_all"`` takes every row of a short class and warns.
    """
    k = check_int(k, "k (shots per class)", low=1)
    check_choice(on_short, "on_short", ("error", "take_all"))
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    classes = sorted(int(c) for c in (present if classes is None else classes))
    picked = []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        if len(rows) < k:
            if on_short == "error":
                raise FewShotError(name, c, len(rows), k, dataset_name)
            warnings.warn(
                f"Class {name!r} (id {c}) has only {len(rows)} example(s) < {k} shots; taking all of them.",
                stacklevel=user_stacklevel(),
            )
        picked.append(rng.permutation(rows)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def few_shot(
    ds: datasets.Dataset,
    k: int,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    on_short: str = "error",
    label_column: str = "label",
    name: str = "",
) -> datasets.Dataset:
    """``k`` shots per class (all classes present, or ``classes``), deterministic in ``seed``."""
    labels = labels_of(ds, label_column)
    feat = ds.features.get(label_column)
    names = feat.names if isinstance(feat, datasets.ClassLabel) else None
    idx = few_shot_indices(labels, k, seed, classes, on_short, names, name)
    return ds.select(idx)


def split_per_class_indices(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split each class's rows into a ``fraction`` part and the rest (``floor(fraction·n_c + 0.5)`` rows)."""
    fraction = check_number(fraction, "fraction", low=0.0, high=1.0)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = int(math.floor(fraction * len(rows) + 0.5))
        first.append(rows[:n])
        second.append(rows[n:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(first), cat(second)


def split_per_class(
    ds: datasets.Dataset, fraction: float = 0.7, seed: int = 0, label_column: str = "label"
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Deterministic per-class split, e.g. the 70/30 pretraining/downstream pools of the benchmarks."""
    a, b = split_per_class_indices(labels_of(ds, label_column), fraction, seed)
    return ds.select(a), ds.select(b)


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ``ceil(n/2)`` sorted class ids, novel = the rest (CoCoOp protocol)."""
    if num_classes < 2:
        raise ValueError(f"A base/novel split needs at least 2 classes, got {num_classes}")
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def select_classes(
    ds: datasets.Dataset, class_ids: Sequence[int], relabel: bool = True, label_column: str = "label"
) -> datasets.Dataset:
    """Rows whose label is in ``class_ids``; with ``relabel`` the labels become ``0..len(class_ids)-1`` in the
    given order and the ``ClassLabel`` keeps only those names."""
    class_ids = [int(c) for c in class_ids]
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f"class_ids has duplicates: {class_ids}")
    labels = labels_of(ds, label_column)
    n = _num_classes(ds, labels, label_column)
    bad = [c for c in class_ids if not 0 <= c < n]
    if bad:
        raise ValueError(f"class id(s) {bad} out of range for a dataset with {n} classes")
    rows = np.flatnonzero(np.isin(labels, class_ids))
    sub = ds.select(rows)
    if not relabel:
        return sub
    remap = {c: i for i, c in enumerate(class_ids)}
    new_labels = [remap[int(lab)] for lab in labels[rows]]
    names = [_class_name(ds, c, label_column) for c in class_ids]
    sub = sub.remove_columns(label_column).flatten_indices()
    return sub.add_column(label_column, new_labels, feature=datasets.ClassLabel(names=names))


def base_novel_split(
    ds: datasets.Dataset, label_column: str = "label"
) -> tuple[datasets.Dataset, datasets.Dataset, list[int], list[int]]:
    """Split a dataset into its base-class and novel-class parts, each relabelled from 0.

    Returns ``(base_ds, novel_ds, base_ids, novel_ids)``.
    """
    labels = labels_of(ds, label_column)
    base, novel = base_novel_classes(_num_classes(ds, labels, label_column))
    return select_classes(ds, base, True, label_column), select_classes(ds, novel, True, label_column), base, novel
