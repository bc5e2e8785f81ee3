"""hf_cft benchmark harness: run a named protocol over ../shared/data with the small pretrained CLIP.

    python benchmarks/run.py zeroshot [--quick]     # zero-shot table (template ensemble and single template)
    python benchmarks/run.py headroom [--quick]     # linear-probe gap and 16-shot CoOp base gain (Protocol A data;
                                                    # quick: dtd10, aid30, gtsrb only)
    python benchmarks/run.py b2n [--quick]          # Protocol A for MergeTune: CoOp, MergeTune (+Fisher, ablations),
                                                    # TIES / DARE / WiSE / output ensemble (benchmarks/b2n.py)
    python benchmarks/run.py crossdata [--quick]    # Protocols C and D (benchmarks/crossdata.py): CoOp, KgCoOp and
                                                    # their MergeTune rows trained on all caltech101 classes, on the
                                                    # other nine datasets and on shifted caltech101 test sets
    python benchmarks/run.py transfer|domain        # Protocol C or D alone (same source models)
    python benchmarks/run.py robust [--quick]       # Protocol E (benchmarks/robust.py): LP and E2E fine-tuning on
                                                    # caltech101's downstream pool, WiSE-FT, output ensemble,
                                                    # MergeTune (+ weight ensemble), ID and six shifts
    python benchmarks/run.py path_ablation [--quick] # does MergeTune's path term do anything? (benchmarks/
                                                    # path_ablation.py: β, β vs a weaker anchor, N, τ, λ, lr, epochs)
    python benchmarks/run.py fewshot run|tables --work DIR [--quick] [--seeds ..] [--orders I II]
                                                    # few-shot MTIL-mini (benchmarks/fewshot_mtil.py: recipe runs of
                                                    # ConDU and its baselines, 5 shots; per-seed and mean tables)

Options: ``--checkpoint DIR`` (a CLIPModel folder). Without it each protocol uses its design's model, pretrained
on first use (5,000 steps; in quick mode a 150-step model) outside the repository: ``zeroshot`` and ``headroom``
use design F (``recipes/configs/pretrain_clip_web.yaml``, ``~/.cache/hf_cft/benchmark-clip-web/model``: web-like
captions, the zero-shot model with CLIP-like headroom), ``b2n`` and ``b2n_head`` design C
(``recipes/configs/pretrain_clip_described.yaml``, ``~/.cache/hf_cft/benchmark-clip-described/model``), on which
prompt learning forgets novel classes -- what MergeTune must recover; on design F a learned context improves the
novel classes too (benchmarks/README.md); ``transfer``, ``domain`` and ``crossdata`` use design C as Protocol A.
``--design C|F`` overrides the protocol's design.
``--data_dir`` (default ../shared/data), ``--out`` (default benchmarks/results), ``--seeds``.

Each run writes ``<out>/<protocol>[-quick].json`` (``transfer`` and ``domain``: ``protocolC`` / ``protocolD``;
``crossdata`` both; ``robust``: ``protocolE``) (machine, versions, date, checkpoint summary, numbers),
``.md`` (the table) and ``.png`` (a plot). ``--quick`` evaluates at most 1,000 test images per dataset with one
seed and finishes in under 5 minutes on 2 CPU cores once the checkpoint exists. Numbers are measured on the
small re-encoded datasets of ../shared/data, not the official ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from hf_cft.data import (  # noqa: E402
    SHARED_DATASETS,
    base_novel_classes,
    few_shot_indices,
    load_classification_dataset,
    split_per_class_indices,
)
from hf_cft.data.image_pool import decode_split, normalize_batch  # noqa: E402
from hf_cft.recipe_utils import PRETRAIN_DESIGNS as DESIGNS  # noqa: E402
from hf_cft.recipe_utils import QUICK_PRETRAIN_STEPS, design_checkpoint  # noqa: E402
from hf_cft.utils import atomic_path, atomic_write_bytes, atomic_write_json  # noqa: E402

PROTOCOL_A = ("caltech101", "stanford_cars", "gtsrb", "aid30", "dtd10", "cifar10", "mnist")
# the default pretraining design (hf_cft.recipe_utils.PRETRAIN_DESIGNS) of each protocol
PROTOCOL_DESIGN = {
    "zeroshot": "F",
    "headroom": "F",
    "b2n": "C",
    "b2n_head": "C",
    "transfer": "C",
    "domain": "C",
    "crossdata": "C",
    "robust": "C",
    "path_ablation": "C",
}

CACHE = Path("~/.cache/hf_cft/decoded").expanduser()


def _tilde(p: Path) -> str:
    home = str(Path.home())
    return str(p).replace(home, "~", 1) if str(p).startswith(home) else str(p)


def ensure_checkpoint(path: Path | None, quick: bool, data_dir: str, design: str = "C") -> Path:
    if path is not None:
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--checkpoint {path} is not a model folder (no config.json)")
        return Path(path)
    full, small = design_checkpoint(design), design_checkpoint(design, quick=True)
    for candidate in (full, small if quick else None):
        if candidate is not None and (candidate / "config.json").is_file():
            return candidate
    target = small if quick else full
    steps = str(QUICK_PRETRAIN_STEPS) if quick else "5000"
    print(f"no checkpoint found: pretraining design {design} ({steps} steps) into {_tilde(target.parent)}", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        # without it accelerate launch sets OMP_NUM_THREADS=1 on a machine without a GPU (half the speed on 2 cores)
        "--num_cpu_threads_per_process",
        os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1),
        str(REPO / "recipes" / "pretrain_clip.py"),
        "--config",
        str(REPO / "recipes" / "configs" / DESIGNS[design][0]),
        "--data_dir",
        data_dir,
        "--max_steps",
        steps,
        "--output_dir",
        str(target.parent),
    ]
    subprocess.run(cmd, check=True)
    return target


def load_model(path: Path):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(path)).eval()
    return model, AutoTokenizer.from_pretrained(str(path)), int(model.config.vision_config.image_size)


@torch.no_grad()
def features(model, images_u8: torch.Tensor) -> torch.Tensor:
    from hf_cft.models import image_features

    return torch.cat(
        [image_features(model, normalize_batch(images_u8[i : i + 512])) for i in range(0, len(images_u8), 512)]
    )


def split_images(task, split: str, size: int, name: str, limit: int | None = None):
    """The decoded ``(uint8 images, labels)`` of a split's first ``limit`` rows (cached on disk)."""
    ds = task[split]
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return decode_split(
        ds, size, CACHE, f"{name}-{split}" + (f"-first{limit}" if limit and len(task[split]) > limit else "")
    )


