"""MergeTune's fidelity options (issue 17): each against a naive re-implementation of the reference's logic written
here, with the largest difference printed (``pytest -s``): the LoRA + Fisher regression, the official optimiser and
schedule, raw path features, the single-template ŵ1, the one head anchor, the Fisher's rows and transform, the
official α grid, evaluation α, label smoothing on the path, best-model selection, KgCoOp, VPT and the weight
ensemble."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tests_helpers import colour_dataset, raw_colour_dataset, trainer_kwargs

from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.data import ImageTransform, apply_image_transform
from hf_cft.errors import AdapterError
from hf_cft.models import build_zeroshot_classifier, image_features
from hf_cft.testing import tiny_clip
from hf_cft.trainers import (
    ClipClassificationTrainer,
    ClipTrainingArguments,
    MergeTuneConfig,
    MergeTuneConfigError,
    MergeTuneTrainer,
)
from hf_cft.trainers.mergetune_losses import alpha_grid

CLASSES = ["cat", "dog", "sea lion"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _report(name: str, diff: float) -> None:
    print(f"[fidelity] {name}: max |difference| = {diff:.3g}")


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _args(tmp_path, **kw):
    return MergeTuneConfig(**trainer_kwargs(tmp_path, **{"max_steps": 2, **kw}))


@pytest.fixture(scope="module")
def data():
    return colour_dataset()


def _coop(tok, seed=None, **kw):
    model = get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a", **kw).set_tokenizer(tok))
    if seed is not None:  # a "fine-tuned" context: random moves from the init
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _ctx(model):
    return model.base_model._coop_layer().coop_ctx[model.active_adapter]


def _coop_trainer(tok, tmp_path, data, ft=None, **kw):
    ft = ft if ft is not None else _coop(tok, seed=3)
    extra = {k: kw.pop(k) for k in ("eval_dataset", "fisher_dataset") if k in kw}
    model = _coop(tok)
    trainer = MergeTuneTrainer(
        model, _args(tmp_path, **kw), CLASSES, TEMPLATES, tok, finetuned=ft, train_dataset=data, **extra
    )
    return trainer, model, ft


# ------------------------------------------------------------------------------------------------ bug 1


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lora_fisher_trains_three_steps(attn, toy_tokenizer, tmp_path, data):
    """Issue 17 bug 1: the Fisher estimate kept the live lora_A in its graph, so the first (SDPA) or second
    (eager) backward failed. It must train ≥ 3 steps and hold plain tensors."""
    ft = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ft.save_pretrained(tmp_path / "ft")
    base = tiny_clip()
    base.set_attn_implementation(attn)
    assert base.config._attn_implementation == attn
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    args = _args(tmp_path, max_steps=3, anchor="fisher", fisher_max_images=6, anchor_weight=1.0)
    trainer = MergeTuneTrainer(
        model, args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "ft", train_dataset=data
    )
    assert trainer.fisher and all(f.grad_fn is None and not f.requires_grad for f in trainer.fisher.values())
    out = trainer.train()
    assert trainer.state.global_step == 3 and math.isfinite(out.training_loss)
    anchors = [h["train_loss_anchor"] for h in trainer.state.log_history if "train_loss_anchor" in h]
    assert len(anchors) == 3 and anchors[-1] > 0


# ------------------------------------------------------------------------------------------------ item 3


def _dassl_epoch_lrs(base_lr, epochs, warmup_epochs, warmup_lr):
    """The reference's chain, simulated: ConstantWarmupScheduler(successor=CosineAnnealingLR(T_max=epochs)),
    stepped once at the end of every epoch; during warm-up the successor does not move."""
    warm_last, succ_last, lrs = 0, 0, []
    for _ in range(epochs):
        if warm_last < warmup_epochs:
            lrs.append(warmup_lr)
        else:
            lrs.append(base_lr * (1 + math.cos(math.pi * succ_last / epochs)) / 2)
        if warm_last >= warmup_epochs:
            succ_last += 1
        else:
            warm_last += 1
    return lrs


def test_official_preset_optimiser_and_lr_sequence(toy_tokenizer, tmp_path, data):
    from transformers import TrainerCallback

    seen = []

    class Lrs(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen.append(optimizer.param_groups[0]["lr"])

    kw = trainer_kwargs(tmp_path, max_steps=-1, num_train_epochs=5, per_device_train_batch_size=8)
    for key in ("optim", "lr_scheduler_type", "learning_rate"):
        kw.pop(key)  # left to the preset
    args = MergeTuneConfig.from_preset("official", **kw)
    assert args.preset == "official"
    plain = MergeTuneConfig(preset="official", **kw)  # fields at their defaults take the preset's values
    assert (
        plain.per_device_train_batch_size == 128 and plain.num_train_epochs == 5 and plain.optim_args == "momentum=0.9"
    )
    assert (args.anchor_weight, args.path_weight, args.tau, args.alpha_grid) == (10.0, 1.0, 1.0, "official")
    assert (args.path_features, args.anchor_templates, args.learning_rate) == ("raw", "first", 2e-3)
    assert args.num_train_epochs == 5 and args.per_device_train_batch_size == 8  # the user's values win
    trainer = MergeTuneTrainer(
        _coop(toy_tokenizer), args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=_coop(toy_tokenizer, seed=3),
        train_dataset=data, callbacks=[Lrs()],
    )  # fmt: skip
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    assert isinstance(opt, torch.optim.SGD)
    groups = [g for g in opt.param_groups if g["params"]]
    assert all(g["momentum"] == 0.9 for g in groups)
    assert [g["weight_decay"] for g in groups if any(p is _ctx(trainer.clip_model) for p in g["params"])] == [5e-4]
    want = [lr for lr in _dassl_epoch_lrs(2e-3, 5, 1, 1e-5) for _ in range(3)]  # 24 rows / 8 = 3 steps per epoch
    diff = max(abs(a - b) for a, b in zip(seen, want))
    _report("item 3 lr sequence vs Dassl's schedulers", diff)
    assert len(seen) == 15 and diff < 1e-12
    for bad in (lambda: MergeTuneConfig(output_dir=str(tmp_path), preset="paper"),
                lambda: MergeTuneConfig.from_preset("paper", output_dir=str(tmp_path))):  # fmt: skip
        with pytest.raises(MergeTuneConfigError, match="preset"):
            bad()
    with pytest.raises(ValueError, match="cosine"):
        ClipTrainingArguments(output_dir=str(tmp_path), constant_warmup_epochs=1, lr_scheduler_type="linear")


# ------------------------------------------------------------------------------------------------ item 4


def _naive_coop_loss(model, ft, tok, batch, t1, lam, beta, alphas, raw, smoothing=0.0):
    """CE + λ(1 − mean cos) + β·mean_k CE at normalise(T2 + α(T − T2)) with T raw or unit features, the image
    tower re-run per α (the reference's way)."""
    s = model.get_base_model().logit_scale.exp()
    tw = model.class_text_features(tok, CLASSES, normalize=not raw)
    with torch.no_grad():
        t2 = ft.class_text_features(tok, CLASSES, normalize=not raw)
    twn = F.normalize(tw, dim=-1)
    img = image_features(model, batch["pixel_values"])
    task = F.cross_entropy(s * img @ twn.t(), batch["labels"], label_smoothing=smoothing)
    anchor = 1 - F.cosine_similarity(twn, t1, dim=-1).mean()
    path = 0
    for a in alphas:
        ta = F.normalize(t2 + a * (tw - t2), dim=-1)
        img_a = image_features(model, batch["pixel_values"])
        path = path + F.cross_entropy(s * img_a @ ta.t(), batch["labels"], label_smoothing=smoothing) / len(alphas)
    return task + lam * anchor + beta * path


@pytest.mark.parametrize("path_features", ["normalized", "raw"])
def test_path_features_gradients_match_naive_reference(path_features, toy_tokenizer, tmp_path, data):
    trainer, model, ft = _coop_trainer(toy_tokenizer, tmp_path, data, tau=0.3, path_features=path_features)
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    (g_lib,) = torch.autograd.grad(loss, [_ctx(model)])
    with torch.no_grad(), model.disable_adapter():
        t1 = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES)
    ref = _naive_coop_loss(
        model, ft, toy_tokenizer, batch, t1, 8.0, 0.5, (0.1, 0.3, 0.5, 0.7, 0.9), path_features == "raw"
    )
    (g_ref,) = torch.autograd.grad(ref, [_ctx(model)])
    other = _naive_coop_loss(
        model, ft, toy_tokenizer, batch, t1, 8.0, 0.5, (0.1, 0.3, 0.5, 0.7, 0.9), path_features != "raw"
    )
    (g_other,) = torch.autograd.grad(other, [_ctx(model)])
    diff = _maxdiff(g_lib, g_ref)
    _report(f"item 4 path_features={path_features} gradient", diff)
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5 and diff < 1e-5 * max(1.0, float(g_ref.abs().max()))
    assert _maxdiff(g_lib, g_other) > 100 * max(diff, 1e-9)  # the two options differ


