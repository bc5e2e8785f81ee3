# /// script
# requires-python = ">=3.10"
# dependencies = ["hf-cft[vision,plots,demo]"]
# ///
"""Any registered continual strategy on MTIL-mini (Protocol B of ``docs/benchmarks.md``) or on the 11 real MTIL
datasets by Hub id: accuracy matrix, ACC (Last) / BWT / Plasticity / Transfer / Average, heatmap and a model card
per strategy, and ``results.{json,md}`` comparing them.

Launch (from the repository root):

    accelerate launch recipes/mtil.py
        # offline demo on scikit-learn's digits (3 tasks) with the tiny digits demo CLIP: zero-shot, sequential
        # fine-tuning, independent experts and the merging baselines side by side (a few minutes on 2 CPU cores)
    accelerate launch recipes/mtil.py --list_strategies true
        # every registered strategy with its options
    accelerate launch recipes/mtil.py --checkpoint path/to/clip --order II \\
        --strategy zeroshot sequential independent task_arithmetic ties magmax wise emr opcm
        # MTIL-mini Order II over ../shared/data
    accelerate launch recipes/mtil.py --benchmark mtil --checkpoint openai/clip-vit-base-patch16 --order I \\
        --strategy pam merge_only sequential_lora --finetune lora --lora_r 32 --lora_alpha 32 \\
        --lora_use_rslora false --lora_target_modules q_proj k_proj v_proj out_proj fc1 fc2 --learning_rate 1e-4 \\
        --strategy_options '{"pam": {"top_p": 0.5, "align_every": 10}}' --output_dir outputs/mtil-pam
        # the real MTIL Order I (ZSCL's 11 datasets from hf_cft/data/resources/mtil.json; needs the Hub)

Multi-process (``ACCELERATE_USE_CPU=1 accelerate launch --config_file hf_cft/accelerate_configs/cpu_2proc.yaml
recipes/mtil.py --per_device_train_batch_size 16`` on 2 CPU processes): ``per_device_train_batch_size`` is per
process (the Trainer's rule), so give B/N to train every task on the 1-process global batches; the accuracy
matrices and losses then equal the 1-process run up to float rounding (tests/test_distributed_parity.py). Only the
main process writes (checkpoints, expert deltas, cards, results); evaluation is replicated on every process.

``--strategy_options`` is a JSON object ``{strategy: {option: value}}`` (in a YAML config, a mapping); a strategy's
options are its factory's keyword arguments (``hf_cft.continual.strategy_options(name)``), e.g. ``lam`` of
``task_arithmetic``, ``k`` of ``ties``, ``top_p``/``align_every`` of ``pam``, ``top_k``/``task_agnostic`` of
``condu``. Every strategy runs into ``output_dir/<name>`` and resumes after its last finished task when the command
is re-run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from hf_cft.continual import STRATEGIES, ContinualConfig, strategy_options
from hf_cft.recipe_utils import (
    CONTINUAL_DEMO_DEFAULTS,
    ContinualStreamArguments,
    build_strategies,
    load_sibling_recipe,
    parse_recipe_args,
    run_continual_recipe,
    user_errors,
)

RECIPE_DEFAULTS = {**CONTINUAL_DEMO_DEFAULTS, "output_dir": "outputs/mtil"}


@dataclass
class MTILRecipeArguments(ContinualStreamArguments):
    strategy: list[str] = field(
        default_factory=lambda: ["zeroshot", "sequential", "independent", "task_arithmetic", "ties", "magmax", "emr"],
        metadata={"help": f"Strategies to run, each into output_dir/<name>: {', '.join(STRATEGIES)}."},
    )
    strategy_options: str | None = field(
        default=None, metadata={"help": 'JSON {strategy: {option: value}}, e.g. \'{"ties": {"k": 0.1}}\'.'}
    )
    list_strategies: bool = field(default=False, metadata={"help": "Print the registered strategies and exit."})
    output_dir: str = field(default="outputs/mtil", metadata={"help": "Output folder."})


def demo_clip(steps: int):
    """The digits demo CLIP of recipes/mergetune.py (same settings, same cache)."""
    return load_sibling_recipe(__file__, "mergetune").demo_clip(steps)


def parse_strategy_options(value) -> dict[str, dict]:
    """``--strategy_options`` (a JSON string, or a mapping from a YAML config) as ``{strategy: {option: value}}``."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--strategy_options is not valid JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise SystemExit("--strategy_options must map strategy names to objects of options")
    unknown = sorted(set(value) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"--strategy_options: unknown strategy name(s) {unknown}; known: {sorted(STRATEGIES)}")
    return value


def strategy_table() -> str:
    lines = []
    for name in STRATEGIES:
        options = strategy_options(name)
        lines.append(f"{name}: " + (", ".join(sorted(options)) if options else "(no options)"))
    return "\n".join(lines)


def main(args: MTILRecipeArguments, config: ContinualConfig) -> dict | None:
    if args.list_strategies:
        print(strategy_table())
        return None
    options = parse_strategy_options(args.strategy_options)
    strategies = build_strategies(args.strategy, lambda name: options.get(name, {}))
    return run_continual_recipe(args, config, strategies, demo_model=demo_clip, title="Continual learning")


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)
    recipe_args, continual_config = parse_recipe_args(MTILRecipeArguments, ContinualConfig, defaults=RECIPE_DEFAULTS)
    with user_errors():
        main(recipe_args, continual_config)
