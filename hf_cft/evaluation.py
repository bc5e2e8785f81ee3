"""One evaluation call for every model hf_cft produces: :func:`evaluate` and the logits behind it,
:func:`class_logits`.

The model decides how its class logits are computed — nothing it carries is ignored:

================================================  =============================================================
model                                             class logits for images ``x`` and class names ``C``
================================================  =============================================================
CLIP-like model (zero-shot, merged, fine-tuned)   ``scale · f_img(x) @ T(C)ᵀ`` with the template-ensembled head T
``PeftModel`` with CoOp prompts                   the same with the head of the learned prompts
                                                  (``class_text_features``)
``PeftModel`` with VPT prompts or LoRA            the template-ensembled head, both towers through the adapter
``PeftModel`` with a linear head                  ``head(f_img(x))`` restricted to the columns of ``C``
:class:`~hf_cft.merging.SemanticRouter`           ConDU's routed fusion, or the expert of ``task=`` (task id known)
:class:`~hf_cft.merging.DeltaFusionMerger`        as the router, built with ``top_k`` over the merger's
                                                  ``base_model``
================================================  =============================================================

Example::

    import hf_cft

    result = hf_cft.evaluate(peft_model, tokenizer, dataset, base_novel=True)   # CoOp/VPT/head/LoRA/ConDU/CLIP
    print(result)                     # EvaluationResult(dtd10 test, CoOp adapter 'default': base 80.00% ...)
    result.hm, result.rows()          # the numbers, and card rows for hf_cft.hub.adapter_card(results=...)
    logits = hf_cft.class_logits(peft_model, tokenizer, pixel_values, ["cat", "dog"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hf_cft.errors import AdapterError, DatasetFormatError, NonFiniteError
from hf_cft.models.families import image_inputs
from hf_cft.models.zeroshot import ZeroShotResult

__all__ = ["EvaluationResult", "class_logits", "describe_model", "evaluate", "eval_transform"]

#: PEFT types whose adapter changes the classifier itself (not only the features a zero-shot head sees).
CLASSIFIER_PEFT_TYPES = {"HF_CFT_COOP": "CoOp", "HF_CFT_HEAD": "linear head"}
_PEFT_NAMES = {"HF_CFT_COOP": "CoOp", "HF_CFT_VPT": "VPT", "HF_CFT_HEAD": "linear-head", "LORA": "LoRA"}


# ------------------------------------------------------------------------------------------------ model kinds


def _active_adapter(model) -> tuple[str, object] | None:
    """``(adapter name, config)`` of a ``PeftModel``'s active adapter; ``None`` for any other model."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(model, "get_base_model"):
        return None
    name = model.active_adapter
    if isinstance(name, (list, tuple)):
        name = name[0]
    return name, configs[name]


def _peft_type(cfg) -> str:
    return str(getattr(cfg.peft_type, "value", cfg.peft_type))


def _is_router(model) -> bool:
    from hf_cft.merging.router import SemanticRouter

    return isinstance(model, SemanticRouter)


def _is_merger(model) -> bool:
    from hf_cft.merging.condu import DeltaFusionMerger

    return isinstance(model, DeltaFusionMerger)


def _torch_model(model) -> torch.nn.Module:
    """The ``nn.Module`` that runs the images: the model itself, or a ConDU router's / merger's base model."""
    if _is_router(model) or _is_merger(model):
        if model.base_model is None:
            raise AdapterError(
                "A DeltaFusionMerger is evaluated through its semantic router, which needs the base model: load it "
                "with DeltaFusionMerger.from_pretrained(path, base_model=clip), or pass SemanticRouter(merger, clip, "
                "tokenizer)."
            )
        return model.base_model
    return model


