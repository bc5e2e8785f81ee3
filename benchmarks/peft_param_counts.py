"""Trainable-parameter counts of hf_cft's PEFT methods (and PEFT LoRA) on a ViT-B/16-shaped CLIPModel.

    python benchmarks/peft_param_counts.py            # writes benchmarks/results/peft_param_counts.{json,md}

The model is built from CLIP ViT-B/16's config on the meta device (no weights allocated, no download); counts
do not depend on the weights. CoOp needs the id of its placeholder token; 343 is "X" in CLIP's vocabulary.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import hf_cft
from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.testing import clip_vit_b16_config

N_CLASSES = 100  # for CSC and the head (e.g. a 100-class dataset)


def method_configs():
    return {
        "CoOp, 4 context vectors": CoOpConfig(n_ctx=4, placeholder_token_id=343),
        "CoOp, 16 context vectors": CoOpConfig(n_ctx=16, placeholder_token_id=343),
        f"CoOp CSC, 16 vectors x {N_CLASSES} classes": CoOpConfig(
            n_ctx=16, class_specific=True, classnames=[f"c{i}" for i in range(N_CLASSES)], placeholder_token_id=343
        ),
        "VPT shallow, 8 tokens": VPTConfig(n_tokens=8),
        "VPT deep, 8 tokens per layer": VPTConfig(n_tokens=8, deep=True),
        f"Linear head, {N_CLASSES} classes (+bias)": LinearHeadConfig(num_classes=N_CLASSES, init="zeros"),
        "LoRA r=64 on MLP fc1/fc2, both towers (ConDU)": LoraConfig(
            r=64, lora_alpha=1, use_rslora=True, target_modules=["fc1", "fc2"]
        ),
    }


def count(config) -> tuple[int, int]:
    from transformers import CLIPModel

    with torch.device("meta"):
        model = get_peft_model(CLIPModel(clip_vit_b16_config()), config)
    return model.get_nb_trainable_parameters()


def main(out_dir: str = "benchmarks/results") -> dict:
    rows = {}
    for name, cfg in method_configs().items():
        trainable, total = count(cfg)
        rows[name] = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}
    result = {
        "model": "CLIPModel with CLIP ViT-B/16's config, random weights (meta device)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"hf_cft": hf_cft.__version__, "torch": torch.__version__, "peft": __import__("peft").__version__},
        "machine": platform.platform(),
        "rows": rows,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peft_param_counts.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Trainable parameters on {result['model']}",
        "",
        "| method | trainable | % of model |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['trainable']:,} | {v['percent']:.4f} |" for k, v in rows.items()]
    (out / "peft_param_counts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="benchmarks/results", help="folder for the .json and .md tables")
    main(parser.parse_args().out_dir)
