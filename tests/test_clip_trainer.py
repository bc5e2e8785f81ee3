import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tests_helpers import colour_dataset, trainer_kwargs

from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.testing import tiny_clip
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments

CLASSES = ["cat", "dog", "sea lion"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _data(n=24, seed=0):
    return colour_dataset(n, seed)


def _args(tmp_path, **kw):
    return ClipTrainingArguments(**trainer_kwargs(tmp_path, **{"num_train_epochs": 1, **kw}))


def _peft(method, tok):
    return {
        "coop": lambda: get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(tok)),
        "coop_csc": lambda: get_peft_model(
            tiny_clip(), CoOpConfig(n_ctx=2, class_specific=True, classnames=CLASSES).set_tokenizer(tok)
        ),
        "vpt": lambda: get_peft_model(tiny_clip(), VPTConfig(n_tokens=2)),
        "head": lambda: get_peft_model(
            tiny_clip(), LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(tok)
        ),
        "lora": lambda: get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
        "full": lambda: tiny_clip(),
    }[method]()


@pytest.mark.parametrize("method", ["coop", "coop_csc", "vpt", "head", "lora", "full"])
def test_every_method_trains_only_its_parameters(method, toy_tokenizer, tmp_path):
    model = _peft(method, toy_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ClipClassificationTrainer(
        model, _args(tmp_path, max_steps=2), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=_data()
    )
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert not any("logit_scale" in n for n in changed)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(np.isfinite(h["loss"]) and "train_accuracy" in h for h in logs)


def test_coop_training_lowers_loss_and_evaluates(toy_tokenizer, tmp_path):
    model = _peft("coop", toy_tokenizer)
    data = _data(48)
    args = _args(tmp_path, num_train_epochs=8, learning_rate=0.5)
    trainer = ClipClassificationTrainer(
        model, args, CLASSES, TEMPLATES, toy_tokenizer, train_dataset=data, eval_dataset=data
    )
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_loss"] < start["eval_loss"]
    assert end["eval_accuracy"] >= start["eval_accuracy"]
    assert 0.0 <= end["eval_accuracy"] <= 100.0


def test_gradient_accumulation_matches_large_batch(toy_tokenizer, tmp_path):
    """GA=2 × batch 4 and GA=1 × batch 8 see the same 8 images: one SGD step must give the same update."""
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        model = _peft("coop", toy_tokenizer)
        args = _args(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1)
        ClipClassificationTrainer(model, args, CLASSES, TEMPLATES, toy_tokenizer, train_dataset=_data(8)).train()
        results.append(next(p for n, p in model.named_parameters() if "coop_ctx" in n).detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_save_model_writes_the_adapter_and_reloads(toy_tokenizer, tmp_path):
    model = _peft("coop", toy_tokenizer)
    trainer = ClipClassificationTrainer(
        model, _args(tmp_path, max_steps=2), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=_data()
    )
    trainer.train()
    trainer.save_model(tmp_path / "final")
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / "final")
    torch.testing.assert_close(
        loaded.class_text_features(toy_tokenizer, CLASSES), model.class_text_features(toy_tokenizer, CLASSES)
    )


def test_trainer_rejects_mismatched_head(toy_tokenizer, tmp_path):
    from hf_cft.errors import AdapterError

    model = get_peft_model(tiny_clip(), LinearHeadConfig(num_classes=5, init="zeros"))
    with pytest.raises(AdapterError, match="5 classes"):
        ClipClassificationTrainer(model, _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer)


def test_trainer_advances_the_keyed_crop_epoch(toy_tokenizer, tmp_path, monkeypatch):
    """Every epoch starts with set_epoch(e) on the training transform: a row's crop is keyed by (seed, epoch,
    image), so 1- and N-process runs (and resumed runs) augment alike."""
    from hf_cft.data import ImageTransform, apply_image_transform

    seen = []
    monkeypatch.setattr(ImageTransform, "set_epoch", lambda self, e: seen.append(e))
    raw = colour_dataset(8).with_format(None)  # undo the eval transform of the helper
    train = apply_image_transform(raw, ImageTransform(size=30, crop_size=30, train=True, seed=0))
    args = _args(tmp_path, num_train_epochs=3, per_device_train_batch_size=4)
    ClipClassificationTrainer(
        _peft("coop", toy_tokenizer), args, CLASSES, TEMPLATES, toy_tokenizer, train_dataset=train
    ).train()
    assert seen == [0, 1, 2]


def test_padded_last_batch_keeps_real_rows_and_weights_the_loss(toy_tokenizer, tmp_path, monkeypatch):
    """Multi-process: accelerate fills the last global batch of an epoch with repeated samples; the trainer tags
    each process's last batch with (real rows, real·N/remainder) and trains on the real rows at that weight, so the
    processes' average is the 1-process loss of the partial batch (the 2-process runs: tests/test_distributed_parity)."""
    from types import SimpleNamespace

    from hf_cft.trainers.clip_trainer import PADDING_KEY

    data = _data(8)
    trainer = ClipClassificationTrainer(
        _peft("coop", toy_tokenizer), _args(tmp_path), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=data
    )
    batch = trainer.data_collator([data[i] for i in range(4)])
    real_accelerator = trainer.accelerator
    tags = []
    for rank in (0, 1, 2):  # 3 processes x 4 rows, 6 real rows in the global batch: 4 + 2 + 0
        state = SimpleNamespace(end_of_dataloader=True, remainder=6)
        trainer.accelerator = SimpleNamespace(num_processes=3, process_index=rank, gradient_state=state)
        batches, _ = trainer.get_batch_samples(iter([dict(batch)]), 1, "cpu")
        tags.append(batches[0][PADDING_KEY])
        state.end_of_dataloader = False  # not the end of an epoch: nothing tagged
        assert PADDING_KEY not in trainer.get_batch_samples(iter([dict(batch)]), 1, "cpu")[0][0]
    trainer.accelerator = real_accelerator
    assert tags == [(4, 2.0), (2, 1.0), (0, 0.0)]
    assert sum(w * 1.0 for _, w in tags) / 3 == 1.0  # the average weights every real row alike
    # the Trainer's own step (backward, GA scaling) replaced by the loss it would back-propagate
    from transformers import Trainer

    seen = []

    def step(self, model, inputs, num_items_in_batch=None):
        seen.append(int(inputs["labels"].shape[0]))
        return self.compute_loss(model, inputs)

    monkeypatch.setattr(Trainer, "training_step", step)
    trainer.model.eval()
    with torch.no_grad():
        full_two = trainer.compute_loss(trainer.model, {k: v[:2] for k, v in batch.items()})
        tagged = trainer.training_step(trainer.model, {**batch, PADDING_KEY: (2, 1.5)})
        zero = trainer.training_step(trainer.model, {**batch, PADDING_KEY: (0, 0.0)})
        plain = trainer.training_step(trainer.model, dict(batch))
    torch.testing.assert_close(tagged, 1.5 * full_two)
    assert float(zero) == 0.0 and float(plain) > 0 and trainer._padding_weight is None
    assert seen == [2, 4, 4]  # the real rows only; all rows (for the graph) when none is real; untouched
