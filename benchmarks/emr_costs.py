"""EMR-merging memory: streamed from the experts' files (``EMRStrategy``) vs every expert loaded whole (issue 17
item 11).

    python benchmarks/emr_costs.py                    # ViT-B/16-shaped CLIP (random weights), T = 4
    python benchmarks/emr_costs.py --shape small      # the small benchmark CLIP shape (seconds)

Writes T random task deltas (every floating-point key but ``logit_scale``; δ_t = 1e-3·(shared + own), so that signs
partly agree) as safetensors files, then, each in a fresh process, runs one-shot EMR over them:

- ``stream``: ``emr([LazyDelta.from_file(p) for p in files])``, what ``EMRStrategy`` does: every key read slice by
  slice from each file, masks kept bit-packed;
- ``memory``: ``emr([load_file(p) for p in files])``: the T experts in memory first (``EMRStrategy`` before issue 17
  loaded them this way).

Reports the peak resident memory above the process's baseline (``VmHWM`` − ``VmRSS`` after imports) in units of one
model's fp32 size, and the wall time; both results must be identical (checked). Writes
``benchmarks/results/emr_costs[-small].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from condu_costs import _build, _peak_rss_mb, _rss_mb  # noqa: E402 - the ConDU benchmark's model and probes


def worker(folder: Path, tasks: int, load: str) -> dict:
    """One-shot EMR over the deltas of ``folder`` in this (fresh) process."""
    from safetensors.torch import load_file

    from hf_cft.merging import LazyDelta
    from hf_cft.merging.baselines import emr

    baseline = _rss_mb()
    t0 = time.perf_counter()
    paths = [folder / f"delta{t}.safetensors" for t in range(tasks)]
    deltas = [LazyDelta.from_file(p) for p in paths] if load == "stream" else [load_file(str(p)) for p in paths]
    result = emr(deltas)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    digest = [float(sum(float(v.double().abs().sum()) for v in result.unified.values())), *result.rescalers]
    return {"baseline_rss_mb": baseline, "peak_rss_mb": peak, "seconds": seconds, "digest": digest}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["vit-b16", "small"], default="vit-b16")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--load", choices=["stream", "memory"], default="stream", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.tasks, a.load)))
        return
    from safetensors.torch import save_file

    model, _, _, _ = _build(a.shape)
    state = model.state_dict()
    keys = [k for k, v in state.items() if v.is_floating_point() and k != "logit_scale"]
    shapes = {k: state[k].shape for k in keys}
    model_bytes = sum(state[k].numel() * 4 for k in keys)
    del model, state
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        for t in range(a.tasks):
            delta = {k: 1e-3 * (shared[k] + torch.randn(shared[k].shape, generator=g)) for k in keys}
            save_file(delta, str(folder / f"delta{t}.safetensors"))
        del shared, delta
        runs = {}
        for load in ("stream", "memory"):  # each in a fresh process, so that its peak RSS is its own
            cmd = [sys.executable, __file__, "--shape", a.shape, "--tasks", str(a.tasks), "--worker", str(folder)]
            proc = subprocess.run([*cmd, "--load", load], capture_output=True, text=True, check=True)
            runs[load] = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[load]["peak_in_models"] = (
                (runs[load]["peak_rss_mb"] - runs[load]["baseline_rss_mb"]) * 2**20 / model_bytes
            )
    if runs["stream"]["digest"] != runs["memory"]["digest"]:
        raise SystemExit(f"streamed and in-memory EMR differ: {runs['stream']['digest']} vs {runs['memory']['digest']}")
    result = {
        "shape": a.shape,
        "tasks": a.tasks,
        "model_fp32_bytes": model_bytes,
        "runs": runs,
        "ratio_stream_vs_memory": runs["stream"]["peak_in_models"] / runs["memory"]["peak_in_models"],
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    stem = "emr_costs" + ("-small" if a.shape == "small" else "")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    mb = 2**20
    lines = [
        f"# EMR-merging memory ({a.shape}, T = {a.tasks}, random deltas)",
        "",
        f"{result['machine']['platform']}, CPU, {result['machine']['threads']} threads; {result['date']}. "
        f"One model (fp32, merged keys): {model_bytes / mb:.0f} MiB. Results of both runs identical.",
        "",
        "| EMR over T experts | peak above baseline | in models | wall (s) |",
        "|---|---|---|---|",
    ]
    for load, label in (("stream", "streamed from the files (EMRStrategy)"), ("memory", "experts loaded whole")):
        r = runs[load]
        lines.append(
            f"| {label} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} MiB | {r['peak_in_models']:.2f} | "
            f"{r['seconds']:.1f} |"
        )
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
