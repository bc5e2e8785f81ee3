"""``hf-cft``: the command line of hf_cft — evaluate, merge, write cards, plot accuracy matrices, push.

Subcommands (``hf-cft <command> --help`` for every option):

- ``hf-cft eval --model DIR [--adapter DIR | --bundle DIR] --dataset NAME_OR_FOLDER [--split test] [--base_novel]``
  — accuracy of a CLIP-like model (template-ensembled text head), of a PEFT adapter on it (CoOp, VPT, linear head,
  LoRA; also MergeTune continued adapters) or of a ConDU bundle (semantic routing, or ``--task`` when the task id
  is known), through :func:`hf_cft.evaluate`; ``--base_novel`` reports base, novel and their harmonic mean. Prints
  the accuracy and writes a JSON (``--output``) that ``hf-cft card --results`` reads.
- ``hf-cft merge --base DIR --method {task_arithmetic,ties,dare,magmax,wise} --adapters A [B ...] --out DIR`` —
  LoRA adapters and/or fine-tuned full models → dense task deltas (:mod:`hf_cft.merging.deltas`; a LoRA delta is
  zero outside its targets) → one merged delta (:mod:`hf_cft.merging.baselines`) → θ⁰ + δ saved as a full model
  folder (safetensors, with the base folder's tokenizer and image-processor files and ``merge_config.json``).
  ``--method regmean|fisher --calibration_data D1 D2 ...`` runs each model on its own task data (one dataset per
  ``--adapters`` entry; ``--calibration_rows`` / ``_batch_size`` / ``_seed`` / ``_split``, ``--data_dir``).
- ``hf-cft card --kind {adapter,mergetune,condu,pam} --artefact DIR --out README.md [--results JSON]`` — a model
  card from hf_cft's templates (:mod:`hf_cft.hub.cards`). ``--results`` takes the JSON of ``hf-cft eval``, a
  continual run's ``accuracy_matrix.json`` (``names`` / ``values``), or ``{"results": [...], "summary": {...},
  "hyperparameters": {...}, ...}`` (keys of the card functions).
- ``hf-cft plot-matrix --matrix JSON --out PNG`` — accuracy-matrix heatmap (:func:`hf_cft.plots.matrix.plot_accuracy_matrix`).
- ``hf-cft push --artefact DIR --repo_id ID [--card README.md]`` — upload a saved folder with its card
  (:func:`hf_cft.hub.push_folder_to_hub`).
- ``hf-cft convert-open-clip --checkpoint FILE --config JSON_OR_NAME --out DIR [--bpe FILE]`` — an open_clip ViT
  CLIP checkpoint → a transformers ``CLIPModel`` folder with its tokenizer and image processor
  (:func:`hf_cft.models.convert_open_clip`); other open_clip architectures are refused by name.
- ``hf-cft config {list,path,show} [NAME]`` — the accelerate config files shipped inside the package
  (:mod:`hf_cft.accelerate_configs`): ``accelerate launch --config_file "$(hf-cft config path fsdp)" ...``.

Bad input exits with status 2 and one line naming the problem (hf_cft's typed errors), never a traceback.

Example::

    hf-cft eval --model clip --adapter out/coop --dataset dtd10 --output coop_eval.json
    hf-cft card --kind adapter --artefact out/coop --results coop_eval.json --out out/coop/README.md
    hf-cft merge --base clip --method ties --adapters out/lora_a out/lora_b --k 0.2 --out merged
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_cft.errors import CLIError, HfCftError, MergeConfigError

CARD_KINDS = ("adapter", "mergetune", "condu", "pam")


# ------------------------------------------------------------------------------------------------ helpers


def _read_json(path: str | None, option: str) -> dict[str, Any]:
    from hf_cft.utils import read_json_object

    return {} if path is None else read_json_object(path, CLIError, option)


def _load_clip(model: str, tokenizer: str | None):
    """(model, tokenizer, transform, folder) with the safety checks of :func:`hf_cft.hub.load_model`."""
    from hf_cft.data.transforms import ImageTransform
    from hf_cft.hub import load_model, snapshot
    from hf_cft.models.tokenizer import load_tokenizer

    folder = snapshot(model)
    clip = load_model(folder)
    tok = load_tokenizer(tokenizer or folder)
    transform = ImageTransform.from_model(clip)
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        transform = ImageTransform.from_processor(AutoImageProcessor.from_pretrained(str(folder)))
    return clip, tok, transform, folder


def _overlap(out: str | Path, inputs: dict[str, Any], out_option: str) -> None:
    """Refuse an output folder that is, contains or lies inside an input (``inputs``: option → local path)."""
    o = Path(out).resolve()
    for option, value in inputs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or not Path(str(v)).exists():
                continue  # a Hub id: never a local folder to harm
            i = Path(str(v)).resolve()
            if o == i or i in o.parents or o in i.parents:
                raise CLIError(
                    f"{out_option} {str(out)!r} overlaps {option} {str(v)!r}: writing there would destroy an input. "
                    f"Choose another {out_option}."
                )


def _check_out_folder(out: Path) -> None:
    """``--out`` names a folder to write: not a file, and not a path under a file."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file, not a folder.")
    above = next((p for p in Path(os.path.abspath(out)).parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise CLIError(f"--out {str(out)!r} lies under {str(above)!r}, which is a file, not a folder.")


def _check_output_file(out: str | Path, inputs: dict[str, Any], out_option: str, ours) -> None:
    """Refuse an output file that would replace a file of an input folder (a config, weights, meta.json); ``ours``
    (a path → bool) accepts a file this command wrote before (a previous result it may replace)."""
    o = Path(out)
    if o.is_dir():
        raise CLIError(f"{out_option} {str(out)!r} is a folder; give a file name.")
    if not o.exists():
        return
    r = o.resolve()
    for option, value in inputs.items():
        if value is None or not Path(str(value)).exists():
            continue
        i = Path(str(value)).resolve()
        if (r == i or i in r.parents) and not ours(o):
            raise CLIError(
                f"{out_option} {str(out)!r} is a file of {option} {str(value)!r}: writing there would destroy an "
                f"input. Choose another {out_option}."
            )


def _is_eval_result(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "evaluated" in data and ("accuracy" in data or "hm" in data)


def _write_json(path: str, obj) -> Path:
    from hf_cft.utils import atomic_write_json, remove_stale_temps

    out = Path(path)
    remove_stale_temps(out)  # a killed earlier run's half-written temporary
    atomic_write_json(out, obj)
    return out


# ------------------------------------------------------------------------------------------------ eval


def _model_folder_kind(folder: Path) -> str | None:
    """What a full-model folder is, from what hf_cft writes next to it: ``merge_config.json`` (``hf-cft merge``) or
    the card's ``base_model_relation`` / tags; ``None`` when nothing says (e.g. a pretrained CLIP)."""
    from hf_cft.utils import read_json_object

    if (folder / "merge_config.json").is_file():
        config = read_json_object(folder / "merge_config.json", CLIError, "merge_config.json")
        return (
            f"merged model ({config.get('method', 'unknown method')} of {len(config.get('adapters') or [])} delta(s))"
        )
    if (folder / "README.md").is_file():
        from huggingface_hub import ModelCard

        try:
            meta = ModelCard((folder / "README.md").read_text(encoding="utf-8")).data.to_dict()
        except Exception:  # noqa: BLE001 - a hand-written README without metadata says nothing
            return None
        tags = set(meta.get("tags") or [])
        if "mergetune" in tags:
            return "MergeTune continued model"
        if "full-fine-tuning" in tags:
            return "fine-tuned model"
        relation = meta.get("base_model_relation")
        if relation in ("finetune", "merge"):
            return {"finetune": "fine-tuned model", "merge": "merged model"}[relation]
    return None


def _adapter_base_model(adapter: str | None) -> str:
    """``--model`` when it is left out: the base model an adapter folder records (``base_model_name_or_path``)."""
    from hf_cft.utils import read_json_object

    if adapter is None or not (Path(adapter) / "adapter_config.json").is_file():
        raise CLIError(
            "--model is required (it can be left out only with a local --adapter folder that names its base)."
        )
    config = read_json_object(Path(adapter) / "adapter_config.json", CLIError, f"--adapter {adapter}")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise CLIError(f"--adapter {adapter} does not record its base model (base_model_name_or_path): pass --model.")
    return base


def cmd_eval(args) -> int:
    """Evaluate a model, an adapter on it, or a ConDU bundle on one split of a dataset (``hf_cft.evaluate``)."""
    from hf_cft.data.templates import validate_templates
    from hf_cft.evaluation import evaluate
    from hf_cft.recipe_utils import load_task

    if args.batch_size < 1:
        raise CLIError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.task is not None and args.bundle is None:
        raise CLIError("--task selects a task of a ConDU bundle; give --bundle too.")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}.")
    if args.model is None:
        args.model = _adapter_base_model(args.adapter)
    inputs = {"--model": args.model, "--tokenizer": args.tokenizer, "--adapter": args.adapter, "--bundle": args.bundle}
    inputs["--dataset"] = args.dataset
    _check_output_file(args.output, inputs, "--output", _is_eval_result)
    model, tokenizer, transform, folder = _load_clip(args.model, args.tokenizer)
    task = load_task(args.dataset, args.data_dir)
    task[args.split]  # a typed error naming the missing split, before any model work
    templates = validate_templates(args.templates or task.templates, owner=f"dataset {task.name!r}")
    what = None
    if args.adapter is not None:
        from hf_cft.hub import load_adapter_model

        model = load_adapter_model(model, args.adapter)
    elif args.bundle is not None:
        from hf_cft.merging import DeltaFusionMerger, SemanticRouter

        merger = DeltaFusionMerger.from_pretrained(args.bundle, base_model=model)
        model = SemanticRouter(merger, model, tokenizer, top_k=args.top_k)
    else:
        kind = _model_folder_kind(folder)
        what = f"{kind}, template-ensembled text head" if kind else None
    res = evaluate(
        model,
        tokenizer,
        task,
        templates=templates,
        split=args.split,
        base_novel=args.base_novel,
        task=args.task,
        transform=transform,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    what = what or res.evaluated
    result = {
        "model": str(args.model),
        "adapter": None if args.adapter is None else str(args.adapter),
        "bundle": None if args.bundle is None else str(args.bundle),
        "task": args.task,
        "evaluated": what,
        "dataset": task.name,
        "split": args.split,
        "num_classes": task.num_classes,
        "num_templates": len(templates),
        "dataset_terms": task.meta.get("license_note") or task.meta.get("license"),
    }
    if args.base_novel:
        result.update({key: res.splits[key].to_dict() for key in res.splits})
        result["hm"] = res.hm
        results = [{**row, "split": args.split} for row in res.rows()]
    else:
        result.update(res.splits["all"].to_dict())
        results = [{"name": task.name, "split": args.split, "num_classes": task.num_classes, "accuracy": res.accuracy}]
    result["results"] = results
    out = _write_json(args.output, result)
    for key, r in res.splits.items():
        label = "" if key == "all" else f" {key} classes"
        print(
            f"{task.name} ({args.split}{label}, {r.total} images, {len(res.classnames[key])} classes), {what}: "
            f"accuracy {r.accuracy:.2f}%"
        )
    if res.hm is not None:
        print(f"{task.name} ({args.split}), {what}: harmonic mean of base and novel {res.hm:.2f}")
    print(f"-> {out}")
    return 0


# ------------------------------------------------------------------------------------------------ merge


def _fraction(name: str, value: float, low_open: bool = True, high_open: bool = False) -> float:
    from hf_cft.validation import check_number

    return check_number(
        value, f"--{name}", low=0.0, high=1.0, low_open=low_open, high_open=high_open, error=MergeConfigError
    )


def _param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``--param`` (the value read as YAML: numbers, true/false, lists, strings)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise MergeConfigError(f"--param takes NAME=VALUE (e.g. --param density=0.3), got {text!r}.")
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"--param {text!r}: the value is not valid YAML ({exc}).") from exc


#: The flag form's method-specific flags: the methods that take each, and its default there. A flag given for
#: another method is refused (never silently dropped).
_METHOD_FLAGS = {
    "k": (("ties",), 0.2),
    "trim_scope": (("ties",), "tensor"),
    "disjoint_merge": (("ties",), "mean"),
    "tie_break": (("magmax",), "later"),
    "rho": (("dare",), 0.9),
    "then": (("dare",), "ta"),
    "seed": (("dare",), 0),
    "alpha": (("wise",), 0.5),
}


def _flag_config(args) -> dict[str, Any]:
    """The merge config of the flag form: the legacy flags mapped onto the registered method's options (checked
    here with their flag names), ``--param NAME=VALUE`` for any other option, ``--lam`` one value or one per model."""
    from hf_cft.merging.registry import get_method
    from hf_cft.validation import check_number

    for flag in ("base", "method", "adapters"):
        if getattr(args, flag) is None:
            raise CLIError(f"--{flag} is required (or give the whole merge as --config merge.yaml).")
    method = get_method(args.method, "--method")
    for flag, (owners, default) in _METHOD_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
        elif args.method not in owners:
            raise MergeConfigError(
                f"--{flag} is an option of --method {' / '.join(owners)}, not of {args.method!r}; give "
                f"{args.method!r}'s options as --param NAME=VALUE (hf_cft.merging.registry lists them)."
            )
    if args.lam is not None and (method.option("weight") is None or args.method == "wise"):
        raise MergeConfigError(
            f"--lam sets the per-model weight, which --method {args.method!r} does not take"
            + (" (use --alpha)." if args.method == "wise" else "; give its options as --param NAME=VALUE.")
        )
    n = len(args.adapters)
    params: dict[str, Any] = {}
    per_input: list[dict[str, Any]] = [{} for _ in range(n)]
    if args.method == "wise":
        if n != 1:
            raise MergeConfigError(f"--method wise interpolates one fine-tuned model; got {n} --adapters.")
        params["weight"] = check_number(args.alpha, "--alpha", error=MergeConfigError)
    if args.lam is not None and method.option("weight") is not None and args.method != "wise":
        if len(args.lam) not in (1, n):
            raise MergeConfigError(f"--lam takes one value or one per model ({n}), got {len(args.lam)}.")
        lams = [check_number(v, "--lam", error=MergeConfigError) for v in args.lam]
        if len(lams) == 1:
            params["weight"] = lams[0]
        else:
            for row, lam in zip(per_input, lams):
                row["weight"] = lam
    if args.method == "ties":
        params.update(density=_fraction("k", args.k), trim_scope=args.trim_scope, merge=args.disjoint_merge)
    elif args.method == "dare":
        rho = _fraction("rho", args.rho, low_open=False, high_open=True)
        if args.then not in ("ta", "ties"):
            raise MergeConfigError(f"--then must be 'ta' or 'ties', got {args.then!r}.")
        params.update(density=1.0 - rho, then=args.then, seed=args.seed)
    elif args.method == "magmax":
        params["tie_break"] = args.tie_break
    for text in args.param or []:
        name, value = _param(text)
        params[name] = value
    inputs = [{"model": str(a), "parameters": row} for a, row in zip(args.adapters, per_input)]
    config = {"base_model": str(args.base), "method": args.method, "parameters": params, "inputs": inputs}
    calibration = _flag_calibration(args, method, n)
    if calibration is not None:
        config["calibration"], data = calibration
        for row, source in zip(inputs, data):
            row["calibration"] = source
    for key in ("out_dtype", "max_shard_size", "lora_rank", "model_name"):
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    return config


#: The flag form's calibration flags (RegMean, Fisher merging) and the merge config's fields they fill.
_CALIBRATION_FLAGS = {
    "calibration_data": "inputs[t].calibration.data",
    "calibration_rows": "calibration.rows",
    "calibration_batch_size": "calibration.batch_size",
    "calibration_seed": "calibration.seed",
    "calibration_split": "calibration.split",
    "data_dir": "calibration.data_dir",
}


def _flag_calibration(args, method, n: int):
    """``(calibration section, one dataset per model)`` from the calibration flags, or ``None`` for a method
    without calibration data (where any calibration flag is refused, never ignored)."""
    from hf_cft.merging.registry import methods
    from hf_cft.validation import check_int

    given = [f"--{f}" for f in _CALIBRATION_FLAGS if getattr(args, f, None) is not None]
    if not method.calibration:
        if given:
            takers = " / ".join(name for name, m in methods().items() if m.calibration)
            raise MergeConfigError(
                f"{', '.join(given)}: calibration data is for the data-dependent methods ({takers}), not "
                f"{method.name!r}."
            )
        return None
    if args.calibration_data is None:
        raise MergeConfigError(
            f"--calibration_data is required by --method {method.name}: each model's statistics are gathered on its "
            "own task data; give one dataset per --adapters entry (a dataset folder, a shared dataset name or a Hub "
            "dataset id)."
        )
    if len(args.calibration_data) != n:
        raise MergeConfigError(
            f"--calibration_data takes one dataset per --adapters entry ({n}), each model's own task data; got "
            f"{len(args.calibration_data)}."
        )
    section: dict[str, Any] = {}
    for flag, key in (("calibration_rows", "rows"), ("calibration_batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            section[key] = check_int(getattr(args, flag), f"--{flag}", low=1, error=MergeConfigError)
    if args.calibration_seed is not None:
        section["seed"] = check_int(args.calibration_seed, "--calibration_seed", low=0, error=MergeConfigError)
    if args.calibration_split is not None:
        section["split"] = args.calibration_split
    if args.data_dir is not None:
        section["data_dir"] = str(args.data_dir)
    return section, [str(d) for d in args.calibration_data]


def cmd_merge(args) -> int:
    """Merge LoRA adapters / fine-tuned models into the base model with a registered method, key by key from the
    inputs' safetensors (flags, or the whole merge as ``--config merge.yaml``)."""
    from hf_cft.hub import run_merge
    from hf_cft.merging.config import MergeConfig

    if args.config is not None:
        given = [f"--{f}" for f in (*_METHOD_FLAGS, *_CALIBRATION_FLAGS, "lam", "param", "base", "method", "adapters")]
        given = [f for f in given if getattr(args, f[2:]) is not None]
        if given:
            raise CLIError(
                f"{', '.join(given)} cannot be combined with --config: the YAML file gives the base, inputs, method "
                "and options (flags may only override out_dtype / max_shard_size / lora_rank / model_name)."
            )
        config = MergeConfig.from_yaml(args.config)
        overrides = {k: getattr(args, k) for k in ("out_dtype", "max_shard_size", "lora_rank", "model_name")}
        if any(v is not None for v in overrides.values()):
            data = config.resolve()
            data.update({k: v for k, v in overrides.items() if v is not None})
            config = MergeConfig.from_dict(data)
    else:
        config = MergeConfig.from_dict(_flag_config(args))
    out = Path(args.out)
    named = {"--base": config.base_model, "--adapters": [i.model for i in config.inputs]}
    if args.config is not None:
        named["--config"] = args.config
    _overlap(out, named, "--out")
    _check_out_folder(out)
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise CLIError(f"--out {str(out)!r} is not empty; pass --overwrite to replace it.")
        if not (out / "merge_config.json").is_file():
            raise CLIError(
                f"--out {str(out)!r} is not the output of an earlier hf-cft merge (no merge_config.json): "
                "--overwrite replaces a whole merge output, never another folder. Choose another --out."
            )
    results = ()
    if args.results:
        results = _card_inputs(_read_json(args.results, "--results")).get("results")
        if not isinstance(results, list) or not results:
            raise CLIError(
                f"--results {args.results!r} holds no evaluation rows: give hf-cft eval's output, an "
                'accuracy_matrix.json, or {"results": [{"name": ..., "accuracy": <percent>}, ...]}.'
            )
    field_names = None
    if args.config is None:  # errors name the flags the user typed, not the config fields they became
        field_names = {"base_model": "--base"}
        for flag, field_name in {**_CALIBRATION_FLAGS, "adapters": "inputs[t].model"}.items():
            if "[t]" not in field_name:
                field_names[field_name] = f"--{flag}"
                continue
            for t in range(len(config.inputs)):
                field_names[field_name.replace("[t]", f"[{t}]")] = f"--{flag} entry {t + 1}"
        for t in range(len(config.inputs)):  # every dataset's split is the one --calibration_split
            field_names[f"inputs[{t}].calibration.split"] = "--calibration_split"
    run_merge(config, out, results=results or (), repo_id=args.repo_id, field_names=field_names)
    summary = run_merge.last_summary
    resolved = config.resolve()
    what = f"LoRA adapter (r={config.lora_rank})" if config.lora_rank else "model"
    data = ""
    if resolved.get("calibration"):
        c = resolved["calibration"]
        data = f", calibrated on {c['rows']} row(s) of each input's data (seed {c['seed']})"
    print(
        f"merged {len(config.inputs)} input(s) with {resolved['method']} {resolved['parameters']}{data} "
        f"({summary['keys_merged']} key(s) changed) -> {what} in {out} ({', '.join(summary['files'])})"
    )
    if not summary["keys_merged"]:
        print(
            f"warning: {resolved['method']} changed no key: the output equals the base model (e.g. no entry agrees "
            "across the inputs, or every weight is 0).",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------------------------------------ card


def _card_inputs(data: dict[str, Any]) -> dict[str, Any]:
    """Normalise a --results JSON: hf-cft eval output, an accuracy_matrix.json, or card keyword arguments."""
    data = dict(data)
    if "names" in data and "values" in data:  # a continual run's accuracy matrix
        names, values = data["names"], data["values"]
        if not isinstance(values, list) or not values or len(values) != len(names):
            raise CLIError("--results: an accuracy matrix needs 'names' and a square 'values' list.")
        last = values[-1]
        rows = [{"name": n, "accuracy": v} for n, v in zip(names, last) if v is not None]
        metrics = data.get("metrics") or {}
        return {"results": rows, "summary": metrics, "matrix": {"names": names, "values": values}}
    if "dataset" in data and "dataset_name" not in data:
        data["dataset_name"] = data["dataset"]
    return data


_CARD_KEYS = {
    "adapter": (
        "dataset_name",
        "dataset_id",
        "results",
        "hyperparameters",
        "training_data",
        "hm",
        "results_note",
        "limitations",
        "base_model",
    ),
    "mergetune": (
        "dataset_name",
        "dataset_id",
        "results",
        "hyperparameters",
        "training_data",
        "finetuned",
        "baselines",
        "hm",
        "results_note",
        "limitations",
        "base_model",
    ),
    "condu": ("results", "summary", "matrix", "stream_name", "stream_id", "results_note", "limitations"),
    "pam": (
        "results",
        "summary",
        "matrix",
        "stream_name",
        "stream_id",
        "training_data",
        "results_note",
        "limitations",
        "base_model",
    ),
}


def cmd_card(args) -> int:
    """Render the model card of a saved artefact."""
    from hf_cft import hub

    _check_output_file(
        args.out, {"--artefact": args.artefact, "--results": args.results}, "--out", lambda p: p.suffix == ".md"
    )
    data = _card_inputs(_read_json(args.results, "--results"))
    for key in ("dataset_name", "dataset_id", "base_model"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if args.license is not None:
        data["license"] = args.license
    keys = (*_CARD_KEYS[args.kind], "license", "dataset_terms")  # every card states its license and data terms
    kwargs = {k: data[k] for k in keys if data.get(k) is not None}
    kwargs["model_name"] = args.model_name or data.get("model_name") or Path(args.artefact).resolve().name
    if args.repo_id:
        kwargs["repo_id"] = args.repo_id
    if args.kind in ("adapter", "mergetune"):
        kwargs.setdefault("dataset_name", "unspecified")
        card = (hub.adapter_card if args.kind == "adapter" else hub.mergetune_card)(args.artefact, **kwargs)
    elif args.kind == "condu":
        from hf_cft.merging import DeltaFusionMerger

        card = hub.condu_card(DeltaFusionMerger.from_pretrained(args.artefact), **kwargs)
    else:
        from hf_cft.merging import PAMState

        card = hub.pam_card(PAMState.from_pretrained(args.artefact), **kwargs)
    hub.validate_card(card)
    from hf_cft.utils import atomic_write_bytes, remove_stale_temps

    remove_stale_temps(args.out)
    atomic_write_bytes(args.out, str(card).encode("utf-8"))
    print(f"{args.kind} card for {args.artefact} -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------ plot-matrix


def cmd_plot_matrix(args) -> int:
    """Draw an accuracy matrix (JSON with ``names`` and ``values``) as a heatmap PNG."""
    import numpy as np

    from hf_cft.metrics import matrix_metrics

    data = _read_json(args.matrix, "--matrix")
    try:
        names = [str(n) for n in data["names"]]
        values = np.array([[np.nan if v is None else float(v) for v in row] for row in data["values"]], dtype=float)
    except (KeyError, TypeError, ValueError) as exc:
        raise CLIError(f"--matrix: {args.matrix!r} must hold 'names' and 'values' (a list of rows): {exc}") from exc
    if len(set(names)) != len(names) or not names:
        raise CLIError(f"--matrix: dataset names must be unique and non-empty, got {names}.")
    if values.shape != (len(names), len(names)):
        raise CLIError(f"--matrix: {len(names)} names need a {len(names)}×{len(names)} matrix, got {values.shape}.")
    if np.isinf(values).any():
        raise CLIError("--matrix: the matrix holds infinite values.")
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else None
    if metrics is None and np.isfinite(values).all():
        metrics = matrix_metrics(values)
    try:
        from hf_cft.plots.matrix import plot_accuracy_matrix
    except ImportError as exc:
        raise CLIError(
            f"plot-matrix needs matplotlib and hf_cft.plots.matrix (pip install 'hf-cft[plots]'): {exc}"
        ) from exc
    title = args.title if args.title is not None else str(data.get("strategy") or "")
    png = plot_accuracy_matrix(values, names, args.out, title, metrics)
    print(f"accuracy matrix ({len(names)} tasks) -> {png}")
    return 0


# ------------------------------------------------------------------------------------------------ push


def cmd_push(args) -> int:
    """Upload a saved artefact folder with its card."""
    from hf_cft.hub import push_folder_to_hub

    card = None
    if args.card is not None:
        if not Path(args.card).is_file():
            raise CLIError(f"--card: {args.card!r} does not exist.")
        card = Path(args.card).read_text(encoding="utf-8")
    info = push_folder_to_hub(
        args.artefact,
        args.repo_id,
        card=card,
        endpoint=args.endpoint,
        token=args.token,
        private=args.private or None,
        revision=args.revision,
    )
    print(f"pushed {args.artefact} -> {info.commit_url}")
    return 0


# ------------------------------------------------------------------------------------------------ convert-open-clip


def cmd_convert_open_clip(args) -> int:
    """An open_clip checkpoint + config -> a CLIPModel folder (weights, tokenizer, image processor)."""
    from hf_cft.models.open_clip_convert import convert_open_clip

    out = Path(args.out)
    _check_out_folder(out)
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise CLIError(f"--out {str(out)!r} is not empty; pass --overwrite to replace it.")
        if not (out / "open_clip_source.json").is_file():
            raise CLIError(
                f"--out {str(out)!r} is not the output of an earlier hf-cft convert-open-clip (no "
                "open_clip_source.json): --overwrite replaces a converted model only. Choose another --out."
            )
    model = convert_open_clip(args.checkpoint, args.config, out, bpe_path=args.bpe)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} ({n:,} parameters) -> {out} (CLIPModel)")
    return 0


def cmd_config(args) -> int:
    """``hf-cft config list`` / ``path NAME`` / ``show NAME``: the shipped accelerate configs
    (:mod:`hf_cft.accelerate_configs`), e.g. ``accelerate launch --config_file "$(hf-cft config path fsdp)" ...``."""
    from hf_cft.accelerate_configs import available, config_path, listing

    if args.action == "list":
        print(listing())
        return 0
    if not args.name:
        raise CLIError(f"hf-cft config {args.action} needs a config name; shipped: {', '.join(available())}.")
    path = config_path(args.name)
    print(
        path if args.action == "path" else path.read_text(encoding="utf-8"), end="\n" if args.action == "path" else ""
    )
    return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-cft",
        description="hf_cft command line: eval, merge, card, plot-matrix, push, convert-open-clip, config.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="accuracy of a model, an adapter or a ConDU bundle on a dataset split")
    p.add_argument(
        "--model", help="CLIP-like model folder or Hub id (safetensors); default with --adapter: the base it records"
    )
    p.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="PEFT adapter folder or Hub id (CoOp, VPT, linear head, LoRA)")
    which.add_argument("--bundle", help="ConDU bundle folder or Hub id")
    p.add_argument("--task", help="with --bundle: the task whose expert to use (task id known); default: routing")
    p.add_argument("--top_k", type=int, default=4, help="with --bundle: experts per image when routing (default 4)")
    p.add_argument("--dataset", required=True, help="dataset name (see hf_cft.data), folder, or Hub id; 'digits'")
    p.add_argument("--data_dir", help="folder of local datasets (default: HF_CFT_DATA_DIR or ../shared/data)")
    p.add_argument("--split", default="test")
    p.add_argument("--templates", nargs="+", help="prompt templates with one '{}' (default: the dataset's)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    p.add_argument(
        "--base_novel",
        action="store_true",
        help="base-to-novel: evaluate the first ceil(C/2) classes and the rest separately, each over its own "
        "classes, and print their harmonic mean (the recipes' class split)",
    )
    p.add_argument("--output", default="eval_results.json", help="JSON to write (default eval_results.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "merge",
        help="merge LoRA adapters / fine-tuned models into the base model (flags or --config merge.yaml)",
        description="Merge key by key from the inputs' safetensors into sharded safetensors. Methods: every name "
        "of hf_cft.merging.registry (hf_cft.merging.registry.method_names(); a wrong --method lists them all); "
        "their options through the flags below (each refused for a method that does not take it) or --param "
        "NAME=VALUE.",
    )
    p.add_argument(
        "--config",
        help="the whole merge as a YAML file (docs: merging via config); flags then only "
        "override out_dtype / max_shard_size / lora_rank / model_name",
    )
    p.add_argument("--base", help="base model folder or Hub id (θ⁰, safetensors)")
    p.add_argument("--method", help="a registered merging method, e.g. task_arithmetic, ties, dare, magmax, wise")
    p.add_argument("--adapters", nargs="+", help="LoRA adapter folders, fine-tuned model folders or Hub ids")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument(
        "--lam",
        type=float,
        nargs="+",
        help="λ: one value for every model or one per model (defaults: task_arithmetic 0.3, ties 1.0, dare per "
        "--then, magmax 0.5)",
    )
    p.add_argument("--k", type=float, help="ties: kept fraction (density; default 0.2)")
    p.add_argument(
        "--trim_scope",
        choices=["tensor", "model"],
        help="ties: trim per tensor (peft, default) or over the whole task vector (TIES paper / FusionBench)",
    )
    p.add_argument(
        "--disjoint_merge",
        choices=["mean", "sum", "max"],
        help="ties: disjoint merge of the agreeing entries (default mean, the paper; sum / max as FusionBench)",
    )
    p.add_argument(
        "--tie_break",
        choices=["later", "earlier"],
        help="magmax: which task wins equal magnitudes (default later, as the official code)",
    )
    p.add_argument("--rho", type=float, help="dare: drop rate in [0, 1) (default 0.9; density 1 − ρ)")
    p.add_argument("--then", help="dare: 'ta' (task arithmetic) or 'ties' after dropping")
    p.add_argument("--seed", type=int, help="dare: seed of the drop masks")
    p.add_argument("--alpha", type=float, help="wise: interpolation weight of the fine-tuned model")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="any option of the method (repeatable)")
    p.add_argument(
        "--calibration_data",
        nargs="+",
        metavar="DATASET",
        help="regmean / fisher: each model's own task data, one per --adapters entry in the same order (a Parquet "
        "or ImageFolder folder, a shared dataset name such as dtd10, or a Hub dataset id)",
    )
    p.add_argument("--calibration_rows", type=int, help="regmean / fisher: rows drawn from each dataset (default 256)")
    p.add_argument("--calibration_batch_size", type=int, help="regmean / fisher: batch size (default 32)")
    p.add_argument("--calibration_seed", type=int, help="regmean / fisher: seed of the rows drawn (default 0)")
    p.add_argument("--calibration_split", help="regmean / fisher: the datasets' split (default train)")
    p.add_argument(
        "--data_dir", help="folder of local datasets for --calibration_data names (default: ../shared/data)"
    )
    p.add_argument("--out_dtype", choices=["float32", "float16", "bfloat16"], help="default: the base's dtypes")
    p.add_argument("--max_shard_size", help="largest output shard, e.g. 2GB or 500MB (default 5GB)")
    p.add_argument("--lora_rank", type=int, help="write a LoRA adapter of this rank (LoRA inputs only)")
    p.add_argument("--model_name", help="name in the merge card (default: the --out folder's name)")
    p.add_argument("--results", help="evaluation JSON for the merge card (hf-cft eval output or {'results': [...]})")
    p.add_argument("--repo_id", help="the repo the merge will be pushed to (used in the card's loading snippet)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge output in --out")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("card", help="render the model card of a saved artefact")
    p.add_argument("--kind", required=True, choices=CARD_KINDS)
    p.add_argument("--artefact", required=True, help="the saved artefact folder")
    p.add_argument("--out", required=True, help="card file to write (e.g. <artefact>/README.md)")
    p.add_argument("--results", help="JSON: hf-cft eval output, accuracy_matrix.json, or card keyword arguments")
    p.add_argument("--model_name")
    p.add_argument("--dataset_name")
    p.add_argument("--dataset_id", help="Hub dataset id of the evaluation data")
    p.add_argument("--base_model", help="Hub id of the base model")
    p.add_argument(
        "--license",
        help="license of the artefact (Hub identifier, e.g. apache-2.0); default: the base model card's, else unknown",
    )
    p.add_argument("--repo_id", help="the repo the artefact will live in (used in the loading snippet)")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("plot-matrix", help="accuracy-matrix heatmap")
    p.add_argument("--matrix", required=True, help="JSON with 'names' and 'values' (e.g. accuracy_matrix.json)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot_matrix)

    p = sub.add_parser("config", help="the accelerate config files shipped with hf_cft: list them or print a path")
    p.add_argument("action", choices=("list", "path", "show"), help="list the configs, print one's path or its text")
    p.add_argument("name", nargs="?", help="a config name (path / show), e.g. fsdp")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("push", help="upload a saved artefact folder with its card")
    p.add_argument("--artefact", required=True, help="the saved artefact folder (safetensors only)")
    p.add_argument("--repo_id", required=True)
    p.add_argument("--card", help="card file to upload as README.md (default: the folder's README.md)")
    p.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--token", help="Hub token (default: the saved login)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("convert-open-clip", help="open_clip ViT CLIP checkpoint -> transformers CLIPModel folder")
    p.add_argument("--checkpoint", required=True, help="open_clip weights (.safetensors, or .bin / .pt tensors)")
    p.add_argument(
        "--config",
        required=True,
        help="open_clip model config JSON (e.g. ViT-B-16.json, or a Hub repo's open_clip_config.json), or the name "
        "of an open_clip built-in config (needs open_clip)",
    )
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--bpe", help="CLIP BPE merge list for the tokenizer (default: the one shipped with open_clip)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --out")
    p.set_defaults(func=cmd_convert_open_clip)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-cft``; returns the exit status (0, or 2 for bad input, with a one-line message)."""
    args = build_parser().parse_args(argv)
    _quiet_progress_bars()
    try:
        return int(args.func(args) or 0)
    except HfCftError as exc:
        print(f"hf-cft {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-cft {args.command}: interrupted; outputs left as they were.", file=sys.stderr)
        return 130
    except OSError as exc:  # read-only or full file system, an output path under a file, ...
        where = ""
        if exc.errno in _WRITE_ERRNOS and exc.filename is None and getattr(args, "out", None):
            where = f" while writing --out {str(args.out)!r}"
        print(f"hf-cft {args.command}: error: {_one_line(exc)}{where}", file=sys.stderr)
        return 1


# Errors only a write raises (full disk, file size limit, read-only file system, quota): the output is what failed.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT})


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _quiet_progress_bars() -> None:
    """The CLI prints one result line (or one error line): no loading / writing progress bars on stderr. transformers
    and datasets are quieted when they are imported (at once if they already are), so that a command that needs
    neither (``hf-cft merge``) does not import them for this."""
    from hf_cft import _after_import

    def quiet_transformers() -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    def quiet_datasets() -> None:
        import datasets

        datasets.disable_progress_bars()

    _after_import("transformers", quiet_transformers)
    _after_import("datasets", quiet_datasets)


if __name__ == "__main__":
    sys.exit(main())