def describe_model(model, task: str | None = None) -> str:
    """What :func:`evaluate` evaluates, in words (e.g. ``"CoOp adapter 'default'"``,
    ``"ConDU bundle (routing, top-4)"``, ``"CLIPModel, template-ensembled text head"``)."""
    if _is_router(model):
        return f"ConDU bundle ({f'task {task!r}' if task else f'routing, top-{model.top_k}'})"
    if _is_merger(model):
        return f"ConDU bundle ({f'task {task!r}' if task else 'routing'})"
    active = _active_adapter(model)
    if active is not None:
        name, cfg = active
        kind = _peft_type(cfg)
        return f"{_PEFT_NAMES.get(kind, kind)} adapter {name!r}"
    return f"{type(model).__name__}, template-ensembled text head"


def classifier_adapter(model) -> tuple[str, str] | None:
    """``(adapter name, method)`` when ``model`` is a ``PeftModel`` whose *active, enabled* adapter changes the
    classifier (CoOp prompts or a linear head) — the adapters a zero-shot text head would silently ignore."""
    active = _active_adapter(model)
    if active is None:
        return None
    name, cfg = active
    kind = _peft_type(cfg)
    if kind not in CLASSIFIER_PEFT_TYPES:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    enabled = any(
        isinstance(m, BaseTunerLayer) and not m.disable_adapters and name in m.active_adapters for m in model.modules()
    )
    return (name, CLASSIFIER_PEFT_TYPES[kind]) if enabled else None


# ------------------------------------------------------------------------------------------------ classifiers


def _head_columns(cfg, classnames: list[str], name: str) -> list[int]:
    """Columns of a linear head for ``classnames``: by name when the head records its class names, else all of
    them in order (the head must then have exactly ``len(classnames)`` classes)."""
    head_names = list(cfg.classnames or [])
    if head_names:
        missing = [c for c in classnames if c not in head_names]
        if missing:
            raise AdapterError(
                f"The linear-head adapter {name!r} was trained on {len(head_names)} classes "
                f"({', '.join(map(repr, head_names[:4]))}{', ...' if len(head_names) > 4 else ''}) and has no output "
                f"for {missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: a head only "
                "classifies the classes it was trained on."
            )
        return [head_names.index(c) for c in classnames]
    if cfg.num_classes != len(classnames):
        raise AdapterError(
            f"The linear-head adapter {name!r} has {cfg.num_classes} classes and records no class names; the data "
            f"has {len(classnames)} classes."
        )
    return list(range(len(classnames)))


