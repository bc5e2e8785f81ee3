"""Model-card templates (Jinja, YAML front matter rendered by huggingface_hub.ModelCard), installed as the
package ``hf_cft.model_cards`` so that an installed hf_cft can render them."""
