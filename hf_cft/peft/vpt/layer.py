from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hf_cft.errors import AdapterMergeError
from hf_cft.peft.base import single_active_adapter


def _uniform(shape, init_range: float, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.float32, device=like.device).uniform_(-init_range, init_range))


class _VPTBase(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("vpt_prompts",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self.vpt_prompts = nn.ParameterDict({})
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name, n_tokens, hidden_size, init_range, has_cls, reference, **_):
        self.has_cls = has_cls
        self.vpt_prompts[adapter_name] = _uniform((n_tokens, hidden_size), init_range, reference)
        self.set_adapter(self.active_adapters)

    @property
    def _start(self) -> int:
        return 1 if self.has_cls else 0

    def merge(self, *args, **kwargs):
        raise AdapterMergeError("visual prompt tokens cannot be merged into the vision tower's weights.")

    def unmerge(self):
        return None


class VPTEmbeddingLayer(_VPTBase):
    """Wraps the vision embeddings: ``[CLS, patches]`` → ``[CLS, prompts, patches]``."""

    def forward(self, pixel_values, *args, **kwargs):
        out = self.get_base_layer()(pixel_values, *args, **kwargs)
        adapter = single_active_adapter(self, "VPT")
        if adapter is None:
            return out
        p = self.vpt_prompts[adapter].to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
        s = self._start
        return torch.cat([out[:, :s], p, out[:, s:]], dim=1)

    def __repr__(self) -> str:
        return "vpt." + super().__repr__()


class VPTDeepLayer(_VPTBase):
    """Wraps one encoder layer: replaces the prompt tokens' hidden states by this layer's own prompts."""

    def forward(self, hidden_states, *args, **kwargs):
        adapter = single_active_adapter(self, "VPT")
        if adapter is not None:
            p = self.vpt_prompts[adapter]
            s, n = self._start, p.shape[0]
            hidden_states = torch.cat(
                [
                    hidden_states[:, :s],
                    p.to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1),
                    hidden_states[:, s + n :],
                ],
                dim=1,
            )
        return self.get_base_layer()(hidden_states, *args, **kwargs)

    def __repr__(self) -> str:
        return "vpt_deep." + super().__repr__()


def default_init_range(patch_size: int, hidden_size: int, channels: int = 3) -> float:
    return math.sqrt(6.0 / float(channels * patch_size * patch_size + hidden_size))
