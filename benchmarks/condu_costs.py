"""ConDU costs on a full-size architecture (issue: unify memory, unify time, storage, routed inference).

    python benchmarks/condu_costs.py                   # ViT-B/16-shaped CLIP (random weights), 8 tasks
    python benchmarks/condu_costs.py --shape small     # the small benchmark CLIP shape (seconds)

1. Writes θ⁰ and T random task deltas (every floating-point key but ``logit_scale``; δ_t = 1e-3·(shared + own)
   so that signs partly agree, as fine-tuning deltas of one model do) as safetensors files.
2. In a fresh process, unifies them one session per task with ``DeltaFusionMerger`` (each delta read from its
   file), and reports the peak resident memory above the process's baseline, in units of one model's fp32
   size, the time of every session, and the storage of the bundle against keeping every expert / 1-byte masks.
3. Routed inference: ``SemanticRouter`` with top-K (K = 4, + θ⁰) against routing to all T experts, on one batch
   of images: wall time and the number of expert forward passes.

Writes ``benchmarks/results/condu_costs[-small][-gpu].{json,md}``. Medians/ratios are measured in one run.
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


def worker(folder: Path, tasks: int, load: str) -> dict:
    """Unify the deltas of ``folder`` one session per task, in this (fresh) process: ``stream`` hands add_task the
    file path (read key by key), ``memory`` loads each whole delta first (``safetensors.torch.load_file``)."""
    from safetensors.torch import load_file

    from hf_cft.merging import DeltaFusionMerger

    merger = DeltaFusionMerger()
    baseline = _rss_mb()
    sessions = []
    for t in range(tasks):
        t0 = time.perf_counter()
        path = str(folder / f"delta{t}.safetensors")
        delta = path if load == "stream" else load_file(path)
        merger.add_task(delta, f"task{t}")
        del delta
        sessions.append(time.perf_counter() - t0)
    peak = _peak_rss_mb()
    return {"baseline_rss_mb": baseline, "peak_rss_mb": peak, "session_seconds": sessions, **merger.storage_bytes()}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["vit-b16", "small"], default="vit-b16")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--load", choices=["stream", "memory"], default="stream", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.tasks, a.load)))
        return
    from safetensors.torch import save_file

    from hf_cft.merging import DeltaFusionMerger, SemanticRouter

    model, tok, size, names = _build(a.shape)
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point() and k != "logit_scale"]
    model_bytes = sum(model.state_dict()[k].numel() * 4 for k in keys)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shared = {k: torch.randn(model.state_dict()[k].shape, generator=g) for k in keys}
        for t in range(a.tasks):
            delta = {k: 1e-3 * (shared[k] + torch.randn(shared[k].shape, generator=g)) for k in keys}
            save_file(delta, str(folder / f"delta{t}.safetensors"))
        del shared, delta
        runs = {}
        for load in ("stream", "memory"):  # each in a fresh process, so that its peak RSS is its own
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--shape", a.shape, "--tasks", str(a.tasks), "--worker", str(folder)]
            proc = subprocess.run([*cmd, "--load", load], capture_output=True, text=True, check=True)
            runs[load] = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[load]["process_wall_seconds"] = time.perf_counter() - t0
        unify = runs["stream"]
        unify_wall = unify["process_wall_seconds"]
        # routed inference: the merger rebuilt here (same deltas) with random prototypes per task
        merger = DeltaFusionMerger(base_model=model)
        for t in range(a.tasks):
            protos = torch.nn.functional.normalize(
                torch.randn(len(names), model.config.projection_dim, generator=g), dim=-1
            )
            merger.add_task(str(folder / f"delta{t}.safetensors"), f"task{t}", prototypes=protos, classnames=names)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    pixels = torch.randn(a.batch, 3, size, size, generator=g).to(device)
    timing, passes = {}, {}
    for label, k in (("top_k", a.top_k), ("all", a.tasks)):
        router = SemanticRouter(merger, model, tok, top_k=k)
        router.logits(pixels, names, ["a photo of a {}."])  # warm-up (caches text heads)
        times = []
        for _ in range(a.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            router.logits(pixels, names, ["a photo of a {}."])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        timing[label] = statistics.median(times)
        passes[label] = json.loads(json.dumps(getattr(router.stats, "__dict__", {}), default=str))
    result = {
        "shape": a.shape,
        "tasks": a.tasks,
        "model_fp32_bytes": model_bytes,
        "unify": unify,
        "unify_process_wall_seconds": unify_wall,
        "peak_memory_in_models": (unify["peak_rss_mb"] - unify["baseline_rss_mb"]) * 2**20 / model_bytes,
        "peak_memory_in_models_whole_deltas": (runs["memory"]["peak_rss_mb"] - runs["memory"]["baseline_rss_mb"])
        * 2**20
        / model_bytes,
        "unify_whole_deltas": runs["memory"],
        "storage_ratio_bundle_vs_experts": unify["bundle"] / unify["experts"],
        "routing": {"median_seconds": timing, "ratio_top_k_vs_all": timing["top_k"] / timing["all"], "stats": passes},
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    stem = "condu_costs" + ("-small" if a.shape == "small" else "") + ("-gpu" if device == "cuda" else "")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    mb = 2**20
    lines = [
        f"# ConDU costs ({a.shape}, {a.tasks} tasks, random deltas)",
        "",
        f"{result['machine']['platform']}, {result['machine']['device']}, {result['machine']['threads']} threads; "
        f"{result['date']}. One model (fp32, merged keys): {model_bytes / mb:.0f} MiB.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| peak memory while unifying {a.tasks} deltas streamed from their files (above baseline) | "
        f"{(unify['peak_rss_mb'] - unify['baseline_rss_mb']):.0f} MiB = {result['peak_memory_in_models']:.2f} models |",
        f"| the same, each delta loaded whole first (`load_file`) | "
        f"{(runs['memory']['peak_rss_mb'] - runs['memory']['baseline_rss_mb']):.0f} MiB = "
        f"{result['peak_memory_in_models_whole_deltas']:.2f} models |",
        "| unify time per session, streamed (s) | " + ", ".join(f"{s:.2f}" for s in unify["session_seconds"]) + " |",
        "| unify time per session, whole deltas (s) | "
        + ", ".join(f"{s:.2f}" for s in runs["memory"]["session_seconds"])
        + " |",
        f"| bundle (u + packed masks + prototypes) | {unify['bundle'] / mb:.1f} MiB |",
        f"| bundle with 1-byte masks | {unify['bundle_bool_masks'] / mb:.1f} MiB |",
        f"| every expert kept (fp32) | {unify['experts'] / mb:.1f} MiB |",
        f"| bundle / experts | {result['storage_ratio_bundle_vs_experts']:.3f} |",
        f"| routed inference, top-{a.top_k} + θ⁰ vs all {a.tasks} experts (median s) | "
        f"{timing['top_k']:.3f} vs {timing['all']:.3f} (ratio {result['routing']['ratio_top_k_vs_all']:.2f}) |",
    ]
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
