"""Task deltas and model merging: ConDU (DeltaFusionMerger), PAM and the standard baselines.

- :mod:`hf_cft.merging.deltas` — task deltas from models, safetensors checkpoints and LoRA adapters; experts
  θ⁰ + s·δ through ``functional_call``.
- :mod:`hf_cft.merging.masks` — bit-packed boolean masks.
- :mod:`hf_cft.merging.condu` — ConDU's decouple/unify loop (:class:`DeltaFusionMerger`) and bundles.
- :mod:`hf_cft.merging.router` — ConDU's semantic router (prototypes, top-K routing, logit fusion).

Example::

    from hf_cft.merging import DeltaFusionMerger, SemanticRouter, compute_prototypes, delta_from_models

    merger = DeltaFusionMerger()
    merger.add_task(delta_from_models(clip, expert, keys="trainable"), "task0", prototypes=protos, classnames=names)
    router = SemanticRouter(merger, clip, tokenizer, top_k=4)
"""

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
from hf_cft.merging.deltas import (
    FunctionalExpert,
    TaskDelta,
    apply_delta,
    base_fingerprint,
    check_compatible,
    delta_from_lora,
    delta_from_models,
    functional_expert,
    iter_delta,
    lora_factor_delta,
    validate_delta,
)
from hf_cft.merging.masks import PackedMask, pack_mask, packed_nbytes, unpack_mask
from hf_cft.merging.router import RouterStats, Routing, SemanticRouter, compute_prototypes

__all__ = [
    "CollapsedTaskWarning",
    "DeltaFusionMerger",
    "DeltaFusionMergerConfig",
    "FunctionalExpert",
    "PackedMask",
    "RouterStats",
    "Routing",
    "SemanticRouter",
    "TaskDelta",
    "TaskRecord",
    "UnifyResult",
    "apply_delta",
    "base_fingerprint",
    "check_compatible",
    "compute_prototypes",
    "decouple",
    "delta_from_lora",
    "delta_from_models",
    "elected_sign",
    "functional_expert",
    "iter_delta",
    "lora_factor_delta",
    "pack_mask",
    "packed_nbytes",
    "unify",
    "unpack_mask",
    "validate_delta",
]
