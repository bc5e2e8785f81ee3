"""Outputs of a continual run: the accuracy matrix as JSON and Markdown with Transfer / Average / Last / BWT
(``docs/methods/condu.md`` §10, via :mod:`hf_cft.metrics`) and Plasticity (``docs/methods/pam.md`` §7), the
heatmap, and a model card for the run.

Metrics are stored unrounded; tables print them rounded to one decimal with numpy (:func:`hf_cft.metrics.round1`,
as the published tables do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hf_cft.metrics import AccuracyMatrix, round1
from hf_cft.metrics.continual import (
    average_per_dataset,
    last_per_dataset,
    plasticity_per_dataset,
    transfer_per_dataset,
)

METRIC_NAMES = ("transfer", "average", "last", "bwt", "plasticity")


def _jsonable(x):
    """NaN/inf → None (strict JSON), numpy scalars → floats, recursively."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def matrix_report(matrix: AccuracyMatrix, strategy: str, extra: dict | None = None) -> dict:
    """JSON-able report: names, values (null where missing), and, for a complete matrix, the metrics (unrounded
    and rounded) and their per-dataset values."""
    out = {"strategy": strategy, "names": list(matrix.names), "values": _jsonable(matrix.values.tolist())}
    out["complete"] = matrix.complete
    if matrix.complete:
        m = matrix.metrics()
        out["metrics"] = _jsonable(m)
        out["metrics_rounded"] = _jsonable({k: round1(v) if math.isfinite(v) else None for k, v in m.items()})
        out["per_dataset"] = _jsonable(
            {
                "transfer": dict(zip(matrix.names[1:], transfer_per_dataset(matrix.values).tolist())),
                "average": dict(zip(matrix.names, average_per_dataset(matrix.values).tolist())),
                "last": dict(zip(matrix.names, last_per_dataset(matrix.values).tolist())),
                "plasticity": dict(zip(matrix.names, plasticity_per_dataset(matrix.values).tolist())),
            }
        )
    if extra:
        out.update(_jsonable(extra))
    return out


def _fmt(v) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{round1(v):.1f}"


def matrix_table(matrix: AccuracyMatrix) -> str:
    """The bare Markdown table of the matrix (values rounded to one decimal, "–" where missing)."""
    names = list(matrix.names)
    lines = ["| after ↓ / on → | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {n} | " + " | ".join(_fmt(v) for v in matrix.values[r]) + " |" for r, n in enumerate(names)]
    return "\n".join(lines) + "\n"


def matrix_markdown(matrix: AccuracyMatrix, title: str = "", note: str = "") -> str:
    """The matrix as a Markdown table (rows: after training task r; columns: dataset c) and a metrics table."""
    names = list(matrix.names)
    lines = [f"# {title}", ""] if title else []
    lines += [
        "A[r, c] = accuracy (%) on dataset c (column) after training task r (row), both in training order; "
        "entries above the diagonal are Transfer (dataset not learned yet).",
        "",
        matrix_table(matrix),
    ]
    if matrix.complete:
        m = matrix.metrics()
        lines += [
            "| Transfer | Average | Last | BWT | Plasticity |",
            "|---|---|---|---|---|",
            "| " + " | ".join(_fmt(m[k]) for k in METRIC_NAMES) + " |",
            "",
            "Transfer = mean over c ≥ 1 of mean_{r<c} A[r, c]; Average = mean over c of mean_r A[r, c]; "
            "Last = mean_c A[T−1, c]; BWT = mean over c < T−1 of A[T−1, c] − A[c, c] (docs/methods/condu.md §10); "
            "Plasticity = mean_c A[c, c] (docs/methods/pam.md §7).",
        ]
    else:
        lines.append(f"Incomplete run: {int(np.isfinite(matrix.values).all(axis=1).sum())} of {len(names)} rows.")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_matrix_outputs(
    output_dir: str | Path,
    matrix: AccuracyMatrix,
    strategy: str,
    title: str = "",
    extra: dict | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``accuracy_matrix.json``, ``accuracy_matrix.md`` and (with ``plot`` and matplotlib installed)
    ``accuracy_matrix.png`` atomically into ``output_dir``; return their paths."""
    from hf_cft.utils import atomic_write_bytes, atomic_write_json

    out = Path(output_dir)
    files = {"json": out / "accuracy_matrix.json", "markdown": out / "accuracy_matrix.md"}
    atomic_write_json(files["json"], matrix_report(matrix, strategy, extra))
    atomic_write_bytes(files["markdown"], matrix_markdown(matrix, title or strategy).encode("utf-8"))
    if not plot:
        return files
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # plots are an optional extra
        return files
    from hf_cft.plots.matrix import plot_accuracy_matrix

    metrics = matrix.metrics() if matrix.complete else None
    files["heatmap"] = plot_accuracy_matrix(
        matrix.values, matrix.names, out / "accuracy_matrix.png", title or strategy, metrics
    )
    return files


def continual_card(
    *,
    model_name: str,
    strategy: str,
    base_model: str,
    matrix: AccuracyMatrix,
    tasks: Sequence[dict],
    hyperparameters: dict,
    description: str,
    data_note: str = "",
    files_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
):
    """A model card for the result of a continual run (``model_cards/continual.md``): the accuracy matrix, the
    MTIL metrics, the per-task last accuracy as model-index entries, the training settings, and ``files_note``
    saying where the run's weights are and how to load them."""
    from huggingface_hub import EvalResult, ModelCardData

    from hf_cft.hub import render_card

    if not matrix.complete:
        raise ValueError("a model card needs a complete accuracy matrix")
    last = matrix.values[-1]
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=name,
            dataset_name=name,
            dataset_split="test",
            metric_type="accuracy",
            metric_value=round(float(last[i]), 4),
            metric_name=f"{name} accuracy after the last task",
        )
        for i, name in enumerate(matrix.names)
    ]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="hf_cft",
        pipeline_tag="zero-shot-image-classification",
        base_model=base_model if "/" in base_model and not Path(base_model).exists() else None,
        tags=["hf_cft", "clip", "continual-learning", strategy],
        eval_results=eval_results,
        license="apache-2.0",
    )
    m = matrix.metrics()
    return render_card(
        "continual",
        card_data,
        model_name=model_name,
        strategy=strategy,
        description=description,
        base_model=base_model,
        tasks=list(tasks),
        matrix_table=matrix_table(matrix),
        metrics={k.capitalize() if k != "bwt" else "BWT": _fmt(m[k]) for k in METRIC_NAMES},
        hyperparameters=hyperparameters,
        data_note=data_note,
        files_note=files_note,
        limitations=limitations
        or "Evaluated only on the task stream listed above (task-incremental: each dataset's own label space).",
        repo_id=repo_id,
    )
