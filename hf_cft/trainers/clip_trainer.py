"""``ClipClassificationTrainer``: classification fine-tuning of CLIP-like models with any hf_cft PEFT method
(CoOp, VPT, linear head), PEFT LoRA, or full fine-tuning.

Logits are ``exp(logit_scale) · cos(image, class text)``, with the class text features recomputed once per step
for all classes (or taken from the linear head), image features once per batch. Frozen towers run without a
graph, and a frozen text tower's head is computed once and reused.

The user's model is wrapped in a small :class:`ClipClassifier` module so that, under DDP, the whole computation
runs through the wrapped module's ``forward`` (gradients are synchronised only for work done inside it);
checkpoints and ``save_model`` still save the user's model (a PEFT adapter folder or a full model).

Multi-process runs (``accelerate launch``) follow the Trainer's semantics: ``per_device_train_batch_size`` is per
process, so N processes with B/N each see the same global batches as one process with B (accelerate shards each
global batch of the seeded sampler over the ranks; DDP averages the per-rank mean losses' gradients). Two things
would still make N processes differ from one, and are handled here:

- random crops from :func:`~hf_cft.data.apply_image_transform` are keyed by (seed, epoch, image), with the epoch set
  by a callback, so they do not depend on which rank transforms an image;
- when an epoch's size is not a multiple of the global batch, accelerate completes the last global batch with
  samples repeated from the epoch's start (``even_batches``), which one process does not train on. The trainer
  tags that last batch (:meth:`get_batch_samples`): each process keeps only its real rows and weights its loss by
  ``real rows · N / real rows of the global batch``, so DDP's average is the mean over the real rows — the
  1-process loss and gradient of the partial batch (a process with no real row contributes zero).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_cft.data.templates import format_prompts, validate_classnames, validate_templates
from hf_cft.data.transforms import (
    ImageClassificationCollator,
    ImageTransform,
    apply_image_transform,
    model_transform,
)
from hf_cft.errors import AdapterError, CardError, DatasetFormatError, HubError, NonFiniteError
from hf_cft.models.clip import check_clip_like, image_features, logit_scale, text_features
from hf_cft.models.families import image_inputs
from hf_cft.models.tokenizer import tokenize_prompts
from hf_cft.trainers.clip_config import ClipTrainingArguments
from hf_cft.utils import user_stacklevel


def _find_tuner(model: nn.Module, cls_name: str):
    base_model = getattr(model, "base_model", None)
    if base_model is not None and type(base_model).__name__ == cls_name:
        return base_model
    return None


def _active_adapter_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if isinstance(cfg, dict) and isinstance(active, str) and active in cfg:
        return str(cfg[active].peft_type)
    return None


_HEAD_PARAMS = ("head_weight", "head_bias")


def _has_trainable(module: nn.Module, needles: Sequence[str]) -> bool:
    return any(
        p.requires_grad and any(n in name for n in needles) and not any(h in name for h in _HEAD_PARAMS)
        for name, p in module.named_parameters()
    )


_IMAGE_COLUMNS = ("image", "img")
_LABEL_COLUMNS = ("label", "labels")
_APPLY_HINT = (
    "pass a dataset with an image column and a label column (e.g. a split of hf_cft.load_classification_dataset "
    "or hf_cft.few_shot), or transform it yourself with hf_cft.data.apply_image_transform(dataset, "
    "hf_cft.data.model_transform(model), image_column=..., label_column=...)"
)


def _image_and_label_columns(dataset) -> tuple[str | None, str | None]:
    """The image and label columns of a ``datasets.Dataset`` (an ``Image`` feature or a column named image/img;
    label/labels), ``None`` where there is none."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    columns = list(getattr(dataset, "column_names", None) or [])
    image = next((c for c in columns if isinstance(features.get(c), datasets.Image)), None)
    image = image or next((c for c in _IMAGE_COLUMNS if c in columns), None)
    label = next((c for c in _LABEL_COLUMNS if c in columns), None)
    return image, label


def _has_transform(dataset) -> bool:
    fmt = getattr(dataset, "format", None)
    return isinstance(fmt, dict) and fmt.get("format_kwargs", {}).get("transform") is not None


def _is_raw_image_dataset(dataset) -> bool:
    """A ``datasets.Dataset`` of undecoded/decoded images and labels with no transform yet."""
    import datasets

    if not isinstance(dataset, datasets.Dataset) or _has_transform(dataset):
        return False
    image, label = _image_and_label_columns(dataset)
    return image is not None and label is not None and "pixel_values" not in dataset.column_names


