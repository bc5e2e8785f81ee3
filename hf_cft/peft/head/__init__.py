"""A zero-shot-initialised linear head on CLIP image features (a PEFT method type, ``HF_CFT_HEAD``)."""

from hf_cft.peft.head.config import HEAD_PEFT_TYPE, LinearHeadConfig
from hf_cft.peft.head.layer import LinearHeadLayer
from hf_cft.peft.head.model import LinearHeadModel

__all__ = ["HEAD_PEFT_TYPE", "LinearHeadConfig", "LinearHeadLayer", "LinearHeadModel"]
