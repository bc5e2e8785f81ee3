"""Resilience to bad input across the library: every case raises a typed error from ``hf_cft.errors`` whose
message names the offending thing (dataset, class, template, key, task, adapter, file, option), raised by hf_cft's
own code (not re-raised from deep inside torch / datasets / safetensors), and nothing returns a NaN instead.

Each case is ``(id, build, error type, message pattern)``; ``build(ctx, tmp_path)`` makes the bad call.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests_helpers import CLASSES, trainer_kwargs

import hf_cft
from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.data import few_shot, from_arrays, load_classification_dataset
from hf_cft.errors import (
    AdapterError,
    AlignmentError,
    BundleError,
    CardError,
    ClassNamesError,
    DatasetFormatError,
    DeltaError,
    FewShotError,
    HfCftError,
    HubError,
    MergeConfigError,
    NonFiniteError,
    NotCLIPLikeError,
    TaskError,
    TemplateError,
    TokenizerError,
    UnknownDatasetError,
)
from hf_cft.merging import (
    DeltaFusionMerger,
    DeltaFusionMergerConfig,
    PAMConfig,
    SemanticRouter,
    apply_delta,
    check_compatible,
    delta_from_lora,
    delta_from_models,
    prepare_pam_model,
    ties,
    validate_delta,
)
from hf_cft.models import build_zeroshot_classifier, evaluate_zeroshot
from hf_cft.testing import tiny_clip
from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer
from hf_cft.trainers.mergetune_config import MergeTuneConfigError

TEMPLATES = ["a photo of a {}."]
HF_CFT_ROOT = Path(hf_cft.__file__).resolve().parent


class Ctx:
    """Shared tiny things (built once per module)."""

    def __init__(self, tok, tmp):
        self.tok = tok
        self.tmp = tmp
        self.clip = tiny_clip()
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 255, (30, 30, 3)).astype(np.uint8) for _ in range(6)]
        self.labels = [0, 1, 2, 0, 1, 2]
        self.ds = from_arrays(self.images, self.labels, CLASSES, TEMPLATES, name="toy")

    def nan_clip(self, tower: str):
        model = tiny_clip()
        with torch.no_grad():
            if tower == "vision":
                model.vision_model.embeddings.patch_embedding.weight.fill_(float("nan"))
            else:
                model.text_model.embeddings.token_embedding.weight.fill_(float("nan"))
        return model

    def lora(self, **kw):
        return get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, **kw))

    def args(self, tmp_path, **kw):
        return ClipTrainingArguments(**trainer_kwargs(tmp_path, **kw))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from conftest import ToyTokenizer

    return Ctx(ToyTokenizer(), tmp_path_factory.mktemp("bad"))


# ------------------------------------------------------------------------------------------------ builders


def _parquet_folder(ctx, tmp_path, classnames):
    folder = tmp_path / "data"
    folder.mkdir()
    ctx.ds["train"].to_parquet(str(folder / "test.parquet"))
    (folder / "meta.json").write_text(json.dumps({"classnames": classnames, "templates": TEMPLATES}))
    return folder


def _corrupt(path: Path, at: int = 20) -> Path:
    data = bytearray(path.read_bytes())
    data[at : at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    return path


def _bundle(ctx, tmp_path):
    merger = DeltaFusionMerger()
    merger.add_task({"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}, "a")
    return merger.save_pretrained(tmp_path / "bundle")


def _full_ft_folder_with_pickle(ctx, tmp_path):
    folder = tmp_path / "ft"
    tiny_clip(seed=1).save_pretrained(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


def _lora_folder_with_bin_only(ctx, tmp_path):
    ctx.lora().save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_model.safetensors").rename(tmp_path / "lora" / "adapter_model.bin")
    return tmp_path / "lora"


def _mergetune_under_fsdp(ctx, tmp_path, monkeypatch):
    """The guard in MergeTuneTrainer (the LoRA family under FSDP: its rank-2r path point has no sharded form; full
    fine-tuning runs, tests/test_scale_out.py), with the Trainer made to believe an FSDP plugin is active."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def with_fsdp(self):
        original(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_fsdp)
    args = MergeTuneConfig(**trainer_kwargs(tmp_path, max_steps=1))
    MergeTuneTrainer(ctx.lora(), args, CLASSES, TEMPLATES, ctx.tok, finetuned=ctx.lora())


