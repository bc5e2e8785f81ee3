"""Model cards for every hf_cft artefact, rendered from the Jinja templates in ``model_cards/`` through
``huggingface_hub.ModelCard`` / ``ModelCardData``, with evaluation results in the Hub's formats.

One card function per artefact kind (every artefact is pushed with a model card that carries its evaluation
results; ``docs/hub.md``):

- :func:`adapter_card` — a PEFT adapter (CoOp, VPT, linear head, LoRA), ``model_cards/adapter.md``;
- :func:`finetuned_model_card` — a fully fine-tuned CLIP-like model, ``model_cards/finetuned_model.md``;
- :func:`mergetune_card` — a MergeTune continued model (a PEFT adapter or a full model), ``model_cards/mergetune.md``;
- :func:`condu_card` — a ConDU bundle (:class:`~hf_cft.merging.DeltaFusionMerger`), ``model_cards/condu_bundle.md``;
- :func:`pam_card` — a PAM global adapter (:class:`~hf_cft.merging.PAMState`), ``model_cards/pam_global_adapter.md``.

Every card's YAML front matter carries ``library_name``, ``pipeline_tag: zero-shot-image-classification``,
``base_model`` (+ ``base_model_relation``), ``tags``, ``datasets`` (Hub ids when known) and the legacy
``model-index`` (one entry per split or dataset, metric ``accuracy`` in %, plus HM for MergeTune or Transfer /
Average / Last / BWT of a task stream). huggingface_hub 2.x calls model-index legacy and adds ``.eval_results/*.yaml`` files
(``EvalResultEntry``), which only datasets registered on the Hub can use: :func:`eval_result_entries` builds them
for rows that carry a Hub dataset id and :func:`eval_results_files` their file contents;
:func:`hf_cft.hub.push_to_hub` uploads both.

Result rows are dicts: ``{"name": split or dataset, "accuracy": percent}`` plus optionally ``"num_classes"``,
``"split"`` (default ``test``), ``"dataset_id"`` (a Hub dataset id) and ``"task_id"`` (new-format task name).

Example::

    from hf_cft.hub import adapter_card, validate_card

    card = adapter_card(peft_model, model_name="coop-dtd", dataset_name="dtd",
                        results=[{"name": "base", "num_classes": 24, "accuracy": 78.1}],
                        hyperparameters={"n_ctx": 4}, training_data="16 shots per base class")
    validate_card(card)                      # parses the front matter back, checks model-index and values
    card.save("adapter/README.md")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from hf_cft.errors import AdapterError, BundleError, CardError

__all__ = [
    "ADAPTER_METHODS",
    "CARD_KINDS",
    "MERGETUNE_METHOD",
    "PAM_METHOD",
    "adapter_card",
    "condu_card",
    "eval_result_entries",
    "eval_results_files",
    "finetuned_model_card",
    "harmonic_mean_of",
    "merge_card",
    "mergetune_card",
    "pam_card",
    "render_card",
    "validate_card",
]

PIPELINE_TAG = "zero-shot-image-classification"
TASK_TYPE = "image-classification"
#: Card kinds, one template each (``model_cards/<template>.md``).
CARD_KINDS = {
    "adapter": "adapter",
    "finetuned": "finetuned_model",
    "mergetune": "mergetune",
    "condu": "condu_bundle",
    "pam": "pam_global_adapter",
    "merge": "merge",
}

#: Metric keys of a task stream's summary (condu.md §10) and of base-to-novel evaluation, with their card names.
SUMMARY_METRICS = {"transfer": "Transfer", "average": "Average", "last": "Last", "bwt": "BWT", "hm": "HM"}

ADAPTER_METHODS = {
    "HF_CFT_COOP": {
        "name": "CoOp",
        "description": "learned context vectors in the text prompt of every class (soft prompts).",
        "paper": "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022 (arXiv:2109.01134)",
        "tags": ["coop", "prompt-learning"],
        "citation": "@article{zhou2022coop,\n  title={Learning to Prompt for Vision-Language Models},\n"
        "  author={Zhou, Kaiyang and Yang, Jingkang and Loy, Chen Change and Liu, Ziwei},\n"
        "  journal={International Journal of Computer Vision},\n  year={2022}\n}",
        "usage": "head = model.class_text_features(tokenizer, classnames)  # [C, d] text head of the learned prompts",
    },
    "HF_CFT_VPT": {
        "name": "VPT",
        "description": "learned prompt tokens inserted after the CLS token of the vision tower.",
        "paper": "Jia et al., Visual Prompt Tuning, ECCV 2022 (arXiv:2203.12119)",
        "tags": ["vpt", "prompt-learning"],
        "citation": "@inproceedings{jia2022vpt,\n  title={Visual Prompt Tuning},\n"
        "  author={Jia, Menglin and Tang, Luming and Chen, Bor-Chun and Cardie, Claire and Belongie, Serge and "
        "Hariharan, Bharath and Lim, Ser-Nam},\n  booktitle={ECCV},\n  year={2022}\n}",
        "usage": "image_features = hf_cft.image_features(model, pixel_values)  # [1, d], through the visual prompts",
    },
    "HF_CFT_HEAD": {
        "name": "Zero-shot-initialised linear head",
        "description": "a linear classifier on normalised image features, initialised from the zero-shot text head.",
        "paper": "Wortsman et al., Robust fine-tuning of zero-shot models (WiSE-FT), CVPR 2022 (arXiv:2109.01903)",
        "tags": ["linear-probe"],
        "citation": "@inproceedings{wortsman2022robust,\n  title={Robust fine-tuning of zero-shot models},\n"
        "  author={Wortsman, Mitchell and others},\n  booktitle={CVPR},\n  year={2022}\n}",
        "usage": "head_logits = model.classify(pixel_values)  # [1, num_classes]: every class of the head",
    },
    "LORA": {
        "name": "LoRA",
        "description": "low-rank updates ΔW = s·B·A of the chosen linear layers of the CLIP towers.",
        "paper": "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 (arXiv:2106.09685)",
        "tags": ["lora"],
        "citation": "@inproceedings{hu2022lora,\n  title={LoRA: Low-Rank Adaptation of Large Language Models},\n"
        "  author={Hu, Edward J and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and "
        "Wang, Shean and Wang, Lu and Chen, Weizhu},\n  booktitle={ICLR},\n  year={2022}\n}",
        "usage": 'head = hf_cft.build_zeroshot_classifier(model, tokenizer, classnames, ["a photo of a {}."])',
    },
}

MERGETUNE_METHOD = {
    "name": "MergeTune",
    "paper": "Wang, Li, Zhu, Kittler, MergeTune: Continued Fine-Tuning of Vision-Language Models, ICLR 2026 "
    "(arXiv:2601.10497)",
    "tags": ["mergetune", "continued-fine-tuning", "linear-mode-connectivity"],
    "citation": "@inproceedings{wang2026mergetune,\n  title={MergeTune: Continued Fine-Tuning of Vision-Language "
    "Models},\n  author={Wang and Li and Zhu and Kittler},\n  booktitle={ICLR},\n  year={2026},\n"
    "  note={arXiv:2601.10497}\n}",
}

PAM_METHOD = {
    "name": "PAM (aligned model merging)",
    "paper": "Sokar, Dziugaite, Arnab, Iscen, Castro, Schmid, Continual Learning in Vision-Language Models via "
    "Aligned Model Merging, 2025 (arXiv:2506.03189)",
    "tags": ["pam", "lora", "model-merging", "continual-learning"],
    "citation": "@article{sokar2025pam,\n  title={Continual Learning in Vision-Language Models via Aligned Model "
    "Merging},\n  author={Sokar, Ghada and Dziugaite, Gintare Karolina and Arnab, Anurag and Iscen, Ahmet and "
    "Castro, Pablo Samuel and Schmid, Cordelia},\n  journal={arXiv preprint arXiv:2506.03189},\n  year={2025}\n}",
}

_FAMILIES = {
    "coop": "CoOp prompts (classifier space: the class text features of the continued context)",
    "head": "linear head (classifier space: W, b)",
    "lora": "LoRA (weight space: the dense updates ΔW = s·B·A)",
    "full": "full fine-tuning (weight space: every trainable tensor)",
    "vpt": "VPT prompts (prompt space: the vision tower's prompt tokens)",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------------ rendering


def _template_text(template: str) -> str:
    """The template next to the ``hf_cft`` package actually imported: ``hf_cft/model_cards/`` in an installed wheel,
    ``<checkout>/model_cards/`` in a source checkout; then the installed ``hf_cft.model_cards`` package. (An
    editable install maps ``hf_cft.model_cards`` to the checkout it was installed from, which need not be the
    checkout whose ``hf_cft`` is imported.)"""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "model_cards", package.parent / "model_cards"):
        file = folder / f"{template}.md"
        if file.is_file() and (folder / "__init__.py").is_file():
            return file.read_text(encoding="utf-8")
    try:
        return resources.files("hf_cft.model_cards").joinpath(f"{template}.md").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError, ModuleNotFoundError) as exc:
        raise CardError(f"No model-card template {template!r} in hf_cft.model_cards.") from exc


def render_card(template: str, card_data, **variables):
    """Render ``model_cards/<template>.md`` with ``card_data`` (a ``ModelCardData``) and template variables.

    Every template also gets ``base_model_link`` (a Hub id as a link, a local folder as plain text), ``terms``
    (the license ``card_data`` states and ``dataset_terms``) and ``classnames_literal`` (for loading snippets).
    Raises :class:`~hf_cft.errors.CardError` naming the template when it is missing or does not render.
    """
    from huggingface_hub import ModelCard

    base = variables.get("base_model")
    variables.setdefault("base_model_link", _base_link(base))
    license_id = getattr(card_data, "license", None) or UNKNOWN_LICENSE
    variables["terms"] = _terms(license_id, base, variables.pop("dataset_terms", None))
    variables.setdefault("classnames_literal", _classnames_literal(None))
    text = _template_text(template)
    try:
        return ModelCard.from_template(card_data, template_str=text, **variables)
    except Exception as exc:  # jinja2 raises its own error types (undefined variables, syntax)
        raise CardError(f"Model-card template {template!r} does not render: {type(exc).__name__}: {exc}") from exc


def _is_hub_id(value: str | None) -> bool:
    return bool(value) and bool(_HUB_ID.match(str(value))) and not Path(str(value)).exists()


def _base_link(base_model: str | None) -> str:
    """The base model in a card's text: a Hub id as a link, a local folder as plain text (a link would be dead)."""
    if not base_model:
        return "a CLIP-like model"
    if _is_hub_id(base_model):
        return f"[{base_model}](https://huggingface.co/{base_model})"
    return f"`{base_model}` (a local model folder)"