def split_features(model, task, split: str, size: int, name: str, limit: int | None = None):
    im, lab = split_images(task, split, size, name, limit)
    return features(model, im), lab


def task_features(model, size: int, name: str, args, loaded=None, images: bool = False):
    """``(task, {test_f, test_y, down_f, down_y})``: test-split and downstream-pool (the 30% of each class's training
    images never seen in pretraining) features, from ``--features`` when given (no images needed) or computed;
    with ``images`` also the images themselves (``test_im``, ``down_im``, same rows; for rows that train the image
    tower)."""
    if loaded is not None and not images:
        return loaded[0][name], loaded[1][name]
    task = load_classification_dataset(name, data_dir=args.data_dir)
    limit = 1000 if args.quick else None
    test_f, test_y = split_features(model, task, "test", size, name, limit)
    train_f, train_y = split_features(model, task, "train", size, name)
    _, down = split_per_class_indices(train_y.numpy(), 0.7, seed=0)
    out = {"test_f": test_f, "test_y": test_y, "down_f": train_f[down], "down_y": train_y[down]}
    if images:
        out["test_im"] = split_images(task, "test", size, name, limit)[0]
        out["down_im"] = split_images(task, "train", size, name)[0][down]
    return task, out


def zs_accuracy(model, tok, feats, labels, classnames, templates) -> float:
    from hf_cft.models import build_zeroshot_classifier, clip_logits

    head = build_zeroshot_classifier(model, tok, classnames, templates)
    return float((clip_logits(model, feats, head).argmax(-1) == labels).float().mean() * 100)


