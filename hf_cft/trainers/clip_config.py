from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


@dataclass
class ClipTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for classification fine-tuning of CLIP-like models with class-name text heads.

    Sets the defaults CLIP training needs with ``Trainer``: ``label_names=["labels"]`` (CLIP's forward has no
    label argument) and ``remove_unused_columns=False`` (the image transform produces the model inputs); and
    ``dataloader_pin_memory=False`` when training on the CPU (``use_cpu`` or no accelerator), where pinning does
    nothing but warn.

    CoOp's official optimiser (Dassl): ``optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4,
    lr_scheduler_type="cosine", constant_warmup_epochs=1, constant_warmup_lr=1e-5`` (HF's ``optim="sgd"`` alone
    has momentum 0). With ``constant_warmup_epochs = k > 0`` the learning rate of epoch e is ``constant_warmup_lr``
    for e < k and ``lr·½(1 + cos(π(e − k)/E))`` after (E = all epochs, constant within an epoch), as Dassl's
    ``ConstantWarmupScheduler`` around a per-epoch ``CosineAnnealingLR(T_max=E)``.

    KgCoOp (Yao et al., CVPR 2023) is CoOp trained with ``kg_weight = λ > 0``: the loss adds
    ``λ·(1 − mean_c cos(T_c(w), T_c^clip))``, T^clip the frozen model's hand-crafted class features (one template
    per dataset in the official code: ``kg_templates="first"``). The paper writes ``λ·mean_c‖ŵ_c − ŵ_c^clip‖²``,
    which for unit vectors is twice this; the official code (λ = 8) uses the cosine form, kept here.
    """

    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the cross-entropy."})
    train_templates: str = field(
        default="first",
        metadata={
            "help": "Text head in training: 'first' template per class (CoOp/ZSCL practice) or 'all' (ensembled)."
        },
    )
    eval_templates: str = field(default="all", metadata={"help": "Text head in evaluation: 'first' or 'all'."})
    freeze_logit_scale: bool = field(default=True, metadata={"help": "Keep CLIP's logit scale fixed."})
    constant_warmup_epochs: int = field(
        default=0,
        metadata={
            "help": "Epochs at the constant constant_warmup_lr before the schedule (CoOp/Dassl's constant warm-up); "
            "> 0 needs lr_scheduler_type='cosine' and then steps the cosine once per epoch, as Dassl does "
            "(warmup_steps / warmup_ratio are then unused)."
        },
    )
    constant_warmup_lr: float = field(default=1e-5, metadata={"help": "Learning rate of the constant warm-up."})
    kg_weight: float = field(
        default=0.0,
        metadata={
            "help": "KgCoOp (CoOp adapters only): λ of the knowledge-guided term λ·(1 − mean_c cos(T_c, T_c^clip)) "
            "between the learned-prompt and the hand-crafted zero-shot class features (official code: 8)."
        },
    )
    kg_templates: str = field(
        default="first",
        metadata={"help": "KgCoOp's hand-crafted features: 'first' template (official) or 'all' (ensembled)."},
    )

    def __post_init__(self):
        if self.label_names is None:
            self.label_names = ["labels"]
        self.remove_unused_columns = False
        if self.dataloader_pin_memory and (self.use_cpu or not _accelerator_available()):
            self.dataloader_pin_memory = False  # torch warns that pinning needs an accelerator, and does nothing
        if self.constant_warmup_epochs < 0:
            raise ValueError(f"constant_warmup_epochs must be >= 0, got {self.constant_warmup_epochs}")
        if self.constant_warmup_epochs and str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) != (
            "cosine"
        ):
            raise ValueError(
                "constant_warmup_epochs > 0 is the official (Dassl) warm-up before a per-epoch cosine: it needs "
                f"lr_scheduler_type='cosine', got {self.lr_scheduler_type!r}"
            )
        if not self.constant_warmup_lr > 0:
            raise ValueError(f"constant_warmup_lr must be > 0, got {self.constant_warmup_lr}")
        if not self.kg_weight >= 0:
            raise ValueError(f"kg_weight must be >= 0, got {self.kg_weight}")
        for name in ("train_templates", "eval_templates", "kg_templates"):
            if getattr(self, name) not in ("first", "all"):
                raise ValueError(f"{name} must be 'first' or 'all', got {getattr(self, name)!r}")
        super().__post_init__()
