"""MergeTune: each loss term against a hand computation, initialisation, Fisher, config errors, training."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tests_helpers import colour_dataset, trainer_kwargs

from hf_cft import CoOpConfig, LinearHeadConfig
from hf_cft.errors import AdapterError
from hf_cft.models import build_zeroshot_classifier, image_features
from hf_cft.testing import tiny_clip
from hf_cft.trainers import MergeTuneConfig, MergeTuneConfigError, MergeTuneTrainer
from hf_cft.trainers.mergetune_losses import alpha_grid, classifier_fisher, normalize_fisher

CLASSES = ["cat", "dog", "sea lion"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _args(tmp_path, **kw):
    return MergeTuneConfig(**trainer_kwargs(tmp_path, **{"max_steps": 2, **kw}))


@pytest.fixture
def data():
    return colour_dataset()


def _finetuned_coop(tok, tmp_path, seed=3):
    ft = get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a", classnames=CLASSES).set_tokenizer(tok))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ft.save_pretrained(tmp_path / "ft")
    return ft


def _continued_coop(tok):
    return get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a", classnames=CLASSES).set_tokenizer(tok))


def test_alpha_grids():
    torch.testing.assert_close(alpha_grid(5), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64))
    torch.testing.assert_close(alpha_grid(5, "official"), alpha_grid(5))
    assert alpha_grid(10, "official")[-1] == 1.0 and len(alpha_grid(10, "official")) == 10
    assert alpha_grid(1, "official").tolist() == [0.1] and alpha_grid(1).tolist() == [0.5]
    r = alpha_grid(4, "random", torch.Generator().manual_seed(0))
    assert r.shape == (4,) and ((r >= 0) & (r < 1)).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"anchor_weight": -1}, "anchor_weight"),
        ({"path_weight": -0.1}, "path_weight"),
        ({"num_alphas": 0}, "num_alphas"),
        ({"tau": 1.5}, "tau"),
        ({"alpha_grid": "x"}, "alpha_grid"),
        ({"anchor": "l1"}, "anchor"),
    ],
)
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(MergeTuneConfigError, match=match):
        _args(tmp_path, **kw)


def test_coop_loss_terms_match_a_naive_reference(toy_tokenizer, tmp_path, data):
    """The trainer's loss (features once per batch) equals the naive formula that re-encodes images per α."""
    ft = _finetuned_coop(toy_tokenizer, tmp_path)
    model = _continued_coop(toy_tokenizer)
    trainer = MergeTuneTrainer(
        model,
        _args(tmp_path, tau=0.3),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        finetuned=tmp_path / "ft",
        train_dataset=data,
    )
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    # naive reference
    with torch.no_grad():
        t2 = ft.class_text_features(toy_tokenizer, CLASSES)
        with model.disable_adapter():
            t1 = build_zeroshot_classifier(model, toy_tokenizer, CLASSES, TEMPLATES)
    tw = model.class_text_features(toy_tokenizer, CLASSES)
    s = model.get_base_model().logit_scale.exp()
    task = F.cross_entropy(s * image_features(model, batch["pixel_values"]) @ tw.t(), batch["labels"])
    anchor = 1 - F.cosine_similarity(tw, t1, dim=-1).mean()
    path = 0
    for a in (0.1, 0.3, 0.5, 0.7, 0.9):
        ta = F.normalize(t2 + a * (tw - t2), dim=-1)
        path = path + F.cross_entropy(s * image_features(model, batch["pixel_values"]) @ ta.t(), batch["labels"]) / 5
    expected = task + 8.0 * anchor + 0.5 * path
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_tau_initialisation_interpolates_contexts(toy_tokenizer, tmp_path, data):
    ft = _finetuned_coop(toy_tokenizer, tmp_path)
    ctx_ft = ft.base_model.model.text_model.embeddings.coop_ctx["default"].detach()
    init = _continued_coop(toy_tokenizer).base_model.model.text_model.embeddings.coop_ctx["default"].detach().clone()
    for tau in (0.0, 0.3, 1.0):
        model = _continued_coop(toy_tokenizer)
        MergeTuneTrainer(
            model, _args(tmp_path, tau=tau), CLASSES, TEMPLATES, toy_tokenizer, finetuned=ft, train_dataset=data
        )
        ctx = model.base_model.model.text_model.embeddings.coop_ctx["default"].detach()
        torch.testing.assert_close(ctx, (1 - tau) * init + tau * ctx_ft)


