"""PAM: continual learning by aligned merging of LoRA adapters (pam.md; arXiv:2506.03189).

One PEFT model carries two LoRA adapters with the same config: ``"global"`` (G, never trained by gradients, the
deployed model) and ``"task"`` (L_t, trained on the current task). Per task (pam.md §2–§4):

1. **Task start:** L_t ← exact copy of G (a fresh optimiser per task: build one ``Trainer`` per task).
2. **Training:** any loss. Every K steps, *align* (§3): for every LoRA factor X ∈ {A, B}, on the top-p fraction of
   G's entries by magnitude, entries of L_t whose (non-zero) sign differs from G's are reset to 0 (``reset="zero"``)
   or to G's value (``reset="global"``), and Adam's first moment (SGD: the momentum buffer) is zeroed there.
3. **Task end:** G ← (1−ω)·G + ω·L_t element-wise on the factors (§4; ω = ½, ``"running"`` 1/t, or a float).
   After the first task G ← L_1 (no alignment, no averaging: G is still untrained).

Deploy W = W0 + s·B^G·A^G for every task, with no task id (§5).

Two ways to use it:

* :class:`PAMCallback`, a ``transformers.TrainerCallback`` for any ``Trainer`` whose model is (or wraps) a
  ``PeftModel`` with a LoRA adapter: ``on_train_begin`` copies G → L_t, ``on_step_end`` aligns every K optimiser
  steps, ``on_train_end`` merges L_t into G and writes G into both adapters, so the model evaluated after
  ``train()`` is the deployed (global) one.
* Functional pieces for a continual driver: :func:`pam_align`, :func:`pam_merge`, :func:`sign_misalignment`,
  :func:`importance_masks`, and :class:`PAMState` (G's tensors, task count and per-task log; ``save_pretrained``
  writes a PEFT adapter folder that ``PeftModel.from_pretrained`` loads for deployment, plus ``pam_state.json``).

Example::

    from hf_cft.merging.pam import PAMCallback, PAMConfig, prepare_pam_model, default_lora_config

    model = prepare_pam_model(clip, default_lora_config(r=32), PAMConfig(top_p=0.5, align_every=10))
    pam = PAMCallback(PAMConfig(top_p=0.5, align_every=10), model=model)
    for task in tasks:                                  # one Trainer (fresh optimiser) per task
        trainer = ClipClassificationTrainer(model, args, task.classnames, templates, tok,
                                            train_dataset=task.train, callbacks=[pam])
        trainer.train()                                 # ends with G merged and active in both adapters
        trainer.evaluate(task.test)                     # the deployed global adapter
    pam.state.save_pretrained("pam_out")                # a loadable LoRA adapter + PAM state

State-dict keys are those of ``peft.get_peft_model_state_dict`` (``<module>.lora_A.weight`` /
``<module>.lora_B.weight``, adapter name removed).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from hf_cft.errors import AdapterError, AlignmentError, BundleError, NonFiniteError
from hf_cft.merging.hub_hint import MovedToHubMixin
from hf_cft.utils import atomic_save_safetensors, atomic_write_json, user_stacklevel

logger = logging.getLogger(__name__)

LoraState = dict[str, Tensor]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PAM_STATE_NAME = "pam_state.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_FORMAT_VERSION = 1

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "PAMCallback",
    "PAMConfig",
    "PAMState",
    "adapter_state",
    "default_lora_config",
    "factor_merge_gap",
    "importance_masks",
    "merge_weight",
    "pam_align",
    "pam_merge",
    "prepare_pam_model",
    "sign_misalignment",
]


# ------------------------------------------------------------------------------------------------ config


@dataclass
class PAMConfig:
    """PAM hyper-parameters, defaults from pam.md §6 (``lib`` = library choice, not confirmed from the paper).

    Args:
        top_p: p ∈ (0, 1], fraction of G's entries (by magnitude, per tensor) whose sign is enforced (0.5).
            Larger p: more stability, less plasticity.
        align_every: K ≥ 1, align every K optimiser steps (10, lib).
        reset: ``"zero"`` (lib default) or ``"global"``: what a misaligned task entry is reset to.
        moment_reset: ``"first"`` (lib default: zero Adam's ``exp_avg`` / SGD's ``momentum_buffer`` at reset
            entries), ``"both"`` (also ``exp_avg_sq``; inflates those entries' next steps) or ``"none"``.
        merge_weight: ω of the merge G ← (1−ω)G + ωL_t: ``"half"`` (default), ``"running"`` (ω = 1/t) or a float in
            (0, 1].
        factors: which LoRA factors are aligned, a subset of ``("A", "B")`` (both, lib).
        global_adapter, task_adapter: the PEFT adapter names of G and L_t.
    """

    top_p: float = 0.5
    align_every: int = 10
    reset: str = "zero"
    moment_reset: str = "first"
    merge_weight: str | float = "half"
    factors: tuple[str, ...] = ("A", "B")
    global_adapter: str = "global"
    task_adapter: str = "task"

    def __post_init__(self) -> None:
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise AlignmentError(f"PAMConfig.top_p must be a number in (0, 1], got {self.top_p!r}.")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise AlignmentError(f"PAMConfig.top_p must lie in (0, 1], got {self.top_p}.")
        self.top_p = float(self.top_p)
        if isinstance(self.align_every, bool) or int(self.align_every) != self.align_every or self.align_every < 1:
            raise AlignmentError(f"PAMConfig.align_every (K) must be an integer >= 1, got {self.align_every!r}.")
        self.align_every = int(self.align_every)
        if self.reset not in ("zero", "global"):
            raise AlignmentError(f"PAMConfig.reset must be 'zero' or 'global', got {self.reset!r}.")
        if self.moment_reset not in ("first", "both", "none"):
            raise AlignmentError(
                f"PAMConfig.moment_reset must be 'first', 'both' or 'none', got {self.moment_reset!r}."
            )
        merge_weight(2, self.merge_weight)  # validates
        factors = (self.factors,) if isinstance(self.factors, str) else tuple(self.factors)
        if not factors or any(f not in ("A", "B") for f in factors) or len(set(factors)) != len(factors):
            raise AlignmentError(f"PAMConfig.factors must be a non-empty subset of ('A', 'B'), got {self.factors!r}.")
        self.factors = factors
        for name in ("global_adapter", "task_adapter"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise AlignmentError(f"PAMConfig.{name} must be a non-empty string, got {getattr(self, name)!r}.")
        if self.global_adapter == self.task_adapter:
            raise AlignmentError(
                f"PAMConfig.global_adapter and task_adapter must differ, both are {self.global_adapter!r}."
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["factors"] = list(self.factors)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PAMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AlignmentError(f"PAMConfig has no field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)  # __post_init__ turns a JSON list of factors back into a tuple


def merge_weight(t: int, weighting: str | float = "half") -> float:
    """ω for merging task ``t`` (1-based) into G (pam.md §4): ``"half"`` → ½, ``"running"`` → 1/t, a float → itself.

    Task 1 is always copied (ω = 1, pam.md §2 "first task"), whatever ``weighting`` says.
    """
    if isinstance(t, bool) or int(t) != t or t < 1:
        raise AlignmentError(f"task index t must be an integer >= 1, got {t!r}.")
    if isinstance(weighting, str):
        if weighting not in ("half", "running"):
            raise AlignmentError(
                f"PAMConfig.merge_weight must be 'half', 'running' or a float in (0, 1], got {weighting!r}."
            )
        omega = 0.5 if weighting == "half" else 1.0 / t
    elif isinstance(weighting, (int, float)) and not isinstance(weighting, bool):
        omega = float(weighting)
        if not (math.isfinite(omega) and 0.0 < omega <= 1.0):
            raise AlignmentError(f"PAMConfig.merge_weight must lie in (0, 1], got {weighting}.")
    else:
        raise AlignmentError(
            f"PAMConfig.merge_weight must be 'half', 'running' or a float in (0, 1], got {weighting!r}."
        )
    return 1.0 if t == 1 else omega


def default_lora_config(r: int = 32, lora_alpha: int = 32, target_modules=DEFAULT_TARGET_MODULES, **kwargs):
    """The LoRA config of pam.md §6: rank 32, alpha 32 (scaling 1), attention q/k/v/out and MLP fc1/fc2 in both
    towers (projections, embeddings and logit_scale stay frozen)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), **kwargs)


