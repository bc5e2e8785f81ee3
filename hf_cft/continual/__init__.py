"""Continual-learning driver: task streams, strategies, accuracy matrices, checkpoint and resume.

Example (MTIL-mini, Protocol B of ``docs/benchmarks.md``)::

    from hf_cft.continual import ContinualConfig, ContinualRunner, IndependentExperts, mtil_mini_tasks
    from hf_cft.recipe_utils import load_clip

    clip, tokenizer, transform = load_clip("path/to/pretrained-clip")
    tasks = mtil_mini_tasks("I")
    result = ContinualRunner(IndependentExperts(), tasks, clip, tokenizer, "outputs/independent",
                             ContinualConfig(max_steps=200, learning_rate=1e-4), transform=transform).run()
    print(result.metrics)
"""

from hf_cft.continual.config import ContinualConfig, task_seed
from hf_cft.continual.evaluation import DeltaEvaluator
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
)
from hf_cft.continual.tasks import MTIL_MINI_ORDERS, TaskSpec, class_split_tasks, mtil_mini_tasks, validate_tasks
from hf_cft.continual.training import build_training_model, train_expert
from hf_cft.continual.weights import DeltaStore, call_with_delta, lora_dense_delta, trained_delta

__all__ = [
    "MTIL_MINI_ORDERS",
    "STRATEGIES",
    "ConDUStrategy",
    "ContinualConfig",
    "ContinualResult",
    "ContinualRunner",
    "DeltaEvaluator",
    "DeltaMergeStrategy",
    "DeltaStore",
    "IndependentExperts",
    "RunContext",
    "SequentialFineTuning",
    "Strategy",
    "TaskSpec",
    "ZeroShotStrategy",
    "build_training_model",
    "call_with_delta",
    "class_split_tasks",
    "continual_card",
    "lora_dense_delta",
    "make_strategy",
    "matrix_markdown",
    "matrix_report",
    "model_fingerprint",
    "mtil_mini_tasks",
    "task_seed",
    "train_expert",
    "trained_delta",
    "validate_tasks",
    "write_matrix_outputs",
]
