"""Tasks of a continual stream: :class:`TaskSpec` (one dataset with its class names and templates), stream
validation, and builders for the project's streams.

- :func:`mtil_mini_tasks`: Protocol B of ``docs/benchmarks.md`` (MTIL-mini, Orders I and II over
  ``../shared/data``): each task trains on the **downstream pool** of its dataset (the 30% of each class's
  training images left after ``split_per_class(train, 0.7, seed=0)``, which the benchmark CLIP never saw) and is
  tested on its test split with the template ensemble of its own classes.
- :func:`mtil_tasks`: the real MTIL stream (ZSCL's 11 datasets, Orders I and II) from the specs in
  ``hf_cft/data/resources/mtil.json``, loaded by Hub id (needs the Hub or a local cache).
- :func:`class_split_tasks`: one dataset cut into tasks of disjoint classes (the offline digits demo).

A task's datasets are either raw (``image``/``label`` columns; the runner applies the model's transform, with a
fresh seeded augmentation per task so that runs repeat) or already model-ready (rows with ``pixel_values`` and
``labels``), in which case they are used as given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hf_cft.data.templates import validate_classnames, validate_templates
from hf_cft.errors import ContinualError

# MTIL (ZSCL) orders by their names in hf_cft/data/resources/mtil.json.
MTIL_ORDERS = {"I": "order_i", "II": "order_ii"}

# docs/benchmarks.md, Protocol B.
MTIL_MINI_ORDERS = {
    "I": ("aid30", "caltech101", "cifar10", "dtd10", "flowers5", "gtsrb", "mnist", "stanford_cars"),
    "II": ("stanford_cars", "mnist", "flowers5", "aid30", "gtsrb", "cifar10", "dtd10", "caltech101"),
}


@dataclass
class TaskSpec:
    """One task of a stream.

    Args:
        name: unique name in the stream (a matrix column, a checkpoint key).
        train: training data (``datasets.Dataset``; raw image/label rows or model-ready rows).
        test: evaluation data (same convention).
        classnames: class names in label order (the task's own label space).
        templates: prompt templates; training uses the first (or all, per config), evaluation all of them.
        meta: free JSON-able description (source, pool, shots) recorded in the outputs.

    Example::

        task = TaskSpec("dtd10", ds["train"], ds["test"], ds.classnames, ds.templates)
    """

    name: str
    train: object
    test: object
    classnames: Sequence[str]
    templates: Sequence[str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ContinualError(f"a task name must be a non-empty string, got {self.name!r}")
        self.classnames = validate_classnames(self.classnames, owner=f"task {self.name!r}")
        self.templates = validate_templates(self.templates, owner=f"task {self.name!r}")
        for split in ("train", "test"):
            data = getattr(self, split)
            if data is None or len(data) == 0:
                raise ContinualError(f"task {self.name!r} has an empty {split} dataset")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def fingerprint(self) -> str:
        """Hash of what identifies the task's data and label space (names, templates, sizes, dataset fingerprints);
        a resumed run must see the same."""
        h = hashlib.blake2b(digest_size=12)
        parts = [self.name, *self.classnames, "|", *self.templates, str(len(self.train)), str(len(self.test))]
        parts += [str(getattr(d, "_fingerprint", "")) for d in (self.train, self.test)]
        h.update("\x1f".join(parts).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "templates": len(self.templates),
            **self.meta,
        }


def validate_tasks(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    """A non-empty list of TaskSpecs with unique names, else :class:`ContinualError` naming the problem."""
    tasks = list(tasks)
    if not tasks:
        raise ContinualError("the task stream is empty: give at least one TaskSpec")
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if not isinstance(t, TaskSpec):
            raise ContinualError(f"task #{i} is a {type(t).__name__}, not a TaskSpec")
        if t.name in seen:
            raise ContinualError(
                f"task name {t.name!r} appears twice in the stream (positions {seen[t.name]} and {i})"
            )
        seen[t.name] = i
    return tasks


def class_split_tasks(dataset, groups: Sequence[Sequence[int]], name: str | None = None) -> list[TaskSpec]:
    """Cut a :class:`~hf_cft.data.ClassificationDataset` into tasks of disjoint classes, each relabelled from 0.

    ``groups`` lists the class ids of each task, e.g. ``[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]`` for the digits.
    Task names are ``<name>-<first id>-<last id>``.
    """
    from hf_cft.data.sampling import select_classes

    name = name or dataset.name
    flat = [int(c) for g in groups for c in g]
    if not groups or any(len(g) == 0 for g in groups):
        raise ContinualError(f"class_split_tasks({name!r}): every task needs at least one class")
    if len(set(flat)) != len(flat):
        raise ContinualError(f"class_split_tasks({name!r}): the class groups overlap: {groups}")
    bad = [c for c in flat if not 0 <= c < dataset.num_classes]
    if bad:
        raise ContinualError(f"class_split_tasks({name!r}): class id(s) {bad} outside 0..{dataset.num_classes - 1}")
    tasks = []
    for g in groups:
        ids = [int(c) for c in g]
        tasks.append(
            TaskSpec(
                name=f"{name}-{ids[0]}-{ids[-1]}" if len(ids) > 1 else f"{name}-{ids[0]}",
                train=select_classes(dataset["train"], ids),
                test=select_classes(dataset["test"], ids),
                classnames=[dataset.classnames[c] for c in ids],
                templates=dataset.templates,
                meta={"source": name, "class_ids": ids},
            )
        )
    return tasks


def mtil_mini_tasks(
    order: str | Sequence[str] = "I",
    data_dir: str | None = None,
    pretrain_fraction: float = 0.7,
    shots: int = 0,
    shot_seed: int = 0,
    max_test: int | None = None,
) -> list[TaskSpec]:
    """The MTIL-mini stream (``docs/benchmarks.md`` Protocol B) over the shared datasets.

    ``order`` is ``"I"``, ``"II"`` or an explicit list of dataset names. Training data = the downstream pool (the
    complement of ``split_per_class(train, pretrain_fraction, seed=0)``); with ``shots`` > 0, that many images per
    class drawn from the pool (seed ``shot_seed``), the 5-shot variant. ``max_test`` keeps a fixed, class-balanced
    prefix of each test split (the splits are stored shuffled) for quick runs; ``None`` keeps all of it.
    """
    from hf_cft.data import few_shot, load_classification_dataset, split_per_class

    names = MTIL_MINI_ORDERS.get(order) if isinstance(order, str) else tuple(order)
    if names is None:
        raise ContinualError(f"unknown MTIL-mini order {order!r}; known: {sorted(MTIL_MINI_ORDERS)}")
    tasks = []
    for n in names:
        ds = load_classification_dataset(n, data_dir=data_dir)
        if "train" not in ds or "test" not in ds:
            raise ContinualError(f"dataset {n!r} needs train and test splits, it has {list(ds.splits)}")
        _, pool = split_per_class(ds["train"], pretrain_fraction, seed=0)
        meta = {"source": n, "train_pool": f"downstream {1 - pretrain_fraction:.0%} of train (seed 0)"}
        if shots:
            pool = few_shot(pool, shots, seed=shot_seed, on_short="take_all", name=n)
            meta.update(shots=shots, shot_seed=shot_seed)
        test = ds["test"]
        if max_test is not None and len(test) > max_test:
            test = test.select(range(max_test))
            meta["test_subset"] = f"first {max_test} rows of the shuffled test split"
        tasks.append(TaskSpec(n, pool, test, ds.classnames, ds.templates, meta))
    return tasks


def mtil_tasks(
    order: str | Sequence[str] = "I",
    shots: int = 0,
    shot_seed: int = 0,
    max_test: int | None = None,
    test_seed: int = 0,
    loader: Callable[[str], object] | None = None,
) -> list[TaskSpec]:
    """The real MTIL stream (ZSCL; ``docs/methods/condu.md`` §10) built from the 11 dataset specs of
    ``hf_cft/data/resources/mtil.json``, each loaded by its Hub id.

    Args:
        order: ``"I"`` / ``"II"`` (or ``"order_i"`` / ``"order_ii"``), or an explicit list of MTIL dataset names
            (``aircraft``, ``caltech101``, ... see ``hf_cft.data.list_specs("mtil")``).
        shots: 0 trains on the whole train split (MTIL); > 0 takes that many images per class from it (seed
            ``shot_seed``), the few-shot (5-shot) variant.
        max_test: keep a seeded random subset of that many test rows per dataset (quick runs; Hub test splits are
            often sorted by class, so a prefix would not do); ``None`` keeps all of it.
        test_seed: the seed of that subset.
        loader: ``loader(name) -> ClassificationDataset`` with ``train`` and ``test`` splits; default
            ``load_classification_dataset("mtil/<name>")`` (the spec's Hub id, label names mapped to the spec's).

    Class names and templates are the spec's (ZSCL's); evaluation ensembles all templates, training uses the
    first. The Hub splits differ from ZSCL's for some datasets (ZSCL re-splits caltech101, eurosat and sun397 at
    random; see each spec's ``notes``), so numbers are close to, not identical with, published MTIL tables.

    Example::

        tasks = mtil_tasks("II", shots=5)  # needs the Hub (or a filled cache)
    """
    from hf_cft.data import few_shot, get_spec, list_specs
    from hf_cft.data.specs import benchmark_order

    if isinstance(order, str):
        key = MTIL_ORDERS.get(order, order)
        if key not in MTIL_ORDERS.values():
            raise ContinualError(f"unknown MTIL order {order!r}; known: {sorted(MTIL_ORDERS)} (or a list of names)")
        names = benchmark_order("mtil", key)
    else:
        names = tuple(order)
    known = [n.split("/", 1)[1] for n in list_specs("mtil")]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ContinualError(f"unknown MTIL dataset(s) {unknown}; known: {known}")
    if not names:
        raise ContinualError("the MTIL stream is empty: give at least one dataset")
    if loader is None:
        from hf_cft.data import load_classification_dataset

        def loader(n):
            return load_classification_dataset(f"mtil/{n}")

    tasks = []
    for n in names:
        spec = get_spec(f"mtil/{n}")
        ds = loader(n)
        splits = list(ds.splits) if hasattr(ds, "splits") else []
        if "train" not in ds or "test" not in ds:
            raise ContinualError(f"MTIL dataset {n!r} needs train and test splits, it has {splits}")
        if list(ds.classnames) != list(spec.classnames):
            raise ContinualError(
                f"MTIL dataset {n!r} was loaded with {len(ds.classnames)} class names that differ from its spec's "
                f"{spec.num_classes} (labels must be mapped to the spec's order)"
            )
        train, test = ds["train"], ds["test"]
        meta = {"source": f"mtil/{n}", "hub_id": spec.hub_id, "train_pool": "whole train split"}
        if shots:
            train = few_shot(train, shots, seed=shot_seed, on_short="take_all", name=n)
            meta.update(shots=shots, shot_seed=shot_seed)
        if max_test is not None and len(test) > max_test:
            test = test.shuffle(seed=test_seed).select(range(max_test))
            meta["test_subset"] = f"{max_test} random test rows (seed {test_seed})"
        tasks.append(TaskSpec(n, train, test, spec.classnames, spec.templates, meta))
    return tasks
