"""Zero-shot classification with CLIP-like models: template-ensembled text heads, batched (and optionally
cached) image features, logits with the model's logit scale, and an evaluation loop returning accuracy."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hf_cft.data.templates import format_prompts, validate_classnames, validate_templates
from hf_cft.errors import AdapterError, DatasetFormatError, NonFiniteError
from hf_cft.models.clip import check_clip_like, clip_logits, image_features, model_device, text_features
from hf_cft.models.tokenizer import tokenize_prompts
from hf_cft.validation import check_finite_tensor


@torch.no_grad()
def build_zeroshot_classifier(
    model: nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Template-ensembled text head ``[C, d]``: per class, normalise each template's feature, average over
    templates, normalise again (CLIP's prompt ensembling)."""
    check_clip_like(model)
    classnames = validate_classnames(classnames)
    templates = validate_templates(templates)
    device = torch.device(device) if device is not None else model_device(model)
    prompts = format_prompts(classnames, templates)
    enc = tokenize_prompts(tokenizer, prompts, model)
    feats = []
    for start in range(0, len(prompts), batch_size):
        ids = enc["input_ids"][start : start + batch_size].to(device)
        mask = enc["attention_mask"][start : start + batch_size].to(device)
        feats.append(text_features(model, ids, mask, normalize=True).float())
    per_prompt = torch.cat(feats).view(len(classnames), len(templates), -1)
    bad = (~torch.isfinite(per_prompt)).flatten(1).any(dim=1)
    if bool(bad.any()):  # a NaN head would give arbitrary predictions and a meaningless accuracy
        name = classnames[int(bad.nonzero()[0])]
        raise NonFiniteError(
            f"The text features of class {name!r} hold NaN/inf ({int(bad.sum())} of {len(classnames)} classes): "
            "the model's text-tower weights are not finite."
        )
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class FeatureCache:
    """Image-feature cache keyed by (model weights, data, transform): in memory, and in ``directory`` as
    safetensors when one is given (written atomically, so a crash never leaves a torn file)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._mem: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def model_fingerprint(model: nn.Module) -> str:
        """Hash of every parameter/buffer outside the text tower (the image side's weights)."""
        h = hashlib.blake2b(digest_size=16)
        for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda x: x[0]):
            if "text_model" in name or "text_projection" in name:
                continue
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def key(self, model: nn.Module, data_id: str, extra: str = "") -> str:
        return hashlib.blake2b(
            f"{self.model_fingerprint(model)}|{data_id}|{extra}".encode(), digest_size=16
        ).hexdigest()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._mem:
            return self._mem[key]
        if self.directory is not None and (self.directory / f"{key}.safetensors").is_file():
            from safetensors.torch import load_file

            self._mem[key] = load_file(str(self.directory / f"{key}.safetensors"))
            return self._mem[key]
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], persist: bool = True) -> None:
        """Keep ``tensors`` in memory, and on disk unless ``persist`` is false (in a multi-process run only the main
        process writes; every process holds the gathered features)."""
        self._mem[key] = tensors
        if self.directory is not None and persist:
            from hf_cft.utils import atomic_save_safetensors

            atomic_save_safetensors(
                {k: v.contiguous().cpu() for k, v in tensors.items()}, self.directory / f"{key}.safetensors"
            )


