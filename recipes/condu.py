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

MTIL-mini: each task trains on the downstream pool of its dataset (the 30% of every class's training images left
after ``split_per_class(train, 0.7, seed=0)``, never seen in pretraining; ``--shots 5`` for the few-shot variant)
and every task's test split is evaluated after each task with the template ensemble of its own classes. Experts
train from θ⁰ (full fine-tuning or LoRA per ``--finetune``), except in sequential fine-tuning. ConDU evaluates a
learned task with its rebuilt expert and a task not learned yet by semantic routing (``--task_agnostic true``:
routing everywhere).

Writes to ``output_dir``: ``<strategy>/`` (``accuracy_matrix.{json,md,png}``, ``README.md`` model card, the resumable
``checkpoint/`` and ``store/``) and ``results.{json,md}`` comparing the strategies. Re-running the same command
resumes an interrupted run after its last finished task, with identical results.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_cft.continual import (
    STRATEGIES,
    ContinualConfig,
    ContinualRunner,
    class_split_tasks,
    continual_card,
    make_strategy,
    mtil_mini_tasks,
)
from hf_cft.metrics import round1
from hf_cft.recipe_utils import load_clip, load_task, parse_recipe_args
from hf_cft.utils import atomic_write_bytes, atomic_write_json

DEMO_GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
# What `accelerate launch recipes/condu.py` uses with no arguments: the digits demo's training budget.
RECIPE_DEFAULTS = {
    "output_dir": "outputs/condu",
    "max_steps": 60,
    "learning_rate": 5e-4,
    "per_device_train_batch_size": 32,
    "warmup_steps": 6,
    "eval_batch_size": 256,
    "logging_steps": 20,
    "lora_r": 8,
    "seed": 42,
}
DESCRIPTIONS = {
    "zeroshot": "the pretrained model θ⁰, never trained (the zero-shot row).",
    "sequential": "continual fine-tuning: each task trains from the model left by the previous one.",
    "independent": "one expert per task trained from θ⁰; the task's own expert answers once learned, θ⁰ before "
    "(upper bound with task id).",
    "condu": "ConDU: experts trained from θ⁰ are decoupled and re-unified into one delta with a mask and rescaler "
    "per task after each task (DeltaFusionMerger); learned tasks use their rebuilt expert, others semantic routing "
    "over θ⁰ and the top-K experts.",
}

FILES = {
    "zeroshot": "No weights beyond θ⁰.",
    "sequential": "`checkpoint/strategy.safetensors` holds the final model as a dense delta θ − θ⁰ (parameter names "
    "of θ⁰; add it to θ⁰).",
    "independent": "`store/experts/<task position>.safetensors` holds one dense expert delta θ − θ⁰ per task.",
    "condu": "`checkpoint/merger/` is the ConDU bundle (unified delta, bit-packed masks, rescalers, prototypes): "
    "`hf_cft.merging.DeltaFusionMerger.from_pretrained(...)` rebuilds every expert and "
    "`hf_cft.merging.SemanticRouter` routes among them.",
}


@dataclass
class ConDURecipeArguments:
    checkpoint: str | None = field(
        default=None, metadata={"help": "Pretrained CLIP folder or Hub id (default: the cached digits demo CLIP)."}
    )
    benchmark: str = field(
        default="auto",
        metadata={
            "help": "'digits' (demo), 'mtil_mini' (Protocol B), or 'auto': digits unless a checkpoint, "
            "datasets or a data_dir is given."
        },
    )
    order: str = field(default="I", metadata={"help": "MTIL-mini order: I or II."})
    datasets: list[str] | None = field(default=None, metadata={"help": "An explicit task stream (overrides order)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local datasets (default ../shared/data)."})
    shots: int = field(
        default=0, metadata={"help": "Images per class from the downstream pool (0: all; 5: few-shot)."}
    )
    max_test: int | None = field(
        default=None, metadata={"help": "Keep the first N test rows per dataset (quick runs)."}
    )
    strategy: list[str] = field(
        default_factory=lambda: ["zeroshot", "sequential", "independent", "condu"],
        metadata={"help": f"Strategies to run, each into output_dir/<name>: {', '.join(STRATEGIES)}."},
    )
    task_agnostic: bool = field(default=False, metadata={"help": "ConDU: route every dataset (no task id)."})
    top_k: int = field(default=4, metadata={"help": "ConDU: experts per sample in routing."})
    weighting: str = field(default="uniform", metadata={"help": "ConDU: uniform, similarity or softmax."})
    include_zero_shot: bool = field(default=True, metadata={"help": "ConDU: θ⁰ votes in routing."})
    rescaler: str = field(default="mean", metadata={"help": "ConDU: 'mean' (released) or 'global_sum'."})
    output_dir: str = field(default="outputs/condu", metadata={"help": "Output folder."})
    demo_pretrain_steps: int = field(default=200, metadata={"help": "Pretraining steps of the digits demo CLIP."})


