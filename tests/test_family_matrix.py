"""The family × method matrix: every method of hf_cft on a tiny random model of every CLIP-like family.

Each family's model is built from its config with its own offline tokenizer and image processor
(:func:`hf_cft.testing.tiny_family`); each cell either works — checked against what the method must give, not only
run — or raises the typed error that says why the method cannot apply to that family (:data:`REFUSALS`). The
README's matrix is this table.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from tests_helpers import trainer_kwargs

from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig, class_logits
from hf_cft.errors import HfCftError, ImageInputsError, MethodNotApplicableError
from hf_cft.models import build_zeroshot_classifier, image_features, text_features, tokenize_prompts
from hf_cft.models.families import image_inputs
from hf_cft.testing import FAMILY_NAMES, tiny_family, tiny_family_image_processor

CLASSES = ["cat", "dog", "sea lion"]
TEMPLATES = ["a photo of a {}."]
# Every family's attention projections: CLIP-style towers name them q_proj / v_proj, BERT / RoBERTa ones query / value.
LORA_TARGETS = r".*\.(q_proj|v_proj|query|value)$"

METHODS = (
    "zero-shot",
    "CoOp",
    "VPT",
    "linear head",
    "LoRA",
    "ClipClassificationTrainer",
    "MergeTune prompts",
    "MergeTune head",
    "MergeTune LoRA",
    "MergeTune full",
    "ConDU add_task + router",
    "PAM",
    "merge baseline (TIES)",
    "save / reload / card",
)

#: (family, method) -> (typed error, what its message must say). Empty: every method applies to every family.
REFUSALS: dict[tuple[str, str], tuple[type[HfCftError], str]] = {}


class RowDataset(torch.utils.data.Dataset):
    """Rows already through the family's image processor (``pixel_values`` + SigLIP2's NaFlex inputs, ``labels``)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _images(n, seed=0):
    """Images whose dominant colour channel is the class, of varied sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(20, 44)), int(rng.integers(20, 44))
        img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        img[..., i % 3] += 150
        out.append((Image.fromarray(img), i % 3))
    return out


_CACHE = {}


def _family(family):
    """``(tokenizer, processor, rows)`` of a family, built once per session (the model is rebuilt per cell)."""
    if family not in _CACHE:
        _, tok = tiny_family(family)
        proc = tiny_family_image_processor(family)
        rows = []
        for img, label in _images(12):
            enc = proc(images=img, return_tensors="pt")
            rows.append({k: v[0] for k, v in enc.items()} | {"labels": label})
        _CACHE[family] = tok, proc, rows
    return _CACHE[family]


def _batch(rows):
    from hf_cft.data import ImageClassificationCollator

    return ImageClassificationCollator()(rows)


def _model(family, seed=0):
    return tiny_family(family, seed)[0]


def _perturb(model, seed, scale=0.05, only_trainable=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if (p.requires_grad or not only_trainable) and "logit_scale" not in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _args(tmp_path, cls, **kw):
    return cls(**trainer_kwargs(tmp_path, **{"max_steps": 2, "per_device_train_batch_size": 6, **kw}))


def _grads_flow(model, tok, batch, params):
    """One backward of a classification loss reaches ``params`` (non-zero, finite gradients)."""
    model.zero_grad()
    enc = tokenize_prompts(tok, [t.format(c) for c in CLASSES for t in TEMPLATES], model)
    img = image_features(model, batch["pixel_values"], **image_inputs(batch))
    txt = text_features(model, enc["input_ids"], enc["attention_mask"])
    F.cross_entropy(10 * img @ txt.t(), batch["labels"]).backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


# ------------------------------------------------------------------------------------------------ the cells


def cell_zero_shot(family, tmp_path):
    """class_logits = the model's own logits_per_image (SigLIP: sigmoid scale and bias included)."""
    tok, _, rows = _family(family)
    model = _model(family)
    batch = _batch(rows[:6])
    got = class_logits(model, tok, batch["pixel_values"], CLASSES, TEMPLATES, **image_inputs(batch))
    enc = tokenize_prompts(tok, [TEMPLATES[0].format(c) for c in CLASSES], model)
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], **image_inputs(batch), **enc)
    torch.testing.assert_close(got, out.logits_per_image.float(), rtol=1e-4, atol=1e-4)
    if family == "siglip2":  # the NaFlex inputs are required, not optional
        with pytest.raises(ImageInputsError, match="pixel_attention_mask and spatial_shapes"):
            image_features(model, batch["pixel_values"])