# ------------------------------------------------------------------------------------------------ functional core


def _factor(key: str) -> str | None:
    if "lora_A" in key:
        return "A"
    if "lora_B" in key:
        return "B"
    return None


def _check_pair(global_state: Mapping[str, Tensor], task_state: Mapping[str, Tensor], keys: Iterable[str]) -> None:
    for key in keys:
        if key not in global_state:
            raise AlignmentError(f"global adapter lacks tensor {key!r}.")
        if key not in task_state:
            raise AlignmentError(f"task adapter lacks tensor {key!r}.")
        g, t = global_state[key], task_state[key]
        if tuple(g.shape) != tuple(t.shape):
            raise AlignmentError(
                f"tensor {key!r} has shape {tuple(g.shape)} in the global adapter but {tuple(t.shape)} in the task "
                "adapter."
            )
        for which, x in (("global", g), ("task", t)):
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"{which} adapter tensor {key!r} holds NaN or inf.")


def importance_mask(g: Tensor, top_p: float) -> Tensor:
    """I = {j : |G_j| ≥ q_{1−p}(|G|)}, the top-p fraction of ``g`` by magnitude, minus G's zeros (whose sign is
    undefined). The threshold is the ⌈p·n⌉-th largest |G_j| (``kthvalue`` in fp32); ties at it are included."""
    a = g.detach().to(torch.float32).abs().reshape(-1)
    n = a.numel()
    if n == 0:
        return torch.zeros_like(g, dtype=torch.bool)
    keep = max(1, math.ceil(round(top_p * n, 9)))
    threshold = a.min() if keep >= n else torch.kthvalue(a, n - keep + 1).values
    return ((a >= threshold) & (a > 0)).view(g.shape)


