import json
import re
from pathlib import Path

import pytest
from tests_helpers import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_zeroshot_recipe_offline_default(tmp_path):
    zs = load_recipe("zeroshot")
    (args,) = zs.parse_recipe_args(zs.ZeroShotArguments, args=["--output_dir", str(tmp_path)])
    assert args.datasets == ["digits"] and args.model_name_or_path is None
    result = zs.main(args)
    saved = json.loads((tmp_path / "zeroshot_results.json").read_text())
    row = saved["results"]["digits"]
    assert row["total"] == result["results"]["digits"]["total"] == 539
    assert 0.0 <= row["accuracy"] <= 100.0 and row["num_classes"] == 10
    assert "tiny random CLIP" in saved["model"]


def test_recipe_config_file_and_overrides(tmp_path):
    zs = load_recipe("zeroshot")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets: [a, b]\nbatch_size: 7\n")
    (args,) = zs.parse_recipe_args(zs.ZeroShotArguments, args=["--config", str(cfg), "--batch_size", "9"])
    assert args.datasets == ["a", "b"] and args.batch_size == 9
    cfg.write_text("no_such_argument: 1\n")
    with pytest.raises(SystemExit, match="no_such_argument"):
        zs.parse_recipe_args(zs.ZeroShotArguments, args=["--config", str(cfg)])


