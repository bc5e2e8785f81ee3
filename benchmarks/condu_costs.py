"""ConDU costs on a full-size architecture (issue: unify memory, unify time, storage, routed inference).

    python benchmarks/condu_costs.py                   # ViT-B/16-shaped CLIP (random weights), 8 tasks
    python benchmarks/condu_costs.py --shape small     # the small benchmark CLIP shape (seconds)
    python benchmarks/condu_costs.py --device cpu --parts unify     # sessions on the CPU only, no routing

1. Writes θ⁰ and T random task deltas (every floating-point key but ``logit_scale``; δ_t = 1e-3·(shared + own)
   so that signs partly agree, as fine-tuning deltas of one model do) as safetensors files.
2. In a fresh process, unifies them one session per task with ``DeltaFusionMerger`` (each delta read from its
   file), and reports the peak resident memory above the process's baseline, in units of one model's fp32
   size, the time of every session, and the storage of the bundle against keeping every expert / 1-byte masks.
   The merger computes on ``--device`` (default: CUDA when present, else the CPU). Each session of n tasks is
   set against its memory-traffic bound, measured in the same process right after it: the time to read and write
   n model-sized fp32 tensors once (cloning the merger's unified delta n times, key by key) — what reading every
   stored expert's and the new delta's slices once and writing them once would cost.
3. Routed inference (model on ``--device``): ``SemanticRouter`` with top-K (K = 4, + θ⁰) against routing to all
   T experts, on one batch of images: median wall time of ``--repeats`` runs, interleaved, and the number of
   expert builds and forward passes.

``--parts`` picks 2 (``unify``) and/or 3 (``routing``). Writes
``benchmarks/results/condu_costs[-small]-{cpu,gpu}.{json,md}``. Medians/ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _build(shape: str):
    """The same random CLIP as the step-cost benchmark (ViT-B/16 shape or the small benchmark shape)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mergetune_step_cost import build

    names = [f"class{i}" for i in range(10)]
    model, tok, size = build(shape, names)
    return model, tok, size, names


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's own peak resident memory. Not ``getrusage().ru_maxrss``: Linux carries the parent's peak
    over fork + exec into it, so a worker started by a large parent would report the parent's footprint."""
    return _status_mb("VmHWM")


