from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hf_cft.errors import AdapterError
from hf_cft.peft.base import single_active_adapter


class CoOpLayer(nn.Module, BaseTunerLayer):
    """Wraps a text-embeddings module (``CLIPTextEmbeddings``, or the BERT / RoBERTa embeddings of ChineseCLIP and
    AltCLIP, which also take ``input_ids`` with ``inputs_embeds``): replaces the token embeddings at placeholder
    positions by learned context vectors, then lets the original module add position embeddings.

    Rows without placeholders are embedded unchanged, so ordinary prompts still encode as in the base model.
    """

    adapter_layer_names = ("coop_ctx",)
    other_param_names = ("coop_placeholder_id",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self.coop_ctx = nn.ParameterDict({})
        self.coop_placeholder_id: dict[str, int] = {}
        self.merged_adapters = []
        self._row_classes: torch.Tensor | None = None
        self._ctx_mask: torch.Tensor | None = None
        self._adapter_override: str | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The wrapped module's token-embedding table (``token_embedding`` or BERT's ``word_embeddings``)."""
        from hf_cft.models.families import token_embedding

        return token_embedding(self.get_base_layer())

    @property
    def embed_dim(self) -> int:
        return self.token_embedding.weight.shape[1]

    def update_layer(self, adapter_name, n_ctx, n_contexts, placeholder_id, init=None, init_std=0.02, **_):
        weight = self.token_embedding.weight
        shape = (n_contexts, n_ctx, self.embed_dim) if n_contexts else (n_ctx, self.embed_dim)
        ctx = torch.empty(shape, dtype=torch.float32, device=weight.device)
        if init is not None:
            ctx.copy_(init.to(ctx).expand(shape))
        else:
            nn.init.normal_(ctx, std=init_std)
        self.coop_ctx[adapter_name] = nn.Parameter(ctx)
        self.coop_placeholder_id[adapter_name] = int(placeholder_id)
        self.set_adapter(self.active_adapters)

    @contextmanager
    def prompt_context(
        self, ctx_mask: torch.Tensor | None, row_classes: torch.Tensor | None = None, adapter: str | None = None
    ):
        """Within the block, prompts of shape ``ctx_mask.shape`` take the context at ``ctx_mask`` positions
        (from ``CoOpModel.build_prompts``), row ``i`` being class ``row_classes[i]`` (class-specific contexts), of
        ``adapter`` (default: the active one; another one is used without activating it, trainability unchanged)."""
        prev = (self._ctx_mask, self._row_classes, self._adapter_override)
        self._ctx_mask, self._row_classes, self._adapter_override = ctx_mask, row_classes, adapter
        try:
            yield self
        finally:
            self._ctx_mask, self._row_classes, self._adapter_override = prev

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        base = self.get_base_layer()
        adapter = single_active_adapter(self, "CoOp")
        if adapter is not None and self._adapter_override is not None:  # disabled adapters stay disabled
            adapter = self._adapter_override
        if adapter is None or input_ids is None or self.merged:
            return base(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        ctx = self.coop_ctx[adapter]
        if self._ctx_mask is not None and self._ctx_mask.shape == input_ids.shape:
            slots = self._ctx_mask.to(input_ids.device)  # positions given by build_prompts
        else:
            slots = input_ids == self.coop_placeholder_id[adapter]  # [B, L]
        counts = slots.sum(dim=1)
        rows = counts > 0
        n_ctx = ctx.shape[-2]
        if bool((counts[rows] != n_ctx).any()):
            bad = int(counts[rows][counts[rows] != n_ctx][0])
            raise AdapterError(
                f"CoOp adapter {adapter!r}: a prompt holds {bad} placeholder tokens but the adapter has {n_ctx} "
                "context vectors (does a class name contain the placeholder word? encode class prompts through "
                "class_text_features(), which marks the slots by position)."
            )
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        if bool(rows.any()):
            if ctx.dim() == 3:  # class-specific contexts: the caller says which class each row is
                if self._row_classes is None:
                    raise AdapterError(
                        f"CoOp adapter {adapter!r} is class-specific: encode prompts through "
                        "class_text_features(), which tells the layer which class each prompt belongs to."
                    )
                values = ctx[self._row_classes.to(ctx.device)[rows]]  # [R, n_ctx, d]
            else:
                values = ctx.unsqueeze(0).expand(int(rows.sum()), -1, -1)
            inputs_embeds = inputs_embeds.clone()
            inputs_embeds[slots] = values.reshape(-1, values.shape[-1]).to(inputs_embeds.dtype)
        return base(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)

    def merge(self, *args, **kwargs):
        from hf_cft.errors import AdapterMergeError

        raise AdapterMergeError("CoOp context vectors cannot be merged into the text embeddings.")

    def unmerge(self):
        return None

    def __repr__(self) -> str:
        return "coop." + super().__repr__()
