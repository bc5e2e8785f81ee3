"""Pieces shared by hf_cft's PEFT method types (CoOp, VPT, linear head).

Each method follows PEFT's tuner contract: a ``PeftConfig`` subclass, a ``BaseTuner`` subclass that wraps the
matched modules, and a ``BaseTunerLayer`` that owns one ``ParameterDict`` entry per adapter. These helpers hold
the parts that are the same for all three: single-active-adapter checks, the "nothing to merge" policy and
finding a tokenizer for initialisation.
"""

from __future__ import annotations

from torch import nn

from hf_cft.errors import AdapterError, AdapterMergeError


class NoMergeTunerMixin:
    """For tuners whose adapters add tokens or a head: there are no base weights to merge them into.

    ``merge_and_unload`` raises :class:`AdapterMergeError`; ``unload`` puts every wrapped module back.
    """

    method_name: str = "this method"

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # the configs set their own target_modules in __post_init__

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        from peft.tuners.tuners_utils import BaseTunerLayer, _get_submodules

        wrapped = [name for name, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]
        for name in wrapped:
            parent, target, target_name = _get_submodules(self.model, name)
            setattr(parent, target_name, target.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def _check_merge_allowed(self):
        raise AdapterMergeError(
            f"{self.method_name} adapters cannot be merged into the base weights: they add learned tokens or a "
            "classification head, not a weight update. Use unload() to get the base model back, or keep the "
            "PeftModel for inference."
        )


def single_active_adapter(layer, method: str) -> str | None:
    """The one active adapter of ``layer`` (``None`` when disabled or none active)."""
    if layer.disable_adapters or not layer.active_adapters:
        return None
    present = [a for a in layer.active_adapters if a in getattr(layer, layer.adapter_layer_names[0])]
    if not present:
        return None
    if len(present) > 1:
        raise AdapterError(f"{method} runs one adapter at a time; active adapters are {present}.")
    return present[0]


def resolve_tokenizer(config, model: nn.Module | None = None):
    """The tokenizer attached with ``config.set_tokenizer``, else one loaded from ``tokenizer_name_or_path`` or
    ``base_model_name_or_path``; ``None`` when there is none."""
    tok = getattr(config, "_tokenizer", None)
    if tok is not None:
        return tok
    from hf_cft.models.tokenizer import load_tokenizer

    for path in (getattr(config, "tokenizer_name_or_path", None), getattr(config, "base_model_name_or_path", None)):
        if path:
            try:
                return load_tokenizer(path)
            except Exception:  # noqa: BLE001 - fall through to the next candidate
                continue
    return None


class TokenizerAttachMixin:
    """Lets a config carry a tokenizer object for initialisation without serialising it."""

    def set_tokenizer(self, tokenizer):
        """Attach a tokenizer used when the adapter is created (not saved; returns the config)."""
        object.__setattr__(self, "_tokenizer", tokenizer)
        return self
