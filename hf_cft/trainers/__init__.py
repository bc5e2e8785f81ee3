"""Trainers: CLIP classification (prompts, heads, LoRA, full fine-tuning); MergeTune and PAM arrive later."""

from hf_cft.trainers.clip_config import ClipTrainingArguments
from hf_cft.trainers.clip_trainer import ClipClassificationTrainer, ClipClassifier

__all__ = ["ClipClassificationTrainer", "ClipClassifier", "ClipTrainingArguments"]
