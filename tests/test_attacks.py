"""The attack suite (issue 16): bad inputs and faults at every door of hf_cft — loading, numeric options, tensors
from outside, images, templates, labels, the command line's outputs — each asserting either a typed error
(:class:`~hf_cft.errors.HfCftError`) whose message names the culprit, or a correct result.

Three tables, one parametrised test each:

- ``ERRORS``: ``(id, build, error type, message pattern)``; ``build(a, tmp_path, monkeypatch)`` makes the bad call.
- ``RESULTS``: ``(id, build)``; ``build`` returns nothing and asserts the correct result itself.
- ``CLI``: ``(id, argv builder, message pattern, check)``: ``hf-cft`` exits non-zero with ONE stderr line matching
  the pattern (never a traceback), and ``check`` asserts that no input and no previous output was harmed.

``python -m pytest tests/test_attacks.py -q -rA`` prints one line per case; ``test_attack_counts`` prints the
tally (tried / typed error naming the culprit / correct result) that the issue asks for.
"""

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tests_helpers import CLASSES, trainer_kwargs

import hf_cft
from hf_cft import CoOpConfig
from hf_cft.cli import main
from hf_cft.data import ImageTransform, few_shot, from_arrays, load_classification_dataset, split_per_class
from hf_cft.data.templates import format_prompts, validate_templates
from hf_cft.data.transforms import decode_image
from hf_cft.errors import (
    AdapterError,
    BundleError,
    ClassNamesError,
    ContinualError,
    DatasetFormatError,
    HfCftError,
    ImageDecodeError,
    MergeConfigError,
    NonFiniteError,
    OptionError,
    TemplateError,
    TokenizerError,
)
from hf_cft.hub import load_adapter_model, load_model
from hf_cft.merging import DeltaFusionMerger, apply_delta, baselines, delta_from_lora, delta_from_models
from hf_cft.recipe_utils import demo_clip
from hf_cft.testing import tiny_clip
from hf_cft.trainers.mergetune_config import MergeTuneConfig, MergeTuneConfigError

TEMPLATES = ["a photo of a {}.", "a {} thing."]
HF_CFT_ROOT = Path(hf_cft.__file__).resolve().parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------------------------------------ assets


def _model():
    prompts = [t.format(c) for c in CLASSES for t in TEMPLATES] + [f"X X X X {c}." for c in CLASSES]
    return demo_clip(prompts, image_size=16, seed=0)


def _colour_images(n=12, seed=0, size=30):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        img[..., i % 3] += 150
        images.append(img)
        labels.append(i % 3)
    return images, labels