def _prepare_image_dataset(dataset, make_transform, num_classes: int, what: str, train: bool):
    """See :meth:`ClipClassificationTrainer.prepare_dataset`."""
    import datasets

    from hf_cft.data.loading import ClassificationDataset

    if isinstance(dataset, (ClassificationDataset, datasets.DatasetDict)):
        splits = list(dataset.splits if isinstance(dataset, ClassificationDataset) else dataset)
        raise DatasetFormatError(
            f"{what} is a {type(dataset).__name__} with splits {splits}; pass one split, e.g. ds[{splits[0]!r}]."
        )
    if _is_raw_image_dataset(dataset):
        image, label = _image_and_label_columns(dataset)
        if len(dataset) == 0:
            raise DatasetFormatError(f"{what} is empty.")
        labels = dataset[label]
        top = max(int(v) for v in labels)
        if top >= num_classes or min(int(v) for v in labels) < 0:
            raise DatasetFormatError(
                f"{what} has label {top} but the trainer has {num_classes} class names (labels must be 0.."
                f"{num_classes - 1}, in the order of classnames)."
            )
        return apply_image_transform(dataset, make_transform(), image_column=image, label_column=label)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset  # streamed: rows are only known when iterated
    try:
        size = len(dataset)
        row = dataset[0] if size else None
    except Exception as exc:  # noqa: BLE001 - any failure to read a row is a format problem of this dataset
        raise DatasetFormatError(f"cannot read a row of {what} ({type(exc).__name__}: {exc}); {_APPLY_HINT}.") from exc
    if row is None:
        raise DatasetFormatError(f"{what} is empty.")
    keys = sorted(row) if isinstance(row, dict) else None
    if keys is None or "pixel_values" not in row or not any(k in row for k in _LABEL_COLUMNS):
        found = f"rows with keys {keys}" if keys is not None else f"rows of type {type(row).__name__}"
        image, label = _image_and_label_columns(dataset)
        missing = "an image column" if image is None else ("a label column" if label is None else "")
        columns = getattr(dataset, "column_names", keys)
        detail = f" (it has no {missing.split(' ', 1)[1]}: columns {columns})" if missing else ""
        raise DatasetFormatError(
            f"{what} has {found}{detail}; the trainer needs 'pixel_values' and 'labels' (or 'label'): {_APPLY_HINT}."
        )
    return dataset


class ClipClassifier(nn.Module):
    """``pixel_values`` (+ tokenised class prompts) → class logits, for any supported model / method.

    ``mode`` is ``"head"`` (a linear-head adapter), ``"coop"`` (CoOp prompts) or ``"text"`` (class prompts
    through the text tower: LoRA, VPT, full fine-tuning, zero-shot).
    """

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model = model
        self.mode = mode
        self._frozen_text: dict[tuple, torch.Tensor] = {}

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Activation (gradient) checkpointing of the CLIP towers, as ``PreTrainedModel`` does it; what the
        ``Trainer`` calls for ``gradient_checkpointing=True`` / ``activation_checkpointing=True``."""
        check_clip_like(self.model).activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs,
            every_n_layers=every_n_layers,
            offload=offload,
        )

    def activation_checkpointing_disable(self) -> None:
        check_clip_like(self.model).activation_checkpointing_disable()

    def text_trainable(self) -> bool:
        return self.mode == "coop" or _has_trainable(self.model, ("text_model", "text_projection"))

    def vision_trainable(self) -> bool:
        return _has_trainable(self.model, ("vision_model", "visual_projection"))

    def class_head(
        self, input_ids, attention_mask, num_templates: int, row_classes=None, ctx_mask=None, raw: bool = False
    ):
        """Normalised class text features ``[C, d]``; with ``raw`` (one template per class, e.g. CoOp) the pair
        ``(normalised, unnormalised text-encoder outputs)``."""
        key = (input_ids.data_ptr(), tuple(input_ids.shape), num_templates)
        if not raw and not self.text_trainable() and key in self._frozen_text:
            return self._frozen_text[key]
        context = contextlib.nullcontext()
        if ctx_mask is not None:
            from hf_cft.peft.coop import CoOpLayer

            layer = next(m for m in self.model.modules() if isinstance(m, CoOpLayer))
            context = layer.prompt_context(ctx_mask, row_classes)
        with context, torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable()):
            out = text_features(self.model, input_ids, attention_mask, normalize=False)
        feats = F.normalize(out, dim=-1)
        if raw:
            if num_templates > 1:
                raise ValueError("raw class text features exist for one template per class only")
            return feats, out
        if num_templates > 1:
            feats = F.normalize(feats.view(-1, num_templates, feats.shape[-1]).mean(1), dim=-1)
        if not self.text_trainable():
            self._frozen_text = {key: feats.detach()}
        return feats

    def forward(
        self,
        pixel_values,
        input_ids=None,
        attention_mask=None,
        num_templates: int = 1,
        row_classes=None,
        ctx_mask=None,
        return_parts: bool = False,
        pixel_attention_mask=None,
        spatial_shapes=None,
    ):
        """Class logits; with ``return_parts`` the pieces they are made of instead: ``{"image": normalised image
        features, "scale": exp(logit_scale)}`` plus ``"text"`` (normalised class text features; for CoOp also
        ``"text_raw"``, the unnormalised ones) or, for a linear head, ``"weight"`` and ``"bias"`` — what MergeTune
        interpolates. ``pixel_attention_mask`` / ``spatial_shapes``: SigLIP2's NaFlex inputs, passed on with the
        patches."""
        extra = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trainable()):
            img = image_features(self.model, pixel_values, normalize=True, **extra)
        scale = logit_scale(self.model).to(img.dtype)
        if self.mode == "head":
            tuner = _find_tuner(self.model, "LinearHeadModel")
            if return_parts:
                weight, bias = tuner.head_parameters()
                return {"image": img, "scale": scale, "weight": weight, "bias": bias}
            return tuner.head_logits(img)
        if return_parts and self.mode == "coop":  # MergeTune's raw path interpolates the unnormalised outputs
            head, raw = self.class_head(input_ids, attention_mask, num_templates, row_classes, ctx_mask, raw=True)
            return {"image": img, "scale": scale, "text": head, "text_raw": raw}
        head = self.class_head(input_ids, attention_mask, num_templates, row_classes, ctx_mask)
        if return_parts:
            return {"image": img, "scale": scale, "text": head}
        return scale * img @ head.to(img.dtype).t()


class TransformEpochCallback(TrainerCallback):
    """Tell a keyed training transform (:func:`~hf_cft.data.set_transform_epoch`) which epoch starts, so that an
    image's random crop is a function of (seed, epoch, image) — identical in 1- and N-process runs and on resume."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        from hf_cft.data.transforms import set_transform_epoch

        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is not None:
            # state.epoch is e + (steps done)/(steps per epoch): e when epoch e starts, or resumes mid-way
            set_transform_epoch(dataset, int(math.floor((state.epoch or 0.0) + 1e-6)))


