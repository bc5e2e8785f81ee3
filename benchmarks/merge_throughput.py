"""Throughput and memory of hf_cft's merges (issue 18, item 2): method × T × model shape → time / bound and peak
memory / one model.

Two modes, both on random fp32 deltas of the true CLIP shapes (ViT-B/16, ViT-L/14; every floating-point key):

- ``memory``: key by key, as the streaming merge runs: for each key, T random deltas of its shape are drawn (not
  timed), then for every method and repeat the bound — cloning the key's T inputs once — and the merge of that key
  (:func:`hf_cft.merging.streaming.merge_deltas`) are timed one after the other (bound, method, bound, method, …),
  summed over the keys per repeat. Only one key's T inputs exist at a time, so ViT-L/14 with T = 8 fits in memory.
  Each row reports the median over repeats of time / bound (interleaving makes the ratio robust to the load of a
  shared machine, which the seconds are not);
- ``files``: θ⁰ and T fine-tuned models saved as safetensors folders in a cache folder outside the repository
  (``$HF_CFT_CACHE/merge-bench``, else ``~/.cache/hf_cft/merge-bench``), merged by ``hf-cft merge`` in a child
  process (its peak RSS is the peak memory); the bound is copying the input files (θ⁰ + T models) once, timed
  alternately with the merge. Reported with and without start-up: the child's wall time, and the time of
  ``hf_cft.cli.main`` inside it (the merge command, from its imports to the written folder).

Example (the table in docs/methods/merging-config.md, benchmarks/results/merge_throughput.md)::

    nice -n 5 python benchmarks/merge_throughput.py --mode memory --shapes vit-b16 vit-l14 --T 2 4 8
    nice -n 5 python benchmarks/merge_throughput.py --mode files --shapes vit-b16 --T 2 8 --methods task_arithmetic ties
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {  # method → options (the registry's defaults otherwise)
    "task_arithmetic": {},
    "magmax": {},
    "dare": {"density": 0.1},
    "dare_counter": {"density": 0.1, "rng": "counter"},
    "consensus": {},
    "model_stock": {},
    "ties": {"density": 0.2},
    "magnitude_prune": {},
    "breadcrumbs": {},
    "della": {},
    "della_counter": {"rng": "counter"},
    "tsv_m": {},
    "iso_c": {},
    "iso_cts": {},
}
#: the issue's goal per group: element-wise within 2× of the bound, a selection step within 4×, SVD: time only
GROUPS = {
    "task_arithmetic": "element-wise",
    "magmax": "element-wise",
    "dare": "element-wise",
    "dare_counter": "element-wise",
    "consensus": "element-wise",
    "model_stock": "element-wise",
    "ties": "selection",
    "magnitude_prune": "selection",
    "breadcrumbs": "selection",
    "della": "selection",
    "della_counter": "selection",
    "tsv_m": "svd",
    "iso_c": "svd",
    "iso_cts": "svd",
}
DEFAULT_METHODS = [m for m in METHODS if GROUPS[m] not in ("svd", "floor")]


def method_of(name: str) -> str:
    """The registered method of a row: ``<method>_counter`` is ``<method>`` with ``rng="counter"``."""
    return name.removesuffix("_counter")


def _floor_select(tensors):
    """TIES' and breadcrumbs' least step: one exact selection (numpy's introselect) of each input's magnitudes."""
    import numpy as np

    for t in tensors:
        mag = np.abs(t.numpy().reshape(-1))
        mag.partition(int(0.8 * mag.size))


def _floor_draws(tensors):
    """DARE's and DELLA's least step: one uniform draw per entry from the stream that reproduces torch's CPU
    generator (one thread: the compiled MT19937 where numba is installed and ``HF_CFT_FUSED`` is not 0, numpy's
    MT19937 else; the recorded rows ran with ``HF_CFT_FUSED=0``)."""
    from hf_cft.merging.baselines import _BernoulliStream

    stream = _BernoulliStream(0)
    for t in tensors:
        stream.uniform_numpy(t.numel())


def _floor_rowsort(tensors):
    """DELLA's least step beyond the draws: sorting each row's magnitudes (numpy's sort, one thread)."""
    import numpy as np

    for t in tensors:
        np.sort(np.abs(t.numpy().reshape(t.shape[0] if t.ndim > 1 else 1, -1)), axis=1)


#: the least work of a method family (not a merge), timed against the same bound: how far the goals are reachable
FLOORS = {"floor_select": _floor_select, "floor_draws": _floor_draws, "floor_rowsort": _floor_rowsort}
METHODS.update({name: {} for name in FLOORS})
GROUPS.update(dict.fromkeys(FLOORS, "floor"))


def clip_config(shape: str):
    from hf_cft.testing import clip_vit_b16_config

    config = clip_vit_b16_config()
    if shape == "vit-l14":
        from transformers import CLIPConfig

        config = CLIPConfig(
            text_config=dict(config.text_config.to_dict(), hidden_size=768, intermediate_size=3072,
                             num_attention_heads=12, projection_dim=768),
            vision_config=dict(config.vision_config.to_dict(), hidden_size=1024, intermediate_size=4096,
                               num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768),
            projection_dim=768,
        )
    return config


def shapes_of(shape: str) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(clip_config(shape))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point() and k != "logit_scale"}


def bench_memory(shape: str, ts: list[int], methods: list[str], reps: int) -> list[dict]:
    """Key by key: per key, T fresh random deltas; per method and repeat, the bound (clone the key's T inputs) and the
    merge of that key, timed alternately; per repeat the sums over keys; per row the median of the ratios."""
    from hf_cft.merging.streaming import merge_deltas

    shapes = shapes_of(shape)
    model_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    rows = []
    for t in ts:
        g = torch.Generator().manual_seed(t)
        took = {m: [0.0] * reps for m in methods}
        bound = {m: [0.0] * reps for m in methods}
        for key, s in shapes.items():
            deltas = [{key: 0.01 * torch.randn(s, generator=g)} for _ in range(t)]
            for m in methods:
                for r in range(reps):
                    t0 = time.perf_counter()
                    for d in deltas:
                        d[key].clone()
                    t1 = time.perf_counter()
                    if m in FLOORS:
                        FLOORS[m]([d[key] for d in deltas])
                    else:
                        merge_deltas(deltas, method_of(m), METHODS[m])
                    t2 = time.perf_counter()
                    bound[m][r] += t1 - t0
                    took[m][r] += t2 - t1
            del deltas
        for m in methods:
            ratios = [a / b for a, b in zip(took[m], bound[m])]
            rows.append({"mode": "memory", "shape": shape, "T": t, "method": m, "group": GROUPS[m], "reps": reps,
                         "seconds": round(statistics.median(took[m]), 3),
                         "bound_seconds": round(statistics.median(bound[m]), 3),
                         "time_over_bound": round(statistics.median(ratios), 2),
                         "ratios": [round(x, 2) for x in ratios], "model_bytes": model_bytes})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _save_model(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))


