"""MergeTune in **weight space**: the LoRA and full fine-tuning families (``docs/methods/mergetune.md`` §3–§5, §7).

The continued model w, the zero-shot solution ŵ1 and the fine-tuned solution ŵ2 are points in the space of the
continued model's trainable tensors. ŵ1 and ŵ2 are held as detached tensors for those keys only — never as
model copies — and the path loss evaluates the *one* model at interpolated weights with
``torch.func.functional_call``:

- **LoRA** (§5): w is the dense update ΔW_l = s_l·B_l·A_l of every target linear (the spec's choice: the path and
  the anchor live on ΔW, not on the factors, which are defined only up to an invertible r×r mix). ŵ1 is ΔW = 0,
  ŵ2 the fine-tuned adapter's ΔW2. The point W0 + ΔW2 + α(ΔW − ΔW2) = W0 + (1−α)·ΔW2 + α·ΔW is realised
  *exactly* without materialising any dense matrix, by substituting the adapter's factors with the rank-2r pair
  ``A' = [A2; A]``, ``B' = [(1−α)(s2/s)·B2, α·B]`` (then s·B'A' = (1−α)ΔW2 + αΔW). The isotropic anchor
  ‖ΔW‖² = s²·Σ(BᵀB ⊙ AAᵀ) is computed from r×r Gram matrices; only the Fisher anchor forms ΔW densely.
- **Full fine-tuning** (§5): w is every trainable tensor of the model (the logit scale only if trainable); ŵ1
  the pre-trained weights of those keys, ŵ2 the fine-tuned model's. The path substitutes ŵ2 + α(w − ŵ2).

A tower none of whose tensors is part of w computes the same features at every α, so the path loss reuses the
features of the task-loss forward: with LoRA on the text tower only, the image tower runs once per batch; with a
frozen text tower, the class text features are computed once per step.

The diagonal Fisher (§3.2, library extension) is estimated at ŵ1 from per-example gradients of
log p_ŵ1(ŷ|x), vectorised with ``torch.func.vmap(torch.func.grad(...))`` over chunks of images; for LoRA its
coordinates are the entries of ΔW_l (= the gradient with respect to the base weight W_l at ΔW = 0).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from hf_cft.errors import AdapterError, BundleError, DeltaError, HfCftError, NonFiniteError
from hf_cft.models.clip import image_features, logit_scale, text_features
from hf_cft.trainers.mergetune_losses import fisher_anchor, lora_delta, lora_sq_norm, sq_l2_anchor
from hf_cft.utils import user_stacklevel

_VISION = ("vision_model", "visual_projection")
_TEXT = ("text_model", "text_projection")


def tower_of(name: str) -> str:
    """``"vision"``, ``"text"``, ``"scale"`` (logit scale / bias) or ``"other"`` for a parameter name."""
    if any(t in name for t in _VISION):
        return "vision"
    if any(t in name for t in _TEXT):
        return "text"
    if "logit_scale" in name or "logit_bias" in name:
        return "scale"
    return "other"


def towers_of(names: Iterable[str]) -> set[str]:
    """The towers whose features change when the tensors ``names`` change (``other`` counts as both)."""
    found = {tower_of(n) for n in names}
    if "other" in found:
        found |= {"vision", "text"}
    return found & {"vision", "text"}


class ClassLogits(nn.Module):
    """Class logits ``exp(logit_scale)·f̂(x)·T̂ᵀ`` of a CLIP-like model, as a function of its parameters.

    This is the module ``functional_call`` runs: it holds a reference to the model (no copy), so parameter names
    are the model's prefixed by ``model.``. Either tower can be replaced by precomputed normalised features
    (``image`` / ``text``) when it does not depend on the substituted tensors. The class text features are the
    mean of the normalised per-template features, renormalised (as :class:`ClipClassifier`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        num_templates: int = 1,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        what: str = "logits",
        pixel_attention_mask=None,
        spatial_shapes=None,
    ) -> torch.Tensor:
        """Logits ``[B, C]``; ``what="image"`` / ``"text"`` returns only the normalised image / class features.
        ``pixel_attention_mask`` / ``spatial_shapes``: SigLIP2's NaFlex inputs, passed on with ``pixel_values``."""
        if what == "text":
            return class_text(self.model, input_ids, attention_mask, num_templates)
        if image is None:
            extra = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
            image = image_features(self.model, pixel_values, normalize=True, **extra)
        if what == "image":
            return image
        if text is None:
            text = class_text(self.model, input_ids, attention_mask, num_templates)
        return logit_scale(self.model).to(image.dtype) * image @ text.to(image.dtype).t()


