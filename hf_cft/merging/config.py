"""Declarative merges: the schema of ``merge.yaml`` (``hf-cft merge --config merge.yaml``) and of its Python form.

A merge config names θ⁰, the inputs and the method; every field is checked where it enters, and a bad one raises
:class:`~hf_cft.errors.MergeConfigError` naming it (``inputs[1].density``, ``parameters.trim_scope``,
``out_dtype``). The *resolved* config (every default filled in, per-input options spelled out per input) is what
:func:`hf_cft.hub.run_merge` writes beside the output (``merge.yaml``) and into the merge card; fed back to
``hf-cft merge --config``, it reproduces the merge.

.. code-block:: yaml

    base_model: openai/clip-vit-base-patch16     # a model folder or a Hub id
    method: ties                                 # any name of hf_cft.merging.registry (hf-cft merge --help)
    parameters:                                  # the method's options; per-input ones are defaults here
      density: 0.2
      merge: mean
    inputs:                                      # full-model folders, LoRA adapter folders, Hub ids
      - model: out/lora_dtd
        weight: 1.0
      - model: me/clip-eurosat-ft                # a Hub id (revision: optional)
        weight: 0.7
        density: 0.3
        parameters: {}                           # any other per-input option of the method
        calibration: eurosat                     # regmean / fisher: this input's OWN task data (a dataset folder,
                                                 # a shared dataset name or a Hub dataset id; or a mapping with
                                                 # data, split, classnames, templates)
    calibration:                                 # regmean / fisher only: how each input's data is sampled
      rows: 256                                  # rows drawn (seeded) from each input's split
      batch_size: 32
      seed: 0
      split: train                               # default split of every input
      data_dir: null                             # where dataset names are looked up (default: ../shared/data)
      templates: null                            # Fisher's zero-shot head (default: each dataset's own)
    out_dtype: bfloat16                          # float32 | float16 | bfloat16 | null (θ⁰'s dtype per tensor)
    max_shard_size: 2GB                          # bytes or a size: 500MB, 2GB, 1GiB
    lora_rank: null                              # an int: write a LoRA adapter (LoRA inputs only)
    model_name: clip-ties-dtd-eurosat            # card only (default: the output folder's name)

Python::

    from hf_cft.merging.config import MergeConfig, MergeInput

    config = MergeConfig(base_model="clip", method="ties", parameters={"density": 0.2},
                         inputs=[MergeInput("out/lora_dtd"), MergeInput("out/ft_eurosat", weight=0.7)])
    config = MergeConfig.from_yaml("merge.yaml")        # or MergeConfig.from_dict({...})
    resolved = config.resolve()                          # validated dict, defaults filled
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hf_cft.errors import MergeConfigError

__all__ = ["MergeConfig", "MergeInput"]

#: Per-input fields with a name of their own (every other per-input option goes under ``parameters``).
INPUT_OPTIONS = ("weight", "density")
#: Fields of the top-level ``calibration`` section (the sampling shared by every input) and of an input's own.
CALIBRATION_FIELDS = ("rows", "batch_size", "seed", "split", "data_dir", "templates")
INPUT_CALIBRATION_FIELDS = ("data", "split", "classnames", "templates")


def _str(value: Any, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MergeConfigError(f"{where} must be a non-empty string, got {value!r}.")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MergeConfigError(f"{where} must be a mapping of option names to values, got {value!r}.")
    for key in value:
        if not isinstance(key, str):
            raise MergeConfigError(f"{where} has a key that is not a string: {key!r}.")
    return dict(value)


def _strings(value: Any, where: str, what: str) -> list[str]:
    """A non-empty list of strings (class names, templates), checked as the data layer checks them."""
    from hf_cft.data.templates import validate_classnames, validate_templates
    from hf_cft.errors import HfCftError

    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise MergeConfigError(f"{where} must be a list of {what}, got {value!r}.")
    try:
        if what == "templates":
            return validate_templates(list(value), owner=where)
        return validate_classnames(list(value), owner=where, duplicates="error")
    except HfCftError as exc:
        raise MergeConfigError(f"{where}: {exc}") from exc


def _resolve_calibration(method, top: dict[str, Any], given: list[Any]) -> tuple[dict | None, list[dict | None]]:
    """The resolved ``calibration`` section and each input's own (``None`` for a method that takes none)."""
    from hf_cft.merging.registry import methods
    from hf_cft.validation import check_int

    if not method.calibration:
        takers = ", ".join(n for n, m in methods().items() if m.calibration) or "none"
        if top:
            raise MergeConfigError(
                f"calibration: method {method.name!r} uses no calibration data (only {takers} do); remove the section."
            )
        for t, c in enumerate(given):
            if c is not None:
                raise MergeConfigError(
                    f"inputs[{t}].calibration: method {method.name!r} uses no calibration data (only {takers} do)."
                )
        return None, [None] * len(given)
    for key in top:
        if key == "data":
            raise MergeConfigError(
                f"calibration.data: method {method.name!r} gathers each input's statistics on that input's own task "
                "data (its paper's definition), not on one set for all: name each input's dataset as "
                "inputs[t].calibration (e.g. `calibration: dtd10`)."
            )
        if key not in CALIBRATION_FIELDS:
            raise MergeConfigError(
                f"calibration.{key} is not a field of the calibration section; known fields: "
                f"{', '.join(CALIBRATION_FIELDS)}."
            )
    from hf_cft.merging.data_dependent import CALIBRATION_DEFAULTS as D

    resolved: dict[str, Any] = {
        "rows": check_int(top.get("rows", D["rows"]), "calibration.rows", low=1, error=MergeConfigError),
        "batch_size": check_int(
            top.get("batch_size", D["batch_size"]), "calibration.batch_size", low=1, error=MergeConfigError
        ),
        "seed": check_int(top.get("seed", D["seed"]), "calibration.seed", low=0, error=MergeConfigError),
        "split": _str(top.get("split", D["split"]), "calibration.split"),
    }
    if top.get("data_dir") is not None:
        resolved["data_dir"] = _str(_path_str(top["data_dir"]), "calibration.data_dir")
    if top.get("templates") is not None:
        resolved["templates"] = _strings(top["templates"], "calibration.templates", "templates")
    per: list[dict | None] = []
    for t, c in enumerate(given):
        where = f"inputs[{t}].calibration"
        if c is None:
            raise MergeConfigError(
                f"{where} is required by method {method.name!r}: each input's statistics are gathered on its own "
                "task's data; name a dataset folder (Parquet or ImageFolder), a shared dataset name or a Hub dataset "
                "id, e.g. `calibration: dtd10`."
            )
        if isinstance(c, (str, os.PathLike)):
            c = {"data": c}
        c = _mapping(c, where)
        for key in c:
            if key not in INPUT_CALIBRATION_FIELDS:
                raise MergeConfigError(
                    f"{where}.{key} is not a field of an input's calibration; known fields: "
                    f"{', '.join(INPUT_CALIBRATION_FIELDS)} (rows, batch_size, seed: in the top-level calibration)."
                )
        if c.get("data") is None:
            raise MergeConfigError(
                f"{where}.data is required by method {method.name!r}: this input's own task data (a dataset folder, a "
                "shared dataset name or a Hub dataset id)."
            )
        row: dict[str, Any] = {
            "data": _str(_path_str(c["data"]), f"{where}.data"),
            "split": _str(c.get("split", resolved["split"]), f"{where}.split"),
        }
        if c.get("classnames") is not None:
            if "classes" not in method.calibration:
                raise MergeConfigError(f"{where}.classnames: method {method.name!r} uses no class names.")
            row["classnames"] = _strings(c["classnames"], f"{where}.classnames", "class names")
        if c.get("templates") is not None:
            if "classes" not in method.calibration:
                raise MergeConfigError(f"{where}.templates: method {method.name!r} uses no prompt templates.")
            row["templates"] = _strings(c["templates"], f"{where}.templates", "templates")
        per.append(row)
    if "templates" in resolved and "classes" not in method.calibration:
        raise MergeConfigError(f"calibration.templates: method {method.name!r} uses no prompt templates.")
    return resolved, per


