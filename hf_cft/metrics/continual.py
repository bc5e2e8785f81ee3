"""Accuracy-matrix metrics of the MTIL protocol (ZSCL), exactly as ``docs/methods/condu.md`` §10 defines them.

``A[r, c]`` is the accuracy (%) on dataset ``c`` after training task ``r``, rows and columns in training order.

- Transfer = mean over c = 1..T−1 of mean_{r<c} A[r, c] (accuracy before learning c; the first task has none);
- Average  = mean over c of mean over all r of A[r, c];
- Last     = mean over c of A[T−1, c];
- BWT      = mean over c < T−1 of (A[T−1, c] − A[c, c]) (hf_cft addition; not in the MTIL tables);
- Plasticity = mean over c of A[c, c], the accuracy on each task right after learning it (``docs/methods/pam.md``
  §7, "Plasticity (lib)"; hf_cft addition).

Values are returned unrounded; :func:`round1` rounds like the published tables (numpy, round-half-to-even on
the binary value: 65.35 → 65.4, where Python's ``round``/``"%.1f"`` give 65.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _matrix(A) -> np.ndarray:
    M = np.asarray(A, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"an accuracy matrix must be square T×T with T ≥ 1, got shape {M.shape}")
    return M


def _finite_rows(M: np.ndarray, rows: int) -> np.ndarray:
    part = M[:rows]
    if not np.isfinite(part).all():
        raise ValueError("the accuracy matrix has missing (NaN) or infinite entries in the rows used")
    return part


def transfer_per_dataset(A) -> np.ndarray:
    """Transfer per dataset c = 1..T−1 (T−1 values)."""
    M = _matrix(A)
    _finite_rows(M, M.shape[0])
    return np.array([M[:c, c].mean() for c in range(1, M.shape[0])])


def average_per_dataset(A) -> np.ndarray:
    M = _matrix(A)
    _finite_rows(M, M.shape[0])
    return M.mean(axis=0)


def last_per_dataset(A) -> np.ndarray:
    M = _matrix(A)
    return _finite_rows(M, M.shape[0])[-1].copy()


def transfer(A) -> float:
    """Mean Transfer (NaN for a single task, which has nothing to transfer to)."""
    per = transfer_per_dataset(A)
    return float(per.mean()) if per.size else float("nan")


def average(A) -> float:
    return float(average_per_dataset(A).mean())


def last(A) -> float:
    return float(last_per_dataset(A).mean())


def bwt(A) -> float:
    """Backward transfer: mean over c < T−1 of A[T−1, c] − A[c, c] (NaN for a single task)."""
    M = _matrix(A)
    _finite_rows(M, M.shape[0])
    T = M.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([M[T - 1, c] - M[c, c] for c in range(T - 1)]))


def plasticity_per_dataset(A) -> np.ndarray:
    """The diagonal A[c, c]: accuracy on each dataset right after its own task."""
    M = _matrix(A)
    _finite_rows(M, M.shape[0])
    return np.diag(M).copy()


def plasticity(A) -> float:
    """Plasticity (pam.md §7): (1/T)·Σ_c A[c, c]."""
    return float(plasticity_per_dataset(A).mean())


def round1(x):
    """Round to one decimal with numpy, as the published tables do."""
    return np.round(np.asarray(x, dtype=np.float64), 1).tolist() if np.ndim(x) else float(np.round(x, 1))


def matrix_metrics(A) -> dict[str, float]:
    return {
        "transfer": transfer(A),
        "average": average(A),
        "last": last(A),
        "bwt": bwt(A),
        "plasticity": plasticity(A),
    }


@dataclass
class AccuracyMatrix:
    """An accuracy matrix with its dataset names (training order), filled row by row by a continual run."""

    names: Sequence[str]
    values: np.ndarray | None = None

    def __post_init__(self):
        T = len(self.names)
        if T == 0:
            raise ValueError("an accuracy matrix needs at least one dataset")
        if len(set(self.names)) != T:
            raise ValueError(f"dataset names must be unique, got {list(self.names)}")
        self.values = np.full((T, T), np.nan) if self.values is None else _matrix(self.values).copy()
        if self.values.shape[0] != T:
            raise ValueError(f"{T} names for a {self.values.shape[0]}×{self.values.shape[0]} matrix")

    def set_row(self, r: int, accuracies: dict[str, float] | Sequence[float]) -> None:
        if isinstance(accuracies, dict):
            missing = [n for n in self.names if n not in accuracies]
            if missing:
                raise KeyError(f"row {r} lacks accuracies for {missing}")
            accuracies = [accuracies[n] for n in self.names]
        row = np.asarray(accuracies, dtype=np.float64)
        if row.shape != (len(self.names),):
            raise ValueError(f"row {r} has {row.size} values for {len(self.names)} datasets")
        if not np.isfinite(row).all():
            raise ValueError(f"row {r} has non-finite accuracies: {row.tolist()}")
        self.values[r] = row

    @property
    def complete(self) -> bool:
        return bool(np.isfinite(self.values).all())

    def metrics(self) -> dict[str, float]:
        return matrix_metrics(self.values)

    def reorder(self, names: Sequence[str]) -> AccuracyMatrix:
        """The same matrix with rows and columns permuted to another training order."""
        idx = [list(self.names).index(n) for n in names]
        return AccuracyMatrix(list(names), self.values[np.ix_(idx, idx)])

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "values": self.values.tolist(),
            "metrics": self.metrics() if self.complete else None,
        }
