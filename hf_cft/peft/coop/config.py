from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from hf_cft.errors import AdapterError
from hf_cft.peft.base import TokenizerAttachMixin

COOP_PEFT_TYPE = "HF_CFT_COOP"
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig(TokenizerAttachMixin, PeftConfig):
    """Configuration of CoOp soft prompts (Zhou et al., *Learning to Prompt for Vision-Language Models*, IJCV 2022)
    for the text tower of a CLIP-like model.

    The prompt of class ``c`` is ``[SOS] X X ... X <c>. [EOS]`` with ``n_ctx`` placeholder tokens ``X``; the
    placeholders' token embeddings are replaced by learned context vectors before position embeddings are added,
    so ``input_ids`` (and hence EOS pooling and the causal mask) are never changed.
    """

    n_ctx: int | None = field(
        default=None, metadata={"help": "Number of context vectors (16 if no ctx_init, else the init's token count)."}
    )
    ctx_init: str | None = field(
        default=None,
        metadata={"help": "Initialise the context from this text's token embeddings, e.g. 'a photo of a'."},
    )
    class_specific: bool = field(
        default=False, metadata={"help": "One context per class (CSC) instead of a shared one."}
    )
    class_token_position: str = field(
        default="end", metadata={"help": "Where the class name goes: end, middle, front."}
    )
    classnames: list[str] | None = field(
        default=None, metadata={"help": "Class names; required with class_specific (defines the number of contexts)."}
    )
    placeholder_token: str = field(default="X", metadata={"help": "Existing single-token word marking context slots."})
    placeholder_token_id: int | None = field(
        default=None, metadata={"help": "Token id of placeholder_token (filled in when the adapter is created)."}
    )
    init_std: float = field(default=0.02, metadata={"help": "Std of the random context initialisation."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer for ctx_init (else base_model_name_or_path or set_tokenizer())."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "The text embeddings module (default: the family's, text_model.embeddings for most)."},
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = COOP_PEFT_TYPE
        if self.target_modules is None:
            self.target_modules = ["text_model.embeddings"]
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise AdapterError(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {self.class_token_position!r}"
            )
        if self.n_ctx is not None and self.n_ctx < 1:
            raise AdapterError(f"n_ctx must be at least 1, got {self.n_ctx}")
        if not self.init_std >= 0:  # also catches NaN
            raise AdapterError(f"init_std must be a non-negative number, got {self.init_std}")
        if self.class_specific and not self.classnames:
            raise AdapterError("class_specific=True (CSC) needs classnames: one context is learned per class.")
