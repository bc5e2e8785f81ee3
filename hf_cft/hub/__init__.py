"""Model cards (templates in ``model_cards/``, rendered with ``huggingface_hub.ModelCard``) and Hub helpers."""

from hf_cft.hub.cards import ADAPTER_METHODS, adapter_card, render_card

__all__ = ["ADAPTER_METHODS", "adapter_card", "render_card"]