# ------------------------------------------------------------------------------------------------ item 5


def test_single_template_zero_shot_and_tau0_start(toy_tokenizer, tmp_path, data):
    """anchor_templates="first": ŵ1 is the first template's zero-shot head; with that template "a photo of a {}."
    = the CoOp ctx_init, τ = 0 starts exactly at ŵ1 (the ensemble does not)."""
    trainer, model, _ = _coop_trainer(toy_tokenizer, tmp_path, data, tau=0.0, anchor_templates="first")
    with torch.no_grad(), model.disable_adapter():
        single = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES[:1])
        ens = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES)
    with torch.no_grad():
        start = model.class_text_features(toy_tokenizer, CLASSES)
    d_zs, d_start = _maxdiff(trainer.text_zs, single), _maxdiff(start, trainer.text_zs)
    _report("item 5 single-template ŵ1 vs hand head", d_zs)
    _report("item 5 τ=0 start vs ŵ1 (single template)", d_start)
    assert d_zs < 1e-6 and d_start < 1e-5
    trainer_all, _, _ = _coop_trainer(toy_tokenizer, tmp_path, data, tau=0.0)
    assert _maxdiff(trainer_all.text_zs, ens) < 1e-6 and _maxdiff(start, trainer_all.text_zs) > 1e-3