def cell_coop(family, tmp_path):
    """CoOp initialised from "a photo of a" encodes exactly the hand-written prompts; its context trains."""
    tok, _, rows = _family(family)
    model = get_peft_model(_model(family), CoOpConfig(ctx_init="a photo of a", classnames=CLASSES).set_tokenizer(tok))
    feats = model.class_text_features(tok)
    with torch.no_grad(), model.disable_adapter():
        want = build_zeroshot_classifier(model, tok, CLASSES, TEMPLATES)
    torch.testing.assert_close(F.normalize(feats.detach(), dim=-1), want, rtol=1e-5, atol=1e-5)
    ctx = [p for n, p in model.named_parameters() if "coop_ctx" in n]
    loss = F.cross_entropy(10 * feats @ feats.detach().t(), torch.arange(3))
    loss.backward()
    assert ctx and ctx[0].grad is not None and float(ctx[0].grad.abs().sum()) > 0


def cell_vpt(family, tmp_path):
    """Deep VPT changes the image features and its prompts get gradients (SigLIP2: the patch mask grows)."""
    tok, _, rows = _family(family)
    batch = _batch(rows[:4])
    with torch.no_grad():
        base = image_features(_model(family), batch["pixel_values"], **image_inputs(batch))
    model = get_peft_model(_model(family), VPTConfig(n_tokens=2, deep=True))
    feats = image_features(model, batch["pixel_values"], **image_inputs(batch))
    assert torch.isfinite(feats).all() and not torch.allclose(feats, base, atol=1e-4)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(image_features(model, batch["pixel_values"], **image_inputs(batch)), base)
    prompts = [p for n, p in model.named_parameters() if "vpt_prompts" in n]
    assert len(prompts) == 2  # embeddings + layer 1 (layer 0 reads the embeddings' prompts)
    (feats @ torch.randn(feats.shape[-1], generator=torch.Generator().manual_seed(0))).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in prompts)


def cell_linear_head(family, tmp_path):
    """A zero-shot-initialised head classifies as the zero-shot head does (up to SigLIP's constant bias)."""
    tok, _, rows = _family(family)
    batch = _batch(rows[:6])
    zs = class_logits(_model(family), tok, batch["pixel_values"], CLASSES, TEMPLATES, **image_inputs(batch))
    head = get_peft_model(_model(family), LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(tok))
    got = head.classify(batch["pixel_values"], **image_inputs(batch))
    bias = getattr(head.get_base_model(), "logit_bias", None)
    torch.testing.assert_close(got + (bias.detach() if bias is not None else 0), zs, rtol=1e-4, atol=1e-4)


def cell_lora(family, tmp_path):
    """LoRA on every attention projection of both towers: starts as the base model, gets gradients, merges."""
    tok, _, rows = _family(family)
    batch = _batch(rows[:6])
    base = _model(family)
    zs = class_logits(base, tok, batch["pixel_values"], CLASSES, TEMPLATES, **image_inputs(batch))
    model = get_peft_model(_model(family), LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS))
    names = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert any("text_model" in n for n in names) and any("vision_model" in n for n in names)
    torch.testing.assert_close(class_logits(model, tok, batch["pixel_values"], CLASSES, **image_inputs(batch)), zs)
    _grads_flow(model, tok, batch, [p for n, p in model.named_parameters() if "lora_B" in n])
    _perturb(model, 1)
    want = class_logits(model, tok, batch["pixel_values"], CLASSES, **image_inputs(batch))
    merged = model.merge_and_unload()
    got = class_logits(merged, tok, batch["pixel_values"], CLASSES, **image_inputs(batch))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def cell_trainer(family, tmp_path):
    """ClipClassificationTrainer (LoRA) trains on processor outputs and evaluates; the loss goes down."""
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments

    tok, _, rows = _family(family)
    model = get_peft_model(_model(family), LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS))
    args = _args(tmp_path, ClipTrainingArguments, max_steps=4, learning_rate=0.05, optim="adamw_torch")
    data = RowDataset(rows)
    trainer = ClipClassificationTrainer(model, args, CLASSES, TEMPLATES, tok, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert np.isfinite(after["eval_loss"]) and after["eval_loss"] < before


def _mergetune(family, tmp_path, make, finetuned, **kw):
    from hf_cft.trainers import MergeTuneConfig, MergeTuneTrainer

    tok, _, rows = _family(family)
    trainer = MergeTuneTrainer(
        make(),
        _args(tmp_path, MergeTuneConfig, num_alphas=2, **kw),
        CLASSES,
        TEMPLATES,
        tok,
        finetuned=finetuned,
        train_dataset=RowDataset(rows),
    )
    batch = trainer.data_collator(rows[:6])
    trainer.model.train()
    with torch.no_grad():
        loss0 = float(trainer.compute_loss(trainer.model, batch))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert np.isfinite(loss0) and logs and all(np.isfinite(h["loss"]) for h in logs)
    return trainer


def cell_mergetune_prompts(family, tmp_path):
    tok, _, _ = _family(family)

    def make():
        return get_peft_model(
            _model(family), CoOpConfig(ctx_init="a photo of a", classnames=CLASSES).set_tokenizer(tok)
        )

    _perturb(make(), 3, scale=0.3).save_pretrained(tmp_path / "ft")
    _mergetune(family, tmp_path, make, tmp_path / "ft", tau=0.5)


def cell_mergetune_head(family, tmp_path):
    tok, _, _ = _family(family)

    def make():
        return get_peft_model(
            _model(family), LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(tok)
        )

    _perturb(make(), 3, scale=0.3).save_pretrained(tmp_path / "ft")
    _mergetune(family, tmp_path, make, tmp_path / "ft", tau=0.5)


def cell_mergetune_lora(family, tmp_path):
    def make():
        return get_peft_model(_model(family), LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS))

    _perturb(make(), 3, scale=0.3).save_pretrained(tmp_path / "ft")
    _mergetune(family, tmp_path, make, tmp_path / "ft", tau=0.5, learning_rate=0.02)


