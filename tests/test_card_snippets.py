"""Model cards as a user reads them: the loading snippet of every card kind runs as written (no undefined names)
and gives ``hf_cft.class_logits``'s logits; a local base model is plain text, a Hub id a link; the license is
stated (given, inherited from the base model's card, else ``unknown``) with the data's terms; baselines get their
HM; a result row named like its dataset is not repeated ("dtd10 (dtd10)")."""

import re

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from PIL import Image

import hf_cft
from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.hub import adapter_card, condu_card, mergetune_card, pam_card, validate_card
from hf_cft.merging import DeltaFusionMerger, PAMConfig, PAMState, delta_from_models, prepare_pam_model
from hf_cft.recipe_utils import demo_clip

NAMES = ["cat", "dog", "sea lion"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards") / "clip"
    model, tok = demo_clip([f"a photo of a {c}." for c in NAMES] + ["X X X X cat."], image_size=16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _load_base(folder):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _perturb(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _run_snippet(card, workdir, monkeypatch):
    """Execute the card's python block in ``workdir`` (which holds image.jpg); return its namespace."""
    (block,) = re.findall(r"```python\n(.*?)```", str(card), flags=re.S)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(
        workdir / "image.jpg"
    )
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(block, "card-snippet", "exec"), namespace)  # noqa: S102 - the snippet is the thing under test
    return namespace


def _expected(model, tok, classnames, **kw):
    px = hf_cft.eval_transform(model if not hasattr(model, "merger") else model.base_model)(
        Image.open("image.jpg")
    ).unsqueeze(0)
    return hf_cft.class_logits(model, tok, px, classnames, **kw)


@pytest.mark.parametrize("kind", ["coop", "head", "lora", "vpt"])
def test_adapter_card_snippet_runs_as_written(kind, base_folder, tmp_path, monkeypatch):
    base, tok = _load_base(base_folder)
    config = {
        "coop": lambda: CoOpConfig(n_ctx=4, classnames=NAMES).set_tokenizer(tok),
        "head": lambda: LinearHeadConfig(classnames=NAMES, templates=["a photo of a {}."]).set_tokenizer(tok),
        "lora": lambda: LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        "vpt": lambda: VPTConfig(n_tokens=2),
    }[kind]()
    peft = _perturb(get_peft_model(base, config)).eval()
    peft.save_pretrained(tmp_path / "adapter")
    card = adapter_card(
        tmp_path / "adapter",
        model_name=f"{kind}-toy",
        dataset_name="toy",
        base_model=str(base_folder),
        repo_id=str(tmp_path / "adapter"),
    )
    ns = _run_snippet(card, tmp_path, monkeypatch)
    names = NAMES if kind in ("coop", "head") else ["cat", "dog"]  # LoRA / VPT carry no class names
    assert ns["classnames"] == names
    torch.testing.assert_close(ns["logits"], _expected(peft, tok, names))


@pytest.mark.parametrize("family", ["coop", "full"])
def test_mergetune_card_snippet_runs_as_written(family, base_folder, tmp_path, monkeypatch):
    base, tok = _load_base(base_folder)
    if family == "coop":
        model = _perturb(get_peft_model(base, CoOpConfig(n_ctx=4, classnames=NAMES).set_tokenizer(tok))).eval()
    else:
        model = _perturb(base, scale=0.05)
    model.save_pretrained(tmp_path / "continued")
    card = mergetune_card(
        tmp_path / "continued",
        model_name="mt",
        dataset_name="toy",
        base_model=str(base_folder),
        repo_id=str(tmp_path / "continued"),
        results=[{"name": "base", "accuracy": 70.0}, {"name": "novel", "accuracy": 50.0}],
        hm=58.33,
        baselines={"zero-shot": {"base": 60.0, "novel": 80.0}, "fine-tuned": {"base": 90.0}},
    )
    ns = _run_snippet(card, tmp_path, monkeypatch)
    names = NAMES if family == "coop" else ["cat", "dog"]
    torch.testing.assert_close(ns["logits"], _expected(model, tok, names))
    # baselines: HM computed where base and novel are known (never a blank cell), left blank otherwise
    assert "| zero-shot | 60.00 | 80.00 | 68.57 |" in card.text
    assert "| fine-tuned | 90.00 |  |  |" in card.text


def test_condu_and_pam_card_snippets_run_as_written(base_folder, tmp_path, monkeypatch):
    base, tok = _load_base(base_folder)
    merger = DeltaFusionMerger(base_model=base, base_model_name_or_path=str(base_folder))
    for t, name in enumerate(("task_a", "task_b")):
        expert = _perturb(_load_base(base_folder)[0], seed=5 + t, scale=0.05)
        merger.add_task(
            delta_from_models(base, expert, keys=["visual_projection.weight"]),
            name,
            classnames=NAMES,
            prototypes=torch.randn(3, base.config.projection_dim),
        )
    merger.save_pretrained(tmp_path / "bundle")
    card = condu_card(merger, repo_id=str(tmp_path / "bundle"))
    ns = _run_snippet(card, tmp_path, monkeypatch)
    from hf_cft.merging import SemanticRouter

    router = SemanticRouter(merger, base, tok, top_k=4)
    torch.testing.assert_close(ns["logits"], _expected(router, tok, NAMES, task="task_a"))

    pam_model = prepare_pam_model(_load_base(base_folder)[0], LoraConfig(r=2, target_modules=["fc1"]), PAMConfig())
    state = PAMState.from_model(pam_model)
    state.save_pretrained(tmp_path / "pam")
    card = pam_card(state, base_model=str(base_folder), repo_id=str(tmp_path / "pam"))
    ns = _run_snippet(card, tmp_path, monkeypatch)
    assert ns["logits"].shape == (1, 2) and isinstance(ns["state"], PAMState)


def test_base_model_link_license_and_data_terms(base_folder, tmp_path):
    base, tok = _load_base(base_folder)
    peft = get_peft_model(base, CoOpConfig(n_ctx=4, classnames=NAMES).set_tokenizer(tok))
    local = adapter_card(
        peft,
        model_name="a",
        dataset_name="dtd10",
        base_model=str(base_folder),
        results=[{"name": "dtd10", "accuracy": 50.0}],
    )
    assert f"`{base_folder}` (a local model folder)" in local.text and "](#)" not in local.text
    meta = validate_card(local)
    assert meta["license"] == "unknown" and "`unknown` — none was stated" in local.text
    assert "**Data terms:** not recorded" in local.text
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "dtd10"  # not "dtd10 (dtd10)"

    hub = adapter_card(
        peft,
        model_name="a",
        dataset_name="dtd10",
        base_model="openai/clip-vit-base-patch16",
        license="mit",
        dataset_terms="DTD: research purposes only.",
    )
    assert "[openai/clip-vit-base-patch16](https://huggingface.co/openai/clip-vit-base-patch16)" in hub.text
    assert validate_card(hub)["license"] == "mit" and "**License:** `mit`." in hub.text
    assert "**Data terms:** DTD: research purposes only." in hub.text

    # a base model whose card states a license passes it on, unless one is given
    with_card = tmp_path / "licensed"
    with_card.mkdir()
    ModelCard("---\nlicense: bsd-3-clause\n---\n# base\n").save(with_card / "README.md")
    inherited = adapter_card(peft, model_name="a", dataset_name="toy", base_model=str(with_card))
    assert validate_card(inherited)["license"] == "bsd-3-clause"
    assert "`bsd-3-clause` (the base model's license)" in inherited.text
    assert (
        validate_card(
            adapter_card(peft, model_name="a", dataset_name="toy", base_model=str(with_card), license="cc-by-nc-4.0")
        )["license"]
        == "cc-by-nc-4.0"
    )
