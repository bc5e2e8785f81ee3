"""Classification metrics (percentages)."""

from __future__ import annotations

import numpy as np
import torch


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(predictions, labels) -> float:
    """Top-1 accuracy in percent. ``predictions`` may be class ids ``[N]`` or logits ``[N, C]``."""
    p, y = _as_np(predictions), _as_np(labels)
    if p.ndim == 2:
        p = p.argmax(axis=-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    if y.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((p == y).mean() * 100.0)


def per_class_accuracy(predictions, labels, num_classes: int) -> list[float]:
    """Accuracy (percent) per class id; NaN for a class with no example."""
    p, y = _as_np(predictions), _as_np(labels)
    if p.ndim == 2:
        p = p.argmax(axis=-1)
    out = []
    for c in range(num_classes):
        m = y == c
        out.append(float((p[m] == c).mean() * 100.0) if m.any() else float("nan"))
    return out


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2·B·N / (B + N); 0 when both are 0."""
    if base < 0 or novel < 0:
        raise ValueError(f"accuracies must be non-negative, got base={base}, novel={novel}")
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def base_novel_summary(base: float | list[float], novel: float | list[float]) -> dict[str, float]:
    """``{"base": B, "novel": N, "hm": HM}``. Given lists (one entry per dataset), the average row is the HM of the
    averaged base and novel accuracies (as in the CoCoOp tables), not the mean of per-dataset HMs. For the number
    alone, use :func:`harmonic_mean`."""
    b = float(np.mean(base)) if isinstance(base, (list, tuple, np.ndarray)) else float(base)
    n = float(np.mean(novel)) if isinstance(novel, (list, tuple, np.ndarray)) else float(novel)
    return {"base": b, "novel": n, "hm": harmonic_mean(b, n)}


def base_novel_hm(base: float | list[float], novel: float | list[float]) -> dict[str, float]:
    """Deprecated alias of :func:`base_novel_summary` (it returns a dict, not the HM; :func:`harmonic_mean` returns
    the number). Removed in the next release."""
    import warnings

    from hf_cft.utils import user_stacklevel

    warnings.warn(
        "hf_cft.metrics.base_novel_hm is renamed base_novel_summary (it returns a dict); use harmonic_mean(base, "
        "novel) for the number. The old name goes in the next release.",
        FutureWarning,
        stacklevel=user_stacklevel(),
    )
    return base_novel_summary(base, novel)
