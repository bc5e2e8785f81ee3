"""Train one expert of a continual run with :class:`~hf_cft.trainers.ClipClassificationTrainer` and return its
dense delta from θ⁰.

ConDU trains every expert **from θ⁰** with plain cross-entropy (``docs/methods/condu.md`` §2.1); sequential
fine-tuning starts from the previous model instead (``start`` delta). Full fine-tuning trains every parameter of
both towers except ``logit_scale`` (§5); LoRA adapts the configured linears (default: the two MLP linears of every
block) with B = 0 at the start, so θ⁰ plus the untrained adapter is exactly θ⁰, and the same A seed for every task.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hf_cft.continual.config import ContinualConfig
from hf_cft.continual.tasks import TaskSpec
from hf_cft.continual.weights import Delta, apply_delta_, check_finite, trained_delta
from hf_cft.errors import ContinualError

logger = logging.getLogger("hf_cft.continual")


def build_training_model(
    base_model: nn.Module,
    config: ContinualConfig,
    start: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """A trainable copy of θ⁰ (+ ``start``): the full model, or a PEFT LoRA model around it whose adapter is called
    ``adapter_name``."""
    model = copy.deepcopy(base_model)
    if start:
        apply_delta_(model, start)
    if config.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        use_rslora=config.lora_use_rslora,
        target_modules=list(config.lora_target_modules),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # A Kaiming-uniform, B = 0
    )
    # One fixed A seed for every task (condu.md §5); the global RNG is re-seeded by the trainer afterwards.
    torch.manual_seed(config.lora_init_seed)
    return get_peft_model(model, lora, adapter_name=adapter_name)


def lora_scaling(config: ContinualConfig) -> float:
    """The LoRA scaling s of the run's adapters: α/√r with ``lora_use_rslora``, else α/r (PEFT's rule)."""
    r = config.lora_r
    return config.lora_alpha / (math.sqrt(r) if config.lora_use_rslora else r)


def training_arguments(config: ContinualConfig, seed: int, index: int, output_dir: str | os.PathLike):
    """The ``ClipTrainingArguments`` of task position ``index`` (learning rate, budget, seed) from the run config;
    nothing is saved (``save_strategy="no"``, no reporting)."""
    from hf_cft.trainers import ClipTrainingArguments

    return ClipTrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        learning_rate=config.learning_rate_for(index),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        optim=config.optim,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        label_smoothing=config.label_smoothing,
        train_templates=config.train_templates,
        logging_steps=config.logging_steps,
        dataloader_num_workers=config.dataloader_num_workers,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=config.use_cpu,
        disable_tqdm=not config.progress,
    )


def last_logged_loss(trainer) -> float | None:
    """The last training loss the Trainer logged (the mean over its logging window, averaged over the processes),
    or ``None``. Unlike ``TrainOutput.training_loss`` — whose steps after the last log are this process's own —
    it is the same on every process and in a 1-process run."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1]) if losses else None


def fit(
    model: nn.Module,
    tokenizer,
    task: TaskSpec,
    config: ContinualConfig,
    seed: int,
    index: int,
    output_dir: str | os.PathLike,
    callbacks: Sequence | None = None,
):
    """Train ``model`` in place on ``task`` (model-ready ``train`` rows) with a fresh
    :class:`~hf_cft.trainers.ClipClassificationTrainer` (fresh optimiser and schedule) seeded by ``seed``, with
    optional ``TrainerCallback``s (e.g. PAM's); return the ``TrainOutput``. ``output_dir`` is the Trainer's scratch
    folder, removed afterwards."""
    from hf_cft.trainers import ClipClassificationTrainer

    args = training_arguments(config, seed, index, output_dir)
    trainer = ClipClassificationTrainer(
        model,
        args,
        task.classnames,
        task.templates,
        tokenizer,
        train_dataset=task.train,
        callbacks=list(callbacks or []),
    )
    out = trainer.train()
    out.metrics["last_logged_loss"] = last_logged_loss(trainer)
    logger.info("task %r: trained %d steps, final loss %.4f", task.name, out.global_step, out.training_loss)
    model.eval()
    del trainer
    shutil.rmtree(output_dir, ignore_errors=True)  # trainer scratch (nothing is saved there)
    return out


def train_expert(
    base_model: nn.Module,
    tokenizer,
    task: TaskSpec,
    config: ContinualConfig,
    seed: int,
    index: int,
    output_dir: str | os.PathLike,
    start: Mapping[str, torch.Tensor] | None = None,
    metrics: dict | None = None,
    factors_reference: nn.Module | None = None,
) -> Delta:
    """Fine-tune θ⁰ (+ ``start``) on ``task`` (its ``train`` rows must be model-ready) with the Trainer seeded by
    ``seed`` and the learning rate of position ``index``; return θ − θ⁰ as fp32 CPU tensors. θ⁰ itself is never
    modified; the trained copy is dropped. ``output_dir`` is the Trainer's scratch folder, removed afterwards.
    ``metrics``, if given, receives ``train_loss`` (:func:`last_logged_loss`).

    ``factors_reference`` (LoRA only; ConDU's ``lora_merge="factors"``): the ``PeftModel`` of
    :func:`build_training_model` before training (θ⁰ + the initial adapter A⁰, B⁰ = 0); the expert is then returned
    as the deltas of its factors, A − A⁰ and B − B⁰, keyed by the reference's parameter names
    (:func:`hf_cft.merging.lora_factor_delta`), instead of the dense s·B@A."""
    if factors_reference is not None and (config.finetune != "lora" or start):
        raise ContinualError("factor deltas need finetune='lora' and an expert trained from θ⁰ (no start delta)")
    model = build_training_model(base_model, config, start)
    out = fit(model, tokenizer, task, config, seed, index, output_dir)
    if metrics is not None and out.metrics.get("last_logged_loss") is not None:
        metrics["train_loss"] = out.metrics["last_logged_loss"]
    if factors_reference is not None:
        from hf_cft.merging import lora_factor_delta

        delta = {k: v.detach().float().cpu() for k, v in lora_factor_delta(model, factors_reference).items()}
    else:
        delta = trained_delta(base_model, model, start)
    check_finite(delta, f"the expert trained on task {task.name!r}")
    del model
    return delta
