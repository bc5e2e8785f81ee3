"""Protocol A (base-to-novel) of ``docs/benchmarks.md`` for MergeTune, on cached image features.

Per dataset and seed: 16 training + 4 validation shots per base class (the first ⌈n/2⌉ class ids) from the
downstream pool; base and novel classes tested separately on the test split, each in its own label space.

Rows (prompt family, CoOp context ``ctx`` initialised from "a photo of a"):

- ``zs_single`` / ``zs_ensemble``: zero-shot with "a photo of a {}." (the literature's reference; the CoOp prompt
  at initialisation) and with the dataset's template ensemble;
- ``coop``: CoOp trained on the base shots (ŵ2);
- ``mergetune``: CoOp + MergeTune with the paper's defaults (λ = 8, β = 0.5, N = 5, τ = 0.3, cosine anchor);
  ŵ1 = the single-template zero-shot classifier; same optimiser, learning rate and epochs as CoOp (§8);
- ``mergetune_fisher``: the diagonal-Fisher anchor (Fisher of ŵ1's predictions on the training shots, labels
  sampled, normalised to mean 1 + 1e-3);
- ``mergetune_lam0`` / ``mergetune_beta0``: ablations without the anchor / without the path term;
- ``ties`` / ``dare``: CoOp ⊕ zero-shot in context space, τ = ctx_CoOp − E("a photo of a") merged with
  ``hf_cft.merging.ties`` (k = 0.2, λ = 1) / ``dare`` (ρ = 0.9, then task arithmetic with λ = 1);
- ``wise``: ctx = (1 − γ)·E(p0) + γ·ctx_CoOp with γ ∈ {0, 0.1, …, 1} chosen on the base validation shots;
- ``output_ensemble``: mean of the zero-shot and CoOp class probabilities.

Rows computed only when asked for (``run.py b2n --methods ...``; ``EXTRA_ROWS``):

- ``kgcoop``: KgCoOp — CoOp with the knowledge-guided term λ_kg·(1 − mean cos(T(w), T_zs)), λ_kg = 8 and T_zs the
  single-template zero-shot head (the official code's setting), same optimiser / epochs as CoOp;
- ``kgcoop_mergetune``: MergeTune with ŵ2 = the KgCoOp context (λ = 8 as the official KgCoOp+MT scripts, β, N, τ
  as ``mergetune``);
- ``vpt`` / ``vpt_mergetune``: shallow VPT (8 tokens) trained through ``ClipClassificationTrainer`` on the base
  shots' images (the image tower runs every step, so these rows need the images, not cached features), the text
  head the frozen single-template zero-shot one; then ``MergeTuneTrainer`` on the VPT adapter: ŵ1 = the prompts'
  initialisation (the same seeded init ŵ2 started from), path P2 + α(P − P2), anchor λ·Σ(P − P1)²/numel(P)
  (λ = 8 on the mean squared token move: no published value), β, N, τ as ``mergetune``; AdamW at ``vpt_lr``.

Linear-head family (``b2n_head``, rows ``HEAD_ROWS``): a head ``scale·x̂@Vᵀ`` over **all** class names (base and
novel), initialised with the single-template zero-shot text features (V_zs, so ``head`` at step 0 is
``zs_single``), fitted on the base shots with the softmax over all classes (so the novel rows move too: pushed
away from base images, which is where a text-initialised linear probe forgets); base accuracy is read from the
base rows, novel accuracy from the novel rows, each in its own label space. ``head_lp`` (ŵ2), ``head_mergetune``
(the one head anchor Σ(W − W_zs)² on W = scale·V with λ = 8/(2C·scale²), i.e. λ = 8 in the units of the prompt
family's cosine anchor; β = 0.5, N = 5, τ = 0.3 interpolation init), its Fisher / λ = 0 / β = 0 variants, TIES / DARE of
V_ft − V_zs, WiSE on the base validation shots and the output ensemble, with the prompt rows' optimiser, epochs and
batch size; the probe's learning rate is chosen per dataset and seed on the base validation shots from
``HEAD_LRS`` (a text-initialised head at the prompt rows' 0.01 over-fits 16 shots below zero-shot even on base
classes) and the MergeTune rows reuse it.

Every model is taken at its last epoch (like with like; the official MergeTune code picks its best validation
epoch but CoOp's last). Average row: the HM of the averaged base and novel accuracies (mergetune.md §11).
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from hf_cft.metrics import harmonic_mean as hm

ROWS = (
    "zs_single",
    "zs_ensemble",
    "coop",
    "mergetune",
    "mergetune_fisher",
    "mergetune_lam0",
    "mergetune_beta0",
    "ties",
    "dare",
    "wise",
    "output_ensemble",
)
HEAD_ROWS = (
    "zs_single",
    "head_lp",
    "head_mergetune",
    "head_mergetune_fisher",
    "head_lam0",
    "head_beta0",
    "head_ties",
    "head_dare",
    "head_wise",
    "head_output_ensemble",
)
#: Rows computed only on request (``--methods``), each with the rows it is compared with.
EXTRA_ROWS = ("kgcoop", "kgcoop_mergetune", "vpt", "vpt_mergetune")
#: KgCoOp's λ (the official code's 8) and the VPT rows' learning rate and prompt count.
KG_WEIGHT = 8.0
VPT_LR = 1e-2
VPT_TOKENS = 8
#: Learning rates tried for the linear probe (chosen on the base validation shots, per dataset and seed).
HEAD_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
#: Which rows play fine-tuned (ŵ2), MergeTune and the merging baselines in the targets of each family.
ROLES = {
    "prompt": {"ft": "coop", "mt": "mergetune", "ties": "ties", "dare": "dare", "wise": "wise"},
    "head": {"ft": "head_lp", "mt": "head_mergetune", "ties": "head_ties", "dare": "head_dare", "wise": "head_wise"},
}


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean() * 100)


def _subset(feats, labels, ids):
    remap = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long, device=labels.device)
    remap[torch.tensor(ids, device=labels.device)] = torch.arange(len(ids), device=labels.device)
    keep = remap[labels] >= 0
    return feats[keep], remap[labels[keep]]


def _draw_shots(pool_y: torch.Tensor, n_classes: int, seed: int):
    from hf_cft.data import few_shot_indices

    pool_y = pool_y.cpu()
    with warnings.catch_warnings():  # small classes have fewer than 20 images: take them all
        warnings.simplefilter("ignore")
        idx = torch.as_tensor(few_shot_indices(pool_y.numpy(), 20, seed=seed, on_short="take_all"))
    tr, va = [], []
    for c in range(n_classes):
        rows_c = idx[pool_y[idx] == c]
        perm = rows_c[torch.randperm(len(rows_c), generator=torch.Generator().manual_seed(seed))]
        tr.append(perm[:16])
        va.append(perm[16:])
    return torch.cat(tr), torch.cat(va)


class Context:
    """One CoOp adapter on the model whose context is swapped in and out to evaluate every row."""

    def __init__(self, model, tok):
        from peft import get_peft_model

        from hf_cft import CoOpConfig

        self.tok = tok
        self.peft = get_peft_model(model, CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok))
        self.param = self.peft.base_model._coop_layer().coop_ctx[self.peft.active_adapter]
        self.e0 = self.param.detach().clone()  # E(p0): the token embeddings of "a photo of a"

    def set(self, ctx: torch.Tensor):
        with torch.no_grad():
            self.param.copy_(ctx)

    def get(self) -> torch.Tensor:
        return self.param.detach().clone()

    @torch.no_grad()
    def head(self, names) -> torch.Tensor:
        """The normalised class text features of ``names`` through the current context."""
        return self.peft.class_text_features(self.tok, list(names)).float()

    def heads(self, base_names, novel_names):
        return self.head(base_names), self.head(novel_names)

    def close(self):
        return self.peft.unload()


def _optim(hp: dict) -> dict:
    return dict(epochs=hp["epochs"], lr=hp["lr"], batch_size=hp["batch_size"], optimizer=hp["optimizer"])


def fit_prompt(ctx_model: Context, tok, names, x, y, seed: int, hp: dict, kg_text=None) -> torch.Tensor:
    """CoOp (KgCoOp with ``kg_text``, the single-template zero-shot head of ``names``: λ_kg = ``KG_WEIGHT``) from
    "a photo of a" on the features ``x`` / labels ``y`` over ``names``; returns the learned context (left set)."""
    from hf_cft.trainers.feature_training import train_coop_on_features

    kg = {} if kg_text is None else {"kg_weight": KG_WEIGHT, "kg_text": kg_text}
    ctx_model.set(ctx_model.e0)
    train_coop_on_features(ctx_model.peft, tok, names, x, y, seed=seed, **_optim(hp), **kg)
    return ctx_model.get()


def fit_mergetune(
    ctx_model: Context, tok, names, x, y, seed: int, hp: dict, zs_head, ctx_ft, head_ft, **kw
) -> torch.Tensor:
    """MergeTune of the fine-tuned context ``ctx_ft`` (ŵ2, class features ``head_ft`` over ``names``) towards the
    zero-shot head ``zs_head`` (ŵ1): τ-initialised, λ = ``hp["lam"]``, β = ``hp["beta"]``, N = 5, the fine-tuned
    model's optimiser and epochs; ``kw`` overrides the loss options (anchor, fisher, anchor_weight, path_weight,
    num_alphas).
    Returns the merged context (left set)."""
    from hf_cft.trainers.feature_training import coop_context_init, train_mergetune_on_features

    ctx_model.set(ctx_ft)
    coop_context_init(ctx_model.peft, tok, ctx_ft, "a photo of a", tau=hp["tau"])
    kw = {"anchor_weight": hp["lam"], "path_weight": hp["beta"], "num_alphas": 5, **kw}
    train_mergetune_on_features(ctx_model.peft, tok, names, x, y, zs_head, head_ft, seed=seed, **_optim(hp), **kw)
    return ctx_model.get()


def run_dataset(model, tok, task, feats: dict, seeds, hp: dict, log=print, paths_dir=None, rows=ROWS) -> dict:
    """The ``rows`` (default ``ROWS``) for one dataset; ``feats`` holds test/downstream-pool features and labels
    (and, for the VPT rows, the images ``test_im`` / ``down_im`` in the same order). With ``paths_dir``, the
    loss/accuracy curves along zero-shot→CoOp, zero-shot→MergeTune and CoOp→MergeTune (base and novel test
    classes, first seed) are written there as ``paths-<dataset>.{json,png}``."""
    from hf_cft.data import base_novel_classes
    from hf_cft.merging import dare, ties
    from hf_cft.models import build_zeroshot_classifier
    from hf_cft.models.clip import logit_scale
    from hf_cft.trainers.mergetune_losses import classifier_fisher, normalize_fisher

    dev = next(model.parameters()).device
    feats = {k: v.to(dev) for k, v in feats.items()}
    base_ids, novel_ids = base_novel_classes(task.num_classes)
    base_names = [task.classnames[i] for i in base_ids]
    novel_names = [task.classnames[i] for i in novel_ids]
    bt_f, bt_y = _subset(feats["test_f"], feats["test_y"], base_ids)
    nt_f, nt_y = _subset(feats["test_f"], feats["test_y"], novel_ids)
    pool_f, pool_y = _subset(feats["down_f"], feats["down_y"], base_ids)
    scale = logit_scale(model).detach().float()
    single = ["a photo of a {}."]
    with torch.no_grad():
        zs_b = build_zeroshot_classifier(model, tok, base_names, single).float()
        zs_n = build_zeroshot_classifier(model, tok, novel_names, single).float()
        ens_b = build_zeroshot_classifier(model, tok, base_names, task.templates).float()
        ens_n = build_zeroshot_classifier(model, tok, novel_names, task.templates).float()

    def evaluate(hb, hn):
        return _acc(scale * bt_f @ hb.t(), bt_y), _acc(scale * nt_f @ hn.t(), nt_y)

    rows = tuple(rows)
    unknown = [r for r in rows if r not in ROWS + EXTRA_ROWS]
    if unknown:
        raise ValueError(f"unknown base-to-novel rows {unknown}; choose from {ROWS + EXTRA_ROWS}")
    out = {row: [] for row in rows}
    want = set(rows)
    vpt_results = {}  # on copies of the model without the CoOp adapter the other rows put on it
    for seed in seeds if want & {"vpt", "vpt_mergetune"} else ():
        tr, _ = _draw_shots(pool_y, len(base_ids), seed)
        vpt = _vpt_rows(model, tok, base_names, feats, base_ids, novel_ids, tr, seed, hp, want)
        vpt_results[seed] = {  # the VPT image features under the frozen zero-shot heads
            row: (_acc(scale * fb @ zs_b.t(), bt_y), _acc(scale * fn @ zs_n.t(), nt_y))
            for row, (fb, fn) in vpt.items()
        }
    ctx_model = Context(model, tok)
    try:
        for seed in seeds:
            t0 = time.perf_counter()
            tr, va = _draw_shots(pool_y, len(base_ids), seed)
            x, y = pool_f[tr.to(dev)], pool_y[tr.to(dev)]
            va = va.to(dev)
            if "zs_single" in want:
                out["zs_single"].append(evaluate(zs_b, zs_n))
            if "zs_ensemble" in want:
                out["zs_ensemble"].append(evaluate(ens_b, ens_n))
            # CoOp (ŵ2)
            ctx_ft = fit_prompt(ctx_model, tok, base_names, x, y, seed, hp)
            coop_b, coop_n = ctx_model.heads(base_names, novel_names)
            if "coop" in want:
                out["coop"].append(evaluate(coop_b, coop_n))
            if want & {"kgcoop", "kgcoop_mergetune"}:  # KgCoOp (ŵ2 of its MergeTune row), from "a photo of a"
                ctx_kg = fit_prompt(ctx_model, tok, base_names, x, y, seed, hp, kg_text=zs_b)
                kg_b, kg_n = ctx_model.heads(base_names, novel_names)
                if "kgcoop" in want:
                    out["kgcoop"].append(evaluate(kg_b, kg_n))
                if "kgcoop_mergetune" in want:
                    fit_mergetune(
                        ctx_model, tok, base_names, x, y, seed, hp, zs_b, ctx_kg, kg_b, anchor_weight=KG_WEIGHT
                    )
                    out["kgcoop_mergetune"].append(evaluate(*ctx_model.heads(base_names, novel_names)))
            for row in ("vpt", "vpt_mergetune"):
                if row in want:
                    out[row].append(vpt_results[seed][row])
            if not want & set(ROWS[3:]):
                log(f"  {task.name} seed {seed}: " + ", ".join(f"{r} {hm(*out[r][-1]):.1f}" for r in rows))
                continue
            # MergeTune and its variants: same data, optimiser and epochs
            fisher = None
            with torch.no_grad():
                fw, _ = classifier_fisher(
                    F.normalize(x, dim=-1),
                    scale * F.normalize(x, dim=-1) @ zs_b.t(),
                    float(scale),
                    "sample",
                    torch.Generator(device=dev).manual_seed(seed),
                )
                fisher = normalize_fisher([fw], 1e-3)[0]
            variants = {
                "mergetune": dict(),
                "mergetune_fisher": dict(anchor="fisher", fisher=fisher),
                "mergetune_lam0": dict(anchor_weight=0.0),
                "mergetune_beta0": dict(path_weight=0.0),
            }
            for row, kw in variants.items():
                if row not in want:
                    continue
                fit_mergetune(ctx_model, tok, base_names, x, y, seed, hp, zs_b, ctx_ft, coop_b, **kw)
                heads_row = ctx_model.heads(base_names, novel_names)
                out[row].append(evaluate(*heads_row))
                if row == "mergetune" and paths_dir is not None and seed == seeds[0]:
                    _write_paths(
                        paths_dir,
                        task.name,
                        scale,
                        (bt_f, bt_y, nt_f, nt_y),
                        (zs_b, zs_n),
                        (coop_b, coop_n),
                        heads_row,
                    )
            # merges of CoOp with zero-shot in context space
            tau_vec = {"ctx": ctx_ft - ctx_model.e0}
            for row, merged in (
                ("ties", ties([tau_vec], k=0.2, lam=1.0)),
                ("dare", dare([tau_vec], rho=0.9, seed=seed, then="ta", lam=1.0)),
            ):
                if row not in want:
                    continue
                ctx_model.set(ctx_model.e0 + merged["ctx"])
                out[row].append(evaluate(*ctx_model.heads(base_names, novel_names)))
            # WiSE: γ chosen on the base validation shots (ties -> the smaller γ)
            best = None
            for g10 in range(11 if "wise" in want else 0):
                gamma = g10 / 10
                ctx_model.set((1 - gamma) * ctx_model.e0 + gamma * ctx_ft)
                hb, hn = ctx_model.heads(base_names, novel_names)
                val = _acc(scale * pool_f[va] @ hb.t(), pool_y[va]) if len(va) else 0.0
                if best is None or val > best[0]:
                    best = (val, gamma, evaluate(hb, hn))
            if best is not None:
                out["wise"].append(best[2])
                out.setdefault("wise_gamma", []).append(best[1])
            if "output_ensemble" in want:  # output ensemble of zero-shot and CoOp
                pb = ((scale * bt_f @ zs_b.t()).softmax(-1) + (scale * bt_f @ coop_b.t()).softmax(-1)) / 2
                pn = ((scale * nt_f @ zs_n.t()).softmax(-1) + (scale * nt_f @ coop_n.t()).softmax(-1)) / 2
                out["output_ensemble"].append((_acc(pb, bt_y), _acc(pn, nt_y)))
            shown = [r for r in ("zs_single", "coop", "mergetune", "wise", *EXTRA_ROWS) if r in want]
            log(
                f"  {task.name} seed {seed}: "
                + ", ".join(f"{r} {hm(*out[r][-1]):.1f}" for r in shown)
                + f" (HM; {time.perf_counter() - t0:.0f}s)"
            )
    finally:
        ctx_model.close()
    return out


class _Images(torch.utils.data.Dataset):
    """Normalised images and labels as the rows a ``ClipClassificationTrainer`` reads."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor):
        from hf_cft.data.image_pool import normalize_batch

        self.x, self.y = normalize_batch(images_u8.cpu()), labels.cpu()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": int(self.y[i])}


