"""MergeTune in weight space (LoRA, full fine-tuning): each loss term against a model whose weights were set by
hand, the Fisher against per-example autograd, no model copies, tower reuse, training, bad inputs."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tests_helpers import colour_dataset, raw_colour_dataset, trainer_kwargs

from hf_cft import VPTConfig
from hf_cft.errors import AdapterError, BundleError, DeltaError, HfCftError, NonFiniteError
from hf_cft.models import image_features, text_features
from hf_cft.testing import tiny_clip
from hf_cft.trainers import MergeTuneConfig, MergeTuneConfigError, MergeTuneTrainer
from hf_cft.trainers.mergetune_losses import normalize_fisher

CLASSES = ["cat", "dog", "sea lion"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
BOTH = ["q_proj", "v_proj"]
TEXT_ONLY = r".*text_model.*\.(q_proj|v_proj)"
VISION_ONLY = r".*vision_model.*\.(q_proj|v_proj)"


def _args(tmp_path, **kw):
    return MergeTuneConfig(**trainer_kwargs(tmp_path, **{"max_steps": 2, **kw}))


@pytest.fixture(scope="module")
def data():
    return colour_dataset(12)


def _lora(targets=BOTH, r=2, lora_alpha=4, seed=None, **kw):
    model = get_peft_model(tiny_clip(), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, **kw))
    if seed is not None:  # a "fine-tuned" adapter: random non-zero factors
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def _delta(layer, adapter="default"):
    return layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight


def _perturb(params, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _full_ft(seed=5, scale=0.05, prefixes=("vision_model", "visual_projection", "text_model", "text_projection")):
    model = tiny_clip()
    _perturb([p for n, p in model.named_parameters() if n.startswith(prefixes)], seed, scale)
    return model


@pytest.fixture
def count_models(monkeypatch):
    """Counts transformers models built while the test runs (a model copy would build one)."""
    from transformers import PreTrainedModel

    built = []
    init = PreTrainedModel.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "__init__", counting)
    return built


def _hand_ce(hand_model, trainer, batch):
    """CE of a plain CLIP (weights set by hand) on the trainer's training text inputs."""
    ti = trainer._text_inputs(train=True)
    with torch.no_grad():
        img = image_features(hand_model, batch["pixel_values"])
        txt = text_features(hand_model, ti["input_ids"], ti["attention_mask"])
        s = hand_model.logit_scale.exp()
        return F.cross_entropy(s * img @ txt.t(), batch["labels"])


def _loss_parts(trainer, batch):
    trainer.model.train()
    trainer._metric_sums["train"] = {}
    loss = trainer.compute_loss(trainer.model, batch)
    parts = {k: v[-1] for k, v in trainer._metric_sums["train"].items()}
    return loss, parts


def _build(model, tmp_path, finetuned, data, tok, **kw):
    extra = {k: kw.pop(k) for k in ("zero_shot", "fisher_dataset") if k in kw}
    return MergeTuneTrainer(
        model,
        _args(tmp_path, **kw),
        CLASSES,
        TEMPLATES,
        tok,
        finetuned=finetuned,
        train_dataset=data,
        **extra,
    )


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_tau_init_and_loss_terms_match_hand_weights(toy_tokenizer, tmp_path, data):
    """ΔW0 = τ·ΔW2 (different lora_alpha: the scaling ratio is folded in); then, at an arbitrary w, the task,
    sq-L2 anchor and path terms equal CE / Σ‖ΔW‖² of plain CLIPs whose weights were set to W0 + ΔW and to
    W0 + ΔW2 + α(ΔW − ΔW2)."""
    ft = _lora(lora_alpha=2, seed=1)
    ft.save_pretrained(tmp_path / "ft")
    model = _lora(lora_alpha=4)
    trainer = _build(model, tmp_path, tmp_path / "ft", data, toy_tokenizer, tau=0.4, num_alphas=2)
    cont, fine = _lora_layers(model), _lora_layers(ft)
    assert set(cont) == set(fine) and len(cont) == 8
    for name, layer in cont.items():
        torch.testing.assert_close(_delta(layer), 0.4 * _delta(fine[name]), atol=1e-6, rtol=1e-5)
    _perturb([p for p in model.parameters() if p.requires_grad], seed=7, scale=0.3)

    batch = trainer.data_collator([data[i] for i in range(6)])
    loss, parts = _loss_parts(trainer, batch)
    with torch.no_grad():
        deltas = {n: _delta(layer) for n, layer in cont.items()}
        deltas_ft = {n: _delta(layer) for n, layer in fine.items()}

    def hand(alpha):  # weights W0 + ΔW2 + α(ΔW − ΔW2) on a fresh base model
        m = tiny_clip()
        with torch.no_grad():
            for n, d in deltas.items():
                m.get_submodule(n).weight.add_(deltas_ft[n] + alpha * (d - deltas_ft[n]))
        return m

    task = _hand_ce(hand(1.0), trainer, batch)
    path = (_hand_ce(hand(0.25), trainer, batch) + _hand_ce(hand(0.75), trainer, batch)) / 2
    anchor = sum((d**2).sum() for d in deltas.values())
    assert parts["loss_task"] == pytest.approx(float(task), rel=1e-5, abs=1e-6)
    assert parts["loss_path"] == pytest.approx(float(path), rel=1e-5, abs=1e-6)
    assert parts["loss_anchor"] == pytest.approx(float(anchor), rel=1e-5)
    torch.testing.assert_close(loss, task + 8.0 * anchor + 0.5 * path, atol=1e-5, rtol=1e-5)


def test_lora_path_gradient_reaches_factors_scaled_by_alpha(toy_tokenizer, tmp_path, data):
    """With λ = 0 and the task weight removed, d(path)/dB equals the hand gradient of the interpolated model."""
    _lora(seed=1).save_pretrained(tmp_path / "ft")
    model = _lora(targets=TEXT_ONLY)
    with pytest.raises(AdapterError, match="other modules"):  # the fine-tuned adapter also adapts the vision tower
        _build(model, tmp_path, tmp_path / "ft", data, toy_tokenizer)
    _lora(targets=TEXT_ONLY, seed=1).save_pretrained(tmp_path / "ft_text")
    trainer = _build(model, tmp_path, tmp_path / "ft_text", data, toy_tokenizer, num_alphas=1, tau=1.0)
    batch = trainer.data_collator([data[i] for i in range(6)])
    img = image_features(model, batch["pixel_values"]).detach()
    ti = trainer._text_inputs(train=True)
    params = [p for p in model.parameters() if p.requires_grad]
    path = trainer._weight_space_path(batch["pixel_values"], img, None, ti, batch["labels"], torch.tensor([0.5]))
    got = torch.autograd.grad(path, params)
    # hand: at τ = 1 and α = 0.5 the weights are W0 + ΔW2 + 0.5·(ΔW − ΔW2) = W0 + ΔW when ΔW = ΔW2, and the
    # gradient reaching the continued factors is 0.5 × the plain LoRA gradient
    txt = text_features(model, ti["input_ids"], ti["attention_mask"])
    plain = F.cross_entropy(model.get_base_model().logit_scale.exp() * img @ txt.t(), batch["labels"])
    want = torch.autograd.grad(plain, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, 0.5 * w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "targets, n_alphas, image_runs, text_runs",
    [(TEXT_ONLY, 3, 1, 1 + 3), (VISION_ONLY, 3, 1 + 3, 0), (BOTH, 3, 1 + 3, 1 + 3)],
)
def test_towers_outside_w_are_computed_once(toy_tokenizer, tmp_path, data, targets, n_alphas, image_runs, text_runs):
    """Text-only LoRA: one image-tower forward per batch, reused by every α; vision-only: the (frozen) class
    text features are not recomputed at all after the first step."""
    _lora(targets=targets, seed=1).save_pretrained(tmp_path / "ft")
    model = _lora(targets=targets)
    trainer = _build(model, tmp_path, tmp_path / "ft", data, toy_tokenizer, num_alphas=n_alphas)
    base = model.get_base_model()
    counts = {"image": 0, "text": 0}
    hooks = [
        base.vision_model.register_forward_hook(lambda *_: counts.__setitem__("image", counts["image"] + 1)),
        base.text_model.register_forward_hook(lambda *_: counts.__setitem__("text", counts["text"] + 1)),
    ]
    batch = trainer.data_collator([data[i] for i in range(6)])
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)  # first step fills the frozen-text cache
    counts.update(image=0, text=0)
    trainer.compute_loss(trainer.model, batch).backward()
    for h in hooks:
        h.remove()
    assert counts == {"image": image_runs, "text": text_runs}


