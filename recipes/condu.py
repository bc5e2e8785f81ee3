# /// script
# requires-python = ">=3.10"
# dependencies = ["hf-cft[vision,plots,demo]"]
# ///
"""ConDU and its baselines on a continual task stream: accuracy matrix, Transfer / Average / Last / BWT, heatmap
and a model card per strategy (``docs/methods/condu.md`` §10; Protocol B of ``docs/benchmarks.md``).

Launch (from the repository root; CPU is fine for the demo):

    accelerate launch recipes/condu.py
        # offline demo (about 3 min on 2 CPU cores): scikit-learn's digits cut into 3 tasks of disjoint classes
        # (0-3, 4-6, 7-9) and the tiny digits demo CLIP (pretrained on first use, cached in ~/.cache/hf_cft);
        # zero-shot, sequential fine-tuning, independent experts and ConDU side by side
    accelerate launch recipes/condu.py --config recipes/configs/condu.yaml
        # MTIL-mini Order I over ../shared/data with the project's small pretrained CLIP (see the YAML)
    accelerate launch recipes/condu.py --checkpoint path/to/clip --order II --strategy condu --finetune lora \\
        --learning_rate 1e-3 --max_steps 500 --output_dir outputs/condu-lora-order2
    accelerate launch recipes/condu.py --strategy condu --finetune lora --lora_merge factors \\
        --output_dir outputs/condu-lora-factors
        # the released ConDU (LoRA): A and B unified separately (docs/methods/merging-fidelity.md)

MTIL-mini: each task trains on the downstream pool of its dataset (the 30% of every class's training images left
after ``split_per_class(train, 0.7, seed=0)``, never seen in pretraining; ``--shots 5`` for the few-shot variant)
and every task's test split is evaluated after each task with the template ensemble of its own classes. Experts
train from θ⁰ (full fine-tuning or LoRA per ``--finetune``), except in sequential fine-tuning. ConDU evaluates a
learned task with its rebuilt expert and a task not learned yet by semantic routing (``--task_agnostic true``:
routing everywhere). ``--benchmark mtil`` runs the 11 real MTIL datasets by Hub id instead (needs the Hub);
``recipes/mtil.py`` runs any registered strategy, ``recipes/pam.py`` PAM and its baselines.

Multi-process (``ACCELERATE_USE_CPU=1 accelerate launch --config_file hf_cft/accelerate_configs/cpu_2proc.yaml
recipes/condu.py --per_device_train_batch_size 16`` on 2 CPU processes): ``per_device_train_batch_size`` is per
process (the Trainer's rule), so give B/N to train every task on the 1-process global batches; the accuracy
matrices and losses then equal the 1-process run up to float rounding (tests/test_distributed_parity.py). Only the
main process writes (checkpoints, expert deltas, cards, results); evaluation is replicated on every process.

Writes to ``output_dir``: ``<strategy>/`` (``accuracy_matrix.{json,md,png}``, ``README.md`` model card, the resumable
``checkpoint/`` and ``store/``) and ``results.{json,md}`` comparing the strategies. Re-running the same command
resumes an interrupted run after its last finished task, with identical results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hf_cft.continual import STRATEGIES, ContinualConfig
from hf_cft.recipe_utils import (
    CONTINUAL_DEMO_DEFAULTS,
    DIGITS_DEMO_GROUPS,
    ContinualStreamArguments,
    build_strategies,
    load_sibling_recipe,
    parse_recipe_args,
    run_continual_recipe,
    user_errors,
)

DEMO_GROUPS = DIGITS_DEMO_GROUPS
# What `accelerate launch recipes/condu.py` uses with no arguments: the digits demo's training budget.
RECIPE_DEFAULTS = {**CONTINUAL_DEMO_DEFAULTS, "output_dir": "outputs/condu"}


@dataclass
class ConDURecipeArguments(ContinualStreamArguments):
    strategy: list[str] = field(
        default_factory=lambda: ["zeroshot", "sequential", "independent", "condu"],
        metadata={"help": f"Strategies to run, each into output_dir/<name>: {', '.join(STRATEGIES)}."},
    )
    task_agnostic: bool = field(default=False, metadata={"help": "ConDU: route every dataset (no task id)."})
    track_fidelity: bool = field(
        default=False,
        metadata={
            "help": "ConDU: keep each original delta on disk and log, after every session, each stored expert's "
            "cosine / relative error to its original, mask density and λ (benchmark diagnostic)."
        },
    )
    top_k: int = field(default=4, metadata={"help": "ConDU: experts per sample in routing."})
    weighting: str = field(default="uniform", metadata={"help": "ConDU: uniform, similarity or softmax."})
    include_zero_shot: bool = field(default=True, metadata={"help": "ConDU: θ⁰ votes in routing."})
    rescaler: str = field(default="mean", metadata={"help": "ConDU: 'mean' (released) or 'global_sum'."})
    rescaler_groups: str = field(
        default="tensor",
        metadata={
            "help": "ConDU: the parts of the per-tensor-mean λ: 'tensor' (each weight) or 'openai' (q/k/v of each "
            "attention layer fused, as the released code's in_proj: its λ for full fine-tuning)."
        },
    )
    lora_merge: str = field(
        default="dense",
        metadata={
            "help": "ConDU with --finetune lora: 'dense' (s·B@A unified per linear, default) or 'factors' (A and B "
            "unified separately, the released ConDU (LoRA))."
        },
    )
    output_dir: str = field(default="outputs/condu", metadata={"help": "Output folder."})


def demo_clip(steps: int):
    """The digits demo CLIP of recipes/mergetune.py (same settings, same cache)."""
    return load_sibling_recipe(__file__, "mergetune").demo_clip(steps)


def strategy_kwargs(name: str, args: ConDURecipeArguments) -> dict:
    if name != "condu":
        return {}
    return dict(
        top_k=args.top_k,
        weighting=args.weighting,
        include_zero_shot=args.include_zero_shot,
        task_agnostic=args.task_agnostic,
        rescaler=args.rescaler,
        rescaler_groups=args.rescaler_groups,
        lora_merge=args.lora_merge,
        track_fidelity=args.track_fidelity,
    )


def main(args: ConDURecipeArguments, config: ContinualConfig) -> dict:
    strategies = build_strategies(args.strategy, lambda name: strategy_kwargs(name, args))
    finetune = "FT" if config.finetune == "full" else "LoRA"
    labels = {}
    if "condu" in strategies and args.task_agnostic:
        labels["condu"] = f"condu ({finetune}), task-agnostic"
    return run_continual_recipe(args, config, strategies, demo_model=demo_clip, labels=labels)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)
    recipe_args, continual_config = parse_recipe_args(ConDURecipeArguments, ContinualConfig, defaults=RECIPE_DEFAULTS)
    with user_errors():
        main(recipe_args, continual_config)
