"""Run a declarative merge end to end: resolve the base model and the inputs (local folders or Hub ids, through
``huggingface_hub.snapshot_download``), merge them key by key (:mod:`hf_cft.merging.streaming`), and write the
output with its merge card (``README.md``, ``model_cards/merge.md``), the resolved config (``merge.yaml``, which
``hf-cft merge --config`` takes back) and ``merge_config.json``. ``hf-cft push --artefact OUT --repo_id ID`` then
uploads the folder with its card.

Example::

    from hf_cft.hub import run_merge

    run_merge("merge.yaml", "merged")                            # or a MergeConfig, or a dict
    run_merge(config, "merged", results=[{"name": "dtd", "accuracy": 61.2}])   # rows for the card

RegMean and Fisher merging (``method.calibration``) run θ⁰ + each input's delta on that input's own task data,
named per input in the config (``inputs[t].calibration``; rows, batch size and seed in the top-level
``calibration`` section): :func:`calibration_extra` loads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_cft.errors import MergeConfigError

__all__ = ["run_merge"]


def _overlap(out: Path, named: Mapping[str, str]) -> None:
    o = out.resolve()
    for field_name, value in named.items():
        if not Path(value).exists():
            continue  # a Hub id: never a local folder to harm
        i = Path(value).resolve()
        if o == i or i in o.parents or o in i.parents:
            raise MergeConfigError(
                f"The output {str(out)!r} overlaps {field_name} {value!r}: writing there would destroy an input."
            )


def _why_not_fetched(exc: BaseException, revision: str | None) -> str:
    """A few words on why :func:`~hf_cft.hub.push.snapshot` found no folder and fetched nothing."""
    import huggingface_hub.errors as hub_errors
    from huggingface_hub import constants

    cause = exc.__cause__
    if cause is None:
        return "no such folder"
    if isinstance(cause, hub_errors.HFValidationError):
        return "no such folder, and not a valid Hub repo id"
    if isinstance(cause, hub_errors.GatedRepoError):
        return "a gated Hub repo: accept its terms and log in (hf auth login)"
    if isinstance(cause, hub_errors.RepositoryNotFoundError):
        return "no such folder, and no such model repo on the Hub (or no access to it)"
    if isinstance(cause, hub_errors.RevisionNotFoundError):
        return f"the Hub repo has no revision {revision!r}"
    if isinstance(cause, hub_errors.LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return "no such folder; offline (HF_HUB_OFFLINE) and not in the local Hub cache"
        return "no such folder; the Hub could not be reached and it is not in the local Hub cache"
    return f"{type(cause).__name__}"


def fetch_model(value: str, revision: str | None, field_name: str) -> Path:
    """``value`` as a local folder, else its Hub snapshot; a one-line :class:`~hf_cft.errors.HubError` naming
    ``field_name`` (``inputs[1].model``, ``--adapters entry 2``) when it is neither a folder nor a fetchable Hub id."""
    from hf_cft.errors import HubError
    from hf_cft.hub.push import snapshot

    try:
        return snapshot(value, revision=revision)
    except HubError as exc:
        raise HubError(
            f"{field_name} {value!r} is neither a local folder nor a Hub id that could be fetched "
            f"({_why_not_fetched(exc, revision)})."
        ) from exc


def calibration_extra(
    method, resolved: Mapping[str, Any], base_folder: Path, field_names: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What a data-dependent method (``method.calibration``) gets in ``ModelContext.extra`` from a resolved merge
    config: θ⁰ loaded once, each input's :func:`~hf_cft.merging.data_dependent.load_calibration` (its own dataset,
    the seeded rows, θ⁰'s image preprocessing), θ⁰'s tokenizer with each dataset's class names and templates when
    the method needs a zero-shot head; and per input what was used (for the card). Errors name the config's fields
    (or what ``field_names`` maps them to)."""
    from hf_cft.data.transforms import model_transform
    from hf_cft.hub.push import load_model
    from hf_cft.merging.data_dependent import load_calibration

    names = dict(field_names or {})

    def name(field_name: str) -> str:
        return names.get(field_name, field_name)

    top = resolved["calibration"]
    model = load_model(base_folder)
    transform = model_transform(model)
    data = []
    for t, row in enumerate(resolved["inputs"]):
        own = row["calibration"]
        where = f"inputs[{t}].calibration"
        data.append(
            load_calibration(
                own["data"],
                transform,
                rows=top["rows"],
                batch_size=top["batch_size"],
                seed=top["seed"],
                split=own["split"],
                data_dir=top.get("data_dir"),
                classnames=own.get("classnames"),
                templates=own.get("templates", top.get("templates")),
                where=name(f"{where}.data"),
                rows_where=name("calibration.rows"),
                split_where=name(f"{where}.split"),
                batch_size_where=name("calibration.batch_size"),
                classnames_where=name(f"{where}.classnames"),
                templates_where=name(f"{where}.templates" if "templates" in own else "calibration.templates"),
            )
        )
    extra: dict[str, Any] = {
        "model": model,
        "calibration": data,
        "input_names": [
            f"{name(f'inputs[{t}].calibration.data')} {row['calibration']['data']!r}"
            for t, row in enumerate(resolved["inputs"])
        ],
    }
    if "classes" in method.calibration:
        from hf_cft.models.tokenizer import load_tokenizer

        extra["tokenizer"] = load_tokenizer(base_folder)
        extra["classnames"] = [d.classnames for d in data]
        extra["templates"] = [d.templates for d in data]
    return extra, [d.describe() for d in data]