#: The card license when none is stated and the base model's card gives none (a valid Hub license identifier).
UNKNOWN_LICENSE = "unknown"


def base_model_license(base_model: str | None) -> str | None:
    """The ``license`` of the base model's card, read without network: ``README.md`` of a local model folder, or
    the copy of a Hub repo's card in the local Hub cache; ``None`` when neither is there or it states none."""
    if not base_model:
        return None
    path = Path(str(base_model))
    readme = path / "README.md" if path.is_dir() else None
    if readme is None and _is_hub_id(base_model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(base_model), "README.md")
        except Exception:  # noqa: BLE001 - a malformed id or an unreadable cache: nothing known
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        found = ModelCard(readme.read_text(encoding="utf-8")).data.license
    except Exception:  # noqa: BLE001 - a README without valid metadata states no license
        return None
    return str(found) if found else None


def resolve_license(license: str | None, base_model: str | None) -> str:
    """The license a card states: ``license`` when given, else the base model's (:func:`base_model_license`),
    else ``"unknown"`` — never a guess such as ``apache-2.0``, since weights trained on data inherit its terms."""
    return license or base_model_license(base_model) or UNKNOWN_LICENSE


def _terms(license_id: str, base_model: str | None, dataset_terms: str | None) -> str:
    """The card's "License and data terms" lines."""
    if license_id == UNKNOWN_LICENSE:
        lic = (
            "`unknown` — none was stated and the base model's card gives none; check the base model's and the "
            "data's terms before using or redistributing these weights."
        )
    elif license_id == base_model_license(base_model):
        lic = f"`{license_id}` (the base model's license)."
    else:
        lic = f"`{license_id}`."
    data = (
        " ".join(str(dataset_terms).split()) if dataset_terms else "not recorded; check the terms of the data above."
    )
    return f"- **License:** {lic}\n- **Data terms:** {data}"


