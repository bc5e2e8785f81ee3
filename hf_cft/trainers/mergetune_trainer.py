"""``MergeTuneTrainer``: continued fine-tuning guided by linear mode connectivity (``docs/methods/mergetune.md``).

Given a zero-shot solution ŵ1 and a fine-tuned one ŵ2, it trains a continued model w with

    L(w) = L2(w) + λ·D(w, ŵ1) + β·(1/N)·Σ_k L2(ŵ2 + α_k·(w − ŵ2))

Families (§5), chosen from the continued model:

- CoOp prompts (classifier space, as the paper and the official code): w is the class-feature matrix T(w)
  produced by the continued context; ŵ1 the template-ensembled zero-shot features, ŵ2 the fine-tuned CoOp
  features; D is ``1 − mean cos`` (default) or the diagonal Fisher.
- Linear head (classifier space): w = (W, b); ŵ1 = (exp(logit_scale)·T_zs, 0); ŵ2 the fine-tuned (LP) head; D is
  ``Σ(w − ŵ1)²`` (default) or the diagonal Fisher.
- LoRA (weight space, a ``PeftModel`` with an active LoRA adapter): w is the dense update ΔW_l = s_l·B_l·A_l of
  every target linear, ŵ1 = 0 (the base model), ŵ2 the fine-tuned adapter's ΔW2 (a folder, an adapter name
  loaded in the same model, or a ``PeftModel``); the path runs the model at W0 + ΔW2 + α(ΔW − ΔW2) through
  ``torch.func.functional_call`` with rank-2r factors (exact, no dense matrix); D is ``Σ‖ΔW_l‖²`` (default) or
  ``Σ F ⊙ ΔW²`` with the Fisher of the base weights.
- Full fine-tuning (weight space, a plain ``CLIPModel``/``SiglipModel``): w is every trainable tensor; ŵ1 the
  model's own weights when the trainer is built (or ``zero_shot``), ŵ2 a fine-tuned model or folder; the path
  substitutes ŵ2 + α(w − ŵ2); D is ``Σ(w − ŵ1)²`` (default) or the diagonal Fisher.
- VPT (prompt space, a ``PeftModel`` with an active VPT adapter): w is the prompt tokens P; ŵ2 the fine-tuned
  adapter's tokens P2; ŵ1 the continued adapter's tokens when the trainer is built (its initialisation: no point
  of prompt space is "no prompts", so the zero-shot end is the prompts' init — give the continued adapter the
  init the fine-tuned one started from); the path runs the vision tower with P2 + α(P − P2); D is ``Σ(P − P1)²``
  or the Fisher of the tokens at P1.

ŵ1 and ŵ2 are held as tensors for the trainable keys only, never as model copies (``held_anchor_tensors()``).
Classifier space, per step: one image-tower pass per batch (frozen, without a graph), one text-tower pass for all
classes, then per α one interpolation and one matmul. Weight space, per α: the towers that hold part of w run at
the interpolated weights; a tower outside w (e.g. the image tower for text-only LoRA) reuses the task forward's
features.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hf_cft.errors import AdapterError, HfCftError
from hf_cft.hub.push import check_loaded_adapter
from hf_cft.models.clip import logit_scale
from hf_cft.models.families import image_inputs
from hf_cft.trainers.clip_trainer import ClipClassificationTrainer, _find_tuner
from hf_cft.trainers.mergetune_config import MergeTuneConfig, MergeTuneConfigError
from hf_cft.trainers.mergetune_losses import (
    alpha_grid,
    classifier_fisher,
    cosine_anchor,
    fisher_anchor,
    head_anchor,
    normalize_fisher,
    path_loss_head,
    path_loss_prompts,
    sq_l2_anchor,
)
from hf_cft.trainers.mergetune_weightspace import (
    ClassLogits,
    FullWeightSpace,
    LoraWeightSpace,
    VptWeightSpace,
    _is_weights_folder,
    estimate_weight_fisher,
    fisher_rows,
)
from hf_cft.utils import user_stacklevel
from hf_cft.validation import check_finite_tensor

_FT_ADAPTER = "mergetune_finetuned"


class MergeTuneTrainer(ClipClassificationTrainer):
    """Continued fine-tuning between a zero-shot and a fine-tuned solution (CoOp, linear head, LoRA, full FT).

    Args:
        model: the continued model w, initialised here at ``(1−τ)·ŵ1 + τ·ŵ2``: a ``PeftModel`` whose active
            adapter is CoOp, a linear head or LoRA, or a plain CLIP-like model (full fine-tuning of its trainable
            tensors; pass the *pre-trained* model, whose weights are ŵ1).
        args: :class:`MergeTuneConfig`.
        classnames, templates, tokenizer: the task (the templates define the zero-shot solution ŵ1).
        finetuned: ŵ2 — for adapters, an adapter folder (loaded into ``model`` temporarily, no copy kept), the name
            of an adapter already loaded in ``model``, or a ``PeftModel`` with an adapter of the same type; for full
            fine-tuning, a fine-tuned model or its folder (safetensors; only the trainable keys are read).
        fisher_dataset: images (eval transform) for the diagonal Fisher; default ``train_dataset``.
        zero_shot: full fine-tuning only: ŵ1 as a model or folder, when ``model`` does not hold it.

    Example (LoRA)::

        continued = get_peft_model(clip, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        trainer = MergeTuneTrainer(continued, MergeTuneConfig(output_dir="out", anchor_weight=1e-2), classes,
                                   templates, tok, finetuned="out/lora_ft", train_dataset=shots)
        trainer.train()
    """

    def __init__(
        self,
        model,
        args: MergeTuneConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
        tokenizer,
        finetuned,
        train_dataset=None,
        eval_dataset=None,
        fisher_dataset=None,
        zero_shot=None,
        **kwargs,
    ):
        if not isinstance(args, MergeTuneConfig):
            raise TypeError("MergeTuneTrainer needs a MergeTuneConfig")
        super().__init__(model, args, classnames, templates, tokenizer, train_dataset, eval_dataset, **kwargs)
        self.finetuned_description = _describe_finetuned(finetuned)
        self._setup(args, finetuned, fisher_dataset, zero_shot)
        self._check_card_for_hub()

    def _setup(self, args, finetuned, fisher_dataset, zero_shot) -> None:
        self.family = self._detect_family()
        self.anchor_kind = args.anchor if args.anchor != "auto" else ("cosine" if self.family == "coop" else "sq_l2")
        if self.family != "coop" and self.anchor_kind == "cosine":
            raise MergeTuneConfigError(
                f"anchor='cosine' is the prompt form; use sq_l2 or fisher for the {self.family} family"
            )
        if zero_shot is not None and self.family != "full":
            raise HfCftError(
                f"zero_shot is for full fine-tuning only; the {self.family} family defines ŵ1 from the base model"
            )
        device = self.args.device
        # separate streams: training α (random grid), evaluation α (reset at every evaluation) and the Fisher's
        # labels, so that how often one evaluates, or whether a Fisher is estimated, never shifts training's draws
        self._gen = torch.Generator().manual_seed(args.seed)
        self._eval_gen = torch.Generator().manual_seed(args.seed + 1)
        self._fisher_gen = torch.Generator().manual_seed(args.seed)
        self.fisher_info: dict = {}
        # a raw fisher_dataset gets the evaluation transform; the training set's is swapped by _fisher_loader
        if fisher_dataset is not None:
            fisher_data = self.prepare_dataset(fisher_dataset, train=False, what="fisher_dataset")
        else:
            fisher_data = self.train_dataset
        self._fsdp_path = False
        if self.family in ("lora", "full", "vpt"):
            self._check_sharding()
            self._logits_fn = ClassLogits(self.clip_model)  # references the model: functional_call runs it
            if self.family == "lora":
                self.weight_space = LoraWeightSpace(self.clip_model)
                self._adapter_finetuned(finetuned)
            elif self.family == "vpt":
                self.weight_space = VptWeightSpace(self.clip_model)
                self._adapter_finetuned(finetuned)
            else:
                self.weight_space = FullWeightSpace(self.clip_model, zero_shot)
                self.weight_space.attach_finetuned(finetuned)
            if self.anchor_kind == "fisher":
                self._estimate_weight_fisher(fisher_data)
            self.weight_space.initialise(args.tau)
            return
        self._zero_shot_anchor(device)
        self._finetuned_anchor(finetuned, device)
        self._initialise(args.tau)
        if self.anchor_kind == "fisher":
            self._estimate_fisher(fisher_data)

    def _check_sharding(self) -> None:
        """Weight space under FSDP / DeepSpeed (docs/distributed.md): full fine-tuning runs under FSDP2 with the path
        formed shard by shard; everything else is refused here, with the reason."""
        if getattr(self, "is_deepspeed_enabled", False):
            raise HfCftError(
                f"MergeTune's {self.family} family does not support DeepSpeed (the path loss substitutes interpolated "
                "weights, which ZeRO-3 shards inside DeepSpeed's engine); use DDP, or FSDP2 for full fine-tuning."
            )
        if not getattr(self, "is_fsdp_enabled", False):
            return
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.family != "full":
            why = {
                "lora": "its path point W0 + ΔW2 + α(ΔW − ΔW2) has rank 2r, which FSDP's sharded rank-r factors cannot "
                "hold in place (ΔW = s·B·A is not element-wise in the factors)",
                "vpt": "it is untested under FSDP (its prompts are small: DDP costs no memory)",
            }[self.family]
            raise HfCftError(
                f"MergeTune's {self.family} family does not support FSDP: {why}; use DDP (multi_gpu_ddp.yaml). Full "
                "fine-tuning runs under FSDP2."
            )
        if getattr(plugin, "fsdp_version", 2) != 2:
            raise HfCftError(
                "MergeTune full fine-tuning under FSDP needs FSDP2 (fsdp_version: 2): FSDP1 flattens the parameters "
                "into one buffer per unit, so ŵ1 and ŵ2 cannot be sharded like them."
            )
        self._fsdp_path = True

    def _fsdp_shards(self) -> bool:
        """Under FSDP2: once the Trainer has sharded the model (``fully_shard`` at ``accelerator.prepare``), shard ŵ1,
        ŵ2 and the Fisher like it (once). True when the path is to be formed shard by shard."""
        if not self._fsdp_path:
            return False
        if not self.weight_space.sharded:
            from torch.distributed.tensor import DTensor

            if not any(isinstance(p, DTensor) for p in self.clip_model.parameters()):
                return False  # not wrapped yet (e.g. evaluate before train): the plain path is exact
            fisher = self.weight_space.shard(getattr(self, "fisher", None))
            if fisher is not None:
                self.fisher = fisher
        return True

    # ------------------------------------------------------------------------------------------------ model card

    def _card_kind(self) -> str:
        return "mergetune"

    def card_hyperparameters(self) -> dict:
        """The card's hyper-parameters: MergeTune's (λ, β, N, α grid, τ, anchor, family) then the training ones."""
        args = self.args
        return {
            "family": getattr(self, "family", None),
            "λ (anchor_weight)": args.anchor_weight,
            "β (path_weight)": args.path_weight,
            "N (num_alphas)": args.num_alphas,
            "α grid": args.alpha_grid,
            "τ (initialisation)": args.tau,
            "anchor": getattr(self, "anchor_kind", args.anchor),
            "preset": args.preset,
            "path features": args.path_features,
            "ŵ1 templates": args.anchor_templates,
            "weight ensemble γ": args.weight_ensemble,
            **super().card_hyperparameters(),
        }

    def _mergetune_model_card(self, kwargs: dict):
        from hf_cft.hub import mergetune_card

        kwargs = {k: v for k, v in kwargs.items() if k != "method"}
        kwargs.setdefault("finetuned", self.finetuned_description)
        return mergetune_card(self.clip_model, **kwargs)

    def _detect_family(self) -> str:
        if self.model.mode in ("coop", "head"):
            return self.model.mode
        from peft import PeftModel

        if isinstance(self.clip_model, PeftModel):
            cfg = self.clip_model.peft_config[self.clip_model.active_adapter]
            if cfg.peft_type == "LORA":
                return "lora"
            if str(getattr(cfg.peft_type, "value", cfg.peft_type)) == "HF_CFT_VPT":
                return "vpt"
            raise HfCftError(
                "MergeTuneTrainer supports CoOp, linear-head, LoRA and VPT adapters and full fine-tuning; the active "
                f"adapter {self.clip_model.active_adapter!r} is {getattr(cfg.peft_type, 'value', cfg.peft_type)!r}."
            )
        return "full"

    def held_anchor_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the trainer holds for ŵ1 and ŵ2 (and nothing else): for weight space only the continued
        model's trainable keys, so their size shows that no model copy is kept."""
        if self.family in ("lora", "full", "vpt"):
            return self.weight_space.held_tensors()
        names = ("text_zs", "text_ft", "text_ft_raw", "ctx_ft", "w_zs", "b_zs", "w_ft", "b_ft")
        return {n: getattr(self, n) for n in names if isinstance(getattr(self, n, None), torch.Tensor)}

    # ------------------------------------------------------------------------------------------------ anchors

    @torch.no_grad()
    def _zero_shot_anchor(self, device):
        from hf_cft.models.zeroshot import build_zeroshot_classifier

        templates = self.templates[:1] if self.args.anchor_templates == "first" else self.templates
        with self.clip_model.disable_adapter():
            t1 = build_zeroshot_classifier(self.clip_model, self.tokenizer, self.classnames, templates)
        self.text_zs = t1.to(device)
        self.scale = float(logit_scale(self.clip_model))
        if self.family == "head":
            self.w_zs = (self.scale * t1).to(device)
            self.b_zs = torch.zeros(len(self.classnames), device=device)

    def _check_compatible(self, cfg_ft, where: str):
        cfg = self.clip_model.peft_config[self.clip_model.active_adapter]
        kind_ft, kind = (getattr(c.peft_type, "value", c.peft_type) for c in (cfg_ft, cfg))
        if str(kind_ft) != str(kind):
            raise AdapterError(
                f"the fine-tuned solution ({where}) is a {kind_ft} adapter but the continued model is {kind}: "
                "MergeTune needs both of the same method type."
            )
        a, b = cfg.base_model_name_or_path, cfg_ft.base_model_name_or_path
        if a and b and a != b:
            raise AdapterError(f"the fine-tuned solution ({where}) was trained on base model {b!r}, not {a!r}.")
        if self.family == "head" and cfg_ft.num_classes != len(self.classnames):
            raise AdapterError(
                f"the fine-tuned head ({where}) has {cfg_ft.num_classes} classes, the task {len(self.classnames)}."
            )
        if self.family == "coop" and cfg_ft.class_specific and list(cfg_ft.classnames or []) != list(self.classnames):
            raise AdapterError(f"the fine-tuned class-specific CoOp adapter ({where}) was trained on other classes.")

    @torch.no_grad()
    def _finetuned_anchor(self, finetuned, device):
        from peft import PeftConfig, PeftModel

        continued = self.clip_model.active_adapter
        if self._is_loaded_adapter(finetuned):
            owner, name = self.clip_model, finetuned
            self._check_compatible(self.clip_model.peft_config[name], f"adapter {name!r}")
        elif isinstance(finetuned, (str, Path)):
            path = Path(finetuned)
            if path.is_dir() and not (path / "adapter_config.json").is_file():
                raise AdapterError(f"{str(path)!r} holds no adapter (no adapter_config.json).")
            try:
                cfg_ft = PeftConfig.from_pretrained(str(finetuned))
            except Exception as exc:  # noqa: BLE001 - a clear error for a missing / broken adapter
                raise AdapterError(f"cannot read a fine-tuned adapter from {str(finetuned)!r}: {exc}") from exc
            self._check_compatible(cfg_ft, str(finetuned))
            self.clip_model.load_adapter(str(finetuned), adapter_name=_FT_ADAPTER)
            owner, name = self.clip_model, _FT_ADAPTER
            try:
                if path.is_dir():  # a local folder (a Hub id was downloaded by PEFT itself)
                    check_loaded_adapter(owner, path, _FT_ADAPTER, f"the fine-tuned adapter {str(finetuned)!r}")
            except BaseException:
                owner.delete_adapter(_FT_ADAPTER)
                owner.set_adapter(continued)
                raise
        elif isinstance(finetuned, PeftModel):
            owner, name = finetuned, finetuned.active_adapter
            self._check_compatible(finetuned.peft_config[name], "the given PeftModel")
        else:
            raise AdapterError(f"finetuned must be an adapter folder or a PeftModel, got {type(finetuned).__name__}")
        try:
            owner.set_adapter(name)
            cfg_ft = owner.peft_config[name]
            if self.family == "coop":
                tuner = _find_tuner(owner, "CoOpModel")
                self.text_ft = tuner.class_text_features(self.tokenizer, self.classnames, name).detach().to(device)
                if self.args.path_features == "raw":  # the official path interpolates the raw encoder outputs
                    raw = tuner.class_text_features(self.tokenizer, self.classnames, name, normalize=False)
                    self.text_ft_raw = raw.detach().float().to(device)
                self.ctx_ft = tuner._coop_layer().coop_ctx[name].detach().clone()
                self.ft_ctx_init = cfg_ft.ctx_init
                self.ft_class_specific = cfg_ft.class_specific
                check_finite_tensor(self.ctx_ft, "the fine-tuned CoOp context (ŵ2)")
                check_finite_tensor(self.text_ft, "the fine-tuned CoOp class text features (ŵ2)")
            else:
                w, b = _find_tuner(owner, "LinearHeadModel").head_parameters(name)
                self.w_ft = w.detach().clone().to(device)
                self.b_ft = (b.detach().clone() if b is not None else torch.zeros(w.shape[0])).to(device)
                check_finite_tensor(self.w_ft, "the fine-tuned head weight (ŵ2)")
                check_finite_tensor(self.b_ft, "the fine-tuned head bias (ŵ2)")
        finally:
            if owner is self.clip_model:
                owner.set_adapter(continued)
                if name == _FT_ADAPTER:
                    owner.delete_adapter(_FT_ADAPTER)
                    owner.set_adapter(continued)  # makes only the continued adapter trainable again

    @torch.no_grad()
    def _initialise(self, tau: float):
        """w0 = (1−τ)·ŵ1 + τ·ŵ2: context vectors for CoOp (ŵ1's context = the token embeddings of the
        fine-tuned adapter's ctx_init), parameters for a head."""
        if self.family == "head":
            w, b = _find_tuner(self.clip_model, "LinearHeadModel").head_parameters()
            w.copy_((1 - tau) * self.w_zs + tau * self.w_ft)
            if b is not None:
                b.copy_(tau * self.b_ft)
            return
        layer = _find_tuner(self.clip_model, "CoOpModel")._coop_layer()
        ctx = layer.coop_ctx[self.clip_model.active_adapter]
        if ctx.shape != self.ctx_ft.shape:
            raise AdapterError(
                f"the continued CoOp context has shape {tuple(ctx.shape)} but the fine-tuned one "
                f"{tuple(self.ctx_ft.shape)}: give both the same n_ctx and class_specific setting."
            )
        if tau < 1.0:
            from hf_cft.peft.coop.model import _word_ids
            from hf_cft.trainers.feature_training import coop_context_init

            ids = _word_ids(self.tokenizer, self.ft_ctx_init) if self.ft_ctx_init else []
            if self.ft_ctx_init and len(ids) == ctx.shape[-2] and not self.ft_class_specific:
                coop_context_init(self.clip_model, self.tokenizer, self.ctx_ft, self.ft_ctx_init, tau)
                return
            warnings.warn(
                "τ-initialisation needs the fine-tuned CoOp adapter's ctx_init with as many tokens as n_ctx and "
                "a shared context; starting at the fine-tuned context (τ = 1).",
                stacklevel=user_stacklevel(),
            )
        ctx.copy_(self.ctx_ft)

    @torch.no_grad()
    def _fisher_loader(self, dataset):
        """The downstream images both Fisher estimates read, in eval batches: with ``fisher_transform="eval"``
        the training dataset's augmenting transform is swapped for its evaluation twin (§3.2: no augmentation);
        at most ``fisher_max_images`` rows, a sample seeded by ``seed`` (``fisher_sample="random"``, in row order)
        or the first rows (``"first"``)."""
        from torch.utils.data import DataLoader, Subset

        from hf_cft.data.transforms import eval_view

        if dataset is None:
            raise HfCftError("anchor='fisher' needs images: pass fisher_dataset (or train_dataset)")
        if self.args.fisher_transform == "eval":
            dataset = eval_view(dataset)
        limit = self.args.fisher_max_images
        if limit and len(dataset) > limit:
            rows = fisher_rows(len(dataset), limit, self.args.fisher_sample, self.args.seed)
            dataset = dataset.select(rows) if hasattr(dataset, "select") else Subset(dataset, rows)
        return DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator)

    def _fisher_pixels(self, batch) -> torch.Tensor:
        """``pixel_values`` of one batch for the weight-space Fisher, which takes per-example gradients with
        ``vmap``: SigLIP2's NaFlex inputs size the position grid from ``spatial_shapes`` values, which ``vmap``
        cannot trace, so that family is refused with a typed error."""
        if image_inputs(batch):
            from hf_cft.errors import MethodNotApplicableError
            from hf_cft.models.clip import unwrap_model

            raise MethodNotApplicableError(
                f"MergeTune's weight-space Fisher anchor cannot apply to {type(unwrap_model(self.clip_model)).__name__}: its "
                "per-example gradients use vmap, and NaFlex patches (pixel_attention_mask / spatial_shapes) size the "
                "position grid from tensor values vmap cannot trace. Use anchor='cosine' or 'sq_l2'."
            )
        return batch["pixel_values"].to(self.args.device)

    def _estimate_fisher(self, dataset):
        """Diagonal Fisher of the zero-shot classifier on the downstream images (no labels used), in closed form
        per example; normalised to mean 1 plus damping. Its cost is kept in ``fisher_info``."""
        from hf_cft.models.zeroshot import encode_images

        t0 = time.perf_counter()
        loader = self._fisher_loader(dataset)
        self.clip_model.eval()
        feats, _ = encode_images(self.clip_model, loader, device=self.args.device)
        feats = feats.to(self.args.device)
        if self.family == "coop":
            logits = self.scale * feats @ self.text_zs.t()
            fw, _ = classifier_fisher(feats, logits, self.scale, self.args.fisher_labels, self._fisher_gen)
            self.fisher = normalize_fisher([fw], self.args.fisher_damping)
        else:
            logits = feats @ self.w_zs.t() + self.b_zs
            fw, fb = classifier_fisher(feats, logits, 1.0, self.args.fisher_labels, self._fisher_gen, with_bias=True)
            self.fisher = normalize_fisher([fw, fb], self.args.fisher_damping)
        self.fisher_info = {
            "images": int(feats.shape[0]),
            "seconds": time.perf_counter() - t0,
            "labels": self.args.fisher_labels,
        }

    # ------------------------------------------------------------------------------------------------ weight space

    def _is_loaded_adapter(self, finetuned) -> bool:
        """``finetuned`` names an adapter already loaded in the continued model (and is not a folder)."""
        if not isinstance(finetuned, str) or finetuned not in self.clip_model.peft_config or Path(finetuned).is_dir():
            return False
        if finetuned == self.clip_model.active_adapter:
            raise AdapterError(
                f"the fine-tuned adapter {finetuned!r} is the continued (active) adapter: it would move with w."
            )
        return True

    def _adapter_finetuned(self, finetuned) -> None:
        """ŵ2 for LoRA / VPT: factors or tokens read from a folder (loaded temporarily under a private name, then
        deleted), an adapter loaded in the same model, or another ``PeftModel``."""
        from peft import PeftConfig, PeftModel

        model, continued = self.clip_model, self.clip_model.active_adapter
        if self._is_loaded_adapter(finetuned):
            self._check_compatible(model.peft_config[finetuned], f"adapter {finetuned!r}")
            self.weight_space.attach_finetuned(model, finetuned, f"adapter {finetuned!r}")
        elif isinstance(finetuned, (str, Path)):
            path = Path(finetuned)
            if not (path / "adapter_config.json").is_file():
                if path.is_dir() and _is_weights_folder(path):
                    raise AdapterError(
                        f"{str(path)!r} holds a full model but the continued model is a {self.family.upper()} "
                        "adapter: MergeTune needs both of the same method type."
                    )
                raise AdapterError(f"{str(path)!r} holds no adapter (no adapter_config.json).")
            try:
                cfg_ft = PeftConfig.from_pretrained(str(path))
            except Exception as exc:  # noqa: BLE001 - a clear error for a broken adapter
                raise AdapterError(f"cannot read a fine-tuned adapter from {str(path)!r}: {exc}") from exc
            self._check_compatible(cfg_ft, str(path))
            try:
                try:
                    model.load_adapter(str(path), adapter_name=_FT_ADAPTER)
                except Exception as exc:  # noqa: BLE001 - e.g. size mismatch: another base model
                    raise AdapterError(
                        f"cannot load the fine-tuned adapter {str(path)!r} into the continued model (another base "
                        f"model?): {exc}"
                    ) from exc
                check_loaded_adapter(model, path, _FT_ADAPTER, f"the fine-tuned adapter {str(path)!r}")
                self.weight_space.attach_finetuned(model, _FT_ADAPTER, str(path))
            finally:
                if _FT_ADAPTER in model.peft_config:
                    model.delete_adapter(_FT_ADAPTER)
                model.set_adapter(continued)  # only the continued adapter is trainable
        elif isinstance(finetuned, PeftModel):
            if finetuned is model:
                raise AdapterError(
                    "the fine-tuned PeftModel is the continued model; pass the name of its fine-tuned adapter instead."
                )
            self._check_compatible(finetuned.peft_config[finetuned.active_adapter], "the given PeftModel")
            self.weight_space.attach_finetuned(finetuned, finetuned.active_adapter, "the given PeftModel")
        elif isinstance(finetuned, nn.Module):
            raise AdapterError(
                f"the fine-tuned solution is a full model ({type(finetuned).__name__}) but the continued model is a "
                f"{self.family.upper()} adapter: MergeTune needs both of the same method type."
            )
        else:
            raise AdapterError(
                "finetuned must be an adapter folder, a loaded adapter name or a PeftModel, got "
                f"{type(finetuned).__name__}"
            )

    def _estimate_weight_fisher(self, dataset) -> None:
        """Diagonal Fisher at ŵ1 over the continued coordinates (ΔW entries for LoRA), from per-example gradients
        on the downstream images (labels unused; eval mode, eval templates); normalised to mean 1 plus damping.
        Its cost is kept in ``fisher_info``."""
        t0 = time.perf_counter()
        loader = self._fisher_loader(dataset)
        was_training = self.clip_model.training
        self.clip_model.eval()
        try:
            coords, fixed, keys = self.weight_space.fisher_coordinates()
            raw, count = estimate_weight_fisher(
                self._logits_fn,
                coords,
                fixed,
                (self._fisher_pixels(batch) for batch in loader),
                self._text_inputs(train=False),
                self.weight_space.towers,
                labels=self.args.fisher_labels,
                generator=self._fisher_gen,
                chunk_size=self.args.fisher_chunk_size,
            )
        finally:
            self.clip_model.train(was_training)
        names = list(raw)
        self.fisher = dict(
            zip((keys[n] for n in names), normalize_fisher([raw[n] for n in names], self.args.fisher_damping))
        )
        self.fisher_info = {
            "images": count,
            "seconds": time.perf_counter() - t0,
            "labels": self.args.fisher_labels,
            "parameters": int(sum(f.numel() for f in self.fisher.values())),
        }

    def _weight_space_path(self, pixel_values, image, text, text_inputs, labels, alphas, extra=None) -> torch.Tensor:
        """(1/N)·Σ_k CE at the interpolated weights, one ``functional_call`` per α; towers that hold no part of w
        reuse the task forward's features (``image``, ``text``). ``extra``: the batch's other image inputs
        (SigLIP2's ``pixel_attention_mask`` / ``spatial_shapes``)."""
        kw = {}
        vision = "vision" in self.weight_space.towers
        kw.update({"pixel_values": pixel_values, **(extra or {})} if vision else {"image": image})
        kw.update(text_inputs if "text" in self.weight_space.towers else {"text": text})
        losses = []
        for a in alphas:
            params = {f"model.{k}": v for k, v in self.weight_space.path_params(float(a)).items()}
            logits = functional_call(self._logits_fn, params, (), kw).float()
            losses.append(F.cross_entropy(logits, labels, label_smoothing=self.args.label_smoothing))
        return torch.stack(losses).mean()

    def _sharded_path(self, model, inputs, text_inputs, labels, alphas) -> torch.Tensor:
        """The path term under FSDP2: per α, the parameters' local shards are set to ŵ2 + α(w − ŵ2) and the FSDP
        model runs on them (its all-gathers give each layer the interpolated full weights); in training the α term's
        backward runs there too, scaled by α (∂θ/∂w = α) and like the Trainer's loss (β/N, gradient accumulation,
        padding weight), so its reduce-scattered gradient adds to w's. Returns the detached (1/N)·Σ_k CE."""
        from torch.distributed.fsdp import FSDPModule

        def reshard():  # the root keeps its all-gathered parameters after a forward: drop them before values change
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

        backward = model.training and torch.is_grad_enabled()
        scale = self.args.path_weight / len(alphas) / self.current_gradient_accumulation_steps
        scale *= 1.0 if self._padding_weight is None else self._padding_weight
        losses = []
        for a in alphas:
            reshard()
            with self.weight_space.at_path_point(float(a)):
                logits = model(pixel_values=inputs["pixel_values"], **image_inputs(inputs), **text_inputs).float()
                loss = F.cross_entropy(logits, labels, label_smoothing=self.args.label_smoothing)
                if backward:
                    self.accelerator.backward(loss * (scale * float(a)))
                reshard()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------------------------------------ ensemble

    @torch.no_grad()
    def apply_weight_ensemble(self, gamma: float) -> None:
        """The weight ensemble (1 − γ)·ŵ1 + γ·w of §9 (robust fine-tuning), in place on the continued model, in
        each family's own coordinates: the CoOp context ((1 − γ)·E(p0) + γ·ctx, as the τ-initialisation; needs
        the fine-tuned adapter's ctx_init with n_ctx tokens and a shared context), the head (W, b), LoRA's dense
        ΔW (B ← γ·B, exact), full fine-tuning's tensors and VPT's prompt tokens. γ = 1 keeps w, γ = 0 gives ŵ1."""
        if not 0.0 <= gamma <= 1.0:
            raise MergeTuneConfigError(f"the weight-ensemble γ must be in [0, 1], got {gamma}")
        if self.family in ("lora", "full", "vpt"):
            self.weight_space.ensemble(gamma)
        elif self.family == "head":
            w, b = _find_tuner(self.clip_model, "LinearHeadModel").head_parameters()
            w.copy_((1 - gamma) * self.w_zs.to(w) + gamma * w)
            if b is not None:
                b.copy_((1 - gamma) * self.b_zs.to(b) + gamma * b)
        else:
            from hf_cft.peft.coop.model import _word_ids
            from hf_cft.trainers.feature_training import coop_context_init

            ctx = _find_tuner(self.clip_model, "CoOpModel")._coop_layer().coop_ctx[self.clip_model.active_adapter]
            n_ids = len(_word_ids(self.tokenizer, self.ft_ctx_init)) if self.ft_ctx_init else 0
            if not self.ft_ctx_init or n_ids != ctx.shape[-2] or self.ft_class_specific:
                raise AdapterError(
                    "the CoOp weight ensemble interpolates contexts with ŵ1's context E(ctx_init): it needs the "
                    "fine-tuned adapter's ctx_init with as many tokens as n_ctx and a shared context."
                )
            coop_context_init(self.clip_model, self.tokenizer, ctx.detach().clone(), self.ft_ctx_init, gamma)

    def train(self, *args, **kwargs):
        """``Trainer.train``; with ``weight_ensemble = γ`` the result (the best model when
        ``load_best_model_at_end``) is then replaced by (1 − γ)·ŵ1 + γ·w."""
        output = super().train(*args, **kwargs)
        if self.args.weight_ensemble is not None:
            self.apply_weight_ensemble(self.args.weight_ensemble)
        return output

    # ------------------------------------------------------------------------------------------------ loss

    def _alphas(self, training: bool) -> torch.Tensor:
        """The α points of one step; a random grid draws from the training stream in training and from the
        evaluation stream (reset at every evaluation) otherwise."""
        return alpha_grid(self.args.num_alphas, self.args.alpha_grid, self._gen if training else self._eval_gen)

    def evaluate(self, *args, **kwargs):
        self._eval_gen.manual_seed(self.args.seed + 1)  # the same α at every evaluation, whatever came before
        return super().evaluate(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        text_inputs = self._text_inputs(train=model.training)
        alphas = self._alphas(model.training)
        sharded = self.family == "full" and self._fsdp_shards()
        if sharded:  # before the task forward: no graph of it may be pending while the shards hold path points
            path = self._sharded_path(model, inputs, text_inputs, labels, alphas)
        parts = model(pixel_values=inputs["pixel_values"], **image_inputs(inputs), **text_inputs, return_parts=True)
        img = parts["image"].float()
        smoothing = self.args.label_smoothing  # one L2: the task and the path terms alike
        if self.family in ("lora", "full", "vpt"):
            text = parts["text"].float()
            logits = parts["scale"].float() * img @ text.t()
            anchor = self.weight_space.anchor(self.anchor_kind, getattr(self, "fisher", None))
            if sharded:
                # the local anchor carries each shard's exact gradient; the logged value is the sum over processes
                total = anchor.detach().clone()
                torch.distributed.all_reduce(total)
                anchor = anchor + (total - anchor.detach())
            else:
                path = self._weight_space_path(
                    inputs["pixel_values"],
                    parts["image"],
                    parts["text"],
                    text_inputs,
                    labels,
                    alphas,
                    image_inputs(inputs),
                )
        elif self.family == "coop":
            text = parts["text"].float()
            scale = parts["scale"].float()
            logits = scale * img @ text.t()
            if self.anchor_kind == "cosine":
                anchor = cosine_anchor(text, self.text_zs)
            elif self.anchor_kind == "sq_l2":
                anchor = sq_l2_anchor([text], [self.text_zs])
            else:  # Fisher-weighted, scaled so that F ≡ 1 equals the cosine form: ½·mean_c‖T_c − T1_c‖²
                anchor = fisher_anchor([text], [self.text_zs], self.fisher, normalizer=2.0 * text.shape[0])
            if self.args.path_features == "raw":  # official: interpolate the raw outputs, then normalise
                path = path_loss_prompts(
                    img, parts["text_raw"].float(), self.text_ft_raw, labels, scale, alphas, smoothing
                )
            else:
                path = path_loss_prompts(img, text, self.text_ft, labels, scale, alphas, smoothing)
        else:
            w, b = parts["weight"], parts["bias"]
            logits = F.linear(img, w, b)
            params, zs = [w], [self.w_zs]
            if b is not None:
                params.append(b)
                zs.append(self.b_zs)
            anchor = head_anchor(params, zs, self.anchor_kind, getattr(self, "fisher", None))
            b_ft = self.b_ft if b is not None else None
            path = path_loss_head(img, w, b, self.w_ft, b_ft, labels, alphas, smoothing)
        task = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        loss = task + self.args.anchor_weight * anchor + self.args.path_weight * path
        mode = "train" if model.training else "eval"
        self._record(mode, "loss_task", task)
        self._record(mode, "loss_anchor", anchor)
        self._record(mode, "loss_path", path)
        self._record(mode, "accuracy", (logits.detach().argmax(-1) == labels).float().mean() * 100.0)
        loss = self._weighted(loss)  # a padded last batch of a multi-process run (ClipClassificationTrainer)
        return (loss, logits) if return_outputs else loss


def _describe_finetuned(finetuned) -> str:
    """What ŵ2 was, for the model card: a Hub repo (linked), a local folder (its name only: a card never shows a
    path of the machine it was written on), an adapter's name, or the object's type."""
    if isinstance(finetuned, (str, Path)):
        text = str(finetuned)
        if Path(text).expanduser().exists():
            kind = "adapter" if (Path(text).expanduser() / "adapter_config.json").is_file() else "model"
            return f"a local {kind} folder (`{Path(text).expanduser().resolve().name}`)"
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            return f"[{text}](https://huggingface.co/{text})"
        return f"adapter `{text}` (loaded in the same model)"
    peft_config = getattr(finetuned, "peft_config", None)
    if isinstance(peft_config, dict):
        cfg = peft_config.get(finetuned.active_adapter)
        kind = getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None))
        return f"a {kind} adapter given in memory"
    return f"a {type(finetuned).__name__} given in memory"