@pytest.fixture(scope="module")
def a(tmp_path_factory):
    """Saved artefacts the attacks start from (never modified: each attack copies what it damages)."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("attack")
    a = {"root": root}
    model, tok = _model()
    a["tok"] = tok
    a["model"] = root / "clip"
    model.save_pretrained(a["model"])
    tok.save_pretrained(a["model"])
    images, labels = _colour_images()
    data = root / "colours"
    data.mkdir()
    ds = from_arrays(images, labels, CLASSES, TEMPLATES, name="colours")["train"]
    ds.to_parquet(str(data / "test.parquet"))
    (data / "meta.json").write_text(json.dumps({"classnames": CLASSES, "templates": TEMPLATES}))
    a["data"] = data

    def base():
        return AutoModel.from_pretrained(a["model"]).eval()

    a["base"] = base
    torch.manual_seed(1)
    coop = get_peft_model(base(), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(tok))
    coop.save_pretrained(root / "coop")
    a["coop"] = root / "coop"
    lora = get_peft_model(base(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    a["lora"] = root / "lora"
    full = base()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for n, p in full.named_parameters():
            if n != "logit_scale":
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    full.save_pretrained(root / "full")
    a["full"] = root / "full"
    merger = DeltaFusionMerger(base_model=base())
    for t, name in enumerate(["task_a", "task_b"]):
        other = base()
        with torch.no_grad():
            other.text_projection.weight.add_(0.1 * (t + 1))
        merger.add_task(delta_from_models(base(), other, keys=["text_projection.weight"]), name)
    merger.save_pretrained(root / "bundle")
    a["bundle"] = root / "bundle"
    return a


def _copy(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    dst = tmp_path / (name or src.name)
    shutil.copytree(src, dst)
    return dst


def _edit_safetensors(path: Path, edit) -> Path:
    tensors = load_file(str(path))
    save_file(edit(dict(tensors)), str(path), metadata={"format": "pt"})
    return path


def _edit_json(path: Path, edit) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _drop(prefix):
    return lambda t: {k: v for k, v in t.items() if not k.startswith(prefix)}


def _rename_first(t):
    k = sorted(t)[0]
    t[k + "_renamed"] = t.pop(k)
    return t


# ------------------------------------------------------------------------------------------------ 1. loading


def _model_missing_vision(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    _edit_safetensors(folder / "model.safetensors", _drop("vision_model."))
    return load_model(folder)


def _model_unexpected_key(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    _edit_safetensors(folder / "model.safetensors", lambda t: {**t, "stray.weight": torch.zeros(2)})
    return load_model(folder)


def _model_int_weight(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    _edit_safetensors(
        folder / "model.safetensors",
        lambda t: {**t, "text_projection.weight": t["text_projection.weight"].to(torch.int32)},
    )
    return load_model(folder)


def _model_empty_weights(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    save_file({}, str(folder / "model.safetensors"))
    return load_model(folder)


def _sharded(a, tmp, weight_map_edit):
    folder = _copy(a["model"], tmp)
    keys = list(load_file(str(folder / "model.safetensors")))
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model.safetensors")}
    weight_map_edit(index["weight_map"], folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _index_to_pickle(a, tmp, mp):
    def edit(wm, folder):
        torch.save({"text_projection.weight": torch.zeros(16, 32)}, folder / "pytorch_model.bin")
        wm["text_projection.weight"] = "pytorch_model.bin"

    folder = _sharded(a, tmp, edit)
    loaded = []
    mp.setattr(torch, "load", lambda *a_, **k: loaded.append(a_) or {})
    try:
        return load_model(folder)
    finally:
        assert not loaded, "torch.load was called"


def _index_dotdot(a, tmp, mp):
    def edit(wm, folder):
        shutil.copy(folder / "model.safetensors", tmp / "outside.safetensors")
        for k in wm:
            wm[k] = "../outside.safetensors"

    return load_model(_sharded(a, tmp, edit))


def _index_missing_file(a, tmp, mp):
    def edit(wm, folder):
        wm["text_projection.weight"] = "model-00002-of-00002.safetensors"

    return load_model(_sharded(a, tmp, edit))


def _index_not_json_object(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    return load_model(folder)


def _model_symlink_outside(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    outside = tmp / "elsewhere.safetensors"
    os.replace(folder / "model.safetensors", outside)
    os.symlink(outside, folder / "model.safetensors")
    return load_model(folder)


def _delta_index_to_pickle(a, tmp, mp):
    def edit(wm, folder):
        torch.save({"text_projection.weight": torch.zeros(16, 32)}, folder / "pytorch_model.bin")
        wm["text_projection.weight"] = "pytorch_model.bin"

    return delta_from_models(a["model"], _sharded(a, tmp, edit))


def _delta_index_dotdot(a, tmp, mp):
    def edit(wm, folder):
        shutil.copy(folder / "model.safetensors", tmp / "outside.safetensors")
        wm["text_projection.weight"] = "../outside.safetensors"

    return delta_from_models(a["model"], _sharded(a, tmp, edit))


def _adapter(a, tmp, which, edit):
    folder = _copy(a[which], tmp)
    _edit_safetensors(folder / "adapter_model.safetensors", edit)
    return load_adapter_model(a["base"](), folder)


def _adapter_symlink(a, tmp, mp):
    folder = _copy(a["coop"], tmp)
    other = _copy(a["lora"], tmp, "other")
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(other / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    return load_adapter_model(a["base"](), folder)


def _adapter_nan_context(a, tmp, mp):
    return _adapter(a, tmp, "coop", lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()})


def _coop_other_base(a, tmp, mp):
    """A CoOp trained on another base model of the same shape: the README promises AdapterError."""
    other, tok = demo_clip(
        [t.format(c) for c in CLASSES for t in TEMPLATES] + [f"X X X X {c}." for c in CLASSES], image_size=16, seed=9
    )
    other.save_pretrained(tmp / "other_clip")
    coop = get_peft_model(
        load_model(tmp / "other_clip"), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(a["tok"])
    )
    coop.save_pretrained(tmp / "coop_other")
    return load_adapter_model(a["base"](), tmp / "coop_other")


def _bundle_edit(a, tmp, edit, rehash=False):
    """Edit a saved bundle's manifest; ``rehash``: also recompute its own checksum (the edit then has to be caught
    by what it breaks, not by the checksum)."""
    from hf_cft.merging.condu import MANIFEST_CHECKSUM, _manifest_digest

    folder = _copy(a["bundle"], tmp)

    def edit_and_hash(m):
        edit(m)
        if rehash and MANIFEST_CHECKSUM in m:
            m[MANIFEST_CHECKSUM] = _manifest_digest(m)

    _edit_json(folder / "manifest.json", edit_and_hash)
    return DeltaFusionMerger.from_pretrained(folder)


def _set_lam(m):
    m["tasks"][0]["lam"] = 1e30


def _files_empty(m):
    m["files"] = {}


def _files_one_missing(m):
    m["files"].pop("masks.safetensors")


def _no_checksum(m):
    m.pop("manifest_sha256", None)


def _files_missing(m):
    m.pop("files")


def _set_classnames(m):
    m["tasks"][0]["classnames"] = ["x"]


def _lora_config(a, tmp, edit):
    folder = _copy(a["lora"], tmp)
    _edit_json(folder / "adapter_config.json", edit)
    return delta_from_lora(folder, a["base"]())


def _load_lora_config(a, tmp, edit):
    folder = _copy(a["lora"], tmp)
    _edit_json(folder / "adapter_config.json", edit)
    return load_adapter_model(a["base"](), folder)


# ------------------------------------------------------------------------------------------------ 2. finiteness


def _mt(**kw):
    return lambda a, tmp, mp: MergeTuneConfig(**trainer_kwargs(tmp, **kw))


def _deltas(n=2, nan=False):
    g = torch.Generator().manual_seed(0)
    out = [{"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(n)]
    if nan:
        out[1]["b"][2] = float("nan")
    return out


def _apply(scale):
    def build(a, tmp, mp):
        model = tiny_clip()
        return apply_delta(model, {"text_projection.weight": torch.ones(16, 32)}, scale=scale)

    return build


def _eval_with(a, mutate=None, head=None, tok=None):
    from hf_cft.models import evaluate_zeroshot

    model = a["base"]()
    if mutate is not None:
        mutate(model)
    ds = load_classification_dataset(str(a["data"]))
    return evaluate_zeroshot(
        model, tok or a["tok"], ds, transform=ImageTransform(size=16, crop_size=16), head=head, batch_size=16
    )


def _nan_logit_scale(m):
    with torch.no_grad():
        m.logit_scale.fill_(float("nan"))


def _inf_logit_scale(m):
    with torch.no_grad():
        m.logit_scale.fill_(float("inf"))


def _nan_coop_eval(a, tmp, mp):
    peft = _adapter_nan_context.__wrapped__(a, tmp) if hasattr(_adapter_nan_context, "__wrapped__") else None
    folder = _copy(a["coop"], tmp)
    from peft import PeftModel

    peft = PeftModel.from_pretrained(a["base"](), str(folder))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "ctx" in n or "coop" in n.lower():
                p.fill_(float("nan"))
    head = peft.class_text_features(a["tok"], CLASSES)
    return _eval_with(a, head=head)


def _mergetune_nan_finetuned(a, tmp, mp):
    from hf_cft.trainers import MergeTuneTrainer

    folder = _copy(a["coop"], tmp)
    _edit_safetensors(folder / "adapter_model.safetensors", lambda t: {k: v * float("nan") for k, v in t.items()})
    cont = get_peft_model(a["base"](), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(a["tok"]))
    args = MergeTuneConfig(**trainer_kwargs(tmp, max_steps=1))
    return MergeTuneTrainer(cont, args, CLASSES, TEMPLATES, a["tok"], finetuned=str(folder))


def _mergetune_ft_edit(a, tmp, edit):
    """MergeTune with a fine-tuned CoOp folder whose weights file was edited (PEFT would only warn)."""
    from hf_cft.trainers import MergeTuneTrainer

    folder = _copy(a["coop"], tmp)
    _edit_safetensors(folder / "adapter_model.safetensors", edit)
    cont = get_peft_model(a["base"](), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(a["tok"]))
    args = MergeTuneConfig(**trainer_kwargs(tmp, max_steps=1))
    return MergeTuneTrainer(cont, args, CLASSES, TEMPLATES, a["tok"], finetuned=str(folder))


def _mergetune_lora_ft_missing(a, tmp, mp):
    from hf_cft.trainers import MergeTuneTrainer

    folder = _copy(a["lora"], tmp)
    _edit_safetensors(
        folder / "adapter_model.safetensors", lambda t: {k: v for k, v in t.items() if "v_proj" not in k}
    )
    cont = get_peft_model(a["base"](), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    args = MergeTuneConfig(**trainer_kwargs(tmp, max_steps=1))
    return MergeTuneTrainer(cont, args, CLASSES, TEMPLATES, a["tok"], finetuned=str(folder))


def _train_until_nan(a, tmp, mp):
    """SGD with a learning rate of 1e30 makes the weights inf after one step: the next loss is NaN."""
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments

    ds = load_classification_dataset(str(a["data"]))
    from hf_cft.data import apply_image_transform

    train = apply_image_transform(ds["test"], ImageTransform(size=16, crop_size=16))
    coop = get_peft_model(a["base"](), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(a["tok"]))
    args = ClipTrainingArguments(**trainer_kwargs(tmp, max_steps=4, learning_rate=1e30, per_device_train_batch_size=4))
    trainer = ClipClassificationTrainer(coop, args, CLASSES, TEMPLATES, a["tok"], train_dataset=train)
    return trainer.train()


def _nan_image(a, tmp, mp):
    arr = np.full((8, 8, 3), 0.5, dtype=np.float32)
    arr[2, 3, 1] = float("nan")
    return decode_image(arr, source="dataset 'nanny'")


def _wise_alpha_overflow(a, tmp, mp):
    return baselines.wise_ft({"w": torch.full((3,), 1e10)}, alpha=1e308)


# ------------------------------------------------------------------------------------------------ 4. validation


def _from_arrays(templates=TEMPLATES, classnames=CLASSES, labels=None):
    images, labs = _colour_images(6, size=8)
    return from_arrays(images, labels if labels is not None else labs, classnames, templates, name="toy")


def _parquet_labels(a, tmp, bad):
    import datasets

    images, labels = _colour_images(6, size=8)
    labels[2] = bad
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0] * 6}, features=features)
    # write raw ints outside the names: ClassLabel does not check values when a table is built from Arrow data
    table = ds.data.table.set_column(1, "label", __import__("pyarrow").array(labels, type="int64"))
    folder = tmp / "bad_labels"
    folder.mkdir()
    import pyarrow.parquet as pq

    meta = ds.features.arrow_schema.metadata
    pq.write_table(table.replace_schema_metadata(meta), str(folder / "test.parquet"))
    return folder


def _load_bad_labels(bad):
    return lambda a, tmp, mp: load_classification_dataset(str(_parquet_labels(a, tmp, bad)))


def _meta(a, tmp, meta):
    folder = _copy(a["data"], tmp)
    (folder / "meta.json").write_text(json.dumps(meta))
    return load_classification_dataset(str(folder))


def _toy_ds():
    return _from_arrays()["train"]


def _tokenizer_beyond_vocab(a, tmp, mp):
    from hf_cft.models import build_zeroshot_classifier

    model = tiny_clip(vocab_size=50)  # the demo tokenizer has 1024 ids
    return build_zeroshot_classifier(model, a["tok"], CLASSES, TEMPLATES)


def _preprocessor(a, tmp, cfg):
    from transformers import CLIPImageProcessor

    folder = tmp / "proc"
    CLIPImageProcessor().save_pretrained(folder)
    _edit_json(folder / "preprocessor_config.json", lambda d: d.update(cfg))
    return ImageTransform.from_processor(CLIPImageProcessor.from_pretrained(folder))


def _checkpoint(a, tmp, edit):
    from test_continual import _colour_task, _config

    from hf_cft.continual import ContinualRunner, ZeroShotStrategy
    from hf_cft.data import ImageTransform as T

    tasks = [
        _colour_task("a", [0, 1, 2], ["cat", "dog", "fox"], 0),
        _colour_task("b", [2, 0, 1], ["car", "bus", "van"], 1),
    ]
    from conftest import ToyTokenizer

    def runner():
        return ContinualRunner(
            ZeroShotStrategy(),
            tasks,
            tiny_clip(image_size=12, patch_size=4),
            ToyTokenizer(),
            tmp / "run",
            _config(),
            transform=T(size=12, crop_size=12),
            plot=False,
        )

    runner().run()
    _edit_json(tmp / "run" / "checkpoint" / "manifest.json", edit)
    return runner().run()


# ------------------------------------------------------------------------------------------------ tables


def L(fn):
    """A builder from a function of ``a`` alone."""
    return lambda a, tmp, mp: fn(a)


def T(fn):
    """A builder from a function of nothing."""
    return lambda a, tmp, mp: fn()


ERRORS = [
    # --- 1. loading refuses what it cannot vouch for
    ("model: every vision key missing", _model_missing_vision, BundleError, r"missing key.*vision_model"),
    ("model: an unexpected key", _model_unexpected_key, BundleError, r"unexpected key.*stray\.weight"),
    ("model: an int32 weight", _model_int_weight, BundleError, r"text_projection\.weight.*I32"),
    ("model: empty weights file", _model_empty_weights, BundleError, r"missing key"),
    ("model: index maps a key to a pickle", _index_to_pickle, BundleError, r"pytorch_model\.bin"),
    ("model: index path with ../", _index_dotdot, BundleError, r"\.\./outside\.safetensors"),
    ("model: index names a missing shard", _index_missing_file, BundleError, r"model-00002-of-00002"),
    ("model: index is not an object", _index_not_json_object, BundleError, r"index\.json"),
    ("model: weights symlinked outside", _model_symlink_outside, BundleError, r"model\.safetensors.*outside"),
    ("delta: index maps a key to a pickle", _delta_index_to_pickle, BundleError, r"pytorch_model\.bin"),
    ("delta: index path with ../", _delta_index_dotdot, BundleError, r"\.\./outside\.safetensors"),
    ("adapter: empty CoOp weights", lambda a, t, m: _adapter(a, t, "coop", lambda x: {}), AdapterError, r"missing"),
    ("adapter: renamed CoOp key", lambda a, t, m: _adapter(a, t, "coop", _rename_first), AdapterError, r"_renamed"),
    (
        "adapter: int CoOp context",
        lambda a, t, m: _adapter(a, t, "coop", lambda x: {k: v.to(torch.int64) for k, v in x.items()}),
        AdapterError,
        r"int64",
    ),
    (
        "adapter: LoRA lora_B dropped",
        lambda a, t, m: _adapter(a, t, "lora", lambda x: {k: v for k, v in x.items() if "lora_B" not in k}),
        AdapterError,
        r"missing key.*lora_B",
    ),
    (
        "adapter: LoRA key renamed",
        lambda a, t, m: _adapter(a, t, "lora", _rename_first),
        AdapterError,
        r"_renamed",
    ),
    ("adapter: weights symlinked to another", _adapter_symlink, AdapterError, r"adapter_model\.safetensors.*outside"),
    ("adapter: NaN CoOp context", _adapter_nan_context, NonFiniteError, r"NaN"),
    ("adapter: CoOp of another base model", _coop_other_base, AdapterError, r"another base model"),
    (
        "bundle: λ edited to 1e30",
        lambda a, t, m: _bundle_edit(a, t, _set_lam),
        BundleError,
        r"manifest\.json.*checksum",
    ),
    ("bundle: class names edited", lambda a, t, m: _bundle_edit(a, t, _set_classnames), BundleError, r"checksum"),
    ("bundle: files = {}", lambda a, t, m: _bundle_edit(a, t, _files_empty, True), BundleError, r"'files'"),
    ("bundle: files = {} (unhashed)", lambda a, t, m: _bundle_edit(a, t, _files_empty), BundleError, r"checksum"),
    (
        "bundle: one files entry missing",
        lambda a, t, m: _bundle_edit(a, t, _files_one_missing, True),
        BundleError,
        r"masks\.safetensors",
    ),
    ("bundle: no files key", lambda a, t, m: _bundle_edit(a, t, _files_missing, True), BundleError, r"'files'"),
    ("bundle: manifest checksum removed", lambda a, t, m: _bundle_edit(a, t, _no_checksum), BundleError, r"checksum"),
    ("LoRA config without r", lambda a, t, m: _lora_config(a, t, lambda c: c.pop("r")), AdapterError, r"'r'"),
    (
        "LoRA config lora_alpha='abc'",
        lambda a, t, m: _lora_config(a, t, lambda c: c.update(lora_alpha="abc")),
        AdapterError,
        r"lora_alpha",
    ),
    (
        "LoRA config r=0",
        lambda a, t, m: _lora_config(a, t, lambda c: c.update(r=0)),
        AdapterError,
        r"'r'",
    ),
    (
        "load_adapter: LoRA config without r",
        lambda a, t, m: _load_lora_config(a, t, lambda c: c.pop("r")),
        AdapterError,
        r"'r'",
    ),
    (
        "load_adapter: lora_alpha='abc'",
        lambda a, t, m: _load_lora_config(a, t, lambda c: c.update(lora_alpha="abc")),
        AdapterError,
        r"lora_alpha",
    ),
    (
        "load_adapter: rank_pattern r=-1",
        lambda a, t, m: _load_lora_config(a, t, lambda c: c.update(rank_pattern={"q_proj": -1})),
        AdapterError,
        r"rank_pattern\['q_proj'\]",
    ),
    (
        "load_adapter: LoRA r = nan",
        lambda a, t, m: _load_lora_config(a, t, lambda c: c.update(r=float("nan"))),
        AdapterError,
        r"'r'",
    ),
    # --- 2. finiteness at every door
    ("MergeTune λ = nan", _mt(anchor_weight=float("nan")), MergeTuneConfigError, r"anchor_weight"),
    ("MergeTune λ = inf", _mt(anchor_weight=float("inf")), MergeTuneConfigError, r"anchor_weight"),
    ("MergeTune β = nan", _mt(path_weight=float("nan")), MergeTuneConfigError, r"path_weight"),
    ("MergeTune β = -inf", _mt(path_weight=float("-inf")), MergeTuneConfigError, r"path_weight"),
    ("MergeTune τ = nan", _mt(tau=float("nan")), MergeTuneConfigError, r"tau"),
    ("MergeTune N = 2,000,000", _mt(num_alphas=2_000_000), MergeTuneConfigError, r"num_alphas"),
    ("MergeTune N = 2.5", _mt(num_alphas=2.5), MergeTuneConfigError, r"num_alphas"),
    ("MergeTune fisher_max_images=-5", _mt(fisher_max_images=-5), MergeTuneConfigError, r"fisher_max_images"),
    ("MergeTune fisher_damping=nan", _mt(fisher_damping=float("nan")), MergeTuneConfigError, r"fisher_damping"),
    ("MergeTune anchor_weight='8'", _mt(anchor_weight="8"), MergeTuneConfigError, r"anchor_weight"),
    ("MergeTune fisher_chunk_size=0", _mt(fisher_chunk_size=0), MergeTuneConfigError, r"fisher_chunk_size"),
    ("apply_delta scale = nan", _apply(float("nan")), OptionError, r"scale"),
    ("apply_delta scale = inf", _apply(float("inf")), OptionError, r"scale"),
    ("apply_delta scale = '1'", _apply("1"), OptionError, r"scale"),
    ("apply_delta scale overflows", _apply(1e308), NonFiniteError, r"scale"),
    ("ties k = 0", T(lambda: baselines.ties(_deltas(), k=0)), MergeConfigError, r"\bk\b"),
    ("ties k = 1.5", T(lambda: baselines.ties(_deltas(), k=1.5)), MergeConfigError, r"\bk\b"),
    ("ties k = nan", T(lambda: baselines.ties(_deltas(), k=float("nan"))), MergeConfigError, r"\bk\b"),
    ("ties lam = nan", T(lambda: baselines.ties(_deltas(), lam=float("nan"))), MergeConfigError, r"lam"),
    ("dare rho = 1", T(lambda: baselines.dare(_deltas(), rho=1.0)), MergeConfigError, r"rho"),
    ("dare rho = -0.1", T(lambda: baselines.dare(_deltas(), rho=-0.1)), MergeConfigError, r"rho"),
    ("dare then = 'x'", T(lambda: baselines.dare(_deltas(), then="x")), MergeConfigError, r"then"),
    (
        "task_arithmetic lam = nan",
        T(lambda: baselines.task_arithmetic(_deltas(), lam=float("nan"))),
        MergeConfigError,
        "lam",
    ),
    (
        "task_arithmetic lam = [1, inf]",
        T(lambda: baselines.task_arithmetic(_deltas(), lam=[1, math.inf])),
        MergeConfigError,
        "lam",
    ),
    ("magmax lam = -inf", T(lambda: baselines.magmax(_deltas(), lam=-math.inf)), MergeConfigError, "lam"),
    ("wise alpha = nan", T(lambda: baselines.wise_ft(_deltas(1)[0], alpha=float("nan"))), MergeConfigError, "alpha"),
    ("wise alpha overflows the delta", _wise_alpha_overflow, MergeConfigError, r"alpha"),
    ("magnitude_prune k = 0", T(lambda: baselines.magnitude_prune(_deltas(), k=0)), MergeConfigError, r"\bk\b"),
    ("trim_top_k k = 2", T(lambda: baselines.trim_top_k(torch.ones(4), k=2)), MergeConfigError, r"\bk\b"),
    ("ties on a NaN delta", T(lambda: baselines.ties(_deltas(nan=True))), NonFiniteError, r"'b'"),
    ("NaN logit_scale", lambda a, t, m: _eval_with(a, _nan_logit_scale), NonFiniteError, r"logit_scale"),
    ("inf logit_scale", lambda a, t, m: _eval_with(a, _inf_logit_scale), NonFiniteError, r"logit_scale"),
    (
        "NaN zero-shot head",
        lambda a, t, m: _eval_with(a, head=torch.full((3, 16), float("nan"))),
        NonFiniteError,
        r"head",
    ),
    ("NaN CoOp context at evaluation", _nan_coop_eval, NonFiniteError, r"head|CoOp|context"),
    ("MergeTune NaN fine-tuned CoOp", _mergetune_nan_finetuned, NonFiniteError, r"fine-tuned|finetuned"),
    ("training loss becomes NaN", _train_until_nan, NonFiniteError, r"loss"),
    (
        "MergeTune empty fine-tuned CoOp file",
        lambda a, t, m: _mergetune_ft_edit(a, t, lambda x: {}),
        AdapterError,
        r"fine-tuned adapter.*missing",
    ),
    (
        "MergeTune renamed fine-tuned CoOp key",
        lambda a, t, m: _mergetune_ft_edit(a, t, _rename_first),
        AdapterError,
        r"_renamed",
    ),
    ("MergeTune fine-tuned LoRA lacks v_proj", _mergetune_lora_ft_missing, AdapterError, r"missing key.*v_proj"),
    ("MergeTune weight_ensemble = nan", _mt(weight_ensemble=float("nan")), MergeTuneConfigError, r"weight_ensemble"),
    ("MergeTune tau = 1.5", _mt(tau=1.5), MergeTuneConfigError, r"tau"),
    ("MergeTune num_alphas = True", _mt(num_alphas=True), MergeTuneConfigError, r"num_alphas"),
    ("consensus k = -1", T(lambda: baselines.consensus(_deltas(), k=-1)), MergeConfigError, r"\bk\b"),
    ("consensus k = 1.5", T(lambda: baselines.consensus(_deltas(), k=1.5)), MergeConfigError, r"\bk\b"),
    ("ties lam overflows", T(lambda: baselines.ties(_deltas(), lam=1e308)), MergeConfigError, r"lam"),
    ("magmax lam overflows", T(lambda: baselines.magmax(_deltas(), lam=-1e308)), MergeConfigError, r"lam"),
    (
        "task_arithmetic lam overflows",
        T(lambda: baselines.task_arithmetic(_deltas(), lam=1e308)),
        MergeConfigError,
        r"lam",
    ),
    ("dare lam = 'x'", T(lambda: baselines.dare(_deltas(), lam="x")), MergeConfigError, r"lam"),
    (
        "NaN in a uint8-less float array image",
        lambda a, t, m: decode_image(np.full((4, 4), np.inf), "dataset 'infy'"),
        ImageDecodeError,
        r"infy",
    ),
    (
        "empty image array",
        lambda a, t, m: decode_image(np.zeros((0, 4, 3), np.uint8), "dataset 'void'"),
        ImageDecodeError,
        r"void",
    ),
    ("NaN pixel in a float image", _nan_image, ImageDecodeError, r"nanny"),
    # --- 4. validation that means it
    (
        "template 'a photo of a {{}}.'",
        T(lambda: validate_templates(["a photo of a {{}}."])),
        TemplateError,
        r"\{\{\}\}",
    ),
    ("template 'a {0} {}'", T(lambda: validate_templates(["a {0} {}"])), TemplateError, r"a \{0\} \{\}"),
    ("template '{name} {}'", T(lambda: validate_templates(["{name} {}"])), TemplateError, r"\{name\} \{\}"),
    ("template 'photo of {}}'", T(lambda: validate_templates(["photo of {}}"])), TemplateError, r"photo of \{\}\}"),
    ("template '{!r} {}'", T(lambda: validate_templates(["{!r} {}"])), TemplateError, r"\{!r\}"),
    ("template '{:>9}'", T(lambda: validate_templates(["a {:>9}"])), TemplateError, r"\{:>9\}"),
    ("template '{}{}'", T(lambda: validate_templates(["{}{}"])), TemplateError, r"\{\}\{\}"),
    ("template 5", T(lambda: validate_templates([5])), TemplateError, r"5"),
    ("template in from_arrays", T(lambda: _from_arrays(templates=["a {{}}"])), TemplateError, r"\{\{\}\}"),
    ("template in format_prompts", T(lambda: format_prompts(["cat"], ["{0} {}"])), TemplateError, r"\{0\}"),
    (
        "template in meta.json",
        lambda a, t, m: _meta(a, t, {"classnames": CLASSES, "templates": ["x {{}}"]}),
        TemplateError,
        r"x \{\{\}\}",
    ),
    ("ClassLabel value 5 in Parquet", _load_bad_labels(5), DatasetFormatError, r"\b5\b"),
    ("ClassLabel value -1 in Parquet", _load_bad_labels(-1), DatasetFormatError, r"-1"),
    (
        "from_arrays label 3 of 3 classes",
        T(lambda: _from_arrays(labels=[0, 1, 2, 3, 0, 1])),
        ClassNamesError,
        r"\b3\b",
    ),
    ("class names a string", T(lambda: _from_arrays(classnames="cat")), ClassNamesError, r"str"),
    ("class names a dict", T(lambda: _from_arrays(classnames={"cat": 0})), ClassNamesError, r"dict"),
    ("class name an int", T(lambda: _from_arrays(classnames=["cat", 1, "dog"])), ClassNamesError, r"#1"),
    ("meta.json a list", lambda a, t, m: _meta(a, t, ["cat"]), DatasetFormatError, r"meta\.json"),
    (
        "meta.json classnames a string",
        lambda a, t, m: _meta(a, t, {"classnames": "cat dog fox"}),
        DatasetFormatError,
        r"classnames",
    ),
    ("meta.json templates a number", lambda a, t, m: _meta(a, t, {"templates": 3}), DatasetFormatError, r"templates"),
    ("meta.json classnames of ints", lambda a, t, m: _meta(a, t, {"classnames": [0, 1, 2]}), ClassNamesError, r"#0"),
    ("task name not a string", T(lambda: DeltaFusionMerger().add_task({"w": torch.ones(2)}, 3)), HfCftError, r"3"),
    ("few_shot k = 0", T(lambda: few_shot(_toy_ds(), 0)), OptionError, r"\bk\b"),
    ("few_shot k = -2", T(lambda: few_shot(_toy_ds(), -2)), OptionError, r"\bk\b"),
    ("few_shot k = 1.5", T(lambda: few_shot(_toy_ds(), 1.5)), OptionError, r"\bk\b"),
    ("few_shot on_short='x'", T(lambda: few_shot(_toy_ds(), 1, on_short="x")), OptionError, r"on_short"),
    ("split_per_class 1.5", T(lambda: split_per_class(_toy_ds(), 1.5)), OptionError, r"fraction"),
    ("split_per_class nan", T(lambda: split_per_class(_toy_ds(), float("nan"))), OptionError, r"fraction"),
    ("tokenizer ids beyond the vocabulary", _tokenizer_beyond_vocab, TokenizerError, r"vocab"),
    (
        "preprocessor size -5",
        lambda a, t, m: _preprocessor(a, t, {"size": {"shortest_edge": -5}}),
        OptionError,
        r"size",
    ),
    (
        "preprocessor crop 0",
        lambda a, t, m: _preprocessor(a, t, {"crop_size": {"height": -2, "width": -2}}),
        OptionError,
        r"crop",
    ),
    ("preprocessor std 0", lambda a, t, m: _preprocessor(a, t, {"image_std": [0.0, 1.0, 1.0]}), OptionError, r"std"),
    ("ImageTransform size 0", T(lambda: ImageTransform(size=0)), OptionError, r"size"),
    ("ImageTransform mean nan", T(lambda: ImageTransform(mean=(float("nan"), 0, 0))), OptionError, r"mean"),
    (
        "checkpoint completed missing",
        lambda a, t, m: _checkpoint(a, t, lambda d: d.pop("completed")),
        ContinualError,
        r"completed",
    ),
    (
        "checkpoint completed 99",
        lambda a, t, m: _checkpoint(a, t, lambda d: d.update(completed=99)),
        ContinualError,
        r"completed",
    ),
    (
        "checkpoint completed -2",
        lambda a, t, m: _checkpoint(a, t, lambda d: d.update(completed=-2)),
        ContinualError,
        r"completed",
    ),
]


# ------------------------------------------------------------------------------------------------ results


def _pil_modes():
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    out["I;16"] = Image.fromarray((rng.integers(0, 65536, (20, 24))).astype(np.uint16), mode="I;16")
    return out


def _grey16_png(tmp):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 24).astype(np.uint16), (20, 1))
    path = tmp / "grey16.png"
    Image.fromarray(ramp).save(path)
    return path, ramp


def _check_grey16(a, tmp, mp):
    from PIL import Image

    path, ramp = _grey16_png(tmp)
    img = decode_image({"bytes": path.read_bytes(), "path": None})
    got = np.asarray(img)[..., 0].astype(float)
    want = np.round(ramp / 257.0)
    assert Image.open(path).mode.startswith("I"), Image.open(path).mode
    assert np.abs(got - want).max() <= 1, (got[0], want[0])
    assert (got == 255).mean() < 0.1  # not clipped


def _check_float_tiff(a, tmp, mp):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 1, 24, dtype=np.float32), (20, 1))
    path = tmp / "float.tiff"
    Image.fromarray(ramp, mode="F").save(path)
    img = decode_image({"bytes": path.read_bytes(), "path": None})
    got = np.asarray(img)[..., 0].astype(float)
    assert np.abs(got - np.round(ramp * 255)).max() <= 1, got[0]


def _check_float_array_255(a, tmp, mp):
    ramp = np.tile(np.linspace(0, 255, 24, dtype=np.float32), (20, 1))
    got = np.asarray(decode_image(ramp))[..., 0].astype(float)
    assert np.abs(got - np.round(ramp)).max() <= 1


def _check_uint16_array(a, tmp, mp):
    ramp = np.tile(np.linspace(0, 65535, 24).astype(np.uint16), (20, 1))
    got = np.asarray(decode_image(ramp))[..., 0].astype(float)
    assert np.abs(got - np.round(ramp / 257.0)).max() <= 1


def _same_as_processor(mode_builder):
    """A PIL image of any mode becomes the RGB pixels transformers' image processors make of it
    (``convert_to_rgb``: transparency composited onto white), and the transform of it is finite and shaped."""

    def build(a, tmp, mp):
        from transformers.image_transforms import convert_to_rgb

        img = mode_builder()
        theirs = np.asarray(convert_to_rgb(img, return_numpy=True))
        ours = np.asarray(decode_image(img))
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        assert np.array_equal(ours, theirs), np.abs(ours.astype(int) - theirs).max()
        x = ImageTransform(size=16, crop_size=16)(img)
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all()

    return build


def _pil(mode, size=(24, 20)):
    def make():
        from PIL import Image

        rng = np.random.default_rng(1)
        rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8))
        if mode == "P":
            return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        if mode in ("RGBA", "LA"):
            im = rgb.convert(mode)
            im.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0])).astype(np.uint8)))
            return im
        if mode == "PA":
            return rgb.convert("P", palette=Image.Palette.ADAPTIVE).convert("PA")
        return rgb.convert(mode)

    return make


def _check_one_pixel(a, tmp, mp):
    x = ImageTransform(size=16, crop_size=16)(np.full((1, 1, 3), 200, dtype=np.uint8))
    assert x.shape == (3, 16, 16) and torch.isfinite(x).all()
    mean = torch.tensor(ImageTransform().mean).view(3, 1, 1)
    std = torch.tensor(ImageTransform().std).view(3, 1, 1)
    assert torch.allclose(x, ((torch.full((3, 1, 1), 200 / 255.0) - mean) / std).expand(3, 16, 16), atol=1e-5)


def _check_rgba_transparent(a, tmp, mp):
    """A fully transparent pixel is white, an opaque one keeps its colour (transformers composites onto white)."""
    from PIL import Image

    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 120
    arr[:2, :, 3] = 255
    got = np.asarray(decode_image(Image.fromarray(arr, mode="RGBA")))
    assert (got[:2, :, 0] == 120).all() and (got[:2, :, 1:] == 0).all()
    assert (got[2:] == 255).all()


def _check_cmyk(a, tmp, mp):
    from PIL import Image

    img = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    got = np.asarray(decode_image(img))
    assert (got[..., 0] == 255).all() and (got[..., 1:] == 0).all()


def _check_one_bit(a, tmp, mp):
    from PIL import Image

    img = Image.new("1", (4, 4), 1)
    assert (np.asarray(decode_image(img)) == 255).all()


def _check_partial_load_opt_in(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    _edit_safetensors(folder / "model.safetensors", _drop("vision_model.post_layernorm"))
    model = load_model(folder, strict=False)
    ref = a["base"]()
    assert torch.equal(model.text_projection.weight, ref.text_projection.weight)


def _check_symlink_inside_ok(a, tmp, mp):
    folder = _copy(a["model"], tmp)
    os.replace(folder / "model.safetensors", folder / "weights.bin.safetensors")
    os.symlink("weights.bin.safetensors", folder / "model.safetensors")
    model = load_model(folder)
    assert torch.equal(model.text_projection.weight, a["base"]().text_projection.weight)


def _check_legacy_position_ids_ok(a, tmp, mp):
    """Older CLIP checkpoints (openai/clip-vit-base-patch16) hold position_ids buffers the model no longer saves:
    transformers ignores them by design, so strict loading accepts them."""
    folder = _copy(a["model"], tmp)
    _edit_safetensors(
        folder / "model.safetensors",
        lambda t: {
            **t,
            "text_model.embeddings.position_ids": torch.arange(77)[None],
            "vision_model.embeddings.position_ids": torch.arange(17)[None],
        },
    )
    model = load_model(folder)
    assert torch.equal(model.text_projection.weight, a["base"]().text_projection.weight)


def _check_sharded_ok(a, tmp, mp):
    folder = _sharded(a, tmp, lambda wm, f: None)
    model = load_model(folder)
    assert torch.equal(model.text_projection.weight, a["base"]().text_projection.weight)
    d = delta_from_models(a["model"], folder)
    assert all(float(v.abs().max()) == 0 for v in d.values())


def _check_pending_save_symlink(a, tmp, mp):
    """A ``.pending-save`` that is a symlink (to another bundle's files) is not a staged save of this bundle."""
    folder = _copy(a["bundle"], tmp)
    other = DeltaFusionMerger()
    other.add_task({"text_projection.weight": torch.ones(16, 32)}, "intruder")
    other_dir = tmp / "other_bundle"
    other.save_pretrained(other_dir)
    os.symlink(other_dir, folder / ".pending-save")
    merger = DeltaFusionMerger.from_pretrained(folder)
    assert merger.task_names == ["task_a", "task_b"]


def _check_bundle_roundtrip(a, tmp, mp):
    merger = DeltaFusionMerger.from_pretrained(a["bundle"])
    assert merger.task_names == ["task_a", "task_b"]
    merger.save_pretrained(tmp / "again")
    again = DeltaFusionMerger.from_pretrained(tmp / "again")
    for k in merger.keys:
        assert torch.equal(again.unified_delta[k], merger.unified_delta[k])


def _check_coop_same_base_ok(a, tmp, mp):
    from peft import get_peft_model_state_dict

    peft = load_adapter_model(a["base"](), a["coop"])
    ref = load_file(str(a["coop"] / "adapter_model.safetensors"))
    got = get_peft_model_state_dict(peft)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def _check_templates_ok(a, tmp, mp):
    ok = ["a photo of a {}.", "{}", "{} {{curly}}", "itap of a {}.", "a {} with braces {{}} around"]
    assert validate_templates(ok) == ok
    assert format_prompts(["cat"], ["{} {{curly}}"]) == ["cat {curly}"]


def _check_apply_delta_scale_zero(a, tmp, mp):
    model = tiny_clip()
    before = model.text_projection.weight.clone()
    apply_delta(model, {"text_projection.weight": torch.ones(16, 32)}, scale=0.0)
    assert torch.equal(model.text_projection.weight, before)


def _check_mergetune_bounds_ok(a, tmp, mp):
    cfg = MergeTuneConfig(**trainer_kwargs(tmp, anchor_weight=0.0, path_weight=0.0, num_alphas=64, tau=1.0))
    assert cfg.num_alphas == 64 and cfg.tau == 1.0


def _check_push_ignores_leftovers(a, tmp, mp):
    from hub_fake import FakeHub

    folder = _copy(a["lora"], tmp)
    (folder / ".adapter_model.safetensors.abc123.tmp").write_bytes(b"torn")
    (folder / ".pending-save").mkdir()
    (folder / ".pending-save" / "x.safetensors").write_bytes(b"torn")
    import huggingface_hub

    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as hub:
        hf_cft.hub.push_folder_to_hub(folder, "me/lora", endpoint=hub.url, token="x")
        files = hub.files("me/lora")
    assert "adapter_model.safetensors" in files
    assert not any(".tmp" in f or "pending" in f for f in files), files


def _check_merge_overwrite_replaces_whole(a, tmp, mp):
    out = _prev_merge(a, tmp)
    (out / "stale_from_old_run.json").write_text("{}")
    stale = tmp / f".{out.name}.hf-cft-staging-dead"
    stale.mkdir()
    assert main([str(x) for x in _merge_argv(a, out, "--overwrite", "--lam", "0.5")]) == 0
    assert json.loads((out / "merge_config.json").read_text())["lam"] == 0.5
    assert not (out / "stale_from_old_run.json").exists()
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not the staging folder's private 0700
    _no_leftovers(out)


def _check_merge_result_is_base_plus_lam_delta(a, tmp, mp):
    out = tmp / "m"
    assert main([str(x) for x in _merge_argv(a, out, "--lam", "0.25")]) == 0
    merged = load_model(out).state_dict()
    base = load_model(a["model"]).state_dict()
    delta = delta_from_lora(a["lora"], a["base"]())
    for k, d in delta.items():
        assert torch.allclose(merged[k], base[k] + 0.25 * d, atol=1e-6), k
    _no_leftovers(out)


def _check_eval_output_replaces_previous_result(a, tmp, mp):
    coop = _copy(a["coop"], tmp, "coop")
    out = coop / "eval.json"
    argv = ["eval", "--model", a["model"], "--dataset", a["data"], "--adapter", coop, "--output", out]
    assert main([str(x) for x in argv]) == 0
    first = json.loads(out.read_text())
    assert main([str(x) for x in argv]) == 0  # a previous result of hf-cft eval may be replaced
    assert json.loads(out.read_text())["accuracy"] == first["accuracy"]


def _check_eval_clears_stale_temp(a, tmp, mp):
    out = tmp / "e.json"
    orphan = tmp / ".e.json.abc123.tmp"  # what a kill during an earlier write leaves
    orphan.write_text('{"torn')
    assert main([str(x) for x in _eval_argv(a, "--output", out)]) == 0
    assert json.loads(out.read_text())["total"] == 12
    assert not orphan.exists()


def _check_card_into_artefact_readme(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    (lora / "README.md").write_text("old card")
    assert main(["card", "--kind", "adapter", "--artefact", str(lora), "--out", str(lora / "README.md")]) == 0
    assert "hf_cft" in (lora / "README.md").read_text()


def _check_pam_save_keeps_readme(a, tmp, mp):
    from resilience_worker import artefact_version

    folder = tmp / "pam"
    artefact_version("pam", 0).save_pretrained(folder)
    (folder / "README.md").write_text("card")
    (folder / "extra").mkdir()
    artefact_version("pam", 1).save_pretrained(folder)
    assert (folder / "README.md").read_text() == "card" and (folder / "extra").is_dir()
    assert hf_cft.merging.PAMState.from_pretrained(folder).num_tasks == 2
    _no_leftovers(folder)


def _check_save_pretrained_atomic(a, tmp, mp):
    from hf_cft.utils import save_pretrained_atomic

    folder = tmp / "lora"
    lora = get_peft_model(a["base"](), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    save_pretrained_atomic(lora, folder)
    (folder / "README.md").write_text("my card")
    (folder / "adapter_model.safetensors.stale").write_text("x")
    save_pretrained_atomic(lora, folder)
    assert (folder / "README.md").read_text() == "my card"
    assert not (folder / "adapter_model.safetensors.stale").exists()
    load_adapter_model(a["base"](), folder)
    _no_leftovers(folder)


def _check_mergetune_ft_coop_loads(a, tmp, mp):
    from hf_cft.trainers import MergeTuneTrainer

    cont = get_peft_model(a["base"](), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(a["tok"]))
    args = MergeTuneConfig(**trainer_kwargs(tmp, max_steps=1))
    trainer = MergeTuneTrainer(cont, args, CLASSES, TEMPLATES, a["tok"], finetuned=str(a["coop"]))
    saved = next(iter(load_file(str(a["coop"] / "adapter_model.safetensors")).values()))
    assert torch.equal(trainer.ctx_ft.cpu(), saved)


RESULTS = [
    ("16-bit grey PNG is scaled, not clipped", _check_grey16),
    ("float TIFF in 0..1 is scaled", _check_float_tiff),
    ("float array in 0..255 is kept", _check_float_array_255),
    ("uint16 array is scaled", _check_uint16_array),
    ("palette (P) image as the processor", _same_as_processor(_pil("P"))),
    ("CMYK image as the processor", _same_as_processor(_pil("CMYK"))),
    ("RGBA image as the processor", _same_as_processor(_pil("RGBA"))),
    ("LA image as the processor", _same_as_processor(_pil("LA"))),
    ("PA image as the processor", _same_as_processor(_pil("PA"))),
    ("I (32-bit) image as the processor", _same_as_processor(_pil("I"))),
    ("L image as the processor", _same_as_processor(_pil("L"))),
    ("1-bit image as the processor", _same_as_processor(_pil("1"))),
    ("1x1 RGB image as the processor", _same_as_processor(_pil("RGB", (1, 1)))),
    ("3x50 RGB image as the processor", _same_as_processor(_pil("RGB", (3, 50)))),
    ("1-pixel array is resized", _check_one_pixel),
    ("RGBA transparency keeps the colour", _check_rgba_transparent),
    ("CMYK pure red", _check_cmyk),
    ("1-bit white", _check_one_bit),
    ("partial load with strict=False", _check_partial_load_opt_in),
    ("weights symlinked inside the folder", _check_symlink_inside_ok),
    ("sharded index of safetensors", _check_sharded_ok),
    ("legacy position_ids buffers are accepted", _check_legacy_position_ids_ok),
    (".pending-save symlink does not redirect", _check_pending_save_symlink),
    ("bundle save/load round trip", _check_bundle_roundtrip),
    ("CoOp on its own base loads", _check_coop_same_base_ok),
    ("valid templates pass", _check_templates_ok),
    ("apply_delta scale 0 leaves the model", _check_apply_delta_scale_zero),
    ("MergeTune boundary values pass", _check_mergetune_bounds_ok),
    ("push skips staging leftovers", _check_push_ignores_leftovers),
    ("merge --overwrite replaces the whole output", _check_merge_overwrite_replaces_whole),
    ("merged weights are θ0 + λ·δ", _check_merge_result_is_base_plus_lam_delta),
    ("eval may replace its own earlier result", _check_eval_output_replaces_previous_result),
    ("card may replace the artefact's README.md", _check_card_into_artefact_readme),
    ("eval removes a killed write's .tmp orphan", _check_eval_clears_stale_temp),
    ("PAM save keeps README.md and sub-folders", _check_pam_save_keeps_readme),
    ("save_pretrained_atomic replaces, keeps the card", _check_save_pretrained_atomic),
    ("MergeTune reads an intact fine-tuned CoOp", _check_mergetune_ft_coop_loads),
]


# ------------------------------------------------------------------------------------------------ CLI


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Snap:
    """The bytes of some folders before a command; ``unchanged()`` asserts they are still the same."""

    def __init__(self, *folders):
        self.folders = [Path(f) for f in folders]
        self.before = [_files(f) if f.is_dir() else f.read_bytes() if f.exists() else None for f in self.folders]

    def unchanged(self):
        for f, b in zip(self.folders, self.before):
            now = _files(f) if f.is_dir() else f.read_bytes() if f.exists() else None
            assert now == b, f"{f} changed"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_leftovers(folder: Path):
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    assert not leftovers, leftovers
    if folder.is_dir():
        assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _merge_argv(a, out, *extra):
    return [
        "merge",
        "--base",
        a["model"],
        "--method",
        "task_arithmetic",
        "--adapters",
        a["lora"],
        "--out",
        out,
        *extra,
    ]


def _prev_merge(a, tmp):
    out = tmp / "merged"
    assert main([str(x) for x in _merge_argv(a, out, "--lam", "0.3")]) == 0
    return out


def cli_merge_into_base(a, tmp, mp):
    base = _copy(a["model"], tmp, "base")
    snap = Snap(base)
    argv = [
        "merge",
        "--base",
        base,
        "--method",
        "task_arithmetic",
        "--adapters",
        a["lora"],
        "--out",
        base,
        "--overwrite",
    ]
    return argv, snap.unchanged


def cli_merge_into_adapter(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    snap = Snap(lora)
    return _merge_argv(a, lora, "--overwrite")[:6] + [lora, "--out", lora, "--overwrite"], snap.unchanged


def cli_merge_out_inside_base(a, tmp, mp):
    base = _copy(a["model"], tmp, "base")
    snap = Snap(base)
    argv = ["merge", "--base", base, "--method", "task_arithmetic", "--adapters", a["lora"], "--out", base / "sub"]
    return argv, snap.unchanged


def cli_merge_out_contains_base(a, tmp, mp):
    (tmp / "runs").mkdir()
    base = _copy(a["model"], tmp / "runs", "base")
    snap = Snap(base)
    argv = ["merge", "--base", base, "--method", "task_arithmetic", "--adapters", a["lora"], "--out", tmp / "runs"]
    return argv + ["--overwrite"], snap.unchanged


def cli_merge_out_under_a_file(a, tmp, mp):
    (tmp / "afile").write_text("x")
    return _merge_argv(a, tmp / "afile" / "merged"), lambda: None


def cli_merge_config_is_a_folder(a, tmp, mp):
    return ["merge", "--config", a["model"], "--out", tmp / "merged"], lambda: None


def cli_merge_nan_input(a, tmp, mp):
    ft = _copy(a["model"], tmp, "ft")
    weights = ft / "model.safetensors"
    _edit_safetensors(
        weights, lambda t: {k: v.fill_(float("nan")) if k.endswith("fc1.weight") else v for k, v in t.items()}
    )
    argv = ["merge", "--base", a["model"], "--method", "ties", "--adapters", ft, "--out", tmp / "merged"]
    return argv, lambda: _no_leftovers(tmp / "merged")


def cli_merge_enospc(a, tmp, mp):
    out = _prev_merge(a, tmp)
    snap = Snap(out)
    from hf_cft.merging import streaming

    real = streaming.ShardedWriter.write
    calls = []

    def full_disk(self, key, tensor):  # the disk fills after the first tensor's bytes
        real(self, key, tensor)
        calls.append(key)
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(streaming.ShardedWriter, "write", full_disk)

    def check():
        assert calls, "the merge never reached the writer"
        snap.unchanged()
        _no_leftovers(out)

    return _merge_argv(a, out, "--overwrite", "--lam", "0.5"), check


def cli_merge_ctrl_c(a, tmp, mp):
    out = _prev_merge(a, tmp)
    snap = Snap(out)
    from hf_cft.merging import streaming

    def interrupted(*args, **kw):  # Ctrl-C while the first merged key is checked, output half written
        raise KeyboardInterrupt

    mp.setattr(streaming, "_check_merged", interrupted)

    def check():
        snap.unchanged()
        _no_leftovers(out)

    return _merge_argv(a, out, "--overwrite", "--lam", "0.5"), check


def cli_merge_read_only(a, tmp, mp):
    """A read-only output file system (simulated: the process runs as root, so chmod would not stop it)."""
    out = _prev_merge(a, tmp)
    snap = Snap(out)
    import tempfile

    def read_only(*args, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(kw.get("dir") or tmp))

    mp.setattr(tempfile, "mkdtemp", read_only)
    return _merge_argv(a, out, "--overwrite", "--lam", "0.5"), snap.unchanged


def cli_merge_stale_staging(a, tmp, mp):
    """Leftovers of a killed merge beside --out are removed by the next merge, and never mixed into it."""
    out = _prev_merge(a, tmp)
    stale = tmp / f".{out.name}.hf-cft-staging-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    return _merge_argv(a, out, "--overwrite", "--lam", "nan"), lambda: None


def cli_merge_not_a_merge_folder(a, tmp, mp):
    out = tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    snap = Snap(out)
    return _merge_argv(a, out, "--overwrite"), snap.unchanged


def cli_merge_alpha_huge(a, tmp, mp):
    argv = [
        "merge",
        "--base",
        a["model"],
        "--method",
        "wise",
        "--adapters",
        a["full"],
        "--out",
        tmp / "o",
        "--alpha",
        "1e308",
    ]
    return argv, lambda: None


def cli_merge_k_zero(a, tmp, mp):
    argv = ["merge", "--base", a["model"], "--method", "ties", "--adapters", a["lora"], "--out", tmp / "o", "--k", "0"]
    return argv, lambda: None


def cli_merge_rho_one(a, tmp, mp):
    argv = [
        "merge",
        "--base",
        a["model"],
        "--method",
        "dare",
        "--adapters",
        a["lora"],
        "--out",
        tmp / "o",
        "--rho",
        "1",
    ]
    return argv, lambda: None


def cli_merge_lam_nan(a, tmp, mp):
    return _merge_argv(a, tmp / "o", "--lam", "nan"), lambda: None


def cli_merge_base_missing_vision(a, tmp, mp):
    base = _copy(a["model"], tmp, "base")
    _edit_safetensors(base / "model.safetensors", _drop("vision_model.encoder"))
    argv = ["merge", "--base", base, "--method", "task_arithmetic", "--adapters", a["lora"], "--out", tmp / "o"]
    return argv, lambda: None


def _eval_argv(a, *extra):
    return ["eval", "--model", a["model"], "--dataset", a["data"], *extra]


def cli_eval_output_is_config(a, tmp, mp):
    model = _copy(a["model"], tmp, "clip")
    snap = Snap(model)
    return ["eval", "--model", model, "--dataset", a["data"], "--output", model / "config.json"], snap.unchanged


def cli_eval_output_is_meta(a, tmp, mp):
    data = _copy(a["data"], tmp, "data")
    snap = Snap(data)
    return ["eval", "--model", a["model"], "--dataset", data, "--output", data / "meta.json"], snap.unchanged


def cli_eval_output_is_adapter_config(a, tmp, mp):
    coop = _copy(a["coop"], tmp, "coop")
    snap = Snap(coop)
    return _eval_argv(a, "--adapter", coop, "--output", coop / "adapter_config.json"), snap.unchanged


def cli_eval_missing_vision(a, tmp, mp):
    model = _copy(a["model"], tmp, "clip")
    _edit_safetensors(model / "model.safetensors", _drop("vision_model."))
    return ["eval", "--model", model, "--dataset", a["data"], "--output", tmp / "e.json"], lambda: None


def cli_eval_empty_coop(a, tmp, mp):
    coop = _copy(a["coop"], tmp, "coop")
    save_file({}, str(coop / "adapter_model.safetensors"))
    return _eval_argv(a, "--adapter", coop, "--output", tmp / "e.json"), lambda: None


def cli_eval_lora_alpha_abc(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    _edit_json(lora / "adapter_config.json", lambda c: c.update(lora_alpha="abc"))
    return _eval_argv(a, "--adapter", lora, "--output", tmp / "e.json"), lambda: None


def cli_eval_bad_labels(a, tmp, mp):
    folder = _parquet_labels(a, tmp, 5)
    return ["eval", "--model", a["model"], "--dataset", folder, "--output", tmp / "e.json"], lambda: None


def cli_eval_bad_template(a, tmp, mp):
    return _eval_argv(a, "--templates", "a photo of a {{}}.", "--output", tmp / "e.json"), lambda: None


def cli_eval_output_under_file(a, tmp, mp):
    (tmp / "afile").write_text("x")
    return _eval_argv(a, "--output", tmp / "afile" / "e.json"), lambda: None


def cli_eval_enospc(a, tmp, mp):
    out = tmp / "e.json"
    out.write_text('{"old": true}')
    import hf_cft.utils

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    mp.setattr(hf_cft.utils, "atomic_write_bytes", full)
    snap = Snap(out)
    return _eval_argv(a, "--output", out), snap.unchanged


def cli_card_out_is_weights(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    snap = Snap(lora)
    return [
        "card",
        "--kind",
        "adapter",
        "--artefact",
        lora,
        "--out",
        lora / "adapter_model.safetensors",
    ], snap.unchanged


def cli_card_ctrl_c(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    (lora / "README.md").write_text("old card")
    snap = Snap(lora)
    import hf_cft.hub

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    mp.setattr(hf_cft.hub, "validate_card", interrupted)
    return ["card", "--kind", "adapter", "--artefact", lora, "--out", lora / "README.md"], snap.unchanged


def _push_argv(folder):
    # refused before any network call: an unreachable endpoint would fail differently
    return ["push", "--artefact", folder, "--repo_id", "me/x", "--endpoint", "http://127.0.0.1:9", "--token", "x"]


def cli_push_symlink_passwd(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    os.symlink("/etc/passwd", lora / "passwd.txt")
    return _push_argv(lora), lambda: None


def cli_push_symlink_inside(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    os.symlink("adapter_config.json", lora / "copy.json")
    return _push_argv(lora), lambda: None


def cli_push_symlinked_folder(a, tmp, mp):
    lora = _copy(a["lora"], tmp, "lora")
    (tmp / "secret").mkdir()
    (tmp / "secret" / "key.txt").write_text("secret")
    os.symlink(tmp / "secret", lora / "more")
    return _push_argv(lora), lambda: None


CLI = [
    ("merge --out is --base", cli_merge_into_base, r"--out .*--base"),
    ("merge --out is an adapter", cli_merge_into_adapter, r"--out .*--adapters"),
    ("merge --out inside --base", cli_merge_out_inside_base, r"--out .*--base"),
    ("merge --out contains --base", cli_merge_out_contains_base, r"--out .*--base"),
    ("merge --out under a file", cli_merge_out_under_a_file, r"--out .*lies under .*afile', which is a file"),
    ("merge with a full disk", cli_merge_enospc, r"No space left on device while writing --out .*merged"),
    ("merge --config is a folder", cli_merge_config_is_a_folder, r"--config: .* is a folder, not a YAML file"),
    ("merge of an input with NaN", cli_merge_nan_input, r"The delta of input 0 \([^()]*ft\) holds NaN/inf at key"),
    ("merge interrupted (Ctrl-C)", cli_merge_ctrl_c, r"interrupted"),
    ("merge --overwrite of a non-merge folder", cli_merge_not_a_merge_folder, r"merge_config\.json"),
    ("merge onto a read-only file system", cli_merge_read_only, r"Read-only file system"),
    ("merge --lam nan beside stale staging", cli_merge_stale_staging, r"--lam"),
    ("merge --alpha 1e308", cli_merge_alpha_huge, r"alpha|weights \[1e\+308\]"),
    ("merge --k 0", cli_merge_k_zero, r"--k|\bk\b"),
    ("merge --rho 1", cli_merge_rho_one, r"rho"),
    ("merge --lam nan", cli_merge_lam_nan, r"lam"),
    ("merge on a base without vision keys", cli_merge_base_missing_vision, r"no base key .*vision_model"),
    ("eval --output is the model's config", cli_eval_output_is_config, r"--output.*config\.json"),
    ("eval --output is the dataset's meta.json", cli_eval_output_is_meta, r"--output.*meta\.json"),
    ("eval --output is the adapter's config", cli_eval_output_is_adapter_config, r"--output.*adapter_config"),
    ("eval on a model without vision keys", cli_eval_missing_vision, r"missing key.*vision_model"),
    ("eval of an empty CoOp", cli_eval_empty_coop, r"missing"),
    ("eval on labels outside the names", cli_eval_bad_labels, r"\b5\b"),
    ("eval of a LoRA with lora_alpha='abc'", cli_eval_lora_alpha_abc, r"lora_alpha"),
    ("eval --templates 'a photo of a {{}}.'", cli_eval_bad_template, r"\{\{\}\}"),
    ("eval --output under a file", cli_eval_output_under_file, r"afile"),
    ("eval with a full disk", cli_eval_enospc, r"No space left"),
    ("card --out is the weights", cli_card_out_is_weights, r"--out.*adapter_model\.safetensors"),
    ("card interrupted (Ctrl-C)", cli_card_ctrl_c, r"interrupted"),
    ("push a symlink to /etc/passwd", cli_push_symlink_passwd, r"passwd\.txt.*symlink"),
    ("push a symlink inside the folder", cli_push_symlink_inside, r"copy\.json.*symlink"),
    ("push a symlinked sub-folder", cli_push_symlinked_folder, r"more.*symlink"),
]


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(("build", "error", "pattern"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_attack_raises_a_typed_error_naming_the_culprit(build, error, pattern, a, tmp_path, monkeypatch):
    with pytest.raises(HfCftError) as info:
        result = build(a, tmp_path, monkeypatch)
        pytest.fail(f"no error; returned {type(result).__name__}: {str(result)[:200]}")  # pragma: no cover
    exc = info.value
    assert isinstance(exc, error), f"{type(exc).__name__}: {exc}"
    assert re.search(pattern, str(exc)), f"message {str(exc)!r} does not match {pattern!r}"


@pytest.mark.parametrize("build", [c[1] for c in RESULTS], ids=[c[0] for c in RESULTS])
def test_attack_gives_the_correct_result(build, a, tmp_path, monkeypatch):
    build(a, tmp_path, monkeypatch)


@pytest.mark.parametrize(("build", "pattern"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_attack_ends_in_one_line_and_harms_nothing(build, pattern, a, tmp_path, monkeypatch, capsys):
    argv, check = build(a, tmp_path, monkeypatch)
    capsys.readouterr()
    status = main([str(x) for x in argv])
    err = capsys.readouterr().err.strip()
    assert status != 0, f"exit 0; stderr {err!r}"
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, err), f"{err!r} does not match {pattern!r}"
    check()


def test_attack_counts():
    """The tally the issue asks for; every case is one of the two kinds (typed error, correct result)."""
    ids = [c[0] for c in ERRORS + RESULTS + CLI]
    assert len(ids) == len(set(ids))
    typed, correct = len(ERRORS) + len(CLI), len(RESULTS)
    print(f"\nattack suite: tried {typed + correct}, typed error naming the culprit {typed}, correct result {correct}")
    assert typed + correct >= 100