def clone_bound(tensors: dict, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds to read and write ``n`` copies of ``tensors`` once: each tensor cloned ``n`` times, key
    by key (a clone is freed before the next, so memory grows by one key)."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        for t in tensors.values():
            c = t.clone()
            del c
    return time.perf_counter() - t0, time.process_time() - c0


def worker(folder: Path, tasks: int, load: str, device: str = "cpu") -> dict:
    """Unify the deltas of ``folder`` one session per task, in this (fresh) process: ``stream`` hands add_task the
    file path (read key by key), ``memory`` loads each whole delta first (``safetensors.torch.load_file``). Right
    after each session of n tasks, its bound (:func:`clone_bound` of u, n times) is measured under the same load
    of the machine (its clones add one key to the peak memory, well below the sessions' own)."""
    from safetensors.torch import load_file

    from hf_cft.merging import DeltaFusionMerger

    merger = DeltaFusionMerger(device=device)
    baseline = _rss_mb()
    sessions, bounds, cpu, bounds_cpu = [], [], [], []
    for t in range(tasks):
        c0, t0 = time.process_time(), time.perf_counter()
        path = str(folder / f"delta{t}.safetensors")
        delta = path if load == "stream" else load_file(path)
        merger.add_task(delta, f"task{t}")
        del delta
        if device != "cpu":
            torch.cuda.synchronize()
        sessions.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        wall, busy = clone_bound(merger.unified_delta, t + 1)
        bounds.append(wall)
        bounds_cpu.append(busy)
    return {
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _peak_rss_mb(),
        "session_seconds": sessions,
        "bound_seconds": bounds,
        "session_cpu_seconds": cpu,
        "bound_cpu_seconds": bounds_cpu,
        "threads": torch.get_num_threads(),
        "device": str(merger.device),
        **merger.storage_bytes(),
    }


def _routing(merger, model, tok, names, size, a, device, g) -> dict:
    """Median seconds of routed top-K + θ⁰ and of all T experts on one batch, ``a.repeats`` interleaved repeats
    (each mode warmed up once first: text heads cached), and each mode's router stats."""
    from hf_cft.merging import SemanticRouter

    model.to(device)
    pixels = torch.randn(a.batch, 3, size, size, generator=g).to(device)
    routers = {
        label: SemanticRouter(merger, model, tok, top_k=k) for label, k in (("top_k", a.top_k), ("all", a.tasks))
    }
    times = {label: [] for label in routers}
    for r in routers.values():
        r.logits(pixels, names, ["a photo of a {}."])  # warm-up (caches text heads)
        r.stats.reset()
    for _ in range(a.repeats):
        for label, r in routers.items():  # interleaved, so that a load change of the machine hits both modes
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r.logits(pixels, names, ["a photo of a {}."])
            if device == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - t0)
    timing = {label: statistics.median(ts) for label, ts in times.items()}
    stats = {label: json.loads(json.dumps(r.stats.__dict__, default=str)) for label, r in routers.items()}
    return {
        "median_seconds": timing,
        "seconds": times,
        "ratio_top_k_vs_all": timing["top_k"] / timing["all"],
        "stats": stats,
        "batch": a.batch,
        "top_k": a.top_k,
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["vit-b16", "small"], default="vit-b16")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, else cpu)")
    p.add_argument("--parts", nargs="+", choices=["unify", "routing"], default=["unify", "routing"])
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads here and in the workers (default: torch's own)"
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--load", choices=["stream", "memory"], default="stream", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.tasks, a.load, device)))
        return
    from safetensors.torch import save_file

    from hf_cft.merging import DeltaFusionMerger
    from hf_cft.merging.condu import compute_device

    compute_device(device)  # a bad --device is refused before the deltas are written
    model, tok, size, names = _build(a.shape)
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point() and k != "logit_scale"]
    model_bytes = sum(model.state_dict()[k].numel() * 4 for k in keys)
    g = torch.Generator().manual_seed(0)
    result = {"shape": a.shape, "tasks": a.tasks, "model_fp32_bytes": model_bytes, "parts": a.parts}
    mb = 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shared = {k: torch.randn(model.state_dict()[k].shape, generator=g) for k in keys}
        for t in range(a.tasks):
            delta = {k: 1e-3 * (shared[k] + torch.randn(shared[k].shape, generator=g)) for k in keys}
            save_file(delta, str(folder / f"delta{t}.safetensors"))
        del shared, delta
        if "unify" in a.parts:
            runs = {}
            for load in ("stream", "memory"):  # each in a fresh process, so that its peak RSS is its own
                t0 = time.perf_counter()
                cmd = [sys.executable, __file__, "--shape", a.shape, "--tasks", str(a.tasks), "--worker", str(folder)]
                cmd += ["--load", load, "--device", device] + (["--threads", str(a.threads)] if a.threads else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[load] = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[load]["process_wall_seconds"] = time.perf_counter() - t0
            unify = runs["stream"]
            result.update(
                {
                    "unify": unify,
                    "unify_process_wall_seconds": unify["process_wall_seconds"],
                    "peak_memory_in_models": (unify["peak_rss_mb"] - unify["baseline_rss_mb"]) * mb / model_bytes,
                    "peak_memory_in_models_whole_deltas": (
                        runs["memory"]["peak_rss_mb"] - runs["memory"]["baseline_rss_mb"]
                    )
                    * mb
                    / model_bytes,
                    "unify_whole_deltas": runs["memory"],
                    "storage_ratio_bundle_vs_experts": unify["bundle"] / unify["experts"],
                    "session_over_bound": [s / b for s, b in zip(unify["session_seconds"], unify["bound_seconds"])],
                    "session_over_bound_cpu": [
                        s / b for s, b in zip(unify["session_cpu_seconds"], unify["bound_cpu_seconds"])
                    ],
                    "session_over_bound_whole_deltas": [
                        s / b for s, b in zip(runs["memory"]["session_seconds"], runs["memory"]["bound_seconds"])
                    ],
                }
            )
            mem = runs["memory"]
            rows += [
                f"| peak memory while unifying {a.tasks} deltas streamed from their files (above baseline) | "
                f"{(unify['peak_rss_mb'] - unify['baseline_rss_mb']):.0f} MiB = {result['peak_memory_in_models']:.2f} "
                "models |",
                f"| the same, each delta loaded whole first (`load_file`) | "
                f"{(mem['peak_rss_mb'] - mem['baseline_rss_mb']):.0f} MiB = "
                f"{result['peak_memory_in_models_whole_deltas']:.2f} models |",
                "| unify time per session, streamed (s) | "
                + ", ".join(f"{s:.2f}" for s in unify["session_seconds"])
                + " |",
                "| unify time per session, whole deltas (s) | "
                + ", ".join(f"{s:.2f}" for s in mem["session_seconds"])
                + " |",
                f"| bundle (u + packed masks + prototypes) | {unify['bundle'] / mb:.1f} MiB |",
                f"| bundle with 1-byte masks | {unify['bundle_bool_masks'] / mb:.1f} MiB |",
                f"| every expert kept (fp32) | {unify['experts'] / mb:.1f} MiB |",
                f"| bundle / experts | {result['storage_ratio_bundle_vs_experts']:.3f} |",
            ]
        if "routing" in a.parts:  # the merger rebuilt here (same deltas) with random prototypes per task
            merger = DeltaFusionMerger(base_model=model)
            for t in range(a.tasks):
                protos = torch.nn.functional.normalize(
                    torch.randn(len(names), model.config.projection_dim, generator=g), dim=-1
                )
                merger.add_task(str(folder / f"delta{t}.safetensors"), f"task{t}", prototypes=protos, classnames=names)
    if "routing" in a.parts:
        routing = _routing(merger, model, tok, names, size, a, device, g)
        result["routing"] = routing
        timing, st = routing["median_seconds"], routing["stats"]["top_k"]
        rows.append(
            f"| routed inference, top-{a.top_k} + θ⁰ vs all {a.tasks} experts (median s, batch {a.batch}) | "
            f"{timing['top_k']:.3f} vs {timing['all']:.3f} (ratio {routing['ratio_top_k_vs_all']:.2f}); per batch "
            f"top-{a.top_k}: {st['expert_builds'] / a.repeats:.1f} builds, {st['expert_samples'] / a.repeats:.0f} "
            "expert image passes |"
        )
    result["machine"] = {
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
    }
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stem = "condu_costs" + ("-small" if a.shape == "small" else "") + ("-gpu" if device.startswith("cuda") else "-cpu")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# ConDU costs ({a.shape}, {a.tasks} tasks, random deltas)",
        "",
        f"{result['machine']['platform']}, {result['machine']['device']}, {result['machine']['threads']} threads; "
        f"{result['date']}. One model (fp32, merged keys): {model_bytes / mb:.0f} MiB. Unify and routing on "
        f"`{device}`.",
        "",
        "| quantity | value |",
        "|---|---|",
        *rows,
    ]
    if "unify" in a.parts:
        unify, mem = result["unify"], result["unify_whole_deltas"]
        lines += [
            "",
            "Session of n tasks against its memory-traffic bound (reading and writing n model-sized fp32 tensors "
            "once: u cloned n times, measured right after the session in the same process); wall and CPU seconds "
            "(CPU time is what a shared machine's load distorts least):",
            "",
            "| n tasks | streamed session wall / bound (s) | ratio | CPU / bound (s) | ratio | whole-delta session "
            "wall / bound (s) | ratio | CPU / bound (s) | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n in range(a.tasks):
            cells = []
            for run in (unify, mem):
                for sk, bk in (("session_seconds", "bound_seconds"), ("session_cpu_seconds", "bound_cpu_seconds")):
                    sv, bv = run[sk][n], run[bk][n]
                    cells += [f"{sv:.2f} / {bv:.2f}", f"{sv / bv:.1f}" if bv > 0 else "—"]
            lines.append(f"| {n + 1} | " + " | ".join(cells) + " |")
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