def _demo_clip(steps: int) -> Path:
    """The digits demo CLIP of recipes/mergetune.py (same settings, same cache)."""
    spec = importlib.util.spec_from_file_location("recipe_mergetune", Path(__file__).with_name("mergetune.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.demo_clip(steps)


def _benchmark(args: ConDURecipeArguments) -> str:
    if args.benchmark == "auto":
        given = args.checkpoint or args.datasets or args.data_dir
        return "mtil_mini" if given else "digits"
    if args.benchmark not in ("digits", "mtil_mini"):
        raise SystemExit(f"--benchmark must be auto, digits or mtil_mini, got {args.benchmark!r}")
    return args.benchmark


def build_tasks(args: ConDURecipeArguments, benchmark: str):
    if benchmark == "digits":
        return class_split_tasks(load_task("digits"), DEMO_GROUPS), "scikit-learn digits (offline)"
    tasks = mtil_mini_tasks(
        args.datasets or args.order, args.data_dir, shots=args.shots, shot_seed=0, max_test=args.max_test
    )
    stream = "custom" if args.datasets else f"Order {args.order}"
    return tasks, f"MTIL-mini {stream}" + (f", {args.shots}-shot" if args.shots else "")


def strategy_kwargs(name: str, args: ConDURecipeArguments) -> dict:
    if name != "condu":
        return {}
    return dict(
        top_k=args.top_k,
        weighting=args.weighting,
        include_zero_shot=args.include_zero_shot,
        task_agnostic=args.task_agnostic,
        rescaler=args.rescaler,
    )


def main(args: ConDURecipeArguments, config: ContinualConfig) -> dict:
    from accelerate import PartialState

    state = PartialState()
    t_start = time.perf_counter()
    unknown = [s for s in args.strategy if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategy: unknown {unknown}; known: {list(STRATEGIES)}")
    benchmark = _benchmark(args)
    checkpoint = str(Path(args.checkpoint).expanduser()) if args.checkpoint else None
    model_path = checkpoint or str(_demo_clip(args.demo_pretrain_steps))
    model, tokenizer, transform = load_clip(model_path)
    n_params = sum(p.numel() for p in model.parameters())
    model_desc = args.checkpoint or (
        f"digits demo CLIP ({n_params:,} parameters, pretrained {args.demo_pretrain_steps} steps on scikit-learn's "
        "digits)"
    )
    device = torch.device("cpu") if config.use_cpu else state.device
    model.to(device)
    if benchmark == "digits" and device.type == "cpu":
        # The demo model's ops are tiny: intra-op threads only add synchronisation (on a shared 2-core machine
        # one thread trained the demo ~20x faster than two).
        torch.set_num_threads(1)
    tasks, stream = build_tasks(args, benchmark)
    finetune = "FT" if config.finetune == "full" else "LoRA"
    out = Path(args.output_dir)
    results: dict[str, dict] = {}
    for name in args.strategy:
        strategy = make_strategy(name, **strategy_kwargs(name, args))
        label = name + (f" ({finetune})" if name != "zeroshot" else "")
        if name == "condu" and args.task_agnostic:
            label += ", task-agnostic"
        t0 = time.perf_counter()
        result = ContinualRunner(
            strategy, tasks, model, tokenizer, out / name, config, transform=transform, title=f"{label} — {stream}"
        ).run()
        results[name] = {
            "label": label,
            "metrics": result.metrics,
            "matrix": result.matrix.values.tolist(),
            "seconds": time.perf_counter() - t0,
        }
        if state.is_main_process:
            card = continual_card(
                model_name=f"{name}-{benchmark}-{config.finetune}",
                strategy=name,
                base_model=model_desc,
                matrix=result.matrix,
                tasks=[t.describe() for t in tasks],
                hyperparameters={
                    "fine-tuning": config.finetune,
                    "steps per task": config.max_steps,
                    "learning rate": config.learning_rates or config.learning_rate,
                    "batch": config.per_device_train_batch_size,
                    "label smoothing": config.label_smoothing,
                    "seed": config.seed,
                    **({"LoRA rank": config.lora_r} if config.finetune == "lora" else {}),
                    **strategy.settings(),
                },
                description=DESCRIPTIONS[name],
                files_note=FILES[name],
                data_note=f"Stream: {stream}. The ../shared/data datasets are small re-encoded subsets, not the "
                "official datasets; numbers are not comparable with published MTIL results."
                if benchmark == "mtil_mini"
                else f"Stream: {stream}, classes {DEMO_GROUPS} as three tasks (a demo, not a benchmark).",
            )
            card.save(str(out / name / "README.md"))
    summary = {
        "benchmark": benchmark,
        "stream": stream,
        "tasks": [t.describe() for t in tasks],
        "model": model_desc,
        "config": config.to_dict(),
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(state.device)},
    }
    if state.is_main_process:
        atomic_write_json(out / "results.json", summary)
        table = _table(results, stream, model_desc)
        atomic_write_bytes(out / "results.md", table.encode("utf-8"))
        print("\n" + table)
        print(f"written to {out}: results.{{json,md}} and one folder per strategy; {summary['total_seconds']:.0f}s")
    return summary


def _table(results: dict, stream: str, model_desc: str) -> str:
    lines = [
        f"# Continual learning on {stream}",
        "",
        f"Model: {model_desc}.",
        "",
        "| strategy | Transfer | Average | Last | BWT | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.values():
        m = r["metrics"]
        cells = [f"{round1(m[k]):.1f}" if m[k] == m[k] else "–" for k in ("transfer", "average", "last", "bwt")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)
    recipe_args, continual_config = parse_recipe_args(ConDURecipeArguments, ContinualConfig, defaults=RECIPE_DEFAULTS)
    main(recipe_args, continual_config)