# ------------------------------------------------------------------------------------------------ item 6


def test_head_anchor_one_definition_in_both_paths(toy_tokenizer, tmp_path, data):
    """MergeTuneTrainer's head loss and train_head_on_features give the same task, anchor and path terms on the
    same head, image features and labels (one head_anchor definition: Σ(W − W_zs)² on W = s·V)."""
    from hf_cft.trainers import train_head_on_features

    def cfg():
        return LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES, use_bias=False).set_tokenizer(toy_tokenizer)

    ft = get_peft_model(tiny_clip(), cfg())
    with torch.no_grad():
        ft.base_model.model.visual_projection.head_weight["default"].mul_(1.3).add_(0.05)
    ft.save_pretrained(tmp_path / "ft_head")
    model = get_peft_model(tiny_clip(), cfg())
    trainer = MergeTuneTrainer(
        model, _args(tmp_path, tau=0.4, anchor_weight=0.01, path_weight=0.7), CLASSES, TEMPLATES, toy_tokenizer,
        finetuned=tmp_path / "ft_head", train_dataset=data,
    )  # fmt: skip
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    trainer._metric_sums["train"] = {}
    trainer.compute_loss(trainer.model, batch)
    parts = {k: v[-1] for k, v in trainer._metric_sums["train"].items()}
    s = trainer.scale
    w, b = model.base_model.head_parameters()
    assert b is None
    with torch.no_grad():
        feats = image_features(model, batch["pixel_values"])
    _, hist = train_head_on_features(
        w.detach() / s, feats, batch["labels"], s, weight_zs=trainer.w_zs / s, weight_ft=trainer.w_ft / s,
        anchor_weight=0.01, path_weight=0.7, epochs=1, lr=0.0, batch_size=8, optimizer="sgd",
    )  # fmt: skip
    diffs = {k: abs(parts[f"loss_{k}"] - hist[0][k]) / max(1.0, abs(hist[0][k])) for k in ("task", "anchor", "path")}
    _report("item 6 head terms, trainer vs feature path (relative)", max(diffs.values()))
    assert max(diffs.values()) < 1e-5 and hist[0]["anchor"] > 0
    want = float(((w.detach() - trainer.w_zs) ** 2).sum())  # the spec's Σ(W − Ŵ1)² on the scaled head
    assert parts["loss_anchor"] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------------ item 7


def _augmented_dataset(n=24):
    raw = raw_colour_dataset(n, seed=0, size=40)
    train = apply_image_transform(raw, ImageTransform(size=30, crop_size=30, train=True, scale=(0.3, 0.6), seed=4))
    return raw, train


