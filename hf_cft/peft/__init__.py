"""hf_cft's PEFT method types for CLIP-like models: CoOp soft prompts, visual prompt tokens (VPT) and a
zero-shot-initialised linear head. ``import hf_cft`` registers them with PEFT as soon as PEFT is imported."""

from hf_cft import _install_peft_card_hook, _register_peft_methods
from hf_cft.peft.coop import CoOpConfig, CoOpModel
from hf_cft.peft.head import LinearHeadConfig, LinearHeadModel
from hf_cft.peft.registration import register
from hf_cft.peft.vpt import VPTConfig, VPTModel

# importing this package imported PEFT (its configs subclass PEFT's): register now that the types exist
_register_peft_methods()
_install_peft_card_hook()

__all__ = ["CoOpConfig", "CoOpModel", "LinearHeadConfig", "LinearHeadModel", "VPTConfig", "VPTModel", "register"]
