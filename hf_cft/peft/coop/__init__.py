"""CoOp soft prompts for the text tower of CLIP-like models (a PEFT method type, ``HF_CFT_COOP``)."""

from hf_cft.peft.coop.config import COOP_PEFT_TYPE, CoOpConfig
from hf_cft.peft.coop.layer import CoOpLayer
from hf_cft.peft.coop.model import CoOpModel

__all__ = ["COOP_PEFT_TYPE", "CoOpConfig", "CoOpLayer", "CoOpModel"]