# --------------------------------------------------------------------------------------------- protocols


def protocol_zeroshot(model, tok, size, args) -> dict:
    rows = {}
    for name in SHARED_DATASETS:
        task = load_classification_dataset(name, data_dir=args.data_dir)
        feats, lab = split_features(model, task, "test", size, name, 1000 if args.quick else None)
        rows[name] = {
            "classes": task.num_classes,
            "test_images": len(lab),
            "chance": 100.0 / task.num_classes,
            "ensemble": zs_accuracy(model, tok, feats, lab, task.classnames, task.templates),
            "single": zs_accuracy(model, tok, feats, lab, task.classnames, ["a photo of a {}."]),
            "templates": len(task.templates),
        }
        print(f"{name}: {rows[name]['ensemble']:.1f} (ensemble) / {rows[name]['single']:.1f} (single)", flush=True)
    header = "| dataset | classes | test images | chance | zero-shot (ensemble) | zero-shot ('a photo of a {}.') |"
    lines = [header, "|---|---|---|---|---|---|"]
    lines += [
        f"| {k} | {r['classes']} | {r['test_images']} | {r['chance']:.1f} | {r['ensemble']:.1f} | {r['single']:.1f} |"
        for k, r in rows.items()
    ]
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("chance", "ensemble", "single")}
    lines.append(f"| **mean** | | | {mean['chance']:.1f} | {mean['ensemble']:.1f} | {mean['single']:.1f} |")
    return {"rows": rows, "mean": mean, "table": lines, "plot": ("bars", ["chance", "single", "ensemble"])}


QUICK_SETS = ("dtd10", "aid30", "gtsrb")  # the Protocol A datasets of quick mode (keeps it under 5 minutes)


def _datasets(args) -> tuple[str, ...]:
    return tuple(args.datasets) if args.datasets else (QUICK_SETS if args.quick else PROTOCOL_A)


def _coop_epochs(args) -> int:
    return args.coop_epochs or (20 if args.quick else 50)


def _b2n_hyper_parameters(args) -> dict:
    """CoOp / MergeTune settings shared by the prompt and head rows of Protocol A (first lr of the grid)."""
    return {
        "optimizer": args.coop_optimizer,
        "lr": (args.coop_lrs or [0.01])[0],
        "epochs": _coop_epochs(args),
        "batch_size": args.coop_batch_size,
        "lam": args.mt_lambda,
        "beta": args.mt_beta,
        "tau": args.mt_tau,
    }