def cell_mergetune_full(family, tmp_path):
    def make():  # the text tower's last layer and projection trainable, as a full fine-tuning of that block
        model = _model(family)
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("vision_model.encoder.layers.1"))
        return model

    ft = _perturb(make(), 5, scale=0.2)
    _mergetune(family, tmp_path, make, ft, tau=0.5, learning_rate=0.02)


def cell_condu(family, tmp_path):
    """Two experts in a DeltaFusionMerger; the router's task-known logits are the expert's own (θ⁰ + δ)."""
    from hf_cft.merging import DeltaFusionMerger, SemanticRouter, compute_prototypes, delta_from_models

    tok, _, rows = _family(family)
    base = _model(family)
    batch = _batch(rows[:6])
    merger = DeltaFusionMerger(base_model=base)
    experts = []
    for t in range(2):
        expert = _perturb(_model(family), 10 + t, scale=0.02, only_trainable=False)
        experts.append(expert)
        protos = compute_prototypes(base, tok, [batch], CLASSES, TEMPLATES)
        merger.add_task(delta_from_models(base, expert), f"t{t}", prototypes=protos, classnames=CLASSES,
                        templates=TEMPLATES)  # fmt: skip
    router = SemanticRouter(merger, base, tok, top_k=2)
    routed = router.logits(batch["pixel_values"], CLASSES, TEMPLATES, **image_inputs(batch))
    assert routed.shape == (6, 3) and torch.isfinite(routed).all()
    assert router.last_routing is not None
    # with one task, its decoupled delta is the delta itself: the task-known expert is the fine-tuned model
    single = DeltaFusionMerger(base_model=base)
    single.add_task(delta_from_models(base, experts[0]), "t0", classnames=CLASSES, templates=TEMPLATES)
    got = SemanticRouter(single, base, tok, logit_scale=None).logits(batch["pixel_values"], task="t0",
                                                                    **image_inputs(batch))  # fmt: skip
    want = class_logits(experts[0], tok, batch["pixel_values"], CLASSES, TEMPLATES, **image_inputs(batch))
    bias = getattr(experts[0], "logit_bias", None)
    torch.testing.assert_close(got + (bias.detach().float() if bias is not None else 0), want, rtol=1e-3, atol=1e-3)