# Key of the (real rows, loss weight) tag put on a process's last, padded training batch (see the module docstring)
PADDING_KEY = "_hf_cft_padding"


class ClipClassificationTrainer(Trainer):
    """A ``Trainer`` for CLIP-like classification with class-name text heads.

    Args:
        model: a ``CLIPModel``/``SiglipModel`` (full fine-tuning), or a ``PeftModel`` with CoOp, VPT, a linear head
            or LoRA.
        args: :class:`ClipTrainingArguments`.
        classnames, templates: the task's class names (in label order) and prompt templates.
        tokenizer: the model's tokenizer (saved with checkpoints as the processing class).
        train_dataset / eval_dataset: raw image datasets (rows with an image and a label, e.g. splits of
            :func:`~hf_cft.data.load_classification_dataset` or :func:`~hf_cft.data.few_shot`), to which the
            trainer applies the model's image transform itself (the training transform with keyed random crops for
            ``train_dataset``, the evaluation transform for ``eval_dataset`` and for datasets given to
            :meth:`evaluate` / :meth:`predict`); or datasets already yielding ``pixel_values`` and ``labels``
            (:func:`~hf_cft.data.apply_image_transform`), used as they are. Anything else raises
            :class:`~hf_cft.errors.DatasetFormatError` here, before any work, naming what to call.
        image_processor: where the image transform of raw datasets comes from: a transformers image processor,
            a ``CLIPProcessor`` or an :class:`~hf_cft.data.ImageTransform`; default: the processor saved in the
            model's folder, else its family's defaults at its image size (:func:`~hf_cft.data.model_transform`).
            It is also saved (with the tokenizer) beside a fully fine-tuned model.
        dataset_name: the dataset's name (or Hub dataset id) shown in the model card.

    ``trainer.model`` is an internal :class:`ClipClassifier` wrapping your model (so that DDP synchronises the
    whole computation); **your model is** ``trainer.clip_model`` (also ``trainer.model.model``).

    Saving and the Hub work as for any ``Trainer``, with hf_cft's artefacts and cards: ``save_model`` writes a
    PEFT adapter folder (+ tokenizer) or a full model with its tokenizer and image processor (reloadable with
    ``AutoModel`` / ``AutoProcessor``), and hf_cft's model card as ``README.md`` (:func:`~hf_cft.hub.adapter_card`,
    :func:`~hf_cft.hub.finetuned_model_card`; ``MergeTuneTrainer``: :func:`~hf_cft.hub.mergetune_card`) with tags,
    hyper-parameters and a model-index built from the last evaluation in ``state.log_history``.
    ``create_model_card(...)`` writes that card to ``output_dir``; ``push_to_hub(...)`` (and ``push_to_hub=True``,
    ``hub_strategy`` ``"every_save"`` or ``"end"``) uploads exactly the artefact and its card — never checkpoints,
    logs or pickled training state — and creates the Hub repo only once the artefact and its card are built.
    Pushes are synchronous. ``gradient_checkpointing=True`` checkpoints the CLIP towers' layers.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a batch mean: the Trainer divides by the GA steps
    _padding_weight: float | None = None  # set while training on a padded last batch (multi-process)

    def __init__(
        self,
        model: nn.Module,
        args: ClipTrainingArguments,
        classnames: Sequence[str],
        templates: Sequence[str],
        tokenizer,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        compute_metrics=None,
        image_processor=None,
        dataset_name: str | None = None,
        **kwargs,
    ):
        if not isinstance(args, ClipTrainingArguments):
            raise TypeError("ClipClassificationTrainer needs ClipTrainingArguments (label_names, column handling).")
        check_clip_like(model)
        self.classnames = validate_classnames(classnames, owner="the trainer")
        self.templates = validate_templates(templates, owner="the trainer")
        self.tokenizer = tokenizer
        self.dataset_name = dataset_name
        adapter_type = _active_adapter_type(model)
        mode = {"HF_CFT_HEAD": "head", "HF_CFT_COOP": "coop"}.get(adapter_type, "text")
        if args.freeze_logit_scale:
            base = check_clip_like(model)
            base.logit_scale.requires_grad_(False)
            if getattr(base, "logit_bias", None) is not None:
                base.logit_bias.requires_grad_(False)
        if mode == "head":
            cfg = model.peft_config[model.active_adapter]
            if cfg.num_classes != len(self.classnames):
                raise AdapterError(
                    f"linear-head adapter {model.active_adapter!r} has {cfg.num_classes} classes, the task "
                    f"{len(self.classnames)}."
                )
        self.clip_model = model
        self.args = args  # (set again by Trainer) the seed of the training transform of a raw train_dataset
        self.image_processor = image_processor
        self._image_transform = model_transform(model, image_processor)
        self._text_inputs_cache: dict[bool, dict] = {}
        self._saved_files: dict[str, list[str]] = {}
        self._check_hub_strategy(args)
        train_dataset = self.prepare_dataset(train_dataset, train=True, what="train_dataset")
        eval_dataset = self.prepare_dataset(eval_dataset, train=False, what="eval_dataset")
        super().__init__(
            model=ClipClassifier(model, mode),
            args=args,
            data_collator=data_collator or ImageClassificationCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            compute_metrics=compute_metrics or _accuracy_metric,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False
        # FSDP2's fully_shard refuses 0-d parameters (CLIP's logit_scale); they train as [1] and are saved as 0-d
        self._fsdp_scalars = fsdp_scalar_parameters(model) if self.is_fsdp_enabled else []
        self.kg_text = self._kg_anchor() if args.kg_weight > 0 else None
        self.add_callback(TransformEpochCallback())
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        if type(self) is ClipClassificationTrainer:  # subclasses call it when their own set-up is done
            self._check_card_for_hub()

    def _check_card_for_hub(self) -> None:
        """With ``push_to_hub=True``, build the card once at construction: a card that cannot be built fails here,
        before any training or Hub request, not at the first push."""
        if self.args.push_to_hub:
            self._model_card()

    # ------------------------------------------------------------------------------------------------ datasets

    def image_transform(self, train: bool = False) -> ImageTransform:
        """The :class:`~hf_cft.data.ImageTransform` applied to raw datasets: the evaluation transform, or (``train``)
        the same with keyed random resized crops seeded by ``args.seed``."""
        if not train:
            return dataclasses.replace(self._image_transform, train=False)
        return dataclasses.replace(self._image_transform, train=True, seed=self.args.seed)

    def prepare_dataset(self, dataset, train: bool = False, what: str = "dataset"):
        """``dataset`` ready for this trainer: a raw image dataset gets the model's training (``train``) or
        evaluation transform; a dataset that already yields ``pixel_values`` and ``labels`` is returned as is; a
        dict of datasets is prepared per entry. Raises :class:`~hf_cft.errors.DatasetFormatError` naming what to
        call for anything else (a whole ``ClassificationDataset``, no image or label column, ...)."""
        if dataset is None or isinstance(dataset, str):
            return dataset
        if isinstance(dataset, dict) and not hasattr(dataset, "column_names"):
            return {k: self.prepare_dataset(v, train, f"{what}[{k!r}]") for k, v in dataset.items()}
        return _prepare_image_dataset(
            dataset, lambda: self.image_transform(train), len(self.classnames), what, train=train
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``; a raw image dataset (or a dict of them) gets the evaluation transform first."""
        eval_dataset = self.prepare_dataset(eval_dataset, train=False, what="eval_dataset")
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """``Trainer.predict``; a raw image dataset gets the evaluation transform first."""
        test_dataset = self.prepare_dataset(test_dataset, train=False, what="test_dataset")
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    @torch.no_grad()
    def _kg_anchor(self) -> torch.Tensor:
        """KgCoOp's T^clip: the frozen model's hand-crafted class features (``kg_templates``: first template or
        all, ensembled), computed once with the adapter disabled."""
        from hf_cft.models.zeroshot import build_zeroshot_classifier

        if self.model.mode != "coop":
            raise AdapterError(
                f"kg_weight (KgCoOp) regularises CoOp prompts; the model's active method is {self.model.mode!r}. "
                "Use a CoOp adapter or kg_weight=0."
            )
        templates = self.templates[:1] if self.args.kg_templates == "first" else self.templates
        with self.clip_model.disable_adapter():
            head = build_zeroshot_classifier(self.clip_model, self.tokenizer, self.classnames, templates)
        return head.float().to(self.args.device)

    def _record(self, mode: str, name: str, value: torch.Tensor) -> None:
        """Keep a detached, process-averaged value to be averaged into the next log (train) or eval log (weighted
        like the loss on a padded last batch, so that the average is over the real rows)."""
        value = value.detach().float().reshape(1)
        if self._padding_weight is not None and mode == "train":
            value = value * self._padding_weight
        v = self.accelerator.gather(value).mean()
        self._metric_sums[mode].setdefault(name, []).append(float(v))

    # ------------------------------------------------------------------------------------------------ padding

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimiser step; in a multi-process run the last batch of an epoch
        whose size is not a multiple of the global batch is tagged with (real rows of this process, loss weight):
        accelerate padded the global batch with repeated samples, and only its first ``remainder`` rows (in process
        order) are real."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        state, procs = self.accelerator.gradient_state, self.accelerator.num_processes
        if procs > 1 and batches and state.end_of_dataloader and state.remainder > 0:
            last = batches[-1]
            if isinstance(last, dict) and isinstance(last.get("labels"), torch.Tensor):
                rows = int(last["labels"].shape[0])
                real = min(max(state.remainder - self.accelerator.process_index * rows, 0), rows)
                batches[-1] = {**last, PADDING_KEY: (real, real * procs / state.remainder)}
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        tag = inputs.pop(PADDING_KEY, None) if isinstance(inputs, dict) else None
        if tag is None:
            return self._finite_loss(super().training_step(model, inputs, num_items_in_batch))
        real, weight = tag
        if real > 0:  # only the real rows; with none, the padded rows keep the graph (DDP) at weight 0
            rows = int(inputs["labels"].shape[0])
            inputs = {
                k: v[:real] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == rows else v
                for k, v in inputs.items()
            }
        self._padding_weight = float(weight)
        try:
            return self._finite_loss(super().training_step(model, inputs, num_items_in_batch))
        finally:
            self._padding_weight = None

    def _finite_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Stop training with :class:`~hf_cft.errors.NonFiniteError` at the first NaN/inf loss, before the optimizer
        steps on its gradients (the Trainer's ``logging_nan_inf_filter`` would otherwise hide it from the logs and
        the weights would turn NaN)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(
                f"The training loss is {float(loss.detach().float().mean())} at step {self.state.global_step + 1} "
                f"(learning rate {self._get_learning_rate() if self.lr_scheduler is not None else self.args.learning_rate}"
                "); training stopped before the optimizer step. Lower the learning rate, or check the inputs and "
                "weights for NaN/inf."
            )
        return loss

    def _weighted(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the padding weight of this process's batch (1 outside a padded last batch)."""
        return loss if self._padding_weight is None else loss * self._padding_weight

    # ------------------------------------------------------------------------------------------------ inputs

    def _text_inputs(self, train: bool) -> dict:
        """Tokenised class prompts on the model's device (built once per mode)."""
        if train in self._text_inputs_cache:
            return self._text_inputs_cache[train]
        mode = self.model.mode
        device = self.args.device
        if mode == "head":
            out = {}
        elif mode == "coop":
            tuner = _find_tuner(self.clip_model, "CoOpModel")
            cfg = tuner.peft_config[self.clip_model.active_adapter]
            if cfg.class_specific and list(cfg.classnames) != list(self.classnames):
                raise AdapterError(
                    f"CoOp adapter {self.clip_model.active_adapter!r} is class-specific for {cfg.classnames[:3]}...; "
                    f"the task's classes are {self.classnames[:3]}..."
                )
            enc = tuner.build_prompts(self.tokenizer, self.classnames)
            out = {
                "input_ids": enc["input_ids"].to(device),
                "attention_mask": enc["attention_mask"].to(device),
                "ctx_mask": enc["ctx_mask"].to(device),
            }
            if cfg.class_specific:
                out["row_classes"] = torch.arange(len(self.classnames))
        else:
            which = self.args.train_templates if train else self.args.eval_templates
            templates = self.templates[:1] if which == "first" else self.templates
            enc = tokenize_prompts(self.tokenizer, format_prompts(self.classnames, templates), self.clip_model)
            out = {
                "input_ids": enc["input_ids"].to(device),
                "attention_mask": enc["attention_mask"].to(device),
                "num_templates": len(templates),
            }
        self._text_inputs_cache[train] = out
        return out

    # ------------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mode = "train" if model.training else "eval"
        if self.kg_text is not None:  # KgCoOp: CE + λ·(1 − mean cos(T(w), T^clip))
            from hf_cft.trainers.mergetune_losses import cosine_anchor

            parts = model(
                pixel_values=inputs["pixel_values"],
                **image_inputs(inputs),
                **self._text_inputs(train=model.training),
                return_parts=True,
            )
            text = parts["text"].float()
            logits = parts["scale"].float() * parts["image"].float() @ text.t()
            kg = cosine_anchor(text, self.kg_text)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.args.label_smoothing)
            self._record(mode, "loss_task", loss)
            self._record(mode, "loss_kg", kg)
            loss = loss + self.args.kg_weight * kg
        else:
            logits = model(
                pixel_values=inputs["pixel_values"], **image_inputs(inputs), **self._text_inputs(train=model.training)
            )
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing)
        self._record(mode, "accuracy", (logits.detach().argmax(-1) == labels).float().mean() * 100.0)
        loss = self._weighted(loss)
        return (loss, logits) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, logits = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), logits.detach(), inputs["labels"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Average the recorded extra terms into the log: ``train_<name>`` in training, ``<prefix>_<name>`` in
        evaluation (``eval_<name>``, or e.g. ``eval_base_<name>`` for ``metric_key_prefix="eval_base"`` or a dict of
        eval datasets; ``<prefix>_accuracy`` from ``compute_metrics`` wins over the batch average)."""
        prefix = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime") and k != "train_runtime"), None)
        if prefix is None:
            prefix = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        mode = "train" if prefix == "train" else "eval"
        for name, values in self._metric_sums[mode].items():
            key = f"{prefix}_{name}"
            if values and key not in logs:
                logs[key] = float(np.mean(values))
        self._metric_sums[mode] = {}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ schedule

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's scheduler, or with ``constant_warmup_epochs > 0`` CoOp/Dassl's constant warm-up followed
        by a cosine stepped once per epoch (:func:`~hf_cft.trainers.schedules.get_constant_warmup_cosine_schedule`)."""
        if self.args.constant_warmup_epochs <= 0 or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from hf_cft.trainers.schedules import get_constant_warmup_cosine_schedule

        args = self.args
        batches = math.ceil(len(self.train_dataset) / (args.per_device_train_batch_size * args.world_size))
        steps_per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
        epochs = math.ceil(num_training_steps / steps_per_epoch) if args.max_steps > 0 else args.num_train_epochs
        self.lr_scheduler = get_constant_warmup_cosine_schedule(
            optimizer if optimizer is not None else self.optimizer,
            steps_per_epoch,
            max(1, math.ceil(epochs)),
            args.constant_warmup_epochs,
            args.constant_warmup_lr,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------------------------------------ saving

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint holds the user's model (an adapter folder or a full
        model, see :meth:`_save`), not the wrapper's state dict; load it like a resumed checkpoint."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the artefact to ``output_dir`` (a checkpoint or ``save_model``'s folder): a PEFT adapter folder +
        tokenizer, or a full model (safetensors) + tokenizer + image processor, and hf_cft's model card as
        ``README.md``. ``state_dict`` is the state the Trainer gathered (FSDP full state dict, DeepSpeed ZeRO-3),
        keyed like ``trainer.model``; it is written instead of the (sharded) parameters of this process. The files
        are written to a staging folder and moved into place one by one (atomically); their names are kept for
        :meth:`push_to_hub`."""
        output_dir = str(output_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None:
            state_dict = _strip_prefix(state_dict, "model.")
            for name in self._fsdp_scalars:  # back to the model's own (0-d) shape
                if name in state_dict:
                    state_dict[name] = state_dict[name].reshape(())
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".hf_cft_save_") as stage:
            self._write_artefact(stage, state_dict)
            try:
                self._model_card().save(os.path.join(stage, "README.md"))
            except CardError as exc:  # a checkpoint is still saved; create_model_card / push_to_hub raise it
                warnings.warn(f"no model card written to {output_dir}: {exc}", stacklevel=user_stacklevel())
            files = sorted(
                os.path.relpath(os.path.join(root, name), stage) for root, _, names in os.walk(stage) for name in names
            )
            for rel in files:
                target = os.path.join(output_dir, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(os.path.join(stage, rel), target)
        self._saved_files[os.path.abspath(output_dir)] = files

    def _write_artefact(self, folder: str, state_dict: dict | None) -> None:
        from peft import PeftModel

        model = self.clip_model
        if isinstance(model, PeftModel):
            name = model.active_adapter
            model.save_pretrained(folder, state_dict=state_dict, selected_adapters=[name], safe_serialization=True)
            if name != "default":  # PEFT nests a non-default adapter in a subfolder; the artefact is that adapter
                for item in os.listdir(os.path.join(folder, name)):
                    os.replace(os.path.join(folder, name, item), os.path.join(folder, item))
                os.rmdir(os.path.join(folder, name))
            # no tokenizer beside an adapter: it belongs to the base model, and PEFT's AutoPeftModel resizes the
            # base model's token embeddings when it finds one (get_input_embeddings, which CLIPModel lacks)
            return
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        processor = self._processor_for_saving()
        if processor is not None:
            processor.save_pretrained(folder)
        elif hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(folder)

    def _processor_for_saving(self):
        """The processor saved beside a full model: the image processor given (or one matching the image
        transform) joined with the tokenizer, so that ``AutoProcessor`` / ``AutoTokenizer`` /
        ``AutoImageProcessor`` load them from the model's folder; ``None`` without a savable tokenizer."""
        from transformers import CLIPProcessor, ProcessorMixin

        if isinstance(self.image_processor, ProcessorMixin):
            return self.image_processor
        tokenizer = self.processing_class
        if not hasattr(tokenizer, "save_pretrained"):
            return None
        image_processor = self.image_processor
        if image_processor is None or isinstance(image_processor, ImageTransform):
            image_processor = self._image_transform.to_processor()  # the processor the transform reproduces
        is_clip_processor = type(image_processor).__name__ in ("CLIPImageProcessor", "CLIPImageProcessorPil")
        if is_clip_processor and type(check_clip_like(self.clip_model)).__name__ in ("CLIPModel",):
            try:
                return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
            except (TypeError, ValueError):
                pass
        return _SaveBoth(image_processor, tokenizer)

    # ------------------------------------------------------------------------------------------------ model card

    def _card_kind(self) -> str:
        from peft import PeftModel

        return "adapter" if isinstance(self.clip_model, PeftModel) else "finetuned"

    def evaluation_rows(self) -> list[dict]:
        """Result rows of the last evaluation in ``state.log_history`` (``{"name", "num_classes", "accuracy"}``):
        one per evaluated dataset (``eval_accuracy`` → ``"eval"``, ``eval_<name>_accuracy`` → ``<name>`` for a dict
        of eval datasets), the latest value of each at the step of the last evaluation."""
        entries = [
            (h.get("step", 0), "eval" if k == "eval_accuracy" else k[len("eval_") : -len("_accuracy")], v)
            for h in self.state.log_history
            for k, v in h.items()
            if k.startswith("eval_") and k.endswith("_accuracy") and isinstance(v, (int, float))
        ]
        if not entries:
            return []
        last = max(step for step, _, _ in entries)
        rows: dict[str, float] = {}
        for step, name, value in entries:
            if step == last:
                rows[name] = value
        return [{"name": n, "num_classes": len(self.classnames), "accuracy": float(v)} for n, v in rows.items()]

    def card_hyperparameters(self) -> dict:
        """The hyper-parameters written into the model card: the optimisation settings, the training length and
        the adapter's own settings."""
        args = self.args
        world = max(int(getattr(args, "world_size", 1) or 1), 1)
        hp = {
            "learning rate": args.learning_rate,
            "optimizer": getattr(args.optim, "value", args.optim),
            "lr scheduler": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "warm-up steps": args.warmup_steps,
            "weight decay": args.weight_decay,
            "batch size (global)": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            ("max steps" if args.max_steps and args.max_steps > 0 else "epochs"): (
                args.max_steps if args.max_steps and args.max_steps > 0 else args.num_train_epochs
            ),
            "steps trained": self.state.global_step,
            "label smoothing": args.label_smoothing,
            "text head (train / eval)": f"{args.train_templates} / {args.eval_templates} templates",
            "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
            "seed": args.seed,
        }
        cfg = getattr(self.clip_model, "peft_config", {}).get(getattr(self.clip_model, "active_adapter", None))
        peft_type = getattr(cfg, "peft_type", None)
        for key in _ADAPTER_CARD_FIELDS.get(str(getattr(peft_type, "value", peft_type)), ()):
            value = getattr(cfg, key, None)
            if value is not None and value != "" and value != []:
                hp[key] = ", ".join(sorted(value)) if isinstance(value, (set, list, tuple)) else value
        return hp

    def _training_data(self) -> str:
        try:
            size = len(self.train_dataset) if self.train_dataset is not None else None
        except TypeError:
            size = None
        names = ", ".join(self.classnames[:12]) + (", ..." if len(self.classnames) > 12 else "")
        images = f"{size} images" if size is not None else "images"
        return f"{images} of {len(self.classnames)} classes ({names})" + (
            f" from {self.dataset_name}" if self.dataset_name else ""
        )

    def _model_card(self, model_name: str | None = None, dataset_name: str | None = None, **card_kwargs):
        """hf_cft's card of the artefact (see the class docstring); raises :class:`~hf_cft.errors.CardError`."""
        from hf_cft.hub import ADAPTER_METHODS, adapter_card, finetuned_model_card, validate_card
        from hf_cft.hub.cards import harmonic_mean_of

        rows = self.evaluation_rows()
        dataset_name = dataset_name or self.dataset_name or "unspecified"
        kwargs = {
            "model_name": model_name or self._default_model_name(),
            "dataset_name": dataset_name,
            "results": rows,
            "hyperparameters": self.card_hyperparameters(),
            "training_data": self._training_data(),
            "repo_id": self.hub_model_id if getattr(self, "hub_model_id", None) else None,
            "hm": harmonic_mean_of(rows),
        }
        if "/" in dataset_name and "dataset_id" not in card_kwargs:
            kwargs["dataset_id"] = dataset_name
        kwargs.update({k: v for k, v in card_kwargs.items() if v is not None})
        kind = self._card_kind()
        if kind == "adapter":
            peft_type = str(_active_adapter_type(self.clip_model))
            if peft_type not in ADAPTER_METHODS and "method" not in kwargs:
                kwargs["method"] = {"name": peft_type, "description": f"a PEFT {peft_type} adapter.", "tags": []}
            card = adapter_card(self.clip_model, **kwargs)
        elif kind == "finetuned":
            card = finetuned_model_card(
                self.clip_model, classnames=self.classnames, templates=self.templates, **kwargs
            )
        else:
            card = self._mergetune_model_card(kwargs)
        validate_card(card)
        return card

    def _default_model_name(self) -> str:
        if self.args.hub_model_id:
            return self.args.hub_model_id.rsplit("/", 1)[-1]
        return os.path.basename(os.path.abspath(self.args.output_dir))

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        dataset_name: str | None = None,
        **card_kwargs,
    ):
        """Write hf_cft's card of the artefact (adapter, MergeTune continued model or full model) to
        ``output_dir/README.md`` and return it. ``dataset_name`` (or ``dataset``) names the data; ``license``,
        ``finetuned_from`` (the base model id) and extra ``tags`` go into the metadata; other keyword arguments
        go to the card function (e.g. ``results_note``, ``limitations``)."""
        if not self.is_world_process_zero():
            return None
        if isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        card = self._model_card(
            model_name=model_name,
            dataset_name=dataset_name or dataset,
            license=license,
            base_model=finetuned_from,
            **card_kwargs,
        )
        if tags:
            card.data.tags = list(
                dict.fromkeys([*(card.data.tags or []), *([tags] if isinstance(tags, str) else tags)])
            )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))
        return card

    # ------------------------------------------------------------------------------------------------ Hub

    @staticmethod
    def _check_hub_strategy(args) -> None:
        strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
        if args.push_to_hub and strategy in ("checkpoint", "all_checkpoints"):
            raise HubError(
                f"hub_strategy={strategy!r} uploads whole checkpoints (optimizer and RNG state are pickles); hf_cft "
                "publishes the artefact and its card only: use hub_strategy='every_save' or 'end'."
            )

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Resolve the Hub repo id (``hub_model_id``, else the output folder's name) and check that the artefact's
        card can be built; the repo itself is created by the first push, once there is something to push."""
        if not self.is_world_process_zero():
            return
        self.hub_model_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        self.push_in_progress = None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the artefact to ``output_dir`` with hf_cft's card (``kwargs`` go to :meth:`create_model_card`) and
        upload exactly the artefact's files and the card as one commit (``create_repo`` then ``create_commit``;
        nothing is sent before the card and the files are built and checked). Returns the ``CommitInfo``
        (``None`` on processes other than the main one). ``blocking`` is accepted for ``Trainer`` compatibility;
        the upload is always synchronous."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        card = self.create_model_card(**kwargs)
        return self._push_saved(
            self.args.output_dir,
            card,
            commit_message,
            token=token,
            revision=revision or self.args.hub_revision,
            private=private,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``hub_strategy="every_save"``: push the artefact saved in ``checkpoint_folder`` with its card (not the
        checkpoint's optimizer / scheduler / RNG state)."""
        strategy = str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        if not self.is_world_process_zero() or strategy == "end":
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        step = f"step {self.state.global_step}"
        self._push_saved(checkpoint_folder, None, f"Training in progress, {step}", revision=self.args.hub_revision)

    def _push_saved(self, folder: str, card, commit_message, token=None, revision=None, private=None):
        from huggingface_hub import HfApi

        from hf_cft.hub import eval_result_entries, push_folder_to_hub

        files = self._saved_files.get(os.path.abspath(folder))
        if files is None:
            raise HubError(f"no artefact was saved to {folder!r} by this trainer; call save_model first.")
        card = card if card is not None else self._model_card()
        api = HfApi(token=token if token is not None else self.args.hub_token)
        repo_id = self.hub_model_id
        if "/" not in repo_id:  # the Hub's create_repo puts a bare name under the token's user; so do we
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        rows = self.evaluation_rows()
        dataset_id = self.dataset_name if self.dataset_name and "/" in self.dataset_name else None
        with tempfile.TemporaryDirectory(prefix="hf_cft_push_") as tmp:
            for rel in files:
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                shutil.copy2(os.path.join(folder, rel), os.path.join(tmp, rel))
            return push_folder_to_hub(
                tmp,
                repo_id,
                card=card,
                eval_results=eval_result_entries(rows, dataset_id),
                api=api,
                private=private if private is not None else self.args.hub_private_repo,
                revision=revision,
                commit_message=commit_message,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        if isinstance(self.clip_model, PeftModel):
            name = self.clip_model.active_adapter
            state = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
            set_peft_model_state_dict(self.clip_model, state, adapter_name=name)
        else:
            from transformers.modeling_utils import load_sharded_checkpoint

            if os.path.isfile(os.path.join(resume_from_checkpoint, "model.safetensors")):
                self.clip_model.load_state_dict(load_file(os.path.join(resume_from_checkpoint, "model.safetensors")))
            else:
                load_sharded_checkpoint(self.clip_model, resume_from_checkpoint)


def _accuracy_metric(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean() * 100.0)}


# PEFT config fields shown among a card's hyper-parameters, per PEFT type
_ADAPTER_CARD_FIELDS = {
    "HF_CFT_COOP": ("n_ctx", "ctx_init", "class_specific"),
    "HF_CFT_VPT": ("n_tokens", "deep"),
    "HF_CFT_HEAD": ("init",),
    "LORA": ("r", "lora_alpha", "lora_dropout", "target_modules"),
}


def fsdp_scalar_parameters(model: nn.Module) -> list[str]:
    """Give every 0-d parameter of ``model`` the shape ``[1]`` (same value, same ``requires_grad``), in place, and
    return their names: FSDP2's ``fully_shard`` raises ``ValueError: fully_shard doesn't support scalar
    parameters`` for them (torch ``_fsdp_init._verify_managed_param``), and ``CLIPModel.logit_scale`` is one. The
    models' forward passes broadcast a ``[1]`` scale like a 0-d one; :meth:`ClipClassificationTrainer._save` writes
    them back with their 0-d shape."""
    names = []
    for prefix, module in model.named_modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.ndim == 0:
                setattr(module, key, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                names.append(f"{prefix}.{key}" if prefix else key)
    return names


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
    """The Trainer gathers the state dict of ``trainer.model`` (the :class:`ClipClassifier`): its keys start with
    ``model.``; the user's model is saved under its own keys."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


class _SaveBoth:
    """An image processor and a tokenizer saved into one folder (when they cannot form a processor)."""

    def __init__(self, image_processor, tokenizer):
        self.parts = [p for p in (image_processor, tokenizer) if hasattr(p, "save_pretrained")]

    def save_pretrained(self, folder: str) -> None:
        for part in self.parts:
            part.save_pretrained(folder)
