"""hf_cft: continued and continual fine-tuning of CLIP-like vision-language models on the Hugging Face stack.

The names users reach for are importable from the top level, as in ``from trl import SFTTrainer``::

    from hf_cft import MergeTuneTrainer, MergeTuneConfig, DeltaFusionMerger, SemanticRouter, evaluate

They are imported lazily (on first access), and ``import hf_cft`` imports neither PEFT nor transformers: hf_cft's
PEFT method types (CoOp, VPT, linear head) are registered with PEFT the moment PEFT is imported (by anything), so
``hf-cft merge`` starts with torch alone; ``hf_cft.<subpackage>`` loads a subpackage the same way.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

from hf_cft import errors


def _after_import(name: str, callback) -> None:
    """Run ``callback()`` once the module ``name`` is imported: at once if it already is, else right after its import
    executes (a one-shot meta-path finder wraps its loader). ``import hf_cft`` thus registers with PEFT without
    importing PEFT (and transformers, torch.distributed): what needs PEFT imports it, and the registration follows."""
    if name in sys.modules:
        callback()
        return
    import importlib.abc
    import importlib.util

    done: list[bool] = []

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name or done:
                return None
            sys.meta_path.remove(self)  # the real spec, from the other finders (a bare find_spec call, e.g.
            try:  # transformers' "is peft available?", imports nothing: the finder stays for the import)
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_then_callback(module):
                    exec_module(module)
                    if not done:
                        done.append(True)
                        if self in sys.meta_path:
                            sys.meta_path.remove(self)
                        callback()

                spec.loader.exec_module = exec_then_callback
            return spec

    sys.meta_path.insert(0, _Finder())


def _register_peft_methods() -> None:
    from hf_cft.peft.registration import register

    register()


def _install_peft_card_hook() -> None:
    """``PeftModel.save_pretrained`` writes hf_cft's adapter card for hf_cft's adapters (and LoRA on CLIP) instead
    of PEFT's generic one (:mod:`hf_cft.hub.peft_cards`, imported only when a card is written)."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_hf_cft", False):
        return

    def create_or_update_model_card(self, output_dir: str):
        from hf_cft.hub.peft_cards import write_peft_card

        if not write_peft_card(self, output_dir):
            original(self, output_dir)

    create_or_update_model_card._hf_cft = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def _on_peft_import() -> None:
    package = sys.modules.get("hf_cft.peft")
    if package is not None and getattr(getattr(package, "__spec__", None), "_initializing", False):
        return  # hf_cft.peft's own import pulled PEFT in: it registers when it is complete (hf_cft/peft/__init__.py)
    _register_peft_methods()
    _install_peft_card_hook()


_after_import("peft", _on_peft_import)

