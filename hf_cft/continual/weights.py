"""Weights of a continual run as deltas from the frozen pretrained model θ⁰.

- :func:`call_with_delta` runs any function of a model (``encode_images``, ``build_zeroshot_classifier``,
  ``image_features``...) on θ⁰ + δ through ``torch.func.functional_call``: no model copy, and θ⁰'s own tensors are
  never written, so nothing has to be restored (``docs/methods/condu.md`` §7, "build experts on demand").
- :func:`trained_delta` turns a trained model (full fine-tuning, or a PEFT LoRA model) into a dense delta
  ``{θ⁰ parameter name: fp32 tensor}``; for LoRA the dense ΔW = s·B@A of every adapted linear (§5, ``"dense"``).
- :class:`DeltaStore` keeps expert deltas on disk (safetensors, atomic writes), one file per task, loaded on
  demand, so a strategy holds at most one or two deltas in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from hf_cft.errors import BundleError, DeltaError, NonFiniteError

Delta = dict[str, torch.Tensor]


class _Bound(nn.Module):
    """Holds a model so that ``functional_call`` can swap its parameters around an arbitrary function."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, args, kwargs):
        return fn(self.model, *args, **kwargs)


def delta_parameters(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: θ⁰[name] + δ[name]}`` for the keys of ``delta`` (cast to each parameter's dtype and device); a key
    that is not a parameter of ``model`` or a shape mismatch raises :class:`DeltaError` naming the key."""
    params = dict(model.named_parameters())
    out = {}
    for key, d in delta.items():
        p = params.get(key)
        if p is None:
            raise DeltaError(f"delta key {key!r} is not a parameter of {type(model).__name__}")
        if tuple(d.shape) != tuple(p.shape):
            raise DeltaError(f"delta key {key!r} has shape {tuple(d.shape)}, the parameter {tuple(p.shape)}")
        out[key] = (p.detach().float() + d.to(device=p.device, dtype=torch.float32)).to(p.dtype)
    return out


def call_with_delta(model: nn.Module, delta: Mapping[str, torch.Tensor] | None, fn: Callable, *args, **kwargs):
    """``fn(model, *args, **kwargs)`` computed with the weights θ⁰ + δ.

    The parameters named in ``delta`` are replaced for the duration of the call by ``torch.func.functional_call``
    (tied weights stay tied); ``model``'s own tensors are never modified. ``delta=None`` or ``{}`` calls ``fn`` on
    θ⁰ directly.

    Example::

        feats, labels = call_with_delta(clip, expert_delta, encode_images, loader)
    """
    if not delta:
        return fn(model, *args, **kwargs)
    params = {f"model.{k}": v for k, v in delta_parameters(model, delta).items()}
    return torch.func.functional_call(_Bound(model), params, args=(fn, args, kwargs), strict=False)


def add_deltas(a: Mapping[str, torch.Tensor] | None, b: Mapping[str, torch.Tensor]) -> Delta:
    """Element-wise ``a + b`` over the union of keys (fp32)."""
    out = {k: v.float().clone() for k, v in (a or {}).items()}
    for k, v in b.items():
        out[k] = out[k] + v.float() if k in out else v.float().clone()
    return out


def check_finite(delta: Mapping[str, torch.Tensor], where: str) -> None:
    for k, v in delta.items():
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"delta key {k!r} of {where} holds NaN or inf")


def lora_dense_delta(peft_model: nn.Module, adapter: str | None = None) -> Delta:
    """Dense ΔW = scaling · B @ A of every LoRA layer of ``peft_model``, keyed by the base weight's name in the
    unwrapped model (``vision_model.encoder.layers.0.mlp.fc1.weight``), computed by PEFT's ``get_delta_weight``."""
    from peft.tuners.lora import LoraLayer

    adapter = adapter or getattr(peft_model, "active_adapter", "default")
    out: Delta = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        with torch.no_grad():
            out[key] = module.get_delta_weight(adapter).detach().float().cpu().clone()
    if not out:
        raise DeltaError(f"the model has no LoRA layer for adapter {adapter!r}")
    return out


def trained_delta(base_model: nn.Module, trained: nn.Module, start: Mapping[str, torch.Tensor] | None = None) -> Delta:
    """The dense delta θ − θ⁰ of a trained model, as fp32 CPU tensors.

    - full fine-tuning (``trained`` is a plain model): every parameter that was trainable, θ − θ⁰;
    - LoRA (``trained`` is a ``PeftModel`` trained from θ⁰ + ``start``): ``start`` plus the adapter's dense ΔW.
    """
    from peft import PeftModel

    if isinstance(trained, PeftModel):
        return add_deltas(start, lora_dense_delta(trained))
    base = dict(base_model.named_parameters())
    out: Delta = {}
    for key, p in trained.named_parameters():
        if not p.requires_grad:
            continue
        if key not in base:
            raise DeltaError(f"trained parameter {key!r} is not in the base model")
        out[key] = (p.detach().float().cpu() - base[key].detach().float().cpu()).contiguous()
    if not out:
        raise DeltaError("the trained model has no trainable parameter: nothing to take a delta of")
    return out


def apply_delta_(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> nn.Module:
    """Add ``delta`` into ``model``'s parameters in place (for a training *copy* of θ⁰, never θ⁰ itself)."""
    new = delta_parameters(model, delta)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in new.items():
            params[k].copy_(v)
    return model


class DeltaStore:
    """Expert deltas on disk, one safetensors file per key (``<directory>/<key>.safetensors``), written
    atomically and read on demand.

    Example::

        store = DeltaStore(out / "experts")
        store.save("003", delta)
        delta = store.load("003")
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def save(self, key: str, delta: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        from hf_cft.utils import atomic_save_safetensors

        check_finite(delta, f"expert {key!r}")
        path = self.path(key)
        atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in delta.items()}, path, metadata)
        return path

    def load(self, key: str) -> Delta:
        return self.load_with_metadata(key)[0]

    def load_with_metadata(self, key: str) -> tuple[Delta, dict[str, str]]:
        """:meth:`load` and the metadata the delta was saved with, from one read of the file."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            raise BundleError(f"expert delta {key!r} is missing: {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open is not iterable)
        except Exception as exc:  # safetensors raises its own error types for torn or foreign files
            raise BundleError(f"expert delta {key!r} at {path} cannot be read: {exc}") from exc

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()
