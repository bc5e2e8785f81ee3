"""CLIP-like model access: features, zero-shot heads and evaluation, tokenizer utilities."""

from hf_cft.models.clip import (
    check_clip_like,
    clip_logits,
    image_features,
    is_siglip,
    logit_bias,
    logit_scale,
    text_features,
    unwrap_model,
)
from hf_cft.models.open_clip_convert import convert_open_clip
from hf_cft.models.tokenizer import build_clip_tokenizer, load_tokenizer, read_clip_bpe, tokenize_prompts
from hf_cft.models.zeroshot import (
    FeatureCache,
    ZeroShotResult,
    build_zeroshot_classifier,
    encode_images,
    evaluate_zeroshot,
)

__all__ = [
    "FeatureCache",
    "ZeroShotResult",
    "build_clip_tokenizer",
    "build_zeroshot_classifier",
    "check_clip_like",
    "clip_logits",
    "convert_open_clip",
    "encode_images",
    "evaluate_zeroshot",
    "image_features",
    "is_siglip",
    "load_tokenizer",
    "logit_bias",
    "logit_scale",
    "read_clip_bpe",
    "text_features",
    "tokenize_prompts",
    "unwrap_model",
]
