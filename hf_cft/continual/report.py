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
    return "–" if v is None or not math.isfinite(float(v)) else f"{round1(float(v)):.1f}"


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


# ------------------------------------------------------------------------------------------------ recipe tables

# Card text per registered strategy: (what it is, where its weights are).
_DELTA_FILES = (
    "`store/experts/<task position>.safetensors` holds one dense expert delta θ − θ⁰ per task; "
    "`checkpoint/strategy.safetensors` the deployed merged delta (parameter names of θ⁰; add it to θ⁰)."
)
_PAM_FILES = (
    "`checkpoint/pam/` is a PEFT LoRA adapter folder holding the global adapter G "
    "(`PeftModel.from_pretrained(base, 'checkpoint/pam')` deploys it) plus `pam_state.json` (PAM config, per-task "
    "log with the sign misalignment)."
)
STRATEGY_CARDS: dict[str, tuple[str, str]] = {
    "zeroshot": ("the pretrained model θ⁰, never trained (the zero-shot row).", "No weights beyond θ⁰."),
    "sequential": (
        "continual fine-tuning: each task trains from the model left by the previous one.",
        "`checkpoint/strategy.safetensors` holds the final model as a dense delta θ − θ⁰ (parameter names of θ⁰; "
        "add it to θ⁰).",
    ),
    "independent": (
        "one expert per task trained from θ⁰; the task's own expert answers once learned, θ⁰ before (upper bound "
        "with task id).",
        "`store/experts/<task position>.safetensors` holds one dense expert delta θ − θ⁰ per task.",
    ),
    "condu": (
        "ConDU: experts trained from θ⁰ are decoupled and re-unified into one delta with a mask and rescaler per "
        "task after each task (DeltaFusionMerger); learned tasks use their rebuilt expert, others semantic routing "
        "over θ⁰ and the top-K experts.",
        "`checkpoint/merger/` is the ConDU bundle (unified delta, bit-packed masks, rescalers, prototypes): "
        "`hf_cft.merging.DeltaFusionMerger.from_pretrained(...)` rebuilds every expert and "
        "`hf_cft.merging.SemanticRouter` routes among them.",
    ),
    "task_arithmetic": (
        "task arithmetic, continual form (θ ← θ + λτ_t after each task, experts from θ⁰; pam.md §9).",
        _DELTA_FILES,
    ),
    "ties": (
        "TIES on the pair (unscaled merge so far, new expert) after each task, ×λ once, experts from θ⁰ (pam.md §9).",
        _DELTA_FILES,
    ),
    "magmax": (
        "MagMax: sequential fine-tuning (θ_t from θ_{t−1}, cumulative τ_t), per entry the largest-magnitude τ_t "
        "(pam.md §9).",
        _DELTA_FILES,
    ),
    "opcm": (
        "OPCM: each expert (from θ⁰) projected off the merged delta's leading singular directions, running sum "
        "rescaled to the mean task-vector norm (pam.md §9).",
        _DELTA_FILES,
    ),
    "running_mean": ("running mean (uniform soup) of experts trained from θ⁰ (pam.md §9).", _DELTA_FILES),
    "wise": ("WiSE-FT of the sequentially fine-tuned model with θ⁰, α = 0.5 (pam.md §9).", _DELTA_FILES),
    "emr": (
        "one-shot EMR-merging over all experts so far; each learned task answered by its masked, rescaled unified "
        "delta (needs the task id; θ⁰ before a task is learned).",
        "`store/experts/<task position>.safetensors` holds the experts; `hf_cft.merging.emr` rebuilds the unified "
        "delta, masks and rescalers from them.",
    ),
    "pam": (
        "PAM (pam.md): one global LoRA adapter G; each task trains a copy of G whose sign conflicts with G's top-p "
        "entries are reset every K steps, then G ← average of the factors; G answers every task (no task id).",
        _PAM_FILES,
    ),
    "merge_only": ("PAM's global/task LoRA cycle without alignment (merge by factor averaging only).", _PAM_FILES),
    "pam_ties": (
        "merge + post-hoc TIES alignment (pam.md §8 row): the task adapter is trained without alignment, then "
        "merged with G by TIES sign election and disjoint mean on the factors.",
        _PAM_FILES,
    ),
    "sequential_lora": (
        "sequential LoRA fine-tuning: one adapter trained on and on, fresh optimiser per task (lower bound).",
        _PAM_FILES,
    ),
}


