"""Dataset specifications: class names, prompt templates and where to find the data.

Two benchmark families ship as JSON resources (see ``scripts/build_dataset_specs.py`` for provenance):

- ``mtil/<name>``: the 11 MTIL datasets with ZSCL's class names and templates, plus Orders I and II;
- ``base_to_novel/<name>``: the 11 base-to-novel datasets of CoOp/CoCoOp with CoOp's templates.

Local folders (a Parquet folder with a ``meta.json``, such as ``../shared/data/<name>``) carry their own
class names and templates and need no spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from hf_cft.data.templates import validate_classnames, validate_templates
from hf_cft.errors import UnknownDatasetError

BENCHMARKS = ("mtil", "base_to_novel")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to build prompts for, and to find, one image-classification dataset."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    benchmark: str = ""
    display_name: str = ""
    hub_id: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    image_column: str = "image"
    label_column: str = "label"
    hub_label_names: tuple[str, ...] | None = None
    source_label_names: tuple[str, ...] | None = None
    notes: str = ""

    @property
    def qualified_name(self) -> str:
        return f"{self.benchmark}/{self.name}" if self.benchmark else self.name

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __post_init__(self):
        validate_classnames(self.classnames, owner=f"dataset {self.qualified_name!r}", duplicates="ignore")
        validate_templates(self.templates, owner=f"dataset {self.qualified_name!r}")


def _from_json_entry(benchmark: str, name: str, entry: dict) -> DatasetSpec:
    label_names = entry.get("hub_label_names")
    source_names = entry.get("source_label_names")
    return DatasetSpec(
        name=name,
        benchmark=benchmark,
        classnames=tuple(entry["classnames"]),
        templates=tuple(entry["templates"]),
        display_name=entry.get("display_name", name),
        hub_id=entry.get("hub_id"),
        hub_config=entry.get("hub_config"),
        hub_splits=dict(entry.get("hub_splits") or {"train": "train", "test": "test"}),
        image_column=entry.get("image_column") or "image",
        label_column=entry.get("label_column") or "label",
        hub_label_names=tuple(label_names) if label_names else None,
        source_label_names=tuple(source_names) if source_names else None,
        notes=entry.get("notes", ""),
    )


@cache
def _load_benchmark(benchmark: str) -> tuple[dict[str, DatasetSpec], dict[str, tuple[str, ...]]]:
    text = resources.files("hf_cft.data").joinpath("resources", f"{benchmark}.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    specs = {name: _from_json_entry(benchmark, name, entry) for name, entry in raw["datasets"].items()}
    orders = {k: tuple(v) for k, v in (raw.get("orders") or {}).items()}
    return specs, orders


def list_specs(benchmark: str | None = None) -> list[str]:
    """Qualified names (``benchmark/name``) of every registered spec, optionally of one benchmark."""
    out = []
    for b in BENCHMARKS if benchmark is None else (benchmark,):
        out += [f"{b}/{n}" for n in _load_benchmark(b)[0]]
    return out


def benchmark_order(benchmark: str, order: str) -> tuple[str, ...]:
    """A task order of a benchmark, e.g. ``benchmark_order("mtil", "order_i")``."""
    orders = _load_benchmark(benchmark)[1]
    if order not in orders:
        raise UnknownDatasetError(f"{benchmark}:{order}", known=[f"{benchmark}:{o}" for o in orders])
    return orders[order]


def get_spec(name: str) -> DatasetSpec:
    """Look up a spec by qualified name (``mtil/dtd``) or by plain name when it is unambiguous."""
    if "/" in name:
        benchmark, _, short = name.partition("/")
        if benchmark in BENCHMARKS:
            specs = _load_benchmark(benchmark)[0]
            if short in specs:
                return specs[short]
        raise UnknownDatasetError(name, known=list_specs())
    matches = [s for b in BENCHMARKS for n, s in _load_benchmark(b)[0].items() if n == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UnknownDatasetError(
            name, hint="The name is ambiguous; use one of " + ", ".join(m.qualified_name for m in matches) + "."
        )
    raise UnknownDatasetError(name, known=list_specs())


def has_spec(name: str) -> bool:
    try:
        get_spec(name)
    except UnknownDatasetError:
        return False
    return True