def _keep(labels: torch.Tensor, ids) -> torch.Tensor:
    """The rows of ``labels`` whose class is in ``ids`` (in row order: the order of :func:`_subset`)."""
    return torch.isin(labels.cpu(), torch.as_tensor(list(ids)))


@torch.no_grad()
def _image_feats(model, images_u8: torch.Tensor, dev) -> torch.Tensor:
    from hf_cft.data.image_pool import normalize_batch
    from hf_cft.models import image_features

    model.eval()
    return torch.cat(
        [image_features(model, normalize_batch(images_u8[i : i + 256]).to(dev)) for i in range(0, len(images_u8), 256)]
    ).float()


def _vpt_rows(model, tok, base_names, feats, base_ids, novel_ids, tr, seed, hp, want) -> dict:
    """``vpt`` (ŵ2) and ``vpt_mergetune`` for one seed: ``{row: (base test features, novel test features)}``
    through the row's prompts. Each adapter lives on its own copy of the model (the shared one is not touched)."""
    import copy
    import tempfile

    from peft import get_peft_model

    from hf_cft import VPTConfig
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer

    if "down_im" not in feats or "test_im" not in feats:
        raise ValueError(
            "the VPT rows train the image tower: they need the images (run.py passes them with --methods)"
        )
    dev = next(model.parameters()).device
    down_y, test_y = feats["down_y"].cpu(), feats["test_y"].cpu()
    pool_im, pool_y = feats["down_im"].cpu()[_keep(down_y, base_ids)], down_y[_keep(down_y, base_ids)]
    bt_im, nt_im = (feats["test_im"].cpu()[_keep(test_y, ids)] for ids in (base_ids, novel_ids))
    shots = _Images(pool_im[tr.cpu()], pool_y[tr.cpu()])
    single = ["a photo of a {}."]

    def vpt_model():  # the same seeded prompt initialisation for ŵ2's start and ŵ1 of MergeTune
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(model), VPTConfig(n_tokens=VPT_TOKENS))

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            per_device_train_batch_size=hp["batch_size"], num_train_epochs=hp["epochs"], learning_rate=VPT_LR,
            optim="adamw_torch", lr_scheduler_type="cosine", save_strategy="no", report_to=[], seed=seed,
            disable_tqdm=True, logging_steps=10**6, use_cpu=dev.type == "cpu",
        )  # fmt: skip
        ft = vpt_model()
        ClipClassificationTrainer(
            ft, ClipTrainingArguments(output_dir=f"{tmp}/vpt-run", **common), base_names, single, tok,
            train_dataset=shots,
        ).train()  # fmt: skip
        out["vpt"] = (_image_feats(ft, bt_im, dev), _image_feats(ft, nt_im, dev))
        if "vpt_mergetune" in want:
            ft.save_pretrained(f"{tmp}/vpt")
            mt = vpt_model()
            numel = sum(p.numel() for p in mt.parameters() if p.requires_grad)
            args = MergeTuneConfig(
                output_dir=f"{tmp}/mt-run", anchor_weight=hp["lam"] / numel, path_weight=hp["beta"], num_alphas=5,
                tau=hp["tau"], **common,
            )  # fmt: skip
            MergeTuneTrainer(mt, args, base_names, single, tok, finetuned=f"{tmp}/vpt", train_dataset=shots).train()
            out["vpt_mergetune"] = (_image_feats(mt, bt_im, dev), _image_feats(mt, nt_im, dev))
    return {row: v for row, v in out.items() if row in want}