def _naive_coop_fisher(model, t1, pixel_values):
    """F = s²·E_x[p(1 − p)·f²] ("expected" labels), then F/mean(F) + 1e-3 (§3.2's sanity check)."""
    with torch.no_grad():
        f = image_features(model, pixel_values)
        s = model.get_base_model().logit_scale.exp()
        p = (s * f @ t1.t()).softmax(-1)
        fw = s**2 * (p * (1 - p)).t() @ f**2 / f.shape[0]
    return fw / fw.mean() + 1e-3


def test_fisher_eval_transform_and_seeded_random_rows(toy_tokenizer, tmp_path):
    raw, train = _augmented_dataset()
    ev = apply_image_transform(raw, ImageTransform(size=30, crop_size=30))
    common = dict(anchor="fisher", fisher_labels="expected", fisher_max_images=6, seed=5)
    trainer, model, _ = _coop_trainer(toy_tokenizer, tmp_path, train, **common)
    rows = sorted(torch.randperm(24, generator=torch.Generator().manual_seed(5))[:6].tolist())
    assert rows != list(range(6))
    collate = trainer.data_collator
    with torch.no_grad(), model.disable_adapter():
        t1 = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES)
    want = _naive_coop_fisher(model, t1, collate([ev[i] for i in rows])["pixel_values"])
    diff = _maxdiff(trainer.fisher[0], want)
    _report("item 7 Fisher (eval transform, seeded rows) vs naive", diff)
    assert diff < 1e-4 * float(want.max())
    old, model_old, _ = _coop_trainer(
        toy_tokenizer, tmp_path, train, fisher_transform="train", fisher_sample="first", **common
    )
    want_old = _naive_coop_fisher(model_old, t1, collate([train[i] for i in range(6)])["pixel_values"])
    diff_old = _maxdiff(old.fisher[0], want_old)
    _report("item 7 Fisher (former: train transform, first rows) vs naive", diff_old)
    assert diff_old < 1e-4 * float(want_old.max()) and _maxdiff(old.fisher[0], trainer.fisher[0]) > 1e-3


# ------------------------------------------------------------------------------------------------ item 8


@pytest.mark.parametrize("n", [5, 10, 11, 21, 22])
def test_official_alpha_grid_is_the_reference_arange(n):
    grid = alpha_grid(n, "official").numpy()
    ref = np.arange(0.1, 1.01, 1 / n)
    loop, a, k = [], 0.1, 0
    while a < 1.01:  # the same points written out: 0.1 + k/N while below the stop 1.01
        loop.append(a)
        k += 1
        a = 0.1 + k / n
    _report(f"item 8 official grid N={n} vs np.arange", float(np.abs(grid - ref).max()))
    assert grid.shape == ref.shape and np.array_equal(grid, ref)
    assert np.abs(grid - np.array(loop)).max() < 1e-12
    if n in (11, 21, 22):
        assert grid[-1] > 1.0


def test_random_alpha_training_does_not_depend_on_evaluation(toy_tokenizer, tmp_path, data):
    ctxs = []
    for strategy in ("no", "steps"):
        kw = dict(alpha_grid="random", max_steps=4, eval_strategy=strategy, eval_dataset=data)
        if strategy == "steps":
            kw["eval_steps"] = 1
        trainer, model, _ = _coop_trainer(toy_tokenizer, tmp_path / strategy, data, **kw)
        trainer.train()
        ctxs.append(_ctx(model).detach().clone())
        if strategy == "steps":
            evals = [h["eval_loss_path"] for h in trainer.state.log_history if "eval_loss_path" in h]
            assert len(evals) == 4
    _report("item 8 ctx with eval every step vs never", _maxdiff(*ctxs))
    assert torch.equal(ctxs[0], ctxs[1])


def test_label_smoothing_reaches_the_path_terms(toy_tokenizer, tmp_path, data):
    trainer, model, ft = _coop_trainer(toy_tokenizer, tmp_path, data, tau=0.3, label_smoothing=0.2)
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad(), model.disable_adapter():
        t1 = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES)
    alphas = (0.1, 0.3, 0.5, 0.7, 0.9)
    ref = _naive_coop_loss(model, ft, toy_tokenizer, batch, t1, 8.0, 0.5, alphas, False, smoothing=0.2)
    unsmoothed_path = _naive_coop_loss(model, ft, toy_tokenizer, batch, t1, 8.0, 0.0, alphas, False, smoothing=0.2)
    diff = abs(float(loss) - float(ref))
    _report("item 8 label-smoothed loss (prompts) vs naive", diff)
    assert diff < 1e-5 and abs(float(ref) - float(unsmoothed_path)) > 1e-3


