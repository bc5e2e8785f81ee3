"""Pretraining curves of several ``recipes/pretrain_clip.py`` runs on one plot, with a Markdown summary.

    python benchmarks/pretrain_curves.py OUT_STEM F=~/.cache/hf_cft/benchmark-clip-web/curve.jsonl \
        C=~/.cache/hf_cft/benchmark-clip-described/curve.jsonl ...

Each ``LABEL=PATH`` names a run's ``curve.jsonl`` (loss, throughput and the periodic zero-shot checks the recipe
writes). Writes ``OUT_STEM.png`` (contrastive loss against step; mean zero-shot accuracy of the periodic checks
against step when a run has them) and ``OUT_STEM.md`` (steps, images, final loss as the mean of the last 10
logged losses, median logged throughput, wall-clock minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hf_cft.utils import atomic_path, atomic_write_bytes


def read_curve(path: Path) -> dict:
    """Loss records and zero-shot records of one run's curve.jsonl (typed error naming a bad file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no curve file at {path}")
    losses, evals = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not a JSON line: {e}") from None
        if "loss" in rec:
            losses.append(rec)
        elif rec.get("zeroshot"):
            evals.append(rec)
    if not losses:
        raise ValueError(f"{path} has no loss records")
    return {"losses": losses, "evals": evals}


def summarise(curve: dict) -> dict:
    losses = curve["losses"]
    tail = [r["loss"] for r in losses[-10:]]
    return {
        "steps": losses[-1]["step"],
        "final_loss": sum(tail) / len(tail),
        "median_images_per_s": statistics.median(r["images_per_s"] for r in losses),
        "minutes": losses[-1]["minutes"],
    }


def plot(curves: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_evals = any(c["evals"] for c in curves.values())
    fig, axes = plt.subplots(1, 2 if with_evals else 1, figsize=(11 if with_evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    for label, c in curves.items():
        loss = [r["loss"] for r in c["losses"]]
        smooth = [sum(loss[max(0, i - 9) : i + 1]) / len(loss[max(0, i - 9) : i + 1]) for i in range(len(loss))]
        ax.plot([r["step"] for r in c["losses"]], smooth, lw=0.9, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss (mean of 10 logs)")
    ax.set_title("pretraining loss")
    ax.legend(fontsize=7)
    if with_evals:
        ax = axes[0][1]
        for label, c in curves.items():
            if c["evals"]:
                means = [sum(v["ensemble"] for v in r["zeroshot"].values()) / len(r["zeroshot"]) for r in c["evals"]]
                ax.plot([r["step"] for r in c["evals"]], means, marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("mean zero-shot accuracy (%, test subsets)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_stem", type=Path, help="writes OUT_STEM.png and OUT_STEM.md")
    p.add_argument("runs", nargs="+", help="LABEL=path/to/curve.jsonl")
    p.add_argument("--batch_size", type=int, default=256, help="images per step of the runs (for the images column)")
    a = p.parse_args(argv)
    curves = {}
    for spec in a.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"expected LABEL=PATH, got {spec!r}")
        curves[label] = read_curve(Path(path))
    a.out_stem.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, a.out_stem.with_suffix(".png"))
    lines = [
        "| run | steps | images | final loss (mean of last 10 logs) | median images/s | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for label, c in curves.items():
        s = summarise(c)
        lines.append(
            f"| {label} | {s['steps']:,} | {s['steps'] * a.batch_size:,} | {s['final_loss']:.3f} | "
            f"{s['median_images_per_s']:,.0f} | {s['minutes']:.1f} |"
        )
    atomic_write_bytes(a.out_stem.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