def importance_masks(
    global_state: Mapping[str, Tensor], top_p: float = 0.5, keys: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """:func:`importance_mask` per tensor (threshold per tensor, pam.md §3). G is frozen during a task, so compute
    this once per task and pass it to :func:`pam_align`."""
    PAMConfig(top_p=top_p)  # validates p
    keys = list(global_state) if keys is None else list(keys)
    return {k: importance_mask(global_state[k], top_p) for k in keys}


def _conflicts(g: Tensor, x: Tensor, important: Tensor) -> Tensor:
    """C = {j ∈ I : X_j ≠ 0, sign(X_j) ≠ sign(G_j)}, compared in fp32."""
    xf = x.detach().to(torch.float32)
    return important & (xf != 0) & (torch.sign(xf) != torch.sign(g.detach().to(torch.float32)))


def pam_align(
    global_state: Mapping[str, Tensor],
    task_state: Mapping[str, Tensor],
    top_p: float = 0.5,
    reset: str = "zero",
    importance: Mapping[str, Tensor] | None = None,
    keys: Iterable[str] | None = None,
) -> tuple[LoraState, dict[str, Tensor], float]:
    """One alignment step (pam.md §3) on LoRA factor tensors, out of place.

    Args:
        global_state, task_state: G and L_t, same keys and shapes.
        top_p: p ∈ (0, 1].
        reset: ``"zero"`` (L_j ← 0) or ``"global"`` (L_j ← G_j) at the conflict entries.
        importance: precomputed :func:`importance_masks` (else computed here).
        keys: the tensors to align (default: all keys of ``global_state``); other task tensors are copied unchanged.

    Returns:
        ``(new_task_state, reset_mask, misalignment_rate)``: the aligned task tensors (new tensors), the boolean
        conflict mask C per aligned key, and |C| / |I| summed over the aligned keys (0.0 when I is empty).
    """
    PAMConfig(top_p=top_p, reset=reset)  # validates p and reset
    keys = list(global_state) if keys is None else list(keys)
    _check_pair(global_state, task_state, keys)
    new_state = {k: v.detach().clone() for k, v in task_state.items()}
    masks: dict[str, Tensor] = {}
    n_conflict = n_important = 0
    for key in keys:
        g = global_state[key]
        imp = importance[key] if importance is not None else importance_mask(g, top_p)
        conflict = _conflicts(g, new_state[key], imp)
        if reset == "zero":
            new_state[key][conflict] = 0
        else:
            new_state[key][conflict] = g.detach().to(new_state[key].dtype)[conflict]
        masks[key] = conflict
        n_conflict += int(conflict.sum())
        n_important += int(imp.sum())
    return new_state, masks, (n_conflict / n_important if n_important else 0.0)


def sign_misalignment(
    global_state: Mapping[str, Tensor],
    task_state: Mapping[str, Tensor],
    top_p: float = 0.5,
    keys: Iterable[str] | None = None,
) -> dict:
    """The paper's diagnostic (pam.md §7): the sign-misalignment rate between G and L_t.

    Returns ``{"top_p": |C|/|I|, "all": fraction of all entries where both are non-zero with opposite signs,
    "top_p/A", "all/A", "top_p/B", "all/B", "layers": {key: {"top_p", "all"}}}`` (factor entries only where the
    keys name ``lora_A`` / ``lora_B``).
    """
    keys = list(global_state) if keys is None else list(keys)
    _check_pair(global_state, task_state, keys)
    counts: dict[str, list[int]] = {}  # group -> [conflicts in I, |I|, conflicts overall, numel]

    def bump(group: str, values: list[int]) -> None:
        acc = counts.setdefault(group, [0, 0, 0, 0])
        for i, v in enumerate(values):
            acc[i] += v

    layers = {}
    for key in keys:
        g, x = global_state[key], task_state[key]
        imp = importance_mask(g, top_p)
        every_conflict = _conflicts(g, x, g != 0)
        values = [int((every_conflict & imp).sum()), int(imp.sum()), int(every_conflict.sum()), g.numel()]
        layers[key] = {
            "top_p": values[0] / values[1] if values[1] else 0.0,
            "all": values[2] / values[3] if values[3] else 0.0,
        }
        bump("", values)
        factor = _factor(key)
        if factor:
            bump(f"/{factor}", values)
    out: dict = {}
    for group, (c_imp, n_imp, c_all, n_all) in sorted(counts.items()):
        out[f"top_p{group}"] = c_imp / n_imp if n_imp else 0.0
        out[f"all{group}"] = c_all / n_all if n_all else 0.0
    out["layers"] = layers
    return out


def pam_merge(
    global_state: Mapping[str, Tensor], task_state: Mapping[str, Tensor], t: int, weighting: str | float = "half"
) -> LoraState:
    """G ← (1−ω)·G + ω·L_t element-wise on every factor tensor (pam.md §4), ω = :func:`merge_weight` (t, weighting);
    for t = 1, G ← L_1. Returns new fp32 tensors; both states must have the same keys and shapes.

    This is *not* peft's ``add_weighted_adapter(combination_type="linear")``, which scales each factor by
    √(weight·scaling) and so yields twice the factor average for weights [½, ½] (pam.md §4).
    """
    omega = merge_weight(t, weighting)
    missing = set(global_state) ^ set(task_state)
    if missing:
        key = sorted(missing)[0]
        side = "global" if key not in global_state else "task"
        raise AlignmentError(f"{side} adapter lacks tensor {key!r}: cannot merge adapters with different modules.")
    _check_pair(global_state, task_state, list(global_state))
    out = {}
    for key, g in global_state.items():
        x = task_state[key].detach().to(torch.float32)
        out[key] = x.clone() if omega == 1.0 else (1.0 - omega) * g.detach().to(torch.float32) + omega * x
    return out


def factor_merge_gap(
    global_state: Mapping[str, Tensor], task_state: Mapping[str, Tensor], omega: float = 0.5
) -> float:
    """‖avg(B)·avg(A) − avg(B·A)‖ / ‖avg(B·A)‖ over all LoRA modules (pam.md §4, point 2), with avg the ω-weighted
    average (1−ω)·X^G + ω·X^t. Zero when the factor average equals the dense average; 0.0 if avg(B·A) = 0."""
    num = den = 0.0
    for key_a in global_state:
        if "lora_A" not in key_a:
            continue
        key_b = key_a.replace("lora_A", "lora_B")
        if key_b not in global_state or key_a not in task_state or key_b not in task_state:
            continue
        ga, gb = global_state[key_a].double(), global_state[key_b].double()
        ta, tb = task_state[key_a].double(), task_state[key_b].double()
        if ga.ndim != 2:  # conv LoRA factors: skip the diagnostic
            continue
        avg_prod = (1 - omega) * (gb @ ga) + omega * (tb @ ta)
        prod_avg = ((1 - omega) * gb + omega * tb) @ ((1 - omega) * ga + omega * ta)
        num += float((prod_avg - avg_prod).pow(2).sum())
        den += float(avg_prod.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------ PEFT model access


def _find_peft_model(model: nn.Module):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model
    for module in model.modules():
        if isinstance(module, PeftModel):
            return module
    raise AdapterError(f"PAM needs a peft.PeftModel with a LoRA adapter; got a {type(model).__name__} without one.")


def _lora_layers(peft_model, adapter: str) -> dict[str, nn.Module]:
    """``{module name: LoraLayer}`` of the layers carrying ``adapter``; refuses variants PAM does not handle."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise AlignmentError(f"adapter {adapter!r} puts LoRA on embedding {name!r}; PAM handles lora_A/lora_B.")
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise AlignmentError(f"adapter {adapter!r} uses DoRA at {name!r}; PAM merges plain LoRA factors only.")
        if getattr(module, "lora_bias", {}).get(adapter, False):
            raise AlignmentError(f"adapter {adapter!r} has a lora_bias at {name!r}; PAM merges LoRA factors only.")
        layers[name] = module
    if not layers:
        raise AlignmentError(f"the model has no LoRA layer for adapter {adapter!r}.")
    return layers


def _adapter_params(peft_model, adapter: str) -> dict[str, nn.Parameter]:
    """``{"<module>.lora_A.weight": Parameter, "<module>.lora_B.weight": Parameter, ...}`` of ``adapter``."""
    out = {}
    for name, module in _lora_layers(peft_model, adapter).items():
        out[f"{name}.lora_A.weight"] = module.lora_A[adapter].weight
        out[f"{name}.lora_B.weight"] = module.lora_B[adapter].weight
    return out


def adapter_state(model: nn.Module, adapter: str) -> LoraState:
    """Detached fp32 copies of a LoRA adapter's factors, keyed like ``peft.get_peft_model_state_dict``."""
    peft_model = _find_peft_model(model)
    _check_adapter(peft_model, adapter)
    return {k: p.detach().to(torch.float32).clone() for k, p in _adapter_params(peft_model, adapter).items()}


def _check_adapter(peft_model, adapter: str) -> None:
    configs = getattr(peft_model, "peft_config", {})
    if adapter not in configs:
        raise AlignmentError(f"the PEFT model has no adapter {adapter!r}; its adapters: {sorted(configs)}.")
    if str(configs[adapter].peft_type) not in ("LORA", "PeftType.LORA"):
        raise AlignmentError(f"adapter {adapter!r} is a {configs[adapter].peft_type} adapter; PAM needs LoRA.")


def _copy_into(params: Mapping[str, nn.Parameter], state: Mapping[str, Tensor], adapter: str) -> None:
    for key, p in params.items():
        if key not in state:
            raise AlignmentError(f"PAM state lacks tensor {key!r} of adapter {adapter!r}.")
        if tuple(state[key].shape) != tuple(p.shape):
            raise AlignmentError(
                f"tensor {key!r} has shape {tuple(state[key].shape)} in the PAM state but {tuple(p.shape)} in adapter "
                f"{adapter!r}."
            )
    extra = set(state) - set(params)
    if extra:
        raise AlignmentError(f"PAM state has tensor {sorted(extra)[0]!r} that adapter {adapter!r} lacks.")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key].to(device=p.device, dtype=p.dtype))