def _classifier(
    model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] | None,
    task: str | None = None,
    top_k: int = 4,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``pixel_values -> logits [N, C]`` for ``model`` and ``classnames`` (text side computed once)."""
    from hf_cft.data.templates import DEFAULT_TEMPLATES, validate_classnames, validate_templates
    from hf_cft.models.clip import check_clip_like, clip_logits, image_features, model_device
    from hf_cft.models.zeroshot import build_zeroshot_classifier

    classnames = validate_classnames(list(classnames))
    templates = validate_templates(list(templates) if templates is not None else DEFAULT_TEMPLATES)
    if _is_merger(model):
        from hf_cft.merging.router import SemanticRouter

        model = SemanticRouter(model, _torch_model(model), tokenizer, top_k=top_k)
    if _is_router(model):
        if task is not None:
            model.merger.task_index(task)  # a TaskError naming an unknown task
        router = model
        return lambda px, **kw: router.logits(px, classnames, templates, task=task, **kw).float()
    if task is not None:
        raise AdapterError(f"task={task!r} selects the expert of a ConDU bundle; {describe_model(model)} has none.")
    base = check_clip_like(model)
    active = _active_adapter(model)
    kind = _peft_type(active[1]) if active is not None else None
    if classifier_adapter(model) is None:
        kind = None  # the adapter is disabled: the base model's zero-shot head
    if kind == "HF_CFT_HEAD":
        cols = torch.tensor(_head_columns(active[1], classnames, active[0]))
        return lambda px, **kw: model.head_logits(image_features(model, px, **kw))[:, cols.to(px.device)].float()
    with torch.no_grad():
        if kind == "HF_CFT_COOP":
            head = model.class_text_features(tokenizer, classnames).float()
        else:
            head = build_zeroshot_classifier(model, tokenizer, classnames, templates)
    if not bool(torch.isfinite(head).all()):
        raise NonFiniteError(f"The class text features of {describe_model(model)} hold NaN/inf.")
    head = head.to(model_device(model))
    return lambda px, **kw: clip_logits(base, image_features(model, px, normalize=True, **kw).float(), head)


@torch.no_grad()
def class_logits(
    model,
    tokenizer,
    pixel_values: torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    *,
    task: str | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class logits ``[N, C]`` (fp32) of ``model`` for images and class names — the one call for every hf_cft
    model, with whatever it carries (see the module table): a plain CLIP gets the template-ensembled zero-shot head
    (``templates``, default ``["a photo of a {}."]``), a ``PeftModel`` its CoOp prompts / VPT tokens / LoRA / linear
    head (restricted to ``classnames``' columns), a :class:`~hf_cft.merging.SemanticRouter` or a
    :class:`~hf_cft.merging.DeltaFusionMerger` with ``base_model`` ConDU's routed logits, or those of the expert of
    ``task`` when the task id is known.

    ``pixel_values`` are already transformed (``[N, 3, H, W]``; see :func:`eval_transform`); SigLIP2 (NaFlex) takes
    its patches ``[N, P, 3·p²]`` with ``pixel_attention_mask`` and ``spatial_shapes``, as its image processor
    returns them. Evaluating many
    batches? :func:`evaluate` computes the text side once.

    **transformers' pipeline.** A plain CLIP folder as hf_cft writes it (model, tokenizer and
    ``preprocessor_config.json``: the pretraining recipe, ``hf-cft merge``) works as
    ``pipeline("zero-shot-image-classification", model=folder)``, with the probabilities of
    ``class_logits(model, tokenizer, pixel_values, labels, ["This is a photo of {}."]).softmax(-1)``; a LoRA
    adapter too after ``peft_model.merge_and_unload()`` (pass ``tokenizer=`` and ``image_processor=``). CoOp
    prompts and a linear head cannot be used there: the pipeline writes its own text prompts and reads the
    model's ``logits_per_image``, which has no place for learned context vectors or a classification head (and a
    ConDU bundle is several models) — use this function or :func:`evaluate` for them.
    """
    from hf_cft.models.clip import model_device

    fn = _classifier(model, tokenizer, classnames, templates, task=task)
    extra = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
    return fn(pixel_values.to(model_device(_torch_model(model))), **{k: v for k, v in extra.items() if v is not None})


# ------------------------------------------------------------------------------------------------ results


@dataclass(repr=False)
class EvaluationResult:
    """What :func:`evaluate` returns: one :class:`~hf_cft.models.ZeroShotResult` per evaluated split
    (``"all"``, or ``"base"`` and ``"novel"`` with ``base_novel=True``) and what was evaluated.

    ``accuracy`` (all classes), ``base``, ``novel`` and ``hm`` are percentages (``None`` when not measured);
    :meth:`rows` gives the result rows of hf_cft's model cards, :meth:`to_dict` a JSON-ready dict.
    """

    evaluated: str
    dataset: str | None
    split: str
    splits: dict[str, ZeroShotResult] = field(default_factory=dict)
    classnames: dict[str, list[str]] = field(default_factory=dict)

    def _acc(self, key: str) -> float | None:
        return self.splits[key].accuracy if key in self.splits else None

    @property
    def accuracy(self) -> float | None:
        return self._acc("all")

    @property
    def base(self) -> float | None:
        return self._acc("base")

    @property
    def novel(self) -> float | None:
        return self._acc("novel")

    @property
    def hm(self) -> float | None:
        from hf_cft.metrics.classification import harmonic_mean

        return None if self.base is None or self.novel is None else harmonic_mean(self.base, self.novel)

    @property
    def metrics(self) -> dict[str, float]:
        """``{"accuracy": ...}`` or ``{"base": ..., "novel": ..., "hm": ...}``."""
        out = {k: r.accuracy for k, r in self.splits.items()}
        if "all" in out:
            out["accuracy"] = out.pop("all")
        if self.hm is not None:
            out["hm"] = self.hm
        return out

    def rows(self) -> list[dict]:
        """Result rows for the card functions of :mod:`hf_cft.hub` (``results=result.rows()``)."""
        return [
            {
                "name": (self.dataset or "all") if key == "all" else key,
                "num_classes": len(self.classnames[key]),
                "accuracy": r.accuracy,
                "split": self.split,
            }
            for key, r in self.splits.items()
        ]

    def to_dict(self) -> dict:
        return {
            "evaluated": self.evaluated,
            "dataset": self.dataset,
            "split": self.split,
            **self.metrics,
            "splits": {k: {**r.to_dict(), "num_classes": len(self.classnames[k])} for k, r in self.splits.items()},
        }

    def __repr__(self) -> str:
        parts = [
            f"{k if k != 'all' else 'accuracy'} {r.accuracy:.2f}% ({r.total} images, {len(self.classnames[k])} "
            "classes)"
            for k, r in self.splits.items()
        ]
        if self.hm is not None:
            parts.append(f"HM {self.hm:.2f}")
        where = " ".join(p for p in (self.dataset, self.split) if p)
        return f"EvaluationResult({where}, {self.evaluated}: {', '.join(parts)})"