def protocol_headroom(model, tok, size, args) -> dict:
    from peft import get_peft_model

    from hf_cft import CoOpConfig
    from hf_cft.trainers import fit_linear_probe, train_coop_on_features

    rows = {}
    lrs = tuple(args.coop_lrs) if args.coop_lrs else (0.01,)
    epochs = _coop_epochs(args)
    loaded = _load_features(args.features) if args.features else None
    for name in _datasets(args):
        t0 = time.perf_counter()
        task, f = task_features(model, size, name, args, loaded)
        test_f, test_y, down_f, down_y = f["test_f"], f["test_y"], f["down_f"], f["down_y"]
        row = {
            "classes": task.num_classes,
            "chance": 100.0 / task.num_classes,
            "zs_ensemble": zs_accuracy(model, tok, test_f, test_y, task.classnames, task.templates),
            "zs_single": zs_accuracy(model, tok, test_f, test_y, task.classnames, ["a photo of a {}."]),
        }
        w, b, info = fit_linear_probe(down_f, down_y, task.num_classes, seed=0)
        row["linear_probe"] = float(((test_f @ w.t() + b).argmax(-1) == test_y).float().mean() * 100)
        row["lp_weight_decay"] = info["weight_decay"]
        row["lp_gap"] = row["linear_probe"] - row["zs_ensemble"]
        # base classes: 16 shots (+4 validation shots) per class from the downstream pool
        base_ids, _ = base_novel_classes(task.num_classes)
        base_names = [task.classnames[i] for i in base_ids]
        remap = torch.full((task.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(base_ids)] = torch.arange(len(base_ids))
        in_base = remap[down_y] >= 0
        pool_f, pool_y = down_f[in_base], remap[down_y[in_base]]
        test_in = remap[test_y] >= 0
        bt_f, bt_y = test_f[test_in], remap[test_y[test_in]]
        row["base_zs_single"] = zs_accuracy(model, tok, bt_f, bt_y, base_names, ["a photo of a {}."])
        row["base_zs_ensemble"] = zs_accuracy(model, tok, bt_f, bt_y, base_names, task.templates)
        coop_runs, lp16_runs = [], []
        for seed in args.seeds:
            with warnings.catch_warnings():  # small Caltech classes have fewer than 20 images: take them all
                warnings.simplefilter("ignore")
                idx = torch.as_tensor(few_shot_indices(pool_y.numpy(), 20, seed=seed, on_short="take_all"))
            # first 16 of each class's draw train, the rest (up to 4) validate
            tr, va = [], []
            for c in range(len(base_ids)):
                rows_c = idx[pool_y[idx] == c]
                perm = rows_c[torch.randperm(len(rows_c), generator=torch.Generator().manual_seed(seed))]
                tr.append(perm[:16])
                va.append(perm[16:])
            tr, va = torch.cat(tr), torch.cat(va)
            best = None
            for lr in lrs:
                coop_cfg = (
                    CoOpConfig(ctx_init="a photo of a")
                    if args.coop_n_ctx is None
                    else CoOpConfig(n_ctx=args.coop_n_ctx)
                )
                peft = get_peft_model(model, coop_cfg.set_tokenizer(tok))
                train_coop_on_features(
                    peft,
                    tok,
                    base_names,
                    pool_f[tr],
                    pool_y[tr],
                    epochs=epochs,
                    lr=lr,
                    batch_size=128,
                    seed=seed,
                    optimizer=args.coop_optimizer,
                )
                with torch.no_grad():
                    head = peft.class_text_features(tok, base_names)
                val = (
                    float(((bt_logits(model, pool_f[va], head)).argmax(-1) == pool_y[va]).float().mean() * 100)
                    if len(va)
                    else 0.0
                )
                test = float((bt_logits(model, bt_f, head).argmax(-1) == bt_y).float().mean() * 100)
                model = peft.unload()
                if best is None or val > best[0]:
                    best = (val, lr, test)
            coop_runs.append({"seed": seed, "lr": best[1], "val": best[0], "base_test": best[2]})
            w16, b16, _ = fit_linear_probe(pool_f[tr], pool_y[tr], len(base_ids), seed=seed)
            lp16_runs.append(float(((bt_f @ w16.t() + b16).argmax(-1) == bt_y).float().mean() * 100))
        row["coop16_base"] = sum(r["base_test"] for r in coop_runs) / len(coop_runs)
        row["coop16_runs"] = coop_runs
        row["lp16_base"] = sum(lp16_runs) / len(lp16_runs)
        row["coop_gain_vs_single"] = row["coop16_base"] - row["base_zs_single"]
        row["seconds"] = time.perf_counter() - t0
        rows[name] = row
        print(
            f"{name}: ZS {row['zs_ensemble']:.1f} LP {row['linear_probe']:.1f} (gap {row['lp_gap']:+.1f}); base "
            f"ZS single {row['base_zs_single']:.1f} -> CoOp {row['coop16_base']:.1f} "
            f"({row['coop_gain_vs_single']:+.1f}); {row['seconds']:.0f}s",
            flush=True,
        )
    lines = [
        "| dataset | chance | ZS (ensemble) | ZS (single) | linear probe (downstream pool) | LP gap | "
        "base: ZS single | base: ZS ensemble | base: CoOp 16-shot | CoOp gain | base: LP 16-shot |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        lines.append(
            f"| {k} | {r['chance']:.1f} | {r['zs_ensemble']:.1f} | {r['zs_single']:.1f} | {r['linear_probe']:.1f}"
            f" | {r['lp_gap']:+.1f} | {r['base_zs_single']:.1f} | {r['base_zs_ensemble']:.1f} | "
            f"{r['coop16_base']:.1f} | {r['coop_gain_vs_single']:+.1f} | {r['lp16_base']:.1f} |"
        )
    targets = {
        "datasets_with_lp_gap_ge_10": sum(r["lp_gap"] >= 10 for r in rows.values()),
        "datasets_with_coop_gain_ge_3": sum(r["coop_gain_vs_single"] >= 3 for r in rows.values()),
        "of": len(rows),
    }
    lines.append("")
    lines.append(
        f"Linear-probe gap >= 10 points on {targets['datasets_with_lp_gap_ge_10']} of {len(rows)} datasets; "
        f"16-shot CoOp base gain >= 3 points on {targets['datasets_with_coop_gain_ge_3']} of {len(rows)}."
    )
    return {
        "rows": rows,
        "targets": targets,
        "table": lines,
        "plot": ("bars", ["zs_ensemble", "linear_probe", "base_zs_single", "coop16_base"]),
    }


def _load_features(path):
    """Tasks (name, class names, templates) and features written by ``--save_features``."""
    from types import SimpleNamespace

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["tasks"])
    tensors = load_file(path)
    tasks = {n: SimpleNamespace(name=n, num_classes=len(m["classnames"]), **m) for n, m in meta.items()}
    feats = {n: {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(n + "/")} for n in meta}
    return tasks, feats