def prepare_files(shape: str, t_max: int, cache: Path, dtype: torch.dtype) -> Path:
    """θ⁰ and ``t_max`` fine-tuned models of ``shape`` (random, fp32 or fp16 storage), written once."""
    root = cache / f"{shape}-{str(dtype).split('.')[-1]}"
    done = root / "done.json"
    if done.is_file() and json.loads(done.read_text())["T"] >= t_max:
        return root
    shutil.rmtree(root, ignore_errors=True)
    from transformers import CLIPModel

    config = clip_config(shape)
    with torch.device("meta"):
        state = CLIPModel(config).state_dict()
    g = torch.Generator().manual_seed(0)
    base = {}
    for k, v in state.items():
        base[k] = (0.02 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
    _save_model(root / "base", base)
    config.save_pretrained(root / "base")
    for i in range(t_max):
        ft = {k: (v.float() + 0.001 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v
              for k, v in base.items()}
        _save_model(root / f"ft{i}", ft)
        config.save_pretrained(root / f"ft{i}")
        del ft
    done.write_text(json.dumps({"T": t_max}))
    return root


_PEAK = (
    "import sys, time\nt0 = time.perf_counter()\nfrom hf_cft.cli import main\nrc = main(sys.argv[1:])\n"
    "took = time.perf_counter() - t0\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "print('PEAK', int(hwm) * 1024)\nprint('MAIN', took)\nsys.exit(rc)\n"
)


def _child_merge(argv: list[str]) -> tuple[float, float, int]:
    """Run ``hf-cft merge`` in a child; (seconds of the child, seconds of ``hf_cft.cli.main`` in it, the child's peak
    RSS in bytes: VmHWM of its own address space, which a fork's inherited pages do not inflate as ``ru_maxrss``)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK, *argv], check=True, capture_output=True, text=True)
    took = time.perf_counter() - t0
    lines = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if line.startswith(("PEAK", "MAIN")))
    return took, float(lines["MAIN"]), int(lines["PEAK"])


def _child_baseline() -> tuple[int, float]:
    """Peak RSS (bytes) and wall time (s) of a child that only starts Python and imports what ``hf-cft merge`` loads
    (the command line, the hub helpers, the streaming merge and its methods): the start-up part of a merge."""
    code = ("import hf_cft.cli, hf_cft.hub, hf_cft.merging.streaming\n"
            "from hf_cft.merging.registry import methods\nmethods()\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) * 1024, time.perf_counter() - t0


def bench_files(shape: str, ts: list[int], methods: list[str], reps: int, cache: Path, dtype: torch.dtype) -> list[dict]:
    root = prepare_files(shape, max(ts), cache, dtype)
    model_bytes = (root / "base" / "model.safetensors").stat().st_size
    baseline, startup = _child_baseline()
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=str(cache)))
    try:
        for t in ts:
            inputs = [str(root / f"ft{i}") for i in range(t)]

            def copy_inputs(inputs=inputs):
                for i, folder in enumerate([root / "base", *map(Path, inputs)]):
                    shutil.copyfile(folder / "model.safetensors", scratch / f"copy{i}.safetensors")

            for method in methods:
                argv = ["merge", "--base", str(root / "base"), "--method", method_of(method), "--adapters", *inputs,
                        "--out", str(scratch / "out"), "--overwrite"]
                for name, value in METHODS[method].items():
                    argv += ["--param", f"{name}={value}"]
                copies, runs = [], []
                for _ in range(reps):  # copy, merge, copy, merge, ...: both see the same load
                    t0 = time.perf_counter()
                    copy_inputs()
                    copies.append(time.perf_counter() - t0)
                    for f in scratch.glob("copy*.safetensors"):
                        f.unlink()
                    runs.append(_child_merge(argv))
                took = [r[0] for r in runs]
                main_took = [r[1] for r in runs]
                peak = max(r[2] for r in runs)
                rows.append({"mode": "files", "shape": shape, "storage": str(dtype).split(".")[-1], "T": t,
                             "method": method, "group": GROUPS[method], "reps": reps,
                             "seconds": round(statistics.median(took), 3),
                             "main_seconds": round(statistics.median(main_took), 3),
                             "copy_seconds": round(statistics.median(copies), 3),
                             "time_over_copy": round(statistics.median(a / c for a, c in zip(took, copies)), 2),
                             "main_over_copy": round(statistics.median(a / c for a, c in zip(main_took, copies)), 2),
                             "startup_seconds": round(startup, 3),
                             "peak_rss_bytes": peak, "import_rss_bytes": baseline, "model_bytes": model_bytes,
                             "peak_over_model": round(peak / model_bytes, 2),
                             "peak_above_imports_over_model": round((peak - baseline) / model_bytes, 2)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


GOALS = {"element-wise": 2.0, "selection": 4.0}  # issue 18: time / bound; peak memory below 1.5× one model (T = 8)
SHAPE_NAMES = {"vit-b16": "ViT-B/16", "vit-l14": "ViT-L/14"}


def pivot(rows: list[dict]) -> list[str]:
    """The memory rows as one table: a line per method, a column per (shape, T), each cell the time / bound of every
    labelled run (``--label``, e.g. the torch kernels, then the fused ones) that measured it, in the order of the
    ``runs`` column, with the goal met (✓) or not (✗) by the last of them."""
    labels = list(dict.fromkeys(r.get("label", "") for r in rows))
    cols = list(dict.fromkeys((r["shape"], r["T"]) for r in rows))
    cell = {(r.get("label", ""), r["method"], r["shape"], r["T"]): r["time_over_bound"] for r in rows}
    out = ["time / bound, the median of each row's repeats:", "",
           "| method | goal | runs | " + " | ".join(f"{SHAPE_NAMES[s]} T = {t}" for s, t in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
    for method in dict.fromkeys(r["method"] for r in rows):
        goal = GOALS.get(GROUPS[method])
        mine = [label for label in labels if any(key[0] == label and key[1] == method for key in cell)]
        cells = []
        for s, t in cols:
            values = [cell.get((label, method, s, t)) for label in mine]
            text = " / ".join("—" if v is None else f"{v:g}" for v in values)
            if goal is not None and values[-1] is not None:
                text += " ✓" if values[-1] <= goal else " ✗"
            cells.append(text)
        runs = " / ".join(label or "—" for label in mine)
        out.append(f"| {method} | {'—' if goal is None else f'≤ {goal:g}'} | {runs} | " + " | ".join(cells) + " |")
    return out


def render(runs: list[dict]) -> str:
    """Markdown tables of this script's JSON outputs (``--render``): the memory rows, then the files rows."""
    rows = [dict(r, command=run.get("command", ""), label=run.get("label", "")) for run in runs for r in run["rows"]]
    out = []
    mem = [r for r in rows if r["mode"] == "memory"]
    if mem:
        out += pivot(mem) + [""]
        out += ["| shape | T | method | group | time (s) | bound: clone (s) | time / bound | goal | met |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in mem:
            goal = GOALS.get(r["group"])
            met = "—" if goal is None else ("yes" if r["time_over_bound"] <= goal else "no")  # floors: no goal
            out.append(f"| {SHAPE_NAMES[r['shape']]} | {r['T']} | {r['method']} | {r['group']} | {r['seconds']} | "
                       f"{r['bound_seconds']} | {r['time_over_bound']} (reps {r['ratios']}) | "
                       f"{'—' if goal is None else f'≤ {goal:g}'} | {met} |")
    files = [r for r in rows if r["mode"] == "files"]
    if files:
        out += ["", "| shape | T | method | CLI wall (s) | start-up alone (s) | `main()` (s) | bound: copy (s) | "
                "wall / copy | `main()` / copy | peak / one model | peak above imports / one model |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in files:
            out.append(f"| {SHAPE_NAMES[r['shape']]} | {r['T']} | {r['method']} | {r['seconds']} | "
                       f"{r.get('startup_seconds', '—')} | {r.get('main_seconds', '—')} | {r['copy_seconds']} | "
                       f"{r['time_over_copy']} | {r.get('main_over_copy', '—')} | {r['peak_over_model']} | "
                       f"{r['peak_above_imports_over_model']} |")
    commands = sorted({r["command"] for r in rows if r["command"]})
    if commands:
        out += ["", "Commands:", "", *[f"    nice -n 5 python {c}" for c in commands]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["memory", "files"], default="memory")
    parser.add_argument("--shapes", nargs="+", default=["vit-b16", "vit-l14"], choices=["vit-b16", "vit-l14"])
    parser.add_argument("--T", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="default: every method but the SVD ones (tsv_m, iso_c, iso_cts: slow, time only)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--storage", choices=["float32", "float16"], default="float32",
                        help="files mode: dtype of the saved models (float16 halves the disk space)")
    parser.add_argument("--cache", default=None, help="folder for the saved models (outside the repository)")
    parser.add_argument("--output", help="JSON file for the rows")
    parser.add_argument("--render", nargs="+", metavar="JSON",
                        help="merge these outputs (or earlier --output files of --render) into --output (JSON) and "
                        "--markdown instead of measuring")
    parser.add_argument("--markdown", help="with --render: the Markdown tables")
    parser.add_argument("--label", default="", help="a name for this run's rows in the rendered tables")
    args = parser.parse_args()
    if args.render:
        loaded = [json.loads(Path(f).read_text()) for f in args.render]  # one run each, or an earlier render's runs
        runs = [run for d in loaded for run in d.get("runs", [d])]
        if args.output:
            Path(args.output).write_text(json.dumps({"runs": runs}, indent=2) + "\n")
        text = render(runs)
        if args.markdown:
            Path(args.markdown).write_text(text)
        print(text)
        return
    from hf_cft.utils import hf_cft_cache_dir

    cache = Path(args.cache) if args.cache else hf_cft_cache_dir("merge-bench")
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    load_before = [round(x, 2) for x in os.getloadavg()]  # the ratios hold for an idle machine: record its load
    for shape in args.shapes:
        if args.mode == "memory":
            rows += bench_memory(shape, args.T, args.methods, args.reps)
        else:
            rows += bench_files(shape, args.T, args.methods, args.reps, cache, getattr(torch, args.storage))
    if args.output:
        info = {"machine": f"{os.cpu_count()} CPU cores", "torch_threads": torch.get_num_threads(),
                "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "command": " ".join(sys.argv), "label": args.label,
                "fused_kernels": __import__("hf_cft.merging.fused", fromlist=["available"]).available(), "rows": rows}
        Path(args.output).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
