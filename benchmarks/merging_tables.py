"""Protocol B (MTIL-mini) rows of every merging strategy, full fine-tuning and LoRA side by side (issue 18, item 5).

Reads the ``results.json`` of continual recipe runs (one or more strategies each; a later file's strategy replaces
an earlier one's) and writes one table per order: ACC (Last) / BWT / Transfer / Average for full fine-tuning and
for LoRA, one row per strategy, the strategy's kind (task id needed or not) beside it::

    python benchmarks/merging_tables.py benchmarks/results/protocolB-merging-order1 --title "Order I" \\
        --full RUN_FULL/results.json ... --lora RUN_LORA/results.json ...

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# strategy → (label, needs the task id at inference)
ROWS = {
    "zeroshot": ("zero-shot θ⁰", False),
    "independent": ("independent experts (upper bound)", True),
    "task_arithmetic": ("task arithmetic", False),
    "ties": ("TIES", False),
    "dare": ("DARE (+ task arithmetic)", False),
    "consensus": ("consensus (TALL + task arithmetic)", False),
    "breadcrumbs": ("breadcrumbs", False),
    "della": ("DELLA", False),
    "model_stock": ("model stock", False),
    "slerp": ("SLERP (running, t = 1/T)", False),
    "tsv_m": ("TSV-M", False),
    "iso_c": ("Iso-C", False),
    "iso_cts": ("Iso-CTS", False),
    "regmean": ("RegMean", False),
    "fisher": ("Fisher merging", False),
    "tall": ("TALL masks", True),
    "emr": ("EMR", True),
    "condu": ("ConDU", True),
    "pam": ("PAM", False),
    "pam_tall": ("PAM + TALL", True),
}
METRICS = ("last", "bwt", "transfer", "average")
# strategies added by issue 18 (new methods, and one-shot methods that became continual strategies)
NEW = {
    "dare",
    "consensus",
    "breadcrumbs",
    "della",
    "model_stock",
    "slerp",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "regmean",
    "fisher",
    "tall",
    "pam_tall",
}


def gather(paths: list[str], option: str = "--full") -> tuple[dict, dict]:
    runs, meta = {}, {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"merging_tables.py: error: {option} {path!r} cannot be read as JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise SystemExit(
                f"merging_tables.py: error: {option} {path!r} is not a continual run's results.json (no 'results')."
            )
        for name, result in data["results"].items():
            runs[name] = result
        config = dict(data.get("config") or {})
        if config.get("expert_cache"):  # a folder of the machine it ran on: not recorded
            config["expert_cache"] = "DIR"
        meta = {k: data.get(k) for k in ("benchmark", "stream", "tasks", "machine")} | {"config": config}
    return runs, meta


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output path without extension: OUT.json and OUT.md are written")
    p.add_argument("--title", default="", help="the table's title (e.g. 'Order I')")
    p.add_argument("--full", nargs="*", default=[], help="results.json of full fine-tuning runs (later ones win)")
    p.add_argument("--lora", nargs="*", default=[], help="results.json of LoRA runs (later ones win)")
    p.add_argument("--note", default="", help="a paragraph printed under the title")
    a = p.parse_args(argv)
    full, full_meta = gather(a.full, "--full")
    lora, lora_meta = gather(a.lora, "--lora")
    names = [n for n in ROWS if n in full or n in lora] + sorted((set(full) | set(lora)) - set(ROWS))
    table = {
        n: {
            "label": ROWS.get(n, (n, False))[0] + (" *" if n in NEW else ""),
            "task_id": ROWS.get(n, (n, False))[1],
            "full": full[n]["metrics"] if n in full else None,
            "lora": lora[n]["metrics"] if n in lora else None,
            "seconds": {"full": full.get(n, {}).get("seconds"), "lora": lora.get(n, {}).get("seconds")},
        }
        for n in names
    }
    out = Path(a.out)
    result = {"title": a.title, "rows": table, "full": full_meta, "lora": lora_meta, "note": a.note}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return result


def _cells(m: dict | None) -> list[str]:
    return [f"{m[k]:.2f}" for k in METRICS] if m else [""] * len(METRICS)


def markdown(result: dict) -> str:
    head = ["strategy", "task id"] + [f"FT {k}" for k in METRICS] + [f"LoRA {k}" for k in METRICS]
    lines = [f"# Protocol B (MTIL-mini) merging strategies — {result['title']}".rstrip(" —"), ""]
    if result["note"]:
        lines += [result["note"], ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["rows"].items():
        row = [f"{r['label']} (`{name}`)", "yes" if r["task_id"] else "no", *_cells(r["full"]), *_cells(r["lora"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "\\* a strategy new in this table (a new method, or a one-shot method that became a continual strategy). "
        "ACC (Last) = mean accuracy after the last task; BWT = mean over c < T−1 of A[T−1, c] − A[c, c]; Transfer = "
        "mean accuracy on a dataset before it is learned; Average = mean of all entries per dataset.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
