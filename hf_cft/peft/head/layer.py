from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hf_cft.errors import AdapterMergeError


class LinearHeadLayer(nn.Module, BaseTunerLayer):
    """Attaches a per-adapter head ``(W [C, d], b [C])`` to the module producing the image features (CLIP's
    ``visual_projection``, SigLIP's attention-pooling ``vision_model.head``); that module is unchanged
    (features stay features), the head is applied by ``LinearHeadModel.classify``."""

    adapter_layer_names = ("head_weight", "head_bias")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self.head_weight = nn.ParameterDict({})
        self.head_bias = nn.ParameterDict({})
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name, num_classes, dim, bias, init_weight=None, init="zeros", **_):
        ref = next(self.get_base_layer().parameters())
        weight = torch.zeros(num_classes, dim, dtype=torch.float32, device=ref.device)
        if init_weight is not None:
            weight.copy_(init_weight)
        elif init == "random":
            nn.init.normal_(weight, std=dim**-0.5)
        self.head_weight[adapter_name] = nn.Parameter(weight)
        if bias:
            self.head_bias[adapter_name] = nn.Parameter(
                torch.zeros(num_classes, dtype=torch.float32, device=ref.device)
            )
        self.set_adapter(self.active_adapters)

    def forward(self, x, *args, **kwargs):
        return self.get_base_layer()(x, *args, **kwargs)

    def merge(self, *args, **kwargs):
        raise AdapterMergeError("a classification head has no weights to merge into the image projection.")

    def unmerge(self):
        return None

    def __repr__(self) -> str:
        return "linear_head." + super().__repr__()