#: Public names by the module that defines them (resolved on first access by :func:`__getattr__`).
_LAZY_IMPORTS: dict[str, tuple[str, ...]] = {
    "hf_cft.data": (
        "ClassificationDataset",
        "DatasetSpec",
        "ImageClassificationCollator",
        "ImageTransform",
        "base_novel_split",
        "few_shot",
        "get_spec",
        "list_specs",
        "load_classification_dataset",
        "load_digits_dataset",
        "split_per_class",
    ),
    "hf_cft.metrics": (
        "AccuracyMatrix",
        "accuracy",
        "base_novel_summary",
        "harmonic_mean",
        "matrix_metrics",
    ),
    "hf_cft.models": (
        "FeatureCache",
        "ZeroShotResult",
        "build_clip_tokenizer",
        "build_zeroshot_classifier",
        "convert_open_clip",
        "evaluate_zeroshot",
        "image_features",
        "load_tokenizer",
        "text_features",
    ),
    "hf_cft.evaluation": (
        "EvaluationResult",
        "class_logits",
        "eval_transform",
        "evaluate",
    ),
    "hf_cft.peft": (
        "CoOpConfig",
        "CoOpModel",
        "LinearHeadConfig",
        "LinearHeadModel",
        "VPTConfig",
        "VPTModel",
    ),
    "hf_cft.trainers": (
        "ClipClassificationTrainer",
        "ClipClassifier",
        "ClipTrainingArguments",
        "MergeTuneConfig",
        "MergeTuneConfigError",
        "MergeTuneTrainer",
        "fit_linear_probe",
        "train_coop_on_features",
        "train_head_on_features",
    ),
    "hf_cft.merging": (
        "CalibrationData",
        "CollapsedTaskWarning",
        "ContinualMerger",
        "ContinualSLERP",
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
    ),
    "hf_cft.continual": (
        "BASELINE_STRATEGIES",
        "MTIL_MINI_ORDERS",
        "MTIL_ORDERS",
        "PAM_STRATEGIES",
        "STRATEGIES",
        "ConDUStrategy",
        "ContinualConfig",
        "ContinualResult",
        "ContinualRunner",
        "DeltaEvaluator",
        "DeltaMergeStrategy",
        "DeltaStore",
        "EMRStrategy",
        "IndependentExperts",
        "PAMStrategy",
        "PAMTallStrategy",
        "RunContext",
        "SequentialFineTuning",
        "SequentialWiSE",
        "Strategy",
        "TALLStrategy",
        "TaskSpec",
        "ZeroShotStrategy",
        "build_training_model",
        "call_with_delta",
        "class_split_tasks",
        "continual_card",
        "emr_strategy",
        "lora_dense_delta",
        "lora_scaling",
        "magmax_strategy",
        "make_strategy",
        "matrix_markdown",
        "matrix_report",
        "merge_only_strategy",
        "model_fingerprint",
        "mtil_mini_tasks",
        "mtil_tasks",
        "opcm_strategy",
        "pam_strategy",
        "pam_tall_strategy",
        "pam_ties_strategy",
        "register_strategy",
        "running_mean_strategy",
        "save_expert",
        "sequential_lora_strategy",
        "strategy_names",
        "strategy_options",
        "task_arithmetic_strategy",
        "task_seed",
        "ties_strategy",
        "train_expert",
        "trained_delta",
        "validate_tasks",
        "wise_strategy",
        "write_matrix_outputs",
    ),
    "hf_cft.hub": (
        "adapter_card",
        "artefact_kind",
        "condu_card",
        "eval_result_entries",
        "eval_results_files",
        "finetuned_model_card",
        "load_adapter_model",
        "load_model",
        "merge_card",
        "mergetune_card",
        "pam_card",
        "push_adapter_to_hub",
        "push_folder_to_hub",
        "push_to_hub",
        "render_card",
        "run_merge",
        "snapshot",
        "validate_card",
    ),
    "hf_cft.plots": (
        "accuracy_matrix_figure",
        "interpolation_curves",
        "plot_accuracy_matrix",
        "plot_paths",
    ),
}