def test_head_loss_terms_and_init(toy_tokenizer, tmp_path, data):
    cfg = lambda: LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(toy_tokenizer)  # noqa: E731
    ft = get_peft_model(tiny_clip(), cfg())
    with torch.no_grad():
        ft.base_model.model.visual_projection.head_weight["default"].add_(0.5)
        ft.base_model.model.visual_projection.head_bias["default"].add_(0.2)
    ft.save_pretrained(tmp_path / "head_ft")
    model = get_peft_model(tiny_clip(), cfg())
    w1 = model.base_model.model.visual_projection.head_weight["default"].detach().clone()
    trainer = MergeTuneTrainer(
        model,
        _args(tmp_path, tau=0.5),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        finetuned=tmp_path / "head_ft",
        train_dataset=data,
    )
    w, b = model.base_model.head_parameters()
    torch.testing.assert_close(w.detach(), w1 + 0.25)  # (1-τ)·W1 + τ·(W1 + 0.5)
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.1))
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    f = image_features(model, batch["pixel_values"]).detach()
    y = batch["labels"]
    task = F.cross_entropy(f @ w.t() + b, y)
    anchor = ((w - w1) ** 2).sum() + (b**2).sum()
    w2, b2 = w1 + 0.5, torch.full((3,), 0.2)
    path = (
        sum(F.cross_entropy(f @ (w2 + a * (w - w2)).t() + (b2 + a * (b - b2)), y) for a in (0.1, 0.3, 0.5, 0.7, 0.9))
        / 5
    )
    torch.testing.assert_close(loss, task + 8.0 * anchor + 0.5 * path, atol=1e-5, rtol=1e-5)


def test_fisher_closed_form_matches_autograd():
    """Expected-label Fisher of z = s·f·Wᵀ equals E_x Σ_ŷ p_ŷ (∂ log p_ŷ/∂W)² from autograd, per example."""
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    w = torch.randn(3, 4, generator=g)
    s = 2.0
    fw, _ = classifier_fisher(f, s * f @ w.t(), s, "expected")
    ref = torch.zeros_like(w)
    for i in range(6):
        p = (s * f[i] @ w.t()).softmax(-1)
        for yhat in range(3):
            wv = w.clone().requires_grad_(True)
            torch.log_softmax(s * f[i] @ wv.t(), -1)[yhat].backward()
            ref += p[yhat] * wv.grad**2
    torch.testing.assert_close(fw, ref / 6, atol=1e-5, rtol=1e-4)
    # sanity formula of the spec: s²·E[p_c(1−p_c)·f_k²]
    p = (s * f @ w.t()).softmax(-1)
    torch.testing.assert_close(fw, s**2 * (p * (1 - p)).t() @ (f**2) / 6, atol=1e-6, rtol=1e-5)
    normed = normalize_fisher([fw], 1e-3)[0]
    assert abs(float((normed - 1e-3).mean()) - 1.0) < 1e-5


def test_fisher_anchor_training_runs_and_reports_cost(toy_tokenizer, tmp_path, data):
    _finetuned_coop(toy_tokenizer, tmp_path)
    model = _continued_coop(toy_tokenizer)
    trainer = MergeTuneTrainer(
        model,
        _args(tmp_path, anchor="fisher"),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        finetuned=tmp_path / "ft",
        train_dataset=data,
    )
    assert trainer.fisher_info["images"] == len(data) and trainer.fisher_info["seconds"] >= 0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"train_loss_task", "train_loss_anchor", "train_loss_path"} <= set(h) for h in logs)


def test_bad_inputs(toy_tokenizer, tmp_path, data):
    def build(model, finetuned):
        return MergeTuneTrainer(
            model, _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, finetuned=finetuned, train_dataset=data
        )

    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter"):
        build(_continued_coop(toy_tokenizer), tmp_path / "empty")
    get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=3, init="zeros")).save_pretrained(tmp_path / "head")
    with pytest.raises(AdapterError, match="same method type"):
        build(_continued_coop(toy_tokenizer), tmp_path / "head")
    get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=4, init="zeros")).save_pretrained(tmp_path / "head4")
    with pytest.raises(AdapterError, match="4 classes"):
        build(get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=3, init="zeros")), tmp_path / "head4")
    other = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    with pytest.raises(AdapterError, match="shape"):
        build(_continued_coop(toy_tokenizer), other)