def _classnames_literal(classnames: Sequence[str] | None) -> str:
    """Python source for the loading snippets' ``classnames``: the artefact's own, else a placeholder list."""
    names = [str(c) for c in classnames or []]
    return repr(names) if names else '["cat", "dog"]  # your class names'


def _accuracy(row: Mapping[str, Any], where: str) -> float:
    if "accuracy" not in row or "name" not in row:
        raise CardError(f"Result row {dict(row)!r} of {where} needs 'name' and 'accuracy' (percent).")
    value = row["accuracy"]
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise CardError(f"Accuracy of {row['name']!r} in {where} is not a number: {value!r}.") from exc
    if not math.isfinite(value):
        raise CardError(f"Accuracy of {row['name']!r} in {where} is {value}; a card reports finite values only.")
    return round(value, 4)


def _check_rows(rows: Sequence[Mapping[str, Any]] | None, where: str) -> list[dict[str, Any]]:
    out = []
    for row in rows or []:
        if not isinstance(row, Mapping):
            raise CardError(f"Result rows of {where} must be dicts, got {type(row).__name__}.")
        out.append({**row, "accuracy": _accuracy(row, where)})
    names = [r["name"] for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CardError(f"Result rows of {where} name {dup[0]!r} twice.")
    return out


def _check_summary(summary: Mapping[str, float] | None, where: str) -> dict[str, float]:
    out = {}
    for key, value in (summary or {}).items():
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise CardError(f"Summary metric {key!r} of {where} is not a number: {value!r}.") from exc
        if not math.isfinite(value):
            continue  # e.g. Transfer of a one-task stream is NaN by definition: left out, never written as NaN
        out[str(key)] = round(value, 4)
    return out


def _split_results(rows, dataset_name: str, dataset_id: str | None) -> list:
    """model-index entries for the splits of one dataset (base / novel / all classes ...)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=TASK_TYPE,
            dataset_type=row.get("dataset_id") or dataset_id or dataset_name,
            dataset_name=dataset_name if str(row["name"]) == dataset_name else f"{dataset_name} ({row['name']})",
            dataset_config=str(row["name"]),
            dataset_split=row.get("split", "test"),
            metric_type="accuracy",
            metric_value=row["accuracy"],
            metric_name=f"{row['name']} accuracy",
        )
        for row in rows
    ]


def _dataset_results(rows) -> list:
    """model-index entries for rows that are datasets of their own (the tasks of a stream)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=TASK_TYPE,
            dataset_type=row.get("dataset_id") or str(row["name"]),
            dataset_name=str(row["name"]),
            dataset_split=row.get("split", "test"),
            metric_type="accuracy",
            metric_value=row["accuracy"],
            metric_name=f"{row['name']} accuracy",
        )
        for row in rows
    ]


