"""Visual prompt tuning (shallow and deep) for the vision tower of CLIP-like models (``HF_CFT_VPT``)."""

from hf_cft.peft.vpt.config import VPT_PEFT_TYPE, VPTConfig
from hf_cft.peft.vpt.layer import VPTDeepLayer, VPTEmbeddingLayer
from hf_cft.peft.vpt.model import VPTModel

__all__ = ["VPT_PEFT_TYPE", "VPTConfig", "VPTDeepLayer", "VPTEmbeddingLayer", "VPTModel"]