def test_mergetune_recovers_zero_shot_agreement(toy_tokenizer, tmp_path, data):
    """With a strong anchor the continued features move toward zero-shot: cos(T(w), T1) rises over training."""
    _finetuned_coop(toy_tokenizer, tmp_path)
    model = _continued_coop(toy_tokenizer)
    trainer = MergeTuneTrainer(
        model,
        _args(tmp_path, tau=1.0, anchor_weight=20.0, max_steps=15, learning_rate=0.5),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        finetuned=tmp_path / "ft",
        train_dataset=data,
    )
    t1 = trainer.text_zs
    before = F.cosine_similarity(model.class_text_features(toy_tokenizer, CLASSES).detach(), t1).mean()
    trainer.train()
    after = F.cosine_similarity(model.class_text_features(toy_tokenizer, CLASSES).detach(), t1).mean()
    assert after > before


# planted bug (issue 20): the Fisher ignored in the CoOp anchor (F ≡ 1 used instead of the estimate)
def test_fisher_weights_the_coop_anchor_entry_by_entry(toy_tokenizer, tmp_path, data):
    from hf_cft.models import logit_scale

    _finetuned_coop(toy_tokenizer, tmp_path)
    model = _continued_coop(toy_tokenizer)
    args = _args(tmp_path, anchor="fisher", anchor_weight=1.0, path_weight=0.0, label_smoothing=0.0)
    trainer = MergeTuneTrainer(
        model, args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "ft", train_dataset=data
    )
    with torch.no_grad():  # move the context away from ŵ1 so the anchor is not ~0
        next(p for p in model.parameters() if p.requires_grad).add_(0.5)
    C, d = trainer.text_zs.shape
    fisher = torch.rand(C, d, generator=torch.Generator().manual_seed(0)) * 10.0
    trainer.fisher = [fisher]
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
        text = model.class_text_features(toy_tokenizer, CLASSES)
        img = image_features(model, batch["pixel_values"])
        task = F.cross_entropy(logit_scale(model) * img @ text.t(), batch["labels"])
        anchor = (fisher * (text - trainer.text_zs) ** 2).sum() / (2 * C)
        uniform = ((text - trainer.text_zs) ** 2).sum() / (2 * C)
    torch.testing.assert_close(got, task + anchor, rtol=1e-5, atol=1e-6)
    assert abs(float(anchor - uniform)) > 1e-3 * float(uniform)  # the case tells F from F ≡ 1


def test_card_hyperparameters_and_held_anchors_of_a_prompt_and_a_head_trainer(toy_tokenizer, tmp_path, data):
    """The card lists MergeTune's settings first, under their documented names and values, and its kind is
    MergeTune's; a prompt or head trainer holds exactly its anchor tensors (ŵ1, ŵ2 and their raw forms)."""
    _finetuned_coop(toy_tokenizer, tmp_path)
    args = _args(tmp_path, anchor_weight=3.0, path_weight=0.25, num_alphas=4, tau=0.6)
    trainer = MergeTuneTrainer(
        _continued_coop(toy_tokenizer), args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "ft",
        train_dataset=data,
    )  # fmt: skip
    hp = trainer.card_hyperparameters()
    assert list(hp.items())[:11] == [
        ("family", "coop"),
        ("λ (anchor_weight)", 3.0),
        ("β (path_weight)", 0.25),
        ("N (num_alphas)", 4),
        ("α grid", args.alpha_grid),
        ("τ (initialisation)", 0.6),
        ("anchor", trainer.anchor_kind),
        ("preset", args.preset),
        ("path features", args.path_features),
        ("ŵ1 templates", args.anchor_templates),
        ("weight ensemble γ", args.weight_ensemble),
    ]
    assert trainer._card_kind() == "mergetune"
    held = trainer.held_anchor_tensors()
    assert set(held) == {n for n in ("text_zs", "text_ft", "text_ft_raw", "ctx_ft") if hasattr(trainer, n)}
    assert {"text_zs", "text_ft", "ctx_ft"} <= set(held)
    assert all(held[n] is getattr(trainer, n) for n in held)
    raw = MergeTuneTrainer(
        _continued_coop(toy_tokenizer), _args(tmp_path, path_features="raw"), CLASSES, TEMPLATES, toy_tokenizer,
        finetuned=tmp_path / "ft", train_dataset=data,
    )  # fmt: skip
    assert set(raw.held_anchor_tensors()) == {"text_zs", "text_ft", "text_ft_raw", "ctx_ft"}
    cfg = lambda: LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(toy_tokenizer)  # noqa: E731
    get_peft_model(tiny_clip(), cfg()).save_pretrained(tmp_path / "head_ft")
    head = MergeTuneTrainer(
        get_peft_model(tiny_clip(), cfg()), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer,
        finetuned=tmp_path / "head_ft", train_dataset=data,
    )  # fmt: skip
    assert head.card_hyperparameters()["family"] == "head"
    assert {"w_zs", "b_zs", "w_ft", "b_ft", "text_zs"} <= set(head.held_anchor_tensors())


