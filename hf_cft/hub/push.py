"""Push hf_cft artefacts to the Hugging Face Hub with their model card, and pull them back safely.

What goes up is exactly the artefact's saved folder (safetensors weights + JSON configs) plus the card as
``README.md`` and, for results on Hub-registered datasets, ``.eval_results/*.yaml``; pickle files (``.bin``,
``.pt``, ...) are refused, so nothing unsafe is ever published (``docs/architecture.md``: "Safetensors only").

- :func:`push_folder_to_hub` — any saved folder: ``create_repo`` + one ``create_commit`` whose ``README.md`` is the
  card given (not whatever ``save_pretrained`` wrote: PEFT's own card would replace hf_cft's tags and results).
- :func:`push_to_hub` — an artefact object: a ``PeftModel`` (hf_cft's CoOp / VPT / head, LoRA; also a MergeTune
  continued adapter), a full model (a MergeTune continued full model), a
  :class:`~hf_cft.merging.DeltaFusionMerger` (ConDU bundle) or a :class:`~hf_cft.merging.PAMState`; it is saved
  to a temporary folder, its card built from ``card_kwargs`` by the matching function of :mod:`hf_cft.hub.cards`.
- :func:`push_adapter_to_hub` — :func:`push_to_hub` for PEFT adapters.
- :func:`snapshot`, :func:`load_adapter_model`, :func:`load_model` — a local folder or a Hub repo id (through
  ``huggingface_hub.snapshot_download``) checked for safetensors-only, readable weights before loading, with typed
  errors. ``DeltaFusionMerger.from_pretrained`` and ``PAMState.from_pretrained`` take repo ids themselves.

Example::

    from hf_cft.hub import push_to_hub

    push_to_hub(peft_model, "me/coop-dtd", card_kwargs=dict(model_name="coop-dtd", dataset_name="dtd",
                results=[{"name": "base", "accuracy": 78.1}], training_data="16 shots per class"))
    push_to_hub(merger, "me/condu-mtil", card_kwargs=dict(results=last_row, summary=metrics))
    merger = DeltaFusionMerger.from_pretrained("me/condu-mtil", base_model=clip)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_cft.errors import AdapterError, BundleError, HfCftError, HubError, NotCLIPLikeError
from hf_cft.hub.cards import (
    adapter_card,
    condu_card,
    eval_result_entries,
    eval_results_files,
    mergetune_card,
    pam_card,
    validate_card,
)
from hf_cft.utils import user_stacklevel

__all__ = [
    "PICKLE_SUFFIXES",
    "artefact_kind",
    "load_adapter",
    "load_adapter_model",
    "load_model",
    "push_adapter_to_hub",
    "push_folder_to_hub",
    "push_to_hub",
    "snapshot",
]

#: Weight files that would be unpickled by their readers: never uploaded, never loaded by hf_cft.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".pending-save"}  # .pending-save: an interrupted bundle save


# ------------------------------------------------------------------------------------------------ folders


def _cause(exc: BaseException) -> str:
    """``"Type: message"`` of a Hub / network error on one line (huggingface_hub's messages span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _folder_files(folder: Path) -> list[Path]:
    """The files of an artefact folder to upload (relative paths), after refusing pickle and unreadable weights."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise HubError(f"{str(folder)!r} is not a folder; save the artefact with save_pretrained first.")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in _SKIP_DIRS for part in rel.parts):
            continue
        if path.is_symlink():
            raise HubError(
                f"{str(rel)!r} in {str(folder)!r} is a symlink (to {os.readlink(path)!r}): hf_cft uploads only the "
                "folder's own regular files. Replace it with a copy or remove it."
            )
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # a temporary file of an interrupted atomic write
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise HubError(
                f"{str(rel)!r} in {str(folder)!r} is a pickle-based file: hf_cft publishes safetensors only. "
                "Re-save the weights with safetensors (save_pretrained does by default) and remove it."
            )
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as fh:
                    fh.keys()
            except Exception as exc:
                raise BundleError(
                    f"{str(rel)!r} in {str(folder)!r} is not a readable safetensors file: {exc}"
                ) from exc
        files.append(rel)
    if not any(f.suffix == ".safetensors" for f in files):
        raise HubError(f"{str(folder)!r} holds no safetensors weights; nothing to publish.")
    return files


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    card=None,
    eval_results: Sequence[Any] | None = None,
    api=None,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_repo: bool = True,
):
    """Upload a saved artefact folder as one commit to the model repo ``repo_id`` and return the ``CommitInfo``.

    ``card`` (a ``ModelCard`` or its text) becomes ``README.md`` (replacing one in the folder); it is validated
    first (:func:`~hf_cft.hub.validate_card`, :class:`~hf_cft.errors.CardError`), as is a README already in the
    folder when no card is given. ``eval_results``: ``EvalResultEntry`` objects (see
    :func:`~hf_cft.hub.eval_result_entries`) written as ``.eval_results/*.yaml``. ``api`` (an ``HfApi``) or
    ``endpoint`` / ``token`` choose the server. The folder must hold safetensors weights and no pickle files
    (:class:`~hf_cft.errors.HubError`); unreadable safetensors raise :class:`~hf_cft.errors.BundleError`. A failed
    upload (no network, connection refused, authentication, a rejected commit) raises
    :class:`~hf_cft.errors.HubError` naming the repo and the endpoint.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = _folder_files(folder)
    operations = []
    if card is not None:
        validate_card(card)
        files = [f for f in files if f.as_posix() != "README.md"]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    elif (folder / "README.md").is_file():
        validate_card((folder / "README.md").read_text(encoding="utf-8"))
    extra = eval_results_files(eval_results or [])
    files = [f for f in files if f.as_posix() not in extra]
    operations += [CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(folder / f)) for f in files]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in extra.items()]
    api = api if api is not None else HfApi(endpoint=endpoint, token=token)
    try:
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {folder.name} with hf_cft",
            revision=revision,
            repo_type="model",
        )
    except Exception as exc:  # no network, refused, auth, rejected commit: one typed error naming the repo
        where = getattr(api, "endpoint", None) or endpoint or "the Hub"
        raise HubError(f"Cannot push {str(folder)!r} to {repo_id!r} at {where} ({_cause(exc)}).") from exc


# ------------------------------------------------------------------------------------------------ artefacts


def artefact_kind(artefact) -> str:
    """``"adapter"``, ``"model"``, ``"condu"``, ``"pam"`` or ``"folder"`` for an object :func:`push_to_hub` takes."""
    from hf_cft.merging.condu import DeltaFusionMerger
    from hf_cft.merging.pam import PAMState

    if isinstance(artefact, DeltaFusionMerger):
        return "condu"
    if isinstance(artefact, PAMState):
        return "pam"
    if isinstance(artefact, (str, os.PathLike)):
        return "folder"
    if isinstance(getattr(artefact, "peft_config", None), dict):
        return "adapter"
    if hasattr(artefact, "save_pretrained") and hasattr(artefact, "config"):
        return "model"
    raise HubError(
        f"Cannot push a {type(artefact).__name__}: expected a PeftModel, a transformers model, a DeltaFusionMerger, "
        "a PAMState or a saved folder."
    )


def _save_adapter(model, folder: Path, adapter_name: str | None) -> tuple[Path, str]:
    name = adapter_name or model.active_adapter
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name not in model.peft_config:
        raise AdapterError(f"Adapter {name!r} is not in the PEFT model (it has {sorted(model.peft_config)}).")
    model.save_pretrained(str(folder), selected_adapters=[name], safe_serialization=True)
    saved = folder if name == "default" else folder / name  # PEFT nests non-default adapters in a subfolder
    return saved, name


def push_to_hub(
    artefact,
    repo_id: str,
    *,
    card=None,
    card_kwargs: Mapping[str, Any] | None = None,
    card_kind: str | None = None,
    adapter_name: str | None = None,
    eval_results: Sequence[Any] | None = None,
    **push_kwargs,
):
    """Save ``artefact`` to a temporary folder and push it with its card (see :func:`push_folder_to_hub` for
    ``push_kwargs``: ``api``, ``token``, ``endpoint``, ``private``, ``revision``, ``commit_message``).

    Cards: ``card`` as given, else built from ``card_kwargs`` by the artefact's card function — a PEFT model gets
    :func:`~hf_cft.hub.adapter_card` (``card_kind="mergetune"``: :func:`~hf_cft.hub.mergetune_card`), a full model
    :func:`~hf_cft.hub.mergetune_card`, a ConDU merger :func:`~hf_cft.hub.condu_card`, a PAM state
    :func:`~hf_cft.hub.pam_card`. Without either, a card with no results (model name = the repo name). Result rows
    with a Hub ``dataset_id`` also go up as ``.eval_results/*.yaml`` unless ``eval_results`` is given.

    Example::

        push_to_hub(continued, "me/mergetune-coop-dtd", card_kind="mergetune",
                    card_kwargs=dict(model_name="mergetune-coop-dtd", dataset_name="dtd", results=rows))
    """
    kind = artefact_kind(artefact)
    kwargs = dict(card_kwargs or {})
    kwargs.setdefault("repo_id", repo_id)
    default_name = repo_id.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="hf_cft_push_") as tmp:
        folder = Path(tmp)
        if kind == "folder":
            folder = Path(artefact)
        elif kind == "adapter":
            folder, adapter_name = _save_adapter(artefact, folder, adapter_name)
        elif kind == "model":
            artefact.save_pretrained(str(folder), safe_serialization=True)
        else:
            artefact.save_pretrained(str(folder))
        if card is None and (kind != "folder" or card_kwargs is not None):
            card = _build_card(kind if card_kind is None else card_kind, artefact, folder, kwargs, default_name)
        if eval_results is None:
            eval_results = eval_result_entries(kwargs.get("results") or [], kwargs.get("dataset_id"))
        return push_folder_to_hub(folder, repo_id, card=card, eval_results=eval_results, **push_kwargs)


def _build_card(kind: str, artefact, folder: Path, kwargs: dict, default_name: str):
    """The artefact's card from ``kwargs``, reading the saved ``folder`` (the one adapter that was saved)."""
    kwargs.setdefault("model_name", default_name)
    if kind == "adapter":
        kwargs.setdefault("dataset_name", "unspecified")
        return adapter_card(folder, **kwargs)
    if kind in ("mergetune", "model"):
        kwargs.setdefault("dataset_name", "unspecified")
        return mergetune_card(folder, **kwargs)
    if kind == "condu":
        return condu_card(artefact if not isinstance(artefact, (str, os.PathLike)) else _load_condu(folder), **kwargs)
    if kind == "pam":
        from hf_cft.merging.pam import PAMState

        state = artefact if isinstance(artefact, PAMState) else PAMState.from_pretrained(folder)
        return pam_card(state, **kwargs)
    raise HubError(f"Unknown card kind {kind!r}; use adapter, mergetune, condu or pam.")


def _load_condu(folder: Path):
    from hf_cft.merging.condu import DeltaFusionMerger

    return DeltaFusionMerger.from_pretrained(folder)


def push_adapter_to_hub(model, repo_id: str, card_kwargs: Mapping[str, Any] | None = None, **kwargs):
    """Push a PEFT adapter with hf_cft's card (:func:`~hf_cft.hub.adapter_card` built from ``card_kwargs``) instead
    of the card ``PeftModel.push_to_hub`` would write. Same options as :func:`push_to_hub`."""
    if artefact_kind(model) != "adapter":
        raise AdapterError(f"push_adapter_to_hub needs a PeftModel, got {type(model).__name__}.")
    return push_to_hub(model, repo_id, card_kwargs=card_kwargs, **kwargs)


# ------------------------------------------------------------------------------------------------ pulling


def snapshot(
    path_or_repo_id: str | os.PathLike, allow_patterns: Sequence[str] | None = None, revision: str | None = None
) -> Path:
    """A local folder as is, else ``huggingface_hub.snapshot_download`` of the model repo (only ``allow_patterns``;
    pickle files are never requested). Raises :class:`~hf_cft.errors.HubError` naming the repo when it cannot be
    fetched (offline, unknown repo, no access)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo_id).startswith((".", "/")) or str(path_or_repo_id).count("/") > 1:
        raise HubError(f"{str(path_or_repo_id)!r} is not a folder (and not a Hub repo id).")
    try:
        from huggingface_hub import snapshot_download

        patterns = list(allow_patterns) if allow_patterns else ["*.json", "*.safetensors", "*.md", "*.txt", "*.yaml"]
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, auth, bad id: one typed error naming the repo
        raise HubError(
            f"{str(path_or_repo_id)!r} is neither a local folder nor a downloadable Hub repo ({_cause(exc)})."
        ) from exc


def _check_adapter_folder(folder: Path) -> dict:
    from safetensors import safe_open

    from hf_cft.utils import read_json_object

    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise AdapterError(f"{str(folder)!r} is not a PEFT adapter folder (no adapter_config.json).")
    config = read_json_object(cfg_file, AdapterError, f"adapter_config.json of {str(folder)!r}")
    _check_lora_numbers(config, f"adapter_config.json of {str(folder)!r}")
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" It holds {', '.join(pickled)}: hf_cft reads safetensors only (never pickle)." if pickled else ""
        raise AdapterError(f"Adapter folder {str(folder)!r} has no adapter_model.safetensors.{hint}")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open handles are not mappings
                fh.get_slice(key).get_shape()
    except Exception as exc:
        raise BundleError(f"{str(weights)!r} is not a readable safetensors file: {exc}") from exc
    return config


def _check_lora_numbers(config: dict, what: str) -> None:
    """A LoRA config's rank and alpha (and their per-module patterns) must be a positive integer and a finite
    number: PEFT would fill in ``r = 8`` for a missing rank and fail deep inside on ``lora_alpha = "abc"``."""
    from hf_cft.validation import check_int, check_number

    if str(config.get("peft_type", "")).upper() != "LORA":
        return
    if "r" not in config:
        raise AdapterError(f"{what} has no LoRA rank 'r'.")
    check_int(config["r"], f"{what}: 'r'", low=1, error=AdapterError)
    if "lora_alpha" in config:
        check_number(config["lora_alpha"], f"{what}: 'lora_alpha'", error=AdapterError)
    for field, check in (("rank_pattern", check_int), ("alpha_pattern", check_number)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{what}: {field!r} must be an object, got {type(pattern).__name__}.")
        for module, value in pattern.items():
            kw = {"low": 1} if check is check_int else {}
            check(value, f"{what}: {field}[{module!r}]", error=AdapterError, **kw)


def load_adapter_model(
    base_model,
    path_or_repo_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    revision: str | None = None,
    strict: bool = True,
):
    """``PeftModel.from_pretrained`` of an adapter folder or Hub repo, after checking it: ``adapter_config.json``
    valid, ``adapter_model.safetensors`` present and readable (a folder with only ``adapter_model.bin`` is refused,
    never unpickled). Raises :class:`~hf_cft.errors.AdapterError` naming the adapter (also when its tensors do not
    fit ``base_model``) or :class:`~hf_cft.errors.BundleError` for corrupt weights.

    What PEFT would only warn about is refused (``AdapterError`` naming the keys or files): adapter keys missing from
    the file (an empty or renamed CoOp context would stay random) or keys the adapter does not have, integer
    tensors for float weights, files symlinked out of the folder, an adapter recorded as trained on another base
    model (``base_model_name_or_path`` a local folder whose weights differ from ``base_model``'s); NaN/inf weights
    raise :class:`~hf_cft.errors.NonFiniteError`. ``strict=False`` is the explicit opt-in to a partial load."""
    from peft import PeftModel

    from hf_cft.validation import inside_folder

    folder = snapshot(path_or_repo_id, ["adapter_config.json", "adapter_model.safetensors", "*.md"], revision)
    what = f"adapter {str(path_or_repo_id)!r}"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if (folder / name).exists():
            inside_folder(folder, name, AdapterError, what)
    config = _check_adapter_folder(folder)
    _check_same_base(base_model, config, what)
    try:
        model = PeftModel.from_pretrained(
            base_model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable
        )
    except Exception as exc:  # size mismatch (another base model), unknown peft_type, bad config values
        raise AdapterError(
            f"Cannot load adapter {str(path_or_repo_id)!r} into {type(base_model).__name__}: {exc}"
        ) from exc
    check_loaded_adapter(model, folder, adapter_name, what, strict=strict)
    return model


def check_loaded_adapter(model, folder: str | os.PathLike, adapter_name: str, what: str, strict: bool = True) -> None:
    """After PEFT loaded the adapter of ``folder`` into ``model`` as ``adapter_name``: with ``strict``,
    :class:`~hf_cft.errors.AdapterError` naming the adapter's keys the file lacks (PEFT keeps their random
    initialisation with only a warning: an empty or renamed CoOp context) and the file's keys the adapter does not
    have; always an ``AdapterError`` for integer tensors where the adapter's are float and
    :class:`~hf_cft.errors.NonFiniteError` naming a NaN/inf tensor. Used by :func:`load_adapter_model` and by
    ``MergeTuneTrainer`` for the fine-tuned adapter it loads."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from hf_cft.validation import check_finite_tensor, check_state_keys, inside_folder

    weights = inside_folder(folder, "adapter_model.safetensors", AdapterError, what)
    try:
        saved = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise BundleError(f"{str(weights)!r} is not a readable safetensors file: {exc}") from exc
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    check_state_keys(expected, saved, what, error=AdapterError, strict=strict)
    for key, t in saved.items():
        ref = expected.get(key)
        if ref is not None and ref.is_floating_point() and not t.is_floating_point():
            raise AdapterError(f"{what}: tensor {key!r} is {t.dtype} but the adapter's is {ref.dtype}.")
        check_finite_tensor(t, f"{what}: tensor {key!r}")


def load_adapter(base_model, path_or_repo_id: str | os.PathLike, *args, **kwargs):
    """Deprecated alias of :func:`load_adapter_model` (removed in the next release): its name shadowed
    ``PeftModel.load_adapter(path, adapter_name)``, which takes other arguments and adds an adapter to a model."""
    import warnings

    warnings.warn(
        "hf_cft.hub.load_adapter(base, path) is renamed load_adapter_model(base, path) (it differs from PEFT's "
        "PeftModel.load_adapter(path, adapter_name)); the old name goes in the next release.",
        FutureWarning,
        stacklevel=user_stacklevel(),
    )
    return load_adapter_model(base_model, path_or_repo_id, *args, **kwargs)


def _check_same_base(base_model, config: dict, what: str) -> None:
    """When the adapter records its base as a local model folder other than ``base_model``'s, their weights (a
    fingerprint of keys, shapes and a few values) must agree: a CoOp context trained on another CLIP of the same
    shape loads without any size error but means nothing there."""
    recorded = config.get("base_model_name_or_path")
    own = getattr(getattr(base_model, "config", None), "_name_or_path", None) or getattr(
        base_model, "name_or_path", None
    )
    if not recorded or not Path(str(recorded)).is_dir() or not (Path(str(recorded)) / "config.json").is_file():
        return
    if own and Path(str(own)).exists() and Path(str(own)).resolve() == Path(str(recorded)).resolve():
        return
    from hf_cft.merging.deltas import base_fingerprint

    try:
        theirs = base_fingerprint(str(recorded))
    except HfCftError:
        return  # the recorded folder is not readable as weights: nothing to compare with
    if theirs != base_fingerprint(base_model):
        raise AdapterError(
            f"{what} was trained on another base model ({str(recorded)!r}, fingerprint {theirs}) than the one given "
            f"({type(base_model).__name__} {own!r}, fingerprint {base_fingerprint(base_model)})."
        )


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _check_loaded_dtypes(files, state: dict, error, what: str) -> None:
    """A floating tensor of the model may only come from a floating tensor of the files (no silent int→float)."""
    from hf_cft.validation import safetensors_dtypes

    for path in sorted(set(files.values())):
        for key, dtype in safetensors_dtypes(path).items():
            t = state.get(key)
            if t is not None and t.is_floating_point() and dtype not in _FLOAT_DTYPES:
                raise error(f"{what}: tensor {key!r} in {path.name!r} is {dtype} but the model's is {t.dtype}.")


def load_model(path_or_repo_id: str | os.PathLike, revision: str | None = None, strict: bool = True):
    """A CLIP-like model (``AutoModel``, eval mode) from a folder or Hub repo holding ``config.json`` and
    safetensors weights. A folder with only pickle weights (``pytorch_model.bin``) raises
    :class:`~hf_cft.errors.BundleError` instead of being unpickled; a model that is not a dual encoder raises
    :class:`~hf_cft.errors.NotCLIPLikeError`.

    What cannot be vouched for raises :class:`~hf_cft.errors.BundleError` naming the key or file: weights missing
    for some of the model's keys (transformers would fill them with random values) or keys the model does not
    have, integer tensors for float weights, a ``model.safetensors.index.json`` naming anything but safetensors
    files inside the folder, weight files symlinked out of the folder. ``strict=False`` is the explicit opt-in to a
    partial load (missing keys keep the model's initial values, with transformers' warning)."""
    from transformers import AutoModel

    from hf_cft.models.clip import check_clip_like
    from hf_cft.validation import check_state_keys, safetensors_files

    folder = snapshot(path_or_repo_id, None, revision)
    what = f"model {str(path_or_repo_id)!r}"
    if not (folder / "config.json").is_file():
        raise BundleError(f"{str(path_or_repo_id)!r} is not a model folder (no config.json).")
    files = safetensors_files(folder, BundleError, what, PICKLE_SUFFIXES)
    try:
        model, info = AutoModel.from_pretrained(str(folder), use_safetensors=True, output_loading_info=True)
    except Exception as exc:  # corrupt weights or config: transformers raises many types
        raise BundleError(f"Cannot load a model from {str(path_or_repo_id)!r}: {type(exc).__name__}: {exc}") from exc
    try:
        check_clip_like(model)
    except NotCLIPLikeError as exc:
        raise NotCLIPLikeError(f"{str(path_or_repo_id)!r}: {exc}") from exc
    state = model.state_dict()
    # transformers' own accounting: it already forgives what the architecture declares ignorable (e.g. the
    # position_ids buffers older CLIP checkpoints hold) and tied weights
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    check_state_keys(state, (set(state) - missing) | unexpected, what, error=BundleError, strict=strict)
    if strict and info.get("mismatched_keys"):
        raise BundleError(f"{what}: tensor(s) of another shape: {list(info['mismatched_keys'])[:4]}.")
    _check_loaded_dtypes(files, state, BundleError, what)
    return model.eval()