def run_merge(
    config,
    out: str | os.PathLike,
    *,
    results: Sequence[Mapping[str, Any]] = (),
    results_note: str = "",
    repo_id: str | None = None,
    field_names: Mapping[str, str] | None = None,
) -> Path:
    """Merge as ``config`` says (a :class:`~hf_cft.merging.config.MergeConfig`, a mapping, or a YAML file) into the
    folder ``out`` (replaced atomically). ``results``: evaluation rows for the card (``{"name", "accuracy"}``).
    Returns ``out``. Bad fields raise :class:`~hf_cft.errors.MergeConfigError` naming them; an input that cannot be
    fetched raises :class:`~hf_cft.errors.HubError` naming its field (``base_model``, ``inputs[1].model``, or what
    ``field_names`` maps those to, e.g. the command line's flags)."""
    import yaml

    from hf_cft.hub.cards import merge_card, validate_card
    from hf_cft.merging.config import MergeConfig
    from hf_cft.merging.registry import get_method
    from hf_cft.merging.streaming import merge_folders

    if isinstance(config, (str, os.PathLike)):
        config = MergeConfig.from_yaml(config)
    config = MergeConfig.from_dict(config)
    resolved = config.resolve()
    out = Path(out)
    named = {"base_model": config.base_model, **{f"inputs[{t}].model": i.model for t, i in enumerate(config.inputs)}}
    _overlap(out, named)
    names = dict(field_names or {})
    base = fetch_model(config.base_model, config.base_revision, names.get("base_model", "base_model"))
    folders = [
        fetch_model(i.model, i.revision, names.get(f"inputs[{t}].model", f"inputs[{t}].model"))
        for t, i in enumerate(config.inputs)
    ]
    kinds = ["LoRA adapter" if (f / "adapter_config.json").is_file() else "full model" for f in folders]
    method = get_method(resolved["method"])
    extra, calibration = calibration_extra(method, resolved, base, names) if method.calibration else ({}, [])
    card = merge_card(
        resolved,
        calibration=calibration,
        input_kinds=kinds,
        model_name=config.model_name or out.resolve().name,
        results=results,
        results_note=results_note,
        repo_id=repo_id,
        license=config.license,
    )
    validate_card(card)
    legacy = {  # what hf-cft eval reads to label a merged model, plus the resolved config
        "method": resolved["method"],
        "base": config.base_model,
        "adapters": [i.model for i in config.inputs],
        **resolved,
    }
    weights = [row.get("weight") for row in resolved["inputs"]]
    if weights and None not in weights:  # the flag form's --lam, under its old key (scripts read it)
        legacy["lam"] = weights[0] if len(set(weights)) == 1 else weights
    summary = merge_folders(
        base,
        folders,
        resolved["method"],
        resolved["parameters"],
        out=out,
        inputs=config.per_input_options(),
        out_dtype=config.out_dtype,
        max_shard_size=config.max_shard_size,
        lora_rank=config.lora_rank,
        source_names=[i.model for i in config.inputs],
        extra=extra,
        extra_files={
            "README.md": str(card).encode("utf-8"),
            "merge.yaml": yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True).encode("utf-8"),
            "merge_config.json": (json.dumps(legacy, indent=2) + "\n").encode("utf-8"),
        },
    )
    run_merge.last_summary = summary  # keys merged and files written, for the command line's report line
    return out