def _mergetune_lora_under_deepspeed(ctx, tmp_path, monkeypatch):
    """The same guard for the LoRA family under DeepSpeed (ZeRO-3 shards the base weights the path runs at)."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def with_deepspeed(self):
        original(self)
        self.is_deepspeed_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_deepspeed)
    ft = ctx.lora()
    ft.save_pretrained(tmp_path / "lora_ft")
    continued = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"]))
    args = MergeTuneConfig(**trainer_kwargs(tmp_path, max_steps=1))
    MergeTuneTrainer(continued, args, CLASSES, TEMPLATES, ctx.tok, finetuned=str(tmp_path / "lora_ft"))


def _mergetune_other_method(ctx, tmp_path, monkeypatch):
    vpt = get_peft_model(tiny_clip(), VPTConfig(n_tokens=2))
    vpt.save_pretrained(tmp_path / "vpt")
    continued = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"]))
    args = MergeTuneConfig(**trainer_kwargs(tmp_path, max_steps=1))
    MergeTuneTrainer(continued, args, CLASSES, TEMPLATES, ctx.tok, finetuned=str(tmp_path / "vpt"))


def _head_trainer(ctx, tmp_path, monkeypatch):
    head = get_peft_model(tiny_clip(), LinearHeadConfig(classnames=["a", "b"], init="zeros"))
    ClipClassificationTrainer(head, ctx.args(tmp_path), CLASSES, TEMPLATES, ctx.tok)


def _two_bases(ctx, tmp_path, monkeypatch):
    a = delta_from_models(ctx.clip, tiny_clip(seed=5), keys=["text_projection.weight"])
    b = delta_from_models(tiny_clip(seed=1), tiny_clip(seed=5), keys=["text_projection.weight"])
    check_compatible(a, b)


def _merger_two_bases(ctx, tmp_path, monkeypatch):
    merger = DeltaFusionMerger()
    merger.add_task(delta_from_models(ctx.clip, tiny_clip(seed=5), keys=["text_projection.weight"]), "a")
    merger.add_task(delta_from_models(tiny_clip(seed=1), tiny_clip(seed=5), keys=["text_projection.weight"]), "b")


def _duplicate_task(ctx, tmp_path, monkeypatch):
    merger = DeltaFusionMerger()
    merger.add_task({"w": torch.ones(3)}, "dtd")
    merger.add_task({"w": -torch.ones(3)}, "dtd")


def _card_nan(ctx, tmp_path, monkeypatch):
    from hf_cft.hub import adapter_card

    coop = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(ctx.tok))
    adapter_card(coop, model_name="x", dataset_name="toy", results=[{"name": "base", "accuracy": float("nan")}])


def _push_pickle(ctx, tmp_path, monkeypatch):
    from hf_cft.hub import push_folder_to_hub

    ctx.lora().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "training_args.bin").write_bytes(b"\x80\x04")
    push_folder_to_hub(tmp_path / "a", "me/a", endpoint="http://127.0.0.1:9")  # refused before any request


def _pam_corrupt(ctx, tmp_path, monkeypatch):
    from hf_cft.merging import PAMState

    model = prepare_pam_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"]))
    PAMState.from_model(model).save_pretrained(tmp_path / "pam")
    _corrupt(tmp_path / "pam" / "adapter_model.safetensors", at=0)
    PAMState.from_pretrained(tmp_path / "pam")


def _bundle_corrupt(ctx, tmp_path, monkeypatch):
    folder = _bundle(ctx, tmp_path)
    _corrupt(folder / "unified.safetensors", at=100)
    DeltaFusionMerger.from_pretrained(folder)


def L(fn):
    """A case built from a one-argument lambda of ctx (most cases need nothing else)."""
    return lambda ctx, tmp_path, monkeypatch: fn(ctx)


# ------------------------------------------------------------------------------------------------ the cases

CASES = [
    # --- data
    (
        "unknown dataset name",
        L(lambda c: load_classification_dataset("no_such_dataset")),
        UnknownDatasetError,
        "'no_such_dataset'",
    ),
    ("empty dataset", L(lambda c: from_arrays([], [], CLASSES, name="void")), DatasetFormatError, "'void' is empty"),
    (
        "empty split evaluated",
        L(lambda c: evaluate_zeroshot(c.clip, c.tok, c.ds["train"].select([]), CLASSES)),
        DatasetFormatError,
        "empty",
    ),
    (
        "missing class names (labels beyond the list)",
        L(lambda c: from_arrays(c.images[:3], [0, 1, 2], ["cat", "dog"], name="toy")),
        ClassNamesError,
        r"2 class names .* span 0\.\.2",
    ),
    (
        "empty class-name list",
        lambda c, t, m: ClipClassificationTrainer(c.clip, c.args(t), [], TEMPLATES, c.tok),
        ClassNamesError,
        "class-name list of the trainer is empty",
    ),
    (
        "class names fewer than the labels at evaluation",
        L(lambda c: evaluate_zeroshot(c.clip, c.tok, c.ds["train"], ["cat", "dog"])),
        ClassNamesError,
        "2 class names .* 3 classes",
    ),
    (
        "duplicate class names",
        L(lambda c: from_arrays(c.images[:3], [0, 1, 2], ["cat", "cat", "dog"])),
        ClassNamesError,
        "'cat' .*twice",
    ),
    (
        "duplicate class names in a dataset folder's meta.json",
        lambda c, t, m: load_classification_dataset(_parquet_folder(c, t, ["cat", "dog", "cat"])),
        ClassNamesError,
        "'cat' .*twice",
    ),
    (
        "missing split",
        lambda c, t, m: load_classification_dataset(_parquet_folder(c, t, CLASSES), splits=["val"]),
        DatasetFormatError,
        r"no split\(s\) \['val'\]",
    ),
    (
        "few-shot k larger than a class",
        L(lambda c: few_shot(c.ds["train"], k=5)),
        FewShotError,
        "'cat' .*only 2 example",
    ),
    (
        "template without a placeholder",
        L(lambda c: build_zeroshot_classifier(c.clip, c.tok, CLASSES, ["a photo"])),
        TemplateError,
        "'a photo'",
    ),
    (
        "template with two placeholders",
        L(lambda c: build_zeroshot_classifier(c.clip, c.tok, CLASSES, ["{} or {}"])),
        TemplateError,
        r"'\{\} or \{\}'",
    ),
    (
        "prompt longer than max_position_embeddings",
        L(
            lambda c: build_zeroshot_classifier(
                tiny_clip(max_position_embeddings=6), c.tok, ["sea lion"], ["a very large photo of a {}."]
            )
        ),
        TokenizerError,
        "more than the text tower's 6 positions",
    ),
    (
        "CoOp context plus class name too long",
        L(
            lambda c: get_peft_model(
                tiny_clip(max_position_embeddings=8), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(c.tok)
            ).class_text_features(c.tok, ["a very long class name"])
        ),
        AdapterError,
        "'a very long class name' do not fit",
    ),
    # --- models
    (
        "not a CLIP-like model",
        L(lambda c: evaluate_zeroshot(torch.nn.Linear(2, 2), c.tok, c.ds["train"])),
        NotCLIPLikeError,
        "Linear is not a CLIP-like",
    ),
    (
        "NaN image tower at evaluation (no NaN accuracy)",
        L(lambda c: evaluate_zeroshot(c.nan_clip("vision"), c.tok, c.ds["train"], name="toy")),
        NonFiniteError,
        "image features of dataset 'toy'",
    ),
    (
        "NaN text tower for a zero-shot head",
        L(lambda c: build_zeroshot_classifier(c.nan_clip("text"), c.tok, CLASSES, TEMPLATES)),
        NonFiniteError,
        "class 'cat'",
    ),
    # --- PEFT method configs
    ("CoOp n_ctx < 1", L(lambda c: CoOpConfig(n_ctx=0)), AdapterError, "n_ctx must be at least 1"),
    (
        "CoOp class-specific without class names",
        L(lambda c: CoOpConfig(n_ctx=2, class_specific=True)),
        AdapterError,
        "class_specific=True",
    ),
    (
        "CoOp unknown class-token position",
        L(lambda c: CoOpConfig(class_token_position="left")),
        AdapterError,
        "class_token_position",
    ),
    ("CoOp negative init_std", L(lambda c: CoOpConfig(n_ctx=2, init_std=-0.1)), AdapterError, "init_std"),
    ("VPT n_tokens < 1", L(lambda c: VPTConfig(n_tokens=0)), AdapterError, "n_tokens must be at least 1"),
    ("VPT non-positive init_range", L(lambda c: VPTConfig(init_range=-1.0)), AdapterError, "init_range"),
    ("linear head without classes", L(lambda c: LinearHeadConfig()), AdapterError, "needs num_classes"),
    (
        "linear head unknown init",
        L(lambda c: LinearHeadConfig(num_classes=3, init="xavier")),
        AdapterError,
        "init must be one of",
    ),
    ("linear head of another class count than the task", _head_trainer, AdapterError, "has 2 classes, the task 3"),
    (
        "unknown adapter name",
        L(lambda c: delta_from_lora(c.lora(), c.clip, adapter_name="nope")),
        AdapterError,
        "'nope'",
    ),
    (
        "PAM on a model without its adapters",
        L(lambda c: prepare_pam_model(c.lora())),
        AlignmentError,
        r"no adapter 'global'.*\['default'\]",
    ),
    ("PAM top_p out of range", L(lambda c: PAMConfig(top_p=0.0)), AlignmentError, "top_p"),
    # --- deltas, ConDU, routing, baselines
    (
        "delta of the wrong shape",
        L(lambda c: validate_delta({"w": torch.zeros(3)}, {"w": (2,)})),
        DeltaError,
        r"'w' .*shape \(3,\), expected \(2,\)",
    ),
    (
        "delta key the model lacks",
        L(lambda c: apply_delta(c.clip, {"nope.weight": torch.zeros(2)})),
        DeltaError,
        "'nope.weight'",
    ),
    ("deltas from mismatched base models", _two_bases, DeltaError, "different base models"),
    ("merger given a delta of another base model", _merger_two_bases, DeltaError, "task 'b' .*another base model"),
    (
        "NaN delta into ConDU",
        L(lambda c: DeltaFusionMerger().add_task({"w": torch.tensor([1.0, float("nan")])}, "t")),
        NonFiniteError,
        "'w'",
    ),
    (
        "NaN delta into TIES",
        L(lambda c: ties([{"w": torch.ones(2)}, {"w": torch.tensor([0.0, float("inf")])}])),
        NonFiniteError,
        "task 1 .*'w'",
    ),
    ("duplicate task names", _duplicate_task, TaskError, "'dtd' was already added"),
    (
        "empty task list for routing",
        L(lambda c: SemanticRouter(DeltaFusionMerger(), c.clip, c.tok).route(torch.randn(2, 16))),
        TaskError,
        "no task to route to",
    ),
    ("empty task list for merging", L(lambda c: ties([])), TaskError, "at least one task delta"),
    ("unknown task name", L(lambda c: DeltaFusionMerger().expert_delta("dtd")), TaskError, "Unknown task 'dtd'"),
    ("ConDU unknown rescaler", L(lambda c: DeltaFusionMergerConfig(rescaler="median")), MergeConfigError, "rescaler"),
    (
        "router top_k < 1",
        L(lambda c: SemanticRouter(DeltaFusionMerger(), c.clip, c.tok, top_k=0)),
        MergeConfigError,
        "top_k",
    ),
    # --- files: corrupt safetensors, pickles where safetensors are expected
    (
        "corrupt safetensors file",
        lambda c, t, m: delta_from_models(c.clip, _corrupt(_write(t / "w.safetensors"), at=0)),
        BundleError,
        "w.safetensors",
    ),
    ("corrupt ConDU bundle", _bundle_corrupt, BundleError, "unified.safetensors"),
    ("corrupt PAM state", _pam_corrupt, BundleError, "adapter_model.safetensors"),
    (
        "pickle model where safetensors are expected (deltas)",
        lambda c, t, m: delta_from_models(c.clip, _full_ft_folder_with_pickle(c, t)),
        BundleError,
        "pytorch_model.bin: hf_cft reads safetensors only",
    ),
    (
        "pickle model where safetensors are expected (loading)",
        lambda c, t, m: __import__("hf_cft.hub", fromlist=["load_model"]).load_model(
            _full_ft_folder_with_pickle(c, t)
        ),
        BundleError,
        "pytorch_model.bin: hf_cft loads safetensors only",
    ),
    (
        "pickle adapter where safetensors are expected",
        lambda c, t, m: delta_from_lora(_lora_folder_with_bin_only(c, t), c.clip),
        AdapterError,
        r"only adapter_model\.bin",
    ),
    # --- MergeTune
    (
        "MergeTune num_alphas < 1",
        lambda c, t, m: MergeTuneConfig(**trainer_kwargs(t, num_alphas=0)),
        MergeTuneConfigError,
        "num_alphas",
    ),
    (
        "MergeTune tau outside [0, 1]",
        lambda c, t, m: MergeTuneConfig(**trainer_kwargs(t, tau=1.5)),
        MergeTuneConfigError,
        "tau",
    ),
    (
        "MergeTune unknown anchor",
        lambda c, t, m: MergeTuneConfig(**trainer_kwargs(t, anchor="l1")),
        MergeTuneConfigError,
        "anchor",
    ),
    (
        "MergeTune fine-tuned adapter of another method",
        _mergetune_other_method,
        AdapterError,
        "is a HF_CFT_VPT adapter but the continued model is LORA",
    ),
    ("MergeTune LoRA under FSDP", _mergetune_under_fsdp, HfCftError, "lora family does not support FSDP: .*rank 2r"),
    ("MergeTune LoRA under DeepSpeed", _mergetune_lora_under_deepspeed, HfCftError, "lora family does not support"),
    # --- Hub and cards
    ("card with a NaN accuracy", _card_nan, CardError, "'base' .* is nan"),
    ("pickle file in a folder to push", _push_pickle, HubError, "training_args.bin"),
]


def _write(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"text_projection.weight": torch.zeros(16, 32)}, str(path))
    return path


def test_there_are_enough_cases_and_they_cover_every_error_type():
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)
    used = {c[2] for c in CASES}
    for error in (
        UnknownDatasetError,
        DatasetFormatError,
        ClassNamesError,
        TemplateError,
        FewShotError,
        TokenizerError,
        NotCLIPLikeError,
        NonFiniteError,
        AdapterError,
        AlignmentError,
        DeltaError,
        TaskError,
        MergeConfigError,
        BundleError,
        CardError,
        HubError,
        MergeTuneConfigError,
    ):
        assert error in used, error


@pytest.mark.parametrize(("build", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_typed_error_naming_the_culprit(build, error, pattern, ctx, tmp_path, monkeypatch):
    with pytest.raises(error) as info:
        result = build(ctx, tmp_path, monkeypatch)
        pytest.fail(f"no error; returned {type(result).__name__}")  # pragma: no cover
    exc = info.value
    assert isinstance(exc, HfCftError), f"{type(exc).__name__} is not an hf_cft error"
    assert re.search(pattern, str(exc)), f"message {str(exc)!r} does not match {pattern!r}"
    # raised by hf_cft's own code, not re-raised unchanged from a dependency
    raised_in = Path(info.traceback[-1].path).resolve()
    assert HF_CFT_ROOT in raised_in.parents, f"raised in {raised_in}"
