"""Few-shot MTIL-mini (ConDU's second table; issue 19, item 5): 5 training images per class, both task orders,
several seeds. Zero-shot, sequential fine-tuning, WiSE-FT, independent experts and ConDU, full fine-tuning and LoRA,
ConDU with the task id and task-agnostic; Transfer / Average / Last (and BWT, plasticity) per seed, then the mean ±
standard deviation over seeds.

Two steps, both resumable (a run whose ``results.json`` exists is not run again)::

    python benchmarks/fewshot_mtil.py run --work DIR [--seeds 1 2 3] [--orders I II] [--quick]
    python benchmarks/fewshot_mtil.py tables --work DIR [--seeds 1 2 3] [--orders I II] [--out benchmarks/results]

``run`` launches ``recipes/condu.py`` (``accelerate launch --cpu``, one process, one thread) four times per order and
seed, with ``--shots 5 --shot_seed S --seed S`` and the Protocol B config otherwise (200 steps per task, full FT lr
1e-4 or LoRA lr 1e-3, 500 test rows per dataset): the full-FT strategies, ConDU FT task-agnostic, the LoRA strategies
and ConDU LoRA task-agnostic; the experts are cached per order and seed (``--expert_cache``), so ConDU reuses the
independent run's experts. About 35 minutes per order and seed on one thread of the 2-core development machine.
``--quick``: 20 steps per task and 100 test rows (minutes; numbers not meaningful).

``tables`` writes, per order and seed, ``fewshot-order{1,2}-seed{S}.{json,md}`` and the plots
(``benchmarks/continual_tables.py``), and per order ``fewshot-order{1,2}.{json,md}``: each row's metrics as mean ±
sample standard deviation over the seeds, with each seed's value. Paths inside ``DIR`` are written as ``RUN/``.
``python benchmarks/run.py fewshot ...`` forwards here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

#: (run folder, extra recipe flags, strategies)
RUNS = (
    ("full", [], ["zeroshot", "sequential", "wise", "independent", "condu"]),
    ("full-agnostic", ["--task_agnostic", "true"], ["condu"]),
    ("lora", ["--finetune", "lora", "--learning_rate", "1e-3"], ["independent", "condu"]),
    ("lora-agnostic", ["--finetune", "lora", "--learning_rate", "1e-3", "--task_agnostic", "true"], ["condu"]),
)
#: table tag → (run folder, strategy, label); the tags are the ones continual_tables' ConDU targets look for
ROWS = {
    "zeroshot": ("full", "zeroshot", "zeroshot"),
    "sequential": ("full", "sequential", "sequential (FT)"),
    "wise": ("full", "wise", "WiSE-FT"),
    "independent": ("full", "independent", "independent (FT)"),
    "condu": ("full", "condu", "ConDU FT (task id)"),
    "condu_ta": ("full-agnostic", "condu", "ConDU FT (task-agnostic)"),
    "independent_lora": ("lora", "independent", "independent LoRA"),
    "condu_lora": ("lora", "condu", "ConDU LoRA (task id)"),
    "condu_lora_ta": ("lora-agnostic", "condu", "ConDU LoRA (task-agnostic)"),
}
METRICS = (
    ("last", "ACC (Last)"),
    ("bwt", "BWT"),
    ("plasticity", "Plasticity"),
    ("transfer", "Transfer"),
    ("average", "Average"),
)
ORDER_NUMBER = {"I": 1, "II": 2}


def _run_dir(work: Path, order: str, seed: int) -> Path:
    return work / f"o{order}-s{seed}"


def _check_data() -> None:
    if not (REPO.parent / "shared" / "data").is_dir():
        raise SystemExit(f"[fewshot] the datasets folder {REPO.parent / 'shared' / 'data'} is missing")


def run(work: Path, seeds: list[int], orders: list[str], quick: bool) -> None:
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        raise SystemExit(f"[fewshot] no accelerate launcher next to {sys.executable} (the project venv has one)")
    _check_data()
    for seed in seeds:
        for order in orders:
            root = _run_dir(work, order, seed)
            for name, flags, strategies in RUNS:
                out = root / name
                if (out / "results.json").is_file():
                    print(f"[fewshot] {out} done before: kept", flush=True)
                    continue
                cache = work / f"cache-o{order}-s{seed}" / ("lora" if "lora" in name else "full")
                cmd = [
                    str(launcher),
                    "launch",
                    "--cpu",
                    "--num_processes",
                    "1",
                    "--num_cpu_threads_per_process",
                    "1",
                    str(REPO / "recipes" / "condu.py"),
                    "--config",
                    str(REPO / "recipes" / "configs" / "condu.yaml"),
                    "--shots",
                    "5",
                    "--shot_seed",
                    str(seed),
                    "--order",
                    order,
                    "--seed",
                    str(seed),
                    "--max_test",
                    "100" if quick else "500",
                    *(["--max_steps", "20"] if quick else []),
                    *flags,
                    "--expert_cache",
                    str(cache),
                    "--strategy",
                    *strategies,
                    "--output_dir",
                    str(out),
                ]
                print(f"[fewshot] order {order}, seed {seed}: {name}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(root / f"{name}.log", "w") as log:
                    done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                if done.returncode:
                    raise SystemExit(f"[fewshot] {name} failed (exit {done.returncode}); see {root / (name + '.log')}")


def _sanitized(path: Path, work: Path) -> None:
    """Replace the work folder in a written file by ``RUN`` (results carry their sources' paths)."""
    text = path.read_text()
    path.write_text(text.replace(str(work.resolve()), "RUN").replace(str(work), "RUN"))


def aggregate(per_seed: dict[int, dict], order: str) -> tuple[dict, list[str]]:
    """Mean ± sample std over seeds of every row's metrics (``per_seed``: seed → continual_tables JSON)."""
    seeds = sorted(per_seed)
    rows = {}
    for tag, (_, _, label) in ROWS.items():
        have = [s for s in seeds if tag in per_seed[s]["runs"]]
        if not have:
            continue
        values = {m: [per_seed[s]["runs"][tag]["metrics"][m] for s in have] for m, _ in METRICS}
        rows[tag] = {
            "label": label,
            "seeds": have,
            **{
                m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
                for m, v in values.items()
            },
        }
    lines = [
        f"# Few-shot MTIL-mini (5 shots per class), Order {order}, seeds {', '.join(map(str, seeds))}",
        "",
        "Mean ± sample standard deviation over the seeds (each seed draws its own shots, `--shot_seed S --seed S`); "
        "the per-seed tables are `fewshot-order{n}-seed{s}.md`.".replace("{n}", str(ORDER_NUMBER[order])),
        "",
        "| strategy | " + " | ".join(name for _, name in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for row in rows.values():
        cells = [f"{row[m]['mean']:.1f} ± {row[m]['std']:.1f}" for m, _ in METRICS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (ACC (Last) / Transfer / Average):", ""]
    for row in rows.values():
        per = "; ".join(
            f"seed {s}: {row['last']['values'][i]:.1f} / {row['transfer']['values'][i]:.1f} / "
            f"{row['average']['values'][i]:.1f}"
            for i, s in enumerate(row["seeds"])
        )
        lines.append(f"- {row['label']}: {per}")
    return {"order": order, "seeds": seeds, "rows": rows}, lines


def tables(work: Path, seeds: list[int], orders: list[str], out: Path) -> None:
    import continual_tables

    out.mkdir(parents=True, exist_ok=True)
    for order in orders:
        n = ORDER_NUMBER[order]
        per_seed = {}
        for seed in seeds:
            root = _run_dir(work, order, seed)
            sources = [
                f"{tag}={root / run_name / 'results.json'}@{strategy}#{label}"
                for tag, (run_name, strategy, label) in ROWS.items()
                if (root / run_name / "results.json").is_file()
            ]
            if not sources:
                print(f"[fewshot] order {order}, seed {seed}: no results in {root}: skipped", flush=True)
                continue
            stem = out / f"fewshot-order{n}-seed{seed}"
            continual_tables.main(
                [
                    str(stem),
                    *sources,
                    "--kind",
                    "condu",
                    "--title",
                    f"Few-shot MTIL-mini (5 shots per class), Order {order}, seed {seed} (shot draw {seed})",
                ]
            )
            for suffix in (".json", ".md"):
                _sanitized(stem.with_suffix(suffix), work)
            per_seed[seed] = json.loads(stem.with_suffix(".json").read_text())
        if not per_seed:
            continue
        record, lines = aggregate(per_seed, order)
        (out / f"fewshot-order{n}.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / f"fewshot-order{n}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["run", "tables"])
    p.add_argument("--work", type=Path, required=True, help="folder for the runs and expert caches (not the repo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--orders", nargs="+", choices=sorted(ORDER_NUMBER), default=["I", "II"])
    p.add_argument("--quick", action="store_true", help="run: 20 steps per task, 100 test rows")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="tables: output folder")
    args = p.parse_args(argv)
    if args.step == "run":
        run(args.work, args.seeds, args.orders, args.quick)
    else:
        tables(args.work, args.seeds, args.orders, args.out)


if __name__ == "__main__":
    main()
