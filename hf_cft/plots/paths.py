from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def interpolation_curves(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    solutions: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]],
    paths: list[tuple[str, str]],
    scale: float = 1.0,
    points: int = 11,
) -> dict:
    """Loss and accuracy at ``points`` evenly spaced t ∈ [0, 1] along ``(1 − t)·a + t·b`` for each pair of
    ``paths``, on fixed image features.

    A solution is either class text features ``T [C, d]`` (prompts: interpolate, renormalise, logits
    ``scale·f·Tᵀ``) or a head ``(W, b)`` (logits ``f·Wᵀ + b``). The barrier of a path is its maximum loss minus
    the mean of its end points.
    """
    f = F.normalize(image_features.float(), dim=-1)
    y = labels.long()
    ts = [i / (points - 1) for i in range(points)]
    out = {"t": ts, "paths": {}}
    for a_name, b_name in paths:
        a, b = solutions[a_name], solutions[b_name]
        losses, accs = [], []
        for t in ts:
            if isinstance(a, tuple):
                w = (1 - t) * a[0] + t * b[0]
                bias = None if a[1] is None else (1 - t) * a[1] + t * b[1]
                logits = F.linear(f, w.float(), None if bias is None else bias.float())
            else:
                logits = scale * f @ F.normalize((1 - t) * a.float() + t * b.float(), dim=-1).t()
            losses.append(float(F.cross_entropy(logits, y)))
            accs.append(float((logits.argmax(-1) == y).float().mean() * 100))
        barrier = max(losses) - (losses[0] + losses[-1]) / 2
        out["paths"][f"{a_name} → {b_name}"] = {"loss": losses, "accuracy": accs, "barrier": barrier}
    return out


def plot_paths(curves: dict | str | Path, png: str | Path, title: str = "") -> Path:
    """Render curves (a dict from :func:`interpolation_curves`, optionally ``{"<split>": curves, ...}``, or a JSON
    file of either) as loss and accuracy panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(curves, dict):
        curves = json.loads(Path(curves).read_text())
    groups = {"": curves} if "paths" in curves else curves
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for row, (split, c) in enumerate(groups.items()):
        for name, p in c["paths"].items():
            axes[row, 0].plot(c["t"], p["loss"], marker="o", ms=3, label=name)
            axes[row, 1].plot(c["t"], p["accuracy"], marker="o", ms=3, label=name)
        axes[row, 0].set_ylabel(f"{split} loss".strip())
        axes[row, 1].set_ylabel(f"{split} accuracy (%)".strip())
        for ax in axes[row]:
            ax.set_xlabel("t (interpolation)")
            ax.grid(alpha=0.3)
        axes[row, 1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