@torch.no_grad()
def encode_images(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "image features",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised image features ``[N, d]`` (fp32, CPU) and labels (or ``None``) over a batch iterable
    (e.g. a ``DataLoader`` with :class:`~hf_cft.data.ImageClassificationCollator`)."""
    from hf_cft.models.families import image_inputs

    check_clip_like(model)
    device = torch.device(device) if device is not None else model_device(model)
    feats, labels = [], []
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
        extra = image_inputs(batch)
        feats.append(image_features(model, pixel_values.to(device), normalize=True, **extra).float().cpu())
        if isinstance(batch, dict) and "labels" in batch:
            labels.append(batch["labels"].cpu())
    if not feats:
        raise DatasetFormatError("encode_images got no batches: the dataset is empty.")
    return torch.cat(feats), (torch.cat(labels) if labels else None)


@torch.no_grad()
def _encode_gathered(model: nn.Module, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features and labels over a dataloader sharded by ``accelerator``, gathered batch by batch with
    ``gather_for_metrics``, which drops the samples accelerate repeats to even out the last batches (gathering the
    concatenated features once would keep them and count some images twice)."""
    from hf_cft.models.families import image_inputs

    feats, labels = [], []
    for batch in loader:
        px = batch["pixel_values"].to(accelerator.device)
        f = image_features(model, px, normalize=True, **image_inputs(batch)).float()
        f, lab = accelerator.gather_for_metrics((f, batch["labels"].to(accelerator.device)))
        feats.append(f.cpu())
        labels.append(lab.cpu())
    if not feats:
        raise DatasetFormatError("The dataset to evaluate is empty.")
    return torch.cat(feats), torch.cat(labels)


@dataclass(repr=False)
class ZeroShotResult:
    """Accuracy (percent) and the pieces it came from (``predictions`` / ``labels``: ``[N]`` tensors, left out of
    the repr)."""

    accuracy: float
    correct: int
    total: int
    per_class_accuracy: list[float] = field(default_factory=list)
    predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "per_class_accuracy": self.per_class_accuracy,
        }

    def __repr__(self) -> str:
        return (
            f"ZeroShotResult(accuracy={self.accuracy:.2f}%, correct={self.correct}/{self.total}, "
            f"{len(self.per_class_accuracy)} classes)"
        )


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer,
    dataset,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 64,
    transform=None,
    device: torch.device | str | None = None,
    cache: FeatureCache | None = None,
    num_workers: int = 0,
    progress: bool = False,
    name: str | None = None,
    accelerator=None,
    head: torch.Tensor | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on ``dataset``.

    ``dataset`` is a ``datasets.Dataset`` with ``image``/``label`` columns, or a
    :class:`~hf_cft.data.ClassificationDataset` (its ``test`` split, class names and templates are used unless
    given). ``transform`` defaults to :meth:`ImageTransform.from_model`. With a :class:`FeatureCache`, image
    features are computed once per (model, data, transform) and reused. With an ``accelerate.Accelerator`` the
    images are sharded over the processes and the features gathered (every process gets the full result).
    ``head`` (``[C, d]``, normalised) replaces the template-ensembled text head, e.g. a CoOp adapter's
    ``class_text_features`` — the same loop then evaluates a prompt-learned classifier.

    A ``PeftModel`` whose active adapter *is* the classifier (CoOp prompts, a linear head) raises
    :class:`~hf_cft.errors.AdapterError` unless ``head`` is given: a zero-shot head would silently ignore what it
    learned. :func:`hf_cft.evaluate` evaluates such models (and every other kind) with what they carry; for the
    zero-shot baseline, pass ``model.get_base_model()`` or use ``with model.disable_adapter():``.
    """
    from torch.utils.data import DataLoader

    from hf_cft.data.loading import ClassificationDataset
    from hf_cft.data.transforms import ImageClassificationCollator, ImageTransform, apply_image_transform
    from hf_cft.metrics import accuracy, per_class_accuracy

    base = check_clip_like(model)
    if head is None:
        from hf_cft.evaluation import classifier_adapter

        carried = classifier_adapter(model)
        if carried is not None:
            raise AdapterError(
                f"evaluate_zeroshot builds a template-ensembled zero-shot head and would ignore the {carried[1]} of "
                f"adapter {carried[0]!r}: call hf_cft.evaluate(model, tokenizer, dataset) to evaluate the adapter, or "
                "pass model.get_base_model() (or use `with model.disable_adapter():`) for the zero-shot baseline."
            )
    if isinstance(dataset, ClassificationDataset):
        name = name or dataset.name
        classnames = classnames if classnames is not None else dataset.classnames
        templates = templates if templates is not None else dataset.templates
        split = "test" if "test" in dataset else next(iter(dataset.splits))
        dataset = dataset[split]
    if classnames is None:
        classnames = dataset.features["label"].names
    templates = list(templates) if templates is not None else ["a photo of a {}."]
    label_feature = dataset.features.get("label")
    num_labels = getattr(label_feature, "num_classes", None)
    classnames = validate_classnames(classnames, owner=f"dataset {name!r}" if name else "", num_labels=num_labels)
    transform = transform or ImageTransform.from_model(base)

    was_training = model.training
    model.eval()
    try:
        key = None
        if cache is not None:
            data_id = f"{getattr(dataset, '_fingerprint', id(dataset))}|{len(dataset)}"
            key = cache.key(base, data_id, transform.key() if hasattr(transform, "key") else repr(transform))
            hit = cache.get(key)
        else:
            hit = None
        if hit is not None:
            feats, labels = hit["features"], hit["labels"]
        else:
            loader = DataLoader(
                apply_image_transform(dataset, transform, name=name),
                batch_size=batch_size,
                shuffle=False,
                collate_fn=ImageClassificationCollator(),
                num_workers=num_workers,
            )
            if len(dataset) == 0:
                raise DatasetFormatError(f"The dataset{f' {name!r}' if name else ''} to evaluate is empty.")
            if accelerator is not None:
                loader = accelerator.prepare_data_loader(loader)
                device = accelerator.device
            if accelerator is not None and accelerator.num_processes > 1:
                feats, labels = _encode_gathered(model, loader, accelerator)
            else:
                feats, labels = encode_images(model, loader, device=device, progress=progress)
            if not bool(torch.isfinite(feats).all()):
                raise NonFiniteError(
                    f"The image features of{f' dataset {name!r}' if name else ' the dataset'} hold NaN/inf: the "
                    "model's image-tower weights (or the images) are not finite."
                )
            if cache is not None:
                cache.put(
                    key,
                    {"features": feats, "labels": labels},
                    persist=accelerator is None or accelerator.is_main_process,
                )
        if head is None:
            head = build_zeroshot_classifier(model, tokenizer, classnames, templates, device=device)
        elif head.shape[0] != len(classnames):
            raise ValueError(f"head has {head.shape[0]} rows for {len(classnames)} classes")
        head = check_finite_tensor(head.detach(), "The classifier head (class text features)")
        check_finite_tensor(base.logit_scale.detach(), "The model's logit_scale")
        with torch.no_grad():
            logits = clip_logits(base, feats.to(head.device), head).cpu()
    finally:
        model.train(was_training)
    preds = logits.argmax(dim=-1)
    correct = int((preds == labels).sum())
    return ZeroShotResult(
        accuracy=accuracy(preds, labels),
        correct=correct,
        total=int(labels.numel()),
        per_class_accuracy=per_class_accuracy(preds, labels, len(classnames)),
        predictions=preds,
        labels=labels,
    )