def _summary_results(summary: Mapping[str, float], dataset_type: str, dataset_name: str) -> list:
    """model-index entries for HM / Transfer / Average / Last / BWT (percent points)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=TASK_TYPE,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            metric_type=key,
            metric_value=value,
            metric_name=SUMMARY_METRICS.get(key, key),
        )
        for key, value in summary.items()
    ]


def _card_data(
    *,
    model_name: str,
    library_name: str,
    base_model: str | None,
    relation: str | None,
    tags: Sequence[str],
    eval_results: list,
    datasets: Sequence[str] = (),
    license: str | None = None,
):
    from huggingface_hub import ModelCardData

    license = resolve_license(license, base_model)
    # the Hub's base_model must be a repo id: a local folder (e.g. the offline demo CLIP) stays out of the metadata
    base_model = base_model if _is_hub_id(base_model) else None
    extra = {"base_model_relation": relation} if base_model and relation else {}
    hub_datasets = sorted({d for d in datasets if _is_hub_id(d)})
    return ModelCardData(
        model_name=model_name,
        library_name=library_name,
        pipeline_tag=PIPELINE_TAG,
        base_model=base_model or None,
        tags=["hf_cft", "clip", *tags],
        datasets=hub_datasets or None,
        eval_results=eval_results or None,
        license=license,
        **extra,
    )


# ------------------------------------------------------------------------------------------------ validation


def validate_card(card, require: Sequence[str] = ("library_name",)) -> dict[str, Any]:
    """Parse a card (``ModelCard`` or its text) back as the Hub would and return its metadata dict.

    Raises :class:`~hf_cft.errors.CardError` when the YAML front matter is missing or invalid, ``model-index`` does
    not parse into evaluation results, a metric value is not a finite number, or one of ``require`` (default
    ``library_name``, which the Hub needs to show how to load the model) is missing. hf_cft's own cards also set
    ``pipeline_tag``; pass ``require=("library_name", "pipeline_tag")`` to insist on it.
    """
    from huggingface_hub import ModelCard

    text = str(card)
    try:
        parsed = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:  # ValueError for bad YAML or a model-index that does not parse
        raise CardError(f"The model card's metadata is invalid: {exc}") from exc
    meta = parsed.data.to_dict()
    if not meta:
        raise CardError("The model card has no YAML metadata (front matter between '---' lines).")
    for key in require:
        if not meta.get(key):
            raise CardError(f"The model card's metadata lacks {key!r}.")
    for entry in meta.get("model-index", []) or []:
        for result in entry.get("results", []):
            for metric in result.get("metrics", []):
                value = metric.get("value")
                if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                    raise CardError(
                        f"model-index metric {metric.get('type')!r} of dataset "
                        f"{result.get('dataset', {}).get('name')!r} is {value!r}, not a finite number."
                    )
    return meta


# ------------------------------------------------------------------------------------------------ new eval format


def eval_result_entries(
    rows: Sequence[Mapping[str, Any]], dataset_id: str | None = None, notes: str | None = None
) -> list:
    """``huggingface_hub.EvalResultEntry`` objects (the ``.eval_results/*.yaml`` format) for the rows whose dataset
    is on the Hub: ``row["dataset_id"]`` or ``dataset_id`` must look like ``owner/name``; other rows are skipped
    (the format only serves registered benchmark datasets). ``task_id`` is ``row["task_id"]`` or the row name.
    """
    from huggingface_hub import EvalResultEntry

    out = []
    for row in _check_rows(rows, "the evaluation results"):
        did = row.get("dataset_id") or dataset_id
        if not _is_hub_id(did):
            continue
        out.append(
            EvalResultEntry(
                dataset_id=did, task_id=str(row.get("task_id") or row["name"]), value=row["accuracy"], notes=notes
            )
        )
    return out


def eval_results_files(entries: Sequence[Any]) -> dict[str, bytes]:
    """``{".eval_results/<owner>__<name>.yaml": yaml bytes}``: one file per Hub dataset, as the Hub reads them."""
    import yaml
    from huggingface_hub import eval_result_entries_to_yaml

    per: dict[str, list] = {}
    for e in entries:
        per.setdefault(e.dataset_id, []).append(e)
    return {
        f".eval_results/{did.replace('/', '__')}.yaml": yaml.safe_dump(
            eval_result_entries_to_yaml(group), sort_keys=False, allow_unicode=True
        ).encode("utf-8")
        for did, group in per.items()
    }


# ------------------------------------------------------------------------------------------------ adapters


def _adapter_config_and_size(source, adapter_name: str | None = None) -> tuple[Any, int, str]:
    """(PEFT config, number of adapter parameters, adapter name) of a ``PeftModel`` or an adapter folder."""
    if isinstance(source, (str, os.PathLike)):
        from peft import PeftConfig
        from safetensors import safe_open

        folder = Path(source)
        if not (folder / "adapter_config.json").is_file():
            raise AdapterError(f"{str(folder)!r} is not a PEFT adapter folder (no adapter_config.json).")
        try:
            cfg = PeftConfig.from_pretrained(str(folder))
        except Exception as exc:  # unknown peft_type, bad JSON
            raise AdapterError(f"Cannot read the adapter config of {str(folder)!r}: {exc}") from exc
        weights = folder / "adapter_model.safetensors"
        size = 0
        if weights.is_file():
            try:
                with safe_open(str(weights), framework="pt") as fh:
                    size = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
            except Exception as exc:
                raise BundleError(f"Cannot read {str(weights)!r}: {exc}") from exc
        return cfg, size, adapter_name or "default"
    peft_config = getattr(source, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise AdapterError(f"Expected a PeftModel or an adapter folder, got {type(source).__name__}.")
    name = adapter_name or source.active_adapter
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name not in peft_config:
        raise AdapterError(f"Adapter {name!r} is not in the PEFT model (it has {sorted(peft_config)}).")
    from peft import get_peft_model_state_dict

    size = sum(t.numel() for t in get_peft_model_state_dict(source, adapter_name=name).values())
    return peft_config[name], size, name


def _peft_type(cfg) -> str:
    return str(getattr(cfg.peft_type, "value", cfg.peft_type))


def adapter_card(
    peft_model,
    *,
    model_name: str,
    dataset_name: str,
    dataset_id: str | None = None,
    results: Sequence[Mapping[str, Any]] = (),
    hyperparameters: Mapping[str, Any] | None = None,
    training_data: str = "",
    task_description: str = "image classification",
    hm: float | None = None,
    results_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
    method: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    adapter_name: str | None = None,
    dataset_terms: str | None = None,
):
    """A model card for a PEFT adapter (CoOp, VPT, linear head, LoRA) — a ``PeftModel`` or an adapter folder.

    ``results`` rows (``{"name": split, "num_classes": int, "accuracy": percent}``) become model-index entries
    (task image-classification, metric accuracy, one per split); ``hm`` is printed in the card's text (it is
    derived from the base and novel rows). ``method`` overrides entries of
    the method description (``name``, ``description``, ``paper``, ``tags``, ``citation``, ``usage``).
    """
    cfg, size, _ = _adapter_config_and_size(peft_model, adapter_name)
    kind = _peft_type(cfg)
    known = ADAPTER_METHODS.get(kind)
    if known is None and method is None:
        raise CardError(f"No card description for PEFT type {kind!r}; pass method={{...}} to describe it.")
    method = {**(known or {}), **(method or {})}
    base_model = base_model or cfg.base_model_name_or_path or None
    rows = _check_rows(results, f"adapter card {model_name!r}")
    summary = _check_summary({"hm": hm}, f"adapter card {model_name!r}")
    eval_results = _split_results(rows, dataset_name, dataset_id)  # HM is shown in the text (derived from rows)
    card_data = _card_data(
        model_name=model_name,
        library_name="peft",
        base_model=base_model,
        relation="adapter",
        tags=method.get("tags", []),
        eval_results=eval_results,
        datasets=[dataset_id or "", *(r.get("dataset_id") or "" for r in rows)],
        license=license,
    )
    return render_card(
        "adapter",
        card_data,
        dataset_terms=dataset_terms,
        classnames_literal=_classnames_literal(getattr(cfg, "classnames", None)),
        model_name=model_name,
        base_model=base_model,
        method_name=method.get("name", kind),
        method_description=method.get("description", ""),
        paper=method.get("paper", ""),
        peft_type=kind,
        trainable_params=f"{size:,}",
        task_description=task_description,
        dataset_name=dataset_name,
        results=rows,
        hm=summary.get("hm"),
        results_note=results_note,
        hyperparameters=dict(hyperparameters or {}),
        training_data=training_data or "not recorded.",
        usage_snippet=method.get("usage", ""),
        limitations=limitations or "Evaluated only on the data listed above; accuracy elsewhere is unknown.",
        citation=method.get("citation", ""),
        repo_id=repo_id,
    )


def harmonic_mean_of(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The harmonic mean of the ``base`` and ``novel`` rows' accuracy (base-to-novel HM), ``None`` without both."""
    acc = {str(r.get("name")): float(r["accuracy"]) for r in rows or [] if "accuracy" in r}
    if "base" not in acc or "novel" not in acc:
        return None
    b, n = acc["base"], acc["novel"]
    return 0.0 if b + n == 0 else 2 * b * n / (b + n)


# ------------------------------------------------------------------------------------------------ full models


def finetuned_model_card(
    model,
    *,
    model_name: str,
    dataset_name: str,
    dataset_id: str | None = None,
    results: Sequence[Mapping[str, Any]] = (),
    hyperparameters: Mapping[str, Any] | None = None,
    training_data: str = "",
    classnames: Sequence[str] = (),
    templates: Sequence[str] = ("a photo of a {}.",),
    hm: float | None = None,
    results_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    dataset_terms: str | None = None,
):
    """A model card for a fully fine-tuned CLIP-like model (a model or its saved folder),
    ``model_cards/finetuned_model.md``: library ``transformers``, ``base_model_relation: finetune``, results rows
    as for :func:`adapter_card` (model-index, accuracy in %), and a loading snippet with the task's
    ``classnames`` and ``templates``."""
    info = _continued_model_info(model, None)
    if info["family"] != "full":
        raise CardError(
            f"finetuned_model_card is for full models; {type(model).__name__} is a PEFT adapter (use adapter_card)."
        )
    base_model = base_model or info["base_model"] or None
    where = f"fine-tuned model card {model_name!r}"
    rows = _check_rows(results, where)
    summary = _check_summary({"hm": hm}, where)
    card_data = _card_data(
        model_name=model_name,
        library_name="transformers",
        base_model=base_model,
        relation="finetune",
        tags=["full-fine-tuning"],
        eval_results=_split_results(rows, dataset_name, dataset_id),
        datasets=[dataset_id or "", *(r.get("dataset_id") or "" for r in rows)],
        license=license,
    )
    return render_card(
        "finetuned_model",
        card_data,
        dataset_terms=dataset_terms,
        classnames_literal=_classnames_literal(classnames),
        model_name=model_name,
        base_model=base_model,
        num_params=f"{info['size']:,}",
        dataset_name=dataset_name,
        results=rows,
        hm=summary.get("hm"),
        results_note=results_note,
        hyperparameters=dict(hyperparameters or {}),
        training_data=training_data or "not recorded.",
        classnames=[str(c) for c in classnames],
        templates=[str(t) for t in templates],
        limitations=limitations
        or "Every weight was fine-tuned on the data above, which can lower accuracy on other classes and data "
        "(compare with the base model before use); only the data listed above was evaluated.",
        repo_id=repo_id,
    )


# ------------------------------------------------------------------------------------------------ MergeTune


def _continued_model_info(source, adapter_name: str | None) -> dict[str, Any]:
    """Family, library, base model and size of a MergeTune continued model (PEFT adapter or full model)."""
    is_folder = isinstance(source, (str, os.PathLike))
    if (is_folder and (Path(source) / "adapter_config.json").is_file()) or isinstance(
        getattr(source, "peft_config", None), dict
    ):
        cfg, size, name = _adapter_config_and_size(source, adapter_name)
        kind = _peft_type(cfg)
        family = {"HF_CFT_COOP": "coop", "HF_CFT_HEAD": "head", "LORA": "lora", "HF_CFT_VPT": "vpt"}.get(kind)
        if family is None:
            raise CardError(
                f"A MergeTune continued adapter is CoOp, a linear head, LoRA or VPT; adapter {name!r} is {kind!r}."
            )
        return {
            "family": family,
            "library": "peft",
            "base_model": cfg.base_model_name_or_path,
            "size": size,
            "peft_type": kind,
            "classnames": getattr(cfg, "classnames", None),
        }
    if is_folder:
        folder = Path(source)
        config = folder / "config.json"
        if not config.is_file() or not list(folder.glob("*.safetensors")):
            raise CardError(
                f"{str(folder)!r} is neither a PEFT adapter folder nor a model folder (config.json + safetensors)."
            )
        try:
            name_or_path = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        except ValueError as exc:
            raise CardError(f"{str(config)!r} is not valid JSON: {exc}") from exc
        from safetensors import safe_open

        size = 0
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                size += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
        return {
            "family": "full",
            "library": "transformers",
            "base_model": name_or_path or None,
            "size": size,
            "peft_type": None,
        }
    cfg = getattr(source, "config", None)
    params = getattr(source, "parameters", None)
    if cfg is None or params is None:
        raise CardError(f"Expected a continued model (PeftModel, model, or folder), got {type(source).__name__}.")
    return {
        "family": "full",
        "library": "transformers",
        "base_model": getattr(cfg, "_name_or_path", None) or None,
        "size": sum(p.numel() for p in source.parameters()),
        "peft_type": None,
    }


def mergetune_card(
    model,
    *,
    model_name: str,
    dataset_name: str,
    dataset_id: str | None = None,
    results: Sequence[Mapping[str, Any]] = (),
    hyperparameters: Mapping[str, Any] | None = None,
    training_data: str = "",
    finetuned: str | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    hm: float | None = None,
    results_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    dataset_terms: str | None = None,
    adapter_name: str | None = None,
):
    """A model card for a MergeTune continued model (mergetune.md): a ``PeftModel`` / adapter folder (CoOp, head,
    LoRA) or a full model / model folder.

    ``results``: rows of the continued model (e.g. base, novel); ``hm`` (MergeTune's headline number) is also a
    model-index entry (metric ``hm``, dataset "<name> (base-to-novel)"); ``baselines``: ``{"zero-shot": {"base": ..,
    "novel": ..}, "fine-tuned": {...}}`` accuracies shown beside them (not in model-index, which describes this
    model only); ``finetuned``: what ŵ2 was (a repo id or a description); ``hyperparameters``: λ, β, N, τ, anchor ...
    """
    info = _continued_model_info(model, adapter_name)
    base_model = base_model or info["base_model"] or None
    where = f"MergeTune card {model_name!r}"
    rows = _check_rows(results, where)
    summary = _check_summary({"hm": hm}, where)
    baselines = {str(k): _check_summary(v, f"{where} (baseline {k!r})") for k, v in (baselines or {}).items()}
    for row in baselines.values():  # a baseline's HM cell is never blank when its base and novel are known
        if "hm" not in row and "base" in row and "novel" in row:
            from hf_cft.metrics.classification import harmonic_mean

            row["hm"] = round(harmonic_mean(row["base"], row["novel"]), 4)
    eval_results = _split_results(rows, dataset_name, dataset_id)
    eval_results += _summary_results(summary, dataset_id or dataset_name, f"{dataset_name} (base-to-novel)")
    card_data = _card_data(
        model_name=model_name,
        library_name=info["library"],
        base_model=base_model,
        relation="adapter" if info["library"] == "peft" else "finetune",
        tags=[*MERGETUNE_METHOD["tags"], info["family"]],
        eval_results=eval_results,
        datasets=[dataset_id or "", *(r.get("dataset_id") or "" for r in rows)],
        license=license,
    )
    columns = [r["name"] for r in rows]
    return render_card(
        "mergetune",
        card_data,
        dataset_terms=dataset_terms,
        classnames_literal=_classnames_literal(info.get("classnames")),
        model_name=model_name,
        base_model=base_model,
        family=info["family"],
        family_description=_FAMILIES[info["family"]],
        is_adapter=info["library"] == "peft",
        peft_type=info["peft_type"],
        num_params=f"{info['size']:,}",
        finetuned=finetuned,
        paper=MERGETUNE_METHOD["paper"],
        dataset_name=dataset_name,
        results=rows,
        columns=columns,
        baselines=baselines,
        hm=summary.get("hm"),
        results_note=results_note,
        hyperparameters=dict(hyperparameters or {}),
        training_data=training_data or "not recorded.",
        limitations=limitations
        or "MergeTune trades some accuracy on the fine-tuned classes for accuracy on unseen ones; only the data "
        "listed above was evaluated.",
        citation=MERGETUNE_METHOD["citation"],
        repo_id=repo_id,
    )


# ------------------------------------------------------------------------------------------------ task streams


def _matrix(matrix: Mapping[str, Any] | None, where: str) -> dict[str, Any] | None:
    """``{"names": [...], "values": [[...]]}`` (an AccuracyMatrix dict) checked and made printable."""
    if matrix is None:
        return None
    try:
        names = [str(n) for n in matrix["names"]]
        values = [
            [None if v is None or not math.isfinite(float(v)) else float(v) for v in row] for row in matrix["values"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise CardError(
            f"The accuracy matrix of {where} must be {{'names': [...], 'values': [[...]]}}: {exc}"
        ) from exc
    if len(values) != len(names) or any(len(row) != len(names) for row in values):
        raise CardError(f"The accuracy matrix of {where} must be {len(names)}×{len(names)} for {len(names)} names.")
    return {"names": names, "values": values}


def _stream_label(names: Sequence[str], stream_name: str | None) -> str:
    """The task stream the summary metrics describe: ``stream_name``, else its datasets in order (the accuracy
    matrix's names when there is one, else the artefact's tasks)."""
    return stream_name or ("task stream: " + " → ".join(names) if names else "task stream")


def condu_card(
    merger,
    *,
    model_name: str = "ConDU bundle",
    results: Sequence[Mapping[str, Any]] = (),
    summary: Mapping[str, float] | None = None,
    matrix: Mapping[str, Any] | None = None,
    stream_name: str | None = None,
    stream_id: str | None = None,
    results_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
    license: str | None = None,
    dataset_terms: str | None = None,
):
    """A model card for a ConDU bundle (``model_cards/condu_bundle.md``): task order with λ and collapse flags,
    merge settings, storage, accuracy matrix, loading snippet.

    ``results``: per-dataset rows (``{"name": dataset, "accuracy": %, "dataset_id": optional Hub id}``), e.g. the
    last row of the accuracy matrix; ``summary``: Transfer / Average / Last / BWT (keys ``transfer``, ``average``,
    ``last``, ``bwt``; NaN values are left out), written to model-index as metrics of the task stream
    ``stream_id`` (default ``"hf_cft/task-stream"``); ``matrix``: ``{"names", "values"}`` shown as a table.
    """
    where = f"ConDU card {model_name!r}"
    tasks = merger.tasks
    rows = _check_rows(results, where)
    summ = _check_summary(summary, where)
    mat = _matrix(matrix, where)
    names = mat["names"] if mat else [t.name for t in tasks]
    eval_results = _dataset_results(rows) + _summary_results(
        summ, stream_id or "hf_cft/task-stream", _stream_label(names, stream_name)
    )
    base = merger.base_model_name_or_path
    card_data = _card_data(
        model_name=model_name,
        library_name="hf_cft",
        base_model=base,
        relation="merge",
        tags=["condu", "model-merging", "continual-learning"],
        eval_results=eval_results,
        datasets=[r.get("dataset_id") or "" for r in rows],
        license=license,
    )
    shapes = {k: tuple(v.shape) for k, v in merger.unified_delta.items()} if tasks else {}
    return render_card(
        "condu_bundle",
        card_data,
        dataset_terms=dataset_terms,
        classnames_literal=_classnames_literal(tasks[0].classnames if tasks else None),
        model_name=model_name,
        base_model=base,
        tasks=tasks,
        config=merger.config,
        num_keys=len(shapes),
        num_entries=sum(math.prod(s) for s in shapes.values()),
        fingerprint=merger.base_fingerprint,
        results=rows,
        summary={SUMMARY_METRICS.get(k, k): v for k, v in summ.items()},
        matrix=mat,
        stream_name=_stream_label(names, stream_name),
        results_note=results_note,
        storage=merger.storage_bytes(),
        limitations=limitations
        or "Experts are rebuilt approximately (λ·M⊙u, condu.md §3); accuracy is only known where reported above.",
        repo_id=repo_id,
    )


def pam_card(
    state,
    *,
    model_name: str = "PAM global adapter",
    base_model: str | None = None,
    results: Sequence[Mapping[str, Any]] = (),
    summary: Mapping[str, float] | None = None,
    matrix: Mapping[str, Any] | None = None,
    stream_name: str | None = None,
    stream_id: str | None = None,
    training_data: str = "",
    results_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
    license: str | None = None,
    dataset_terms: str | None = None,
):
    """A model card for a PAM global adapter (``model_cards/pam_global_adapter.md``, pam.md): the deployed LoRA
    adapter G after ``state.num_tasks`` tasks, its LoRA and PAM settings, the per-task merge log, per-dataset
    accuracy and the stream's Transfer / Average / Last / BWT (as for :func:`condu_card`)."""
    where = f"PAM card {model_name!r}"
    rows = _check_rows(results, where)
    summ = _check_summary(summary, where)
    mat = _matrix(matrix, where)
    lora = dict(state.lora_config or {})
    base_model = base_model or lora.get("base_model_name_or_path") or None
    names = mat["names"] if mat else [str(h.get("name") or f"task {h.get('task')}") for h in state.history]
    eval_results = _dataset_results(rows) + _summary_results(
        summ, stream_id or "hf_cft/task-stream", _stream_label(names, stream_name)
    )
    card_data = _card_data(
        model_name=model_name,
        library_name="peft",
        base_model=base_model,
        relation="adapter",
        tags=PAM_METHOD["tags"],
        eval_results=eval_results,
        datasets=[r.get("dataset_id") or "" for r in rows],
        license=license,
    )
    targets = lora.get("target_modules")
    return render_card(
        "pam_global_adapter",
        card_data,
        dataset_terms=dataset_terms,
        classnames_literal=_classnames_literal(None),
        model_name=model_name,
        base_model=base_model,
        num_tasks=state.num_tasks,
        num_params=f"{sum(v.numel() for v in state.global_state.values()):,}",
        lora={
            "r": lora.get("r"),
            "lora_alpha": lora.get("lora_alpha"),
            "target_modules": ", ".join(sorted(targets)) if isinstance(targets, (list, tuple, set)) else targets,
        },
        config=state.config.to_dict(),
        history=state.history,
        results=rows,
        summary={SUMMARY_METRICS.get(k, k): v for k, v in summ.items()},
        matrix=mat,
        stream_name=_stream_label(names, stream_name),
        training_data=training_data or "not recorded.",
        results_note=results_note,
        paper=PAM_METHOD["paper"],
        limitations=limitations
        or "One adapter serves every task without a task id; accuracy is only known where reported above. PAM's "
        "hyper-parameters beyond the abstract's two ideas are library choices (pam.md).",
        citation=PAM_METHOD["citation"],
        repo_id=repo_id,
    )


# ------------------------------------------------------------------------------------------------ merges


def merge_card(
    resolved: Mapping[str, Any],
    *,
    input_kinds: Sequence[str] = (),
    model_name: str | None = None,
    results: Sequence[Mapping[str, Any]] = (),
    results_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
    license: str | None = None,
    dataset_terms: str | None = None,
    calibration: Sequence[Mapping[str, Any]] = (),
):
    """A model card for the output of ``hf-cft merge`` (``model_cards/merge.md``): inputs with their per-input
    options, the method and its parameters, the calibration data of a data-dependent method (each input's dataset,
    split and rows, from the resolved config's ``calibration`` sections; ``calibration``: per input what
    :func:`~hf_cft.hub.merge.calibration_extra` used, adding the rows available and the classes), evaluation rows when given (``{"name": dataset, "accuracy": %}``, into
    model-index), the resolved config (a :meth:`~hf_cft.merging.config.MergeConfig.resolve` dict) as YAML, and a
    loading snippet (a full model, or a PEFT LoRA adapter when ``lora_rank`` is set). ``input_kinds``: per input
    ``"LoRA adapter"`` / ``"full model"``. Metadata: ``base_model_relation: merge`` (``adapter`` for a LoRA
    output), tags ``model-merging`` and the method."""
    import yaml

    from hf_cft.merging.registry import get_method

    method = get_method(resolved.get("method"))
    model_name = model_name or resolved.get("model_name") or "merged model"
    where = f"merge card {model_name!r}"
    rows = _check_rows(results, where)
    base = resolved.get("base_model")
    lora_rank = resolved.get("lora_rank")
    inputs = []
    columns: list[str] = []
    for t, row in enumerate(resolved.get("inputs") or []):
        options = {k: row[k] for k in ("weight", "density") if k in row}
        options.update(row.get("parameters") or {})
        for name in options:
            if name not in columns:
                columns.append(name)
        kind = input_kinds[t] if t < len(input_kinds) else "model"
        model = str(row.get("model"))
        label = f"[{model}](https://huggingface.co/{model})" if _is_hub_id(model) else f"`{model}`"
        inputs.append({"label": row.get("name") or label, "kind": kind, "options": options})
    settings = resolved.get("calibration")
    used = []
    if settings:
        for t, row in enumerate(resolved.get("inputs") or []):
            own = row.get("calibration") or {}
            got = dict(calibration[t]) if t < len(calibration) else {}
            used.append(
                {
                    "dataset": own.get("data"),
                    "split": own.get("split", settings.get("split")),
                    "rows": got.get("rows", settings.get("rows")),
                    "available": got.get("available", "?"),
                    "classes": got.get("classes", "?"),
                }
            )
    kinds = (
        ", ".join(
            f"{input_kinds.count(k)} {k}{'s' if input_kinds.count(k) > 1 else ''}" for k in dict.fromkeys(input_kinds)
        )
        or "models"
    )
    card_data = _card_data(
        model_name=model_name,
        library_name="peft" if lora_rank else "transformers",
        base_model=base,
        relation="adapter" if lora_rank else "merge",
        tags=["model-merging", "merge", method.name.replace("_", "-"), *(["lora"] if lora_rank else [])],
        eval_results=_dataset_results(rows),
        datasets=[r.get("dataset_id") or "" for r in rows],
        license=license or resolved.get("license"),
    )
    return render_card(
        "merge",
        card_data,
        dataset_terms=dataset_terms,
        model_name=model_name,
        base_model=base,
        method=method.name,
        method_summary=method.summary or method.name,
        method_reference=method.reference,
        inputs=inputs,
        input_columns=columns,
        kinds=kinds,
        parameters=dict(resolved.get("parameters") or {}),
        calibration=used,
        calibration_settings=dict(settings or {}),
        out_dtype=resolved.get("out_dtype"),
        lora_rank=lora_rank,
        results=rows,
        results_note=results_note,
        resolved_yaml=yaml.safe_dump(dict(resolved), sort_keys=False, allow_unicode=True),
        limitations=limitations
        or "A merge trades accuracy between its inputs' tasks: check every task you need on its own data (only "
        "the data listed above was evaluated)."
        + (" The LoRA output approximates the merged ΔW by a rank-limited SVD." if lora_rank else ""),
        repo_id=repo_id,
    )
