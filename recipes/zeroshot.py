# /// script
# requires-python = ">=3.10"
# dependencies = ["hf-cft[vision,demo]"]
# ///
"""Zero-shot evaluation of a CLIP-like model on image-classification datasets.

Launch (from the repository root; hardware: any, CPU is fine):

    accelerate launch recipes/zeroshot.py
        # offline default: scikit-learn's digits and a tiny *random* CLIP (chance-level accuracy; it shows the
        # whole path: loader -> transform -> text head -> image features -> accuracy)
    accelerate launch recipes/zeroshot.py --model_name_or_path openai/clip-vit-base-patch16 \\
        --datasets dtd10 cifar10 --data_dir ../shared/data
    accelerate launch recipes/zeroshot.py --config recipes/configs/zeroshot.yaml

Writes ``<output_dir>/zeroshot_results.json`` and prints a Markdown table. Under ``accelerate launch`` the images
are sharded over the processes and their features gathered with ``gather_for_metrics`` (no padded image counted
twice): the same numbers as one process; only the main process writes.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from hf_cft.data import format_prompts
from hf_cft.metrics import accuracy
from hf_cft.models import FeatureCache, evaluate_zeroshot
from hf_cft.recipe_utils import demo_clip, load_clip, load_task, parse_recipe_args, user_errors
from hf_cft.utils import atomic_write_json


@dataclass
class ZeroShotArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id. Default: a tiny random CLIP (offline demo)."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer, if not in the model."})
    datasets: list[str] = field(
        default_factory=lambda: ["digits"],
        metadata={"help": "Dataset names, folders or Hub ids ('digits' = scikit-learn's digits, offline)."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local datasets (default ../shared/data)."})
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    templates: list[str] | None = field(default=None, metadata={"help": "Override the datasets' templates."})
    batch_size: int = field(default=64, metadata={"help": "Images per batch (per process)."})
    output_dir: str = field(default="outputs/zeroshot", metadata={"help": "Where results are written."})
    seed: int = field(default=0, metadata={"help": "Seed of the random demo model."})


def main(args: ZeroShotArguments) -> dict:
    accelerator = Accelerator()
    datasets_ = {name: load_task(name, args.data_dir) for name in args.datasets}
    if args.model_name_or_path is None:
        prompts = [p for d in datasets_.values() for p in format_prompts(d.classnames, args.templates or d.templates)]
        image_size = 16 if list(datasets_) == ["digits"] else 32
        model, tokenizer = demo_clip(prompts, image_size=image_size, seed=args.seed)
        transform = None
        model_desc = f"tiny random CLIP ({sum(p.numel() for p in model.parameters()):,} parameters, untrained)"
    else:
        model, tokenizer, transform = load_clip(args.model_name_or_path, args.tokenizer_name_or_path)
        model_desc = args.model_name_or_path
    model.to(accelerator.device)
    cache = FeatureCache()
    rows = {}
    for name, ds in datasets_.items():
        t0 = time.perf_counter()
        res = evaluate_zeroshot(
            model,
            tokenizer,
            ds[args.split],
            ds.classnames,
            args.templates or ds.templates,
            batch_size=args.batch_size,
            transform=transform,
            cache=cache,
            name=name,
            accelerator=accelerator,
        )
        chance = 100.0 / ds.num_classes
        rows[name] = {
            **res.to_dict(),
            "chance": chance,
            "num_classes": ds.num_classes,
            "num_templates": len(args.templates or ds.templates),
            "seconds": time.perf_counter() - t0,
        }
        assert abs(accuracy(res.predictions, res.labels) - res.accuracy) < 1e-9
    result = {
        "model": model_desc,
        "split": args.split,
        "results": rows,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "processes": accelerator.num_processes,
        },
    }
    if accelerator.is_main_process:
        atomic_write_json(f"{args.output_dir}/zeroshot_results.json", result)
        print(f"\nZero-shot accuracy of {model_desc} ({args.split} split)\n")
        print("| dataset | classes | templates | images | accuracy (%) | chance (%) |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(
                f"| {name} | {r['num_classes']} | {r['num_templates']} | {r['total']} | {r['accuracy']:.2f} | {r['chance']:.2f} |"
            )
        print(f"\nresults: {args.output_dir}/zeroshot_results.json")
    return result


if __name__ == "__main__":
    (zs_args,) = parse_recipe_args(ZeroShotArguments)
    with user_errors():
        main(zs_args)