def test_lora_finetuned_as_folder_name_or_model_agree_and_nothing_is_copied(
    toy_tokenizer, tmp_path, data, count_models
):
    ft = _lora(seed=1)
    ft.save_pretrained(tmp_path / "ft")
    model = _lora()
    count_models.clear()
    trainer = _build(model, tmp_path, tmp_path / "ft", data, toy_tokenizer)
    assert count_models == []  # no model is built to read ŵ2 or to evaluate the path
    held = trainer.held_anchor_tensors()
    factors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in held.values()) == sum(p.numel() for p in factors.values())
    assert {k.removeprefix("finetuned/") for k in held} == set(factors)
    assert list(model.peft_config) == ["default"]
    assert not any("mergetune" in n for n, _ in model.named_parameters())

    # the same ŵ2 given as a PeftModel, or as an adapter loaded in the continued model
    by_model = _build(_lora(), tmp_path, ft, data, toy_tokenizer).held_anchor_tensors()
    named = _lora()
    named.load_adapter(str(tmp_path / "ft"), adapter_name="ft")
    named.set_adapter("default")
    by_name = _build(named, tmp_path, "ft", data, toy_tokenizer).held_anchor_tensors()
    assert list(named.peft_config) == ["default", "ft"]  # the user's adapter is kept
    assert not any(p.requires_grad for n, p in named.named_parameters() if ".ft." in n)
    for k, v in held.items():
        torch.testing.assert_close(by_model[k], v)
        torch.testing.assert_close(by_name[k], v)


@pytest.mark.parametrize("targets", [TEXT_ONLY, VISION_ONLY], ids=["text", "vision"])
def test_lora_fisher_matches_per_example_autograd(targets, toy_tokenizer, tmp_path, data):
    """F over ΔW entries = E_x[(∂ log p_ŵ1(ŷ|x)/∂W)²] at the base model (argmax ŷ, eval templates), by a loop of
    per-example backward passes; normalised to mean 1 + damping; the anchor is Σ F ⊙ ΔW²."""
    _lora(targets=targets, seed=1).save_pretrained(tmp_path / "ft")
    model = _lora(targets=targets)
    trainer = _build(
        model,
        tmp_path,
        tmp_path / "ft",
        data,
        toy_tokenizer,
        anchor="fisher",
        fisher_labels="argmax",
        fisher_max_images=4,
        fisher_sample="first",  # the hand computation below reads rows 0..3
    )
    assert trainer.fisher_info["images"] == 4 and trainer.fisher_info["seconds"] >= 0
    base = tiny_clip()
    ti = trainer._text_inputs(train=False)
    names = list(_lora_layers(model))
    weights = [base.get_submodule(n).weight for n in names]
    batch = trainer.data_collator([data[i] for i in range(4)])
    hand = [torch.zeros_like(w) for w in weights]
    for i in range(4):
        img = image_features(base, batch["pixel_values"][i : i + 1])
        txt = text_features(base, ti["input_ids"], ti["attention_mask"])
        txt = F.normalize(txt.view(3, 2, -1).mean(1), dim=-1)
        logp = torch.log_softmax(base.logit_scale.exp() * img @ txt.t(), -1)[0]
        for h, g in zip(hand, torch.autograd.grad(logp[logp.argmax()], weights)):
            h += g**2 / 4
    hand = normalize_fisher(hand, 1e-3)
    for n, h in zip(names, hand):
        torch.testing.assert_close(trainer.fisher[n], h, atol=1e-6, rtol=1e-4)
    batch = trainer.data_collator([data[i] for i in range(6)])
    _, parts = _loss_parts(trainer, batch)
    layers = _lora_layers(model)
    want = sum((trainer.fisher[n] * _delta(layers[n]) ** 2).sum() for n in names)
    assert parts["loss_anchor"] == pytest.approx(float(want.detach()), rel=1e-5)


# ------------------------------------------------------------------------------------------------ full FT


def test_full_tau_init_and_loss_terms_match_hand_weights(toy_tokenizer, tmp_path, data):
    ft = _full_ft()
    ft.save_pretrained(tmp_path / "ft")
    model = tiny_clip()
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    w2 = dict(ft.named_parameters())
    trainer = _build(model, tmp_path, tmp_path / "ft", data, toy_tokenizer, tau=0.3, num_alphas=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "logit_scale" not in trainable and len(trainable) > 50
    for n, p in model.named_parameters():
        want = 0.7 * w1[n] + 0.3 * w2[n] if n in trainable else w1[n]
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=1e-5)
    _perturb([p for p in model.parameters() if p.requires_grad], seed=9)

    batch = trainer.data_collator([data[i] for i in range(6)])
    loss, parts = _loss_parts(trainer, batch)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}

    def hand(alpha):
        m = tiny_clip()
        m.load_state_dict({n: w2[n] + alpha * (w[n] - w2[n]) if n in trainable else w[n] for n in w}, strict=False)
        return m

    task = _hand_ce(hand(1.0), trainer, batch)
    path = (_hand_ce(hand(0.25), trainer, batch) + _hand_ce(hand(0.75), trainer, batch)) / 2
    anchor = sum(((w[n] - w1[n]) ** 2).sum() for n in trainable)
    assert parts["loss_task"] == pytest.approx(float(task), rel=1e-5, abs=1e-6)
    assert parts["loss_path"] == pytest.approx(float(path), rel=1e-5, abs=1e-6)
    assert parts["loss_anchor"] == pytest.approx(float(anchor), rel=1e-5)
    torch.testing.assert_close(loss, task + 8.0 * anchor + 0.5 * path, atol=1e-5, rtol=1e-5)


def test_full_holds_only_trainable_keys_and_frozen_text_is_reused(toy_tokenizer, tmp_path, data, count_models):
    """Text tower frozen (the spec's E2E-FT: image encoder fine-tuned): ŵ1/ŵ2 tensors only for the vision keys,
    no model built from the folder, and the path never re-runs the text tower."""
    _full_ft(prefixes=("vision_model", "visual_projection")).save_pretrained(tmp_path / "ft")
    model = tiny_clip()
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(("text_model", "text_projection")))
    count_models.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ŵ2's text tower is the base's: no frozen-mismatch warning
        trainer = _build(model, tmp_path, tmp_path / "ft", data, toy_tokenizer, num_alphas=2)
    assert count_models == []
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    held = trainer.held_anchor_tensors()
    assert sum(t.numel() for t in held.values()) == 2 * sum(p.numel() for p in trainable.values())
    assert {k.split("/", 1)[1] for k in held} == set(trainable)
    assert trainer.weight_space.towers == {"vision"}
    counts = {"text": 0}
    hook = model.text_model.register_forward_hook(lambda *_: counts.__setitem__("text", counts["text"] + 1))
    batch = trainer.data_collator([data[i] for i in range(6)])
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    trainer.compute_loss(trainer.model, batch)
    hook.remove()
    assert counts["text"] == 1  # the first task forward only


def test_full_fisher_expected_matches_autograd_and_anchor(toy_tokenizer, tmp_path, data):
    ft = _full_ft(prefixes=("visual_projection", "text_projection"))
    model = tiny_clip()
    for n, p in model.named_parameters():  # keep the check small: fine-tune the projections only
        p.requires_grad_(n in ("visual_projection.weight", "text_projection.weight"))
    trainer = _build(
        model,
        tmp_path,
        ft,
        data,
        toy_tokenizer,
        anchor="fisher",
        fisher_labels="expected",
        fisher_max_images=3,
        fisher_sample="first",
    )
    base = tiny_clip()
    ti = trainer._text_inputs(train=False)
    names = ["visual_projection.weight", "text_projection.weight"]
    weights = [base.get_parameter(n) for n in names]
    batch = trainer.data_collator([data[i] for i in range(3)])
    hand = [torch.zeros_like(w) for w in weights]
    for i in range(3):
        img = image_features(base, batch["pixel_values"][i : i + 1])
        txt = F.normalize(text_features(base, ti["input_ids"], ti["attention_mask"]).view(3, 2, -1).mean(1), dim=-1)
        logp = torch.log_softmax(base.logit_scale.exp() * img @ txt.t(), -1)[0]
        for c in range(3):
            grads = torch.autograd.grad(logp[c], weights, retain_graph=True)
            for h, g in zip(hand, grads):
                h += logp[c].exp().detach() * g**2 / 3
    for n, h in zip(names, normalize_fisher(hand, 1e-3)):
        torch.testing.assert_close(trainer.fisher[n], h, atol=1e-6, rtol=1e-4)
    _, parts = _loss_parts(trainer, trainer.data_collator([data[i] for i in range(6)]))
    want = sum((trainer.fisher[n] * (model.get_parameter(n) - base.get_parameter(n)) ** 2).sum() for n in names)
    assert parts["loss_anchor"] == pytest.approx(float(want.detach()), rel=1e-5)


