"""hf_cft's PEFT method types for CLIP-like models: CoOp soft prompts, visual prompt tokens (VPT) and a
zero-shot-initialised linear head. ``import hf_cft`` registers them with PEFT."""

from hf_cft.peft.coop import CoOpConfig, CoOpModel
from hf_cft.peft.head import LinearHeadConfig, LinearHeadModel
from hf_cft.peft.registration import register
from hf_cft.peft.vpt import VPTConfig, VPTModel

__all__ = ["CoOpConfig", "CoOpModel", "LinearHeadConfig", "LinearHeadModel", "VPTConfig", "VPTModel", "register"]
