"""Evaluation of θ⁰ + δ on a task's test split: template-ensembled head of the task's own classes from the
model's own text tower, normalised image features, top-1 accuracy (Protocol B of ``docs/benchmarks.md``).

θ⁰'s test features and heads are cached per task (they never change), so zero-shot entries cost one pass per
task for the whole run; a delta is evaluated with :func:`~hf_cft.continual.weights.call_with_delta` (no model
copy). :meth:`DeltaEvaluator.accuracy_from_logits` evaluates any per-batch logits function, e.g. ConDU's routed
aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from hf_cft.continual.tasks import TaskSpec
from hf_cft.continual.weights import call_with_delta
from hf_cft.metrics import accuracy
from hf_cft.models import build_zeroshot_classifier, encode_images
from hf_cft.models.clip import clip_logits, model_device


class DeltaEvaluator:
    """Accuracy (%) of θ⁰ + δ on a task's ``test`` rows (model-ready: ``pixel_values`` and ``labels``).

    Example::

        ev = DeltaEvaluator(clip, tokenizer, batch_size=128)
        zero_shot = ev.accuracy(task)
        expert = ev.accuracy(task, delta=expert_delta)
    """

    def __init__(
        self, model: nn.Module, tokenizer, batch_size: int = 128, num_workers: int = 0, progress: bool = False
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self._base_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._base_heads: dict[tuple, torch.Tensor] = {}

    def loader(self, dataset):
        from torch.utils.data import DataLoader

        from hf_cft.data.transforms import ImageClassificationCollator

        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=ImageClassificationCollator(),
            num_workers=self.num_workers,
        )

    @torch.no_grad()
    def features(self, task: TaskSpec, delta: Mapping[str, torch.Tensor] | None = None):
        """Normalised image features ``[N, d]`` and labels of ``task.test`` under θ⁰ + δ (θ⁰: cached)."""
        if not delta and task.name in self._base_features:
            return self._base_features[task.name]
        out = call_with_delta(
            self.model, delta, encode_images, self.loader(task.test), progress=self.progress, desc=task.name
        )
        if not delta:
            self._base_features[task.name] = out
        return out

    @torch.no_grad()
    def head(self, classnames: Sequence[str], templates: Sequence[str], delta=None) -> torch.Tensor:
        """Template-ensembled class head ``[C, d]`` from θ⁰ + δ's text tower (θ⁰: cached)."""
        key = (tuple(classnames), tuple(templates))
        if not delta and key in self._base_heads:
            return self._base_heads[key]
        h = call_with_delta(self.model, delta, build_zeroshot_classifier, self.tokenizer, classnames, templates)
        if not delta:
            self._base_heads[key] = h
        return h

    @torch.no_grad()
    def accuracy(self, task: TaskSpec, delta: Mapping[str, torch.Tensor] | None = None) -> float:
        """Top-1 accuracy (%) of θ⁰ + δ on ``task.test`` with the template ensemble of the task's classes."""
        feats, labels = self.features(task, delta)
        head = self.head(task.classnames, task.templates, delta)
        logits = clip_logits(self.model, feats.to(head.device), head)
        return accuracy(logits.argmax(-1).cpu(), labels)

    @torch.no_grad()
    def accuracy_from_logits(self, task: TaskSpec, logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Top-1 accuracy (%) of ``logits_fn(pixel_values) -> [B, C]`` over ``task.test``."""
        device = model_device(self.model)
        preds, labels = [], []
        for batch in self.loader(task.test):
            logits = logits_fn(batch["pixel_values"].to(device))
            if logits.shape != (batch["pixel_values"].shape[0], task.num_classes):
                raise ValueError(
                    f"logits for task {task.name!r} have shape {tuple(logits.shape)}, expected "
                    f"({batch['pixel_values'].shape[0]}, {task.num_classes})"
                )
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"])
        return accuracy(torch.cat(preds), torch.cat(labels))
