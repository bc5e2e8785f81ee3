"""``ContinualConfig``: everything that decides the numbers of a continual run (training budget, fine-tuning
mode, evaluation batch, seed), kept JSON-able so that a checkpoint can record it and a resumed run can check
that it continues the *same* experiment.

Defaults are the released ConDU scripts' settings (``docs/methods/condu.md`` §5–§6): AdamW, wd 0, cosine with
100 warm-up steps, batch 64, label smoothing 0.2, 1000 steps per task, lr 1e-5 (full fine-tuning); LoRA on the
two MLP linears of every block of both towers, rank 64, ``use_rslora`` with α = 1 (scale 1/√r), B zero-initialised
and one fixed A seed for every task. Train on the first template, evaluate with the template ensemble.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hf_cft.errors import ContinualError

FINETUNE_MODES = ("full", "lora")


@dataclass
class ContinualConfig:
    """Settings of a continual run. Every field is recorded in the checkpoint; resuming with a different value
    raises :class:`~hf_cft.errors.ContinualError` naming the field.

    Example::

        config = ContinualConfig(finetune="lora", learning_rate=1e-3, max_steps=500, seed=42)
    """

    seed: int = field(default=42, metadata={"help": "Base seed; task t trains with seed task_seed(seed, t)."})
    finetune: str = field(default="full", metadata={"help": "Expert training: 'full' fine-tuning or 'lora'."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of every task (see learning_rates)."})
    learning_rates: list[float] | None = field(
        default=None, metadata={"help": "One learning rate per task position (overrides learning_rate)."}
    )
    max_steps: int = field(default=1000, metadata={"help": "Optimiser steps per task."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    eval_batch_size: int = field(default=128, metadata={"help": "Images per batch in evaluation."})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimiser name."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps per task."})
    label_smoothing: float = field(default=0.2, metadata={"help": "Label smoothing of the cross-entropy."})
    train_templates: str = field(default="first", metadata={"help": "Training text head: 'first' or 'all'."})
    augment: bool = field(
        default=True, metadata={"help": "Random resized crop (scale 0.9–1) on training images (raw-image tasks)."}
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (scale alpha/sqrt(r) with use_rslora)."})
    lora_use_rslora: bool = field(default=True, metadata={"help": "Rank-stabilised LoRA scaling alpha/sqrt(r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["mlp.fc1", "mlp.fc2"], metadata={"help": "Modules LoRA adapts (both towers)."}
    )
    lora_init_seed: int = field(default=0, metadata={"help": "Seed of LoRA's A initialisation, fixed for all tasks."})
    logging_steps: int = field(default=50, metadata={"help": "Trainer logging interval (steps)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers (training and evaluation)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when an accelerator is present."})
    progress: bool = field(default=False, metadata={"help": "Progress bars in training and evaluation."})
    expert_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of trained experts shared between runs: an expert trained from θ⁰ is stored there under a "
            "hash of everything that decides it (θ⁰, task data, transform, seed, position and every training "
            "setting) and reused by any later run or strategy that would train the same one."
        },
    )

    def __post_init__(self):
        if self.finetune not in FINETUNE_MODES:
            raise ContinualError(f"ContinualConfig.finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.train_templates not in ("first", "all"):
            raise ContinualError(
                f"ContinualConfig.train_templates must be 'first' or 'all', got {self.train_templates!r}"
            )
        for name in ("max_steps", "per_device_train_batch_size", "eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ContinualError(f"ContinualConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.finetune == "lora" and self.lora_r < 1:
            raise ContinualError(f"ContinualConfig.lora_r must be ≥ 1, got {self.lora_r}")
        if self.learning_rates is not None:
            self.learning_rates = [float(x) for x in self.learning_rates]
        self.lora_target_modules = list(self.lora_target_modules)

    def learning_rate_for(self, index: int) -> float:
        """The learning rate of the task at position ``index``."""
        if self.learning_rates is None:
            return float(self.learning_rate)
        if index >= len(self.learning_rates):
            raise ContinualError(
                f"learning_rates has {len(self.learning_rates)} entries; task position {index} has none"
            )
        return self.learning_rates[index]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ContinualConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ContinualError(f"unknown ContinualConfig field(s) {unknown}")
        return cls(**d)


# Fields that change no result: a resumed run may differ in them.
RESULT_NEUTRAL_FIELDS = frozenset({"logging_steps", "dataloader_num_workers", "progress", "expert_cache"})


def task_seed(seed: int, index: int) -> int:
    """The seed of task ``index``: a fixed function of (seed, index), so a resumed run trains task ``index`` with
    exactly the RNG state an uninterrupted run would have (no state carried over from earlier tasks)."""
    return (int(seed) * 1_000_003 + 7919 * (int(index) + 1)) % (2**31 - 1)
