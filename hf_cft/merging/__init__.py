"""Task deltas and model merging: ConDU (DeltaFusionMerger), PAM and the standard baselines.

- :mod:`hf_cft.merging.deltas` — task deltas from models, safetensors checkpoints and LoRA adapters; experts
  θ⁰ + s·δ through ``functional_call``.
- :mod:`hf_cft.merging.masks` — bit-packed boolean masks.
- :mod:`hf_cft.merging.condu` — ConDU's decouple/unify loop (:class:`DeltaFusionMerger`) and bundles.
- :mod:`hf_cft.merging.router` — ConDU's semantic router (prototypes, top-K routing, logit fusion).
- :mod:`hf_cft.merging.baselines` — task arithmetic, running mean, WiSE-FT, TIES, DARE, MagMax, EMR, TALL/consensus,
  OPCM, one-shot and continual (pam.md §9).
- :mod:`hf_cft.merging.methods` — TSV-M, Iso-C/Iso-CTS, model stock, breadcrumbs, DELLA, SLERP.
- :mod:`hf_cft.merging.data_dependent` — RegMean and Fisher merging from a calibration loader.
- :func:`merge_deltas` — any registered method (``hf-cft merge --method``) on in-memory deltas, key by key.
- :mod:`hf_cft.merging.pam` — PAM aligned merging of global/task LoRA adapters (pam.md §1–§6).

Example::

    from hf_cft.merging import DeltaFusionMerger, SemanticRouter, compute_prototypes, delta_from_models

    merger = DeltaFusionMerger()
    merger.add_task(delta_from_models(clip, expert, keys="trainable"), "task0", prototypes=protos, classnames=names)
    router = SemanticRouter(merger, clip, tokenizer, top_k=4)
"""

# --- baselines (pam.md §9) and PAM (pam.md §1–§6)
from typing import TYPE_CHECKING

from hf_cft.merging.baselines import (
    ContinualMerger,
    ContinualTaskArithmetic,
    ContinualTIES,
    EMRResult,
    MagMaxMerger,
    OPCMMerger,
    RunningMean,
    TallMasksResult,
    consensus,
    dare,
    emr,
    emr_task_delta,
    magmax,
    magnitude_prune,
    running_mean,
    tall_masks,
    task_arithmetic,
    ties,
    trim_top_k,
    wise_ft,
)
from hf_cft.merging.condu import (
    CollapsedTaskWarning,
    DeltaFusionMerger,
    DeltaFusionMergerConfig,
    TaskRecord,
    UnifyResult,
    decouple,
    elected_sign,
    unify,
)
from hf_cft.merging.data_dependent import (
    CalibrationData,
    LinearGrams,
    clip_log_probs,
    fisher_diagonal,
    fisher_merge,
    fisher_merging,
    linear_input_grams,
    load_calibration,
    regmean,
    regmean_merge,
)
from hf_cft.merging.deltas import (
    FunctionalExpert,
    LazyDelta,
    TaskDelta,
    apply_delta,
    base_fingerprint,
    check_compatible,
    delta_from_lora,
    delta_from_models,
    dense_delta_from_factors,
    functional_expert,
    iter_delta,
    lora_factor_delta,
    save_delta,
    validate_delta,
    validate_lazy_delta,
)
from hf_cft.merging.masks import PackedMask, pack_mask, packed_nbytes, unpack_mask
from hf_cft.merging.methods import (
    ContinualSLERP,
    breadcrumbs,
    della,
    iso_c,
    iso_cts,
    model_stock,
    slerp,
    tsv_m,
)
from hf_cft.merging.streaming import merge_deltas

# PAM (a transformers TrainerCallback) and the router (CLIP features) import transformers and PEFT: they load on
# first access, so that the merges that need neither (``hf-cft merge``, the streaming merge) start without them.
_LAZY = {
    "hf_cft.merging.pam": (
        "PAMCallback",
        "PAMConfig",
        "PAMState",
        "adapter_state",
        "default_lora_config",
        "factor_merge_gap",
        "importance_masks",
        "pam_align",
        "pam_merge",
        "prepare_pam_model",
        "sign_misalignment",
    ),
    "hf_cft.merging.router": ("RouterStats", "Routing", "SemanticRouter", "compute_prototypes"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from hf_cft.merging.pam import (
        PAMCallback,
        PAMConfig,
        PAMState,
        adapter_state,
        default_lora_config,
        factor_merge_gap,
        importance_masks,
        pam_align,
        pam_merge,
        prepare_pam_model,
        sign_misalignment,
    )
    from hf_cft.merging.router import RouterStats, Routing, SemanticRouter, compute_prototypes


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_cft.merging' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES))


__all__ = [
    "CollapsedTaskWarning",
    "ContinualMerger",
    "ContinualSLERP",
    "CalibrationData",
    "ContinualTIES",
    "ContinualTaskArithmetic",
    "DeltaFusionMerger",
    "DeltaFusionMergerConfig",
    "EMRResult",
    "FunctionalExpert",
    "LazyDelta",
    "LinearGrams",
    "MagMaxMerger",
    "OPCMMerger",
    "PAMCallback",
    "PAMConfig",
    "PAMState",
    "PackedMask",
    "RouterStats",
    "Routing",
    "RunningMean",
    "SemanticRouter",
    "TallMasksResult",
    "TaskDelta",
    "TaskRecord",
    "UnifyResult",
    "adapter_state",
    "apply_delta",
    "base_fingerprint",
    "breadcrumbs",
    "check_compatible",
    "clip_log_probs",
    "compute_prototypes",
    "consensus",
    "dare",
    "decouple",
    "default_lora_config",
    "della",
    "delta_from_lora",
    "delta_from_models",
    "dense_delta_from_factors",
    "elected_sign",
    "emr",
    "emr_task_delta",
    "factor_merge_gap",
    "fisher_diagonal",
    "fisher_merge",
    "fisher_merging",
    "functional_expert",
    "importance_masks",
    "iso_c",
    "iso_cts",
    "iter_delta",
    "linear_input_grams",
    "load_calibration",
    "lora_factor_delta",
    "magmax",
    "magnitude_prune",
    "merge_deltas",
    "model_stock",
    "pack_mask",
    "packed_nbytes",
    "pam_align",
    "pam_merge",
    "prepare_pam_model",
    "regmean",
    "regmean_merge",
    "running_mean",
    "save_delta",
    "sign_misalignment",
    "slerp",
    "tall_masks",
    "task_arithmetic",
    "ties",
    "trim_top_k",
    "tsv_m",
    "unify",
    "unpack_mask",
    "validate_delta",
    "validate_lazy_delta",
    "wise_ft",
]
