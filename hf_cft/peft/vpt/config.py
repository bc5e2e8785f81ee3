from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from hf_cft.errors import AdapterError

VPT_PEFT_TYPE = "HF_CFT_VPT"


@dataclass
class VPTConfig(PeftConfig):
    """Visual prompt tuning (Jia et al., *Visual Prompt Tuning*, ECCV 2022) for the vision tower of a CLIP-like
    model: ``n_tokens`` learned tokens inserted right after the CLS token (shallow), and with ``deep=True`` a
    fresh set replacing them at the input of every later encoder layer.

    CLIP pools the CLS token (position 0), which the prompts never displace. Models without a CLS token
    (SigLIP's attention-pooling head) get the prompts in front of the patch tokens.
    """

    n_tokens: int = field(default=8, metadata={"help": "Number of prompt tokens (per layer when deep)."})
    deep: bool = field(default=False, metadata={"help": "VPT-deep: new prompts at the input of every layer."})
    init_range: float | None = field(
        default=None,
        metadata={"help": "Uniform init range; default sqrt(6 / (3·patch² + hidden)) as in the VPT paper."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Default: vision_model.embeddings (+ vision_model.encoder.layers.<i> when deep)."},
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = VPT_PEFT_TYPE
        if self.n_tokens < 1:
            raise AdapterError(f"n_tokens must be at least 1, got {self.n_tokens}")
        if self.init_range is not None and not self.init_range > 0:  # also catches NaN
            raise AdapterError(f"init_range must be a positive number, got {self.init_range}")
        if self.target_modules is None:
            self.target_modules = (
                r"^vision_model\.(embeddings|encoder\.layers\.\d+)$" if self.deep else ["vision_model.embeddings"]
            )