def test_label_smoothing_reaches_the_lora_path(toy_tokenizer, tmp_path, data):
    targets = ["q_proj", "v_proj"]
    ft = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    paths = {}
    for ls in (0.0, 0.3):
        trainer = MergeTuneTrainer(
            model, _args(tmp_path, tau=1.0, label_smoothing=ls, num_alphas=1), CLASSES, TEMPLATES, toy_tokenizer,
            finetuned=ft, train_dataset=data,
        )  # fmt: skip
        batch = trainer.data_collator([data[i] for i in range(8)])
        trainer.model.train()
        trainer._metric_sums["train"] = {}
        trainer.compute_loss(trainer.model, batch)
        paths[ls] = trainer._metric_sums["train"]["loss_path"][-1]
    # τ = 1 and N = 1 (α = ½): the path point is ŵ2 itself, so the path term is ŵ2's (smoothed) CE
    with torch.no_grad():
        ti = trainer._text_inputs(train=True)
        from hf_cft.trainers.mergetune_weightspace import class_text

        logits = (
            ft.get_base_model().logit_scale.exp()
            * image_features(ft, batch["pixel_values"])
            @ class_text(ft, ti["input_ids"], ti["attention_mask"], ti["num_templates"]).t()
        )
    for ls, value in paths.items():
        want = float(F.cross_entropy(logits, batch["labels"], label_smoothing=ls))
        _report(f"item 8 LoRA path term, label_smoothing={ls}", abs(value - want))
        assert value == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("metric, greater", [("loss_anchor", False), ("accuracy", True)])
def test_best_validation_checkpoint_is_loaded(metric, greater, toy_tokenizer, tmp_path, data):
    """load_best_model_at_end: the continued adapter ends as the best checkpoint's. With τ = 0 the anchor is 0 at
    the start (single-template ŵ1 = the start context) and, with λ = 0, only grows, so "lowest eval anchor" selects
    the first checkpoint, not the last."""
    trainer, model, _ = _coop_trainer(
        toy_tokenizer, tmp_path, data, tau=0.0, anchor_templates="first", max_steps=4, eval_strategy="steps", eval_steps=1,
        save_strategy="steps", save_steps=1, load_best_model_at_end=True, metric_for_best_model=metric,
        greater_is_better=greater, eval_dataset=data, anchor_weight=0.0,
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    key = next(k for k in load_file(f"{best}/adapter_model.safetensors") if "coop_ctx" in k)
    saved = load_file(f"{best}/adapter_model.safetensors")[key]
    last = load_file(f"{tmp_path}/out/checkpoint-4/adapter_model.safetensors")[key]
    diff = _maxdiff(_ctx(model), saved)
    _report(f"item 8 best checkpoint ({metric}) vs loaded ctx", diff)
    assert diff == 0.0
    if metric == "loss_anchor":
        assert best.endswith("checkpoint-1") and _maxdiff(saved, last) > 1e-4


# ------------------------------------------------------------------------------------------------ item 13: KgCoOp


def _kg_args(tmp_path, **kw):
    return ClipTrainingArguments(**trainer_kwargs(tmp_path, **{"max_steps": 3, "kg_weight": 8.0, **kw}))


def test_kgcoop_loss_and_gradient_match_the_paper_form(toy_tokenizer, tmp_path, data):
    """KgCoOp: CE + λ·(1 − mean_c cos(T_c(w), T_c^clip)) with T^clip the first template's zero-shot head; that is
    λ/2 · mean_c‖T̂_c − T̂_c^clip‖² (the paper's squared distance, for unit features)."""
    model = _coop(toy_tokenizer, seed=2)
    trainer = ClipClassificationTrainer(
        model, _kg_args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=data
    )
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    (g_lib,) = torch.autograd.grad(loss, [_ctx(model)])
    with torch.no_grad(), model.disable_adapter():
        clip_head = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES[:1])
    tw = model.class_text_features(toy_tokenizer, CLASSES)
    s = model.get_base_model().logit_scale.exp()
    ce = F.cross_entropy(s * image_features(model, batch["pixel_values"]) @ tw.t(), batch["labels"])
    ref = ce + 8.0 / 2 * ((tw - clip_head) ** 2).sum(-1).mean()
    (g_ref,) = torch.autograd.grad(ref, [_ctx(model)])
    diff = _maxdiff(g_lib, g_ref)
    _report("item 13 KgCoOp loss / gradient vs paper form", max(abs(float(loss) - float(ref)), diff))
    assert abs(float(loss) - float(ref)) < 1e-5 and diff < 1e-5 * max(1.0, float(g_ref.abs().max()))
    before = float(1 - F.cosine_similarity(tw.detach(), clip_head, dim=-1).mean())
    trainer.train()
    with torch.no_grad():
        after = float(1 - F.cosine_similarity(model.class_text_features(toy_tokenizer, CLASSES), clip_head).mean())
    assert after < before  # the knowledge-guided term pulls toward the hand-crafted features