def prepare_pam_model(model: nn.Module, lora_config=None, config: PAMConfig | None = None):
    """Make ``model`` a PAM model: a ``PeftModel`` with LoRA adapters ``config.global_adapter`` and
    ``config.task_adapter`` (same config), the task adapter active and the only trainable one.

    * A plain model gets the global adapter from ``lora_config`` (default :func:`default_lora_config`).
    * A ``PeftModel`` must already have the global LoRA adapter; the task adapter is added if missing.

    Call it before the ``Trainer`` builds its optimiser (i.e. before ``train()``). Returns the ``PeftModel``.
    """
    from peft import PeftModel, get_peft_model

    config = config or PAMConfig()
    if not isinstance(model, PeftModel):
        inner = [m for m in model.modules() if isinstance(m, PeftModel)]
        if inner:
            model = inner[0]
        else:
            model = get_peft_model(model, lora_config or default_lora_config(), adapter_name=config.global_adapter)
    elif lora_config is not None and config.global_adapter not in model.peft_config:
        model.add_adapter(config.global_adapter, lora_config)
    _check_adapter(model, config.global_adapter)
    if config.task_adapter not in model.peft_config:
        task_cfg = copy.deepcopy(model.peft_config[config.global_adapter])
        task_cfg.inference_mode = False
        model.add_adapter(config.task_adapter, task_cfg)
    _check_adapter(model, config.task_adapter)
    g_layers = _lora_layers(model, config.global_adapter)
    t_layers = _lora_layers(model, config.task_adapter)
    if set(g_layers) != set(t_layers):
        name = sorted(set(g_layers) ^ set(t_layers))[0]
        raise AlignmentError(
            f"adapters {config.global_adapter!r} and {config.task_adapter!r} adapt different modules (e.g. {name!r})."
        )
    for name, layer in g_layers.items():
        sg, st = layer.scaling[config.global_adapter], layer.scaling[config.task_adapter]
        if sg != st or layer.r[config.global_adapter] != layer.r[config.task_adapter]:
            raise AlignmentError(
                f"adapters {config.global_adapter!r} and {config.task_adapter!r} differ in rank or scaling at "
                f"{name!r} ({layer.r[config.global_adapter]}/{sg} vs {layer.r[config.task_adapter]}/{st}); PAM "
                "averages factors and needs identical LoRA configs."
            )
    model.set_adapter(config.task_adapter)
    for p in _adapter_params(model, config.global_adapter).values():
        p.requires_grad_(False)
    for p in _adapter_params(model, config.task_adapter).values():
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------------------ state