def class_text(model: nn.Module, input_ids, attention_mask, num_templates: int) -> torch.Tensor:
    feats = text_features(model, input_ids, attention_mask, normalize=True)
    if num_templates > 1:
        feats = F.normalize(feats.view(-1, num_templates, feats.shape[-1]).mean(1), dim=-1)
    return feats


def _check_finite(tensor: torch.Tensor, key: str, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"tensor {key!r} of {where} holds NaN or inf.")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 (DTensor) parameter, the tensor itself otherwise (differentiable; under
    ``torch.no_grad`` the shard's own storage, so writing to it writes the parameter)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _name_in(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


# ==================================================================================================== LoRA


@dataclass
class LoraSlot:
    """One LoRA-adapted linear layer: the continued factors live in ``layer`` (read at use time); ŵ2's factors
    ``a_ft [r, in]``, ``b_ft [out, r]`` and scaling ``scaling_ft`` are detached tensors."""

    prefix: str  # the module's name inside the PeftModel (parameter names are built from it; slots are keyed by
    # its path inside the base model, e.g. text_model.encoder.layers.0.self_attn.q_proj)
    layer: nn.Module
    adapter: str
    a_ft: torch.Tensor | None = None
    b_ft: torch.Tensor | None = None
    scaling_ft: float = 1.0

    @property
    def a(self) -> torch.Tensor:
        return self.layer.lora_A[self.adapter].weight

    @property
    def b(self) -> torch.Tensor:
        return self.layer.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def a_key(self) -> str:
        return f"{self.prefix}.lora_A.{self.adapter}.weight"

    @property
    def b_key(self) -> str:
        return f"{self.prefix}.lora_B.{self.adapter}.weight"

    @property
    def base_key(self) -> str:
        return f"{self.prefix}.base_layer.weight"


def lora_slots(model: nn.Module, adapter: str, what: str) -> dict[str, LoraSlot]:
    """The LoRA layers of ``adapter`` in a ``PeftModel``, keyed by module path in the base model.

    Only plain LoRA on ``nn.Linear`` is supported (the dense ΔW = s·B·A is then exact): DoRA and other variants,
    ``lora_bias``, ``fan_in_fan_out``, merged adapters and LoRA on embeddings / convolutions raise
    :class:`AdapterError` naming the module.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    in_peft = _name_in(model)
    slots = {}
    for path, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        has = adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {})
        if not has:
            continue
        if type(layer) is not LoraLinear:
            raise AdapterError(
                f"{what}: adapter {adapter!r} puts LoRA on {path!r}, a {type(layer).__name__}; MergeTune in weight "
                "space supports LoRA on nn.Linear layers only."
            )
        if adapter in layer.lora_variant:
            raise AdapterError(
                f"{what}: adapter {adapter!r} is a LoRA variant ({type(layer.lora_variant[adapter]).__name__}, "
                f"e.g. DoRA) at {path!r}; MergeTune needs plain LoRA (ΔW = s·B·A)."
            )
        if layer.lora_bias.get(adapter, False) or getattr(layer, "fan_in_fan_out", False):
            raise AdapterError(f"{what}: adapter {adapter!r} uses lora_bias or fan_in_fan_out at {path!r}.")
        if layer.merged:
            raise AdapterError(f"{what}: adapter {adapter!r} is merged into {path!r}; unmerge it first.")
        slots[path] = LoraSlot(prefix=in_peft[id(layer)], layer=layer, adapter=adapter)
    if not slots:
        raise AdapterError(f"{what}: adapter {adapter!r} has no LoRA layers.")
    return slots


class LoraWeightSpace:
    """w = {ΔW_l}, ŵ1 = 0, ŵ2 = {ΔW2_l} for the active LoRA adapter of ``model`` (a ``PeftModel``)."""

    family = "lora"

    def __init__(self, model: nn.Module):
        self.adapter = model.active_adapter
        active = list(model.active_adapters)
        if active != [self.adapter]:
            raise AdapterError(
                f"the continued model has several active adapters {active}: MergeTune needs exactly one (ŵ1 is the "
                "base model without adapters)."
            )
        self.slots = lora_slots(model, self.adapter, "the continued model")
        for path, slot in self.slots.items():
            if slot.scaling == 0:
                raise AdapterError(f"the continued LoRA adapter {self.adapter!r} has scaling 0 at {path!r}.")
        factor_keys = {k for s in self.slots.values() for k in (s.a_key, s.b_key)}
        extra = [n for n, p in model.named_parameters() if p.requires_grad and n not in factor_keys]
        if extra:
            raise AdapterError(
                f"the continued LoRA adapter {self.adapter!r} trains tensors besides its LoRA factors "
                f"({extra[0]!r}{', …' if len(extra) > 1 else ''}): MergeTune's w is ΔW only; drop modules_to_save "
                "/ bias training, or use full fine-tuning."
            )
        self.towers = towers_of(factor_keys)

    @torch.no_grad()
    def attach_finetuned(self, owner: nn.Module, adapter: str, where: str) -> None:
        """Read ŵ2's factors from ``owner``'s adapter ``adapter`` (cloned: adapters are small); the two adapters
        must adapt the same modules with the same ranks."""
        ft = lora_slots(owner, adapter, f"the fine-tuned solution ({where})")
        missing, extra = sorted(set(self.slots) - set(ft)), sorted(set(ft) - set(self.slots))
        if missing or extra:
            which = f"{missing[0]!r} only in the continued adapter" if missing else f"{extra[0]!r} only in ŵ2"
            raise AdapterError(
                f"the fine-tuned LoRA adapter ({where}) targets other modules than the continued one ({which}): "
                "MergeTune needs the same target modules."
            )
        for path, slot in self.slots.items():
            a2, b2 = ft[path].a, ft[path].b
            if a2.shape != slot.a.shape or b2.shape != slot.b.shape:
                raise AdapterError(
                    f"LoRA rank or shape differs at {path!r}: continued A {tuple(slot.a.shape)}, B "
                    f"{tuple(slot.b.shape)}; fine-tuned ({where}) A {tuple(a2.shape)}, B {tuple(b2.shape)}."
                )
            _check_finite(a2, f"{path}.lora_A", f"the fine-tuned solution ({where})")
            _check_finite(b2, f"{path}.lora_B", f"the fine-tuned solution ({where})")
            slot.a_ft = a2.detach().clone().to(slot.a.device)
            slot.b_ft = b2.detach().clone().to(slot.b.device)
            slot.scaling_ft = ft[path].scaling

    @torch.no_grad()
    def initialise(self, tau: float) -> None:
        """§7: A0 = A2, B0 = τ·(s2/s)·B2, so that ΔW0 = τ·ΔW2 exactly."""
        for slot in self.slots.values():
            slot.a.copy_(slot.a_ft)
            slot.b.copy_(tau * (slot.scaling_ft / slot.scaling) * slot.b_ft)

    @torch.no_grad()
    def ensemble(self, gamma: float) -> None:
        """§9 weight ensemble: ΔW ← (1 − γ)·0 + γ·ΔW, exactly, by B ← γ·B."""
        for slot in self.slots.values():
            slot.b.mul_(gamma)

    def deltas(self) -> dict[str, torch.Tensor]:
        """The dense ΔW_l = s_l·B_l·A_l of the continued adapter (differentiable), keyed by module."""
        return {p: lora_delta(s.a, s.b, s.scaling) for p, s in self.slots.items()}

    def path_params(self, alpha: float) -> dict[str, torch.Tensor]:
        """Factors that make the model's weights exactly W0 + ΔW2 + α(ΔW − ΔW2) (rank 2r, in fp32)."""
        out = {}
        for s in self.slots.values():
            a, b = s.a, s.b
            ratio = s.scaling_ft / s.scaling
            out[s.a_key] = torch.cat([s.a_ft.float(), a.float()], 0).to(a.dtype)
            out[s.b_key] = torch.cat([(1.0 - alpha) * ratio * s.b_ft.float(), alpha * b.float()], 1).to(b.dtype)
        return out

    def anchor(self, kind: str, fisher: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``sq_l2``: Σ_l ‖ΔW_l − 0‖²; ``fisher``: Σ_l Σ F_l ⊙ ΔW_l²."""
        if kind == "sq_l2":
            return sum(lora_sq_norm(s.a, s.b, s.scaling) for s in self.slots.values())
        deltas = self.deltas()
        keys = list(self.slots)
        zero = torch.zeros((), device=next(iter(deltas.values())).device)
        return fisher_anchor([deltas[k] for k in keys], [zero] * len(keys), [fisher[k] for k in keys])

    def fisher_coordinates(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
        """(coordinates at ŵ1, fixed substitutions, coordinate key → Fisher key): the gradient with respect to ΔW_l
        at ΔW = 0 is the gradient with respect to the base weight W_l with the adapter zeroed (B = 0)."""
        coords, fixed, keys = {}, {}, {}
        for path, s in self.slots.items():
            coords[s.base_key] = s.layer.get_base_layer().weight.detach()
            # both factors are substituted by detached tensors: the live (trainable) A must not enter the graph
            fixed[s.a_key] = s.a.detach()
            fixed[s.b_key] = torch.zeros_like(s.b.detach())
            keys[s.base_key] = path
        return coords, fixed, keys

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this object holds for ŵ1 and ŵ2 (ŵ1 = 0 needs none)."""
        out = {}
        for s in self.slots.values():
            out[f"finetuned/{s.a_key}"] = s.a_ft
            out[f"finetuned/{s.b_key}"] = s.b_ft
        return out


# ==================================================================================================== full FT


def _is_weights_folder(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _folder_reader(path: Path) -> tuple[set[str], Callable[[str], torch.Tensor], Callable[[str], tuple]]:
    """Lazily read named tensors of a transformers model folder (safetensors only; single file or sharded)."""
    from safetensors import safe_open

    if (path / "model.safetensors").is_file():
        files = {None: path / "model.safetensors"}
        with safe_open(str(files[None]), framework="pt") as f:
            where = dict.fromkeys(f.keys())
    elif (path / "model.safetensors.index.json").is_file():
        weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        where = dict(weight_map)
        files = {name: path / name for name in set(weight_map.values())}
    else:
        raise BundleError(
            f"{str(path)!r} holds no safetensors model weights (model.safetensors or model.safetensors.index.json)."
        )

    def get(key: str) -> torch.Tensor:
        with safe_open(str(files[where[key]]), framework="pt") as f:
            return f.get_tensor(key)

    def shape(key: str) -> tuple:
        with safe_open(str(files[where[key]]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    return set(where), get, shape


class FullWeightSpace:
    """w = every trainable tensor of a plain CLIP-like model; ŵ1 and ŵ2 detached tensors for those keys only.

    Under FSDP2 (:meth:`shard`) every tensor of w is a DTensor sharded over the processes; ŵ1, ŵ2 (and a Fisher)
    are then kept as this process's shards of the same layout, and everything MergeTune does with them is
    element-wise per shard: the anchor is the sum over local shards (its gradient needs no communication), the
    τ-initialisation and the weight ensemble write local shards, and the path point ŵ2 + α(w − ŵ2) is written into
    the local shards themselves (:meth:`at_path_point`), so that FSDP's own layer-by-layer all-gathers run the model
    at the interpolated weights — no process ever holds more than FSDP holds anyway.
    """

    family = "full"
    sharded = False

    def __init__(self, model: nn.Module, zero_shot=None):
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise HfCftError("full-fine-tuning MergeTune needs a model with trainable parameters; none is trainable.")
        self.towers = towers_of(self.params)
        if zero_shot is None:  # the continued model holds ŵ1 now; keep a detached copy of the trainable keys only
            self.w_zs = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            self.w_zs = self._read(zero_shot, "zero-shot")
        self.w_ft: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _read(self, source, what: str) -> dict[str, torch.Tensor]:
        """ŵ from a model (detached views, no copy unless the device differs) or a folder (only these keys)."""
        from peft import PeftModel

        if source is self.model:
            raise DeltaError(
                f"the {what} solution is the continued model itself: it would move with w. Pass a separate model "
                "or a folder."
            )
        if isinstance(source, PeftModel):
            raise AdapterError(
                f"the {what} solution is a PEFT adapter model ({source.active_adapter!r}) but the continued model is "
                "a full model: MergeTune needs both of the same method type (a full model, or a LoRA continued "
                "adapter for a LoRA solution)."
            )
        if isinstance(source, (str, Path)):
            path = Path(source)
            if (path / "adapter_config.json").is_file():
                raise AdapterError(
                    f"the {what} solution {str(path)!r} is a PEFT adapter folder but the continued model is a full "
                    "model: MergeTune needs both of the same method type."
                )
            if not path.is_dir():
                raise BundleError(f"the {what} solution {str(path)!r} is not a model folder.")
            keys, get, shape = _folder_reader(path)
            where = f"{what} folder {str(path)!r}"
        elif isinstance(source, nn.Module):
            named = dict(source.named_parameters())
            keys, get, shape = set(named), named.__getitem__, lambda k: tuple(named[k].shape)
            where = f"{what} model {type(source).__name__}"
        else:
            raise DeltaError(f"the {what} solution must be a model or a model folder, got {type(source).__name__}.")
        out = {}
        for name, p in self.params.items():
            if name not in keys:
                raise DeltaError(
                    f"the {where} has no tensor {name!r}: it is not a fine-tuned copy of the continued model's base."
                )
            if shape(name) != tuple(p.shape):
                raise DeltaError(
                    f"tensor {name!r} has shape {shape(name)} in the {where} but {tuple(p.shape)} in the continued "
                    "model: different base models."
                )
            t = get(name).detach().to(device=p.device, dtype=p.dtype)
            _check_finite(t, name, f"the {where}")
            out[name] = t
        self._warn_frozen_differ(keys, get, shape, where)
        return out

    def _warn_frozen_differ(self, keys, get, shape, where: str) -> None:
        differ = []
        for name, p in self.model.named_parameters():
            if name in self.params or name not in keys or shape(name) != tuple(p.shape):
                continue
            if not torch.allclose(get(name).to(p.device, p.dtype), p.detach(), atol=1e-6, rtol=1e-5):
                differ.append(name)
        if differ:
            warnings.warn(
                f"the {where} differs from the continued model on {len(differ)} frozen tensor(s) (e.g. "
                f"{differ[0]!r}); frozen tensors are not part of w, so the path keeps the continued model's values. "
                "Train the same tensors that were fine-tuned.",
                stacklevel=user_stacklevel(),
            )

    def attach_finetuned(self, source) -> None:
        self.w_ft = self._read(source, "fine-tuned")

    @torch.no_grad()
    def initialise(self, tau: float) -> None:
        """§7: w0 = (1 − τ)·ŵ1 + τ·ŵ2 for every trainable tensor."""
        for name, p in self.params.items():
            w = _local(p)
            w.copy_(((1 - tau) * self.w_zs[name].float() + tau * self.w_ft[name].float()).to(w.dtype))

    @torch.no_grad()
    def ensemble(self, gamma: float) -> None:
        """§9 weight ensemble: w ← (1 − γ)·ŵ1 + γ·w for every trainable tensor (in fp32)."""
        for name, p in self.params.items():
            w = _local(p)
            w.copy_(((1 - gamma) * self.w_zs[name].float() + gamma * w.float()).to(w.dtype))

    @torch.no_grad()
    def shard(self, fisher: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """After FSDP2's ``fully_shard``: take the model's (new, DTensor) parameters of w and keep only this process's
        shards of ŵ1, ŵ2 and ``fisher`` (cut locally with the parameters' own mesh and placements, no
        communication); returns the sharded Fisher. A 0-d tensor that the trainer reshaped to ``[1]`` for FSDP
        (the logit scale) is reshaped alike."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = {n: p for n, p in self.model.named_parameters() if n in self.params}
        if set(params) != set(self.params):
            missing = sorted(set(self.params) - set(params))
            raise HfCftError(f"the FSDP-wrapped model has no parameter {missing[0]!r} of MergeTune's w.")

        def local(name: str, full: torch.Tensor) -> torch.Tensor:
            p = params[name]
            if not isinstance(p, DTensor):
                raise HfCftError(
                    f"parameter {name!r} is not sharded by FSDP2 (a {type(p).__name__}); MergeTune shards ŵ1 and ŵ2 "
                    "like the DTensor parameters of fully_shard (fsdp_version: 2)."
                )
            if full.is_meta:
                raise HfCftError(
                    f"ŵ1/ŵ2 tensor {name!r} is on the meta device on this process (the model was loaded on the main "
                    "process only: fsdp_cpu_ram_efficient_loading); pass zero_shot= (and finetuned=) as model folders."
                )
            full = full.reshape(p.shape).to(device=p.device)
            return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local().clone()

        self.params = params
        self.w_zs = {n: local(n, t) for n, t in self.w_zs.items()}
        self.w_ft = {n: local(n, t) for n, t in self.w_ft.items()}
        self.sharded = True
        return {n: local(n, t) for n, t in fisher.items()} if fisher is not None else None

    @contextlib.contextmanager
    def at_path_point(self, alpha: float):
        """Within the block the parameters of w hold ŵ2 + α(w − ŵ2) (in fp32, per local shard under FSDP2); they
        get their values back on exit, exactly (a copy of w is kept, not recomputed from the interpolation)."""
        saved = {}
        with torch.no_grad():
            for name, p in self.params.items():
                w = _local(p)
                saved[name] = w.clone()
                ft = self.w_ft[name].float()
                w.copy_((ft + alpha * (w.float() - ft)).to(w.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    _local(p).copy_(saved[name])

    def path_params(self, alpha: float) -> dict[str, torch.Tensor]:
        """ŵ2 + α(w − ŵ2) per trainable tensor (interpolated in fp32)."""
        out = {}
        for name, p in self.params.items():
            ft = self.w_ft[name].float()
            out[name] = (ft + alpha * (p.float() - ft)).to(p.dtype)
        return out

    def anchor(self, kind: str, fisher: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``sq_l2``: Σ_j (w_j − ŵ1_j)²; ``fisher``: Σ_j F_j (w_j − ŵ1_j)². Sharded: the sum over this process's
        shards (the sum over processes is the anchor; each shard's gradient is already exact)."""
        names = list(self.params)
        params = [_local(self.params[n]).float() for n in names]  # this process's shards under FSDP2
        anchors = [self.w_zs[n].float() for n in names]
        if kind == "sq_l2":
            return sq_l2_anchor(params, anchors)
        return fisher_anchor(params, anchors, [fisher[n] for n in names])

    def fisher_coordinates(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
        return dict(self.w_zs), {}, {n: n for n in self.w_zs}

    def held_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"zero_shot/{n}": t for n, t in self.w_zs.items()}
        out.update({f"finetuned/{n}": t for n, t in self.w_ft.items()})
        return out


# ==================================================================================================== VPT


class VptWeightSpace(FullWeightSpace):
    """w = the prompt tokens of the active VPT adapter of ``model`` (a ``PeftModel``); ŵ1 = those tokens when this
    object is built (the adapter's initialisation: prompt space has no point equal to "no prompts"); ŵ2 = the
    tokens of a fine-tuned VPT adapter with the same layers and token counts. Everything else (τ-initialisation,
    path, anchor, Fisher, weight ensemble) is the full-fine-tuning machinery on these tensors."""

    family = "vpt"

    def __init__(self, model: nn.Module):
        self.adapter = model.active_adapter
        super().__init__(model)
        extra = [n for n in self.params if f"vpt_prompts.{self.adapter}" not in n]
        if extra:
            raise AdapterError(
                f"the continued VPT adapter {self.adapter!r} trains tensors besides its prompt tokens ({extra[0]!r}): "
                "MergeTune's w is the prompts only; drop modules_to_save."
            )

    @torch.no_grad()
    def attach_finetuned(self, owner: nn.Module, adapter: str, where: str) -> None:  # type: ignore[override]
        """Read ŵ2's tokens from ``owner``'s VPT adapter ``adapter`` (cloned: prompts are small)."""
        named = dict(owner.named_parameters())
        out = {}
        for name, p in self.params.items():
            key = name.replace(f"vpt_prompts.{self.adapter}", f"vpt_prompts.{adapter}")
            if key not in named:
                raise AdapterError(
                    f"the fine-tuned VPT adapter ({where}) has no prompts at {name.split('.vpt_prompts')[0]!r}: "
                    "MergeTune needs the same layers (deep or shallow) in both adapters."
                )
            t = named[key]
            if t.shape != p.shape:
                raise AdapterError(
                    f"VPT prompts differ in shape at {name!r}: continued {tuple(p.shape)}, fine-tuned ({where}) "
                    f"{tuple(t.shape)}; give both adapters the same n_tokens."
                )
            _check_finite(t, name, f"the fine-tuned solution ({where})")
            out[name] = t.detach().clone().to(device=p.device, dtype=p.dtype)
        self.w_ft = out


# ==================================================================================================== Fisher


def fisher_rows(num_rows: int, limit: int, sample: str, seed: int) -> list[int]:
    """The rows a Fisher estimate reads: all when ``limit`` is 0 or ≥ ``num_rows``; else ``limit`` rows drawn
    without replacement by a generator seeded with ``seed``, in increasing order (``"random"``), or the first
    ``limit`` rows (``"first"``)."""
    if not limit or limit >= num_rows:
        return list(range(num_rows))
    if sample == "first":
        return list(range(limit))
    if sample != "random":
        raise ValueError(f"unknown Fisher sample {sample!r} (random or first)")
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:limit].tolist())


def estimate_weight_fisher(
    logits_module: ClassLogits,
    coords: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    batches: Iterable[torch.Tensor],
    text_inputs: dict,
    towers: set[str],
    labels: str = "sample",
    generator: torch.Generator | None = None,
    chunk_size: int = 8,
) -> tuple[dict[str, torch.Tensor], int]:
    """Unnormalised diagonal Fisher F_j = E_x E_ŷ [(∂ log p(ŷ|x)/∂w_j)²] at the point ``coords ∪ fixed`` (§3.2).

    ``coords`` are the differentiated tensors (names of ``logits_module.model``'s parameters), ``fixed`` further
    substitutions. Per-example gradients come from ``vmap(grad(·))`` over chunks of ``chunk_size`` images and are
    squared before averaging (never a batch-mean gradient). ``labels``: ``sample`` (ŷ ~ p, one draw), ``argmax``
    or ``expected`` (Σ_ŷ p_ŷ·g_ŷ², C passes). A tower outside ``towers`` is computed once without a graph.
    Returns ``(F per coordinate key, number of images)``: detached tensors (no ``grad_fn``) — the estimate runs
    under ``torch.no_grad`` (``torch.func.grad`` differentiates inside regardless) and every substituted tensor is
    detached, so no live parameter of the model enters its graph.
    """
    with torch.no_grad():
        return _estimate_weight_fisher(
            logits_module, coords, fixed, batches, text_inputs, towers, labels, generator, chunk_size
        )


def _estimate_weight_fisher(
    logits_module, coords, fixed, batches, text_inputs, towers, labels, generator, chunk_size
) -> tuple[dict[str, torch.Tensor], int]:
    coords = {k: v.detach() for k, v in coords.items()}
    fixed = {k: v.detach() for k, v in fixed.items()}
    names = list(coords)
    prefixed_fixed = {f"model.{k}": v for k, v in fixed.items()}
    text_kw = dict(text_inputs)
    subs = {**{f"model.{k}": v for k, v in coords.items()}, **prefixed_fixed}
    text0 = None
    if "text" not in towers:  # class features at ŵ1, shared by all images
        with torch.no_grad():
            text0 = functional_call(logits_module, subs, (), {**text_kw, "what": "text"})

    def log_prob(c: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kw = {"text": text0} if text0 is not None else dict(text_kw)
        kw["pixel_values" if "vision" in towers else "image"] = x[None]
        params = {**{f"model.{k}": v for k, v in c.items()}, **prefixed_fixed}
        logits = functional_call(logits_module, params, (), kw)[0]
        return (torch.log_softmax(logits.float(), -1) * target).sum()

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0), chunk_size=chunk_size)
    fisher = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in coords.items()}
    count = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented the batch")
        for pixel_values in batches:
            with torch.no_grad():
                p_vals = pixel_values
                if "vision" not in towers:
                    p_vals = functional_call(logits_module, subs, (pixel_values,), {"what": "image"})
                kw = {"text": text0} if text0 is not None else dict(text_kw)
                kw["pixel_values" if "vision" in towers else "image"] = p_vals
                probs = functional_call(logits_module, subs, (), kw).float().softmax(-1)
            n, num_classes = probs.shape
            if labels == "expected":
                draws = [(F.one_hot(torch.full((n,), c), num_classes), probs[:, c]) for c in range(num_classes)]
            elif labels in ("sample", "argmax"):
                if labels == "sample":
                    y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
                else:
                    y = probs.argmax(-1).cpu()
                draws = [(F.one_hot(y, num_classes), torch.ones(n))]
            else:
                raise ValueError(f"unknown Fisher labels {labels!r}")
            for target, weight in draws:
                target = target.to(probs.device, torch.float32)
                weight = weight.to(probs.device, torch.float32)
                grads = per_example({k: coords[k] for k in names}, p_vals, target)
                for k in names:
                    g2 = grads[k].detach().float() ** 2
                    fisher[k] += torch.einsum("n,n...->...", weight, g2)
            count += n
    if count == 0:
        raise HfCftError("the Fisher dataset is empty")
    return {k: v / count for k, v in fisher.items()}, count
