"""Data layer: dataset specs, loaders, few-shot / pool / base-novel sampling, transforms and collators, and the
fixed domain shifts of the domain-generalisation benchmark."""

from hf_cft.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, load_digits_dataset
from hf_cft.data.loading import (
    SHARED_DATASETS,
    ClassificationDataset,
    default_data_dir,
    from_arrays,
    load_classification_dataset,
)
from hf_cft.data.sampling import (
    base_novel_classes,
    base_novel_split,
    few_shot,
    few_shot_indices,
    labels_of,
    select_classes,
    split_per_class,
    split_per_class_indices,
)
from hf_cft.data.shifts import DOMAIN_SHIFTS, SHIFT_PARAMETERS, domain_shift
from hf_cft.data.specs import DatasetSpec, benchmark_order, get_spec, list_specs
from hf_cft.data.templates import DEFAULT_TEMPLATES, format_prompts, validate_classnames, validate_templates
from hf_cft.data.transforms import (
    ImageClassificationCollator,
    ImageTransform,
    apply_image_transform,
    decode_image,
    eval_view,
    image_key,
    model_transform,
    naflex_size,
    set_transform_epoch,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "DIGIT_CLASSNAMES",
    "DIGIT_TEMPLATES",
    "DOMAIN_SHIFTS",
    "SHARED_DATASETS",
    "SHIFT_PARAMETERS",
    "ClassificationDataset",
    "DatasetSpec",
    "ImageClassificationCollator",
    "ImageTransform",
    "apply_image_transform",
    "base_novel_classes",
    "base_novel_split",
    "benchmark_order",
    "decode_image",
    "default_data_dir",
    "domain_shift",
    "few_shot",
    "few_shot_indices",
    "format_prompts",
    "from_arrays",
    "get_spec",
    "image_key",
    "labels_of",
    "list_specs",
    "load_classification_dataset",
    "load_digits_dataset",
    "model_transform",
    "naflex_size",
    "select_classes",
    "eval_view",
    "set_transform_epoch",
    "split_per_class",
    "split_per_class_indices",
    "validate_classnames",
    "validate_templates",
]
