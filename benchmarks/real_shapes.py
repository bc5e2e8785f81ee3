"""Every recipe on random-weight checkpoints with the exact shapes of real CLIP-like models, for a handful of steps
on the CPU: shape, sequence-length and memory assumptions exercised on real sizes, with wall time and peak memory.

    python benchmarks/real_shapes.py                         # both shapes, every recipe -> results/real_shapes.*
    python benchmarks/real_shapes.py --shapes clip-vit-b16 --runs coop zeroshot

Shapes (configs written in code, no download):

- ``clip-vit-b16``: ``openai/clip-vit-base-patch16`` — vision 768 wide, 12 layers, patch 16 at 224 px; text 512
  wide, 12 layers, 77 positions, the real 49,408-token CLIP tokenizer rebuilt offline from
  ``../shared/data/assets/bpe_simple_vocab_16e6.txt.gz``; projection 512 (149.6M parameters).
- ``siglip-base``: ``google/siglip-base-patch16-224`` — 768 wide, 12 + 12 layers, patch 16 at 224 px, 64 text
  positions, a 32,000-row token embedding (203.2M parameters). The real SigLIP tokenizer is a SentencePiece model
  that cannot be rebuilt offline, so its checkpoint carries a byte-level BPE tokenizer in CLIP's layout learned on
  the benchmark datasets' prompts (:func:`hf_cft.models.tokenizer.train_clip_tokenizer`, at most 4,096 tokens, all
  ids inside the 32,000 rows; padded to the 64 positions as SigLIP is). Every weight has the real shape; only the
  ids the prompts use differ.

Each checkpoint is saved once (safetensors, with its tokenizer and image processor) under
``$HF_CFT_CACHE/real-shapes/<shape>`` (default ``~/.cache/hf_cft``), with a tiny copy of two ../shared/data sets
(``oxford_pets3``, ``hymenoptera``: a few training images per class, a few test images, two templates) beside it.
Every run is one recipe started as its own process (``python recipes/<recipe>.py ...``, one process, CPU) with
2 optimiser steps per training phase at batch 2 and one intra-op thread; its wall time and peak resident memory
(``ru_maxrss`` of the recipe's process, from ``os.wait4`` in a small launcher) are recorded. A recipe that refuses the model with a typed hf_cft error (exit 2,
``error: <Type>: ...``) is recorded as a refusal with its message; any other failure as a failure with its last
line. Results are rewritten after every run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repository's package first
    sys.path.insert(0, str(REPO))

from hf_cft.utils import atomic_write_bytes, atomic_write_json, hf_cft_cache_dir, staged_folder  # noqa: E402

SHAPES = {
    "clip-vit-b16": "openai/clip-vit-base-patch16",
    "siglip-base": "google/siglip-base-patch16-224",
}
DATASETS = {"oxford_pets3": 6, "hymenoptera": 6}  # training images kept per class
TEST_IMAGES = 3
TEMPLATES = 2
STEPS = 2
BATCH = 2
THREADS = 1  # intra-op threads of each run: on a shared 2-core machine one thread ran a ViT-B/16 forward 2x faster
SIGLIP_VOCAB = 4096  # the learned stand-in tokenizer's size (fewer when the prompts run out of pairs to merge)


def cache_root() -> Path:
    return hf_cft_cache_dir("real-shapes")


def checkpoint_dir(shape: str) -> Path:
    return cache_root() / shape


def data_dir() -> Path:
    return cache_root() / "data"


def shared_data_dir() -> Path:
    from hf_cft.data.loading import default_data_dir

    root = default_data_dir()
    if root is None or not (root / "assets" / "bpe_simple_vocab_16e6.txt.gz").is_file():
        raise SystemExit("../shared/data (or $HF_CFT_DATA_DIR) with assets/bpe_simple_vocab_16e6.txt.gz is needed")
    return root


# ----------------------------------------------------------------------------------------------------- data


def build_data(source: Path, target: Path) -> Path:
    """A tiny copy of each of :data:`DATASETS`: the first N training images of every class, the first
    :data:`TEST_IMAGES` test images (the splits are stored shuffled) and the first :data:`TEMPLATES` templates."""
    import numpy as np

    from hf_cft.data import load_classification_dataset
    from hf_cft.data.sampling import labels_of

    for name, per_class in DATASETS.items():
        out = target / name
        if (out / "meta.json").is_file():
            continue
        ds = load_classification_dataset(name, data_dir=source)
        labels = labels_of(ds["train"])
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))
        meta = json.loads((source / name / "meta.json").read_text())
        meta["templates"] = meta["templates"][:TEMPLATES]
        meta["notes"] = (
            f"real-shapes benchmark subset: {per_class} training images per class, the first {TEST_IMAGES} test "
            f"images, the first {TEMPLATES} templates. " + str(meta.get("notes", ""))
        )
        with staged_folder(out) as tmp:
            ds["train"].select(keep).to_parquet(str(tmp / "train.parquet"))
            ds["test"].select(range(TEST_IMAGES)).to_parquet(str(tmp / "test.parquet"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return target


def dataset_prompts(folder: Path) -> list[str]:
    from hf_cft.data import format_prompts, load_classification_dataset

    prompts = []
    for name in DATASETS:
        ds = load_classification_dataset(name, data_dir=folder)
        prompts += format_prompts(ds.classnames, ds.templates)
    return prompts


# ------------------------------------------------------------------------------------------------ checkpoints


def build_checkpoint(shape: str, shared: Path) -> Path:
    """Save the random-weight checkpoint of ``shape`` once (seed 0) with its tokenizer and image processor."""
    import torch

    out = checkpoint_dir(shape)
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    if shape == "clip-vit-b16":
        from transformers import CLIPModel

        from hf_cft.models.tokenizer import build_clip_tokenizer
        from hf_cft.testing import clip_vit_b16_config

        try:
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:  # transformers without the PIL backends
            from transformers import CLIPImageProcessor as Processor

        tokenizer = build_clip_tokenizer(shared / "assets" / "bpe_simple_vocab_16e6.txt.gz")
        config = clip_vit_b16_config()
        config.text_config.pad_token_id = tokenizer.pad_token_id
        model = CLIPModel(config)
        processor = Processor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    elif shape == "siglip-base":
        from transformers import SiglipModel

        from hf_cft.models.tokenizer import train_clip_tokenizer
        from hf_cft.testing import siglip_base_config

        try:
            from transformers import SiglipImageProcessorPil as Processor
        except ImportError:
            from transformers import SiglipImageProcessor as Processor

        tokenizer = train_clip_tokenizer(dataset_prompts(data_dir()), vocab_size=SIGLIP_VOCAB, model_max_length=64)
        model = SiglipModel(
            siglip_base_config(
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        processor = Processor(size={"height": 224, "width": 224})
    else:
        raise SystemExit(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    with staged_folder(out) as tmp:
        model.save_pretrained(str(tmp))  # safetensors
        tokenizer.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return out


# ------------------------------------------------------------------------------------------------------ runs


def run_specs(model: Path, data: Path, out: Path) -> dict[str, list[str]]:
    """Recipe command lines (after ``python``) per run name; every training phase takes :data:`STEPS` steps."""
    common_train = ["--per_device_train_batch_size", str(BATCH), "--logging_steps", "1", "--seed", "1"]
    few_shot = ["--model_name_or_path", str(model), "--dataset", "oxford_pets3", "--data_dir", str(data)]
    few_shot += ["--shots", "2", "--eval_batch_size", "8", *common_train]
    continual = ["--checkpoint", str(model), "--datasets", "hymenoptera", "oxford_pets3", "--data_dir", str(data)]
    continual += ["--shots", "2", "--max_steps", str(STEPS), "--warmup_steps", "0", "--eval_batch_size", "8"]
    continual += common_train
    mergetune = ["recipes/mergetune.py", *few_shot, "--coop_epochs", "1", "--max_steps", str(STEPS)]
    # in order of priority (a run cut short by time keeps the first ones for every shape)
    specs = {
        "zeroshot": ["recipes/zeroshot.py", "--model_name_or_path", str(model), "--datasets", "oxford_pets3"]
        + ["hymenoptera", "--data_dir", str(data), "--batch_size", "8"],
        "coop": ["recipes/coop.py", *few_shot, "--max_steps", str(STEPS)],
        # CoOp before MergeTune: 2 shots x 2 base classes at batch 2 = 2 steps per epoch
        "mergetune (coop)": [*mergetune, "--base_method", "coop"],
        "condu (full FT)": ["recipes/condu.py", *continual, "--strategy", "condu"],
        "pam (LoRA)": ["recipes/pam.py", *continual, "--strategy", "pam"],
        "mergetune (vpt)": [*mergetune, "--base_method", "vpt"],
        "mtil (task_arithmetic)": ["recipes/mtil.py", *continual, "--strategy", "task_arithmetic"],
        "mergetune (kgcoop)": [*mergetune, "--base_method", "kgcoop"],
        "condu (LoRA)": ["recipes/condu.py", *continual, "--strategy", "condu", "--finetune", "lora"],
    }
    for name, argv in specs.items():
        argv += ["--output_dir", str(out / _slug(name))]
    return specs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


# The recipe runs as the child of a small launcher that reports the child's peak RSS: Linux carries the RSS
# high-water mark of the process that forks across fork + exec, so a child forked from this (large) process would
# report at least this process's RSS.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(f"__real_shapes_peak_rss_kib__ {usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""
_PEAK = "__real_shapes_peak_rss_kib__ "


def run_one(argv: list[str], log: Path) -> dict:
    """Run ``python argv`` from the repository root; wall time, peak RSS of that process, and how it ended."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["OMP_NUM_THREADS"] = str(THREADS)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(
            [sys.executable, "-c", _LAUNCHER, *argv], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    seconds = time.perf_counter() - t0
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    peaks = [int(ln[len(_PEAK) :]) for ln in lines if ln.startswith(_PEAK)]
    lines = [ln for ln in lines if not ln.startswith(_PEAK)]
    row = {"seconds": round(seconds, 1), "peak_rss_mib": round(peaks[-1] / 1024, 1) if peaks else None, "exit": code}
    if code == 0:
        row["status"] = "ok"
    else:
        errors = [ln for ln in lines if ln.startswith("error: ")]
        row["status"] = "refused" if code == 2 and errors else "failed"
        row["message"] = (errors[-1] if errors else (lines[-1] if lines else ""))[:400]
    return row


