# /// script
# requires-python = ">=3.10"
# dependencies = ["hf-cft[vision,demo]"]
# ///
"""CoOp soft-prompt learning for a CLIP-like model, with base-to-novel evaluation.

Launch (from the repository root; CPU is fine for the defaults):

    accelerate launch recipes/coop.py
        # offline default: scikit-learn's digits, a tiny *random* CLIP, 16 shots of the 5 base classes
    accelerate launch recipes/coop.py --config recipes/configs/coop.yaml
        # CoOp on ../shared/data/dtd10 (set model_name_or_path to a pretrained CLIP folder for real numbers)
    accelerate launch recipes/coop.py --model_name_or_path openai/clip-vit-base-patch16 --dataset mtil/dtd \\
        --shots 16 --base_to_novel true --output_dir outputs/coop-dtd
    accelerate launch recipes/coop.py --kg_weight 8
        # KgCoOp: CoOp + 8·(1 − mean cos) to the first template's zero-shot class features (kg_templates)
    accelerate launch recipes/coop.py --optim_args momentum=0.9 --weight_decay 5e-4 --constant_warmup_epochs 1
        # CoOp's official (Dassl) optimiser: SGD momentum 0.9, wd 5e-4, one constant warm-up epoch at 1e-5, cosine

Multi-process (``accelerate launch --num_processes N``, e.g. ``ACCELERATE_USE_CPU=1 accelerate launch --config_file
hf_cft/accelerate_configs/cpu_2proc.yaml recipes/coop.py --per_device_train_batch_size 16``):
``per_device_train_batch_size`` is per process (the Trainer's rule), so give B/N to train on the same global batches
as one process with B; the results then equal the 1-process run up to float rounding (a partial last batch
included: the trainer drops the samples accelerate repeats to fill it). Evaluation is replicated on every process;
only the main process writes.

Writes to ``output_dir``: the adapter (``adapter/``, loadable with ``PeftModel.from_pretrained`` after
``import hf_cft``), its tokenizer, ``README.md`` (model card with evaluation results) and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model

from hf_cft import CoOpConfig
from hf_cft.data import ImageTransform, apply_image_transform, format_prompts
from hf_cft.hub import adapter_card
from hf_cft.metrics import harmonic_mean
from hf_cft.models import FeatureCache, evaluate_zeroshot
from hf_cft.recipe_utils import base_novel_task, demo_clip, load_clip, load_task, parse_recipe_args, user_errors
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments
from hf_cft.utils import atomic_write_json


@dataclass
class CoOpRecipeArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP folder or Hub id (default: demo)."})
    dataset: str = field(default="digits", metadata={"help": "Dataset name, folder or Hub id ('digits': offline)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local datasets (default ../shared/data)."})
    shots: int = field(default=16, metadata={"help": "Training images per class (0 = all)."})
    base_to_novel: bool = field(default=True, metadata={"help": "Train on base classes, test base and novel."})
    downstream_pool: bool = field(
        default=False, metadata={"help": "Sample shots from the 30%% downstream pool (benchmarks.md) of train."}
    )
    n_ctx: int | None = field(default=None, metadata={"help": "Context vectors (default 16, or len(ctx_init))."})
    ctx_init: str | None = field(default="a photo of a", metadata={"help": "Context initialisation text."})
    class_specific: bool = field(default=False, metadata={"help": "Class-specific contexts (CSC)."})
    class_token_position: str = field(default="end", metadata={"help": "end, middle or front."})
    eval_batch_size: int = field(default=256, metadata={"help": "Images per batch in evaluation."})


def main(args: CoOpRecipeArguments, targs: ClipTrainingArguments) -> dict:
    task = load_task(args.dataset, args.data_dir)
    train, splits, names = base_novel_task(task, args.shots, targs.seed, args.base_to_novel, args.downstream_pool)
    splits["train"] = (splits["base"][0], train)  # the training shots themselves (train accuracy)
    names["train"] = names["base"]
    if args.model_name_or_path is None:
        prompts = format_prompts(task.classnames, task.templates) + [f"X {c}." for c in task.classnames]
        model, tokenizer = demo_clip(prompts, image_size=16 if args.dataset == "digits" else 32, seed=targs.seed)
        transform, model_desc = ImageTransform.from_model(model), "tiny random CLIP (untrained, offline demo)"
    else:
        model, tokenizer, transform = load_clip(args.model_name_or_path)
        model_desc = args.model_name_or_path

    cache = FeatureCache()

    def accuracy(m, split, head=None) -> float:  # image features are cached across models and calls
        ds = splits[split][1]
        return evaluate_zeroshot(
            m,
            tokenizer,
            ds,
            names[split],
            task.templates,
            args.eval_batch_size,
            transform,
            cache=cache,
            head=head,
            name=f"{task.name}/{split}",
        ).accuracy

    results = {"zero-shot": {s: accuracy(model, s) for s in splits}, "CoOp": {}}

    config = CoOpConfig(
        n_ctx=args.n_ctx,
        ctx_init=args.ctx_init,
        class_specific=args.class_specific,
        class_token_position=args.class_token_position,
        classnames=names["base"],
        base_model_name_or_path=args.model_name_or_path,
    ).set_tokenizer(tokenizer)
    peft_model = get_peft_model(model, config)
    train_tf = dataclasses.replace(transform, train=True, seed=targs.seed)
    trainer = ClipClassificationTrainer(
        peft_model,
        targs,
        names["base"],
        task.templates,
        tokenizer,
        train_dataset=apply_image_transform(train, train_tf, name=task.name),
    )
    trainer.train()

    peft_model.eval()
    for split in splits:
        with torch.no_grad():
            shared_ok = not args.class_specific or split != "novel"
            head = peft_model.class_text_features(tokenizer, names[split]) if shared_ok else None
        if head is None:
            continue  # class-specific contexts do not exist for novel classes
        results["CoOp"][split] = accuracy(peft_model, split, head)
    for row in results.values():
        if "base" in row and "novel" in row:
            row["hm"] = harmonic_mean(row["base"], row["novel"])

    out = Path(targs.output_dir)
    result = {
        "model": model_desc,
        "dataset": task.name,
        "shots": args.shots,
        "train_images": len(train),
        "results": results,
        "train_loss_first_last": _first_last_loss(trainer),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    trainer.save_model(str(out / "adapter"))  # on every process (collective under FSDP/DeepSpeed); main writes
    if trainer.is_world_process_zero():
        rows = [
            {"name": s, "num_classes": len(names[s]), "accuracy": a, "split": "train" if s == "train" else "test"}
            for s, a in results["CoOp"].items()
            if s != "hm"
        ]
        card = adapter_card(
            peft_model,
            model_name=f"{'kgcoop' if targs.kg_weight else 'coop'}-{task.name}",
            dataset_name=task.name,
            dataset_terms=task.meta.get("license_note"),
            results=rows,
            hm=results["CoOp"].get("hm"),
            results_note=f"Zero-shot before CoOp: {_fmt(results['zero-shot'])}. Base model: {model_desc}.",
            hyperparameters={
                "shots per class": args.shots,
                "n_ctx": peft_model.peft_config["default"].n_ctx,
                "ctx_init": args.ctx_init,
                "class-specific": args.class_specific,
                "learning rate": targs.learning_rate,
                **({"KgCoOp weight (kg_weight)": targs.kg_weight} if targs.kg_weight else {}),
                "epochs": targs.num_train_epochs,
                "batch size": targs.per_device_train_batch_size,
                "seed": targs.seed,
            },
            training_data=f"{args.shots or 'all'} images per base class of {task.name} (train split).",
        )
        card.save(str(out / "adapter" / "README.md"))
        atomic_write_json(out / "results.json", result)
        print(f"\nCoOp on {task.name} ({model_desc}), {len(train)} training images\n")
        print("| model | " + " | ".join(results["zero-shot"]) + " |")
        print("|---|" + "---|" * len(results["zero-shot"]))
        for name, row in results.items():
            print(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.2f}" for k in results["zero-shot"]) + " |")
        print(f"\nadapter, card and results in {out}")
    return result


def _fmt(row: dict) -> str:
    return ", ".join(f"{k} {v:.2f}%" for k, v in row.items())


def _first_last_loss(trainer) -> list[float]:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return [losses[0], losses[-1]] if losses else []


if __name__ == "__main__":
    defaults = {
        "output_dir": "outputs/coop",
        "optim": "sgd",
        "learning_rate": 0.002,
        "lr_scheduler_type": "cosine",
        "num_train_epochs": 50,
        "per_device_train_batch_size": 32,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 1,
    }
    recipe_args, training_args = parse_recipe_args(CoOpRecipeArguments, ClipTrainingArguments, defaults=defaults)
    with user_errors():
        main(recipe_args, training_args)