# ------------------------------------------------------------------------------------------------ evaluate


def eval_transform(model):
    """The evaluation :class:`~hf_cft.data.ImageTransform` of ``model``: from the image processor saved in the
    model's folder (``config._name_or_path``) when there is one, else its vision ``image_size`` with CLIP
    statistics. For a ConDU router or merger, that of its base model."""
    from pathlib import Path

    from hf_cft.data.transforms import ImageTransform
    from hf_cft.models.clip import unwrap_model

    base = unwrap_model(_torch_model(model))
    folder = getattr(getattr(base, "config", None), "_name_or_path", None)
    if folder and (Path(folder) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return ImageTransform.from_processor(AutoImageProcessor.from_pretrained(str(folder)))
    return ImageTransform.from_model(base)


def _split_of(dataset, split: str | None, classnames, templates, name):
    """``(datasets.Dataset, class names, templates, name, split name)`` of what :func:`evaluate` was given."""
    import datasets

    from hf_cft.data.loading import ClassificationDataset

    if isinstance(dataset, ClassificationDataset):
        split = split or ("test" if "test" in dataset else next(iter(dataset.splits)))
        classnames = classnames if classnames is not None else dataset.classnames
        templates = templates if templates is not None else dataset.templates
        return dataset[split], classnames, templates, name or dataset.name, split
    if isinstance(dataset, datasets.DatasetDict):
        split = split or ("test" if "test" in dataset else next(iter(dataset)))
        if split not in dataset:
            raise DatasetFormatError(f"The DatasetDict has no split {split!r}; it has {list(dataset)}.")
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise DatasetFormatError(
            f"evaluate() takes a datasets.Dataset / DatasetDict with image and label columns or a "
            f"ClassificationDataset, got {type(dataset).__name__}."
        )
    if "label" not in dataset.column_names or "image" not in dataset.column_names:
        raise DatasetFormatError(
            f"The dataset to evaluate needs 'image' and 'label' columns (raw images; evaluate() applies the model's "
            f"transform itself); it has {dataset.column_names}."
        )
    if classnames is None:
        names = getattr(dataset.features["label"], "names", None)
        if not names:
            raise DatasetFormatError(
                "The dataset's label column is not a ClassLabel with names; pass classnames=[...]."
            )
        classnames = names
    return dataset, classnames, templates, name, split or "test"


@torch.no_grad()
def _run(fn, dataset, transform, batch_size: int, num_workers: int, name: str | None, device, progress: bool):
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from hf_cft.data.transforms import ImageClassificationCollator, apply_image_transform

    if len(dataset) == 0:
        raise DatasetFormatError(f"The dataset{f' {name!r}' if name else ''} to evaluate is empty.")
    loader = DataLoader(
        apply_image_transform(dataset, transform, name=name),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=ImageClassificationCollator(),
        num_workers=num_workers,
    )
    preds, labels = [], []
    for batch in tqdm(loader, desc=f"evaluate {name or ''}".strip(), disable=not progress, leave=False):
        logits = fn(batch["pixel_values"].to(device), **image_inputs(batch))
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(
                f"The logits on{f' dataset {name!r}' if name else ' the dataset'} hold NaN/inf: the model's weights "
                "(or the images) are not finite."
            )
        preds.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(preds), torch.cat(labels)


def evaluate(
    model,
    tokenizer,
    dataset,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    split: str | None = None,
    base_novel: bool = False,
    task: str | None = None,
    top_k: int = 4,
    transform=None,
    batch_size: int = 64,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    name: str | None = None,
) -> EvaluationResult:
    """Accuracy of ``model`` — whatever it carries, see :func:`class_logits` — on a raw image dataset.

    ``dataset``: a :class:`~hf_cft.data.ClassificationDataset` (its ``split``, default ``test``, with its class
    names and templates), a ``datasets.DatasetDict`` or a ``datasets.Dataset`` with ``image`` and ``label`` columns
    (class names from the ``ClassLabel`` unless given). The model's evaluation transform (:func:`eval_transform`)
    is applied here unless ``transform`` is given. ``limit``: only the first N images (before any class split).

    ``base_novel=True`` splits the classes as the base-to-novel recipes do (:func:`hf_cft.data.base_novel_split`:
    base = the first ⌈C/2⌉ class ids, novel = the rest) and evaluates each part over its own classes only, so
    the result has ``base``, ``novel`` and ``hm`` (CoCoOp's protocol). A CoOp adapter with class-specific
    contexts has no prompts for other classes and a linear head no outputs for classes it was not trained on:
    both raise :class:`~hf_cft.errors.AdapterError` naming the class instead of guessing.

    ``task`` (ConDU only): the task id, known — its expert alone; default: routing over ``top_k`` experts (a
    :class:`~hf_cft.merging.SemanticRouter` passed as ``model`` keeps its own ``top_k``).

    Example::

        result = hf_cft.evaluate(coop_model, tokenizer, hf_cft.load_classification_dataset("dtd10"),
                                 base_novel=True)
        result.base, result.novel, result.hm
    """
    from hf_cft.data.sampling import base_novel_split
    from hf_cft.metrics import accuracy, per_class_accuracy
    from hf_cft.models.clip import model_device

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    data, classnames, templates, name, split = _split_of(dataset, split, classnames, templates, name)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}.")
        data = data.select(range(min(limit, len(data))))
    classnames = list(classnames)
    num_labels = getattr(data.features["label"], "num_classes", None)
    if num_labels is not None and num_labels != len(classnames):
        from hf_cft.errors import ClassNamesError

        raise ClassNamesError(
            f"{len(classnames)} class names for a label column with {num_labels} classes"
            f"{f' (dataset {name!r})' if name else ''}."
        )
    if base_novel:
        import datasets

        if not isinstance(data.features["label"], datasets.ClassLabel):
            data = data.cast_column("label", datasets.ClassLabel(names=classnames))
        base_ds, novel_ds, base_ids, novel_ids = base_novel_split(data)
        parts = {
            "base": (base_ds, [classnames[i] for i in base_ids]),
            "novel": (novel_ds, [classnames[i] for i in novel_ids]),
        }
    else:
        parts = {"all": (data, classnames)}
    target = _torch_model(model)
    transform = transform or eval_transform(model)
    device = model_device(target)
    was_training = target.training
    target.eval()
    result = EvaluationResult(describe_model(model, task), name, split)
    try:
        for key, (part, names) in parts.items():
            fn = _classifier(model, tokenizer, names, templates, task=task, top_k=top_k)
            where = name if key == "all" else f"{name or 'dataset'} ({key} classes)"
            preds, labels = _run(fn, part, transform, batch_size, num_workers, where, device, progress)
            result.splits[key] = ZeroShotResult(
                accuracy=accuracy(preds, labels),
                correct=int((preds == labels).sum()),
                total=int(labels.numel()),
                per_class_accuracy=per_class_accuracy(preds, labels, len(names)),
                predictions=preds,
                labels=labels,
            )
            result.classnames[key] = names
    finally:
        target.train(was_training)
    return result