def _path_str(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _known(data: Mapping, cls, where: str) -> None:
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise MergeConfigError(
                f"{where}{key} is not a field of a merge config{' input' if where else ''}; "
                f"known fields: {', '.join(names)}."
            )


@dataclass
class MergeInput:
    """One input of a merge: ``model`` (a full-model folder, a LoRA adapter folder or a Hub id, with an optional
    ``revision``), its ``weight`` and ``density`` (when the method has them) and any other per-input option of
    the method under ``parameters``; ``name`` labels it in the card (default: ``model``). ``calibration``: for a
    data-dependent method (RegMean, Fisher), this input's own task data: a dataset (folder, shared name or Hub id)
    or a mapping ``{data, split, classnames, templates}``."""

    model: str
    weight: float | None = None
    density: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    name: str | None = None
    calibration: str | dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> MergeInput:
        if isinstance(data, (str, os.PathLike)):
            data = {"model": os.fspath(data)}
        if not isinstance(data, Mapping):
            raise MergeConfigError(f"{where} must be a mapping with a 'model' (or a path / Hub id), got {data!r}.")
        _known(data, cls, f"{where}.")
        if "model" not in data:
            raise MergeConfigError(f"{where}.model is required (a model folder, a LoRA adapter folder or a Hub id).")
        return cls(
            model=_str(
                os.fspath(data["model"]) if isinstance(data["model"], os.PathLike) else data["model"], f"{where}.model"
            ),
            weight=data.get("weight"),
            density=data.get("density"),
            parameters=_mapping(data.get("parameters"), f"{where}.parameters"),
            revision=_str(data.get("revision"), f"{where}.revision", optional=True),
            name=_str(data.get("name"), f"{where}.name", optional=True),
            calibration=_path_str(data.get("calibration")),
        )

    def options(self, where: str) -> dict[str, Any]:
        """The per-input options given (``weight`` / ``density`` / ``parameters``), each named once."""
        out = dict(self.parameters)
        for key in INPUT_OPTIONS:
            value = getattr(self, key)
            if value is None:
                continue
            if key in out:
                raise MergeConfigError(f"{where}.{key} is given twice (also as {where}.parameters.{key}).")
            out[key] = value
        return out


@dataclass
class MergeConfig:
    """A declarative merge (see the module docstring for every field)."""

    base_model: str
    method: str
    inputs: list[MergeInput]
    parameters: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    out_dtype: str | None = None
    max_shard_size: int | str = "5GB"
    lora_rank: int | None = None
    base_revision: str | None = None
    model_name: str | None = None
    license: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> MergeConfig:
        """A config from a mapping (a parsed YAML/JSON file), every field checked."""
        if isinstance(data, MergeConfig):
            return data
        if not isinstance(data, Mapping):
            raise MergeConfigError(f"A merge config must be a mapping of fields, got {type(data).__name__}.")
        _known(data, cls, "")
        for required in ("base_model", "method", "inputs"):
            if required not in data:
                raise MergeConfigError(f"{required} is required in a merge config.")
        raw_inputs = data["inputs"]
        if isinstance(raw_inputs, (str, bytes, Mapping)) or not isinstance(raw_inputs, (list, tuple)):
            raise MergeConfigError(f"inputs must be a list of inputs, got {raw_inputs!r}.")
        if not raw_inputs:
            raise MergeConfigError("inputs is empty: a merge needs at least one input.")
        config = cls(
            base_model=_str(
                os.fspath(data["base_model"]) if isinstance(data["base_model"], os.PathLike) else data["base_model"],
                "base_model",
            ),
            method=_str(data["method"], "method"),
            inputs=[MergeInput.from_dict(x, f"inputs[{i}]") for i, x in enumerate(raw_inputs)],
            parameters=_mapping(data.get("parameters"), "parameters"),
            calibration=_mapping(data.get("calibration"), "calibration"),
            out_dtype=data.get("out_dtype"),
            max_shard_size=data.get("max_shard_size", "5GB"),
            lora_rank=data.get("lora_rank"),
            base_revision=_str(data.get("base_revision"), "base_revision", optional=True),
            model_name=_str(data.get("model_name"), "model_name", optional=True),
            license=_str(data.get("license"), "license", optional=True),
        )
        config.resolve()  # every field checked now, not halfway through a merge
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MergeConfig:
        """A config from a YAML (or JSON) file; :class:`MergeConfigError` naming the file when it does not parse."""
        import yaml

        file = Path(path)
        if file.is_dir():
            raise MergeConfigError(f"--config: merge config {str(file)!r} is a folder, not a YAML file.")
        if not file.is_file():
            raise MergeConfigError(f"--config: merge config {str(file)!r} does not exist.")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise MergeConfigError(
                f"merge config {str(file)!r} is not valid YAML: {' '.join(str(exc).split())}"
            ) from exc
        return cls.from_dict(data)

    def resolve(self) -> dict[str, Any]:
        """The validated config with every default filled: ``parameters`` holds the method-level options, each
        input its per-input options (``weight`` / ``density`` as fields, the rest under ``parameters``)."""
        from hf_cft.merging.registry import get_method
        from hf_cft.merging.streaming import OUT_DTYPES, parse_size
        from hf_cft.validation import check_int

        method = get_method(self.method, "method")
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise MergeConfigError(
                f"out_dtype must be one of {', '.join(OUT_DTYPES)} or null, got {self.out_dtype!r}."
            )
        parse_size(self.max_shard_size, "max_shard_size")
        if self.lora_rank is not None:
            check_int(self.lora_rank, "lora_rank", low=1, error=MergeConfigError)
        given = [inp.options(f"inputs[{t}]") for t, inp in enumerate(self.inputs)]

        def input_where(t: int, name: str) -> str:
            return f"inputs[{t}].{name}" if name in INPUT_OPTIONS else f"inputs[{t}].parameters.{name}"

        options, per_input = method.resolve(self.parameters, given, "parameters", input_where)
        calibration, own = _resolve_calibration(
            method, _mapping(self.calibration, "calibration"), [inp.calibration for inp in self.inputs]
        )
        inputs = []
        for inp, opts, data in zip(self.inputs, per_input, own):
            row: dict[str, Any] = {"model": inp.model}
            if inp.revision is not None:
                row["revision"] = inp.revision
            if inp.name is not None:
                row["name"] = inp.name
            row.update({k: opts[k] for k in INPUT_OPTIONS if k in opts})
            rest = {k: v for k, v in opts.items() if k not in INPUT_OPTIONS}
            if rest:
                row["parameters"] = rest
            if data is not None:
                row["calibration"] = data
            inputs.append(row)
        resolved: dict[str, Any] = {"base_model": self.base_model}
        if self.base_revision is not None:
            resolved["base_revision"] = self.base_revision
        resolved.update(
            {
                "method": method.name,
                "parameters": options,
                **({"calibration": calibration} if calibration is not None else {}),
                "inputs": inputs,
                "out_dtype": self.out_dtype,
                "max_shard_size": self.max_shard_size,
                "lora_rank": self.lora_rank,
            }
        )
        for key in ("model_name", "license"):
            if getattr(self, key) is not None:
                resolved[key] = getattr(self, key)
        return resolved

    def per_input_options(self) -> list[dict[str, Any]]:
        """Each input's per-input options as the method's function gets them (after :meth:`resolve`)."""
        return [
            {**{k: row[k] for k in INPUT_OPTIONS if k in row}, **row.get("parameters", {})}
            for row in self.resolve()["inputs"]
        ]
