from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner

from hf_cft.errors import AdapterError
from hf_cft.peft.base import NoMergeTunerMixin, resolve_tokenizer, single_active_adapter
from hf_cft.peft.head.config import LinearHeadConfig
from hf_cft.peft.head.layer import LinearHeadLayer


class LinearHeadModel(NoMergeTunerMixin, BaseTuner):
    """A zero-shot-initialised linear head on the image features of a CLIP-like model.

    ``classify(pixel_values)`` returns ``normalize(f_img(x)) @ Wᵀ + b``; :meth:`head_logits` does the same from
    precomputed (e.g. cached, frozen) normalised image features.
    """

    prefix: str = "head_"
    tuner_layer_cls = LinearHeadLayer
    target_module_mapping: dict = {}
    method_name = "Linear-head"

    def _prepare_adapter_config(self, peft_config, model_config):
        siglip_like = not hasattr(self.model, "visual_projection") and hasattr(
            getattr(self.model, "vision_model", None), "head"
        )
        if peft_config.target_modules == ["visual_projection"] and siglip_like:
            peft_config.target_modules = ["vision_model.head"]  # SigLIP: features come from the MAP head
        return peft_config

    def _feature_dim(self) -> int:
        cfg = self.model.config
        if hasattr(self.model, "visual_projection"):
            proj = self.model.visual_projection
            return int((proj.get_base_layer() if isinstance(proj, LinearHeadLayer) else proj).out_features)
        return int(getattr(cfg, "vision_config", cfg).hidden_size)

    def _create_and_replace(
        self, peft_config: LinearHeadConfig, adapter_name, target, target_name, parent, current_key
    ):
        base = target.get_base_layer() if isinstance(target, LinearHeadLayer) else target
        if not any(True for _ in base.parameters()):
            raise AdapterError(
                f"Linear-head adapter {adapter_name!r}: target {current_key!r} ({type(base).__name__}) has no "
                "parameters; target the module that produces the image features (visual_projection)."
            )
        init_weight = None
        if peft_config.init == "zeroshot" and not peft_config.initialized:
            init_weight = self._zeroshot_weight(peft_config, adapter_name)
        peft_config.initialized = True
        kwargs = {
            "num_classes": peft_config.num_classes,
            "dim": self._feature_dim(),
            "bias": peft_config.use_bias,
            "init_weight": init_weight,
            "init": peft_config.init,
        }
        if isinstance(target, LinearHeadLayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            self._replace_module(parent, target_name, LinearHeadLayer(target, adapter_name, **kwargs), target)

    def _zeroshot_weight(self, config: LinearHeadConfig, adapter_name: str) -> torch.Tensor:
        tokenizer = resolve_tokenizer(config)
        if tokenizer is None:
            raise AdapterError(
                f"Linear-head adapter {adapter_name!r} with init='zeroshot' needs a tokenizer: call "
                "config.set_tokenizer(tokenizer) or set tokenizer_name_or_path (or use init='zeros')."
            )
        from hf_cft.models.clip import logit_scale
        from hf_cft.models.zeroshot import build_zeroshot_classifier

        templates = config.templates or ["a photo of a {}."]
        with torch.no_grad():
            head = build_zeroshot_classifier(self.model, tokenizer, config.classnames, templates)
            return head * logit_scale(self.model).float()

    def _head_layer(self) -> LinearHeadLayer:
        for module in self.model.modules():
            if isinstance(module, LinearHeadLayer):
                return module
        raise AdapterError("this model has no linear-head layer")

    def head_parameters(self, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [C, d], b [C] or None)`` of the active (or named) head adapter."""
        layer = self._head_layer()
        adapter = adapter_name or single_active_adapter(layer, "Linear head")
        if adapter is None or adapter not in layer.head_weight:
            raise AdapterError("no linear-head adapter is active (disabled, or set_adapter to another one)")
        return layer.head_weight[adapter], layer.head_bias.get(adapter, None)

    def head_logits(self, image_features: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Logits ``[N, C]`` from image features (normalised here unless ``normalized=True`` says they are)."""
        w, b = self.head_parameters()
        feats = image_features if normalized else F.normalize(image_features, dim=-1)
        return F.linear(feats.to(w.dtype), w, b)

    def classify(self, pixel_values: torch.Tensor, **image_inputs) -> torch.Tensor:
        """Logits ``[N, C]`` for images (every class of the head). :func:`hf_cft.class_logits` gives class logits for
        every model kind (CoOp, VPT, LoRA, this head restricted to given class names, ConDU) with one call."""
        from hf_cft.models.clip import image_features

        return self.head_logits(image_features(self.model, pixel_values, normalize=True, **image_inputs))