def test_full_trainable_logit_scale_is_part_of_w(toy_tokenizer, tmp_path, data):
    """With ``freeze_logit_scale=False`` and only the scale trainable, the path runs at the interpolated scale
    and reuses both towers' features."""
    model = tiny_clip()
    model.requires_grad_(False)
    model.logit_scale.requires_grad_(True)
    ft = tiny_clip()
    with torch.no_grad():
        ft.logit_scale.add_(0.5)
    trainer = _build(model, tmp_path, ft, data, toy_tokenizer, freeze_logit_scale=False, num_alphas=1, tau=0.0)
    assert trainer.weight_space.towers == set() and list(trainer.weight_space.params) == ["logit_scale"]
    with torch.no_grad():
        model.logit_scale.add_(0.2)  # w − ŵ1 = 0.2
    batch = trainer.data_collator([data[i] for i in range(6)])
    _, parts = _loss_parts(trainer, batch)
    hand = tiny_clip()
    with torch.no_grad():
        hand.logit_scale.add_(0.5 + 0.5 * (0.2 - 0.5))  # ŵ2 + α(w − ŵ2) at α = 0.5
    assert parts["loss_path"] == pytest.approx(float(_hand_ce(hand, trainer, batch)), rel=1e-5)
    assert parts["loss_anchor"] == pytest.approx(0.04, rel=1e-4)


def test_full_zero_shot_argument_and_frozen_mismatch_warning(toy_tokenizer, tmp_path, data):
    """ŵ1 may come from another model when ``model`` starts elsewhere; a ŵ2 that differs on frozen tensors warns."""
    ft = _full_ft()
    start = _full_ft(seed=11)
    for n, p in start.named_parameters():
        p.requires_grad_(n.startswith("vision_model"))
    with pytest.warns(UserWarning, match="frozen tensor"):
        trainer = _build(start, tmp_path, ft, data, toy_tokenizer, zero_shot=tiny_clip(), tau=0.0)
    zs = tiny_clip()
    for n, p in start.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), zs.get_parameter(n))
    assert all(k.split("/", 1)[1].startswith("vision_model") for k in trainer.held_anchor_tensors())


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("family", ["lora", "full"])
def test_training_reduces_the_total_loss(family, toy_tokenizer, tmp_path, data):
    extra = {}
    if family == "lora":
        _lora(targets=TEXT_ONLY, seed=1).save_pretrained(tmp_path / "ft")
        model, finetuned = _lora(targets=TEXT_ONLY), tmp_path / "ft"
        lr = 0.02
    else:  # with the Fisher anchor (sampled labels, the default)
        extra = {"anchor": "fisher", "fisher_max_images": 6}
        model = tiny_clip()
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("text_model.encoder.layers.1") or n == "text_projection.weight")
        finetuned, lr = _full_ft(scale=0.2, prefixes=("text_model.encoder.layers.1", "text_projection")), 0.05
    trainer = _build(
        model,
        tmp_path,
        finetuned,
        data,
        toy_tokenizer,
        num_alphas=2,
        tau=0.5,
        max_steps=4,
        learning_rate=lr,
        anchor_weight=0.1,
        per_device_train_batch_size=12,
        **extra,
    )
    if extra:
        assert trainer.fisher_info["images"] == 6 and trainer.fisher_info["labels"] == "sample"
        assert all(torch.isfinite(f).all() and (f >= 1e-3).all() for f in trainer.fisher.values())
    batch = trainer.data_collator([data[i] for i in range(12)])
    with torch.no_grad():
        before, _ = _loss_parts(trainer, batch)
    trainer.train()
    with torch.no_grad():
        after, _ = _loss_parts(trainer, batch)
    assert after < before
    if family == "lora":  # evaluation runs the same terms without a graph (all templates)
        metrics = trainer.evaluate(data)
        assert {"eval_loss", "eval_loss_path", "eval_loss_anchor", "eval_accuracy"} <= set(metrics)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"train_loss_task", "train_loss_anchor", "train_loss_path"} <= set(h) for h in logs)


# ------------------------------------------------------------------------------------------------ bad inputs


def _saved(tmp_path, name, model):
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _nan_lora():
    bad = _lora(seed=1)
    with torch.no_grad():
        next(p for p in bad.parameters() if p.requires_grad)[0, 0] = float("nan")
    return bad


def _inf_full():
    bad = tiny_clip()
    with torch.no_grad():
        bad.visual_projection.weight[0, 0] = float("inf")
    return bad


def _frozen():
    model = tiny_clip()
    model.requires_grad_(False)
    return model


def _ok(tmp_path):
    return _saved(tmp_path, "ok", _lora(seed=1))


def _two_active():
    model = _lora()
    model.add_adapter("other", LoraConfig(r=2, target_modules=BOTH))
    model.base_model.set_adapter(["default", "other"])
    return model


_SAME = object()  # the continued model itself

BAD_LORA = {
    "full folder": (_lora, lambda t: _saved(t, "full", _full_ft()), {}, AdapterError, "same method type"),
    "full model": (_lora, lambda t: tiny_clip(), {}, AdapterError, "same method type"),
    "vpt folder": (
        _lora,
        lambda t: _saved(t, "vpt", get_peft_model(tiny_clip(), VPTConfig(n_tokens=2))),
        {},
        AdapterError,
        "same method type",
    ),
    "empty folder": (_lora, lambda t: (t / "empty").mkdir() or t / "empty", {}, AdapterError, "no adapter"),
    "rank": (_lora, lambda t: _saved(t, "r4", _lora(r=4, seed=1)), {}, AdapterError, "rank"),
    "targets": (_lora, lambda t: _saved(t, "q", _lora(targets=["q_proj"], seed=1)), {}, AdapterError, "other modules"),
    "other base": (
        _lora,
        lambda t: _saved(t, "other_base", get_peft_model(tiny_clip(hidden_size=16), LoraConfig(target_modules=BOTH))),
        {},
        AdapterError,
        "other_base",
    ),
    "dora": (
        lambda: _lora(use_dora=True),
        _ok,
        {},
        AdapterError,
        r"^the continued model: adapter 'default' is a LoRA variant \(DoraLinearVariant, e.g. DoRA\) at "
        r"'text_model.encoder.layers.0.self_attn.v_proj'; MergeTune needs plain LoRA \(ΔW = s·B·A\).$",
    ),
    "modules_to_save": (
        lambda: _lora(modules_to_save=["visual_projection"]),
        _ok,
        {},
        AdapterError,
        "besides its LoRA factors",
    ),
    "active adapter name": (_lora, lambda t: "default", {}, AdapterError, "continued"),
    "two active adapters": (_two_active, _ok, {}, AdapterError, "several active adapters"),
    "same PeftModel": (_lora, lambda t: _SAME, {}, AdapterError, "continued model"),
    "nan": (_lora, lambda t: _nan_lora(), {}, NonFiniteError, "lora_A"),
    "vpt continued, lora fine-tuned": (  # VPT is a family now; a LoRA ŵ2 for it is refused
        lambda: get_peft_model(tiny_clip(), VPTConfig(n_tokens=2)),
        _ok,
        {},
        AdapterError,
        "same method type",
    ),
    "zero_shot for lora": (_lora, _ok, {"zero_shot": tiny_clip()}, HfCftError, "zero_shot"),
    "cosine anchor": (_lora, _ok, {"anchor": "cosine"}, MergeTuneConfigError, "cosine"),
}

BAD_FULL = {
    "lora folder": (tiny_clip, _ok, {}, AdapterError, "same method type"),
    "lora model": (tiny_clip, lambda t: _lora(seed=1), {}, AdapterError, "same method type"),
    "empty folder": (tiny_clip, lambda t: (t / "empty").mkdir() or t / "empty", {}, BundleError, "no safetensors"),
    "shape": (
        tiny_clip,
        lambda t: _saved(t, "proj8", tiny_clip(projection_dim=8)),
        {},
        DeltaError,
        "visual_projection.weight",
    ),
    "missing key": (
        tiny_clip,
        lambda t: tiny_clip(num_layers=1),
        {},
        DeltaError,
        "has no tensor 'text_model.encoder.layers.1",
    ),
    "same model": (tiny_clip, lambda t: _SAME, {}, DeltaError, "continued model itself"),
    "inf": (tiny_clip, lambda t: _inf_full(), {}, NonFiniteError, "visual_projection.weight"),
    "nothing trainable": (_frozen, lambda t: tiny_clip(), {}, HfCftError, "trainable"),
}


