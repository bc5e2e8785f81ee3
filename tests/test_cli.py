"""The ``hf-cft`` command line on tiny artefacts saved to folders: eval (zero-shot, adapters, ConDU bundle),
merge (every method, LoRA and full models), card, plot-matrix, push; and bad input giving one-line errors."""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from hub_fake import FakeHub
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tests_helpers import CLASSES

from hf_cft import CoOpConfig, LinearHeadConfig
from hf_cft.cli import build_parser, main
from hf_cft.data import ImageTransform, from_arrays
from hf_cft.merging import (
    DeltaFusionMerger,
    PAMConfig,
    PAMState,
    SemanticRouter,
    adapter_state,
    baselines,
    compute_prototypes,
    delta_from_lora,
    delta_from_models,
    prepare_pam_model,
)
from hf_cft.models import evaluate_zeroshot, image_features
from hf_cft.recipe_utils import demo_clip

TEMPLATES = ["a photo of a {}.", "a {} thing."]
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


def _noisy(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "logit_scale":
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _model():
    prompts = [t.format(c) for c in CLASSES for t in TEMPLATES] + [f"X X X X {c}." for c in CLASSES]
    return demo_clip(prompts, image_size=16, seed=0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A model folder (tiny CLIP + its tokenizer), a Parquet dataset folder, LoRA / CoOp / head adapters, a
    fine-tuned full model, a ConDU bundle and a PAM state, all saved the way users save them."""
    root = tmp_path_factory.mktemp("cli")
    a = {"root": root}
    model, tok = _model()
    a["model"] = root / "clip"
    model.save_pretrained(a["model"])
    tok.save_pretrained(a["model"])
    # dataset folder: Parquet splits + meta.json (class names, templates), as in ../shared/data
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(18):
        img = rng.integers(0, 60, (30, 30, 3)).astype(np.uint8)
        img[..., i % 3] += 150
        images.append(img)
        labels.append(i % 3)
    data = root / "colours"
    data.mkdir()
    ds = from_arrays(images, labels, CLASSES, TEMPLATES, name="colours")["train"]
    ds.select(range(12)).to_parquet(str(data / "test.parquet"))
    ds.select(range(12, 18)).to_parquet(str(data / "train.parquet"))
    (data / "meta.json").write_text(json.dumps({"classnames": CLASSES, "templates": TEMPLATES}))
    a["data"] = data
    # adapters on a model loaded from the folder (so base_model_name_or_path is the folder)
    from transformers import AutoModel

    def base():
        return AutoModel.from_pretrained(a["model"]).eval()

    a["base"] = base
    for name, cfg in {
        "lora_a": LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "lora_b": LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False, lora_alpha=4),
        "coop": CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(tok),
        "head": LinearHeadConfig(classnames=CLASSES, templates=TEMPLATES).set_tokenizer(tok),
    }.items():
        torch.manual_seed(1)
        peft = get_peft_model(base(), cfg)
        _noisy(peft, seed=7, scale=0.2) if name in ("coop", "head") else None
        peft.save_pretrained(root / name)
        a[name] = root / name
    full = _noisy(base(), seed=3)
    full.save_pretrained(root / "full")
    a["full"] = root / "full"
    # ConDU bundle: two tasks, prototypes from the tiny CLIP
    b = base()
    merger = DeltaFusionMerger(base_model=b)
    transform = ImageTransform.from_model(b)
    px = torch.stack([transform(im) for im in images[:6]])
    feats = image_features(b, px).detach()
    for t, name in enumerate(["task_a", "task_b"]):
        protos = compute_prototypes(b, tok, (feats, torch.tensor(labels[:6])), CLASSES, TEMPLATES)
        merger.add_task(
            delta_from_models(b, _noisy(base(), seed=20 + t)),
            name,
            prototypes=protos,
            classnames=CLASSES,
            templates=TEMPLATES,
            dataset="colours",
        )
    merger.save_pretrained(root / "bundle")
    a["bundle"] = root / "bundle"
    # PAM state
    pam = prepare_pam_model(base(), LoraConfig(r=2, target_modules=["fc1"]), PAMConfig())
    state = PAMState.from_model(pam)
    state.merge({k: v + 0.1 for k, v in adapter_state(pam, "task").items()}, "task_a")
    state.save_pretrained(root / "pam")
    a["pam"] = root / "pam"
    a["tok"] = tok
    a["labels"] = torch.tensor(labels[:12])
    a["pixels"] = torch.stack([transform(im) for im in images[:12]])
    return a


def run(*argv):
    return main([str(x) for x in argv])


def _eval_json(tmp_path, *extra):
    out = tmp_path / "eval.json"
    assert run("eval", "--output", out, *extra) == 0
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ eval


def test_eval_zero_shot_matches_the_library(assets, tmp_path, capsys):
    got = _eval_json(tmp_path, "--model", assets["model"], "--dataset", assets["data"])
    base = assets["base"]()
    from hf_cft.data import load_classification_dataset

    ds = load_classification_dataset(assets["data"])
    ref = evaluate_zeroshot(base, assets["tok"], ds["test"], CLASSES, TEMPLATES)
    assert got["accuracy"] == ref.accuracy and got["total"] == 12 and got["num_templates"] == 2
    assert got["results"] == [{"name": "colours", "split": "test", "num_classes": 3, "accuracy": ref.accuracy}]
    assert f"accuracy {ref.accuracy:.2f}%" in capsys.readouterr().out
    # --templates and --limit are honoured
    got = _eval_json(
        tmp_path, "--model", assets["model"], "--dataset", assets["data"], "--limit", "5", "--templates", "a {} thing."
    )
    assert got["total"] == 5 and got["num_templates"] == 1


@pytest.mark.parametrize("kind", ["coop", "head", "lora_a"])
def test_eval_adapter_matches_a_direct_computation(kind, assets, tmp_path):
    got = _eval_json(tmp_path, "--model", assets["model"], "--adapter", assets[kind], "--dataset", assets["data"])
    peft = PeftModel.from_pretrained(assets["base"](), assets[kind]).eval()
    px, labels = assets["pixels"], assets["labels"]
    with torch.no_grad():
        if kind == "head":
            logits = peft.classify(px)
        else:
            from hf_cft.models import build_zeroshot_classifier

            head = (
                peft.class_text_features(assets["tok"], CLASSES)
                if kind == "coop"
                else build_zeroshot_classifier(peft, assets["tok"], CLASSES, TEMPLATES)
            )
            logits = image_features(peft, px) @ head.t()
    expected = 100.0 * int((logits.argmax(-1) == labels).sum()) / len(labels)
    assert math.isclose(got["accuracy"], expected, abs_tol=1e-9)
    assert "adapter 'default'" in got["evaluated"] and got["adapter"] == str(assets[kind])


def test_eval_adapter_without_model_uses_the_base_it_records(assets, tmp_path, capsys):
    with_model = _eval_json(
        tmp_path, "--model", assets["model"], "--adapter", assets["coop"], "--dataset", assets["data"]
    )
    without = _eval_json(tmp_path, "--adapter", assets["coop"], "--dataset", assets["data"])
    assert without["accuracy"] == with_model["accuracy"] and without["model"] == str(assets["model"])
    # no --model and nothing recorded: one line naming what to pass
    bare = tmp_path / "bare"
    shutil.copytree(assets["coop"], bare)
    cfg = json.loads((bare / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert run("eval", "--adapter", bare, "--dataset", assets["data"]) == 2
    assert "does not record its base model" in capsys.readouterr().err
    assert run("eval", "--dataset", assets["data"]) == 2
    assert "--model is required" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["model", "coop", "head"])
def test_eval_base_novel_matches_hf_cft_evaluate(kind, assets, tmp_path, capsys):
    """``--base_novel``: base (first ⌈C/2⌉ classes) and novel each over their own classes, and their HM — the numbers
    of ``hf_cft.evaluate(..., base_novel=True)`` with the adapter loaded by hand."""
    import hf_cft
    from hf_cft.data import load_classification_dataset

    extra = [] if kind == "model" else ["--adapter", assets[kind]]
    got = _eval_json(tmp_path, "--model", assets["model"], *extra, "--dataset", assets["data"], "--base_novel")
    printed = capsys.readouterr().out
    model = assets["base"]() if kind == "model" else PeftModel.from_pretrained(assets["base"](), assets[kind])
    ref = hf_cft.evaluate(model, assets["tok"], load_classification_dataset(assets["data"]), base_novel=True)
    if kind == "head":  # a head trained on all 3 classes: base/novel are its columns 0-1 and 2
        assert ref.classnames == {"base": CLASSES[:2], "novel": CLASSES[2:]}
    assert (got["base"]["accuracy"], got["novel"]["accuracy"], got["hm"]) == (ref.base, ref.novel, ref.hm)
    assert [(r["name"], r["num_classes"]) for r in got["results"]] == [("base", 2), ("novel", 1)]
    assert f"base classes, {got['base']['total']} images, 2 classes" in printed
    assert f"harmonic mean of base and novel {ref.hm:.2f}" in printed
    card = tmp_path / "README.md"
    if kind != "model":  # the eval JSON feeds the card, HM included
        assert (
            run(
                "card",
                "--kind",
                "adapter",
                "--artefact",
                assets[kind],
                "--results",
                tmp_path / "eval.json",
                "--out",
                card,
            )
            == 0
        )
        assert f"Harmonic mean of base and novel accuracy: **{ref.hm:.2f}**" in card.read_text()


def test_eval_labels_a_merged_model_as_merged(assets, tmp_path):
    out = tmp_path / "merged"
    assert (
        run(
            "merge",
            "--base",
            assets["model"],
            "--method",
            "ties",
            "--adapters",
            assets["lora_a"],
            assets["full"],
            "--out",
            out,
        )
        == 0
    )
    got = _eval_json(tmp_path, "--model", out, "--dataset", assets["data"])
    assert got["evaluated"] == "merged model (ties of 2 delta(s)), template-ensembled text head"
    plain = _eval_json(tmp_path, "--model", assets["model"], "--dataset", assets["data"])
    assert plain["evaluated"] == "CLIPModel, template-ensembled text head"
    # a full fine-tune saved with hf_cft's card (the trainer's save_model writes it) is labelled as one
    import shutil

    from hf_cft.hub import finetuned_model_card

    tuned = tmp_path / "tuned"
    shutil.copytree(assets["model"], tuned)
    finetuned_model_card(tuned, model_name="ft", dataset_name="colours", classnames=CLASSES).save(tuned / "README.md")
    got = _eval_json(tmp_path, "--model", tuned, "--dataset", assets["data"])
    assert got["evaluated"] == "fine-tuned model, template-ensembled text head"


def test_eval_condu_bundle_routing_and_known_task(assets, tmp_path):
    routed = _eval_json(
        tmp_path, "--model", assets["model"], "--bundle", assets["bundle"], "--dataset", assets["data"], "--top_k", "1"
    )
    known = _eval_json(
        tmp_path,
        "--model",
        assets["model"],
        "--bundle",
        assets["bundle"],
        "--dataset",
        assets["data"],
        "--task",
        "task_b",
    )
    base = assets["base"]()
    router = SemanticRouter(
        DeltaFusionMerger.from_pretrained(assets["bundle"], base_model=base), base, assets["tok"], top_k=1
    )
    px, labels = assets["pixels"], assets["labels"]
    for got, task in ((routed, None), (known, "task_b")):
        preds = router.predict(px, CLASSES, TEMPLATES, task=task)
        assert math.isclose(got["accuracy"], 100.0 * int((preds == labels).sum()) / len(labels), abs_tol=1e-9)
    assert "routing, top-1" in routed["evaluated"] and "'task_b'" in known["evaluated"]


# ------------------------------------------------------------------------------------------------ merge


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.parametrize(
    ("method", "extra", "reference"),
    [
        ("task_arithmetic", ["--lam", "0.4"], lambda ds: baselines.task_arithmetic(ds, lam=0.4)),
        ("ties", ["--k", "0.5"], lambda ds: baselines.ties(ds, k=0.5, lam=1.0)),
        (
            "ties",
            ["--k", "0.5", "--trim_scope", "model", "--disjoint_merge", "sum"],
            lambda ds: baselines.ties(ds, k=0.5, lam=1.0, trim_scope="model", merge="sum"),
        ),
        ("dare", ["--rho", "0.5", "--seed", "3"], lambda ds: baselines.dare(ds, rho=0.5, seed=3, then="ta")),
        ("magmax", [], lambda ds: baselines.magmax(ds, lam=0.5)),
        ("magmax", ["--tie_break", "earlier"], lambda ds: baselines.magmax(ds, lam=0.5, tie_break="earlier")),
    ],
)
def test_merge_lora_and_full_model_equals_the_library_merge(method, extra, reference, assets, tmp_path):
    out = tmp_path / "merged"
    sources = [assets["lora_a"], assets["lora_b"], assets["full"]]
    assert (
        run("merge", "--base", assets["model"], "--method", method, "--adapters", *sources, "--out", out, *extra) == 0
    )
    base = assets["base"]()
    deltas = [
        delta_from_lora(assets["lora_a"], base),
        delta_from_lora(assets["lora_b"], base),
        delta_from_models(base, assets["full"]),
    ]
    keys = sorted({k for d in deltas for k in d})
    state = base.state_dict()
    dense = [{k: d.get(k, torch.zeros_like(state[k])) for k in keys} for d in deltas]
    merged = reference(dense)
    got = _weights(out)
    for k in keys:
        torch.testing.assert_close(got[k], state[k] + merged[k], rtol=0, atol=1e-6)
    assert torch.equal(got["logit_scale"], state["logit_scale"])  # never part of a delta
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    assert json.loads((out / "merge_config.json").read_text())["method"] == method


def test_merge_wise_of_one_full_model(assets, tmp_path):
    out = tmp_path / "wise"
    assert (
        run(
            "merge",
            "--base",
            assets["model"],
            "--method",
            "wise",
            "--adapters",
            assets["full"],
            "--alpha",
            "0.25",
            "--out",
            out,
        )
        == 0
    )
    base, ft = assets["base"]().state_dict(), _weights(assets["full"])
    got = _weights(out)
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(got[key], base[key] + 0.25 * (ft[key] - base[key]), rtol=0, atol=1e-6)
    from hf_cft.hub import load_model

    assert load_model(out) is not None  # the merged folder loads as a CLIP model


def test_merge_bad_input_gives_one_line_errors(assets, tmp_path, capsys):
    cases = [
        (["--method", "wise", "--adapters", assets["lora_a"], assets["lora_b"]], "wise interpolates one"),
        (["--method", "ties", "--k", "0", "--adapters", assets["lora_a"]], r"--k must lie in \(0, 1\]"),
        (["--method", "dare", "--rho", "1", "--adapters", assets["lora_a"]], r"--rho must lie in \[0, 1\)"),
        (["--method", "task_arithmetic", "--adapters", assets["coop"]], "only LoRA adapters have a delta"),
        (["--method", "task_arithmetic", "--adapters", assets["data"]], "neither a PEFT adapter folder nor a model"),
        (
            ["--method", "task_arithmetic", "--adapters", assets["root"] / "missing"],
            "--adapters entry 1 .* is neither a local folder nor a Hub id that could be fetched \\(no such folder\\)",
        ),
    ]
    for argv, message in cases:
        assert run("merge", "--base", assets["model"], "--out", tmp_path / "o", *argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (above it: transformers' weight-loading progress bar)
        assert last.startswith("hf-cft merge: error: ") and "Traceback" not in err, err
        assert re.search(message, last), (message, err)
    (tmp_path / "full_out").mkdir()
    (tmp_path / "full_out" / "x").write_text("x")
    assert (
        run(
            "merge",
            "--base",
            assets["model"],
            "--method",
            "magmax",
            "--adapters",
            assets["lora_a"],
            "--out",
            tmp_path / "full_out",
        )
        == 2
    )
    assert "is not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ card


def test_card_from_eval_json_for_every_kind(assets, tmp_path):
    ev = _eval_json(tmp_path, "--model", assets["model"], "--adapter", assets["coop"], "--dataset", assets["data"])
    readme = tmp_path / "README.md"
    assert (
        run(
            "card",
            "--kind",
            "adapter",
            "--artefact",
            assets["coop"],
            "--results",
            tmp_path / "eval.json",
            "--out",
            readme,
            "--base_model",
            "openai/clip-vit-base-patch16",
        )
        == 0
    )
    meta = ModelCard.load(readme).data.to_dict()
    (result,) = meta["model-index"][0]["results"]
    assert (
        result["metrics"][0]["value"] == round(ev["accuracy"], 4)
        and result["dataset"]["name"] == "colours"  # not "colours (colours)"
    )
    assert meta["base_model"] == "openai/clip-vit-base-patch16" and meta["library_name"] == "peft"
    assert (
        run(
            "card",
            "--kind",
            "mergetune",
            "--artefact",
            assets["full"],
            "--results",
            tmp_path / "eval.json",
            "--out",
            readme,
        )
        == 0
    )
    assert ModelCard.load(readme).data.library_name == "transformers"
    matrix = tmp_path / "accuracy_matrix.json"
    matrix.write_text(
        json.dumps(
            {
                "strategy": "condu",
                "names": ["task_a", "task_b"],
                "values": [[50.0, 40.0], [45.0, 60.0]],
                "metrics": {"transfer": 40.0, "average": 48.75, "last": 52.5, "bwt": -5.0},
            }
        )
    )
    for kind in ("condu", "pam"):
        assert (
            run(
                "card",
                "--kind",
                kind,
                "--artefact",
                assets[{"condu": "bundle", "pam": "pam"}[kind]],
                "--results",
                matrix,
                "--out",
                readme,
            )
            == 0
        )
        card = ModelCard.load(readme)
        values = {
            (r["dataset"]["name"], m["type"]): m["value"]
            for r in card.data.to_dict()["model-index"][0]["results"]
            for m in r["metrics"]
        }
        assert values[("task_b", "accuracy")] == 60.0 and values[("task stream: task_a → task_b", "bwt")] == -5.0
        assert "| task_a | 50.0 | 40.0 |" in card.text


def test_card_bad_results_file(assets, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    assert (
        run(
            "card",
            "--kind",
            "adapter",
            "--artefact",
            assets["coop"],
            "--results",
            tmp_path / "bad.json",
            "--out",
            tmp_path / "R.md",
        )
        == 2
    )
    assert "is not valid JSON" in capsys.readouterr().err
    (tmp_path / "nan.json").write_text(json.dumps({"results": [{"name": "x", "accuracy": float("nan")}]}))
    assert (
        run(
            "card",
            "--kind",
            "adapter",
            "--artefact",
            assets["coop"],
            "--results",
            tmp_path / "nan.json",
            "--out",
            tmp_path / "R.md",
        )
        == 2
    )
    assert "finite values only" in capsys.readouterr().err and not (tmp_path / "R.md").exists()


# ------------------------------------------------------------------------------------------------ plot, push


def test_plot_matrix(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("hf_cft.plots.matrix", reason="hf_cft.plots.matrix comes with the continual driver")
    matrix = tmp_path / "m.json"
    matrix.write_text(
        json.dumps({"names": ["a", "b", "c"], "values": [[50, 20, 10], [45, 60, 15], [None, None, None]]})
    )
    assert run("plot-matrix", "--matrix", matrix, "--out", tmp_path / "m.png", "--title", "toy") == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    matrix.write_text(json.dumps({"names": ["a", "a"], "values": [[1, 2], [3, 4]]}))
    assert run("plot-matrix", "--matrix", matrix, "--out", tmp_path / "x.png") == 2
    assert "must be unique" in capsys.readouterr().err
    matrix.write_text(json.dumps({"names": ["a", "b"], "values": [[1, 2, 3]]}))
    assert run("plot-matrix", "--matrix", matrix, "--out", tmp_path / "x.png") == 2
    assert "2×2 matrix" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_push_folder_with_its_card(assets, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    assert run("card", "--kind", "pam", "--artefact", assets["pam"], "--out", readme) == 0
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as hub:
        assert (
            run(
                "push",
                "--artefact",
                assets["pam"],
                "--repo_id",
                "me/pam",
                "--card",
                readme,
                "--endpoint",
                hub.url,
                "--token",
                "hf_fake",
            )
            == 0
        )
        assert set(hub.files("me/pam")) == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "pam_state.json",
            "README.md",
        }
        assert hub.files("me/pam")["README.md"] == readme.read_bytes()


# ------------------------------------------------------------------------------------------------ plumbing


def test_bad_eval_input_exits_with_a_message(assets, tmp_path, capsys):
    assert run("eval", "--model", assets["model"], "--dataset", "no_such_dataset", "--output", tmp_path / "e") == 2
    assert "Unknown dataset 'no_such_dataset'" in capsys.readouterr().err
    assert run("eval", "--model", assets["model"], "--dataset", assets["data"], "--split", "val") == 2
    assert "has no split 'val'" in capsys.readouterr().err
    assert run("eval", "--model", assets["model"], "--dataset", assets["data"], "--task", "x") == 2
    assert "--task selects a task of a ConDU bundle" in capsys.readouterr().err
    assert (
        run(
            "eval",
            "--model",
            assets["model"],
            "--bundle",
            assets["bundle"],
            "--task",
            "nope",
            "--dataset",
            assets["data"],
        )
        == 2
    )
    assert "Unknown task 'nope'" in capsys.readouterr().err
    assert run("eval", "--model", assets["model"], "--dataset", assets["data"], "--templates", "no placeholder") == 2
    assert "exactly one '{}'" in capsys.readouterr().err
    assert run("eval", "--model", assets["lora_a"], "--dataset", assets["data"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: --adapter and --bundle are exclusive
        run("eval", "--model", assets["model"], "--adapter", "a", "--bundle", "b", "--dataset", "d")
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_console_script_points_at_main():
    import importlib

    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, func = pyproject["project"]["scripts"]["hf-cft"].split(":")
    assert getattr(importlib.import_module(module), func) is main
    assert set(build_parser()._subparsers._group_actions[0].choices) == {
        "eval",
        "merge",
        "card",
        "plot-matrix",
        "push",
        "convert-open-clip",
        "config",
    }