def test_kgcoop_errors(toy_tokenizer, tmp_path, data):
    head = get_peft_model(
        tiny_clip(), LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(toy_tokenizer)
    )
    with pytest.raises(AdapterError, match="kg_weight"):
        ClipClassificationTrainer(head, _kg_args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=data)
    with pytest.raises(ValueError, match="kg_weight"):
        _kg_args(tmp_path, kg_weight=-1.0)
    with pytest.raises(MergeTuneConfigError, match="anchor_weight"):
        _args(tmp_path, kg_weight=8.0)


def test_mergetune_on_a_kgcoop_adapter(toy_tokenizer, tmp_path, data):
    kg = _coop(toy_tokenizer)
    ClipClassificationTrainer(
        kg, _kg_args(tmp_path, learning_rate=0.5), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=data
    ).train()
    kg.save_pretrained(tmp_path / "kgcoop")
    trainer, model, _ = _coop_trainer(toy_tokenizer, tmp_path, data, ft=tmp_path / "kgcoop", tau=1.0, max_steps=2)
    with torch.no_grad():
        kg_feats = kg.class_text_features(toy_tokenizer, CLASSES)
    assert _maxdiff(trainer.text_ft, kg_feats) < 1e-6
    trainer.train()
    assert trainer.state.global_step == 2


# ------------------------------------------------------------------------------------------------ item 13: VPT