def run_head_dataset(model, tok, task, feats: dict, seeds, hp: dict, log=print) -> dict:
    """The linear-head rows (``HEAD_ROWS``, see the module docstring) for one dataset."""
    from hf_cft.data import base_novel_classes
    from hf_cft.merging import dare, ties
    from hf_cft.models import build_zeroshot_classifier
    from hf_cft.models.clip import logit_scale
    from hf_cft.trainers import train_head_on_features
    from hf_cft.trainers.mergetune_losses import classifier_fisher, normalize_fisher

    dev = next(model.parameters()).device
    feats = {k: v.to(dev) for k, v in feats.items()}
    base_ids, novel_ids = base_novel_classes(task.num_classes)
    nb = len(base_ids)
    bt_f, bt_y = _subset(feats["test_f"], feats["test_y"], base_ids)
    nt_f, nt_y = _subset(feats["test_f"], feats["test_y"], novel_ids)
    pool_f, pool_y = _subset(feats["down_f"], feats["down_y"], base_ids)  # base ids are 0..nb-1: labels unchanged
    scale = float(logit_scale(model).detach())
    with torch.no_grad():
        v_zs = build_zeroshot_classifier(model, tok, list(task.classnames), ["a photo of a {}."]).float().cpu()
    bt_f, nt_f, pool_f = (F.normalize(t.float().cpu(), dim=-1) for t in (bt_f, nt_f, pool_f))
    bt_y, nt_y, pool_y = bt_y.cpu(), nt_y.cpu(), pool_y.cpu()

    def evaluate(v):
        return _acc(bt_f @ v[:nb].t(), bt_y), _acc(nt_f @ v[nb:].t(), nt_y)

    def probs(v, f, rows):
        return (scale * f @ v[rows].t()).softmax(-1)

    out = {row: [] for row in HEAD_ROWS}
    common = _optim(hp)
    for seed in seeds:
        t0 = time.perf_counter()
        tr, va = _draw_shots(pool_y, nb, seed)
        x, y = pool_f[tr], pool_y[tr]
        out["zs_single"].append(evaluate(v_zs))
        # ŵ2: the linear probe, its learning rate chosen on the base validation shots (never the test split); the
        # MergeTune rows then use the same optimiser, learning rate and epochs
        fits = []
        for lr in hp.get("head_lrs", HEAD_LRS):
            v, _ = train_head_on_features(v_zs, x, y, scale, seed=seed, **{**common, "lr": lr})
            val = _acc(pool_f[va] @ v[:nb].t(), pool_y[va]) if len(va) else 0.0
            fits.append((val, -lr, v))
        val, neg_lr, v_ft = max(fits, key=lambda f: (f[0], f[1]))  # ties -> the smaller learning rate
        common = {**common, "lr": -neg_lr}
        out.setdefault("head_lr", []).append(-neg_lr)
        out["head_lp"].append(evaluate(v_ft))
        with torch.no_grad():
            fw, _ = classifier_fisher(x, scale * x @ v_zs.t(), scale, "sample", torch.Generator().manual_seed(seed))
            fisher = normalize_fisher([fw], 1e-3)[0]
        init = (1 - hp["tau"]) * v_zs + hp["tau"] * v_ft  # τ-initialisation (exact interpolation for a head)
        # the head anchor Σ(W − W_zs)² on W = s·V is 2·C·s² times the prompt family's cosine anchor for unit rows:
        # λ/(2·C·s²) gives the head the pull of the paper's λ (head_anchor's docstring)
        lam_head = hp["lam"] / (2.0 * task.num_classes * scale**2)
        mt = dict(weight_zs=v_zs, weight_ft=v_ft, anchor_weight=lam_head, path_weight=hp["beta"], num_alphas=5)
        for row, kw in (
            ("head_mergetune", {}),
            ("head_mergetune_fisher", {"anchor": "fisher", "fisher": fisher}),
            ("head_lam0", {"anchor_weight": 0.0}),
            ("head_beta0", {"path_weight": 0.0}),
        ):
            v, _ = train_head_on_features(init, x, y, scale, seed=seed, **{**mt, **kw}, **common)
            out[row].append(evaluate(v))
        tau_vec = {"head": v_ft - v_zs}
        for row, merged in (
            ("head_ties", ties([tau_vec], k=0.2, lam=1.0)),
            ("head_dare", dare([tau_vec], rho=0.9, seed=seed, then="ta", lam=1.0)),
        ):
            out[row].append(evaluate(v_zs + merged["head"]))
        best = None
        for g10 in range(11):
            v = (1 - g10 / 10) * v_zs + g10 / 10 * v_ft
            val = _acc(pool_f[va] @ v[:nb].t(), pool_y[va]) if len(va) else 0.0
            if best is None or val > best[0]:
                best = (val, g10 / 10, evaluate(v))
        out["head_wise"].append(best[2])
        out.setdefault("head_wise_gamma", []).append(best[1])
        base, novel = list(range(nb)), list(range(nb, task.num_classes))
        pb = (probs(v_zs, bt_f, base) + probs(v_ft, bt_f, base)) / 2
        pn = (probs(v_zs, nt_f, novel) + probs(v_ft, nt_f, novel)) / 2
        out["head_output_ensemble"].append((_acc(pb, bt_y), _acc(pn, nt_y)))
        log(
            f"  {task.name} seed {seed}: "
            + ", ".join(f"{r} {hm(*out[r][-1]):.1f}" for r in ("zs_single", "head_lp", "head_mergetune", "head_wise"))
            + f" (HM; {time.perf_counter() - t0:.0f}s)"
        )
    return out