if TYPE_CHECKING:  # the same names for type checkers and IDEs (kept equal to _LAZY_IMPORTS by a test)
    from hf_cft.continual import (
        BASELINE_STRATEGIES,
        MTIL_MINI_ORDERS,
        MTIL_ORDERS,
        PAM_STRATEGIES,
        STRATEGIES,
        ConDUStrategy,
        ContinualConfig,
        ContinualResult,
        ContinualRunner,
        DeltaEvaluator,
        DeltaMergeStrategy,
        DeltaStore,
        EMRStrategy,
        IndependentExperts,
        PAMStrategy,
        PAMTallStrategy,
        RunContext,
        SequentialFineTuning,
        SequentialWiSE,
        Strategy,
        TALLStrategy,
        TaskSpec,
        ZeroShotStrategy,
        build_training_model,
        call_with_delta,
        class_split_tasks,
        continual_card,
        emr_strategy,
        lora_dense_delta,
        lora_scaling,
        magmax_strategy,
        make_strategy,
        matrix_markdown,
        matrix_report,
        merge_only_strategy,
        model_fingerprint,
        mtil_mini_tasks,
        mtil_tasks,
        opcm_strategy,
        pam_strategy,
        pam_tall_strategy,
        pam_ties_strategy,
        register_strategy,
        running_mean_strategy,
        save_expert,
        sequential_lora_strategy,
        strategy_names,
        strategy_options,
        task_arithmetic_strategy,
        task_seed,
        ties_strategy,
        train_expert,
        trained_delta,
        validate_tasks,
        wise_strategy,
        write_matrix_outputs,
    )
    from hf_cft.data import (
        ClassificationDataset,
        DatasetSpec,
        ImageClassificationCollator,
        ImageTransform,
        base_novel_split,
        few_shot,
        get_spec,
        list_specs,
        load_classification_dataset,
        load_digits_dataset,
        split_per_class,
    )
    from hf_cft.evaluation import (
        EvaluationResult,
        class_logits,
        eval_transform,
        evaluate,
    )
    from hf_cft.hub import (
        adapter_card,
        artefact_kind,
        condu_card,
        eval_result_entries,
        eval_results_files,
        finetuned_model_card,
        load_adapter_model,
        load_model,
        merge_card,
        mergetune_card,
        pam_card,
        push_adapter_to_hub,
        push_folder_to_hub,
        push_to_hub,
        render_card,
        run_merge,
        snapshot,
        validate_card,
    )
    from hf_cft.merging import (
        CalibrationData,
        CollapsedTaskWarning,
        ContinualMerger,
        ContinualSLERP,
        ContinualTaskArithmetic,
        ContinualTIES,
        DeltaFusionMerger,
        DeltaFusionMergerConfig,
        EMRResult,
        FunctionalExpert,
        LazyDelta,
        LinearGrams,
        MagMaxMerger,
        OPCMMerger,
        PackedMask,
        PAMCallback,
        PAMConfig,
        PAMState,
        RouterStats,
        Routing,
        RunningMean,
        SemanticRouter,
        TallMasksResult,
        TaskDelta,
        TaskRecord,
        UnifyResult,
        adapter_state,
        apply_delta,
        base_fingerprint,
        breadcrumbs,
        check_compatible,
        clip_log_probs,
        compute_prototypes,
        consensus,
        dare,
        decouple,
        default_lora_config,
        della,
        delta_from_lora,
        delta_from_models,
        dense_delta_from_factors,
        elected_sign,
        emr,
        emr_task_delta,
        factor_merge_gap,
        fisher_diagonal,
        fisher_merge,
        fisher_merging,
        functional_expert,
        importance_masks,
        iso_c,
        iso_cts,
        iter_delta,
        linear_input_grams,
        load_calibration,
        lora_factor_delta,
        magmax,
        magnitude_prune,
        merge_deltas,
        model_stock,
        pack_mask,
        packed_nbytes,
        pam_align,
        pam_merge,
        prepare_pam_model,
        regmean,
        regmean_merge,
        running_mean,
        save_delta,
        sign_misalignment,
        slerp,
        tall_masks,
        task_arithmetic,
        ties,
        trim_top_k,
        tsv_m,
        unify,
        unpack_mask,
        validate_delta,
        validate_lazy_delta,
        wise_ft,
    )
    from hf_cft.metrics import (
        AccuracyMatrix,
        accuracy,
        base_novel_summary,
        harmonic_mean,
        matrix_metrics,
    )
    from hf_cft.models import (
        FeatureCache,
        ZeroShotResult,
        build_clip_tokenizer,
        build_zeroshot_classifier,
        convert_open_clip,
        evaluate_zeroshot,
        image_features,
        load_tokenizer,
        text_features,
    )
    from hf_cft.peft import (
        CoOpConfig,
        CoOpModel,
        LinearHeadConfig,
        LinearHeadModel,
        VPTConfig,
        VPTModel,
    )
    from hf_cft.plots import (
        accuracy_matrix_figure,
        interpolation_curves,
        plot_accuracy_matrix,
        plot_paths,
    )
    from hf_cft.trainers import (
        ClipClassificationTrainer,
        ClipClassifier,
        ClipTrainingArguments,
        MergeTuneConfig,
        MergeTuneConfigError,
        MergeTuneTrainer,
        fit_linear_probe,
        train_coop_on_features,
        train_head_on_features,
    )

_NAME_TO_MODULE = {name: module for module, names in _LAZY_IMPORTS.items() for name in names}
#: Names kept for one release; calling them emits a FutureWarning naming the replacement (not in ``__all__``).
_DEPRECATED = {"base_novel_hm": "hf_cft.metrics"}
_SUBMODULES = (
    "cli",
    "continual",
    "data",
    "evaluation",
    "hub",
    "merging",
    "metrics",
    "models",
    "peft",
    "plots",
    "recipe_utils",
    "testing",
    "trainers",
    "utils",
)

__all__ = ["__version__", "errors", *_NAME_TO_MODULE]


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name) or _DEPRECATED.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
