"""One-shot multi-task merging (issue 18, item 5): every expert fine-tuned once from θ⁰, every method merges all of
them in one go, the merged model is evaluated on every task — the FusionBench protocol, on MTIL-mini.

The experts are those of an ``independent`` run of the continual recipes (``<run>/independent/store/experts``,
one delta per task in the stream's order; with ``--expert_cache`` every other θ⁰-started strategy of Protocol B
trains exactly these), so the table sits beside that run's Protocol B rows::

    accelerate launch recipes/condu.py --config recipes/configs/condu.yaml --order I --max_test 500 \\
        --use_cpu true --expert_cache ~/.cache/hf_cft/expert-cache --output_dir RUN --strategy independent
    python benchmarks/oneshot_merge.py --run RUN --order I --max_test 500 --out benchmarks/results/oneshot-full

Rows: zero-shot θ⁰; the experts themselves (task id, the upper bound); every registered merging method of
``hf-cft merge`` with its defaults (one merged model for all tasks), RegMean and Fisher merging with each expert's
own training data as calibration (its first ``--calibration_batches`` evaluation batches for RegMean, as the
``regmean`` strategy, and ``--fisher_batches`` for Fisher's per-example gradients; eval transform); and the
methods that need the task id at inference: TALL masks, EMR and ConDU (one-shot ``unify`` over all experts,
each task answered by its own rebuilt expert). SLERP takes two inputs and has no 8-task row. Writes
``OUT.json`` and ``OUT.md`` (accuracy per task, average, normalised average = mean of accuracy / the expert's own
accuracy, merge seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# method → options (the registry's defaults otherwise); every method of `hf-cft merge --method` but SLERP
SHARED = [
    "task_arithmetic",
    "average",
    "ties",
    "dare",
    "magmax",
    "consensus",
    "breadcrumbs",
    "della",
    "model_stock",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "regmean",
    "fisher",
]
TASK_ID = ["tall", "emr", "condu"]


def _tasks(args):
    from hf_cft.continual import mtil_mini_tasks

    return mtil_mini_tasks(args.order, args.data_dir, shots=args.shots, shot_seed=0, max_test=args.max_test)


def _experts(run: Path, names: list[str]):
    from hf_cft.continual.weights import DeltaStore
    from hf_cft.errors import HfCftError

    store = DeltaStore(run / "independent" / "store" / "experts")
    out = []
    for i, name in enumerate(names):
        try:
            delta, meta = store.load_with_metadata(f"{i:03d}")
        except HfCftError as exc:  # a missing or torn expert: one line naming it, not a traceback
            raise SystemExit(f"oneshot_merge.py: --run {run}: {exc}") from None
        if meta.get("task") != name:
            raise SystemExit(f"{store.path(f'{i:03d}')} is the expert of {meta.get('task')!r}, expected {name!r}")
        out.append({k: v.float() for k, v in delta.items()})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="output_dir of a continual recipe run that includes 'independent'")
    p.add_argument(
        "--checkpoint", default="~/.cache/hf_cft/benchmark-clip-described/model", help="θ⁰ of the run (a CLIP folder)"
    )
    p.add_argument("--order", default="I", help="the run's MTIL-mini task order (I or II)")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: HF_CFT_DATA_DIR or ../shared/data)")
    p.add_argument("--shots", type=int, default=0, help="the run's --shots (0: every training row)")
    p.add_argument("--max_test", type=int, default=500, help="test images per task (the run's --max_test)")
    p.add_argument("--eval_batch_size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--calibration_batches", type=int, default=4, help="RegMean: evaluation batches per expert")
    p.add_argument(
        "--fisher_batches", type=int, default=1, help="Fisher: evaluation batches per expert (per-example gradients)"
    )
    p.add_argument("--methods", nargs="*", default=None, help="subset of the rows (default: all)")
    p.add_argument("--label", default="", help="a label recorded in OUT.json (e.g. 'full FT, order I')")
    p.add_argument("--out", required=True, help="output path without extension: OUT.json and OUT.md")
    args = p.parse_args(argv)

    from hf_cft.continual import ContinualConfig, ContinualRunner, ZeroShotStrategy
    from hf_cft.data.transforms import apply_image_transform
    from hf_cft.merging import decouple, emr, emr_task_delta, merge_deltas, tall_masks, unify
    from hf_cft.merging.data_dependent import clip_log_probs
    from hf_cft.recipe_utils import load_clip, resolve_checkpoint

    torch.manual_seed(0)
    model, tokenizer, transform = load_clip(resolve_checkpoint(str(Path(args.checkpoint).expanduser())))
    tasks = _tasks(args)
    names = [t.name for t in tasks]
    runner = ContinualRunner(
        ZeroShotStrategy(),
        tasks,
        model,
        tokenizer,
        tempfile.mkdtemp(prefix="oneshot-"),
        ContinualConfig(eval_batch_size=args.eval_batch_size, use_cpu=True),
        transform=transform,
        plot=False,
    )
    ev, eval_tasks = runner.evaluator, runner.eval_tasks
    experts = _experts(Path(args.run).expanduser(), names)
    T = len(experts)

    def calibration(n):
        plain = dataclasses.replace(transform, train=False)
        loaders = [ev.loader(apply_image_transform(t.train, plain, name=t.name)) for t in tasks]
        return [[b for _, b in zip(range(n), loader)] for loader in loaders]

    def shared(method):
        if method == "average":
            return merge_deltas(experts, "task_arithmetic", {"weight": 1.0 / T})
        if method == "regmean":
            return merge_deltas(
                experts, "regmean", extra={"model": model, "calibration": calibration(args.calibration_batches)}
            )
        if method == "fisher":
            fns = [clip_log_probs(tokenizer, t.classnames, t.templates) for t in tasks]
            return merge_deltas(
                experts,
                "fisher",
                extra={"model": model, "calibration": calibration(args.fisher_batches), "log_probs": fns},
            )
        return merge_deltas(experts, method)

    def per_task(method):
        if method == "tall":
            res = tall_masks(experts)
            return [res.task_delta(i) for i in range(T)]
        if method == "emr":
            res = emr(experts)
            return [emr_task_delta(res, i) for i in range(T)]
        res = unify(experts)
        return [decouple(res, i) for i in range(T)]

    rows: dict[str, dict] = {}
    wanted = args.methods
    plan = ["zeroshot", "experts", *SHARED, *TASK_ID]
    for method in plan:
        if wanted and method not in wanted:
            continue
        t0 = time.perf_counter()
        if method == "zeroshot":
            deltas = [None] * T
        elif method == "experts":
            deltas = experts
        elif method in SHARED:
            merged = shared(method)
            deltas = [merged] * T
        else:
            deltas = per_task(method)
        merge_s = time.perf_counter() - t0
        accs = [ev.accuracy(task, d) for task, d in zip(eval_tasks, deltas)]
        rows[method] = {
            "accuracy": accs,
            "average": statistics.fmean(accs),
            "merge_s": merge_s,
            "task_id": method in TASK_ID or method == "experts",
        }
        print(
            f"{method:16s} avg {rows[method]['average']:6.2f}  merge {merge_s:7.1f} s  "
            + " ".join(f"{a:5.1f}" for a in accs),
            flush=True,
        )
    if "experts" in rows:
        own = rows["experts"]["accuracy"]
        for r in rows.values():
            r["normalized"] = 100 * statistics.fmean(a / o for a, o in zip(r["accuracy"], own))
    result = {
        "tasks": names,
        "order": args.order,
        "max_test": args.max_test,
        "shots": args.shots,
        "checkpoint": args.checkpoint,
        "label": args.label,
        "rows": rows,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "python benchmarks/oneshot_merge.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    names = result["tasks"]
    head = "| method | task id | " + " | ".join(names) + " | average | normalised | merge s |"
    lines = [
        f"# One-shot merge of {len(names)} experts, MTIL-mini Order {result['order']} {result['label']}".rstrip(),
        "",
        f"`{result['command']}` ({result['date']}, {result['machine']}). Every expert fine-tuned once from θ⁰ (the "
        "`independent` run's experts); every method merges all of them once with its defaults; accuracy (%) on "
        f"the first {result['max_test']} test rows of each task. Normalised = mean over tasks of accuracy / the "
        "expert's own accuracy.",
        "",
        head,
        "|" + "---|" * (len(names) + 5),
    ]
    for method, r in result["rows"].items():
        cells = " | ".join(f"{a:.1f}" for a in r["accuracy"])
        norm = f"{r['normalized']:.1f}" if "normalized" in r else ""
        lines.append(
            f"| {method} | {'yes' if r['task_id'] else 'no'} | {cells} | {r['average']:.2f} | {norm} | "
            f"{r['merge_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