def _json_safe(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class PAMState(MovedToHubMixin):
    """The global adapter G (fp32 factor tensors), the number of tasks merged so far, the LoRA config and the
    per-task log (misalignment before each merge, merge weight, factor-average gap, alignment counts).

    ``save_pretrained(dir)`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` (a regular PEFT LoRA
    folder: ``PeftModel.from_pretrained(base, dir)`` deploys G) and ``pam_state.json`` (written last), each atomically.
    Push it with ``hf_cft.hub.push_to_hub(state, repo_id)``; its card is ``hf_cft.hub.pam_card(state, ...)``.
    """

    _MOVED_TO_HUB = {
        "push_to_hub": "hf_cft.hub.push_to_hub(state, repo_id, card_kwargs=...)",
        "model_card": "hf_cft.hub.pam_card(state, results=..., summary=...)",
    }

    def __init__(
        self,
        config: PAMConfig | None = None,
        global_state: Mapping[str, Tensor] | None = None,
        num_tasks: int = 0,
        lora_config: Mapping | None = None,
        history: list[dict] | None = None,
    ) -> None:
        self.config = config or PAMConfig()
        self.global_state: LoraState = {
            k: v.detach().to(torch.float32).clone() for k, v in (global_state or {}).items()
        }
        self.num_tasks = int(num_tasks)
        self.lora_config = dict(lora_config) if lora_config is not None else None
        self.history: list[dict] = list(history or [])

    @classmethod
    def from_model(cls, model: nn.Module, config: PAMConfig | None = None) -> PAMState:
        """A fresh state (0 tasks) holding a copy of the model's global adapter (its initialisation)."""
        config = config or PAMConfig()
        peft_model = _find_peft_model(model)
        state = adapter_state(peft_model, config.global_adapter)
        lora_cfg = peft_model.peft_config[config.global_adapter].to_dict()
        return cls(config=config, global_state=state, lora_config=lora_cfg)

    def merge(self, task_state: Mapping[str, Tensor], task_name: str | None = None, **extra) -> dict:
        """Fold L_t into G (:func:`pam_merge`, t = ``num_tasks + 1``), log the misalignment before the merge and the
        factor-average gap, and return the log record (also appended to ``history``)."""
        if not self.global_state:
            raise AlignmentError("PAMState has no global adapter tensors yet (build it with PAMState.from_model).")
        t = self.num_tasks + 1
        omega = merge_weight(t, self.config.merge_weight)
        keys = [k for k in self.global_state if _factor(k) in self.config.factors]
        record: dict = {
            "task": t,
            "name": task_name,
            "merge_weight": omega,
            "adapter_params": sum(v.numel() for v in self.global_state.values()),  # constant over tasks (§7)
        }
        if t > 1:  # G is still untrained before the first merge: its signs carry no information
            record["misalignment"] = sign_misalignment(self.global_state, task_state, self.config.top_p, keys)
            record["factor_merge_gap"] = factor_merge_gap(self.global_state, task_state, omega)
        self.global_state = pam_merge(self.global_state, task_state, t, self.config.merge_weight)
        self.num_tasks = t
        record.update(extra)
        self.history.append(_json_safe(record))
        return record

    def load_into(self, model: nn.Module, adapters: Iterable[str] | None = None) -> None:
        """Copy G into the given adapters of ``model`` (default: both the global and the task adapter)."""
        peft_model = _find_peft_model(model)
        adapters = [self.config.global_adapter, self.config.task_adapter] if adapters is None else list(adapters)
        for adapter in adapters:
            _check_adapter(peft_model, adapter)
            _copy_into(_adapter_params(peft_model, adapter), self.global_state, adapter)

    def lora_config_object(self):
        """The global adapter's ``LoraConfig`` (``None`` if unknown)."""
        if self.lora_config is None:
            return None
        from peft import LoraConfig

        names = {f.name for f in fields(LoraConfig)}
        return LoraConfig(**{k: v for k, v in self.lora_config.items() if k in names and k != "peft_type"})

    # --- persistence

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        if not self.global_state:
            raise AlignmentError("PAMState has no global adapter tensors to save.")
        from hf_cft.utils import staged_folder

        own = {ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, PAM_STATE_NAME}
        # the three files are written together beside the folder and swapped in at once: a kill leaves the old
        # state or the new one, never new weights beside the old pam_state.json (other files, e.g. a README, stay)
        with staged_folder(save_directory, keep=lambda name: name not in own) as path:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.global_state.items()}
            atomic_save_safetensors(tensors, path / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
            if self.lora_config is not None:
                lora_cfg = _json_safe(self.lora_config)
                lora_cfg["inference_mode"] = True
                atomic_write_json(path / ADAPTER_CONFIG_NAME, lora_cfg)
            atomic_write_json(
                path / PAM_STATE_NAME,
                {
                    "format_version": _FORMAT_VERSION,
                    "config": self.config.to_dict(),
                    "num_tasks": self.num_tasks,
                    "keys": sorted(self.global_state),
                    "history": _json_safe(self.history),
                },
            )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PAMState:
        """Load a state saved by :meth:`save_pretrained` from a folder (or a Hub repo id, if reachable)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        if not folder.is_dir():
            folder = _download(str(path))
        meta_path = folder / PAM_STATE_NAME
        weights_path = folder / ADAPTER_WEIGHTS_NAME
        for needed in (meta_path, weights_path):
            if not needed.is_file():
                raise BundleError(f"PAM state folder {str(path)!r} lacks {needed.name}.")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{PAM_STATE_NAME} in {str(path)!r} is not valid JSON: {err}") from err
        if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
            raise BundleError(f"{PAM_STATE_NAME} in {str(path)!r} has an unknown format (version 1 expected).")
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise BundleError(
                f"{ADAPTER_WEIGHTS_NAME} in {str(path)!r} is not a readable safetensors file: {err}"
            ) from err
        expected = meta.get("keys", [])
        for key in expected:
            if key not in tensors:
                raise BundleError(f"{ADAPTER_WEIGHTS_NAME} in {str(path)!r} lacks tensor {key!r}.")
        if set(tensors) != set(expected):
            raise BundleError(
                f"{ADAPTER_WEIGHTS_NAME} in {str(path)!r} has tensor {sorted(set(tensors) - set(expected))[0]!r} "
                f"that {PAM_STATE_NAME} does not list."
            )
        for key, value in tensors.items():
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteError(f"global adapter tensor {key!r} in {str(path)!r} holds NaN or inf.")
        lora_cfg = None
        if (folder / ADAPTER_CONFIG_NAME).is_file():
            try:
                lora_cfg = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BundleError(f"{ADAPTER_CONFIG_NAME} in {str(path)!r} is not valid JSON: {err}") from err
            lora_cfg["inference_mode"] = False
        return cls(
            config=PAMConfig.from_dict(meta.get("config", {})),
            global_state=tensors,
            num_tasks=int(meta.get("num_tasks", 0)),
            lora_config=lora_cfg,
            history=meta.get("history", []),
        )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=[PAM_STATE_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME])
        )
    except Exception as err:  # offline, unknown repo, bad id: one clear error
        raise BundleError(
            f"{repo_id!r} is neither a local PAM state folder nor a downloadable Hub repo: {err}"
        ) from err


# ------------------------------------------------------------------------------------------------ callback


_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _inner_optimizer(optimizer):
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 5:  # accelerate's AcceleratedOptimizer and similar wrappers
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class PAMCallback(TrainerCallback):
    """PAM as a ``TrainerCallback`` (pam.md §2–§4); see the module docstring for the task cycle.

    Args:
        config: :class:`PAMConfig` (default: ``state.config`` or the spec defaults).
        model: the PEFT model (or a module wrapping it, e.g. the trainer's model). Passing it here prepares the
            adapters (:func:`prepare_pam_model`) before the ``Trainer`` builds its optimiser; otherwise the model
            must already be prepared when ``train()`` starts.
        state: a :class:`PAMState` to continue from (e.g. loaded with ``PAMState.from_pretrained``); its G is copied
            into the model. Default: a fresh state from the model's global adapter.

    After each ``train()`` the callback has merged the task into ``self.state`` and written G into both adapters.
    ``self.alignment_log`` lists one record per alignment step of the current task (step, conflicts reset,
    misalignment rate overall and per factor); the per-task summary is in ``self.state.history``. Alignment
    records are also appended to ``TrainerState.log_history`` as ``pam/…`` keys.
    """

    def __init__(self, config: PAMConfig | None = None, model: nn.Module | None = None, state: PAMState | None = None):
        if config is None:
            config = state.config if state is not None else PAMConfig()
        if not isinstance(config, PAMConfig):
            raise AlignmentError(f"PAMCallback needs a PAMConfig, got a {type(config).__name__}.")
        self.config = config
        self.state = state
        if state is not None:
            state.config = config
        self.model = None
        self.alignment_log: list[dict] = []
        self._importance: dict[str, Tensor] = {}
        self._global_on_device: dict[str, Tensor] = {}
        self._task_params: dict[str, nn.Parameter] = {}
        self._warned_moments = False
        if model is not None:
            self.attach(model)

    # --- set-up

    def attach(self, model: nn.Module):
        """Prepare ``model``'s adapters, create or load the PAM state, and bind the task adapter's parameters."""
        peft_model = prepare_pam_model(_find_peft_model(model), config=self.config)
        if self.state is None:
            self.state = PAMState.from_model(peft_model, self.config)
        else:
            if not self.state.global_state:
                self.state.global_state = adapter_state(peft_model, self.config.global_adapter)
            self.state.load_into(peft_model, [self.config.global_adapter])
            if self.state.lora_config is None:
                self.state.lora_config = peft_model.peft_config[self.config.global_adapter].to_dict()
        self.model = peft_model
        self._task_params = _adapter_params(peft_model, self.config.task_adapter)
        return peft_model

    @property
    def aligning(self) -> bool:
        """Whether the current task aligns: every task after the first (pam.md §2)."""
        return self.state is not None and self.state.num_tasks >= 1

    def _aligned_keys(self) -> list[str]:
        return [k for k in self._task_params if _factor(k) in self.config.factors]

    def begin_task(self, copy_global: bool = True) -> None:
        """L_t ← G (unless resuming), then I and G on the task adapter's device, computed once per task."""
        if self.model is None:
            raise AlignmentError("PAMCallback is not attached to a model: pass model= or call attach(model).")
        if copy_global:
            self.state.load_into(self.model, [self.config.task_adapter])
        self.alignment_log = []
        self._importance, self._global_on_device = {}, {}
        if self.aligning:
            for key in self._aligned_keys():
                p = self._task_params[key]
                g = self.state.global_state[key].to(p.device)
                self._global_on_device[key] = g
                self._importance[key] = importance_mask(g, self.config.top_p)

    def align(self, optimizer=None, step: int | None = None) -> dict:
        """Reset the task adapter's misaligned important entries in place and clear the optimiser moments there."""
        if not self.aligning:
            raise AlignmentError(
                "PAM does not align during the first task: the global adapter is still untrained (pam.md §2)."
            )
        if not self._importance:
            self.begin_task(copy_global=False)
        counts = {"": [0, 0], "/A": [0, 0], "/B": [0, 0]}
        with torch.no_grad():
            for key in self._aligned_keys():
                p, g, imp = self._task_params[key], self._global_on_device[key], self._importance[key]
                conflict = _conflicts(g, p, imp)
                n_conf = int(conflict.sum())
                for group in ("", f"/{_factor(key)}"):
                    counts[group][0] += n_conf
                    counts[group][1] += int(imp.sum())
                if not n_conf:
                    continue
                if self.config.reset == "zero":
                    p[conflict] = 0
                else:
                    p[conflict] = g.to(p.dtype)[conflict]
                if optimizer is not None and self.config.moment_reset != "none":
                    self._reset_moments(optimizer, p, conflict)
        record = {"step": step, "reset": counts[""][0]}
        for group, (c, n) in counts.items():
            if n:
                record[f"misalignment{group}"] = c / n
        self.alignment_log.append(record)
        return record

    def _reset_moments(self, optimizer, param: nn.Parameter, mask: Tensor) -> None:
        state = _inner_optimizer(optimizer).state.get(param)
        if not state:
            return
        names = _FIRST_MOMENTS + (_SECOND_MOMENTS if self.config.moment_reset == "both" else ())
        found = False
        for name in names:
            buf = state.get(name)
            if torch.is_tensor(buf) and tuple(buf.shape) == tuple(param.shape):
                buf[mask] = 0
                found = True
        # plain SGD keeps no per-entry state (momentum_buffer None): nothing to reset, nothing to warn about
        shaped = any(torch.is_tensor(v) and tuple(v.shape) == tuple(param.shape) for v in state.values())
        if shaped and not found and not self._warned_moments:
            self._warned_moments = True
            warnings.warn(
                f"PAM: the optimiser state has none of {names} for the task adapter; moments were not reset "
                f"(state keys: {sorted(state)}).",
                stacklevel=user_stacklevel(),
            )

    def end_task(self, task_name: str | None = None) -> dict:
        """G ← merge(G, L_t); write G into both adapters; return the task record (also in ``state.history``)."""
        if self.model is None:
            raise AlignmentError("PAMCallback is not attached to a model: pass model= or call attach(model).")
        task_state = adapter_state(self.model, self.config.task_adapter)
        rates = [r["misalignment"] for r in self.alignment_log if "misalignment" in r]
        record = self.state.merge(
            task_state,
            task_name=task_name,
            alignment_steps=len(self.alignment_log),
            reset_entries=sum(r["reset"] for r in self.alignment_log),
            mean_step_misalignment=sum(rates) / len(rates) if rates else None,
        )
        self.state.load_into(self.model)
        self._importance, self._global_on_device = {}, {}
        mis = record.get("misalignment", {})
        logger.info(
            "PAM task %d merged (ω=%.3g): misalignment top-p %.4f, all %.4f; %d alignment steps reset %d entries",
            record["task"],
            record["merge_weight"],
            mis.get("top_p", float("nan")),
            mis.get("all", float("nan")),
            record["alignment_steps"],
            record["reset_entries"],
        )
        return record

    # --- Trainer hooks

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.model is None:
            if model is None:
                raise AlignmentError("PAMCallback got no model: pass model= when creating it.")
            self.attach(model)
        if optimizer is not None:
            in_opt = {id(p) for group in _inner_optimizer(optimizer).param_groups for p in group["params"]}
            if not all(id(p) in in_opt for p in self._task_params.values()):
                raise AlignmentError(
                    f"the optimiser does not train adapter {self.config.task_adapter!r}: create PAMCallback(model=...) "
                    "(or call prepare_pam_model) before the Trainer builds its optimiser."
                )
        resuming = state is not None and state.global_step > 0
        self.begin_task(copy_global=not resuming)
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.aligning and state.global_step % self.config.align_every == 0:
            record = self.align(optimizer, step=state.global_step)
            entry = {f"pam/{k}": v for k, v in record.items() if k != "step"}
            entry.update(step=state.global_step, pam_task=self.state.num_tasks + 1)
            state.log_history.append(entry)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.end_task()
        return control
