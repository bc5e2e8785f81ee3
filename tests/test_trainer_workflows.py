"""The stock ``Trainer`` workflows on hf_cft's trainers: ``push_to_hub`` / ``push_to_hub=True`` /
``create_model_card`` / ``save_model`` with hf_cft's cards (against the local fake Hub of ``tests/hub_fake.py``),
gradient checkpointing, a full fine-tune saved with its processor, ``_save`` with a gathered state dict, raw image
datasets in, trackers (``report_to``-style callbacks) and the CPU defaults."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tests_helpers import CLASSES, colour_dataset, trainer_kwargs
from transformers import TrainerCallback

from hf_cft import CoOpConfig
from hf_cft.data import from_arrays
from hf_cft.errors import CardError, DatasetFormatError, HubError
from hf_cft.testing import tiny_clip
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer

TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
JUNK = ("checkpoint-", "runs/", "training_args.bin", "optimizer", "scheduler", "rng_state", "trainer_state")


def raw_colours(n=24, seed=0, size=30):
    """Raw rows (image + label, no transform): what load_classification_dataset splits and few_shot give."""
    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    imgs = []
    for lab in labels:
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        img[..., lab] += 150
        imgs.append(img)
    return from_arrays(imgs, labels, CLASSES, TEMPLATES, name="colours")["train"]


def _perturbed(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _lora_config():
    return LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


def _build(kind, tok, tmp_path):
    """(trainer class, model, extra kwargs) for the four artefact kinds of the issue."""
    if kind == "coop":
        return ClipClassificationTrainer, get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(tok)), {}
    if kind == "full":
        return ClipClassificationTrainer, tiny_clip(), {}
    if kind == "mergetune_coop":
        ft = _perturbed(get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok)), 3)
        ft.save_pretrained(tmp_path / "coop_ft")
        continued = get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok))
        return MergeTuneTrainer, continued, {"finetuned": str(tmp_path / "coop_ft")}
    ft = _perturbed(get_peft_model(tiny_clip(), _lora_config()), 4, scale=0.05)
    ft.save_pretrained(tmp_path / "lora_ft")
    continued = get_peft_model(tiny_clip(), _lora_config())
    return MergeTuneTrainer, continued, {"finetuned": str(tmp_path / "lora_ft")}


def _args(kind, tmp_path, **kw):
    cls = MergeTuneConfig if kind.startswith("mergetune") else ClipTrainingArguments
    extra = {"anchor_weight": 1e-2, "tau": 0.5} if kind == "mergetune_lora" else {}
    return cls(**trainer_kwargs(tmp_path, **{"max_steps": 2, "hub_token": "hf_fake", **extra, **kw}))


def _meta(text):
    card = ModelCard(text.decode() if isinstance(text, bytes) else str(text), ignore_metadata_errors=False)
    return card, card.data.to_dict()


def _metrics(meta):
    (entry,) = meta["model-index"]
    return {(r["dataset"]["name"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}


EXPECTED = {
    "coop": ("peft", {"coop", "prompt-learning"}, {"adapter_config.json", "adapter_model.safetensors"}),
    "mergetune_coop": ("peft", {"mergetune", "coop"}, {"adapter_config.json", "adapter_model.safetensors"}),
    "mergetune_lora": ("peft", {"mergetune", "lora"}, {"adapter_config.json", "adapter_model.safetensors"}),
    "full": ("transformers", {"full-fine-tuning"}, {"config.json", "model.safetensors"}),
}


@pytest.mark.parametrize("kind", ["coop", "mergetune_coop", "mergetune_lora", "full"])
def test_push_to_hub_uploads_exactly_the_artefact_and_our_card(kind, hub, toy_tokenizer, tmp_path):
    cls, model, extra = _build(kind, toy_tokenizer, tmp_path)
    args = _args(kind, tmp_path, push_to_hub=True, hub_model_id=f"me/{kind}", hub_strategy="end")
    evals = {"base": raw_colours(12, 1), "novel": raw_colours(12, 2)}
    trainer = cls(model, args, CLASSES, TEMPLATES, toy_tokenizer, train_dataset=raw_colours(), **extra)
    assert hub.requests == []  # push_to_hub=True creates nothing on the Hub at construction
    trainer.train()
    base, novel = (trainer.evaluate(evals[k], metric_key_prefix=f"eval_{k}")[f"eval_{k}_accuracy"] for k in evals)
    assert hub.requests == []
    trainer.push_to_hub(dataset_name="colours")

    files = hub.files(f"me/{kind}")
    library, tags, weights = EXPECTED[kind]
    assert weights | {"README.md"} <= set(files)
    assert not [f for f in files if any(j in f for j in JUNK)]
    assert all(not f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    card, meta = _meta(files["README.md"])
    assert meta["library_name"] == library
    assert {"hf_cft", "clip"} | tags <= set(meta["tags"])
    metrics = _metrics(meta)
    assert {n for n, m in metrics if m == "accuracy"} == {"colours (base)", "colours (novel)"}  # the last evaluation
    assert str(tmp_path) not in card.text
    assert metrics[("colours (base)", "accuracy")] == pytest.approx(base, abs=1e-3)
    assert metrics[("colours (novel)", "accuracy")] == pytest.approx(novel, abs=1e-3)
    assert "| learning rate | 0.05 |" in card.text and "| steps trained | 2 |" in card.text
    assert "More Information Needed" not in card.text
    if kind.startswith("mergetune"):
        assert "| λ (anchor_weight) |" in card.text and "| β (path_weight) | 0.5 |" in card.text
        hm = 2 * base * novel / (base + novel) if base + novel else 0.0
        assert metrics[("colours (base-to-novel)", "hm")] == pytest.approx(hm, abs=1e-3)
        assert f"a local adapter folder (`{kind.split('_')[1]}_ft`)" in card.text  # ŵ2 named, not its path
    if kind == "coop":
        assert "| n_ctx | 4 |" in card.text
    # the pushed weights are the trained model's
    pushed = {k: v for k, v in files.items() if k.endswith(".safetensors")}
    ((name, blob),) = pushed.items()
    from safetensors.torch import load as load_bytes

    tensors = load_bytes(blob)
    own = (
        trainer.clip_model.state_dict()
        if kind == "full"
        else __import__("peft").get_peft_model_state_dict(trainer.clip_model)
    )
    assert set(tensors) == set(own)
    for k in tensors:
        torch.testing.assert_close(tensors[k], own[k].cpu())
    # the card written locally is the one pushed
    assert (tmp_path / "out" / "README.md").read_bytes() == files["README.md"]


def test_push_to_hub_true_pushes_every_save_without_checkpoint_files(hub, toy_tokenizer, tmp_path):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    args = _args("coop", tmp_path, push_to_hub=True, hub_model_id="me/every", save_strategy="steps", save_steps=1)
    trainer = ClipClassificationTrainer(model, args, CLASSES, TEMPLATES, toy_tokenizer, train_dataset=colour_dataset())
    trainer.train()
    commits = [c for c in hub.commits if c["repo"] == "me/every"]
    assert [c["header"]["summary"] for c in commits] == [
        "Training in progress, step 1",
        "Training in progress, step 2",
    ]
    for commit in commits:
        assert set(commit["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert (tmp_path / "out" / "checkpoint-2" / "optimizer.pt").is_file()  # resumable locally, never published


def test_hub_problems_fail_before_any_request(hub, toy_tokenizer, tmp_path):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    args = _args("coop", tmp_path, push_to_hub=True, hub_model_id="me/x", hub_strategy="checkpoint")
    with pytest.raises(HubError, match="hub_strategy='checkpoint'.*every_save"):
        ClipClassificationTrainer(model, args, CLASSES, TEMPLATES, toy_tokenizer)
    trainer = ClipClassificationTrainer(model, _args("coop", tmp_path), CLASSES, TEMPLATES, toy_tokenizer)
    trainer.args.hub_model_id = "me/x"
    trainer.state.log_history.append({"eval_accuracy": float("nan"), "step": 0})  # a card the Hub would reject
    with pytest.raises(CardError, match="finite"), pytest.warns(UserWarning, match="no model card written"):
        trainer.push_to_hub()
    assert hub.requests == []


def test_save_model_and_create_model_card_write_our_card(toy_tokenizer, tmp_path):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    trainer = ClipClassificationTrainer(
        model,
        _args("coop", tmp_path),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        train_dataset=colour_dataset(),
        eval_dataset=colour_dataset(12, 1),
        dataset_name="colours",
    )
    trainer.train()
    acc = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(tmp_path / "final")
    card, meta = _meta((tmp_path / "final" / "README.md").read_text())
    assert meta["library_name"] == "peft" and "coop" in meta["tags"]
    assert _metrics(meta)[("colours (eval)", "accuracy")] == pytest.approx(acc, abs=1e-3)
    assert "More Information Needed" not in card.text
    assert not (tmp_path / "final" / "training_args.bin").exists()
    assert not list((tmp_path / "final").glob(".hf_cft_save_*"))  # the staging folder is gone
    PeftModel.from_pretrained(tiny_clip(), tmp_path / "final")  # still a PEFT adapter folder

    written = trainer.create_model_card(license="mit", tags=["my-tag"], results_note="Measured on 12 images.")
    _, meta2 = _meta((tmp_path / "out" / "README.md").read_text())
    assert meta2["license"] == "mit" and "my-tag" in meta2["tags"] and "coop" in meta2["tags"]
    assert "Measured on 12 images." in str(written)


@pytest.mark.parametrize("kind", ["coop", "lora", "full"])
def test_gradient_checkpointing_trains_as_without(kind, toy_tokenizer, tmp_path):
    results = []
    for gc in (False, True):
        model = {
            "coop": lambda: get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer)),
            "lora": lambda: get_peft_model(tiny_clip(), _lora_config()),
            "full": lambda: tiny_clip(),
        }[kind]()
        args = _args("x", tmp_path / str(gc), activation_checkpointing=gc)
        trainer = ClipClassificationTrainer(
            model, args, CLASSES, TEMPLATES, toy_tokenizer, train_dataset=colour_dataset()
        )
        trainer.train()
        base = model.get_base_model() if kind != "full" else model
        assert base.is_activation_checkpointing == gc
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys() and results[0]
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-5, rtol=1e-4)


def _demo_model():
    from hf_cft.recipe_utils import demo_clip

    prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    return demo_clip(prompts, image_size=32)


def test_full_finetune_saves_processor_and_reloads(tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    model, tok = _demo_model()
    trainer = ClipClassificationTrainer(
        model, _args("full", tmp_path, max_steps=1), CLASSES, TEMPLATES, tok, train_dataset=raw_colours(size=32)
    )
    trainer.train()
    trainer.save_model(tmp_path / "full")
    folder = tmp_path / "full"
    reloaded = CLIPModel.from_pretrained(folder)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v)
    from hf_cft.data import model_transform

    tf = model_transform(reloaded)  # a reloaded model's raw datasets get the saved processor's transform
    assert (tf.size, tf.crop_size) == (32, 32) and tf.mean == trainer.image_transform().mean
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, CLIPProcessor)
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    assert (
        AutoTokenizer.from_pretrained(folder)("a photo of a cat.")["input_ids"]
        == tok("a photo of a cat.")["input_ids"]
    )
    _, meta = _meta((folder / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "full-fine-tuning" in meta["tags"]
    # the card's loading snippet runs on the saved folder
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/model", str(folder))
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own snippet
    assert scope["head"].shape == (len(CLASSES), model.config.projection_dim)


@pytest.mark.parametrize("kind", ["coop", "full"])
def test_save_writes_the_gathered_state_dict(kind, toy_tokenizer, tmp_path):
    """FSDP FULL_STATE_DICT / ZeRO-3: the Trainer gathers ``trainer.model``'s state and passes it to ``_save``; those
    tensors are written (this process's own parameters may be shards)."""
    from peft import get_peft_model_state_dict

    cls, model, _ = _build(kind, toy_tokenizer, tmp_path)
    trainer = cls(model, _args(kind, tmp_path), CLASSES, TEMPLATES, toy_tokenizer)
    gathered = {k: v + 1.0 if v.is_floating_point() else v for k, v in trainer.model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer._save(str(tmp_path / "saved"), state_dict=gathered)
    if kind == "full":
        written, expected = load_file(tmp_path / "saved" / "model.safetensors"), gathered
        expected = {k[len("model.") :]: v for k, v in expected.items()}
    else:
        written = load_file(tmp_path / "saved" / "adapter_model.safetensors")
        expected = get_peft_model_state_dict(model, state_dict={k[len("model.") :]: v for k, v in gathered.items()})
    assert set(written) == set(expected) and written
    for k in written:
        torch.testing.assert_close(written[k], expected[k])
    for k, v in model.state_dict().items():  # the model itself is untouched
        torch.testing.assert_close(v, before[k])


def test_raw_datasets_are_transformed_and_trained(toy_tokenizer, tmp_path):
    from hf_cft.data.transforms import _ImageBatchTransform

    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    train, test = raw_colours(24, 0), raw_colours(12, 1)
    trainer = ClipClassificationTrainer(
        model, _args("coop", tmp_path), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=train, eval_dataset=test
    )
    fn = trainer.train_dataset.format["format_kwargs"]["transform"]
    assert isinstance(fn, _ImageBatchTransform) and fn.transform.train and fn.transform.seed == 0
    assert trainer.eval_dataset.format["format_kwargs"]["transform"].transform.train is False
    trainer.train()
    raw_eval = trainer.evaluate(test)
    # the same numbers as the dataset transformed by hand with the model's evaluation transform
    from hf_cft.data import apply_image_transform, model_transform

    by_hand = trainer.evaluate(apply_image_transform(test, model_transform(model)))
    assert raw_eval["eval_accuracy"] == by_hand["eval_accuracy"]
    assert raw_eval["eval_loss"] == pytest.approx(by_hand["eval_loss"], rel=1e-6)
    assert trainer.evaluate({"a": test, "b": test})["eval_b_accuracy"] == by_hand["eval_accuracy"]
    assert trainer.predict(test).predictions.shape == (12, 3)


def test_bad_datasets_are_typed_errors_before_any_work(toy_tokenizer, tmp_path):
    import datasets

    from hf_cft.data import ClassificationDataset

    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    no_image = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DatasetFormatError, match=r"train_dataset .*no image column.*apply_image_transform"):
        ClipClassificationTrainer(
            model, _args("coop", tmp_path), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=no_image
        )
    no_label = raw_colours(6).remove_columns("label")
    with pytest.raises(DatasetFormatError, match="no label column"):
        ClipClassificationTrainer(
            model, _args("coop", tmp_path), CLASSES, TEMPLATES, toy_tokenizer, eval_dataset=no_label
        )
    whole = ClassificationDataset("colours", datasets.DatasetDict({"train": raw_colours(6)}), CLASSES, TEMPLATES)
    with pytest.raises(DatasetFormatError, match=r"pass one split, e.g. ds\['train'\]"):
        ClipClassificationTrainer(
            model, _args("coop", tmp_path), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=whole
        )
    wrong_labels = from_arrays([np.zeros((8, 8, 3), np.uint8)] * 5, [0, 1, 2, 3, 4], list("abcde"), TEMPLATES)["train"]
    with pytest.raises(DatasetFormatError, match="label 4 but the trainer has 3 class names"):
        ClipClassificationTrainer(
            model, _args("coop", tmp_path), CLASSES, TEMPLATES, toy_tokenizer, train_dataset=wrong_labels
        )
    trainer = ClipClassificationTrainer(model, _args("coop", tmp_path), CLASSES, TEMPLATES, toy_tokenizer)
    with pytest.raises(DatasetFormatError, match="eval_dataset"):
        trainer.evaluate(no_image)


def test_mergetune_takes_raw_few_shot_rows(toy_tokenizer, tmp_path):
    """The README's MergeTune example: few-shot rows straight from few_shot(...), Fisher on their eval view."""
    from hf_cft.data import few_shot

    cls, model, extra = _build("mergetune_coop", toy_tokenizer, tmp_path)
    shots = few_shot(raw_colours(30), 4)
    args = _args("mergetune_coop", tmp_path, anchor="fisher")
    trainer = cls(model, args, CLASSES, TEMPLATES, toy_tokenizer, train_dataset=shots, **extra)
    assert trainer.fisher_info["images"] == 12
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs, self.began = [], False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.began = model is not None

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_trackers_get_the_logs(toy_tokenizer, tmp_path):
    """What a report_to integration sees (tensorboard is not installed here): a TrainerCallback gets the model at
    train start and every log, with the trainer's own metrics."""
    recorder = _Recorder()
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    trainer = ClipClassificationTrainer(
        model,
        _args("coop", tmp_path, eval_strategy="steps", eval_steps=2),
        CLASSES,
        TEMPLATES,
        toy_tokenizer,
        train_dataset=colour_dataset(),
        eval_dataset=colour_dataset(12, 1),
        callbacks=[recorder],
    )
    trainer.train()
    assert recorder.began
    assert any("loss" in log and "train_accuracy" in log for log in recorder.logs)
    assert any("eval_loss" in log and "eval_accuracy" in log for log in recorder.logs)


def test_cpu_runs_do_not_pin_memory(tmp_path):
    args = ClipTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.dataloader_pin_memory is False
    assert dataclasses.replace(args).dataloader_pin_memory is False


def test_card_hyperparameters_are_json_friendly(toy_tokenizer, tmp_path):
    cls, model, extra = _build("mergetune_lora", toy_tokenizer, tmp_path)
    trainer = cls(model, _args("mergetune_lora", tmp_path), CLASSES, TEMPLATES, toy_tokenizer, **extra)
    hp = trainer.card_hyperparameters()
    assert hp["family"] == "lora" and hp["anchor"] == "sq_l2" and hp["target_modules"] == "q_proj, v_proj"
    json.dumps(hp)


def test_a_cpu_training_script_prints_no_library_warnings(tmp_path):
    """In a user's process (not under pytest's warning capture): get_peft_model on a CLIP and a CPU training run
    show neither PEFT's is_gradient_checkpointing FutureWarning nor torch's pin_memory warning."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import ToyTokenizer
from tests_helpers import CLASSES, colour_dataset
from peft import get_peft_model
from hf_cft import CoOpConfig
from hf_cft.testing import tiny_clip
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments
tok = ToyTokenizer()
model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2).set_tokenizer(tok))
args = ClipTrainingArguments(output_dir={str(tmp_path)!r}, max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", disable_tqdm=True)
ClipClassificationTrainer(model, args, CLASSES, ["a photo of a {{}}."], tok, train_dataset=colour_dataset(8)).train()
"""
    out = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert "is_gradient_checkpointing" not in out.stderr
    assert "pin_memory" not in out.stderr


# ------------------------------------------------------------------------------------------------ recipe checkpoints

PRETRAIN_C = "accelerate launch recipes/pretrain_clip.py --config recipes/configs/pretrain_clip_described.yaml"


def test_resolve_checkpoint_names_the_pretraining_command(tmp_path, monkeypatch):
    from hf_cft.errors import MissingCheckpointError
    from hf_cft.recipe_utils import pretrain_command, resolve_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MissingCheckpointError, match=f"build it with `{PRETRAIN_C}`"):
        resolve_checkpoint("~/.cache/hf_cft/benchmark-clip-described/model")
    with pytest.raises(
        MissingCheckpointError, match="--max_steps 150 --output_dir ~/.cache/hf_cft/benchmark-clip-web-quick"
    ):
        resolve_checkpoint(str(tmp_path / ".cache/hf_cft/benchmark-clip-web-quick/model"))
    with pytest.raises(MissingCheckpointError, match="does not exist"):
        resolve_checkpoint("~/elsewhere/model")
    assert resolve_checkpoint("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"  # a Hub id
    (tmp_path / "m").mkdir()
    assert resolve_checkpoint("~/m") == str(tmp_path / "m")
    assert pretrain_command("C") == PRETRAIN_C


@pytest.mark.parametrize("recipe", ["condu", "pam"])
def test_recipe_configs_without_their_checkpoint_fail_in_one_line(recipe, tmp_path, monkeypatch):
    """recipes/configs/{condu,pam}.yaml name the project's pretrained CLIP: before it is built, the recipe stops in
    one line naming the command that builds it (pretraining is ~1 hour on a CPU: not started implicitly)."""
    from pathlib import Path

    from tests_helpers import load_recipe

    from hf_cft.continual import ContinualConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    rec = load_recipe(recipe)
    cls = rec.ConDURecipeArguments if recipe == "condu" else rec.PAMRecipeArguments
    config_file = Path(__file__).resolve().parents[1] / "recipes" / "configs" / f"{recipe}.yaml"
    args, config = rec.parse_recipe_args(
        cls, ContinualConfig, args=["--config", str(config_file)], defaults=rec.RECIPE_DEFAULTS
    )
    with pytest.raises(SystemExit, match=f"has not been pretrained yet: build it with `{PRETRAIN_C}`") as exc:
        rec.main(args, config)
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_condu_config_without_its_checkpoint_as_a_user_runs_it(tmp_path):
    """``python recipes/condu.py --config recipes/configs/condu.yaml``: exit status 1, one line on stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "recipes/condu.py", "--config", "recipes/configs/condu.yaml"],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and PRETRAIN_C in lines[0], out.stderr


@pytest.mark.data
def test_shared_dataset_splits_and_few_shot_rows_go_straight_in(shared_data, toy_tokenizer, tmp_path):
    """Rows as load_classification_dataset / few_shot give them (an encoded Image column): trained and evaluated
    without a transform call, with the model's image size."""
    from hf_cft.data import few_shot, load_classification_dataset

    ds = load_classification_dataset("flowers5", data_dir=str(shared_data))
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    trainer = ClipClassificationTrainer(
        model,
        _args("coop", tmp_path, max_steps=1),
        ds.classnames,
        ds.templates,
        toy_tokenizer,
        train_dataset=few_shot(ds["train"], 2),
        dataset_name=ds.name,
    )
    trainer.train()
    metrics = trainer.evaluate(ds["test"].select(range(10)))
    assert 0.0 <= metrics["eval_accuracy"] <= 100.0 and np.isfinite(metrics["eval_loss"])


def test_adapter_folder_loads_with_auto_peft_model(tmp_path):
    """A trainer-saved LoRA adapter on CLIP loads with PEFT's AutoPeftModel (no tokenizer beside the adapter: PEFT
    would resize the base model's token embeddings through get_input_embeddings, which CLIPModel lacks)."""
    from peft import AutoPeftModel, LoraConfig, get_peft_model

    base, tok = _demo_model()
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainer = ClipClassificationTrainer(
        lora, _args("lora", tmp_path, max_steps=1), CLASSES, TEMPLATES, tok, train_dataset=raw_colours(size=32)
    )
    trainer.save_model(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer_config.json").exists()
    again = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    for k, v in lora.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)
