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
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_cft.data.templates import format_prompts, validate_classnames, validate_templates
from hf_cft.data.transforms import ImageClassificationCollator
from hf_cft.errors import AdapterError, NonFiniteError
from hf_cft.models.clip import check_clip_like, image_features, logit_scale, text_features
from hf_cft.models.tokenizer import tokenize_prompts
from hf_cft.trainers.clip_config import ClipTrainingArguments


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

    def text_trainable(self) -> bool:
        return self.mode == "coop" or _has_trainable(self.model, ("text_model", "text_projection"))

    def vision_trainable(self) -> bool:
        return _has_trainable(self.model, ("vision_model", "visual_projection"))

    def class_head(
        self, input_ids, attention_mask, num_templates: int, row_classes=None, ctx_mask=None
    ) -> torch.Tensor:
        key = (input_ids.data_ptr(), tuple(input_ids.shape), num_templates)
        if not self.text_trainable() and key in self._frozen_text:
            return self._frozen_text[key]
        context = contextlib.nullcontext()
        if ctx_mask is not None:
            from hf_cft.peft.coop import CoOpLayer

            layer = next(m for m in self.model.modules() if isinstance(m, CoOpLayer))
            context = layer.prompt_context(ctx_mask, row_classes)
        with context, torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable()):
            feats = text_features(self.model, input_ids, attention_mask, normalize=True)
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
    ):
        """Class logits; with ``return_parts`` the pieces they are made of instead: ``{"image": normalised image
        features, "scale": exp(logit_scale)}`` plus ``"text"`` (normalised class text features) or, for a linear
        head, ``"weight"`` and ``"bias"`` — what MergeTune interpolates."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trainable()):
            img = image_features(self.model, pixel_values, normalize=True)
        scale = logit_scale(self.model).to(img.dtype)
        if self.mode == "head":
            tuner = _find_tuner(self.model, "LinearHeadModel")
            if return_parts:
                weight, bias = tuner.head_parameters()
                return {"image": img, "scale": scale, "weight": weight, "bias": bias}
            return tuner.head_logits(img)
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
        train_dataset / eval_dataset: datasets yielding ``pixel_values`` and ``labels`` (see
            :func:`hf_cft.data.apply_image_transform`).
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
        **kwargs,
    ):
        if not isinstance(args, ClipTrainingArguments):
            raise TypeError("ClipClassificationTrainer needs ClipTrainingArguments (label_names, column handling).")
        check_clip_like(model)
        self.classnames = validate_classnames(classnames, owner="the trainer")
        self.templates = validate_templates(templates, owner="the trainer")
        self.tokenizer = tokenizer
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
        self._text_inputs_cache: dict[bool, dict] = {}
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
        self.add_callback(TransformEpochCallback())
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

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
        logits = model(pixel_values=inputs["pixel_values"], **self._text_inputs(train=model.training))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing)
        mode = "train" if model.training else "eval"
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
        """Average the recorded extra terms into the log: ``train_<name>`` in training, ``eval_<name>`` in
        evaluation (``eval_accuracy`` from ``compute_metrics`` wins over the batch average)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        for name, values in self._metric_sums[mode].items():
            key = f"{mode}_{name}"
            if values and key not in logs:
                logs[key] = float(np.mean(values))
        self._metric_sums[mode] = {}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.clip_model.save_pretrained(output_dir)  # a PEFT adapter folder, or a full model (safetensors)
        if hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)

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
