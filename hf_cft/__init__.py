"""hf_cft: continued and continual fine-tuning of CLIP-like vision-language models on the Hugging Face stack."""

__version__ = "0.1.0.dev0"

from hf_cft import errors
from hf_cft.data import (
    ClassificationDataset,
    DatasetSpec,
    ImageClassificationCollator,
    ImageTransform,
    base_novel_split,
    few_shot,
    get_spec,
    list_specs,
    load_classification_dataset,
    load_digits_dataset,
    split_per_class,
)
from hf_cft.metrics import AccuracyMatrix, accuracy, base_novel_hm, matrix_metrics
from hf_cft.models import (
    FeatureCache,
    build_clip_tokenizer,
    build_zeroshot_classifier,
    evaluate_zeroshot,
    load_tokenizer,
)
from hf_cft.peft import CoOpConfig, LinearHeadConfig, VPTConfig  # noqa: E402
from hf_cft.peft.registration import register as _register_peft_methods  # noqa: E402

_register_peft_methods()

__all__ = [
    "CoOpConfig",
    "LinearHeadConfig",
    "VPTConfig",
    "AccuracyMatrix",
    "ClassificationDataset",
    "DatasetSpec",
    "FeatureCache",
    "ImageClassificationCollator",
    "ImageTransform",
    "__version__",
    "accuracy",
    "base_novel_hm",
    "base_novel_split",
    "build_clip_tokenizer",
    "build_zeroshot_classifier",
    "errors",
    "evaluate_zeroshot",
    "few_shot",
    "get_spec",
    "list_specs",
    "load_classification_dataset",
    "load_digits_dataset",
    "load_tokenizer",
    "matrix_metrics",
    "split_per_class",
]