def _b2n_rows(args) -> tuple[str, ...]:
    """``b2n.ROWS``, or with ``--methods`` the zero-shot and CoOp reference rows plus the methods asked for."""
    import b2n

    if not args.methods:
        return b2n.ROWS
    unknown = [m for m in args.methods if m not in b2n.ROWS + b2n.EXTRA_ROWS]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {b2n.ROWS + b2n.EXTRA_ROWS}")
    return tuple(dict.fromkeys(("zs_single", "coop", *args.methods)))


def protocol_b2n(model, tok, size, args) -> dict:
    import b2n

    hp = _b2n_hyper_parameters(args)
    rows = _b2n_rows(args)
    images = bool({"vpt", "vpt_mergetune"} & set(rows))
    per_dataset, saved, meta = {}, {}, {}
    loaded = _load_features(args.features) if args.features else None
    for name in _datasets(args):
        t0 = time.perf_counter()
        task, feats = task_features(model, size, name, args, loaded, images=images)
        saved.update({f"{name}/{k}": v.contiguous() for k, v in feats.items() if not k.endswith("_im")})
        meta[name] = {"classnames": list(task.classnames), "templates": list(task.templates)}
        if args.features_only:
            continue
        per_dataset[name] = b2n.run_dataset(
            model, tok, task, feats, args.seeds, hp, log=lambda m: print(m, flush=True), paths_dir=args.out, rows=rows
        )
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    if args.save_features:
        from safetensors.torch import save_file

        save_file(saved, args.save_features, metadata={"tasks": json.dumps(meta)})
    if args.features_only:
        raise SystemExit(f"features written to {args.save_features}")
    summary = b2n.summarise(per_dataset, rows)
    summary["hyper_parameters"] = hp
    lines = b2n.markdown(summary, rows)
    if rows == b2n.ROWS:
        summary["targets"] = b2n.targets(summary)
        lines += ["", b2n.target_line(summary)]
    averages = {r: summary["average"][r] for r in rows}
    return {**summary, "table": lines, "rows": averages, "plot": ("bars", ["base", "novel", "hm"])}


