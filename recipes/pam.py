# /// script
# requires-python = ">=3.10"
# dependencies = ["hf-cft[vision,plots,demo]"]
# ///
"""PAM (aligned merging of LoRA adapters, ``docs/methods/pam.md``) and its baselines on a continual task stream:
accuracy matrix, ACC (Last) / BWT / Plasticity / Transfer / Average, the sign misalignment between the global and
the task adapter before each merge, a heatmap and a model card per strategy (Protocol B of ``docs/benchmarks.md``).

Launch (from the repository root; CPU is fine for the demo):

    accelerate launch recipes/pam.py
        # offline demo (about 2-3 min on 2 CPU cores): scikit-learn's digits cut into 3 tasks of disjoint classes
        # and the tiny digits demo CLIP (pretrained on first use, cached in ~/.cache/hf_cft); zero-shot, sequential
        # LoRA (one adapter), merge-only, merge + post-hoc TIES, PAM, and independent LoRA experts (task id)
    accelerate launch recipes/pam.py --config recipes/configs/pam.yaml
        # MTIL-mini Order I over ../shared/data with the project's small pretrained CLIP (see the YAML)
    accelerate launch recipes/pam.py --config recipes/configs/pam.yaml --order II --output_dir outputs/pam-order2
    accelerate launch recipes/pam.py --checkpoint path/to/clip --order I --top_p 0.7 --align_every 5 \\
        --strategy pam --output_dir outputs/pam-p07

Every strategy trains LoRA adapters with the run's LoRA settings (pam.md §6: rank 32, α 32, q/k/v/out_proj and
fc1/fc2 of both towers in the YAML); PAM's options (``--top_p``, ``--align_every``, ``--reset``, ``--moment_reset``,
``--merge_weight``, ``--ties_k``) reach the strategies that take them. PAM, merge-only, post-hoc TIES and sequential
LoRA deploy one adapter for every task (no task id); independent experts use the task id (upper bound).

Multi-process (``ACCELERATE_USE_CPU=1 accelerate launch --config_file hf_cft/accelerate_configs/cpu_2proc.yaml
recipes/pam.py --per_device_train_batch_size 16`` on 2 CPU processes): ``per_device_train_batch_size`` is per
process (the Trainer's rule), so give B/N to train every task on the 1-process global batches; the accuracy
matrices and losses then equal the 1-process run up to float rounding (tests/test_distributed_parity.py). Only the
main process writes (checkpoints, expert deltas, cards, results); evaluation is replicated on every process.

Writes to ``output_dir``: ``<strategy>/`` (``accuracy_matrix.{json,md,png}``, ``README.md`` model card, the resumable
``checkpoint/``, for the PAM family ``checkpoint/pam/`` = a PEFT LoRA folder with the global adapter) and
``results.{json,md}``: the comparison table and, per task, the misalignment rates (top-p and all entries, A and B),
the entries reset by alignment and the task adapter's accuracy before the merge. Re-running the same command
resumes an interrupted run after its last finished task, with identical results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hf_cft.continual import STRATEGIES, ContinualConfig, strategy_options
from hf_cft.merging.pam import DEFAULT_TARGET_MODULES
from hf_cft.recipe_utils import (
    ContinualStreamArguments,
    build_strategies,
    load_sibling_recipe,
    parse_recipe_args,
    run_continual_recipe,
    user_errors,
)

# What `accelerate launch recipes/pam.py` uses with no arguments: the digits demo's LoRA budget (pam.md §6's
# adapter layout at a rank that fits the 64-wide demo model; scaling α/r = 1 as in §6).
RECIPE_DEFAULTS = {
    "output_dir": "outputs/pam",
    "finetune": "lora",
    "max_steps": 60,
    "learning_rate": 5e-3,
    "per_device_train_batch_size": 32,
    "warmup_steps": 6,
    "eval_batch_size": 256,
    "logging_steps": 20,
    "lora_r": 8,
    "lora_alpha": 8.0,
    "lora_use_rslora": False,
    "lora_target_modules": list(DEFAULT_TARGET_MODULES),
    "seed": 42,
}
PAM_FAMILY = ("pam", "merge_only", "pam_ties", "sequential_lora")


@dataclass
class PAMRecipeArguments(ContinualStreamArguments):
    strategy: list[str] = field(
        default_factory=lambda: ["zeroshot", "sequential_lora", "merge_only", "pam_ties", "pam", "independent"],
        metadata={"help": f"Strategies to run, each into output_dir/<name>: {', '.join(STRATEGIES)}."},
    )
    top_p: float = field(default=0.5, metadata={"help": "PAM: fraction p of G's entries whose sign is enforced."})
    align_every: int = field(default=10, metadata={"help": "PAM: align every K optimiser steps."})
    reset: str = field(default="zero", metadata={"help": "PAM: reset misaligned entries to 'zero' or 'global'."})
    moment_reset: str = field(default="first", metadata={"help": "PAM: Adam moments to zero: first, both, none."})
    merge_weight: str = field(default="half", metadata={"help": "PAM: ω of the merge: half, running, or a number."})
    ties_k: float = field(default=1.0, metadata={"help": "pam_ties: TIES trim fraction (1: no trim)."})
    output_dir: str = field(default="outputs/pam", metadata={"help": "Output folder."})


def demo_clip(steps: int):
    """The digits demo CLIP of recipes/mergetune.py (same settings, same cache)."""
    return load_sibling_recipe(__file__, "mergetune").demo_clip(steps)


def _merge_weight(value: str) -> str | float:
    if value in ("half", "running"):
        return value
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"--merge_weight must be half, running or a number in (0, 1], got {value!r}") from None


def strategy_kwargs(name: str, args: PAMRecipeArguments) -> dict:
    """The PAM options a strategy takes (each strategy declares its own; e.g. merge_only has no align_every)."""
    given = {
        "top_p": args.top_p,
        "align_every": args.align_every,
        "reset": args.reset,
        "moment_reset": args.moment_reset,
        "merge_weight": _merge_weight(args.merge_weight),
        "ties_k": args.ties_k,
    }
    accepted = strategy_options(name)
    if accepted is None or name not in PAM_FAMILY:
        return {}
    return {k: v for k, v in given.items() if k in accepted}


def main(args: PAMRecipeArguments, config: ContinualConfig) -> dict:
    strategies = build_strategies(args.strategy, lambda name: strategy_kwargs(name, args))
    labels = {
        "sequential_lora": "sequential LoRA (one adapter)",
        "merge_only": "merge only (no alignment)",
        "pam_ties": "merge + post-hoc TIES",
        "pam": f"PAM (p={args.top_p}, K={args.align_every})",
        "independent": "independent LoRA (task id)" if config.finetune == "lora" else "independent (task id)",
    }
    return run_continual_recipe(args, config, strategies, demo_model=demo_clip, labels=labels, title="PAM")


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)
    recipe_args, continual_config = parse_recipe_args(PAMRecipeArguments, ContinualConfig, defaults=RECIPE_DEFAULTS)
    with user_errors():
        main(recipe_args, continual_config)
