"""Training on frozen, precomputed image features: a linear probe and prompt learning (CoOp) whose image tower
is frozen. Image features are computed once for the whole dataset instead of once per step, which is what
makes these methods cheap (MergeTune's efficiency rule: never re-encode frozen images).

Multi-process runs: these loops are deliberately *not* sharded. They are plain torch loops (no Accelerator, no
collective) over a feature matrix that every process holds whole, with their own seeded ``torch.Generator`` for
the shuffling, so under ``accelerate launch`` every process computes exactly the same steps and ends with the same
probe / context — the 1-process result — with no communication. Sharding them would save nothing worth a
gradient all-reduce per step: a step costs one text-tower pass over the class prompts and a ``[b, d] @ [d, C]``
matmul. Only the feature extraction before them is worth spreading over processes (``evaluate_zeroshot`` with an
``accelerator`` gathers features on every process); write their results from the main process only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    val_fraction: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Multinomial logistic regression on (normalised) features with full-batch L-BFGS.

    The L2 strength is chosen on a ``val_fraction`` hold-out of the given data (per-class split, ``seed``), then
    the probe is refit on everything. Returns ``(W [C, d], b [C], info)``.
    """
    from hf_cft.data.sampling import split_per_class_indices

    x = F.normalize(features.float(), dim=-1)
    y = labels.long()
    val_idx, tr_idx = split_per_class_indices(y.numpy(), val_fraction, seed)
    scores = {}
    if len(val_idx) and len(weight_decays) > 1:
        for wd in weight_decays:
            w, b = _lbfgs(x[tr_idx], y[tr_idx], num_classes, wd, max_iter)
            scores[wd] = float(((x[val_idx] @ w.t() + b).argmax(-1) == y[val_idx]).float().mean() * 100)
        best = max(scores, key=lambda k: (scores[k], k))
    else:
        best = weight_decays[0]
    w, b = _lbfgs(x, y, num_classes, best, max_iter)
    return w, b, {"weight_decay": best, "val_accuracy": scores}


def _lbfgs(x, y, num_classes, wd, max_iter):
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    scale = 10.0  # features are unit-norm: let the logits reach confident values

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(scale * (x @ w.t()) + b, y) + wd * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (scale * w).detach(), b.detach()


OPTIMIZERS = ("sgd", "adamw")