def test_sampled_fisher_labels_come_from_the_trainers_seeded_generator(toy_tokenizer, tmp_path, data, monkeypatch):
    """With fisher_labels="sample" the Fisher draws its labels from a generator seeded by args.seed (prompt and head
    families): the global RNG's state when the labels are drawn does not change it, another seed does."""
    import hf_cft.models.zeroshot as zeroshot

    _finetuned_coop(toy_tokenizer, tmp_path)
    cfg = lambda: LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(toy_tokenizer)  # noqa: E731
    get_peft_model(tiny_clip(), cfg()).save_pretrained(tmp_path / "head_ft")
    encode = zeroshot.encode_images

    def fisher(family, seed, global_seed):
        def encode_then_reseed(*args, **kwargs):  # the global RNG right before the labels are drawn
            out = encode(*args, **kwargs)
            torch.manual_seed(global_seed)
            return out

        monkeypatch.setattr(zeroshot, "encode_images", encode_then_reseed)
        model, ft = (_continued_coop(toy_tokenizer), tmp_path / "ft")
        if family == "head":
            model, ft = get_peft_model(tiny_clip(), cfg()), tmp_path / "head_ft"
        args = _args(tmp_path, anchor="fisher", fisher_labels="sample", seed=seed)
        trainer = MergeTuneTrainer(model, args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=ft, train_dataset=data)
        assert trainer.fisher_info["labels"] == "sample"
        return trainer.fisher

    for family in ("coop", "head"):
        a, b, other = fisher(family, 0, 1), fisher(family, 0, 2), fisher(family, 5, 1)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), family
        assert not all(torch.equal(x, y) for x, y in zip(a, other)), family


def test_mergetune_card_names_the_finetuned_solution_and_ignores_a_method_override(toy_tokenizer, tmp_path, data):
    """The trainer's card is MergeTune's card of the continued model: it names ŵ2 (the fine-tuned folder) and the
    base model; a ``method=`` card argument (meant for adapter cards) is dropped, not passed on."""
    _finetuned_coop(toy_tokenizer, tmp_path)
    trainer = MergeTuneTrainer(
        _continued_coop(toy_tokenizer), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "ft",
        train_dataset=data,
    )  # fmt: skip
    card = trainer._model_card(method={"name": "other", "description": "x", "tags": []})
    text = str(card)
    assert trainer.finetuned_description and trainer.finetuned_description in text
    assert "MergeTune" in text and "other" not in text.split("---")[1]  # the front matter keeps MergeTune's method
    explicit = str(trainer._model_card(finetuned="someone/coop-ft"))
    assert "someone/coop-ft" in explicit and trainer.finetuned_description not in explicit


