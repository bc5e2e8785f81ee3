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

    def __post_init__(self):
        if self.label_names is None:
            self.label_names = ["labels"]
        self.remove_unused_columns = False
        if self.dataloader_pin_memory and (self.use_cpu or not _accelerator_available()):
            self.dataloader_pin_memory = False  # torch warns that pinning needs an accelerator, and does nothing
        for name in ("train_templates", "eval_templates"):
            if getattr(self, name) not in ("first", "all"):
                raise ValueError(f"{name} must be 'first' or 'all', got {getattr(self, name)!r}")
        super().__post_init__()
