"""Where each CLIP-like family keeps the modules hf_cft's methods touch, by ``config.model_type``.

CoOp needs the text tower's embeddings module and its token-embedding table; VPT the vision tower's embeddings;
the image path the extra inputs some families take besides ``pixel_values`` (SigLIP2 NaFlex:
``pixel_attention_mask`` and ``spatial_shapes``). One table holds it all, so a new family is one row here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hf_cft.data.transforms import PATCH_INPUT_KEYS

#: Inputs of ``get_image_features`` besides ``pixel_values`` (transformers' own names), in the order of its signature:
#: the NaFlex inputs that ``ImageTransform`` makes (one definition, in ``hf_cft.data.transforms``).
IMAGE_INPUT_KEYS = PATCH_INPUT_KEYS


@dataclass(frozen=True)
class Family:
    """Module paths of one family (relative to the dual-encoder model, e.g. ``CLIPModel``)."""

    model_type: str
    text_embeddings: str = "text_model.embeddings"
    vision_embeddings: str = "vision_model.embeddings"
    image_inputs: tuple[str, ...] = ()
    """Inputs of ``get_image_features`` the family needs besides ``pixel_values``."""
    sigmoid: bool = False
    """Trained with the sigmoid (pairwise) loss and an additive ``logit_bias`` (SigLIP), not the softmax one."""


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("clip"),
        Family("metaclip_2"),
        Family("siglip", sigmoid=True),
        Family("siglip2", image_inputs=IMAGE_INPUT_KEYS, sigmoid=True),
        Family("altclip", text_embeddings="text_model.roberta.embeddings"),
        Family("chinese_clip"),
    )
}

_TOKEN_EMBEDDING_ATTRS = ("token_embedding", "word_embeddings")  # CLIP / SigLIP, then BERT / RoBERTa


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of ``model`` (unwrapped from PEFT / DDP); an unknown ``model_type`` gets CLIP's paths."""
    from hf_cft.models.clip import unwrap_model

    model_type = str(getattr(getattr(unwrap_model(model), "config", None), "model_type", "") or "")
    return FAMILIES.get(model_type, Family(model_type or "clip"))


def token_embedding(embeddings: nn.Module) -> nn.Embedding | None:
    """The token-embedding table of a text embeddings module (``token_embedding`` in CLIP and SigLIP,
    ``word_embeddings`` in the BERT / RoBERTa towers of ChineseCLIP and AltCLIP), or ``None``."""
    for attr in _TOKEN_EMBEDDING_ATTRS:
        table = getattr(embeddings, attr, None)
        if isinstance(table, nn.Embedding):
            return table
    return None


def image_inputs(batch: Mapping | None) -> dict[str, torch.Tensor]:
    """The extra image inputs (:data:`IMAGE_INPUT_KEYS`) a batch carries, for ``image_features(model, px, **...)``;
    empty for families that take ``pixel_values`` alone."""
    if not isinstance(batch, Mapping):
        return {}
    return {k: batch[k] for k in IMAGE_INPUT_KEYS if batch.get(k) is not None}