def _minibatch_epochs(
    params: list[torch.Tensor],
    n: int,
    step_losses,
    epochs: int,
    lr: float,
    batch_size: int,
    optimizer: str,
    seed: int,
) -> list[dict[str, float]]:
    """The loop every cached-feature trainer here shares: SGD (momentum 0.9) or AdamW (no weight decay) with a cosine
    schedule over all steps, a seeded permutation per epoch, and per step ``step_losses(idx)`` → a dict of loss
    terms whose ``"loss"`` is minimised. Returns each term's per-epoch mean (weighted by batch size)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * max(1, -(-n // batch_size)))
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        sums: dict[str, float] = {}
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            terms = step_losses(idx)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            sched.step()
            for k, val in terms.items():
                sums[k] = sums.get(k, 0.0) + float(val.detach()) * len(idx)
        history.append({k: val / n for k, val in sums.items()})
    return history


def train_coop_on_features(
    peft_model,
    tokenizer,
    classnames: Sequence[str],
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 50,
    lr: float = 2e-3,
    batch_size: int = 32,
    optimizer: str = "sgd",
    seed: int = 0,
    kg_weight: float = 0.0,
    kg_text: torch.Tensor | None = None,
) -> list[float]:
    """Train a CoOp adapter against precomputed normalised image features (frozen image tower, no
    augmentation): per step one text-tower pass for all classes and one matmul. SGD (momentum 0.9) with a
    cosine schedule, as CoOp. With ``kg_weight = λ > 0`` it is KgCoOp: the loss adds
    ``λ·(1 − mean_c cos(T_c, kg_text_c))`` (``kg_text``: the hand-crafted zero-shot class features; the same term
    as ``ClipTrainingArguments.kg_weight``). Returns the mean loss of each epoch."""
    from hf_cft.models.clip import logit_scale
    from hf_cft.trainers.mergetune_losses import cosine_anchor

    if kg_weight and kg_text is None:
        raise ValueError("kg_weight > 0 (KgCoOp) needs kg_text, the hand-crafted zero-shot class features")
    feats = F.normalize(features.float(), dim=-1)
    scale = logit_scale(peft_model).detach()
    enc = peft_model.build_prompts(tokenizer, list(classnames))

    def step(idx):
        text = peft_model.class_text_features(tokenizer, classnames, prompts=enc)
        loss = F.cross_entropy(scale * feats[idx] @ text.t(), labels[idx])
        if kg_weight:
            loss = loss + kg_weight * cosine_anchor(text.float(), kg_text.float())
        return {"loss": loss}

    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    history = _minibatch_epochs(params, len(labels), step, epochs, lr, batch_size, optimizer, seed)
    peft_model.eval()
    return [h["loss"] for h in history]


@torch.no_grad()
def coop_context_init(peft_model, tokenizer, ctx_finetuned: torch.Tensor, ctx_init: str, tau: float) -> None:
    """MergeTune's τ-initialisation of a CoOp context (``mergetune.md`` §7): ctx0 = (1 − τ)·E(p0) + τ·ctx2, E(p0)
    the token embeddings of the hand-crafted prompt that initialised the fine-tuned context ("a photo of a")."""
    from hf_cft.peft.coop.model import _word_ids

    layer = peft_model.base_model._coop_layer()
    ctx = layer.coop_ctx[peft_model.active_adapter]
    ids = _word_ids(tokenizer, ctx_init)
    if len(ids) != ctx.shape[-2]:
        raise ValueError(f"ctx_init {ctx_init!r} has {len(ids)} tokens but the context has {ctx.shape[-2]}")
    emb = layer.token_embedding
    e0 = emb.weight[torch.tensor(ids, device=emb.weight.device)].float()
    ctx.copy_((1 - tau) * e0.to(ctx) + tau * ctx_finetuned.to(ctx))


def train_mergetune_on_features(
    peft_model,
    tokenizer,
    classnames: Sequence[str],
    features: torch.Tensor,
    labels: torch.Tensor,
    text_zs: torch.Tensor,
    text_ft: torch.Tensor,
    anchor_weight: float = 8.0,
    path_weight: float = 0.5,
    num_alphas: int = 5,
    anchor: str = "cosine",
    fisher: torch.Tensor | None = None,
    epochs: int = 50,
    lr: float = 2e-3,
    batch_size: int = 32,
    optimizer: str = "sgd",
    seed: int = 0,
) -> list[dict]:
    """MergeTune for a CoOp adapter on precomputed image features (the benchmark's fast path): the loss of
    :class:`~hf_cft.trainers.MergeTuneTrainer` for the prompt family, term for term (``mergetune.md`` §4) —
    CE(w) + λ·D(T(w), T1) + β·(1/N)Σ_k CE(normalise(T2 + α_k(T(w) − T2))) — with one text-tower pass per step
    shared by all terms and α points. ``text_zs`` (T1) and ``text_ft`` (T2) are the normalised zero-shot and
    fine-tuned class features; ``fisher`` ([C, d], normalised) is needed for ``anchor="fisher"``. The context
    should already be τ-initialised (:func:`coop_context_init`). Returns per-epoch means of each term."""
    from hf_cft.models.clip import logit_scale
    from hf_cft.trainers.mergetune_losses import alpha_grid, cosine_anchor, fisher_anchor, path_loss_prompts

    if anchor not in ("cosine", "fisher"):
        raise ValueError(f"anchor must be 'cosine' or 'fisher', got {anchor!r}")
    if anchor == "fisher" and fisher is None:
        raise ValueError("anchor='fisher' needs the fisher tensor")
    feats = F.normalize(features.float(), dim=-1)
    scale = logit_scale(peft_model).detach()
    enc = peft_model.build_prompts(tokenizer, list(classnames))
    alphas = alpha_grid(num_alphas)

    def step(idx):
        text = peft_model.class_text_features(tokenizer, classnames, prompts=enc).float()
        task = F.cross_entropy(scale * feats[idx] @ text.t(), labels[idx])
        if anchor == "cosine":
            d = cosine_anchor(text, text_zs)
        else:  # scaled so that F ≡ 1 equals the cosine form, as the trainer
            d = fisher_anchor([text], [text_zs], [fisher], normalizer=2.0 * text.shape[0])
        path = path_loss_prompts(feats[idx], text, text_ft, labels[idx], scale, alphas)
        return {"loss": task + anchor_weight * d + path_weight * path, "task": task, "anchor": d, "path": path}

    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    history = _minibatch_epochs(params, len(labels), step, epochs, lr, batch_size, optimizer, seed)
    peft_model.eval()
    return history


def train_head_on_features(
    weight: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    scale: float | torch.Tensor,
    weight_zs: torch.Tensor | None = None,
    weight_ft: torch.Tensor | None = None,
    anchor_weight: float = 0.0,
    path_weight: float = 0.0,
    num_alphas: int = 5,
    anchor: str = "sq_l2",
    fisher: torch.Tensor | None = None,
    epochs: int = 50,
    lr: float = 1e-2,
    batch_size: int = 128,
    optimizer: str = "adamw",
    seed: int = 0,
) -> tuple[torch.Tensor, list[dict]]:
    """A linear head ``logits = scale · x̂ @ Vᵀ`` over precomputed (normalised) image features, trained from
    ``weight`` (``V [C, d]``, e.g. the unit zero-shot text features, so that ``W = scale·V`` is the zero-shot
    classifier); with ``anchor_weight``/``path_weight`` it is MergeTune's head-family loss (``mergetune.md`` §4) —
    :class:`~hf_cft.trainers.MergeTuneTrainer`'s, term for term, on the head ``W = scale·V``:

        CE(W) + λ·D(W, W_zs) + β·(1/N)Σ_k CE(W_ft + α_k(W − W_ft)),   D = Σ(W − W_zs)²  or  Σ F⊙(W − W_zs)²

    with D the one head anchor (:func:`~hf_cft.trainers.mergetune_losses.head_anchor`). For unit rows it is
    2·C·scale² times the prompt family's cosine anchor, so λ = λ_prompt/(2·C·scale²) gives a head the pull of
    the paper's λ_prompt. Returns ``(V, per-epoch means of each term)``; ``weight`` is not modified."""
    from hf_cft.trainers.mergetune_losses import alpha_grid, head_anchor, path_loss_head

    if anchor not in ("sq_l2", "fisher"):
        raise ValueError(f"anchor must be 'sq_l2' or 'fisher', got {anchor!r}")
    if anchor_weight and weight_zs is None:
        raise ValueError("anchor_weight > 0 needs weight_zs")
    if path_weight and weight_ft is None:
        raise ValueError("path_weight > 0 needs weight_ft")
    if anchor == "fisher" and anchor_weight and fisher is None:
        raise ValueError("anchor='fisher' needs the fisher tensor")
    v = weight.detach().float().clone().requires_grad_(True)
    feats = F.normalize(features.float(), dim=-1)
    s = float(scale)
    alphas = alpha_grid(num_alphas)
    zs = [s * weight_zs.float()] if anchor_weight else None  # the fixed anchors, converted once rather than per step
    fishers = [fisher] if anchor == "fisher" else None
    w_ft = s * weight_ft.float() if path_weight else None

    def step(idx):
        task = F.cross_entropy(s * feats[idx] @ v.t(), labels[idx])
        d = torch.zeros(())
        if anchor_weight:
            d = head_anchor([s * v], zs, anchor, fishers)
        path = torch.zeros(())
        if path_weight:
            path = path_loss_head(feats[idx], s * v, None, w_ft, None, labels[idx], alphas)
        return {"loss": task + anchor_weight * d + path_weight * path, "task": task, "anchor": d, "path": path}

    history = _minibatch_epochs([v], len(labels), step, epochs, lr, batch_size, optimizer, seed)
    return v.detach(), history
