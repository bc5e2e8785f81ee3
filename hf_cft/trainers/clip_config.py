from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class ClipTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for classification fine-tuning of CLIP-like models with class-name text heads.

    Sets the defaults CLIP training needs with ``Trainer``: ``label_names=["labels"]`` (CLIP's forward has no
    label argument) and ``remove_unused_columns=False`` (the image transform produces the model inputs).
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
        for name in ("train_templates", "eval_templates"):
            if getattr(self, name) not in ("first", "all"):
                raise ValueError(f"{name} must be 'first' or 'all', got {getattr(self, name)!r}")
        super().__post_init__()
