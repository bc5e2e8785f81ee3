"""Protocol B (MTIL-mini) comparison tables from several continual runs, with the issue targets checked.

Each strategy of ``recipes/condu.py`` / ``recipes/pam.py`` / ``recipes/mtil.py`` can run in its own process (and
on its own machine) into its own output folder; this command gathers their ``results.json`` files into one table
(``hf_cft.continual.report.results_markdown``: ACC (Last) / BWT / Plasticity / Transfer / Average, and PAM's
misalignment log), copies each strategy's heatmap, checks the targets of ``docs/benchmarks.md`` Protocol B, and for
ConDU draws the **expert-fidelity curves**: after each later session s, how much of task c's own expert accuracy
the rebuilt expert keeps, ``A_ConDU[s, c] / A_independent[c, c]`` (task-id mode, so column c of a learned task is
exactly the rebuilt expert θ⁰ + λ^c M^c ⊙ u; the independent run trains the same expert with the same seed).

    python benchmarks/continual_tables.py benchmarks/results/protocolB-order1 --kind condu --title "..." \\
        zeroshot=runs/I/condu-zeroshot/results.json sequential=... independent=... condu=... \\
        "condu_ta=runs/I/condu-condu_ta/results.json#ConDU FT (task-agnostic)"

Each source is ``tag=path/to/results.json`` with an optional ``@strategy`` (which strategy of a run that holds
several) and ``#label``; the tags the targets look for are
``zeroshot, sequential, independent, condu, condu_ta, condu_lora, condu_lora_ta, independent_lora`` (``--kind
condu``) and ``sequential_lora, merge_only, pam`` (``--kind pam``). Writes ``OUT.json``, ``OUT.md`` and
``OUT-<tag>.png`` (+ ``OUT-fidelity.png`` for ConDU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_sources(specs: list[str]) -> tuple[dict, dict]:
    """``{tag: result}`` (the one strategy of each results.json, relabelled), ``{tag: run metadata}`` and
    ``{tag: the strategy's output folder}``."""
    runs, meta, folders = {}, {}, {}
    for spec in specs:
        tag, _, rest = spec.partition("=")
        path, _, label = rest.partition("#")
        path, _, wanted = path.partition("@")
        if not tag or not path:
            raise SystemExit(f"source {spec!r}: expected tag=path/to/results.json[@strategy][#label]")
        data = json.loads(Path(path).read_text())
        results = data["results"]
        if wanted:
            if wanted not in results:
                raise SystemExit(f"{path}: no strategy {wanted!r}; it holds {sorted(results)}")
            results = {wanted: results[wanted]}
        if len(results) != 1:
            raise SystemExit(
                f"{path}: expected one strategy per results.json, found {sorted(results)} (pick one with @name)"
            )
        ((strategy, result),) = results.items()
        result = dict(result, strategy=strategy)
        if label:
            result["label"] = label
        runs[tag] = result
        folders[tag] = Path(path).parent / strategy
        # where the run kept its model and outputs is a path of the machine it ran on: not recorded here
        meta[tag] = {k: data.get(k) for k in ("benchmark", "stream", "tasks", "config", "machine", "total_seconds")}
    return runs, meta, folders


def _metric(runs: dict, tag: str, key: str) -> float | None:
    return runs[tag]["metrics"].get(key) if tag in runs else None


def condu_targets(runs: dict) -> list[str]:
    lines = []
    zs_t = _metric(runs, "zeroshot", "transfer")
    seq_a = _metric(runs, "sequential", "average")
    for tag, ref in (
        ("condu", "independent"),
        ("condu_ta", "independent"),
        ("condu_lora", "independent_lora"),
        ("condu_lora_ta", "independent_lora"),
    ):
        if tag not in runs:
            continue
        parts = [f"**{runs[tag]['label']}**:"]
        t = _metric(runs, tag, "transfer")
        if zs_t is not None:
            parts.append(f"Transfer {t:.2f} vs zero-shot {zs_t:.2f} (≥: {'met' if t >= zs_t else 'missed'});")
        a = _metric(runs, tag, "average")
        if seq_a is not None:
            gap = a - seq_a
            parts.append(f"Average − sequential FT Average = {gap:+.2f} (≥ +10: {'met' if gap >= 10 else 'missed'});")
        last, ref_last = _metric(runs, tag, "last"), _metric(runs, ref, "last")
        if ref_last:
            ratio = last / ref_last
            parts.append(
                f"Last / {runs[ref]['label']} Last = {last:.2f} / {ref_last:.2f} = {100 * ratio:.1f}% "
                f"(≥ 90%: {'met' if ratio >= 0.9 else 'missed'})."
            )
        lines.append("- " + " ".join(parts))
    if "independent" in runs and seq_a is not None:
        gap = _metric(runs, "independent", "average") - seq_a
        lines.append(
            f"- Ceiling: independent experts with the task id reach Average {_metric(runs, 'independent', 'average'):.2f}"
            f" = sequential {gap:+.2f}; a merged model that rebuilt every expert perfectly would be near that."
        )
    return lines


def pam_targets(runs: dict) -> list[str]:
    lines = []
    seq_bwt = _metric(runs, "sequential_lora", "bwt")
    mo_acc = _metric(runs, "merge_only", "last")
    for tag in ("pam", "pam_ties"):
        if tag not in runs:
            continue
        parts = [f"**{runs[tag]['label']}**:"]
        bwt = _metric(runs, tag, "bwt")
        if seq_bwt is not None and seq_bwt < 0:
            gain = 1 - bwt / seq_bwt
            parts.append(
                f"BWT {bwt:.2f} vs sequential LoRA {seq_bwt:.2f}: {100 * gain:.0f}% better (≥ 40%: "
                f"{'met' if gain >= 0.4 else 'missed'});"
            )
        acc = _metric(runs, tag, "last")
        if mo_acc is not None:
            parts.append(f"ACC {acc:.2f} vs merge-only {mo_acc:.2f} (≥: {'met' if acc >= mo_acc else 'missed'}).")
        lines.append("- " + " ".join(parts))
    return lines


def fidelity(runs: dict, tag: str, ref: str) -> list[list[float | None]] | None:
    """``F[s][c] = A_tag[s][c] / A_ref[c][c]`` for c ≤ s (None above the diagonal)."""
    if tag not in runs or ref not in runs:
        return None
    a, r = runs[tag]["matrix"], runs[ref]["matrix"]
    return [[a[s][c] / r[c][c] if c <= s and r[c][c] else None for c in range(len(a[s]))] for s in range(len(a))]


def plot_fidelity(curves: dict[str, list], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (label, f) in zip(axes[0], curves.items()):
        for c, name in enumerate(names):
            xs = list(range(c, len(f)))
            ax.plot(xs, [100 * f[s][c] for s in xs], marker="o", ms=3, label=name)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), [f"+{n}" for n in names], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("rebuilt expert / own expert accuracy (%)")
        ax.set_title(label, fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def session_curves(run: dict, names: list[str]) -> dict[str, list[list[float | None]]] | None:
    """From a run with ``track_fidelity``: ``{quantity: C[s][c]}`` for the cosine of the rebuilt to the original
    delta, the relative error, the mask density and λ of task c after session s (None before c is learned)."""
    history = run.get("history") or []
    if not any(k.startswith("fidelity_cos/") for h in history for k in h):
        return None
    out = {}
    for q in ("fidelity_cos", "fidelity_rel_err", "mask_density", "lambda"):
        out[q] = [[h.get(f"{q}/{n}") for n in names] for h in history]
    return out


def plot_session_curves(curves: dict[str, dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = (
        ("fidelity_cos", "cos(rebuilt δ̃, original δ)"),
        ("mask_density", "mask density |M|/n"),
        ("lambda", "rescaler λ"),
    )
    fig, axes = plt.subplots(len(curves), 3, figsize=(15, 3.8 * len(curves)), squeeze=False)
    for row, (label, c) in zip(axes, curves.items()):
        for ax, (q, title) in zip(row, quantities):
            for j, name in enumerate(names):
                xs = [s for s in range(len(c[q])) if c[q][s][j] is not None]
                ax.plot(xs, [c[q][s][j] for s in xs], marker="o", ms=3, label=name)
            ax.set_xticks(range(len(names)), [f"+{n}" for n in names], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{label}: {title}", fontsize=9)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    from hf_cft.continual.report import results_markdown

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output stem, e.g. benchmarks/results/protocolB-order1")
    p.add_argument("sources", nargs="+", help="tag=path/to/results.json[#label]")
    p.add_argument("--kind", choices=["condu", "pam", "none"], default="none")
    p.add_argument("--title", default="Protocol B (MTIL-mini)")
    p.add_argument("--note", default="", help="setting and command lines, printed under the title")
    a = p.parse_args(argv)
    runs, meta, folders = load_sources(a.sources)
    names = [t["name"] for t in next(iter(meta.values()))["tasks"]]
    md = results_markdown(runs, a.title, a.note, task_names=names).rstrip().splitlines()
    targets = condu_targets(runs) if a.kind == "condu" else pam_targets(runs) if a.kind == "pam" else []
    if targets:
        md += ["", "## Targets (docs/benchmarks.md, Protocol B)", "", *targets]
    summary = {"runs": runs, "sources": meta, "tasks": names}
    if a.kind == "condu":
        curves = {}
        for tag, ref in (("condu", "independent"), ("condu_lora", "independent_lora")):
            f = fidelity(runs, tag, ref)
            if f is not None:
                curves[runs[tag]["label"]] = f
                summary.setdefault("fidelity", {})[tag] = f
        if curves:
            plot_fidelity(curves, names, a.out.with_name(a.out.name + "-fidelity.png"))
            md += [
                "",
                "## Expert fidelity (task id)",
                "",
                "A_ConDU[s, c] / A_independent[c, c] in %: the rebuilt expert of task c after session s against "
                f"its own expert (plot: `{a.out.name}-fidelity.png`).",
                "",
            ]
            for label, f in curves.items():
                md += [
                    f"{label}:",
                    "",
                    "| after ↓ / task → | " + " | ".join(names) + " |",
                    "|---|" + "---|" * len(names),
                ]
                for s, row in enumerate(f):
                    md.append(
                        f"| {names[s]} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in row) + " |"
                    )
                md.append("")
    weight_curves = {}
    if a.kind == "condu":
        weight_curves = {r["label"]: c for r in runs.values() if (c := session_curves(r, names)) is not None}
    if weight_curves:
        png = a.out.with_name(a.out.name + "-sessions.png")
        plot_session_curves(weight_curves, names, png)
        summary["sessions"] = weight_curves
        md += [
            "",
            "## Rebuilt experts in weight space (track_fidelity)",
            "",
            "Cosine between each rebuilt delta δ̃^c = λ^c M^c⊙u and its original δ^c after every session "
            f"(mask density and λ in `{png.name}` and the JSON):",
            "",
        ]
        for label, c in weight_curves.items():
            md += [f"{label}:", "", "| after ↓ / task → | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for s, row in enumerate(c["fidelity_cos"]):
                md.append(f"| {names[s]} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
            md.append("")
    for tag in runs:
        png = folders[tag] / "accuracy_matrix.png"
        if png.is_file():
            shutil.copyfile(png, a.out.with_name(f"{a.out.name}-{tag}.png"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    a.out.with_suffix(".md").write_text("\n".join(md).rstrip() + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
