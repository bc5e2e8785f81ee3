# /// script
# requires-python = ">=3.10"
# dependencies = ["hf-cft[vision,plots,demo]"]
# ///
"""MergeTune: continued fine-tuning of a CoOp adapter between the zero-shot model and CoOp, with base-to-novel
evaluation, the three LMC path plots and a model card.

Launch (from the repository root; CPU is fine for the defaults):

    accelerate launch recipes/mergetune.py
        # offline demo (≤ 3 min on 2 CPU cores): scikit-learn's digits and a tiny CLIP pretrained on first use (cached
        # in ~/.cache/hf_cft) on 70% of the training digits, degraded views with captions that describe them; then
        # zero-shot -> 16-shot CoOp on the 5 base digits (shots from the other 30%) -> MergeTune. These settings were
        # chosen on a validation split (benchmarks/demo_settings.py; --eval_split val), not on the test split.
    accelerate launch recipes/mergetune.py --config recipes/configs/mergetune.yaml
    accelerate launch recipes/mergetune.py --model_name_or_path openai/clip-vit-base-patch16 --dataset mtil/dtd \\
        --coop_epochs 50 --num_train_epochs 50 --learning_rate 0.002 --optim sgd --output_dir outputs/mt-dtd

Multi-process (``accelerate launch --num_processes N``, e.g. ``ACCELERATE_USE_CPU=1 accelerate launch --config_file
hf_cft/accelerate_configs/cpu_2proc.yaml recipes/mergetune.py --per_device_train_batch_size 16``): the batch size
is per process (the Trainer's rule), so give B/N to train on the same global batches as one process with B — the
CoOp step uses the same per-device size. The results then equal the 1-process run up to float rounding (a partial
last batch included: the trainer drops the samples accelerate repeats to fill it). Evaluation is replicated on every
process; only the main process writes.

Steps: (1) zero-shot evaluation; (2) CoOp on the base classes (or ``--finetuned DIR``, an existing adapter);
(3) MergeTune from the pair (λ = anchor_weight, β = path_weight, N = num_alphas, τ = tau); (4) base / novel / HM
table, ``paths.png`` (loss and accuracy along zero-shot→CoOp, zero-shot→MergeTune, CoOp→MergeTune),
``mergetune/`` (the continued adapter with its model card) and ``results.json`` in ``output_dir``.

Other base methods and the reference's settings:

    accelerate launch recipes/mergetune.py --base_method kgcoop --base_kg_weight 8   # KgCoOp, then MergeTune on it
    accelerate launch recipes/mergetune.py --base_method vpt --vpt_tokens 8     # VPT, then MergeTune on its prompts
    accelerate launch recipes/mergetune.py --preset official --num_train_epochs 50
        # the released code's recipe (MergeTuneConfig.OFFICIAL_PRESET: SGD momentum 0.9, wd 5e-4, lr 0.002, one
        # constant warm-up epoch at 1e-5 then a per-epoch cosine, λ 10, β 1, τ 1, raw path features, one template)
    accelerate launch recipes/mergetune.py --weight_ensemble 0.5   # deploy (1 − γ)·ŵ1 + γ·w (§9)

With ``--preset`` the recipe's own optimiser defaults step aside for the preset's; explicit flags still win.
VPT has no class-feature path, so its run writes no ``paths.png``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model

from hf_cft import CoOpConfig, VPTConfig
from hf_cft.data import apply_image_transform
from hf_cft.hub import adapter_card
from hf_cft.metrics import harmonic_mean
from hf_cft.models import FeatureCache, build_zeroshot_classifier, evaluate_zeroshot
from hf_cft.plots import interpolation_curves, plot_paths
from hf_cft.recipe_utils import base_novel_task, load_clip, load_task, parse_recipe_args, user_errors
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer
from hf_cft.utils import atomic_write_json, hf_cft_cache_dir

DEMO_CACHE = hf_cft_cache_dir("mergetune-demo-clip")
# What `accelerate launch recipes/mergetune.py` uses with no arguments (also in configs/mergetune.yaml).
RECIPE_DEFAULTS = {
    "output_dir": "outputs/mergetune",
    "optim": "adamw_torch",
    "learning_rate": 0.01,
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 40,
    "per_device_train_batch_size": 32,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 1,
}


@dataclass
class MergeTuneRecipeArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP folder or Hub id (default: the cached tiny digits demo CLIP)."}
    )
    dataset: str = field(default="digits", metadata={"help": "Dataset name, folder or Hub id ('digits': offline)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local datasets (default ../shared/data)."})
    shots: int = field(default=16, metadata={"help": "Training images per base class."})
    downstream_pool: bool | None = field(
        default=None,
        metadata={
            "help": "Shots (and --eval_split val images) from the 30%% downstream pool of the train split, the images "
            "a model pretrained on the other 70%% never saw (benchmarks). Default: yes for the demo CLIP when "
            "--demo_pretrain_pool < 1, else no."
        },
    )
    base_method: str = field(
        default="coop", metadata={"help": "The fine-tuned solution's method: coop, kgcoop or vpt."}
    )
    base_kg_weight: float = field(default=8.0, metadata={"help": "KgCoOp's λ (base_method kgcoop; official: 8)."})
    vpt_tokens: int = field(default=8, metadata={"help": "VPT prompt tokens (base_method vpt)."})
    finetuned: str | None = field(
        default=None, metadata={"help": "An existing adapter of base_method's type (skips its training)."}
    )
    ctx_init: str = field(default="a photo of a", metadata={"help": "CoOp context initialisation."})
    coop_epochs: float = field(default=40, metadata={"help": "CoOp epochs (the fine-tuned solution)."})
    coop_learning_rate: float = field(default=0.01, metadata={"help": "CoOp learning rate."})
    coop_optim: str = field(default="adamw_torch", metadata={"help": "CoOp optimiser."})
    demo_pretrain_steps: int = field(
        default=400, metadata={"help": "Steps of the demo CLIP's pretraining (batch 128; ~60 epochs of its pool)."}
    )
    demo_pretrain_pool: float = field(
        default=0.7,
        metadata={
            "help": "Per-class fraction of digits' train split the demo CLIP pretrains on (seed 0); the rest is the "
            "downstream pool (--downstream_pool true) it never sees."
        },
    )
    demo_pretrain_views: str = field(
        default="described",
        metadata={
            "help": "The demo CLIP's pretraining views: clean (the digits as they are, captions from their own "
            "templates), or described (design C of the benchmarks: every view cropped, blurred and noised, half the "
            "captions generic, each naming the view's traits)."
        },
    )
    eval_split: str = field(
        default="test",
        metadata={
            "help": "test, or val: evaluate on a validation split to choose settings without the test split — "
            "val_shots more images per base class and val_shots per novel class, from the downstream pool "
            "(needs --downstream_pool true), disjoint from the training shots."
        },
    )
    val_shots: int = field(default=16, metadata={"help": "Validation images per class (eval_split val)."})
    output_ensemble: float | None = field(
        default=None,
        metadata={
            "help": "γ: also report each learned prompt row ensembled with the zero-shot ensemble in output space, "
            "logits from (1 − γ)·T_zs + γ·T (T: unit class text features). The heads are precomputed, so it costs "
            "the same one image forward. Prompt methods only."
        },
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Images per batch in evaluation."})


#: the pretraining options of each ``--demo_pretrain_views`` (``described``: design C's degraded, described views)
DEMO_VIEWS = {
    "clean": {"captions": "own", "degrade_prob": 0.0},
    "described": {
        "captions": "mixed",
        "own_prob": 0.5,
        "describe_views": True,
        "describe_prob": 0.7,
        "degrade_prob": 1.0,
        "crop_min": 0.35,
        "blur_min": 0.8,
        "blur_max": 1.6,
        "noise": 0.1,
    },
}


def demo_clip(steps: int, seed: int = 0, pool: float = 1.0, views: str = "clean") -> Path:
    """The demo's zero-shot model: a ~0.2M-parameter CLIP pretrained briefly (so it still forgets under CoOp) on
    scikit-learn's digits with recipes/pretrain_clip.py, built on first use and cached in ``DEMO_CACHE``
    (``$HF_CFT_CACHE/mergetune-demo-clip``, default ``~/.cache/hf_cft/...``).

    Under ``accelerate launch`` every process calls this: the main process decides whether the cache is there and
    tells the others, so that they either all read it or all pretrain together (pretrain_clip shards the global
    batch of 128 and only the main process writes; the model folder appears by one rename, so a reader never sees
    half of it). The model is the same whatever the number of processes (up to float rounding)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if not 0.0 < pool <= 1.0:
        raise SystemExit(f"--demo_pretrain_pool must be in (0, 1], got {pool}")
    if views not in DEMO_VIEWS:
        raise SystemExit(f"--demo_pretrain_views must be one of {sorted(DEMO_VIEWS)}, got {views!r}")
    name = f"steps{steps}-seed{seed}" + (f"-pool{pool:g}" if pool < 1 else "") + ("" if views == "clean" else f"-{views}")
    out = DEMO_CACHE / name
    state = PartialState()
    cached = [(out / "model" / "config.json").is_file()]
    if state.num_processes > 1:
        broadcast_object_list(cached, from_process=0)
    if cached[0]:
        return out / "model"
    spec = importlib.util.spec_from_file_location("pretrain_clip", Path(__file__).with_name("pretrain_clip.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    args = mod.PretrainArguments(
        datasets=["digits"],
        pool_fraction=pool,
        image_size=16,
        patch_size=4,
        width=64,
        layers=2,
        heads=4,
        projection_dim=64,
        **DEMO_VIEWS[views],
        batch_size=128,
        learning_rate=2e-3,
        warmup_steps=20,
        max_steps=steps,
        eval_every_minutes=0,
        output_dir=str(out),
        seed=seed,
    )
    print(f"pretraining the demo CLIP on scikit-learn's digits ({steps} steps), cached in {out}", flush=True)
    return mod.main(args)


def evaluate(model, tokenizer, splits, names, templates, transform, cache, args, head_fn=None, heads=None) -> dict:
    """Base / novel accuracy (and HM) with the template-ensembled head, ``head_fn(class names)`` or the fixed
    ``heads[split]``."""
    row = {}
    for split in ("base", "novel"):
        if split not in splits:
            continue
        head = heads[split] if heads is not None else head_fn(names[split]) if head_fn else None
        r = evaluate_zeroshot(
            model,
            tokenizer,
            splits[split][1],
            names[split],
            templates,
            args.eval_batch_size,
            transform,
            cache=cache,
            head=head,
        )
        row[split] = r.accuracy
    if "novel" in row:
        row["hm"] = harmonic_mean(row["base"], row["novel"])
    return row


def main(args: MergeTuneRecipeArguments, targs: MergeTuneConfig) -> dict:
    t_start = time.perf_counter()
    task = load_task(args.dataset, args.data_dir)
    if args.downstream_pool is None:  # the demo CLIP never saw the downstream pool: draw the shots from it
        args.downstream_pool = args.model_name_or_path is None and args.demo_pretrain_pool < 1
    _check_evaluation_flags(args)
    model_path = args.model_name_or_path or str(
        demo_clip(args.demo_pretrain_steps, pool=args.demo_pretrain_pool, views=args.demo_pretrain_views)
    )
    model, tokenizer, transform = load_clip(model_path)
    model_desc = args.model_name_or_path or (
        f"demo CLIP ({sum(p.numel() for p in model.parameters()):,} parameters) pretrained for "
        f"{args.demo_pretrain_steps} steps of 128 images on "
        + (f"{args.demo_pretrain_pool:.0%} of " if args.demo_pretrain_pool < 1 else "")
        + "scikit-learn's digits"
        + (f" ({args.demo_pretrain_views} views)" if args.demo_pretrain_views != "clean" else "")
        + " — deliberately under-trained so that CoOp can forget"
    )
    val = args.eval_split == "val"
    train, splits, names = base_novel_task(
        task, args.shots, targs.seed, True, args.downstream_pool, val_shots=args.val_shots if val else 0
    )
    if val:
        splits, names = _validation_splits(task, splits, names, targs.seed, args.val_shots)
    train_data = apply_image_transform(
        train, dataclasses.replace(transform, train=True, seed=targs.seed), name=task.name
    )
    cache = FeatureCache()
    results = {
        "zero-shot (ensemble)": evaluate(model, tokenizer, splits, names, task.templates, transform, cache, args),
        "zero-shot ('a photo of a {}.')": evaluate(
            model, tokenizer, splits, names, ["a photo of a {}."], transform, cache, args
        ),
    }
    out = Path(targs.output_dir)
    method = args.base_method
    if method not in ("coop", "kgcoop", "vpt"):
        raise SystemExit(f"--base_method must be coop, kgcoop or vpt, got {method!r}")
    label = {"coop": "CoOp", "kgcoop": "KgCoOp", "vpt": "VPT"}[method]
    prompts = method != "vpt"  # CoOp / KgCoOp: a class-feature path (curves, prompt heads)
    coop_dir = Path(args.finetuned) if args.finetuned else out / method

    def coop_config():  # the adapter of ŵ2 and of the continued model (VPT: the same seeded prompt init for both)
        if not prompts:
            torch.manual_seed(targs.seed)
            return VPTConfig(n_tokens=args.vpt_tokens, base_model_name_or_path=args.model_name_or_path)
        return CoOpConfig(
            ctx_init=args.ctx_init, classnames=names["base"], base_model_name_or_path=args.model_name_or_path
        ).set_tokenizer(tokenizer)

    peft_model = get_peft_model(model, coop_config())

    def evaluate_adapter():  # CoOp: the active adapter's prompt head per split; VPT: the template heads
        head_fn = (lambda n: peft_model.class_text_features(tokenizer, n).detach()) if prompts else None
        return evaluate(peft_model, tokenizer, splits, names, task.templates, transform, cache, args, head_fn)

    coop_losses = {}
    if args.finetuned is None:  # (2) the fine-tuned solution: CoOp on the base classes
        coop_args = ClipTrainingArguments(
            output_dir=str(out / "coop-run"),
            num_train_epochs=args.coop_epochs,
            learning_rate=args.coop_learning_rate,
            optim=args.coop_optim,
            per_device_train_batch_size=targs.per_device_train_batch_size,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            logging_steps=max(1, targs.logging_steps),
            save_strategy="no",
            report_to=[],
            seed=targs.seed,
            disable_tqdm=targs.disable_tqdm,
            use_cpu=targs.use_cpu,
            kg_weight=args.base_kg_weight if method == "kgcoop" else 0.0,  # KgCoOp: CoOp + λ·(1 − cos to hand-crafted)
        )
        coop_trainer = ClipClassificationTrainer(
            peft_model, coop_args, names["base"], task.templates, tokenizer, train_dataset=train_data
        )
        coop_trainer.train()
        coop_losses[label] = _first_last_loss(coop_trainer)
        if coop_trainer.is_world_process_zero():
            peft_model.save_pretrained(str(coop_dir))
        coop_trainer.accelerator.wait_for_everyone()  # every process reads ŵ2 from coop_dir below
    else:
        peft_model.load_adapter(str(coop_dir), adapter_name="default")
    peft_model.eval()
    results[label] = evaluate_adapter()
    if prompts:
        with torch.no_grad():
            coop_heads = {s: peft_model.class_text_features(tokenizer, names[s]) for s in ("base", "novel")}

    # (3) MergeTune: a new adapter on the same base model, initialised from the pair
    peft_model.add_adapter("mergetune", coop_config())
    peft_model.set_adapter("mergetune")
    mt = MergeTuneTrainer(
        peft_model, targs, names["base"], task.templates, tokenizer, finetuned=str(coop_dir), train_dataset=train_data
    )
    t0 = time.perf_counter()
    mt.train()
    mt_seconds = time.perf_counter() - t0
    peft_model.eval()
    results[f"{label} + MergeTune"] = evaluate_adapter()
    if args.output_ensemble is not None and prompts:  # each learned head ensembled with the zero-shot ensemble's
        gamma = args.output_ensemble
        with torch.no_grad():
            mt_heads = {s: peft_model.class_text_features(tokenizer, names[s]) for s in ("base", "novel")}
            with peft_model.disable_adapter():
                zs_heads = {
                    s: build_zeroshot_classifier(peft_model, tokenizer, names[s], task.templates)
                    for s in ("base", "novel")
                }
        for row, heads in ((label, coop_heads), (f"{label} + MergeTune", mt_heads)):
            mixed = {s: ((1 - gamma) * zs_heads[s] + gamma * heads[s].to(zs_heads[s])).detach() for s in heads}
            results[f"{row} ⊕ zero-shot (γ = {gamma:g})"] = evaluate(
                peft_model, tokenizer, splits, names, task.templates, transform, cache, args, heads=mixed
            )

    # (4) LMC paths on the test images of base and novel classes
    curves = {}
    with torch.no_grad():
        for split in ("base", "novel") if prompts else ():
            feats, labels = _features(peft_model, splits[split][1], transform, cache, args)
            with peft_model.disable_adapter():
                zs = build_zeroshot_classifier(peft_model, tokenizer, names[split], task.templates)
            sols = {
                "zero-shot": zs,
                label: coop_heads[split],
                "MergeTune": peft_model.class_text_features(tokenizer, names[split]),
            }
            curves[split] = interpolation_curves(
                feats,
                labels,
                sols,
                [("zero-shot", label), ("zero-shot", "MergeTune"), (label, "MergeTune")],
                scale=float(peft_model.get_base_model().logit_scale.exp()),
            )
    result = {
        "model": model_desc,
        "dataset": task.name,
        "shots": args.shots,
        "results": results,
        "mergetune": {
            k: getattr(targs, k)
            for k in (
                "anchor_weight",
                "path_weight",
                "num_alphas",
                "alpha_grid",
                "tau",
                "anchor",
                "learning_rate",
                "num_train_epochs",
                "preset",
                "path_features",
                "anchor_templates",
                "weight_ensemble",
            )
        },
        "base_method": method,
        "eval_split": args.eval_split,
        "output_ensemble": args.output_ensemble,
        "mergetune_seconds": mt_seconds,
        "train_loss_first_last": {"MergeTune": _first_last_loss(mt), **coop_losses},
        "total_seconds": time.perf_counter() - t_start,
        "paths": curves,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    if mt.is_world_process_zero():
        if curves:
            atomic_write_json(out / "path_curves.json", curves)
            plot_paths(curves, out / "paths.png", f"MergeTune on {task.name}: loss / accuracy along linear paths")
        adapter_dir = _save_adapter(peft_model, "mergetune", out / "mergetune")
        row = results[f"{label} + MergeTune"]
        card = adapter_card(
            peft_model,
            model_name=f"mergetune-{method}-{task.name}",
            dataset_name=task.name,
            dataset_terms=task.meta.get("license_note"),
            results=[{"name": s, "num_classes": len(names[s]), "accuracy": row[s]} for s in ("base", "novel")],
            hm=row.get("hm"),
            results_note="Before MergeTune — "
            + "; ".join(
                f"{k}: base {v['base']:.2f}, novel {v['novel']:.2f}, HM {v['hm']:.2f}"
                for k, v in results.items()
                if k != f"{label} + MergeTune"
            )
            + f". Base model: {model_desc}.",
            hyperparameters={**result["mergetune"], "shots per base class": args.shots, "seed": targs.seed},
            training_data=f"{args.shots} images per base class of {task.name}; the {label} solution was trained on "
            "the same.",
            method={
                "name": f"MergeTune (continued {label})",
                "tags": [method, "mergetune", "prompt-learning"],
                "description": f"{label} prompts continued between the zero-shot and the {label} solution with an "
                "LMC path loss and a surrogate anchor toward zero-shot.",
                "paper": "Wang et al., MergeTune: Continued Fine-Tuning of Vision-Language Models, ICLR 2026 "
                "(arXiv:2601.10497)",
                "citation": "@inproceedings{wang2026mergetune,\n  title={MergeTune: Continued Fine-Tuning of "
                "Vision-Language Models},\n  author={Wang and Li and Zhu and Kittler},\n  "
                "booktitle={ICLR},\n  year={2026}\n}",
            },
        )
        card.save(str(adapter_dir / "README.md"))
        atomic_write_json(out / "results.json", {k: v for k, v in result.items() if k != "paths"})
        print(f"\nMergeTune demo on {task.name}: {model_desc}\n")
        print("| model | base | novel | HM |\n|---|---|---|---|")
        for name, row in results.items():
            print(f"| {name} | {row['base']:.2f} | {row['novel']:.2f} | {row['hm']:.2f} |")
        print(
            f"\nwritten to {out}: results.json{', paths.png' if curves else ''}, {coop_dir.name}/, mergetune/ "
            "(adapter + model card); "
            f"{result['total_seconds']:.0f}s in all"
        )
    return result


def _check_evaluation_flags(args) -> None:
    """Refuse evaluation flags that cannot work, before any pretraining or training."""
    gamma = args.output_ensemble
    if gamma is not None:
        if not (isinstance(gamma, float) and 0.0 <= gamma <= 1.0):  # NaN fails both comparisons
            raise SystemExit(f"--output_ensemble γ must be in [0, 1], got {gamma}")
        if args.base_method == "vpt":
            raise SystemExit(
                "--output_ensemble mixes class text heads: it needs a prompt method (--base_method coop or kgcoop); "
                "VPT changes the image features, so its ensemble with zero-shot would cost a second image forward"
            )
    if args.eval_split not in ("test", "val"):
        raise SystemExit(f"--eval_split must be test or val, got {args.eval_split!r}")
    if args.eval_split == "val":
        if not args.downstream_pool:
            raise SystemExit("--eval_split val draws its images from the downstream pool: add --downstream_pool true")
        if args.val_shots < 1:
            raise SystemExit(f"--val_shots must be at least 1 with --eval_split val, got {args.val_shots}")
        if args.model_name_or_path is None and args.demo_pretrain_pool != 0.7:
            raise SystemExit(
                "--eval_split val with the demo CLIP needs --demo_pretrain_pool 0.7: the downstream pool is the 30% "
                "of the train split that the demo CLIP's pretraining must not see"
            )


def _validation_splits(task, splits, names, seed: int, val_shots: int):
    """Replace the test splits by validation ones: base = the ``val_shots`` per base class drawn after the training
    shots (``splits["val"]``); novel = ``val_shots`` per novel class of the downstream pool (same seed)."""
    from hf_cft.data import few_shot_indices, labels_of, select_classes, split_per_class

    novel_ids = splits["novel"][0]
    pool = select_classes(split_per_class(task["train"], 0.7, seed=0)[1], novel_ids)
    idx = few_shot_indices(labels_of(pool), val_shots, seed=seed, class_names=names["novel"], dataset_name=task.name)
    splits = {"base": splits["val"], "novel": (novel_ids, pool.select(idx))}
    return splits, {k: names[k] for k in ("base", "novel")}


def _first_last_loss(trainer) -> list[float]:
    """First and last logged training loss (averaged over the processes by the Trainer)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return [losses[0], losses[-1]] if losses else []


def _save_adapter(peft_model, name: str, target: Path) -> Path:
    """Save one named adapter as a standalone adapter folder (PEFT nests non-default adapters in a subfolder)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[name])
        src = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target)
    return target


def _features(model, dataset, transform, cache, args):
    from torch.utils.data import DataLoader

    from hf_cft.data import ImageClassificationCollator
    from hf_cft.models import encode_images

    loader = DataLoader(
        apply_image_transform(dataset, transform),
        batch_size=args.eval_batch_size,
        collate_fn=ImageClassificationCollator(),
    )
    return encode_images(model, loader)


if __name__ == "__main__":
    from hf_cft.trainers.mergetune_config import OFFICIAL_PRESET

    defaults = RECIPE_DEFAULTS
    if any(a == "--preset" or a.startswith("--preset=") for a in sys.argv[1:]):  # the preset's optimiser, not ours
        defaults = {k: v for k, v in RECIPE_DEFAULTS.items() if k not in OFFICIAL_PRESET}
    recipe_args, mt_args = parse_recipe_args(MergeTuneRecipeArguments, MergeTuneConfig, defaults=defaults)
    with user_errors():
        main(recipe_args, mt_args)