@pytest.mark.parametrize("case", list(BAD_LORA) + [f"full: {k}" for k in BAD_FULL])
def test_bad_inputs(case, toy_tokenizer, tmp_path, data):
    table, key = (BAD_FULL, case[6:]) if case.startswith("full: ") else (BAD_LORA, case)
    make_model, make_finetuned, kw, error, match = table[key]
    model = make_model()
    finetuned = make_finetuned(tmp_path)
    with pytest.raises(error, match=match):
        _build(model, tmp_path, model if finetuned is _SAME else finetuned, data, toy_tokenizer, **kw)


def test_weight_space_config_errors(tmp_path):
    with pytest.raises(MergeTuneConfigError, match="fisher_chunk_size"):
        _args(tmp_path, fisher_chunk_size=0)


# ------------------------------------------------------------------------------------------------ pinned rules
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py).


def test_full_finetuned_from_a_sharded_folder_reads_every_shard(toy_tokenizer, tmp_path, data):
    """ŵ2 from a sharded checkpoint (``model.safetensors.index.json``): the τ-initialisation uses its values, each
    read from the shard the index names; a folder without weights is refused by name."""
    ft = _full_ft()
    ft.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model = tiny_clip()
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _build(model, tmp_path, tmp_path / "sharded", data, toy_tokenizer, tau=0.5)
    w2 = dict(ft.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), 0.5 * w1[n] + 0.5 * w2[n].detach(), atol=1e-6, rtol=1e-5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_clip().config.to_dict()))
    from hf_cft.trainers.mergetune_weightspace import _folder_reader

    with pytest.raises(BundleError) as err:
        _folder_reader(tmp_path / "empty")
    assert str(err.value) == (
        f"{str(tmp_path / 'empty')!r} holds no safetensors model weights (model.safetensors or "
        "model.safetensors.index.json)."
    )


def test_frozen_mismatch_warning_names_the_first_differing_tensor_at_the_callers_line(toy_tokenizer, tmp_path, data):
    """Only frozen tensors that differ beyond rtol 1e-5 / atol 1e-6 are reported, the first one by name, and the
    warning points at the line that built the trainer."""
    import warnings

    ft = _full_ft()
    start = tiny_clip()
    ft_params = dict(ft.named_parameters())
    frozen = [
        n
        for n, p in start.named_parameters()
        if not n.startswith("vision_model") and not torch.allclose(ft_params[n], p, atol=1e-6, rtol=1e-5)
    ]
    for n, p in start.named_parameters():
        p.requires_grad_(n.startswith("vision_model"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(start, tmp_path, ft, data, toy_tokenizer, tau=0.0)
    messages = [w for w in caught if "frozen tensor" in str(w.message)]
    assert len(messages) == 1 and f"on {len(frozen)} frozen tensor(s) (e.g. {frozen[0]!r})" in str(messages[0].message)
    assert str(messages[0].message).endswith("Train the same tensors that were fine-tuned.")
    assert messages[0].filename == __file__  # the warning points at the user's line, however deep it is raised
    same = tiny_clip()  # ŵ2 equal to the continued model on its frozen tensors within the tolerance: no warning
    for n, p in same.named_parameters():
        p.requires_grad_(n.startswith("vision_model"))
    close = tiny_clip()
    with torch.no_grad():
        for n, p in close.named_parameters():
            if n.startswith("vision_model"):
                p.add_(0.05)
            else:  # within rtol 1e-5 and atol 1e-6 together; near zero only the atol holds it
                p.mul_(1 + 5e-6).add_(5e-7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(same, tmp_path, close, data, toy_tokenizer, tau=0.0)
    assert not [w for w in caught if "frozen tensor" in str(w.message)]


def test_vpt_with_modules_to_save_is_refused_naming_the_extra_tensor(toy_tokenizer, tmp_path, data):
    model = get_peft_model(tiny_clip(), VPTConfig(n_tokens=2, modules_to_save=["visual_projection"]))
    ft = get_peft_model(tiny_clip(), VPTConfig(n_tokens=2))
    extra = next(n for n, p in model.named_parameters() if p.requires_grad and "vpt_prompts" not in n)
    with pytest.raises(AdapterError) as err:
        _build(model, tmp_path, ft, data, toy_tokenizer)
    assert str(err.value) == (
        f"the continued VPT adapter 'default' trains tensors besides its prompt tokens ({extra!r}): MergeTune's w is "
        "the prompts only; drop modules_to_save."
    )


def test_full_weight_space_names_the_solution_in_its_refusals_and_keeps_the_models_dtype(tmp_path):
    """A model with nothing trainable is refused; a zero-shot or fine-tuned folder lacking a trainable tensor is
    named as such ("zero-shot folder ...", "fine-tuned folder ..."); the path point is in the model's own dtype."""
    import re

    from safetensors.torch import save_file

    from hf_cft.trainers.mergetune_weightspace import FullWeightSpace

    frozen = tiny_clip()
    frozen.requires_grad_(False)
    with pytest.raises(
        HfCftError,
        match=r"^full-fine-tuning MergeTune needs a model with trainable parameters; none is trainable.$",
    ):
        FullWeightSpace(frozen)
    model = tiny_clip()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("visual_projection"))
    partial = tmp_path / "partial"
    partial.mkdir()
    save_file({"text_projection.weight": torch.zeros(16, 32)}, str(partial / "model.safetensors"))
    missing = re.escape(f"folder {str(partial)!r} has no tensor 'visual_projection.weight'")
    with pytest.raises(DeltaError, match=rf"^the zero-shot {missing}: it is not a fine-tuned copy"):
        FullWeightSpace(model, zero_shot=partial)
    space = FullWeightSpace(model)
    with pytest.raises(DeltaError, match=rf"^the fine-tuned {missing}: it is not a fine-tuned copy"):
        space.attach_finetuned(partial)
    half = tiny_clip().to(torch.bfloat16)
    for n, p in half.named_parameters():
        p.requires_grad_(n.startswith("visual_projection"))
    hspace = FullWeightSpace(half)
    hspace.attach_finetuned(tiny_clip())
    assert {t.dtype for t in hspace.path_params(0.3).values()} == {torch.bfloat16}


def test_a_sharded_full_model_folder_given_to_a_lora_trainer_is_named_as_a_full_model(toy_tokenizer, tmp_path, data):
    """A folder holding a full model only as shards (model.safetensors.index.json) is recognised as a full model,
    not reported as "no adapter"."""
    tiny_clip(seed=2).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    with pytest.raises(AdapterError, match=r"holds a full model but the continued model is a LORA adapter"):
        _build(_lora(), tmp_path, tmp_path / "sharded", data, toy_tokenizer)


def test_sharding_checks_refuse_deepspeed_and_fsdp_where_unsupported_with_the_reason(
    toy_tokenizer, tmp_path, data, monkeypatch
):
    """_check_sharding (run in __init__ for the weight-space families; called again here under faked launcher
    flags): DeepSpeed is refused for every family; FSDP for LoRA and VPT (each with its reason) and for full
    fine-tuning under FSDP1; FSDP2 full fine-tuning takes the sharded path; without either nothing changes."""
    from types import SimpleNamespace

    vpt_ft = _saved(tmp_path, "vpt_ft", get_peft_model(tiny_clip(), VPTConfig(n_tokens=2)))
    trainers = {
        "lora": _build(_lora(), tmp_path, _saved(tmp_path, "lora_ft", _lora(seed=1)), data, toy_tokenizer),
        "vpt": _build(get_peft_model(tiny_clip(), VPTConfig(n_tokens=2)), tmp_path, vpt_ft, data, toy_tokenizer),
        "full": _build(tiny_clip(), tmp_path, _full_ft(), data, toy_tokenizer),
    }
    for family, trainer in trainers.items():
        assert trainer.family == family and trainer._fsdp_path is False
        trainer.is_deepspeed_enabled = True
        with pytest.raises(
            HfCftError,
            match=rf"^MergeTune's {family} family does not support DeepSpeed \(the path loss substitutes "
            r"interpolated weights, which ZeRO-3 shards inside DeepSpeed's engine\); use DDP, or FSDP2 for full "
            r"fine-tuning.$",
        ):
            trainer._check_sharding()
        trainer.is_deepspeed_enabled, trainer.is_fsdp_enabled = False, True
    why = {
        "lora": r"its path point W0 \+ ΔW2 \+ α\(ΔW − ΔW2\) has rank 2r, which FSDP's sharded rank-r factors cannot "
        r"hold in place \(ΔW = s·B·A is not element-wise in the factors\)",
        "vpt": r"it is untested under FSDP \(its prompts are small: DDP costs no memory\)",
    }
    for family in ("lora", "vpt"):
        with pytest.raises(
            HfCftError,
            match=rf"^MergeTune's {family} family does not support FSDP: {why[family]}; use DDP \(multi_gpu_ddp.yaml\)"
            r". Full fine-tuning runs under FSDP2.$",
        ):
            trainers[family]._check_sharding()
    full = trainers["full"]
    monkeypatch.setattr(full.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=1), raising=False)
    with pytest.raises(
        HfCftError,
        match=r"^MergeTune full fine-tuning under FSDP needs FSDP2 \(fsdp_version: 2\): FSDP1 flattens the parameters "
        r"into one buffer per unit, so ŵ1 and ŵ2 cannot be sharded like them.$",
    ):
        full._check_sharding()
    assert full._fsdp_path is False
    monkeypatch.setattr(full.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=2), raising=False)
    full._check_sharding()
    assert full._fsdp_path is True
    full._fsdp_path, full.is_fsdp_enabled = False, False
    full._check_sharding()
    assert full._fsdp_path is False