def _vpt(seed, n_tokens=2, deep=False, moved=False):
    """A VPT adapter; its init is the same for every call (tiny_clip seeds the generator), ``moved`` adds a seeded
    random move (a "fine-tuned" adapter)."""
    model = get_peft_model(tiny_clip(), VPTConfig(n_tokens=n_tokens, deep=deep))
    if moved:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _prompts(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_mergetune_loss_terms_match_hand_prompts(deep, toy_tokenizer, tmp_path, data):
    ft = _vpt(1, deep=deep, moved=True)
    ft.save_pretrained(tmp_path / "vpt_ft")
    model = _vpt(1, deep=deep)  # the same init as the fine-tuned adapter started from: ŵ1
    p1 = {n: p.detach().clone() for n, p in _prompts(model).items()}
    p2 = {n: p.detach().clone() for n, p in _prompts(ft).items()}
    trainer = MergeTuneTrainer(
        model, _args(tmp_path, tau=0.3, num_alphas=2, anchor_weight=0.5), CLASSES, TEMPLATES, toy_tokenizer,
        finetuned=tmp_path / "vpt_ft", train_dataset=data,
    )  # fmt: skip
    assert trainer.family == "vpt"
    for n, p in _prompts(model).items():
        torch.testing.assert_close(p.detach(), 0.7 * p1[n] + 0.3 * p2[n])
    with torch.no_grad():  # move w off the segment
        for p in _prompts(model).values():
            p.add_(0.1)
    w = {n: p.detach().clone() for n, p in _prompts(model).items()}
    batch = trainer.data_collator([data[i] for i in range(6)])
    trainer.model.train()
    trainer._metric_sums["train"] = {}
    loss = trainer.compute_loss(trainer.model, batch)
    parts = {k: v[-1] for k, v in trainer._metric_sums["train"].items()}

    def ce_at(prompts):  # the naive way: write the tokens into the adapter and run the model
        with torch.no_grad():
            for n, p in _prompts(model).items():
                p.copy_(prompts[n])
            ti = trainer._text_inputs(train=True)
            return float(F.cross_entropy(trainer.model(batch["pixel_values"], **ti).float(), batch["labels"]))

    task = ce_at(w)
    path = sum(ce_at({n: p2[n] + a * (w[n] - p2[n]) for n in w}) for a in (0.25, 0.75)) / 2
    anchor = sum(float(((w[n] - p1[n]) ** 2).sum()) for n in w)
    diff = max(abs(parts["loss_task"] - task), abs(parts["loss_path"] - path), abs(parts["loss_anchor"] - anchor))
    _report(f"item 13 VPT ({'deep' if deep else 'shallow'}) loss terms vs hand prompts", diff)
    assert diff < 1e-5 * max(1.0, anchor)
    assert float(loss) == pytest.approx(task + 0.5 * anchor + 0.5 * path, rel=1e-5)


def test_vpt_mergetune_trains_with_fisher_and_refuses_mismatches(toy_tokenizer, tmp_path, data):
    ft = _vpt(1, moved=True)
    trainer = MergeTuneTrainer(
        _vpt(1), _args(tmp_path, max_steps=2, anchor="fisher", fisher_max_images=4), CLASSES, TEMPLATES,
        toy_tokenizer, finetuned=ft, train_dataset=data,
    )  # fmt: skip
    assert all(f.grad_fn is None for f in trainer.fisher.values())
    held = trainer.held_anchor_tensors()  # VPT is a weight-space family: ŵ1/ŵ2 of the trainable tokens only
    assert held and set(held) == set(trainer.weight_space.held_tensors())
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(AdapterError, match="n_tokens"):
        MergeTuneTrainer(
            _vpt(1), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, finetuned=_vpt(1, n_tokens=3),
            train_dataset=data,
        )  # fmt: skip
    with pytest.raises(AdapterError, match="same method type"):
        MergeTuneTrainer(
            _vpt(1), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, finetuned=_coop(toy_tokenizer, seed=3),
            train_dataset=data,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ item 13: ensemble


def test_weight_ensemble_every_family(toy_tokenizer, tmp_path, data):
    """(1 − γ)·ŵ1 + γ·w in each family's coordinates, against the formula on hand-held tensors."""
    gamma, diffs = 0.4, {}
    # CoOp: contexts, ŵ1 = E("a photo of a")
    trainer, model, _ = _coop_trainer(toy_tokenizer, tmp_path, data, tau=1.0)
    e0 = _coop(toy_tokenizer)
    e0 = _ctx(e0).detach().clone()
    w = _ctx(model).detach().clone()
    trainer.apply_weight_ensemble(gamma)
    diffs["coop"] = _maxdiff(_ctx(model), (1 - gamma) * e0 + gamma * w)
    # linear head
    cfg = lambda: LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(toy_tokenizer)  # noqa: E731
    ft = get_peft_model(tiny_clip(), cfg())
    with torch.no_grad():
        ft.base_model.model.visual_projection.head_weight["default"].add_(0.5)
        ft.base_model.model.visual_projection.head_bias["default"].add_(0.2)
    head = get_peft_model(tiny_clip(), cfg())
    tr = MergeTuneTrainer(
        head, _args(tmp_path, tau=1.0), CLASSES, TEMPLATES, toy_tokenizer, finetuned=ft, train_dataset=data
    )
    wh, bh = (t.detach().clone() for t in head.base_model.head_parameters())
    tr.apply_weight_ensemble(gamma)
    w2, b2 = head.base_model.head_parameters()
    diffs["head"] = max(_maxdiff(w2, (1 - gamma) * tr.w_zs + gamma * wh), _maxdiff(b2, gamma * bh))
    # LoRA: ΔW ← γ·ΔW (ŵ1 = 0)
    targets = ["q_proj", "v_proj"]
    lft = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        for p in lft.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    lora = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    tr = MergeTuneTrainer(
        lora, _args(tmp_path, tau=1.0), CLASSES, TEMPLATES, toy_tokenizer, finetuned=lft, train_dataset=data
    )
    before = {p: d.detach().clone() for p, d in tr.weight_space.deltas().items()}
    tr.apply_weight_ensemble(gamma)
    diffs["lora"] = max(_maxdiff(d, gamma * before[p]) for p, d in tr.weight_space.deltas().items())
    # full fine-tuning
    full, full_ft = tiny_clip(), tiny_clip()
    with torch.no_grad():
        for n, p in full_ft.named_parameters():
            if n != "logit_scale":  # frozen: not part of w
                p.add_(0.05)
    w1 = {n: p.detach().clone() for n, p in full.named_parameters()}
    tr = MergeTuneTrainer(
        full, _args(tmp_path, tau=1.0), CLASSES, TEMPLATES, toy_tokenizer, finetuned=full_ft, train_dataset=data
    )
    wf = {n: p.detach().clone() for n, p in full.named_parameters()}
    tr.apply_weight_ensemble(gamma)
    diffs["full"] = max(
        _maxdiff(p, (1 - gamma) * w1[n] + gamma * wf[n]) for n, p in full.named_parameters() if p.requires_grad
    )
    # VPT
    vpt = _vpt(1)
    p1 = {n: p.detach().clone() for n, p in _prompts(vpt).items()}
    tr = MergeTuneTrainer(
        vpt,
        _args(tmp_path, tau=1.0),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        finetuned=_vpt(1, moved=True),
        train_dataset=data,
    )
    wv = {n: p.detach().clone() for n, p in _prompts(vpt).items()}
    tr.apply_weight_ensemble(gamma)
    diffs["vpt"] = max(_maxdiff(p, (1 - gamma) * p1[n] + gamma * wv[n]) for n, p in _prompts(vpt).items())
    for family, d in diffs.items():
        _report(f"item 13 weight ensemble ({family})", d)
    assert max(diffs.values()) < 1e-6


def test_weight_ensemble_option_applies_after_training(toy_tokenizer, tmp_path, data):
    trainer, model, _ = _coop_trainer(toy_tokenizer, tmp_path, data, tau=1.0, max_steps=2, weight_ensemble=0.0)
    trainer.train()
    with torch.no_grad():
        with model.disable_adapter():
            single = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES[:1])
        start = model.class_text_features(toy_tokenizer, CLASSES)
    assert _maxdiff(start, single) < 1e-5  # γ = 0: back at ŵ1's context, whose features are the template's
    with pytest.raises(MergeTuneConfigError, match="weight_ensemble"):
        _args(tmp_path, weight_ensemble=1.5)


def test_head_family_fisher_is_the_closed_form_of_the_zero_shot_head_with_its_bias(toy_tokenizer, tmp_path):
    """The linear-head family's Fisher (``anchor="fisher"``, expected labels): for the zero-shot head
    z = f·W_zsᵀ + b_zs on every image (eval transform), F_W = E[p(1 − p)·f²], F_b = E[p(1 − p)], normalised
    together to mean 1, plus the damping; ``fisher_info`` counts the images and names the labels."""
    raw, train = _augmented_dataset()
    ev = apply_image_transform(raw, ImageTransform(size=30, crop_size=30))
    cfg = lambda: LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(toy_tokenizer)  # noqa: E731
    ft = get_peft_model(tiny_clip(), cfg())
    with torch.no_grad():
        ft.base_model.model.visual_projection.head_weight["default"].add_(0.3)
    ft.save_pretrained(tmp_path / "head_ft")
    model = get_peft_model(tiny_clip(), cfg())
    args = _args(tmp_path, anchor="fisher", fisher_labels="expected", fisher_max_images=100, fisher_damping=0.01)
    trainer = MergeTuneTrainer(
        model, args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "head_ft", train_dataset=train
    )
    px = trainer.data_collator([ev[i] for i in range(len(ev))])["pixel_values"]
    with torch.no_grad():
        f = image_features(model, px)
        p = (f @ trainer.w_zs.t() + trainer.b_zs).softmax(-1)
        g2 = p * (1 - p)
        fw, fb = g2.t() @ f**2 / len(ev), g2.mean(0)
    mean = (fw.sum() + fb.sum()) / (fw.numel() + fb.numel())
    assert len(trainer.fisher) == 2 and not trainer.b_zs.any()  # the zero-shot head has no bias
    torch.testing.assert_close(trainer.fisher[0], fw / mean + 0.01, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(trainer.fisher[1], fb / mean + 0.01, rtol=1e-4, atol=1e-6)
    assert trainer.fisher_info["images"] == len(ev) and trainer.fisher_info["labels"] == "expected"
    assert 0 <= trainer.fisher_info["seconds"] < 600
