import json
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
