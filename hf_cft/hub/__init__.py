"""Model cards (templates in ``model_cards/``, rendered with ``huggingface_hub.ModelCard``), Hub push helpers and
safe loading of artefacts from folders or Hub repos.

Example::

    from hf_cft.hub import adapter_card, push_to_hub, load_adapter_model

    push_to_hub(peft_model, "me/coop-dtd", card_kwargs=dict(dataset_name="dtd", results=rows))
    model = load_adapter_model(clip, "me/coop-dtd")    # PeftModel; safetensors only, typed errors
"""

from hf_cft.hub.cards import (
    ADAPTER_METHODS,
    CARD_KINDS,
    MERGETUNE_METHOD,
    PAM_METHOD,
    adapter_card,
    condu_card,
    eval_result_entries,
    eval_results_files,
    finetuned_model_card,
    merge_card,
    mergetune_card,
    pam_card,
    render_card,
    validate_card,
)
from hf_cft.hub.merge import run_merge
from hf_cft.hub.push import (
    PICKLE_SUFFIXES,
    artefact_kind,
    load_adapter,
    load_adapter_model,
    load_model,
    push_adapter_to_hub,
    push_folder_to_hub,
    push_to_hub,
    snapshot,
)

__all__ = [
    "ADAPTER_METHODS",
    "CARD_KINDS",
    "MERGETUNE_METHOD",
    "PAM_METHOD",
    "PICKLE_SUFFIXES",
    "adapter_card",
    "artefact_kind",
    "condu_card",
    "eval_result_entries",
    "eval_results_files",
    "finetuned_model_card",
    "load_adapter",
    "load_adapter_model",
    "load_model",
    "merge_card",
    "mergetune_card",
    "pam_card",
    "push_adapter_to_hub",
    "push_folder_to_hub",
    "push_to_hub",
    "render_card",
    "run_merge",
    "snapshot",
    "validate_card",
]
