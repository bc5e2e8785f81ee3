"""Does MergeTune's path term do anything at this scale? An ablation on Protocol A (design C, cached features).

The path term β·(1/N)Σ_k CE(normalise(T2 + α_k(T(w) − T2))) of the prompt family lives in **class-feature space**:
the logits s·x̂·T̂ᵀ are linear in the unnormalised path point, and cross-entropy is convex in the logits, so
(up to the normalisation) the loss along ŵ2 → w can never rise above the chord between its end points. The
LMC constraint it stands for is then satisfied by *every* w, and its gradient, Σ_k α_k·∇CE at points between ŵ2
and w, is a second task-loss gradient. Under Adam, which is invariant to the scale of the loss, a loss
CE + λ·D + β·P with P ≈ ½·CE (the mean α is ½) is (1 + β/2)·(CE + λ/(1 + β/2)·D): the same as β = 0 with a
weaker anchor. This script tests both consequences:

1. the **chord excess** max_t [L(t) − ((1 − t)·L(0) + t·L(1))] along ŵ2 → w on the training shots (≤ 0 means no
   barrier for the path term to remove), with and without the path term;
2. **β against an equivalently weakened anchor**: each β > 0 beside β = 0 with λ/(1 + β/2);

together with the other knobs (N, τ, λ = 0, learning rate, epochs). Every variant continues the same CoOp
solution per seed, with Protocol A's shots and settings (``b2n.fit_prompt`` / ``b2n.fit_mergetune``).

    python benchmarks/run.py path_ablation [--datasets ...] [--seeds 1 2 3]
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from b2n import Context, _acc, _draw_shots, _subset, fit_mergetune, fit_prompt, hm

#: name -> (overrides of Protocol A's hyper-parameters, overrides of the loss options, what it tests)
VARIANTS: dict[str, tuple[dict, dict, str]] = {
    "default": ({}, {}, "Protocol A's MergeTune: λ 8, β 0.5, N 5, τ 0.3, AdamW lr 0.01, 50 epochs"),
    "beta0": ({}, {"path_weight": 0.0}, "no path term"),
    "beta2": ({}, {"path_weight": 2.0}, "β 2"),
    "beta8": ({}, {"path_weight": 8.0}, "β 8"),
    "beta0_lam6.4": ({}, {"path_weight": 0.0, "anchor_weight": 6.4}, "β 0 with λ 8/(1 + 0.5/2): the partner of β 0.5"),
    "beta0_lam4": ({}, {"path_weight": 0.0, "anchor_weight": 4.0}, "β 0 with λ 8/(1 + 2/2): the partner of β 2"),
    "beta0_lam1.6": ({}, {"path_weight": 0.0, "anchor_weight": 1.6}, "β 0 with λ 8/(1 + 8/2): the partner of β 8"),
    "N1": ({}, {"num_alphas": 1}, "one α point (½)"),
    "N10": ({}, {"num_alphas": 10}, "ten α points"),
    "tau0": ({"tau": 0.0}, {}, "start at zero-shot"),
    "tau1": ({"tau": 1.0}, {}, "start at CoOp (the released code)"),
    "lam0": ({}, {"anchor_weight": 0.0}, "path term alone (no anchor)"),
    "lam0_beta0": ({}, {"anchor_weight": 0.0, "path_weight": 0.0}, "neither: continued CoOp from τ"),
    "lr0.002": ({"lr": 0.002}, {}, "learning rate ÷ 5"),
    "epochs20": ({"epochs": 20}, {}, "20 epochs"),
}  # fmt: skip


def chord_excess(feats, labels, a: torch.Tensor, b: torch.Tensor, scale: float, points: int = 11) -> float:
    """max_t [L(t) − ((1 − t)·L(0) + t·L(1))] along normalise((1 − t)·a + t·b) (class features), cross-entropy on
    ``feats``: ≤ 0 when the loss along the path stays under its chord (no barrier)."""
    f = F.normalize(feats.float(), dim=-1)
    ts = [i / (points - 1) for i in range(points)]
    losses = [
        float(F.cross_entropy(scale * f @ F.normalize((1 - t) * a.float() + t * b.float(), dim=-1).t(), labels))
        for t in ts
    ]
    return max(loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(ts, losses))


def run_dataset(model, tok, task, feats: dict, seeds, hp: dict, variants=None, log=print) -> dict:
    """``{variant: [per-seed {"base", "novel", "hm", "excess_shots", "excess_test", "dist_ft", "dist_zs"}]}`` and
    ``"coop"`` / ``"zs_single"`` rows; ŵ1 is the single-template zero-shot head, as in Protocol A."""
    from hf_cft.data import base_novel_classes
    from hf_cft.models import build_zeroshot_classifier
    from hf_cft.models.clip import logit_scale

    variants = variants or list(VARIANTS)
    base_ids, novel_ids = base_novel_classes(task.num_classes)
    base_names = [task.classnames[i] for i in base_ids]
    novel_names = [task.classnames[i] for i in novel_ids]
    bt_f, bt_y = _subset(feats["test_f"], feats["test_y"], base_ids)
    nt_f, nt_y = _subset(feats["test_f"], feats["test_y"], novel_ids)
    pool_f, pool_y = _subset(feats["down_f"], feats["down_y"], base_ids)
    scale = float(logit_scale(model).detach())
    with torch.no_grad():
        zs_b = build_zeroshot_classifier(model, tok, base_names, ["a photo of a {}."]).float()
        zs_n = build_zeroshot_classifier(model, tok, novel_names, ["a photo of a {}."]).float()

    def row(hb, hn) -> dict:
        b, n = _acc(scale * bt_f @ hb.t(), bt_y), _acc(scale * nt_f @ hn.t(), nt_y)
        return {"base": b, "novel": n, "hm": hm(b, n)}

    out = {name: [] for name in ("zs_single", "coop", *variants)}
    ctx_model = Context(model, tok)
    try:
        for seed in seeds:
            t0 = time.perf_counter()
            tr, _ = _draw_shots(pool_y, len(base_ids), seed)
            x, y = pool_f[tr], pool_y[tr]
            out["zs_single"].append(row(zs_b, zs_n))
            ctx_ft = fit_prompt(ctx_model, tok, base_names, x, y, seed, hp)
            coop_b, coop_n = ctx_model.heads(base_names, novel_names)
            out["coop"].append(row(coop_b, coop_n))
            for name in variants:
                hp_over, kw, _ = VARIANTS[name]
                fit_mergetune(ctx_model, tok, base_names, x, y, seed, {**hp, **hp_over}, zs_b, ctx_ft, coop_b, **kw)
                hb, hn = ctx_model.heads(base_names, novel_names)
                r = row(hb, hn)
                r["excess_shots"] = chord_excess(x, y, coop_b, hb, scale)
                r["excess_test"] = chord_excess(bt_f, bt_y, coop_b, hb, scale)
                r["dist_ft"] = float((hb - coop_b).norm(dim=-1).mean())
                r["dist_zs"] = float((hb - zs_b).norm(dim=-1).mean())
                out[name].append(r)
            log(
                f"  {task.name} seed {seed}: CoOp {out['coop'][-1]['hm']:.2f}, "
                + ", ".join(f"{n} {out[n][-1]['hm']:.2f}" for n in variants)
                + f" (HM; {time.perf_counter() - t0:.0f}s)"
            )
    finally:
        ctx_model.close()
    return out


def summarise(per_dataset: dict) -> dict:
    """Per row: the average over datasets of base / novel (HM of the averages, as Protocol A), each seed's
    dataset-averaged HM (for mean ± std over seeds) and the mean chord excess and distances."""
    rows = next(iter(per_dataset.values())).keys()
    seeds = len(next(iter(per_dataset.values()))["coop"])
    summary = {}
    for r in rows:
        base = statistics.fmean(statistics.fmean(s["base"] for s in d[r]) for d in per_dataset.values())
        novel = statistics.fmean(statistics.fmean(s["novel"] for s in d[r]) for d in per_dataset.values())
        per_seed_hm = [
            hm(
                statistics.fmean(d[r][i]["base"] for d in per_dataset.values()),
                statistics.fmean(d[r][i]["novel"] for d in per_dataset.values()),
            )
            for i in range(seeds)
        ]
        s = {
            "base": base,
            "novel": novel,
            "hm": hm(base, novel),
            "hm_seeds": per_seed_hm,
            "hm_std": statistics.stdev(per_seed_hm) if seeds > 1 else 0.0,
        }
        for k in ("excess_shots", "excess_test", "dist_ft", "dist_zs"):
            vals = [x[k] for d in per_dataset.values() for x in d[r] if k in x]
            if vals:
                s[k] = statistics.fmean(vals)
                s[k + "_max"] = max(vals)
        summary[r] = s
    return summary


def markdown(summary: dict, datasets, hp: dict) -> list[str]:
    lines = [
        "| variant | what it tests | base | novel | HM (± std over seeds) | chord excess on shots (mean / max) | "
        "on base test (mean / max) | ‖T(w) − T2‖ | ‖T(w) − T1‖ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, s in summary.items():
        what = VARIANTS[r][2] if r in VARIANTS else {"zs_single": "zero-shot ŵ1", "coop": "CoOp ŵ2"}[r]
        cells = [f"{s['base']:.2f}", f"{s['novel']:.2f}", f"{s['hm']:.2f} ± {s['hm_std']:.2f}"]
        if "excess_shots" in s:
            cells += [
                f"{s['excess_shots']:+.4f} / {s['excess_shots_max']:+.4f}",
                f"{s['excess_test']:+.4f} / {s['excess_test_max']:+.4f}",
                f"{s['dist_ft']:.3f}",
                f"{s['dist_zs']:.3f}",
            ]
        else:
            cells += ["—"] * 4
        lines.append(f"| {r} | {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Datasets {list(datasets)}; Protocol A's shots (16 per base class from the downstream pool) and settings "
        f"{hp}; every variant continues the same CoOp context per seed. HM: of the dataset-averaged base and novel "
        "accuracies; ± the sample std of the per-seed HM. Chord excess: max over 11 points t of L(t) minus the "
        "chord between L(CoOp) and L(w) along CoOp → w (class features, renormalised), cross-entropy on the "
        "training shots and on the base test images; the end points give exactly 0, so 0 means the loss never "
        "rises above its chord (no barrier) and a positive value is a barrier; mean over datasets and seeds / "
        "max. Distances: mean over classes of the unit class features.",
    ]
    return lines