def test_adapter_family_refusals_of_the_fine_tuned_solution_say_exactly_what_it_is(toy_tokenizer, tmp_path, data):
    """For a LoRA continued model, ŵ2 given as a full-model folder, a full model, a folder without an adapter, an
    unreadable adapter config, the continued PeftModel itself or an int is refused with a message naming it."""
    import re

    full = _saved(tmp_path, "full", _full_ft())
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    model = _lora()
    cases = [
        (full, rf"^{re.escape(repr(str(full)))} holds a full model but the continued model is a LORA adapter: "
         r"MergeTune needs both of the same method type.$"),
        (tiny_clip(), r"^the fine-tuned solution is a full model \(CLIPModel\) but the continued model is a LORA "
         r"adapter: MergeTune needs both of the same method type.$"),
        (tmp_path / "empty", rf"^{re.escape(repr(str(tmp_path / 'empty')))} holds no adapter \(no "
         r"adapter_config.json\).$"),
        (broken, rf"^cannot read a fine-tuned adapter from {re.escape(repr(str(broken)))}: "),
        (model, r"^the fine-tuned PeftModel is the continued model; pass the name of its fine-tuned adapter "
         r"instead.$"),
        (3, r"^finetuned must be an adapter folder, a loaded adapter name or a PeftModel, got int$"),
    ]  # fmt: skip
    for finetuned, message in cases:
        with pytest.raises(AdapterError, match=message):
            _build(model, tmp_path, finetuned, data, toy_tokenizer)


