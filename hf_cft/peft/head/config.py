from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from hf_cft.errors import AdapterError
from hf_cft.peft.base import TokenizerAttachMixin

HEAD_PEFT_TYPE = "HF_CFT_HEAD"
HEAD_INITS = ("zeroshot", "zeros", "random")


@dataclass
class LinearHeadConfig(TokenizerAttachMixin, PeftConfig):
    """A linear classification head on the normalised image features of a CLIP-like model.

    ``init="zeroshot"`` (default) starts from the zero-shot text classifier, ``W = s · T`` with ``T`` the
    template-ensembled, normalised class text features and ``s = exp(logit_scale)``, so the head's logits equal
    the zero-shot logits before training (the "LP / zero-shot-init head" of WiSE-FT and FLYP). It needs
    ``classnames``, ``templates`` and a tokenizer (``set_tokenizer`` or ``tokenizer_name_or_path``).

    The image tower stays frozen unless ``modules_to_save`` names it (e.g. ``["vision_model", "visual_projection"]``
    trains and saves it too) or another adapter trains it.
    """

    num_classes: int | None = field(default=None, metadata={"help": "Number of classes (default: len(classnames))."})
    classnames: list[str] | None = field(default=None, metadata={"help": "Class names (needed for zeroshot init)."})
    templates: list[str] | None = field(default=None, metadata={"help": "Templates for the zero-shot init."})
    init: str = field(default="zeroshot", metadata={"help": "zeroshot, zeros or random."})
    use_bias: bool = field(default=True, metadata={"help": "Learn a bias (initialised to zero)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer for the zero-shot init."})
    initialized: bool = field(
        default=False, metadata={"help": "Set once the head exists; a saved head loads its weights, no re-init."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "The image projection the head is attached to (default visual_projection)."}
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HEAD_PEFT_TYPE
        if self.target_modules is None:
            self.target_modules = ["visual_projection"]
        if self.init not in HEAD_INITS:
            raise AdapterError(f"init must be one of {HEAD_INITS}, got {self.init!r}")
        if self.num_classes is None and self.classnames:
            self.num_classes = len(self.classnames)
        if self.num_classes is None or self.num_classes < 1:
            raise AdapterError("LinearHeadConfig needs num_classes or classnames.")
        if self.classnames is not None and len(self.classnames) != self.num_classes:
            raise AdapterError(f"num_classes={self.num_classes} but {len(self.classnames)} classnames were given.")
        if self.init == "zeroshot" and not self.classnames:
            raise AdapterError("init='zeroshot' needs classnames (and templates) to build the zero-shot classifier.")