def write_results(result: dict, out: Path) -> None:
    atomic_write_json(out / "real_shapes.json", result)
    shapes = list(result["shapes"])
    runs = list(dict.fromkeys(r for s in shapes for r in result["rows"].get(s, {})))
    lines = [
        "# Every recipe on real-size random-weight checkpoints (CPU)",
        "",
        f"{result['machine']} · torch {result['versions']['torch']} · transformers "
        f"{result['versions']['transformers']} · {result['date']}. Each cell: one recipe process, {STEPS} optimiser "
        f"steps per training phase at batch {BATCH}, {THREADS} intra-op thread, tiny data (benchmarks/real_shapes.py); wall time (s) / peak "
        "resident memory (GiB, the process's ru_maxrss). Times include loading the checkpoint, every evaluation "
        "and every save, on a shared machine: they show scale, not a speed to compare.",
        "",
        "| recipe | " + " | ".join(f"{s} ({result['shapes'][s]['parameters'] / 1e6:.1f}M)" for s in shapes) + " |",
        "|---|" + "---|" * len(shapes),
    ]
    notes = []
    for run in runs:
        cells = []
        for s in shapes:
            r = result["rows"].get(s, {}).get(run)
            if r is None:
                cells.append("not run")
                continue
            peak = r["peak_rss_mib"]
            cell = f"{r['seconds']:.0f} s / " + (f"{peak / 1024:.2f} GiB" if peak is not None else "? GiB")
            if r["status"] != "ok":
                notes.append(f"- {run} on {s}: **{r['status']}** — `{r['message']}`")
                cell = f"{r['status']} ({cell})"
            cells.append(cell)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", *(notes or ["Every run finished (exit 0)."]), ""]
    for s, info in result["shapes"].items():
        lines.append(f"- `{s}`: shapes of `{info['reference']}`; {info['tokenizer']}")
    atomic_write_bytes(out / "real_shapes.md", ("\n".join(lines) + "\n").encode())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--runs", nargs="+", default=None, help="run names or recipe names (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--keep_outputs", action="store_true", help="keep every run's output folder")
    args = parser.parse_args(argv)

    import torch
    import transformers

    shared = shared_data_dir()
    data = build_data(shared, data_dir())
    out = Path(args.out)
    result_path = out / "real_shapes.json"
    previous = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores (shared), no accelerator",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {
            "steps": STEPS,
            "batch": BATCH,
            "threads": THREADS,
            "train_images_per_class": DATASETS,
            "test_images": TEST_IMAGES,
        },
        "shapes": previous.get("shapes", {}),
        "rows": {
            s: r
            for s, r in previous.get("rows", {}).items()
            if previous.get("settings", {}).get("test_images") == TEST_IMAGES
        },
    }
    models, plans = {}, {}
    for shape in args.shapes:
        t0 = time.perf_counter()
        models[shape] = model_dir = build_checkpoint(shape, shared)
        config = json.loads((model_dir / "config.json").read_text())
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safe_open handle)
        result["shapes"][shape] = {
            "reference": SHAPES[shape],
            "parameters": n_params,
            "model_type": config["model_type"],
            "tokenizer": (
                "the real CLIP tokenizer (49,408 tokens), rebuilt offline from OpenAI's BPE merge list"
                if shape.startswith("clip")
                else "a stand-in byte-level BPE learned offline on the datasets' prompts (SigLIP's SentencePiece "
                "model cannot be rebuilt offline), padded to 64 positions"
            ),
            "checkpoint_build_seconds": round(time.perf_counter() - t0, 1),
        }
        plans[shape] = run_specs(model_dir, data, cache_root() / "runs" / shape)
    for name in plans[args.shapes[0]]:  # recipe by recipe, every shape in turn
        for shape in args.shapes:
            cmd, runs_dir = plans[shape][name], cache_root() / "runs" / shape
            recipe = Path(cmd[0]).stem
            if args.runs and name not in args.runs and recipe not in args.runs:
                continue
            print(f"[{shape}] {name} ...", flush=True)
            row = run_one(cmd, runs_dir / f"{_slug(name)}.log")
            row["command"] = "python " + " ".join(
                str(a)
                .replace(str(models[shape]), f"<{shape}>")
                .replace(str(data), "<data>")
                .replace(str(runs_dir), "<out>")
                for a in cmd
            )
            print(f"    {row['status']}: {row['seconds']} s, peak {row['peak_rss_mib']} MiB", flush=True)
            result["rows"].setdefault(shape, {})[name] = row
            write_results(result, out)
            if not args.keep_outputs:
                shutil.rmtree(runs_dir / _slug(name), ignore_errors=True)
    write_results(result, out)
    return result


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    main()