# ------------------------------------------------------------------------------------------------ FSDP2, one process


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("accumulation, padding, anchor", [(1, None, "sq_l2"), (2, 0.5, "fisher")])
def test_full_fine_tuning_sharded_path_on_one_fsdp2_process_equals_the_plain_path(
    accumulation, padding, anchor, toy_tokenizer, tmp_path, data
):
    """The FSDP2 path (ŵ1, ŵ2 sharded like the DTensor parameters, the path point written shard by shard, the α
    terms' backward run inside compute_loss, scaled by β/N, the accumulation steps and the padding weight) on a
    one-process gloo group: the same loss, logged terms and gradients as the plain functional_call path. The
    2-process run (tests/test_scale_out.py) is slow; this pins the arithmetic in the fast suite."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hf_cft.trainers.clip_trainer import fsdp_scalar_parameters

    def build():
        model, ft = tiny_clip(), _full_ft()
        model.logit_scale.requires_grad_(False)
        ft.logit_scale.data.copy_(model.logit_scale.data)
        for m in (model, ft):
            fsdp_scalar_parameters(m)  # what the trainer does under FSDP: FSDP2 refuses 0-d parameters
        trainer = _build(model, tmp_path, ft, data, toy_tokenizer, anchor_weight=0.5, path_weight=0.7,
                         num_alphas=3, alpha_grid="official", label_smoothing=0.1, anchor=anchor,
                         fisher_labels="argmax")  # fmt: skip
        trainer.current_gradient_accumulation_steps = accumulation  # what the training loop sets
        trainer._padding_weight = padding
        _perturb([p for p in model.parameters() if p.requires_grad], seed=9)  # w ≠ ŵ1: every term non-zero
        trainer.model.train()
        return trainer

    batch = build().data_collator([data[i] for i in range(6)])

    def step(trainer):
        trainer._metric_sums["train"] = {}
        loss = trainer.compute_loss(trainer.model, batch)
        (loss / accumulation).backward()  # what training_step does with the returned loss
        parts = {k: v[-1] for k, v in trainer._metric_sums["train"].items()}
        grads = {}
        for n, p in trainer.clip_model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        return loss.detach(), parts, grads

    plain = build()
    assert plain._fsdp_shards() is False  # not under FSDP: the plain path
    want_loss, want_parts, want_grads = step(plain)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = build()
        trainer._fsdp_path = True  # what _check_sharding sets under an FSDP2 plugin
        fisher = getattr(trainer, "fisher", None)
        assert trainer._fsdp_shards() is False and not trainer.weight_space.sharded  # not wrapped yet
        for layer in trainer.clip_model.vision_model.encoder.layers:
            fully_shard(layer)
        fully_shard(trainer.model)
        trainer.model.eval()  # an evaluation step under FSDP runs no backward, even with gradients enabled
        trainer.compute_loss(trainer.model, batch)
        assert all(p.grad is None for p in trainer.clip_model.parameters())
        trainer.model.train()
        loss, parts, grads = step(trainer)
        assert trainer.weight_space.sharded and trainer._fsdp_shards() is True
        if anchor == "fisher":  # replaced by its shards, cut like the parameters (one process: all of it)
            assert trainer.fisher is not fisher and set(trainer.fisher) == set(fisher)
            for k, f in fisher.items():
                torch.testing.assert_close(trainer.fisher[k].reshape(f.shape), f, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert parts == pytest.approx(want_parts, rel=1e-5, abs=1e-6)
    assert set(parts) == {"loss_task", "loss_anchor", "loss_path", "accuracy"}
    assert set(grads) == set(want_grads) and len(grads) > 50
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------------ refusals, exactly


def test_each_refusal_names_the_fine_tuned_solution_the_way_it_was_given(toy_tokenizer, tmp_path, data):
    """ŵ2 of another rank, of another method or holding a NaN is refused naming it as the user gave it: a folder by
    its path (a str or a Path, also one that does not exist), an adapter loaded in the same model by its name, a
    PeftModel as "the given PeftModel"."""
    import re

    r4 = _saved(tmp_path, "r4", _lora(r=4, seed=1))
    vpt = _saved(tmp_path, "vpt", get_peft_model(tiny_clip(), VPTConfig(n_tokens=2)))
    nan = _saved(tmp_path, "nan", _nan_lora())
    loaded = _lora()
    loaded.load_adapter(str(r4), adapter_name="ft")
    loaded.set_adapter("default")
    rank = (
        r"^LoRA rank or shape differs at 'text_model.encoder.layers.0.self_attn.v_proj': continued A \(2, 32\), "
        r"B \(32, 2\); fine-tuned \({}\) A \(4, 32\), B \(32, 4\).$"
    )
    other = (
        r"^the fine-tuned solution \({}\) is a HF_CFT_VPT adapter but the continued model is LORA: MergeTune "
        r"needs both of the same method type.$"
    )
    cases = [
        (_lora(), r4, AdapterError, rank.format(re.escape(str(r4)))),
        (_lora(), str(r4), AdapterError, rank.format(re.escape(str(r4)))),
        (loaded, "ft", AdapterError, rank.format(r"adapter 'ft'")),
        (_lora(), _lora(r=4, seed=1), AdapterError, rank.format("the given PeftModel")),
        (_lora(), vpt, AdapterError, other.format(re.escape(str(vpt)))),
        (_lora(), get_peft_model(tiny_clip(), VPTConfig(n_tokens=2)), AdapterError, other.format("the given PeftModel")),
        (_lora(), nan, NonFiniteError, rf"^the fine-tuned adapter {re.escape(repr(str(nan)))}: tensor "
         r"'base_model.model.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight' holds 1 NaN/inf value"),
        (_lora(), str(tmp_path / "missing"), AdapterError,
         rf"^{re.escape(repr(str(tmp_path / 'missing')))} holds no adapter \(no adapter_config.json\).$"),
    ]  # fmt: skip
    for model, finetuned, error, message in cases:
        with pytest.raises(error, match=message):
            _build(model, tmp_path, finetuned, data, toy_tokenizer)


@pytest.mark.parametrize(
    "continued, finetuned, refused",
    [("org/a", "org/b", True), ("org/a", "org/a", False), ("org/a", None, False), (None, "org/b", False)],
)
def test_a_fine_tuned_adapter_of_another_named_base_model_is_refused(
    continued, finetuned, refused, toy_tokenizer, tmp_path, data
):
    """Both adapters name their base model and the names differ: refused, naming both; the same name, or a name on
    one side only, is accepted (the tensors' shapes are checked anyway)."""
    model, ft = _lora(), _lora(seed=1)
    model.peft_config["default"].base_model_name_or_path = continued
    ft.peft_config["default"].base_model_name_or_path = finetuned
    ft.save_pretrained(tmp_path / "ft")
    loaded = _lora()
    loaded.peft_config["default"].base_model_name_or_path = continued
    loaded.load_adapter(str(tmp_path / "ft"), adapter_name="ft")  # keeps the folder's base model name
    loaded.set_adapter("default")
    for continued_model, given, where in ((model, ft, "the given PeftModel"), (loaded, "ft", "adapter 'ft'")):
        if refused:
            with pytest.raises(
                AdapterError,
                match=rf"^the fine-tuned solution \({where}\) was trained on base model 'org/b', not 'org/a'.$",
            ):
                _build(continued_model, tmp_path, given, data, toy_tokenizer)
        else:
            assert _build(continued_model, tmp_path, given, data, toy_tokenizer).family == "lora"


def test_an_unsupported_adapter_type_is_refused_naming_the_type(toy_tokenizer, tmp_path, data):
    from peft import IA3Config

    model = get_peft_model(tiny_clip(), IA3Config(target_modules=BOTH, feedforward_modules=[]))
    with pytest.raises(
        HfCftError,
        match=r"^MergeTuneTrainer supports CoOp, linear-head, LoRA and VPT adapters and full fine-tuning; the active "
        r"adapter 'default' is 'IA3'.$",
    ):
        _build(model, tmp_path, _ok(tmp_path), data, toy_tokenizer)


def test_the_weight_space_fisher_refuses_naflex_inputs_and_reads_pixel_values(toy_tokenizer, tmp_path, data):
    """The per-example Fisher's vmap cannot trace SigLIP2's NaFlex inputs: a batch carrying them is refused naming
    the model class and the way out; a batch of pixel_values alone gives its pixel_values."""
    from hf_cft.errors import MethodNotApplicableError

    px = torch.rand(2, 3, 30, 30)
    naflex = {
        "pixel_values": px,
        "pixel_attention_mask": torch.ones(2, 4),
        "spatial_shapes": torch.tensor([[2, 2]] * 2),
    }
    lora = _build(_lora(), tmp_path, _ok(tmp_path), data, toy_tokenizer)
    full = _build(tiny_clip(), tmp_path, _full_ft(), data, toy_tokenizer)
    for trainer in (lora, full):  # the base model's class, also under a PeftModel
        assert trainer._fisher_pixels({"pixel_values": px, "labels": torch.tensor([0, 1])}) is px
        with pytest.raises(
            MethodNotApplicableError,
            match=r"^MergeTune's weight-space Fisher anchor cannot apply to CLIPModel: its per-example gradients use "
            r"vmap, and NaFlex patches \(pixel_attention_mask / spatial_shapes\) size the position grid from tensor "
            r"values vmap cannot trace. Use anchor='cosine' or 'sq_l2'.$",
        ):
            trainer._fisher_pixels(naflex)


def test_the_path_hands_a_batchs_other_image_inputs_to_the_tower(toy_tokenizer, tmp_path, data, monkeypatch):
    """SigLIP2's pixel_attention_mask / spatial_shapes reach every α's forward with pixel_values (here recorded at
    functional_call on a CLIP model, which has no such inputs)."""
    import hf_cft.trainers.mergetune_trainer as module

    trainer = _build(_lora(), tmp_path, _ok(tmp_path), data, toy_tokenizer, num_alphas=2)
    seen = []

    def recording(fn, params, args, kwargs):
        seen.append(dict(kwargs))
        return torch.zeros(len(kwargs["pixel_values"]), len(CLASSES))

    monkeypatch.setattr(module, "functional_call", recording)
    px, mask = torch.rand(2, 3, 30, 30), torch.ones(2, 4)
    text = trainer._text_inputs(train=True)
    trainer._weight_space_path(
        px, None, None, text, torch.tensor([0, 1]), [0.25, 0.75], {"pixel_attention_mask": mask}
    )
    assert len(seen) == 2
    for kw in seen:
        assert kw["pixel_values"] is px and kw["pixel_attention_mask"] is mask
        assert kw["input_ids"] is text["input_ids"]


def test_weight_space_fisher_bookkeeping_and_its_own_generator(toy_tokenizer, tmp_path, data):
    """fisher_info counts the images and the Fisher's entries and times the estimate (≥ 0, at most the whole
    construction); sampled labels come from the trainer's stream seeded with ``seed`` (re-seeded, it repeats the
    estimate whatever torch's global generator did meanwhile) and differ from the arg-max's and another seed's;
    vmap's batching-fallback warning is not shown; a trainer without a Fisher reports an empty fisher_info."""
    import time

    ft = _ok(tmp_path)

    def build(labels="sample", seed=0):
        model = _lora()
        model.get_base_model().logit_scale.data.fill_(0.0)  # scale 1: p is far from one-hot, so draws vary
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*performance drop")  # vmap's fallback warning is silenced
            trainer = _build(
                model, tmp_path, ft, data, toy_tokenizer, anchor="fisher", fisher_labels=labels, seed=seed
            )
        return trainer, time.perf_counter() - t0

    a, elapsed = build()
    info = a.fisher_info
    assert set(info) == {"images", "seconds", "labels", "parameters"}
    assert info["images"] == len(data) and info["labels"] == "sample"
    assert info["parameters"] == sum(f.numel() for f in a.fisher.values()) > 0
    assert 0 <= info["seconds"] <= elapsed
    first = {k: v.clone() for k, v in a.fisher.items()}
    torch.manual_seed(999)  # the global generator moves on; the Fisher's own stream restarts
    a._fisher_gen.manual_seed(a.args.seed)
    a._estimate_weight_fisher(a.train_dataset)
    for k in first:
        torch.testing.assert_close(a.fisher[k], first[k], rtol=0, atol=0)
    for other in (build("argmax")[0], build(seed=1)[0]):  # the draws matter: not the arg-max, seeded
        assert any(not torch.allclose(first[k], other.fisher[k]) for k in first)
    assert _build(_lora(), tmp_path, ft, data, toy_tokenizer).fisher_info == {}


def test_a_raw_fisher_dataset_gets_the_evaluation_transform_and_is_the_one_used(toy_tokenizer, tmp_path, data):
    """fisher_dataset (here raw images, with fisher_transform="train" so that nothing swaps a transform later) is
    prepared with the evaluation transform: its Fisher equals the one of the same images prepared by hand for
    evaluation, and it, not the training set, is counted; a bad one is refused under its argument's name."""
    from hf_cft.errors import DatasetFormatError

    ft = _ok(tmp_path)
    raw = raw_colour_dataset(9, seed=4)
    kw = dict(anchor="fisher", fisher_labels="argmax", fisher_transform="train")
    trainer = _build(_lora(), tmp_path, ft, data, toy_tokenizer, fisher_dataset=raw, **kw)
    assert trainer.fisher_info["images"] == 9 != len(data)
    by_hand = trainer.prepare_dataset(raw, train=False)
    reference = _build(_lora(), tmp_path, ft, data, toy_tokenizer, fisher_dataset=by_hand, **kw)
    augmented = _build(
        _lora(), tmp_path, ft, data, toy_tokenizer, fisher_dataset=trainer.prepare_dataset(raw, True), **kw
    )
    for k in trainer.fisher:
        torch.testing.assert_close(trainer.fisher[k], reference.fisher[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(trainer.fisher[k], augmented.fisher[k]) for k in trainer.fisher)  # the case tells
    bad = raw_colour_dataset(9, seed=4, classnames=CLASSES + ["owl"], labels=[i % 3 for i in range(8)] + [3])
    with pytest.raises(DatasetFormatError, match=r"^fisher_dataset has label 3 but the trainer has 3 class names"):
        _build(_lora(), tmp_path, ft, data, toy_tokenizer, fisher_dataset=bad, **kw)


def test_unsupported_lora_layouts_are_refused_naming_the_module(toy_tokenizer, tmp_path, data):
    """LoRA on an embedding, lora_bias, fan_in_fan_out (set on a layer: PEFT turns it off for nn.Linear), scaling 0
    (lora_alpha=0) and extra trainable tensors (one, or several: the first named, then "…") are refused."""
    ok = _ok(tmp_path)
    v_proj = "'text_model.encoder.layers.0.self_attn.v_proj'"
    fifo = _lora()
    _lora_layers(fifo)["text_model.encoder.layers.0.self_attn.v_proj"].fan_in_fan_out = True
    extra = (
        r"^the continued LoRA adapter 'default' trains tensors besides its LoRA factors \({}\): MergeTune's w "
        r"is ΔW only; drop modules_to_save / bias training, or use full fine-tuning.$"
    )
    first = "'base_model.model.visual_projection.modules_to_save.default.weight'"
    cases = [
        (_lora(targets=["token_embedding", "q_proj", "v_proj"]),
         r"^the continued model: adapter 'default' puts LoRA on 'text_model.embeddings.token_embedding', a Embedding; "
         r"MergeTune in weight space supports LoRA on nn.Linear layers only.$"),
        (_lora(lora_bias=True), rf"^the continued model: adapter 'default' uses lora_bias or fan_in_fan_out at {v_proj}.$"),
        (fifo, rf"^the continued model: adapter 'default' uses lora_bias or fan_in_fan_out at {v_proj}.$"),
        (_lora(lora_alpha=0), rf"^the continued LoRA adapter 'default' has scaling 0 at {v_proj}.$"),
        (_lora(modules_to_save=["visual_projection"]), extra.format(first)),
        (_lora(modules_to_save=["visual_projection", "text_projection"]), extra.format(first + ", …")),
    ]  # fmt: skip
    for model, message in cases:
        with pytest.raises(AdapterError, match=message):
            _build(model, tmp_path, ok, data, toy_tokenizer)
    with pytest.raises(
        AdapterError,
        match=r"^the continued model has several active adapters \['default', 'other'\]: MergeTune needs exactly one "
        r"\(ŵ1 is the base model without adapters\).$",
    ):
        _build(_two_active(), tmp_path, ok, data, toy_tokenizer)


def test_fisher_rows_all_first_or_a_seeded_sorted_sample():
    from hf_cft.trainers.mergetune_weightspace import fisher_rows

    assert fisher_rows(5, 0, "random", 0) == [0, 1, 2, 3, 4]  # 0: every row
    assert fisher_rows(5, 5, "first", 0) == fisher_rows(5, 9, "random", 1) == [0, 1, 2, 3, 4]
    assert fisher_rows(10, 3, "first", 7) == [0, 1, 2]
    torch.manual_seed(1)
    rows = fisher_rows(100, 10, "random", 3)
    torch.manual_seed(2)  # torch's global generator plays no part
    assert fisher_rows(100, 10, "random", 3) == rows
    assert rows == sorted(torch.randperm(100, generator=torch.Generator().manual_seed(3))[:10].tolist())
    assert rows != list(range(10)) and rows != fisher_rows(100, 10, "random", 4)
    with pytest.raises(ValueError, match=r"^unknown Fisher sample 'last' \(random or first\)$"):
        fisher_rows(10, 3, "last", 0)


def test_raw_weight_space_fisher_is_the_mean_over_all_batches(toy_tokenizer, tmp_path, data):
    """estimate_weight_fisher, unnormalised: the mean of per-example squared gradients over every image of every
    batch (here 3 + 1 images), the count of images; one image is enough; no image is refused."""
    from hf_cft.trainers.mergetune_weightspace import estimate_weight_fisher

    trainer = _build(_lora(), tmp_path, _ok(tmp_path), data, toy_tokenizer)
    coords, fixed, keys = trainer.weight_space.fisher_coordinates()
    text = trainer._text_inputs(train=False)
    px = trainer.data_collator([data[i] for i in range(4)])["pixel_values"]

    def run(batches):
        return estimate_weight_fisher(
            trainer._logits_fn, coords, fixed, batches, text, trainer.weight_space.towers, labels="argmax"
        )

    singles = [run([px[i : i + 1]]) for i in range(4)]
    raw, count = run([px[:3], px[3:]])
    assert count == 4 and all(c == 1 for _, c in singles)
    assert set(raw) == set(keys)
    for k in raw:
        torch.testing.assert_close(raw[k], sum(s[k] for s, _ in singles) / 4, rtol=1e-4, atol=1e-9)
    with pytest.raises(HfCftError, match=r"^the Fisher dataset is empty$"):
        run([])
    towers = trainer.weight_space.towers
    by_default = estimate_weight_fisher(  # labels default to one draw per image from p (the spec's)
        trainer._logits_fn, coords, fixed, [px], text, towers, generator=torch.Generator().manual_seed(5)
    )
    sampled = estimate_weight_fisher(
        trainer._logits_fn, coords, fixed, [px], text, towers, "sample", torch.Generator().manual_seed(5)
    )
    for k in raw:
        torch.testing.assert_close(by_default[0][k], sampled[0][k], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^unknown Fisher labels 'mode'$"):
        estimate_weight_fisher(trainer._logits_fn, coords, fixed, [px], text, towers, "mode")


def test_a_batchs_other_image_inputs_reach_the_task_forward_and_every_path_point(
    toy_tokenizer, tmp_path, data, monkeypatch
):
    """compute_loss hands SigLIP2's NaFlex inputs of the batch to the task forward and to each α's forward (recorded
    here on a CLIP model, which takes none: they are dropped before its tower runs)."""
    import hf_cft.trainers.mergetune_trainer as module

    trainer = _build(_lora(), tmp_path, _ok(tmp_path), data, toy_tokenizer, num_alphas=2)
    batch = trainer.data_collator([data[i] for i in range(4)])
    mask = torch.ones(4, 9)
    forward, call = trainer.model.forward, module.functional_call
    seen = {"task": [], "path": []}

    def task_forward(*args, **kwargs):
        seen["task"].append(kwargs.pop("pixel_attention_mask", None))
        return forward(*args, **kwargs)

    def path_call(fn, params, args, kwargs):
        seen["path"].append(kwargs.get("pixel_attention_mask"))
        return call(fn, params, args, {k: v for k, v in kwargs.items() if k != "pixel_attention_mask"})

    monkeypatch.setattr(trainer.model, "forward", task_forward)
    monkeypatch.setattr(module, "functional_call", path_call)
    trainer.model.train()
    trainer.compute_loss(trainer.model, {**batch, "pixel_attention_mask": mask})
    assert len(seen["task"]) == 1 and len(seen["path"]) == 2
    assert all(m is mask for m in seen["task"] + seen["path"])


def test_tower_of_each_parameter_and_the_towers_a_set_of_tensors_moves():
    """A tensor belongs to the vision or text tower by its name, the logit scale / bias to neither ("scale"), and
    anything else ("other", e.g. a shared projection) moves both towers' features."""
    from hf_cft.trainers.mergetune_weightspace import tower_of, towers_of

    assert tower_of("vision_model.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert tower_of("visual_projection.weight") == "vision"
    assert tower_of("text_model.encoder.layers.0.mlp.fc1.weight") == "text"
    assert tower_of("logit_scale") == tower_of("logit_bias") == "scale"
    assert tower_of("shared_head.weight") == "other"
    assert towers_of(["vision_model.embeddings.patch_embedding.weight"]) == {"vision"}
    assert towers_of(["logit_scale", "logit_bias"]) == set()
    assert towers_of(["shared_head.weight"]) == towers_of(["shared_head.weight", "logit_scale"]) == {"vision", "text"}
    assert towers_of(["text_projection.weight", "shared_head.weight"]) == {"vision", "text"}


def test_a_merged_adapter_is_refused_and_a_bf16_lora_model_runs_its_path(toy_tokenizer, tmp_path, data):
    """A continued LoRA adapter merged into its layers is refused (unmerge first); a bf16 model's path point keeps
    the factors in the model's dtype (the loss is finite and the path term matches an fp32 run to bf16 precision)."""
    merged = _lora(seed=2)
    merged.base_model.merge_adapter()
    with pytest.raises(
        AdapterError,
        match=r"^the continued model: adapter 'default' is merged into 'text_model.encoder.layers.0.self_attn.v_proj'; "
        r"unmerge it first.$",
    ):
        _build(merged, tmp_path, _ok(tmp_path), data, toy_tokenizer)
    ft = _ok(tmp_path)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _lora(seed=3).to(dtype)
        trainer = _build(model, tmp_path, ft, data, toy_tokenizer, num_alphas=2)
        batch = trainer.data_collator([data[i] for i in range(4)])
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        loss, parts = _loss_parts(trainer, batch)
        assert torch.isfinite(loss)
        runs[dtype] = parts
    assert runs[torch.bfloat16]["loss_path"] == pytest.approx(runs[torch.float32]["loss_path"], rel=5e-2)


def test_sampled_labels_of_a_one_hot_classifier_are_its_arg_max(toy_tokenizer, tmp_path, data):
    """With the logit scale so large that p is one-hot, one draw ŷ ~ p per image is the arg-max: the sampled Fisher
    equals the arg-max Fisher."""
    from hf_cft.trainers.mergetune_weightspace import estimate_weight_fisher

    model = _lora()
    model.get_base_model().logit_scale.data.fill_(12.0)  # exp(12) ≈ 1.6e5
    trainer = _build(model, tmp_path, _ok(tmp_path), data, toy_tokenizer)
    coords, fixed, _ = trainer.weight_space.fisher_coordinates()
    text = trainer._text_inputs(train=False)
    px = trainer.data_collator([data[i] for i in range(6)])["pixel_values"]
    args = (trainer._logits_fn, coords, fixed, [px], text, trainer.weight_space.towers)
    sampled, _ = estimate_weight_fisher(*args, "sample", torch.Generator().manual_seed(0))
    argmax, _ = estimate_weight_fisher(*args, "argmax")
    for k in argmax:
        torch.testing.assert_close(sampled[k], argmax[k], rtol=0, atol=0)


def test_lora_slots_of_an_adapter_without_layers_is_refused_exactly():
    """An adapter whose target modules match nothing in the wrapped model has no LoRA layer to continue."""
    import copy

    from peft import LoraConfig, get_peft_model

    from hf_cft.errors import AdapterError
    from hf_cft.testing import tiny_clip
    from hf_cft.trainers.mergetune_weightspace import lora_slots

    model = get_peft_model(copy.deepcopy(tiny_clip()), LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(AdapterError) as err:
        lora_slots(model, "other", "MergeTune weight space")
    assert str(err.value) == "MergeTune weight space: adapter 'other' has no LoRA layers."


# ------------------------------------------------------------------------------------------------ pinned by mutation tests


def test_class_logits_keep_the_attention_mask_of_padded_prompts():
    """On a bidirectional text tower (AltCLIP) padding is seen unless masked: ClassLogits' class features are the
    renormalised template mean of the masked prompts' features, and its logits use them."""
    from hf_cft.models import tokenize_prompts
    from hf_cft.models.clip import logit_scale
    from hf_cft.testing import tiny_family
    from hf_cft.trainers.mergetune_weightspace import ClassLogits

    model, tok = tiny_family("altclip")
    prompts = [t.format(c) for c in ("cat", "sea lion") for t in TEMPLATES]
    enc = tokenize_prompts(tok, prompts, model)
    assert not bool(enc["attention_mask"].all())  # the "cat" prompts are padded
    px = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    module = ClassLogits(model)
    with torch.no_grad():
        per_prompt = text_features(model, enc["input_ids"], enc["attention_mask"])
        unmasked = text_features(model, enc["input_ids"], None)
        want = F.normalize(per_prompt.view(2, 2, -1).mean(1), dim=-1)
        text = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], num_templates=2, what="text")
        logits = module(
            pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], num_templates=2
        )
        want_logits = logit_scale(model) * image_features(model, px) @ want.t()
    assert (unmasked - per_prompt).abs().max() > 1e-6  # the mask matters on this tower
    torch.testing.assert_close(text, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits, want_logits, rtol=1e-6, atol=1e-6)


def test_a_frozen_tensor_the_finetuned_model_lacks_is_skipped_without_error(toy_tokenizer, tmp_path, data):
    """A frozen tensor of the continued model that ŵ2 does not hold is not compared (no error, no warning)."""
    model = tiny_clip()
    model.register_parameter("extra_frozen", torch.nn.Parameter(torch.ones(3), requires_grad=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _build(model, tmp_path, tiny_clip(), data, toy_tokenizer, tau=0.0)
    assert not [w for w in caught if "frozen tensor" in str(w.message)]
    assert "extra_frozen" not in trainer.weight_space.w_ft


def test_the_weight_fisher_of_a_bf16_model_accumulates_in_fp32(toy_tokenizer, tmp_path, data):
    """The per-example squared gradients of a bf16 model are summed into fp32 Fisher tensors."""
    from hf_cft.trainers.mergetune_weightspace import estimate_weight_fisher

    model = _lora(targets=TEXT_ONLY, seed=3).to(torch.bfloat16)
    ft = _saved(tmp_path, "ft", _lora(targets=TEXT_ONLY, seed=1))
    trainer = _build(model, tmp_path, ft, data, toy_tokenizer)
    coords, fixed, _ = trainer.weight_space.fisher_coordinates()
    assert {v.dtype for v in coords.values()} == {torch.bfloat16}
    px = trainer.data_collator([data[0]])["pixel_values"].to(torch.bfloat16)
    text = trainer._text_inputs(train=False)
    fisher, count = estimate_weight_fisher(
        trainer._logits_fn, coords, fixed, [px], text, trainer.weight_space.towers, "argmax"
    )
    assert count == 1 and set(fisher) == set(coords)
    assert {v.dtype for v in fisher.values()} == {torch.float32}
    assert all(bool(v.abs().sum() > 0) for v in fisher.values())


def test_the_shard_by_shard_path_hands_a_batchs_image_inputs_to_each_alpha_and_matches_the_plain_path(
    toy_tokenizer, tmp_path, data, monkeypatch
):
    """The FSDP2 path term runs the model at each α with the batch's other image inputs (SigLIP2's NaFlex mask,
    recorded here on a CLIP model, which takes none); unsharded it equals the functional_call path."""
    trainer = _build(tiny_clip(), tmp_path, _full_ft(), data, toy_tokenizer, num_alphas=2)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets
    batch = trainer.data_collator([data[i] for i in range(4)])
    text = trainer._text_inputs(train=False)
    alphas = [0.25, 0.75]
    forward, seen = trainer.model.forward, []

    def recording(*args, **kwargs):
        seen.append(kwargs.pop("pixel_attention_mask", None))
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "forward", recording)
    mask = torch.ones(4, 9)
    trainer.model.eval()
    with torch.no_grad():
        path = trainer._sharded_path(
            trainer.model, {**batch, "pixel_attention_mask": mask}, text, batch["labels"], alphas
        )
        plain = trainer._weight_space_path(batch["pixel_values"], None, None, text, batch["labels"], alphas, {})
    assert len(seen) == 2 and all(m is mask for m in seen)
    torch.testing.assert_close(path, plain, rtol=1e-5, atol=1e-6)


def test_the_sharded_anchor_logs_the_sum_over_processes(toy_tokenizer, tmp_path, data, monkeypatch):
    """Under FSDP2 each process's anchor is its shards' sum; the logged anchor is the all-reduced total (here a
    second process holding an equal shard, simulated by an all_reduce that doubles), the task and path terms are
    those of the plain path."""
    import torch.distributed as dist

    def build():
        model = tiny_clip()
        model.logit_scale.requires_grad_(False)
        trainer = _build(model, tmp_path, _full_ft(), data, toy_tokenizer, num_alphas=2, anchor="sq_l2")
        _perturb([p for p in model.parameters() if p.requires_grad], seed=9)  # w ≠ ŵ1: a non-zero anchor
        trainer.current_gradient_accumulation_steps = 1  # what the training loop sets
        trainer.model.eval()
        return trainer

    def parts(trainer, batch):
        trainer._metric_sums["eval"] = {}
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        return {k: v[-1] for k, v in trainer._metric_sums["eval"].items()}

    plain = build()
    batch = plain.data_collator([data[i] for i in range(4)])
    want = parts(plain, batch)
    sharded = build()
    monkeypatch.setattr(sharded, "_fsdp_shards", lambda: True)  # what a model wrapped by fully_shard reports
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.mul_(2))  # the other process's equal shard
    got = parts(sharded, batch)
    assert want["loss_anchor"] > 0
    assert got["loss_anchor"] == pytest.approx(2 * want["loss_anchor"], rel=1e-6)
    assert got["loss_task"] == pytest.approx(want["loss_task"], rel=1e-6)
    assert got["loss_path"] == pytest.approx(want["loss_path"], rel=1e-5)
