"""bf16 autocast training on the CPU of every trainer and method: ``ClipClassificationTrainer`` (full fine-tuning,
CoOp, VPT, linear head, LoRA), ``MergeTuneTrainer`` (CoOp, head, LoRA, full, VPT) and the continual training path
(``hf_cft.continual.training.fit``, which takes its precision from the launcher's ``ACCELERATE_MIXED_PRECISION``).
Each checks that autocast really ran the layers in bf16, that every logged loss is finite, and that the weights
(adapters, full models, expert deltas) stay and are saved in fp32."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tests_helpers import CLASSES, colour_dataset, trainer_kwargs

from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.testing import tiny_clip
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer

TEMPLATES = ["a photo of a {}."]


def _adapter(kind, tok, seed=0):
    torch.manual_seed(seed)
    config = {
        "coop": lambda: CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok),
        "vpt": lambda: VPTConfig(n_tokens=2),
        "head": lambda: LinearHeadConfig(num_classes=len(CLASSES), init="random"),
        "lora": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    }[kind]()
    return get_peft_model(tiny_clip(), config)


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


class _DtypeProbe:
    """Records the output dtype of a vision-tower linear layer at every call."""

    def __init__(self, model):
        layer = next(m for n, m in model.named_modules() if n.endswith("vision_model.encoder.layers.0.mlp.fc1"))
        self.seen: set = set()
        layer.register_forward_hook(lambda mod, inp, out: self.seen.add(out.dtype))


def _check(trainer, probe, folder):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses), losses
    assert torch.bfloat16 in probe.seen, probe.seen  # autocast ran the layer in bf16
    assert all(p.dtype == torch.float32 for p in trainer.clip_model.parameters())
    trainer.save_model(str(folder))
    file = folder / ("model.safetensors" if (folder / "model.safetensors").is_file() else "adapter_model.safetensors")
    saved = load_file(str(file))
    assert saved and all(t.dtype == torch.float32 for t in saved.values()), {t.dtype for t in saved.values()}


def _args(cls, tmp_path, **kw):
    return cls(**trainer_kwargs(tmp_path, max_steps=2, bf16=True, **kw))


@pytest.mark.parametrize("kind", ["full", "coop", "vpt", "head", "lora"])
def test_clip_trainer_bf16_autocast(kind, toy_tokenizer, tmp_path):
    model = tiny_clip() if kind == "full" else _adapter(kind, toy_tokenizer)
    trainer = ClipClassificationTrainer(
        model,
        _args(ClipTrainingArguments, tmp_path),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        train_dataset=colour_dataset(),
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    probe = _DtypeProbe(model)
    trainer.train()
    _check(trainer, probe, tmp_path / "saved")


@pytest.mark.parametrize("family", ["coop", "head", "lora", "full", "vpt"])
def test_mergetune_bf16_autocast(family, toy_tokenizer, tmp_path):
    if family == "full":
        finetuned = tiny_clip()
        finetuned.logit_scale.requires_grad_(False)  # frozen in the continued model too (freeze_logit_scale)
        model, finetuned = tiny_clip(), _perturb(finetuned, 1)
    else:
        model, finetuned = _adapter(family, toy_tokenizer), _perturb(_adapter(family, toy_tokenizer, seed=1), 1)
    args = _args(MergeTuneConfig, tmp_path, anchor_weight=1e-2, num_alphas=2)
    trainer = MergeTuneTrainer(
        model, args, CLASSES, TEMPLATES, toy_tokenizer, finetuned=finetuned, train_dataset=colour_dataset()
    )
    probe = _DtypeProbe(model)
    trainer.train()
    for name in ("train_loss_task", "train_loss_anchor", "train_loss_path"):
        values = [h[name] for h in trainer.state.log_history if name in h]
        assert values and all(math.isfinite(v) for v in values), name
    _check(trainer, probe, tmp_path / "saved")


def test_continual_training_path_bf16_from_the_launcher(toy_tokenizer, tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` (or a config with ``mixed_precision: bf16``) sets
    ``ACCELERATE_MIXED_PRECISION``; the continual path's Trainer (``fit``: ConDU, PAM and the merging baselines'
    experts) follows it: bf16 autocast, finite losses, fp32 weights."""
    from test_continual import IndependentExperts, _config, _model, _runner, _tasks

    from hf_cft.continual.training import fit

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    model = _model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    probe = _DtypeProbe(model)
    task = _runner(IndependentExperts(), tmp_path, toy_tokenizer)._prepare(_tasks()[0], 0)
    out = fit(model, toy_tokenizer, task, _config(max_steps=2), 0, 0, tmp_path / "run")
    assert math.isfinite(out.metrics["last_logged_loss"]) and torch.bfloat16 in probe.seen
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())