def test_the_cards_description_of_the_fine_tuned_solution(tmp_path, monkeypatch, toy_tokenizer):
    """_describe_finetuned: a local adapter or model folder by its name only (also through ``~`` and ``..``), a Hub
    id linked, another string as a loaded adapter's name (paths that do not exist are not Hub ids), a PeftModel by
    its adapter type, anything else by its type."""
    from hf_cft.trainers.mergetune_trainer import _describe_finetuned

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ft_adapter").mkdir()
    (tmp_path / "ft_adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "ft_model").mkdir()
    assert _describe_finetuned(tmp_path / "ft_adapter") == "a local adapter folder (`ft_adapter`)"
    assert _describe_finetuned(str(tmp_path / "ft_model")) == "a local model folder (`ft_model`)"
    assert _describe_finetuned("~/ft_adapter") == "a local adapter folder (`ft_adapter`)"
    assert _describe_finetuned(str(tmp_path / "ft_model" / "..")) == f"a local model folder (`{tmp_path.name}`)"
    assert _describe_finetuned("someone/coop-ft") == "[someone/coop-ft](https://huggingface.co/someone/coop-ft)"
    for text in ("ft", "./missing", "/missing", "~/missing", "./missing/x", "a/b/c"):  # one "/" but a path's start
        assert _describe_finetuned(text) == f"adapter `{text}` (loaded in the same model)", text
    coop = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    assert _describe_finetuned(coop) == "a HF_CFT_COOP adapter given in memory"
    assert _describe_finetuned(tiny_clip()) == "a CLIPModel given in memory"


def _parts(trainer, batch):
    trainer.model.train()
    trainer._metric_sums["train"] = {}
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[-1] for k, v in trainer._metric_sums["train"].items()}


def test_coop_sq_l2_anchor_and_raw_path_with_label_smoothing_match_a_hand_computation(toy_tokenizer, tmp_path, data):
    """CoOp with anchor="sq_l2" (Σ‖T(w) − T1‖²), the official raw path (interpolate the unnormalised text outputs,
    then normalise) and label smoothing in both CE terms; accuracy logged in percent."""
    ft = _finetuned_coop(toy_tokenizer, tmp_path)
    model = _continued_coop(toy_tokenizer)
    args = _args(tmp_path, anchor="sq_l2", path_features="raw", label_smoothing=0.2, num_alphas=2)
    trainer = MergeTuneTrainer(
        model, args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "ft", train_dataset=data
    )
    batch = trainer.data_collator([data[i] for i in range(8)])
    loss, parts = _parts(trainer, batch)
    y = batch["labels"]
    with torch.no_grad():
        t2_raw = ft.class_text_features(toy_tokenizer, CLASSES, normalize=False)
        raw = model.class_text_features(toy_tokenizer, CLASSES, normalize=False)
        tw = F.normalize(raw, dim=-1)
        f = image_features(model, batch["pixel_values"])
        s = model.get_base_model().logit_scale.exp()
        logits = s * f @ tw.t()
        task = F.cross_entropy(logits, y, label_smoothing=0.2)
        anchor = ((tw - trainer.text_zs) ** 2).sum()
        path = (
            sum(
                F.cross_entropy(s * f @ F.normalize(t2_raw + a * (raw - t2_raw), dim=-1).t(), y, label_smoothing=0.2)
                for a in (0.25, 0.75)
            )
            / 2
        )
        accuracy = 100.0 * float((logits.argmax(-1) == y).float().mean())
    assert parts["loss_task"] == pytest.approx(float(task), rel=1e-5)
    assert parts["loss_anchor"] == pytest.approx(float(anchor), rel=1e-5)
    assert parts["loss_path"] == pytest.approx(float(path), rel=1e-5)
    assert parts["accuracy"] == pytest.approx(accuracy) and accuracy not in (0.0, 50.0, 100.0)
    torch.testing.assert_close(loss, task + 8.0 * anchor + 0.5 * path, atol=1e-5, rtol=1e-5)