def test_coop_recipe_offline_default_writes_adapter_card_results(tmp_path):
    from huggingface_hub import ModelCard
    from peft import PeftConfig

    coop = load_recipe("coop")
    argv = [
        "--output_dir",
        str(tmp_path),
        "--num_train_epochs",
        "1",
        "--report_to",
        "none",
        "--shots",
        "4",
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    args, targs = coop.parse_recipe_args(coop.CoOpRecipeArguments, coop.ClipTrainingArguments, args=argv)
    result = coop.main(args, targs)
    assert set(result["results"]["CoOp"]) == {"base", "novel", "train", "hm"}
    assert result["train_images"] == 4 * 5
    assert PeftConfig.from_pretrained(tmp_path / "adapter").peft_type == "HF_CFT_COOP"
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification" and "coop" in card.data.tags
    index = card.data.to_dict()["model-index"][0]["results"]
    assert {r["dataset"]["config"] for r in index} == {"base", "novel", "train"}
    accs = {r["dataset"]["config"]: r["metrics"][0]["value"] for r in index}
    assert accs["base"] == round(result["results"]["CoOp"]["base"], 4)
    assert json.loads((tmp_path / "results.json").read_text())["dataset"] == "digits"


def test_mergetune_recipe_runs_end_to_end(tmp_path, monkeypatch):
    mt = load_recipe("mergetune")
    monkeypatch.setattr(mt, "DEMO_CACHE", tmp_path / "demo-cache")
    argv = [
        "--output_dir",
        str(tmp_path / "out"),
        "--num_train_epochs",
        "1",
        "--coop_epochs",
        "1",
        "--shots",
        "4",
        "--demo_pretrain_steps",
        "3",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    args, targs = mt.parse_recipe_args(mt.MergeTuneRecipeArguments, mt.MergeTuneConfig, args=argv)
    result = mt.main(args, targs)
    rows = result["results"]
    assert set(rows) == {"zero-shot (ensemble)", "zero-shot ('a photo of a {}.')", "CoOp", "CoOp + MergeTune"}
    assert all({"base", "novel", "hm"} <= set(r) for r in rows.values())
    out = tmp_path / "out"
    assert (out / "paths.png").is_file() and (out / "results.json").is_file()
    assert (out / "coop" / "adapter_config.json").is_file()
    cards = list((out / "mergetune").rglob("README.md"))
    assert cards and "MergeTune" in cards[0].read_text()
    assert set(result["paths"]["base"]["paths"]) == {"zero-shot → CoOp", "zero-shot → MergeTune", "CoOp → MergeTune"}


def test_mergetune_recipe_validation_split_and_output_ensemble(tmp_path, monkeypatch):
    """--eval_split val evaluates on downstream-pool images that are neither training shots nor seen by the demo
    CLIP's pretraining (--demo_pretrain_pool 0.7); --output_ensemble γ adds each learned head mixed with the
    zero-shot ensemble's, (1 − γ)·T_zs + γ·T, as two more rows."""
    import torch

    from hf_cft.data import labels_of, split_per_class
    from hf_cft.models import build_zeroshot_classifier

    mt = load_recipe("mergetune")
    monkeypatch.setattr(mt, "DEMO_CACHE", tmp_path / "demo-cache")
    argv = ["--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1", "--coop_epochs", "1", "--shots", "4"]
    argv += ["--demo_pretrain_steps", "3", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"]
    argv += ["--disable_tqdm", "true", "--downstream_pool", "true", "--demo_pretrain_pool", "0.7"]
    argv += ["--eval_split", "val", "--val_shots", "3", "--output_ensemble", "0.5"]
    args, targs = mt.parse_recipe_args(mt.MergeTuneRecipeArguments, mt.MergeTuneConfig, args=argv)
    seen = {}
    real_evaluate = mt.evaluate

    def spy(model, tokenizer, splits, names, *rest, **kw):
        seen["splits"], seen["names"] = splits, names
        seen.setdefault("heads", []).append(kw.get("heads"))
        return real_evaluate(model, tokenizer, splits, names, *rest, **kw)

    monkeypatch.setattr(mt, "evaluate", spy)
    result = mt.main(args, targs)
    rows = result["results"]
    assert list(rows)[-2:] == ["CoOp ⊕ zero-shot (γ = 0.5)", "CoOp + MergeTune ⊕ zero-shot (γ = 0.5)"]
    assert result["eval_split"] == "val" and result["output_ensemble"] == 0.5
    # the validation images: 3 per class, all from the downstream pool (base: drawn after the shots, disjoint)
    task = mt.load_task("digits")
    pool = split_per_class(task["train"], 0.7, seed=0)[1]
    pool_images = {r["image"].tobytes() for r in pool}
    for split, n in (("base", 5), ("novel", 5)):
        ds = seen["splits"][split][1]
        assert len(ds) == 3 * n and sorted(set(labels_of(ds))) == list(range(n))
        assert all(r["image"].tobytes() in pool_images for r in ds)
    # the mixed heads are exactly (1 − γ)·zero-shot + γ·learned, and change the result of at least one row
    mixed = [h for h in seen["heads"] if h is not None]
    assert len(mixed) == 2 and mixed[0]["base"].shape[0] == 5
    model, tok, _ = mt.load_clip(str(mt.demo_clip(3, pool=0.7, views="described")))
    with torch.no_grad():
        zs = build_zeroshot_classifier(model, tok, seen["names"]["novel"], task.templates)
    learned = (mixed[0]["novel"] - 0.5 * zs) / 0.5
    assert torch.allclose(learned.norm(dim=-1), torch.ones(5), atol=1e-4)  # unit rows: CoOp's class features
    assert (tmp_path / "demo-cache" / "steps3-seed0-pool0.7-described" / "model" / "config.json").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval_split", "dev"], "--eval_split must be test or val"),
        (["--eval_split", "val", "--downstream_pool", "false"], "add --downstream_pool true"),
        (["--eval_split", "val", "--demo_pretrain_pool", "1"], "add --downstream_pool true"),  # auto: no pool
        (["--eval_split", "val", "--downstream_pool", "true", "--demo_pretrain_pool", "0.5"], "--demo_pretrain_pool 0.7"),
        (["--eval_split", "val", "--downstream_pool", "true", "--val_shots", "0"], "--val_shots must be at least 1"),
        (["--demo_pretrain_pool", "1.5"], "--demo_pretrain_pool must be in (0, 1]"),
        (["--demo_pretrain_views", "sketchy"], "--demo_pretrain_views must be one of ['clean', 'described']"),
        (["--output_ensemble", "1.5"], "--output_ensemble γ must be in [0, 1], got 1.5"),
        (["--output_ensemble", "nan"], "--output_ensemble γ must be in [0, 1], got nan"),
        (["--output_ensemble", "0.5", "--base_method", "vpt"], "it needs a prompt method"),
    ],
)
def test_mergetune_recipe_refuses_bad_evaluation_flags(flags, message, tmp_path, monkeypatch):
    mt = load_recipe("mergetune")
    monkeypatch.setattr(mt, "DEMO_CACHE", tmp_path / "demo-cache")
    argv = ["--output_dir", str(tmp_path / "out"), "--demo_pretrain_steps", "3", "--use_cpu", "true", *flags]
    args, targs = mt.parse_recipe_args(mt.MergeTuneRecipeArguments, mt.MergeTuneConfig, args=argv)
    with pytest.raises(SystemExit, match=re.escape(message)):
        mt.main(args, targs)
    assert not (tmp_path / "demo-cache").exists()  # refused before any pretraining


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kgcoop", "vpt"])
def test_mergetune_recipe_other_base_methods(method, tmp_path, monkeypatch):
    """--base_method kgcoop / vpt: the fine-tuned solution is KgCoOp / VPT, then MergeTune on its adapter."""
    mt = load_recipe("mergetune")
    monkeypatch.setattr(mt, "DEMO_CACHE", tmp_path / "demo-cache")
    argv = ["--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1", "--coop_epochs", "1", "--shots", "4"]
    argv += ["--demo_pretrain_steps", "3", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"]
    argv += ["--disable_tqdm", "true", "--base_method", method, "--weight_ensemble", "0.5"]
    args, targs = mt.parse_recipe_args(mt.MergeTuneRecipeArguments, mt.MergeTuneConfig, args=argv)
    result = mt.main(args, targs)
    label = {"kgcoop": "KgCoOp", "vpt": "VPT"}[method]
    assert {label, f"{label} + MergeTune"} <= set(result["results"])
    assert result["base_method"] == method and result["mergetune"]["weight_ensemble"] == 0.5
    out = tmp_path / "out"
    assert (out / method / "adapter_config.json").is_file() and (out / "paths.png").is_file() == (method != "vpt")
    cards = list((out / "mergetune").rglob("README.md"))
    assert cards and f"continued {label}" in cards[0].read_text()
