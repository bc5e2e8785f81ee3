"""Protocol E — robust fine-tuning (``docs/benchmarks.md``), on the small pretrained CLIP (design C).

The source is caltech101 (the ImageNet stand-in of Protocols C and D). Each seed splits its **whole downstream
pool** (the 30% of each class's training images that pretraining never saw) into 80% training and 20% ID
validation images per class (the split depends on the seed). Two fine-tuning families:

- **LP** (linear probe on frozen image features): a head ``logits = s·x̂·Vᵀ`` over all 101 classes, initialised with
  the zero-shot text head (template ensemble) and trained with cross-entropy; its learning rate is chosen on the
  ID validation images (``b2n.HEAD_LRS``). MergeTune continues it in the head family
  (:func:`hf_cft.trainers.train_head_on_features`: ŵ1 = the zero-shot head, ŵ2 = the probe; λ as Protocol A's
  head rows, λ/(2·C·s²), β, N = 5, τ-initialisation).
- **E2E** (end-to-end fine-tuning of the image tower: ``vision_model`` and ``visual_projection``; the text tower,
  and so the zero-shot text head over the template ensemble, stays frozen) with ``ClipClassificationTrainer``;
  MergeTune continues it in the full fine-tuning family (:class:`hf_cft.trainers.MergeTuneTrainer` on the plain
  ``CLIPModel``: ŵ1 = the pretrained image tower, ŵ2 = the fine-tuned one), its anchor Σ(w − ŵ1)² weighted by
  ``λ_E / ‖ŵ2 − ŵ1‖²`` (``E2E["lam"]`` = 1: the anchor at ŵ2 is then 1, the order of a cross-entropy loss; the
  paper publishes no λ for E2E and the spec says to re-tune it).

Rows per family, each evaluated on caltech101's test split (ID) and on the six fixed shifts of Protocol D
(:mod:`hf_cft.data.shifts`, the same images): zero-shot (template ensemble); the fine-tuned model; **WiSE-FT**
(1 − γ)·ŵ1 + γ·ŵ2 with γ ∈ {0, 0.1, …, 1} chosen on the ID validation images; the **output ensemble** of the
fine-tuned and zero-shot models (mean of their softmax probabilities); **MergeTune**; and **MergeTune + weight
ensemble** (1 − γ)·ŵ1 + γ·w, γ chosen on the ID validation images as for WiSE-FT (``mergetune.md`` §9, the paper's
strongest robust-FT row). The inference cost of each row is the number of image-tower forwards per image: 2 for
the E2E output ensemble, 1 for every other row (a head's logits cost nothing beside the forward, so the LP output
ensemble needs one forward and two heads).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from b2n import HEAD_LRS, _acc, _Images
from b2n import _image_feats as b2n_image_feats

SOURCE = "caltech101"
FAMILIES = ("lp", "e2e")
ROWS = ("zeroshot", "finetuned", "wise", "output_ensemble", "mergetune", "mergetune_ensemble")
LABELS = {
    "zeroshot": "zero-shot (template ensemble)",
    "finetuned": "fine-tuned",
    "wise": "WiSE-FT (γ on ID validation)",
    "output_ensemble": "output ensemble (fine-tuned + zero-shot)",
    "mergetune": "MergeTune",
    "mergetune_ensemble": "MergeTune + weight ensemble (γ on ID validation)",
}
#: image-tower forwards per image, per family and row
COST = {
    "lp": dict.fromkeys(ROWS, 1),
    "e2e": {**dict.fromkeys(ROWS, 1), "output_ensemble": 2},
}
GAMMAS = [g / 10 for g in range(11)]
#: E2E settings: the fine-tuning run, and MergeTune's epochs (each step also runs the image tower at N = 5 path
#: points) and anchor weight λ_E (the anchor is λ_E/‖ŵ2 − ŵ1‖²·Σ(w − ŵ1)², λ_E at ŵ2)
E2E = {"lr": 1e-4, "epochs": 10, "weight_decay": 0.1, "batch_size": 128, "mt_epochs": 5, "lam": 1.0}


def _vision_keys(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(("vision_model.", "visual_projection."))]


def _set_trainable(model, keys) -> None:
    keys = set(keys)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keys)


def _image_feats(model, images_u8: torch.Tensor) -> torch.Tensor:
    """Unit image features of ``model`` (Protocol A's :func:`b2n._image_feats`, normalised)."""
    return F.normalize(b2n_image_feats(model, images_u8, next(model.parameters()).device), dim=-1)


def _tower_state(model, keys: set[str]) -> dict:
    """Detached copies of ``model``'s image-tower tensors."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}


def _probs(scale: float, feats: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return (scale * feats @ head.t()).softmax(-1)


def _interpolate(model, zs: dict, other: dict, gamma: float):
    """``model`` with its image tower at (1 − γ)·zs + γ·other (in place; returns it)."""
    state = {k: (1 - gamma) * zs[k] + gamma * other[k] for k in zs}
    model.load_state_dict(state, strict=False)
    return model


def _best_gamma(score) -> float:
    """The γ of ``GAMMAS`` with the best ID validation accuracy ``score(γ)`` (ties: the smaller γ, nearer zero-shot)."""
    best = max(GAMMAS, key=lambda g: (score(g), -g))
    return best


def run_seed(model, tok, source, data: dict, shifted: dict, seed: int, hp: dict, log=print, e2e_hp=None) -> dict:
    """``{family: {row: {"id": acc, "shifts": {name: acc}, ...}}}`` for one seed. ``data`` holds the downstream
    pool's and the test split's images (``down_im``, ``down_y``, ``test_im``, ``test_y``) and features (``down_f``,
    ``test_f``, from the pretrained model); ``shifted`` maps a shift's name to ``(images, features)`` of the test
    split."""
    from hf_cft.data import split_per_class_indices
    from hf_cft.models import build_zeroshot_classifier
    from hf_cft.models.clip import logit_scale
    from hf_cft.trainers import train_head_on_features

    e2e_hp = {**E2E, **(e2e_hp or {})}
    t0 = time.perf_counter()
    tr, va = split_per_class_indices(data["down_y"].numpy(), 0.8, seed=seed)
    tr, va = torch.as_tensor(tr), torch.as_tensor(va)
    y_tr, y_va, y_te = data["down_y"][tr], data["down_y"][va], data["test_y"]
    scale = float(logit_scale(model).detach())
    with torch.no_grad():
        v_zs = build_zeroshot_classifier(model, tok, list(source.classnames), list(source.templates)).float()
    f_tr, f_va, f_te = (
        F.normalize(t.float(), dim=-1) for t in (data["down_f"][tr], data["down_f"][va], data["test_f"])
    )
    sets = {"id": (f_te, y_te), **{s: (F.normalize(f.float(), dim=-1), y_te) for s, (_, f) in shifted.items()}}
    out: dict = {"lp": {}, "e2e": {}}

    # ------------------------------------------------------------------ LP family (heads on frozen features)
    def head_row(head=None, probs=None):
        if probs is None:
            return {k: _acc(f @ head.t(), y) for k, (f, y) in sets.items()}
        return {k: _acc(probs(f), y) for k, (f, y) in sets.items()}

    fits = []
    for lr in HEAD_LRS:
        v, _ = train_head_on_features(v_zs, f_tr, y_tr, scale, seed=seed, lr=lr, epochs=hp["epochs"],
                                      batch_size=hp["batch_size"], optimizer=hp["optimizer"])  # fmt: skip
        fits.append((_acc(f_va @ v.t(), y_va), -lr, v))
    _, neg_lr, v_ft = max(fits, key=lambda f: (f[0], f[1]))
    lp = out["lp"]
    lp["zeroshot"] = head_row(v_zs)
    lp["finetuned"] = head_row(v_ft)
    g = _best_gamma(lambda g: _acc(f_va @ ((1 - g) * v_zs + g * v_ft).t(), y_va))
    lp["wise"] = {**head_row((1 - g) * v_zs + g * v_ft), "gamma": g}
    lp["output_ensemble"] = head_row(probs=lambda f: (_probs(scale, f, v_zs) + _probs(scale, f, v_ft)) / 2)
    lam = hp["lam"] / (2.0 * source.num_classes * scale**2)  # Protocol A's head rows
    init = (1 - hp["tau"]) * v_zs + hp["tau"] * v_ft
    v_mt, _ = train_head_on_features(
        init, f_tr, y_tr, scale, weight_zs=v_zs, weight_ft=v_ft, anchor_weight=lam, path_weight=hp["beta"],
        num_alphas=5, seed=seed, lr=-neg_lr, epochs=hp["epochs"], batch_size=hp["batch_size"],
        optimizer=hp["optimizer"],
    )  # fmt: skip
    lp["mergetune"] = head_row(v_mt)
    g = _best_gamma(lambda g: _acc(f_va @ ((1 - g) * v_zs + g * v_mt).t(), y_va))
    lp["mergetune_ensemble"] = {**head_row((1 - g) * v_zs + g * v_mt), "gamma": g}
    lp["lr"] = -neg_lr
    log(
        f"  seed {seed} LP: "
        + ", ".join(f"{r} {lp[r]['id']:.1f}" for r in ROWS)
        + f" ({time.perf_counter() - t0:.0f}s)"
    )

    # ------------------------------------------------------------------ E2E family (the image tower)
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer

    t1 = time.perf_counter()
    keys = _vision_keys(model)
    tower = set(keys)
    zs_state = _tower_state(model, tower)
    images = {"id": data["test_im"], **{s: im for s, (im, _) in shifted.items()}}
    train_set = _Images(data["down_im"][tr], y_tr)
    names, templates = list(source.classnames), list(source.templates)
    common = dict(
        per_device_train_batch_size=e2e_hp["batch_size"], learning_rate=e2e_hp["lr"],
        weight_decay=e2e_hp["weight_decay"],
        optim="adamw_torch", lr_scheduler_type="cosine", save_strategy="no", report_to=[], seed=seed,
        disable_tqdm=True, logging_steps=10**6, use_cpu=True,
    )  # fmt: skip

    def feats_of(m) -> dict:
        return {k: _image_feats(m, im) for k, im in images.items()}

    def val_acc(m) -> float:
        return _acc(_image_feats(m, data["down_im"][va]) @ v_zs.t(), y_va)

    zs_feats = {k: f for k, (f, _) in sets.items()}
    e2e = out["e2e"]
    e2e["zeroshot"] = {k: _acc(f @ v_zs.t(), y_te) for k, f in zs_feats.items()}
    with tempfile.TemporaryDirectory() as tmp:
        ft = copy.deepcopy(model)
        _set_trainable(ft, keys)
        ClipClassificationTrainer(
            ft, ClipTrainingArguments(output_dir=f"{tmp}/ft-run", num_train_epochs=e2e_hp["epochs"], **common),
            names, templates, tok, train_dataset=train_set,
        ).train()  # fmt: skip
        ft.save_pretrained(f"{tmp}/ft")
        ft_state = _tower_state(ft, tower)
        ft_feats = feats_of(ft)
        e2e["finetuned"] = {k: _acc(f @ v_zs.t(), y_te) for k, f in ft_feats.items()}
        e2e["output_ensemble"] = {
            k: _acc((_probs(scale, zs_feats[k], v_zs) + _probs(scale, ft_feats[k], v_zs)) / 2, y_te) for k in images
        }
        probe = copy.deepcopy(model)
        g = _best_gamma(lambda g: val_acc(_interpolate(probe, zs_state, ft_state, g)))
        e2e["wise"] = {
            **{k: _acc(f @ v_zs.t(), y_te) for k, f in feats_of(_interpolate(probe, zs_state, ft_state, g)).items()},
            "gamma": g,
        }
        log(f"  seed {seed} E2E fine-tuned: ID {e2e['finetuned']['id']:.1f} ({time.perf_counter() - t1:.0f}s)")

        mt = copy.deepcopy(model)
        _set_trainable(mt, keys)
        dist2 = sum(float(((ft_state[k] - zs_state[k]) ** 2).sum()) for k in keys)
        args = MergeTuneConfig(
            output_dir=f"{tmp}/mt-run", num_train_epochs=e2e_hp["mt_epochs"], anchor_weight=e2e_hp["lam"] / dist2,
            path_weight=hp["beta"], num_alphas=5, tau=hp["tau"], **common,
        )  # fmt: skip
        MergeTuneTrainer(mt, args, names, templates, tok, finetuned=f"{tmp}/ft", train_dataset=train_set).train()
        mt_state = _tower_state(mt, tower)
        e2e["mergetune"] = {k: _acc(f @ v_zs.t(), y_te) for k, f in feats_of(mt).items()}
        g = _best_gamma(lambda g: val_acc(_interpolate(probe, zs_state, mt_state, g)))
        e2e["mergetune_ensemble"] = {
            **{k: _acc(f @ v_zs.t(), y_te) for k, f in feats_of(_interpolate(probe, zs_state, mt_state, g)).items()},
            "gamma": g,
        }
        e2e["distance_ft"] = dist2**0.5
        e2e["distance_mt"] = sum(float(((mt_state[k] - zs_state[k]) ** 2).sum()) for k in keys) ** 0.5
    log(
        f"  seed {seed} E2E: "
        + ", ".join(f"{r} {e2e[r]['id']:.1f}" for r in ROWS)
        + f" ({time.perf_counter() - t1:.0f}s)"
    )
    return out


def run(model, tok, source, data: dict, shifted: dict, seeds, hp: dict, log=print, e2e_hp=None) -> dict:
    per_seed = [run_seed(model, tok, source, data, shifted, s, hp, log, e2e_hp) for s in seeds]
    return {"seeds": list(seeds), "per_seed": per_seed, "e2e": {**E2E, **(e2e_hp or {})}}


def summarise(out: dict, shifts) -> dict:
    """Per family and row: mean ± sample std over seeds of ID, every shift and the shift average."""
    summary = {}
    for fam in FAMILIES:
        summary[fam] = {}
        for row in ROWS:
            runs = [s[fam][row] for s in out["per_seed"]]
            cols = {"id": [r["id"] for r in runs]}
            for sh in shifts:
                cols[sh] = [r[sh] for r in runs]
            cols["shift_avg"] = [statistics.fmean(r[sh] for sh in shifts) for r in runs]
            summary[fam][row] = {
                k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in cols.items()
            }
            if "gamma" in runs[0]:
                summary[fam][row]["gamma"] = [r["gamma"] for r in runs]
            summary[fam][row]["cost"] = COST[fam][row]
    return summary


def markdown(summary: dict, shifts, hp: dict, e2e_hp: dict) -> list[str]:
    lines = []
    for fam, title in (("lp", "Linear probe (LP)"), ("e2e", "End-to-end fine-tuning of the image tower (E2E)")):
        lines += [f"## {title}", ""]
        lines.append(
            "| row | ID (caltech101 test) | " + " | ".join(shifts) + " | shift average | forwards / image | γ |"
        )
        lines.append("|---|---|" + "---|" * len(shifts) + "---|---|---|")
        for row in ROWS:
            s = summary[fam][row]
            cells = [f"{s[k][0]:.2f} ± {s[k][1]:.2f}" for k in ("id", *shifts)]
            avg = f"**{s['shift_avg'][0]:.2f} ± {s['shift_avg'][1]:.2f}**"
            gam = ", ".join(f"{g:g}" for g in s.get("gamma", [])) or "—"
            lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + f" | {avg} | {s['cost']} | {gam} |")
        lines.append("")
    lines.append(
        f"Source: caltech101's whole downstream pool (80% train / 20% ID validation per class, split by seed). LP: "
        f"head from the zero-shot text head, lr from {list(HEAD_LRS)} on ID validation, {hp['epochs']} epochs, "
        f"batch {hp['batch_size']}, {hp['optimizer']}; MergeTune λ = {hp['lam']}/(2·C·s²), β = {hp['beta']}, N = 5, "
        f"τ = {hp['tau']}. E2E: image tower, AdamW lr {e2e_hp['lr']}, weight decay {e2e_hp['weight_decay']}, "
        f"{e2e_hp['epochs']} epochs, batch {e2e_hp['batch_size']}, cosine; MergeTune {e2e_hp['mt_epochs']} epochs, "
        f"anchor {e2e_hp['lam']}/‖ŵ2 − ŵ1‖²·Σ(w − ŵ1)², β = {hp['beta']}, N = 5, τ = {hp['tau']}. γ of WiSE-FT and the "
        "weight ensemble: the best of 0, 0.1, …, 1 on the ID validation images (per seed, listed). Every cell: mean ± "
        "sample std over seeds."
    )
    return lines
