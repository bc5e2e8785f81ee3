"""hf_cft's card for ``PeftModel.save_pretrained``.

PEFT writes its generic card ("More Information Needed") into every adapter folder it saves. ``import hf_cft``
routes that call here (see ``hf_cft._install_peft_card_hook``): an adapter of one of hf_cft's method types
(CoOp, VPT, linear head), or a LoRA on a CLIP-like model, gets hf_cft's adapter card instead; any other PEFT model
keeps PEFT's card. A card that hf_cft already wrote into the folder (e.g. by ``trainer.save_model`` with its
evaluation results) is kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_cft.utils import atomic_write_bytes

HF_CFT_PEFT_TYPES = {"HF_CFT_COOP", "HF_CFT_VPT", "HF_CFT_HEAD"}
HF_CFT_TAG = "hf_cft"


def _is_ours(peft_model) -> bool:
    from hf_cft.hub.cards import ADAPTER_METHODS
    from hf_cft.models.clip import check_clip_like

    types = {str(getattr(cfg.peft_type, "value", cfg.peft_type)) for cfg in peft_model.peft_config.values()}
    if types & HF_CFT_PEFT_TYPES:
        return True
    if not types <= set(ADAPTER_METHODS):  # e.g. IA3 on CLIP: hf_cft has no card for it, PEFT's own card is written
        return False
    try:
        check_clip_like(peft_model.get_base_model())
    except Exception:  # not a CLIP-like model: PEFT's own card is the right one
        return False
    return True


def _has_hf_cft_card(readme: Path) -> bool:
    if not readme.is_file():
        return False
    from huggingface_hub import ModelCard

    try:
        tags = ModelCard.load(readme).data.to_dict().get("tags") or []
    except Exception:  # unreadable metadata: not a card hf_cft wrote
        return False
    return HF_CFT_TAG in tags


def write_peft_card(peft_model, output_dir: str | os.PathLike) -> bool:
    """Write hf_cft's adapter card to ``output_dir/README.md`` for hf_cft's adapters; ``False`` when the model is
    not one of them (the caller then writes PEFT's card)."""
    if not _is_ours(peft_model):
        return False
    readme = Path(output_dir) / "README.md"
    if _has_hf_cft_card(readme):
        return True
    from hf_cft.hub.cards import adapter_card

    name = peft_model.active_adapters[0] if getattr(peft_model, "active_adapters", None) else None
    card = adapter_card(
        peft_model,
        model_name=Path(output_dir).resolve().name,
        dataset_name="an unrecorded dataset",
        adapter_name=name,
        results_note=(
            "Saved with `save_pretrained`, which records no training data or evaluation; `trainer.save_model` "
            "or `hf_cft.hub.push_to_hub` write both."
        ),
    )
    readme.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(readme, str(card).encode("utf-8"))
    return True