def cell_pam(family, tmp_path):
    """PAM's callback in ClipClassificationTrainer over two tasks: the global adapter is ½(G₁ + L₂)."""
    from hf_cft.merging import PAMCallback, PAMConfig, adapter_state, prepare_pam_model
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments

    tok, _, rows = _family(family)
    cfg = PAMConfig(top_p=0.5, align_every=2)
    model = prepare_pam_model(_model(family), LoraConfig(r=2, target_modules=LORA_TARGETS), cfg)
    pam = PAMCallback(cfg, model=model)
    merged = []
    for task in range(2):
        args = _args(
            tmp_path / f"t{task}", ClipTrainingArguments, max_steps=2, optim="adamw_torch", learning_rate=0.05
        )
        ClipClassificationTrainer(
            model, args, CLASSES, TEMPLATES, tok, train_dataset=RowDataset(rows[task::2]), callbacks=[pam]
        ).train()
        merged.append(adapter_state(model, "global"))
    assert pam.state.num_tasks == 2 and [r["step"] for r in pam.alignment_log] == [2]
    assert any(not torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def cell_merge_baseline(family, tmp_path):
    """TIES over two full-model deltas, applied to θ⁰: a working model whose weights moved by the merged delta."""
    from hf_cft.merging import apply_delta, delta_from_models, ties

    tok, _, rows = _family(family)
    base = _model(family)
    deltas = [delta_from_models(base, _perturb(_model(family), 20 + t, only_trainable=False)) for t in range(2)]
    merged = ties(deltas, k=0.5)
    model = apply_delta(_model(family), merged)
    key = next(k for k in merged if float(merged[k].abs().sum()) > 0)
    torch.testing.assert_close(model.get_parameter(key) - base.get_parameter(key), merged[key].to(base.dtype))
    batch = _batch(rows[:4])
    assert torch.isfinite(class_logits(model, tok, batch["pixel_values"], CLASSES, **image_inputs(batch))).all()


def cell_save_reload_card(family, tmp_path):
    """Trainer.save_model of a CoOp adapter and of the full model: reloaded, they give the same logits; the cards
    parse."""
    from hf_cft.hub import load_model, validate_card
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments

    tok, proc, rows = _family(family)
    batch = _batch(rows[:4])
    coop = get_peft_model(_model(family), CoOpConfig(n_ctx=3, classnames=CLASSES).set_tokenizer(tok))
    _perturb(coop, 7, scale=0.3)
    args = _args(tmp_path, ClipTrainingArguments)
    trainer = ClipClassificationTrainer(coop, args, CLASSES, TEMPLATES, tok, image_processor=proc)
    trainer.save_model(str(tmp_path / "coop"))
    again = PeftModel.from_pretrained(_model(family), tmp_path / "coop")
    want = class_logits(coop, tok, batch["pixel_values"], CLASSES, **image_inputs(batch))
    torch.testing.assert_close(class_logits(again, tok, batch["pixel_values"], CLASSES, **image_inputs(batch)), want)
    validate_card((tmp_path / "coop" / "README.md").read_text())

    full = _perturb(_model(family), 8, only_trainable=False)
    trainer = ClipClassificationTrainer(full, args, CLASSES, TEMPLATES, tok, image_processor=proc)
    trainer.save_model(str(tmp_path / "full"))
    loaded = load_model(tmp_path / "full")
    assert type(loaded) is type(full)
    want = class_logits(full, tok, batch["pixel_values"], CLASSES, **image_inputs(batch))
    torch.testing.assert_close(class_logits(loaded, tok, batch["pixel_values"], CLASSES, **image_inputs(batch)), want)
    validate_card((tmp_path / "full" / "README.md").read_text())


CELLS = dict(
    zip(
        METHODS,
        (
            cell_zero_shot,
            cell_coop,
            cell_vpt,
            cell_linear_head,
            cell_lora,
            cell_trainer,
            cell_mergetune_prompts,
            cell_mergetune_head,
            cell_mergetune_lora,
            cell_mergetune_full,
            cell_condu,
            cell_pam,
            cell_merge_baseline,
            cell_save_reload_card,
        ),
    )
)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_matrix(family, method, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refusal = REFUSALS.get((family, method))
        if refusal is None:
            CELLS[method](family, tmp_path)
        else:
            error, reason = refusal
            with pytest.raises(error, match=reason):
                CELLS[method](family, tmp_path)


def test_siglip2_mergetune_fisher_is_refused_with_the_reason(tmp_path):
    """The one refusal: the weight-space Fisher's per-example vmap cannot trace NaFlex's value-sized grid. The
    head's closed-form Fisher (image features only) works on SigLIP2."""
    from hf_cft.trainers import MergeTuneConfig, MergeTuneTrainer

    tok, _, rows = _family("siglip2")
    head_cfg = LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES)
    _perturb(get_peft_model(_model("siglip2"), head_cfg.set_tokenizer(tok)), 3, scale=0.3).save_pretrained(
        tmp_path / "h"
    )
    trainer = MergeTuneTrainer(
        get_peft_model(
            _model("siglip2"), LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(tok)
        ),
        _args(tmp_path, MergeTuneConfig, anchor="fisher", fisher_max_images=4),
        CLASSES,
        TEMPLATES,
        tok,
        finetuned=tmp_path / "h",
        train_dataset=RowDataset(rows),
    )
    assert trainer.fisher_info["images"] == 4 and all(torch.isfinite(f).all() for f in trainer.fisher)

    def make():
        return get_peft_model(_model("siglip2"), LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS))

    _perturb(make(), 3, scale=0.3).save_pretrained(tmp_path / "ft")
    with pytest.raises(MethodNotApplicableError, match="vmap.*spatial_shapes"):
        MergeTuneTrainer(
            make(),
            _args(tmp_path, MergeTuneConfig, anchor="fisher", fisher_max_images=4),
            CLASSES,
            TEMPLATES,
            tok,
            finetuned=tmp_path / "ft",
            train_dataset=RowDataset(rows),
        )