def _write_paths(paths_dir, name, scale, data, zs, coop, mt):
    import json
    from pathlib import Path

    from hf_cft.plots import interpolation_curves, plot_paths

    bt_f, bt_y, nt_f, nt_y = data
    paths = [("zero-shot", "CoOp"), ("zero-shot", "MergeTune"), ("CoOp", "MergeTune")]
    curves = {
        split: interpolation_curves(
            f.cpu(), y.cpu(), {"zero-shot": z.cpu(), "CoOp": c.cpu(), "MergeTune": m.cpu()}, paths, float(scale)
        )
        for split, f, y, z, c, m in (
            ("base classes", bt_f, bt_y, zs[0], coop[0], mt[0]),
            ("novel classes", nt_f, nt_y, zs[1], coop[1], mt[1]),
        )
    }
    out = Path(paths_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"paths-{name}.json").write_text(json.dumps(curves, indent=1) + "\n")
    plot_paths(curves, out / f"paths-{name}.png", f"{name}: loss / accuracy along linear paths (test, first seed)")


def summarise(per_dataset: dict, rows_order: tuple[str, ...] = ROWS) -> dict:
    """Means over seeds per dataset, HM of the means, and the average row (HM of averaged B and N)."""
    table = {}
    for name, rows in per_dataset.items():
        table[name] = {}
        for row in rows_order:
            runs = rows[row]
            b = sum(r[0] for r in runs) / len(runs)
            n = sum(r[1] for r in runs) / len(runs)
            table[name][row] = {"base": b, "novel": n, "hm": hm(b, n), "runs": runs}
    avg = {}
    for row in rows_order:
        b = sum(t[row]["base"] for t in table.values()) / len(table)
        n = sum(t[row]["novel"] for t in table.values()) / len(table)
        avg[row] = {"base": b, "novel": n, "hm": hm(b, n)}
    return {"datasets": table, "average": avg}