def test_head_with_a_class_dependent_bias_fisher_anchor_and_label_smoothing_matches_a_hand_computation(
    toy_tokenizer, tmp_path, data
):
    """The head's logits, path (W_α, b_α) and Fisher anchor Σ F ⊙ (w − ŵ1)² with a bias that differs per class
    (a constant bias cancels in the softmax and would hide a dropped one), label smoothing in both CE terms."""
    cfg = lambda: LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(toy_tokenizer)  # noqa: E731
    ft = get_peft_model(tiny_clip(), cfg())
    with torch.no_grad():
        ft.base_model.model.visual_projection.head_weight["default"].add_(0.5)
        ft.base_model.model.visual_projection.head_bias["default"].copy_(torch.tensor([0.3, -0.2, 0.1]))
    ft.save_pretrained(tmp_path / "head_ft")
    model = get_peft_model(tiny_clip(), cfg())
    args = _args(tmp_path, anchor="fisher", label_smoothing=0.1, num_alphas=2, anchor_weight=2.0, path_weight=0.7)
    trainer = MergeTuneTrainer(
        model, args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "head_ft", train_dataset=data
    )
    w, b = model.base_model.head_parameters()
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        b.copy_(torch.tensor([-0.4, 0.5, 0.2]))
    g = torch.Generator().manual_seed(2)
    trainer.fisher = [torch.rand(w.shape, generator=g) * 4, torch.rand(b.shape, generator=g) * 4]
    batch = trainer.data_collator([data[i] for i in range(8)])
    loss, parts = _parts(trainer, batch)
    y = batch["labels"]
    with torch.no_grad():
        f = image_features(model, batch["pixel_values"])
        task = F.cross_entropy(f @ w.t() + b, y, label_smoothing=0.1)
        w2, b2 = trainer.w_ft, trainer.b_ft
        path = (
            sum(
                F.cross_entropy(f @ (w2 + a * (w - w2)).t() + (b2 + a * (b - b2)), y, label_smoothing=0.1)
                for a in (0.25, 0.75)
            )
            / 2
        )
        anchor = (trainer.fisher[0] * (w - trainer.w_zs) ** 2).sum() + (
            trainer.fisher[1] * (b - trainer.b_zs) ** 2
        ).sum()
    torch.testing.assert_close(trainer.b_ft, torch.tensor([0.3, -0.2, 0.1]))
    assert parts["loss_task"] == pytest.approx(float(task), rel=1e-5)
    assert parts["loss_path"] == pytest.approx(float(path), rel=1e-5)
    assert parts["loss_anchor"] == pytest.approx(float(anchor), rel=1e-5)
    torch.testing.assert_close(loss, task + 2.0 * anchor + 0.7 * path, atol=1e-5, rtol=1e-5)


def test_a_class_specific_coop_solution_must_have_the_tasks_classes(toy_tokenizer, tmp_path, data):
    """A class-specific CoOp ŵ2 trained on other classes (same number) is refused naming it; on the task's classes
    it is accepted."""
    import re

    def coop(classnames):
        cfg = CoOpConfig(n_ctx=2, class_specific=True, classnames=classnames).set_tokenizer(toy_tokenizer)
        return get_peft_model(tiny_clip(), cfg)

    coop(["owl", "fox", "eel"]).save_pretrained(tmp_path / "other")
    coop(CLASSES).save_pretrained(tmp_path / "same")
    with pytest.raises(
        AdapterError,
        match=rf"^the fine-tuned class-specific CoOp adapter \({re.escape(str(tmp_path / 'other'))}\) was trained on "
        r"other classes.$",
    ):
        MergeTuneTrainer(
            coop(CLASSES), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "other"
        )
    trainer = MergeTuneTrainer(
        coop(CLASSES), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "same"
    )
    assert trainer.family == "coop" and trainer.ft_class_specific


def test_the_trainer_refuses_other_arguments_and_forwards_train_and_evaluate_arguments(toy_tokenizer, tmp_path, data):
    """A TrainingArguments that is not a MergeTuneConfig is refused; train() hands its positional and keyword
    arguments (resume_from_checkpoint) to Trainer.train, evaluate() its metric_key_prefix; the card's description
    of ŵ2 is kept on the trainer."""
    from transformers import TrainingArguments

    _finetuned_coop(toy_tokenizer, tmp_path)
    with pytest.raises(TypeError, match=r"^MergeTuneTrainer needs a MergeTuneConfig$"):
        MergeTuneTrainer(
            _continued_coop(toy_tokenizer), TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True), CLASSES,
            TEMPLATES, toy_tokenizer, finetuned=tmp_path / "ft",
        )  # fmt: skip
    trainer = MergeTuneTrainer(
        _continued_coop(toy_tokenizer), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, finetuned=tmp_path / "ft",
        train_dataset=data, eval_dataset=data,
    )  # fmt: skip
    assert trainer.finetuned_description == "a local adapter folder (`ft`)"
    assert trainer.fisher_info == {}
    missing = str(tmp_path / "no-checkpoint")
    with pytest.raises((ValueError, OSError), match="no-checkpoint"):
        trainer.train(missing)
    with pytest.raises((ValueError, OSError), match="no-checkpoint"):
        trainer.train(resume_from_checkpoint=missing)
    metrics = trainer.evaluate(metric_key_prefix="val")
    assert "val_loss" in metrics and not any(k.startswith("eval_") for k in metrics)