def protocol_b2n_head(model, tok, size, args) -> dict:
    """Protocol A's linear-head rows (``b2n.HEAD_ROWS``) on the seven datasets, same shots and hyper-parameters."""
    import b2n

    hp = _b2n_hyper_parameters(args)
    per_dataset = {}
    loaded = _load_features(args.features) if args.features else None
    for name in _datasets(args):
        t0 = time.perf_counter()
        task, feats = task_features(model, size, name, args, loaded)
        per_dataset[name] = b2n.run_head_dataset(
            model, tok, task, feats, args.seeds, hp, log=lambda m: print(m, flush=True)
        )
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    summary = b2n.summarise(per_dataset, b2n.HEAD_ROWS)
    summary["targets"] = b2n.targets(summary, "head")
    summary["hyper_parameters"] = hp
    lines = b2n.markdown(summary, b2n.HEAD_ROWS) + ["", b2n.target_line(summary, "head")]
    rows = {r: summary["average"][r] for r in b2n.HEAD_ROWS}
    return {**summary, "table": lines, "rows": rows, "plot": ("bars", ["base", "novel", "hm"])}


def _crossdata(model, tok, size, args, which: tuple[str, ...]) -> dict:
    """Protocols C (``"transfer"``) and/or D (``"domain"``) from one set of source models (``crossdata.py``)."""
    import crossdata

    from hf_cft.data import DOMAIN_SHIFTS, domain_shift

    hp = _b2n_hyper_parameters(args)
    limit = 1000 if args.quick else None
    t0 = time.perf_counter()
    source, source_feats = task_features(model, size, crossdata.SOURCE, args)
    targets, shifted = {}, {}
    if "transfer" in which:
        names = args.datasets or [d for d in SHARED_DATASETS if d != crossdata.SOURCE]
        for name in names:
            if name == crossdata.SOURCE or name not in SHARED_DATASETS:
                raise SystemExit(
                    f"--datasets {name}: not a target of the transfer protocol ({crossdata.SOURCE} is "
                    f"the source; targets are {[d for d in SHARED_DATASETS if d != crossdata.SOURCE]})"
                )
            task = load_classification_dataset(name, data_dir=args.data_dir)
            targets[name] = (task, *split_features(model, task, "test", size, name, limit))
    if "domain" in which:
        images, _ = split_images(source, "test", size, crossdata.SOURCE, limit)
        shifted = {s: features(model, domain_shift(images, s)) for s in DOMAIN_SHIFTS}
    print(f"features: {time.perf_counter() - t0:.0f}s", flush=True)
    stop = None
    if args.deadline:  # stop before a seed that would end after the deadline (UTC)
        end = datetime.combine(datetime.now(timezone.utc).date(), args.deadline, timezone.utc)

        def stop(per_seed: float) -> bool:
            return datetime.now(timezone.utc).timestamp() + per_seed > end.timestamp()

    out = crossdata.run(model, tok, source, source_feats, targets, shifted, args.seeds, hp,
                        log=lambda m: print(m, flush=True), stop_before=stop)  # fmt: skip
    if out["seeds"] != list(args.seeds):
        print(f"seeds run: {out['seeds']} of {args.seeds} (--deadline {args.deadline})", flush=True)
    requested = list(args.seeds)
    results = {
        crossdata.OUTPUT_NAMES[protocol]: crossdata.protocol_result(
            out, protocol, hp, source.num_classes, requested, args.deadline
        )
        for protocol in which
    }
    if out["seeds"] != requested:
        args.seeds_requested, args.seeds = requested, out["seeds"]
    return {"outputs": results}


def protocol_transfer(model, tok, size, args) -> dict:
    return _crossdata(model, tok, size, args, ("transfer",))


def protocol_domain(model, tok, size, args) -> dict:
    return _crossdata(model, tok, size, args, ("domain",))


def protocol_crossdata(model, tok, size, args) -> dict:
    return _crossdata(model, tok, size, args, ("transfer", "domain"))