def markdown(summary: dict, rows_order: tuple[str, ...] = ROWS) -> list[str]:
    avg, table = summary["average"], summary["datasets"]
    lines = ["| method | base | novel | HM |", "|---|---|---|---|"]
    lines += [f"| {r} | {avg[r]['base']:.2f} | {avg[r]['novel']:.2f} | {avg[r]['hm']:.2f} |" for r in rows_order]
    names = list(table)
    lines += ["", "HM per dataset (mean of seeds):", ""]
    lines += ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(f"{table[d][r]['hm']:.1f}" for d in names) + " |" for r in rows_order]
    lines += ["", "Base / novel per dataset:", ""]
    lines += ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [
        f"| {r} | " + " | ".join(f"{table[d][r]['base']:.1f} / {table[d][r]['novel']:.1f}" for d in names) + " |"
        for r in rows_order
    ]
    return lines


def targets(summary: dict, family: str = "prompt") -> dict:
    r = ROLES[family]
    avg, table = summary["average"], summary["datasets"]
    zs, coop, mt = avg["zs_single"], avg[r["ft"]], avg[r["mt"]]
    loss = zs["novel"] - coop["novel"]
    return {
        "mt_hm_gt_coop_every_dataset": all(t[r["mt"]]["hm"] > t[r["ft"]]["hm"] for t in table.values()),
        "datasets_mt_beats_coop": sum(t[r["mt"]]["hm"] > t[r["ft"]]["hm"] for t in table.values()),
        "avg_hm_gain": mt["hm"] - coop["hm"],
        "novel_loss_recovered_fraction": (mt["novel"] - coop["novel"]) / loss if loss > 0 else None,
        "base_drop_vs_coop": coop["base"] - mt["base"],
        "beats_ties_dare_wise": all(mt["hm"] > avg[r[k]]["hm"] for k in ("ties", "dare", "wise")),
    }


