"""Uniform access to CLIP-like dual encoders (``CLIPModel``, ``SiglipModel``, ``Siglip2Model`` and the other
families of :mod:`hf_cft.models.families`).

transformers 5.x returns output objects from ``get_text_features`` / ``get_image_features`` (the projected
vector is ``.pooler_output``); 4.x returned tensors. Everything in hf_cft goes through these helpers so
that neither shape leaks into method code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_cft.errors import ImageInputsError, NotCLIPLikeError

_REQUIRED = ("get_text_features", "get_image_features", "logit_scale")


def check_clip_like(model: nn.Module) -> nn.Module:
    """Return ``model`` (unwrapped from a PEFT wrapper) if it is a CLIP-like dual encoder, else raise.

    A CLIP-like model has ``get_text_features``, ``get_image_features`` and a ``logit_scale`` parameter.
    """
    base = unwrap_model(model)
    missing = [name for name in _REQUIRED if not hasattr(base, name)]
    if missing:
        raise NotCLIPLikeError(
            f"{type(base).__name__} is not a CLIP-like dual encoder: it lacks {', '.join(missing)}. "
            "hf_cft works with transformers' CLIP-like dual encoders (CLIPModel, SiglipModel, Siglip2Model, "
            "MetaClip2Model, AltCLIPModel, ChineseCLIPModel) or models exposing the same methods."
        )
    return base


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / PEFT wrappers and return the underlying transformers model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        else:
            break
    return model


def is_siglip(model: nn.Module) -> bool:
    return getattr(getattr(unwrap_model(model), "config", None), "model_type", "").startswith("siglip")


def _pooled(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):  # transformers 4.x
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise NotCLIPLikeError(f"feature method returned {type(output).__name__} without a pooler_output")
    return pooled


def text_features(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Projected text features ``[N, d]`` (L2-normalised unless ``normalize=False``)."""
    base = check_clip_like(model)
    out = _pooled(base.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    return F.normalize(out, dim=-1) if normalize else out


def image_features(
    model: nn.Module, pixel_values: torch.Tensor, normalize: bool = True, **image_inputs: torch.Tensor | None
) -> torch.Tensor:
    """Projected image features ``[N, d]`` (L2-normalised unless ``normalize=False``).

    ``image_inputs`` are the family's inputs besides ``pixel_values`` (SigLIP2 NaFlex: ``pixel_attention_mask`` and
    ``spatial_shapes``, as its image processor returns them; :func:`hf_cft.models.families.image_inputs` picks them
    from a batch). A family that needs them and does not get them raises :class:`~hf_cft.errors.ImageInputsError`;
    so does one that is given inputs it has no use for.
    """
    from hf_cft.models.families import IMAGE_INPUT_KEYS, family_of

    base = check_clip_like(model)
    given = {k: v for k, v in image_inputs.items() if v is not None}
    unknown = sorted(set(given) - set(IMAGE_INPUT_KEYS))
    if unknown:
        raise TypeError(f"image_features got unexpected inputs {unknown}; known: {list(IMAGE_INPUT_KEYS)}")
    family = family_of(base)
    missing = [k for k in family.image_inputs if k not in given]
    extra = [k for k in given if k not in family.image_inputs]
    if missing or extra:
        raise ImageInputsError(
            f"{type(base).__name__} ({family.model_type}) "
            + (
                f"needs {' and '.join(missing)} with pixel_values (the patches of its own image processor, e.g. "
                "ImageTransform.from_model(model) or the model's AutoImageProcessor)"
                if missing
                else f"takes pixel_values alone, not {' or '.join(extra)}"
            )
            + "."
        )
    device = pixel_values.device
    given = {k: v.to(device) for k, v in given.items()}
    out = _pooled(base.get_image_features(pixel_values=pixel_values, **given))
    return F.normalize(out, dim=-1) if normalize else out


def logit_scale(model: nn.Module) -> torch.Tensor:
    """The model's multiplicative logit scale, ``exp(logit_scale)`` (a 0-d tensor)."""
    return check_clip_like(model).logit_scale.exp()


def logit_bias(model: nn.Module) -> torch.Tensor | None:
    """SigLIP's additive logit bias, or ``None`` for CLIP."""
    bias = getattr(check_clip_like(model), "logit_bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def clip_logits(model: nn.Module, image_feats: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits: ``scale · image_feats @ classifierᵀ (+ bias)`` for normalised features.

    ``classifier`` is ``[C, d]`` (one normalised text feature per class). The bias is a constant per image for
    SigLIP, so it never changes the argmax; it is added so that probabilities match the model's.
    """
    logits = logit_scale(model).to(image_feats.dtype) * image_feats @ classifier.to(image_feats.dtype).t()
    bias = logit_bias(model)
    return logits + bias.to(logits.dtype) if bias is not None else logits


def text_max_length(model: nn.Module) -> int:
    cfg = check_clip_like(model).config
    text_cfg = getattr(cfg, "text_config", cfg)
    return int(getattr(text_cfg, "max_position_embeddings", 77))


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters is not CLIP-like anyway
        return torch.device("cpu")
