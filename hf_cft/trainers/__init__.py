"""Trainers: CLIP classification (prompts, heads, LoRA, full fine-tuning); MergeTune and PAM arrive later."""

from hf_cft.trainers.clip_config import ClipTrainingArguments
from hf_cft.trainers.clip_trainer import ClipClassificationTrainer, ClipClassifier
from hf_cft.trainers.feature_training import fit_linear_probe, train_coop_on_features, train_head_on_features
from hf_cft.trainers.mergetune_config import MergeTuneConfig, MergeTuneConfigError
from hf_cft.trainers.mergetune_trainer import MergeTuneTrainer

__all__ = [
    "ClipClassificationTrainer",
    "ClipClassifier",
    "ClipTrainingArguments",
    "MergeTuneConfig",
    "MergeTuneConfigError",
    "MergeTuneTrainer",
    "fit_linear_probe",
    "train_coop_on_features",
    "train_head_on_features",
]
