"""Protocols C (cross-dataset transfer) and D (domain generalisation) of ``docs/benchmarks.md``, on cached image
features of the small pretrained CLIP.

The **source models** are trained once per seed and evaluated by both protocols: CoOp, CoOp + MergeTune, KgCoOp and
KgCoOp + MergeTune on **all** classes of the source (caltech101, the ImageNet stand-in), 16 training shots per
class from its downstream pool with Protocol A's draw (:func:`b2n._draw_shots`: 20 shots per class, the first 16
train, the rest are the validation shots, which no row here chooses anything on: every model is taken at its last
epoch, as in Protocol A), with Protocol A's training functions (:func:`b2n.fit_prompt`, :func:`b2n.fit_mergetune`)
and settings; ŵ1 of MergeTune is the single-template zero-shot head over the source's classes.

- **Protocol C**: each model classifies the test split of every other dataset *zero-shot style*: the learned
  context followed by the **target's** class names (the source's classes play no part); the zero-shot rows use the
  target's names with "a photo of a {}." (``zs_single``) and with the target's template ensemble
  (``zs_ensemble``). The source's own test accuracy is reported beside it.
- **Protocol D**: each model classifies shifted copies of the source's test images (:mod:`hf_cft.data.shifts`:
  fixed, deterministic shifts, chosen before any result was seen) over the source's classes; the unshifted (ID)
  accuracy beside it.

Every cell is the mean ± the sample standard deviation over seeds (0 with one seed); the average column averages
each seed's accuracies over the targets (or shifts) first.
"""

from __future__ import annotations

import statistics
import time

import torch
from b2n import KG_WEIGHT, Context, _acc, _draw_shots, fit_mergetune, fit_prompt

SOURCE = "caltech101"
#: The result files of each protocol (``benchmarks/results/<name>.{json,md,png}``).
OUTPUT_NAMES = {"transfer": "protocolC", "domain": "protocolD"}
ROWS = ("zs_single", "zs_ensemble", "coop", "mergetune", "kgcoop", "kgcoop_mergetune")
#: The rows that train a context on the source, and the fine-tuned row each MergeTune row starts from.
PROMPT_ROWS = ROWS[2:]
MERGES = {"mergetune": "coop", "kgcoop_mergetune": "kgcoop"}
LABELS = {
    "zs_single": "zero-shot ('a photo of a {}.')",
    "zs_ensemble": "zero-shot (template ensemble)",
    "coop": "CoOp",
    "mergetune": "CoOp + MergeTune",
    "kgcoop": "KgCoOp",
    "kgcoop_mergetune": "KgCoOp + MergeTune",
}


def train_source(ctx_model: Context, tok, classnames, x, y, zs_head, seed: int, hp: dict, rows=PROMPT_ROWS) -> dict:
    """The learned contexts ``{row: ctx}`` of the prompt ``rows`` (and the fine-tuned rows their MergeTune rows
    start from) on the source features ``x`` / labels ``y`` over ``classnames``; ``zs_head`` is ŵ1 (and KgCoOp's
    hand-crafted text features)."""
    want = set(rows) | {MERGES[r] for r in rows if r in MERGES}
    ctxs = {}
    for ft, kg in (("coop", None), ("kgcoop", zs_head)):
        if ft not in want:
            continue
        ctxs[ft] = fit_prompt(ctx_model, tok, classnames, x, y, seed, hp, kg_text=kg)
        mt = next(m for m, f in MERGES.items() if f == ft)
        if mt in want:
            head_ft = ctx_model.head(classnames)
            kw = {"anchor_weight": KG_WEIGHT} if ft == "kgcoop" else {}  # as b2n's kgcoop_mergetune
            ctxs[mt] = fit_mergetune(ctx_model, tok, classnames, x, y, seed, hp, zs_head, ctxs[ft], head_ft, **kw)
    return {r: ctxs[r] for r in rows if r in ctxs}