def target_line(summary: dict, family: str = "prompt") -> str:
    t = summary["targets"]
    ft = "CoOp" if family == "prompt" else "the linear head"
    return (
        f"MergeTune HM > {ft} HM on {t['datasets_mt_beats_coop']} of {len(summary['datasets'])} datasets; average HM "
        f"gain {t['avg_hm_gain']:+.2f}; novel loss recovered {t['novel_loss_recovered_fraction']}; base drop vs {ft} "
        f"{t['base_drop_vs_coop']:+.2f}; beats TIES, DARE and WiSE on average HM: {t['beats_ties_dare_wise']}."
    )


def combine(json_files: list[str], out_stem: str) -> dict:
    """Merge b2n result files of disjoint dataset subsets (e.g. run in parallel) into one summary/table."""
    import json
    from pathlib import Path

    per_dataset, records = {}, []
    for f in json_files:
        rec = json.loads(Path(f).read_text())
        records.append(rec)
        for name, rows in rec["datasets"].items():
            per_dataset[name] = {row: [tuple(r) for r in rows[row]["runs"]] for row in ROWS}
    summary = summarise(per_dataset)
    summary["targets"] = targets(summary)
    lines = markdown(summary) + ["", target_line(summary)]
    head = {k: records[0][k] for k in ("date", "machine", "versions", "checkpoint", "seeds", "hyper_parameters")}
    head["seconds"] = sum(r["seconds"] for r in records)
    Path(out_stem + ".json").write_text(json.dumps({**head, **summary, "table": lines}, indent=2) + "\n")
    Path(out_stem + ".md").write_text(
        f"# b2n (Protocol A)\n\nSmall pretrained CLIP ({head['checkpoint']['path']}), ../shared/data (small re-encoded "
        f"subsets, not the official datasets); {head['machine']['cpus']} CPU cores, no GPU; {head['date']}; seeds "
        f"{head['seeds']}; hyper-parameters {head['hyper_parameters']}.\n\n" + "\n".join(lines) + "\n"
    )
    return summary


if __name__ == "__main__":
    import sys

    usage = "usage: python benchmarks/b2n.py combine OUT_STEM RESULT.json [RESULT.json ...]"
    if sys.argv[1:2] in (["-h"], ["--help"]):  # the runs themselves start from benchmarks/run.py
        print(usage + "\n\n" + __doc__.split("\n\n")[0] + "\nRuns: python benchmarks/run.py --help.")
        raise SystemExit(0)
    if len(sys.argv) < 4 or sys.argv[1] != "combine":
        raise SystemExit(usage)
    combine(sys.argv[3:], sys.argv[2])
