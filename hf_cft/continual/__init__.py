"""Continual-learning driver: task streams, strategies, accuracy matrices, checkpoint and resume.

Example (MTIL-mini, Protocol B of ``docs/benchmarks.md``)::

    from hf_cft.continual import ContinualConfig, ContinualRunner, IndependentExperts, mtil_mini_tasks
    from hf_cft.recipe_utils import load_clip

    clip, tokenizer, transform = load_clip("path/to/pretrained-clip")
    tasks = mtil_mini_tasks("I")
    result = ContinualRunner(IndependentExperts(), tasks, clip, tokenizer, "outputs/independent",
                             ContinualConfig(max_steps=200, learning_rate=1e-4), transform=transform).run()
    print(result.metrics)

Every strategy of the Protocol B tables is registered by name (``make_strategy(name, **options)``): ``zeroshot``,
``sequential``, ``independent``, ``condu``, the merging baselines of ``docs/methods/pam.md`` §9 (``task_arithmetic``,
``ties``, ``magmax``, ``opcm``, ``running_mean``, ``wise``, ``emr``), the methods of issue 18 (``dare``,
``consensus``, ``tall``, ``tsv_m``, ``iso_c``, ``iso_cts``, ``breadcrumbs``, ``della``, ``model_stock``, ``slerp``) and
the LoRA strategies of PAM (``pam``, ``merge_only``, ``pam_ties``, ``sequential_lora``, ``pam_tall``).
"""

from hf_cft.continual.baseline_strategies import (
    BASELINE_STRATEGIES,
    EMRStrategy,
    SequentialWiSE,
    TALLStrategy,
    emr_strategy,
    magmax_strategy,
    opcm_strategy,
    running_mean_strategy,
    task_arithmetic_strategy,
    ties_strategy,
    wise_strategy,
)
from hf_cft.continual.config import ContinualConfig, task_seed
from hf_cft.continual.evaluation import DeltaEvaluator
from hf_cft.continual.pam_strategy import (
    PAM_STRATEGIES,
    PAMStrategy,
    PAMTallStrategy,
    lora_factor_delta,
    merge_only_strategy,
    pam_strategy,
    pam_tall_strategy,
    pam_ties_strategy,
    sequential_lora_strategy,
)
from hf_cft.continual.report import continual_card, matrix_markdown, matrix_report, write_matrix_outputs
from hf_cft.continual.runner import ContinualResult, ContinualRunner, model_fingerprint
from hf_cft.continual.strategies import (
    STRATEGIES,
    ConDUStrategy,
    DeltaMergeStrategy,
    IndependentExperts,
    RunContext,
    SequentialFineTuning,
    Strategy,
    ZeroShotStrategy,
    make_strategy,
    register_strategy,
    save_expert,
    strategy_names,
    strategy_options,
)
from hf_cft.continual.tasks import (
    MTIL_MINI_ORDERS,
    MTIL_ORDERS,
    TaskSpec,
    class_split_tasks,
    mtil_mini_tasks,
    mtil_tasks,
    validate_tasks,
)
from hf_cft.continual.training import build_training_model, fit, lora_scaling, train_expert
from hf_cft.continual.weights import DeltaStore, call_with_delta, lora_dense_delta, trained_delta

__all__ = [
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
    "fit",
    "lora_dense_delta",
    "lora_factor_delta",
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
]