def run(
    model,
    tok,
    source,
    source_feats: dict,
    targets: dict,
    shifted: dict,
    seeds,
    hp: dict,
    rows=ROWS,
    log=print,
    stop_before=None,
) -> dict:
    """Both protocols' accuracies per seed.

    ``source``: the source task (``name``, ``classnames``, ``templates``); ``source_feats``: its ``test_f`` /
    ``test_y`` and downstream-pool ``down_f`` / ``down_y`` features; ``targets``: ``{name: (task, test_f,
    test_y)}`` (Protocol C; empty to skip it); ``shifted``: ``{shift: test_f}``, the features of the shifted
    source test images in the order of ``test_y`` (Protocol D; empty to skip). Returns ``{"source": {row: [acc
    per seed]}, "transfer": {target: {row: [...]}}, "domain": {shift: {row: [...]}}, "seeds": [seeds run]}``.
    ``stop_before(seconds_per_seed)``, asked before every seed after the first with the mean time of the seeds so
    far, ends the run early when it returns true (a time budget): the result then covers the seeds run."""
    from hf_cft.models import build_zeroshot_classifier
    from hf_cft.models.clip import logit_scale

    rows = tuple(rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown cross-dataset rows {unknown}; choose from {ROWS}")
    dev = next(model.parameters()).device
    scale = logit_scale(model).detach().float()
    names = list(source.classnames)
    pool_f, pool_y = source_feats["down_f"].to(dev), source_feats["down_y"].to(dev)
    # every evaluation set: (class names, templates, features, labels)
    sets = {"source": (names, source.templates, source_feats["test_f"].to(dev), source_feats["test_y"].to(dev))}
    sets.update({("domain", s): (names, source.templates, f.to(dev), sets["source"][3]) for s, f in shifted.items()})
    sets.update(
        {("transfer", t): (list(task.classnames), task.templates, f.to(dev), y.to(dev)) for t, (task, f, y) in
         targets.items()}
    )  # fmt: skip
    with torch.no_grad():
        zs = {
            key: {
                "zs_single": build_zeroshot_classifier(model, tok, cn, ["a photo of a {}."]).float(),
                "zs_ensemble": build_zeroshot_classifier(model, tok, cn, list(tpl)).float(),
            }
            for key, (cn, tpl, _, _) in sets.items()
        }
    acc = {key: {row: [] for row in rows} for key in sets}
    ctx_model = Context(model, tok)
    done, spent = [], 0.0
    try:
        for seed in seeds:
            if done and stop_before is not None and stop_before(spent / len(done)):
                log(f"  stopping before seed {seed}: the time budget would be exceeded")
                break
            t0 = time.perf_counter()
            tr, _ = _draw_shots(pool_y, len(names), seed)
            x, y = pool_f[tr.to(dev)], pool_y[tr.to(dev)]
            ctxs = train_source(ctx_model, tok, names, x, y, zs["source"]["zs_single"], seed, hp, rows)
            for key, (cn, _, f, lab) in sets.items():
                for row in rows:
                    if row in zs[key]:
                        head = zs[key][row]
                    else:  # the learned context with this set's class names
                        ctx_model.set(ctxs[row])
                        head = ctx_model.head(cn)
                    acc[key][row].append(_acc(scale * f @ head.t(), lab))
            mean_t = {r: _mean([acc[k][r][-1] for k in acc if k[0] == "transfer"]) for r in rows} if targets else {}
            mean_d = {r: _mean([acc[k][r][-1] for k in acc if k[0] == "domain"]) for r in rows} if shifted else {}
            log(
                f"  seed {seed}: source "
                + ", ".join(f"{r} {acc['source'][r][-1]:.1f}" for r in rows)
                + ("; targets " + ", ".join(f"{r} {v:.1f}" for r, v in mean_t.items()) if mean_t else "")
                + ("; shifts " + ", ".join(f"{r} {v:.1f}" for r, v in mean_d.items()) if mean_d else "")
                + f" ({time.perf_counter() - t0:.0f}s)"
            )
            done.append(seed)
            spent += time.perf_counter() - t0
    finally:
        ctx_model.close()
    return {
        "source": acc.pop("source"),
        "transfer": {k[1]: v for k, v in acc.items() if k[0] == "transfer"},
        "domain": {k[1]: v for k, v in acc.items() if k[0] == "domain"},
        "seeds": done,
    }


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _stat(runs) -> dict:
    return {"mean": _mean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else 0.0, "runs": list(runs)}


def summarise(out: dict, which: str, rows=ROWS) -> dict:
    """One protocol's table (``which`` = ``"transfer"`` or ``"domain"``): per column and row the mean ± std over
    seeds, the average column (each seed's mean over the columns, then mean ± std over seeds), the source (ID)
    accuracy, and how often each row beats zero-shot ``'a photo of a {}.'``."""
    cols = out[which]
    if not cols:
        raise ValueError(f"no {which} results to summarise")
    n_seeds = len(out["source"][rows[0]])
    table = {c: {r: _stat(cols[c][r]) for r in rows} for c in cols}
    average = {r: _stat([_mean([cols[c][r][s] for c in cols]) for s in range(n_seeds)]) for r in rows}
    source = {r: _stat(out["source"][r]) for r in rows}
    beats_zs = {
        r: sum(table[c][r]["mean"] > table[c]["zs_single"]["mean"] for c in cols) for r in rows if r != "zs_single"
    }
    return {"columns": table, "average": average, "source": source, "beats_zs_single": beats_zs}


def _cell(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def markdown(summary: dict, which: str, rows=ROWS) -> list[str]:
    cols = list(summary["columns"])
    first = f"{SOURCE} (source)" if which == "transfer" else f"ID ({SOURCE} test)"
    what = "targets" if which == "transfer" else "shifts"
    lines = [
        f"| method | {first} | " + " | ".join(cols) + f" | average ({len(cols)} {what}) |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for r in rows:
        cells = [_cell(summary["source"][r])] + [_cell(summary["columns"][c][r]) for c in cols]
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + f" | **{_cell(summary['average'][r])}** |")
    zs = summary["average"]["zs_single"]["mean"]
    lines += [
        "",
        "Beats zero-shot ('a photo of a {}.') on: "
        + "; ".join(
            f"{LABELS[r]} {n} of {len(cols)} {what} (average {summary['average'][r]['mean'] - zs:+.2f})"
            for r, n in summary["beats_zs_single"].items()
        )
        + ".",
    ]
    return lines


def protocol_result(out: dict, which: str, hp: dict, n_classes: int, requested=None, deadline=None) -> dict:
    """What the harness writes for one protocol: the summary, its Markdown table (with the shifts' parameters for
    Protocol D and the settings), the plot's bars; ``requested`` seeds not in ``out["seeds"]`` are said to have
    been left out by ``deadline``."""
    from hf_cft.data import DOMAIN_SHIFTS, SHIFT_PARAMETERS

    summary = summarise(out, which)
    lines = markdown(summary, which)
    if which == "domain":
        lines += ["", "Shifts (hf_cft.data.shifts, fixed before any result was seen): "
                  + "; ".join(f"{s} {SHIFT_PARAMETERS[s]}" for s in DOMAIN_SHIFTS if s in summary["columns"]) + "."]  # fmt: skip
    lines += ["", f"Source models: {SOURCE}, all {n_classes} classes, 16 shots per class; hyper-parameters {hp}; "
              f"every cell mean ± sample std over seeds {out['seeds']}."]  # fmt: skip
    if requested is not None and list(requested) != list(out["seeds"]):
        lines += ["", f"**Only seeds {out['seeds']} of {list(requested)} ran**: the next seed would have ended after "
                  f"--deadline {deadline} UTC."]  # fmt: skip
    plot_rows = {c: {r: v["mean"] for r, v in row.items()} for c, row in summary["columns"].items()}
    plot_rows["average"] = {r: v["mean"] for r, v in summary["average"].items()}
    return {
        **summary,
        "hyper_parameters": hp,
        "source_dataset": SOURCE,
        "source_classes": n_classes,
        "table": lines,
        "rows": plot_rows,
        "plot": ("bars", list(ROWS)),
    }


def combine(json_files: list[str], out_stem: str) -> dict:
    """Merge result files of one protocol (``protocolC*.json`` or ``protocolD*.json``) run on disjoint seeds with
    the same settings into one table over all their seeds (``<out_stem>.{json,md,png}``)."""
    import json
    from pathlib import Path

    from run import plot

    from hf_cft.utils import atomic_write_bytes, atomic_write_json

    recs = [json.loads(Path(f).read_text()) for f in json_files]
    name = recs[0]["protocol"]
    which = {v: k for k, v in OUTPUT_NAMES.items()}.get(name)
    if which is None:
        raise ValueError(f"{json_files[0]}: protocol {name!r} is not {list(OUTPUT_NAMES.values())}")
    for f, r in zip(json_files, recs):
        if r["protocol"] != name or r["hyper_parameters"] != recs[0]["hyper_parameters"]:
            raise ValueError(f"{f}: another protocol or other hyper-parameters than {json_files[0]}")
    seeds = [s for r in recs for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the files share seeds: {seeds}")
    cols = list(recs[0]["columns"])
    out = {
        "source": {r: [x for rec in recs for x in rec["source"][r]["runs"]] for r in ROWS},
        which: {c: {r: [x for rec in recs for x in rec["columns"][c][r]["runs"]] for r in ROWS} for c in cols},
        "seeds": seeds,
    }
    res = protocol_result(out, which, recs[0]["hyper_parameters"], recs[0]["source_classes"])
    head = {k: recs[0][k] for k in ("date", "machine", "versions", "checkpoint", "threads")}
    record = {
        "protocol": name,
        "quick": any(r["quick"] for r in recs),
        "seeds": seeds,
        **head,
        "combined_from": [{"command": r["command"], "seeds": r["seeds"], "date": r["date"]} for r in recs],
        "seconds": sum(r["seconds"] for r in recs),
        **{k: v for k, v in res.items() if k != "plot"},
    }
    atomic_write_json(Path(out_stem + ".json"), record)
    runs = "; ".join(f"`{r['command']}` (seeds {r['seeds']}, {r['date']}, {r['seconds']:.0f} s)" for r in recs)
    md = (
        f"# {name}\n\nSmall pretrained CLIP ({head['checkpoint']['path']}), ../shared/data (small re-encoded subsets, "
        f"not the official datasets); {head['machine']['cpus']} CPU cores ({head['threads']} torch threads), no GPU; "
        f"seeds {seeds}, combined from {runs}.\n\n" + "\n".join(res["table"]) + "\n"
    )
    atomic_write_bytes(Path(out_stem + ".md"), md.encode())
    plot(res, Path(out_stem + ".png"), f"{name} — small pretrained CLIP on ../shared/data")
    return record


if __name__ == "__main__":
    import sys

    usage = "usage: python benchmarks/crossdata.py combine OUT_STEM RESULT.json [RESULT.json ...]"
    if sys.argv[1:2] in (["-h"], ["--help"]):  # the runs themselves start from benchmarks/run.py
        print(usage + "\n\n" + __doc__.split("\n\n")[0] + "\nRuns: python benchmarks/run.py --help.")
        raise SystemExit(0)
    if len(sys.argv) < 4 or sys.argv[1] != "combine":
        raise SystemExit(usage)
    combine(sys.argv[3:], sys.argv[2])