def protocol_path_ablation(model, tok, size, args) -> dict:
    """The path-term ablation (``benchmarks/path_ablation.py``) on Protocol A's datasets without stanford_cars
    (near chance for every row), or ``--datasets``; quick: the quick sets."""
    import path_ablation

    hp = _b2n_hyper_parameters(args)
    names = args.datasets or (QUICK_SETS if args.quick else tuple(d for d in PROTOCOL_A if d != "stanford_cars"))
    variants = args.methods or list(path_ablation.VARIANTS)
    unknown = [v for v in variants if v not in path_ablation.VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {list(path_ablation.VARIANTS)}")
    loaded = _load_features(args.features) if args.features else None
    per_dataset = {}
    for name in names:
        t0 = time.perf_counter()
        task, feats = task_features(model, size, name, args, loaded)
        per_dataset[name] = path_ablation.run_dataset(
            model, tok, task, feats, args.seeds, hp, variants, log=lambda m: print(m, flush=True)
        )
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    summary = path_ablation.summarise(per_dataset)
    lines = path_ablation.markdown(summary, names, hp)
    rows = {r: {k: summary[r][k] for k in ("base", "novel", "hm")} for r in summary}
    return {
        "outputs": {
            "path-ablation": {
                "summary": summary,
                "per_dataset": per_dataset,
                "hyper_parameters": hp,
                "table": lines,
                "rows": rows,
                "plot": ("bars", ["base", "novel", "hm"]),
            }
        }
    }


def protocol_robust(model, tok, size, args) -> dict:
    """Protocol E (``benchmarks/robust.py``): LP and E2E fine-tuning on caltech101's downstream pool, WiSE-FT, the
    output ensemble, MergeTune and MergeTune + weight ensemble, on the ID test split and Protocol D's six shifts."""
    import robust

    from hf_cft.data import DOMAIN_SHIFTS, SHIFT_PARAMETERS, domain_shift

    hp = _b2n_hyper_parameters(args)
    e2e_hp = {"epochs": 3, "mt_epochs": 2} if args.quick else {}
    t0 = time.perf_counter()
    source, data = task_features(model, size, robust.SOURCE, args, images=True)
    shifted = {}
    for s in DOMAIN_SHIFTS:
        im = domain_shift(data["test_im"], s)
        shifted[s] = (im, features(model, im))
    print(f"features: {time.perf_counter() - t0:.0f}s", flush=True)
    out = robust.run(model, tok, source, data, shifted, args.seeds, hp, log=lambda m: print(m, flush=True),
                     e2e_hp=e2e_hp)  # fmt: skip
    shifts = list(DOMAIN_SHIFTS)
    summary = robust.summarise(out, shifts)
    lines = robust.markdown(summary, shifts, hp, out["e2e"])
    rows = {
        f"{fam} {row}": {"id": summary[fam][row]["id"][0], "shift average": summary[fam][row]["shift_avg"][0]}
        for fam in robust.FAMILIES
        for row in robust.ROWS
    }
    result = {
        "summary": summary,
        "per_seed": out["per_seed"],
        "hyper_parameters": {**hp, "e2e": out["e2e"]},
        "shifts": {s: SHIFT_PARAMETERS[s] for s in shifts},
        "table": lines,
        "rows": rows,
        "plot": ("bars", ["id", "shift average"]),
    }
    return {"outputs": {"protocolE": result}}


def bt_logits(model, feats, head):
    from hf_cft.models import clip_logits

    return clip_logits(model, feats, head)


PROTOCOLS = {
    "zeroshot": protocol_zeroshot,
    "headroom": protocol_headroom,
    "b2n": protocol_b2n,
    "b2n_head": protocol_b2n_head,
    "transfer": protocol_transfer,
    "domain": protocol_domain,
    "crossdata": protocol_crossdata,
    "robust": protocol_robust,
    "path_ablation": protocol_path_ablation,
}


def plot(result: dict, png: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind, keys = result["plot"]
    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.8))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar([j + i * width for j in range(len(names))], [result["rows"][n][k] for n in names], width, label=k)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv=None):
    given = sys.argv[1:] if argv is None else list(argv)
    if given[:1] == ["fewshot"]:  # recipe runs, not an in-process protocol: its own script and options
        import fewshot_mtil

        return fewshot_mtil.main(given[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=sorted(PROTOCOLS) + ["fewshot"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument(
        "--design", choices=sorted(DESIGNS), default=None, help="pretraining design of the default model (C or F)"
    )
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--datasets", nargs="+", default=None, help="restrict to these datasets")
    # CoOp defaults are the settings of every committed table: AdamW, lr 0.01, 50 epochs, batch 128
    p.add_argument(
        "--coop_lrs", type=float, nargs="+", default=None, help="CoOp lr grid (chosen on validation; default 0.01)"
    )
    p.add_argument("--coop_optimizer", choices=("sgd", "adamw"), default="adamw", help="CoOp optimiser")
    p.add_argument("--coop_n_ctx", type=int, default=None, help="CoOp context length (default: 'a photo of a' init)")
    p.add_argument("--mt_lambda", type=float, default=8.0, help="MergeTune anchor weight (b2n)")
    p.add_argument("--mt_beta", type=float, default=0.5, help="MergeTune path weight (b2n)")
    p.add_argument("--mt_tau", type=float, default=0.3, help="MergeTune τ-initialisation (b2n)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--save_features", default=None, help="b2n: write the image features used to this file")
    p.add_argument("--device", default=None, help="run on this torch device (e.g. cuda)")
    p.add_argument("--features_only", action="store_true", help="b2n: only write --save_features")
    p.add_argument("--features", default=None, help="b2n: read image features from this file (no images needed)")
    p.add_argument("--coop_batch_size", type=int, default=128, help="CoOp/MergeTune batch size (b2n)")
    p.add_argument("--coop_epochs", type=int, default=None, help="CoOp epochs (default 50; quick 20)")
    p.add_argument(
        "--deadline",
        type=lambda t: datetime.strptime(t, "%H:%M").time(),
        default=None,
        help="transfer/domain/crossdata: HH:MM (UTC) -- run no seed that would end after it (the tables say so)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="b2n: only these rows (with zs_single and coop), e.g. kgcoop kgcoop_mergetune vpt vpt_mergetune; "
        "path_ablation: only these variants",
    )
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([1] if args.quick else [1, 2, 3])
    if not args.features and not Path(args.data_dir).is_dir():
        raise SystemExit(f"data folder {args.data_dir} not found (pass --data_dir)")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    design = args.design or PROTOCOL_DESIGN[args.protocol]
    ckpt = ensure_checkpoint(args.checkpoint, args.quick, args.data_dir, design)
    model, tok, size = load_model(ckpt)
    if args.device:
        model.to(args.device)
    result = PROTOCOLS[args.protocol](model, tok, size, args)
    summary_file = ckpt.parent / "zeroshot.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    import peft
    import transformers

    # a protocol writes ``<protocol>.*``, or several result sets (``{"outputs": {name: result}}``)
    outputs = result.get("outputs", {args.protocol: result})
    seconds = time.perf_counter() - t0
    for name, res in outputs.items():
        record = {
            "protocol": name,
            "quick": args.quick,
            "seeds": args.seeds,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": torch.cuda.is_available()},
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "checkpoint": {
                "path": _tilde(ckpt),
                **{k: summary.get(k) for k in ("steps", "minutes", "images_per_s", "parameters", "pool_images")},
            },
            "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **({"seeds_requested": args.seeds_requested} if hasattr(args, "seeds_requested") else {}),
            "threads": torch.get_num_threads(),
            "seconds": seconds,
            **{k: v for k, v in res.items() if k != "plot"},
        }
        args.out.mkdir(parents=True, exist_ok=True)
        stem = name + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
        atomic_write_json(args.out / f"{stem}.json", record)
        head = (
            f"# {name}{' (quick)' if args.quick else ''}\n\nSmall pretrained CLIP ({_tilde(ckpt)}), "
            f"../shared/data (small re-encoded subsets, not the official datasets); {record['machine']['cpus']} CPU "
            f"cores ({record['threads']} torch threads), no GPU; {record['date']}; seeds {args.seeds}; "
            f"{seconds:.0f} s; `{record['command']}`.\n\n"
        )
        atomic_write_bytes(args.out / f"{stem}.md", (head + "\n".join(res["table"]) + "\n").encode())
        plot(res, args.out / f"{stem}.png", f"{name} — small pretrained CLIP on ../shared/data")
        print("\n".join(res["table"]))
        print(f"\nwritten: {args.out / stem}.{{json,md,png}} in {seconds:.0f}s")


if __name__ == "__main__":
    main()