def strategy_card_text(name: str) -> tuple[str, str]:
    """``(description, files note)`` of a strategy's model card (a generic text for strategies registered later)."""
    return STRATEGY_CARDS.get(
        name,
        (f"the continual strategy {name!r}.", "`checkpoint/` holds the strategy's state after the last task."),
    )


RESULTS_COLUMNS = (
    ("last", "ACC (Last)"),
    ("bwt", "BWT"),
    ("plasticity", "Plasticity"),
    ("transfer", "Transfer"),
    ("average", "Average"),
)
MISALIGNMENT_KEYS = (
    "misalignment_top_p",
    "misalignment_all",
    "misalignment_top_p_A",
    "misalignment_top_p_B",
    "mean_step_misalignment",
)


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{100.0 * float(v):.1f}"


def results_markdown(results: dict, heading: str, note: str = "", task_names: Sequence[str] | None = None) -> str:
    """The comparison table of a continual recipe: one row per strategy with ACC (Last), BWT, Plasticity, Transfer
    and Average (``docs/methods/condu.md`` §10, ``pam.md`` §7), and, for strategies that log it (PAM and its
    variants), the sign misalignment between G and L_t before each merge, the entries reset by alignment, and the
    task adapter's accuracy before the merge next to the deployed model's.

    ``results`` maps a strategy name to ``{"label", "metrics", "matrix", "history", "seconds"}``.
    """
    lines = [f"# {heading}", ""]
    if note:
        lines += [note, ""]
    lines += [
        "| strategy | " + " | ".join(h for _, h in RESULTS_COLUMNS) + " | seconds |",
        "|---|" + "---|" * (len(RESULTS_COLUMNS) + 1),
    ]
    for r in results.values():
        m = r["metrics"]
        cells = [_fmt(m.get(k)) for k, _ in RESULTS_COLUMNS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r.get('seconds', 0.0):.0f} |")
    lines += [
        "",
        "ACC (Last) = mean accuracy after the last task; BWT = mean over c < T−1 of A[T−1, c] − A[c, c]; Plasticity = "
        "mean A[c, c] (right after learning c); Transfer = mean accuracy on a dataset before it is learned; Average = "
        "mean of all entries per dataset (docs/methods/condu.md §10, docs/methods/pam.md §7).",
    ]
    rows = []
    for r in results.values():
        history = r.get("history") or []
        if not any(k in h for h in history for k in MISALIGNMENT_KEYS + ("reset_entries",)):
            continue
        for t, h in enumerate(history):
            name = h.get("task", task_names[t] if task_names else str(t))
            deployed = r["matrix"][t][t] if r.get("matrix") else None
            rows.append(
                f"| {r['label']} | {name} | "
                + " | ".join(_pct(h.get(k)) for k in MISALIGNMENT_KEYS)
                + f" | {int(h.get('reset_entries', 0))} | {_fmt(h.get('task_adapter_accuracy'))} | {_fmt(deployed)} |"
            )
    if rows:
        lines += [
            "",
            "## Sign misalignment between G and the task adapter before each merge",
            "",
            "| strategy | task | misaligned top-p (%) | misaligned all (%) | top-p A (%) | top-p B (%) | top-p at "
            "alignment steps (%) | entries reset in training | task adapter acc. | deployed acc. on the task |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Misaligned = share of entries where G and L_t are both non-zero with opposite signs, among G's top-p "
            "entries by magnitude or among all, measured before the merge (pam.md §7; after PAM's last alignment step "
            "the top-p rate is 0 by construction); '–' for the first task (G untrained). Top-p at alignment steps = "
            "the mean top-p rate each alignment found before resetting. Task adapter acc. = L_t alone on its task "
            "before the merge; deployed = the merged G (A[t, t]).",
        ]
    return "\n".join(lines) + "\n"
