from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import BaseTuner

from hf_cft.errors import AdapterError
from hf_cft.peft.base import NoMergeTunerMixin, single_active_adapter
from hf_cft.peft.vpt.config import VPTConfig
from hf_cft.peft.vpt.layer import VPTDeepLayer, VPTEmbeddingLayer, _VPTBase, default_init_range

_LAYER_INDEX = re.compile(r"layers\.(\d+)$")


class VPTModel(NoMergeTunerMixin, BaseTuner):
    """Visual prompt tokens on the vision tower of a CLIP-like model (see :class:`VPTConfig`)."""

    prefix: str = "vpt_"
    tuner_layer_cls = _VPTBase
    target_module_mapping: dict = {}
    method_name = "VPT"

    def _vision_config(self):
        cfg = getattr(self.model, "config", None)
        return getattr(cfg, "vision_config", cfg)

    def _create_and_replace(self, peft_config: VPTConfig, adapter_name, target, target_name, parent, current_key):
        vcfg = self._vision_config()
        base = target.get_base_layer() if isinstance(target, _VPTBase) else target
        is_embeddings = hasattr(base, "patch_embedding")
        if not is_embeddings:
            m = _LAYER_INDEX.search(current_key)
            if m is None:
                raise AdapterError(
                    f"VPT adapter {adapter_name!r}: target {current_key!r} ({type(base).__name__}) is neither the "
                    "vision embeddings nor an encoder layer."
                )
            if int(m.group(1)) == 0:
                return  # layer 0 sees the prompts inserted by the embeddings
        kwargs = {
            "n_tokens": peft_config.n_tokens,
            "hidden_size": int(vcfg.hidden_size),
            "init_range": peft_config.init_range or default_init_range(int(vcfg.patch_size), int(vcfg.hidden_size)),
            "has_cls": hasattr(self._vision_embeddings(), "class_embedding"),
            "reference": next(base.parameters()),
        }
        if isinstance(target, _VPTBase):
            target.update_layer(adapter_name, **kwargs)
        else:
            cls = VPTEmbeddingLayer if is_embeddings else VPTDeepLayer
            self._replace_module(parent, target_name, cls(target, adapter_name, **kwargs), target)
        if is_embeddings:
            _extend_patch_mask(parent, target_name)

    def _vision_embeddings(self):
        for name, module in self.model.named_modules():
            if name == "vision_model.embeddings" or name.endswith(".vision_model.embeddings"):
                return module.get_base_layer() if isinstance(module, _VPTBase) else module
        raise AdapterError("VPT needs a vision tower with an `embeddings` module (CLIPVisionEmbeddings).")


def _extend_patch_mask(vision_tower, embeddings_name: str) -> None:
    """SigLIP2 (NaFlex) masks padded patches with ``pixel_attention_mask`` ``[B, N]``, which its vision tower hands
    to the encoder and the pooling head: the prompt tokens need ones in it, or the mask no longer fits the sequence.
    A forward pre-hook on the tower (registered once) prepends them while a VPT adapter is active."""
    import inspect

    if getattr(vision_tower, "_hf_cft_vpt_mask_hook", False):
        return
    if "pixel_attention_mask" not in inspect.signature(vision_tower.forward).parameters:
        return

    def hook(module, args, kwargs):
        mask = kwargs.get("pixel_attention_mask")
        layer = getattr(module, embeddings_name, None)
        if mask is None or not isinstance(layer, VPTEmbeddingLayer):
            return None
        adapter = single_active_adapter(layer, "VPT")
        if adapter is None:
            return None
        n = layer.vpt_prompts[adapter].shape[0]
        ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
        start = layer._start
        kwargs["pixel_attention_mask"] = torch.cat([mask[:, :start], ones, mask[:, start:]], dim=1)
        return args, kwargs

    vision_tower.register_forward_pre_hook(hook, with_kwargs=True)
    vision_tower._hf_cft_vpt_mask_hook = True
