"""Hub round trips and model cards for every hf_cft artefact.

Pushes go over real HTTP to a local stand-in of the Hub's write API (``tests/hub_fake.py``: create repo, validate
README metadata, preupload, NDJSON commit); pulls read the files that commit stored, through the artefacts' own
``from_pretrained(<repo id>)`` with ``snapshot_download`` pointed at them.
"""

import copy
import json
import math

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, parse_eval_result_entries
from peft import LoraConfig, get_peft_model

from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.errors import AdapterError, BundleError, CardError, HubError, NotCLIPLikeError
from hf_cft.hub import (
    adapter_card,
    condu_card,
    eval_result_entries,
    eval_results_files,
    load_adapter,
    load_adapter_model,
    load_model,
    mergetune_card,
    pam_card,
    push_adapter_to_hub,
    push_folder_to_hub,
    push_to_hub,
    snapshot,
    validate_card,
)
from hf_cft.merging import DeltaFusionMerger, PAMConfig, PAMState, adapter_state, delta_from_models, prepare_pam_model
from hf_cft.models import image_features
from hf_cft.testing import tiny_clip

CLASSES = ["cat", "dog", "sea lion"]
BASE_ID = "openai/clip-vit-base-patch16"
PIXELS = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
ROWS = [
    {"name": "base", "num_classes": 2, "accuracy": 81.25, "dataset_id": "hf-cft/toy"},
    {"name": "novel", "num_classes": 1, "accuracy": 62.5},
]
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# PEFT looks for the base model's config to decide on saving embeddings; offline it cannot, and says so
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _pull_from(monkeypatch, hub, tmp_path):
    """Route snapshot_download(repo_id) to the files the fake Hub stored for that repo."""
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(hub.materialise(repo_id, tmp_path / "pulled" / repo_id.replace("/", "__")))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


def _named(model):
    """A tiny CLIP that says where it came from, as a model loaded with from_pretrained(BASE_ID) does."""
    model.name_or_path = BASE_ID
    return model


def _adapter(kind, tok, seed=1):
    configs = {
        "coop": lambda: CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(tok),
        "vpt": lambda: VPTConfig(n_tokens=2),
        "head": lambda: LinearHeadConfig(classnames=CLASSES, templates=["a photo of a {}."]).set_tokenizer(tok),
        "lora": lambda: LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    }
    model = get_peft_model(_named(tiny_clip()), configs[kind]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _outputs(model, tok, kind):
    with torch.no_grad():
        if kind == "coop":
            return model.class_text_features(tok, CLASSES)
        if kind == "head":
            return model.classify(PIXELS)
        return image_features(model, PIXELS)


def _meta(text_or_bytes):
    text = text_or_bytes.decode() if isinstance(text_or_bytes, bytes) else str(text_or_bytes)
    card = ModelCard(text, ignore_metadata_errors=False)
    return card, card.data.to_dict()


def _metrics(meta):
    """{(dataset name, metric type): value} from model-index."""
    (entry,) = meta["model-index"]
    out = {}
    for result in entry["results"]:
        assert result["task"]["type"] == "image-classification"
        for metric in result["metrics"]:
            out[(result["dataset"]["name"], metric["type"])] = metric["value"]
    return out


# ------------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("kind", ["coop", "vpt", "head", "lora"])
def test_adapter_push_uploads_the_adapter_and_our_card_then_loads_back(
    kind, hub, toy_tokenizer, tmp_path, monkeypatch
):
    model = _adapter(kind, toy_tokenizer)
    before = _outputs(model, toy_tokenizer, kind)
    info = push_adapter_to_hub(
        model,
        "me/adapter",
        api=hub.api,
        card_kwargs=dict(
            model_name=f"{kind}-toy",
            dataset_name="toy",
            results=ROWS,
            hm=70.0,
            hyperparameters={"lr": 0.002},
            training_data="4 shots per class",
        ),
    )
    assert info.oid and "me/adapter" in info.commit_url
    # (huggingface_hub may also GET informational endpoints of its own; the write API is these four calls)
    assert [p for p in hub.paths() if p.startswith("POST")] == [
        "POST /api/repos/create",
        "POST /api/validate-yaml",
        "POST /api/models/me/adapter/preupload/main",
        "POST /api/models/me/adapter/commit/main",
    ]
    assert all(h.get("authorization") == "Bearer hf_fake" for m, _, h, _ in hub.requests if m == "POST")
    expected = {"adapter_config.json", "adapter_model.safetensors", "README.md", ".eval_results/hf-cft__toy.yaml"}
    (commit,) = hub.commits
    assert set(commit["files"]) == expected and not commit["other"]  # everything inlined, no LFS pointer
    assert set(hub.preuploads[0]["files"]) == expected
    assert not [f for f in commit["files"] if f.endswith(PICKLES)]
    # the README is hf_cft's card, not the one PeftModel.save_pretrained writes
    card, meta = _meta(commit["files"]["README.md"])
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "adapter"
    assert {"hf_cft", "clip"} <= set(meta["tags"]) and meta["datasets"] == ["hf-cft/toy"]
    assert _metrics(meta) == {("toy (base)", "accuracy"): 81.25, ("toy (novel)", "accuracy"): 62.5}
    assert "Harmonic mean of base and novel accuracy: **70.00**" in card.text
    assert "| lr | 0.002 |" in card.text and "4 shots per class" in card.text
    # the new eval-results format, for the row on a Hub dataset only
    (entry,) = parse_eval_result_entries(yaml.safe_load(commit["files"][".eval_results/hf-cft__toy.yaml"]))
    assert (entry.dataset_id, entry.task_id, entry.value) == ("hf-cft/toy", "base", 81.25)
    # pull: the uploaded files give the same adapter
    offline(monkeypatch)
    folder = hub.materialise("me/adapter", tmp_path / "pulled")
    loaded = load_adapter_model(tiny_clip(), folder)
    torch.testing.assert_close(_outputs(loaded, toy_tokenizer, kind), before, rtol=0, atol=0)


def test_named_adapter_and_repeated_push(hub, toy_tokenizer):
    model = _adapter("coop", toy_tokenizer)
    model.add_adapter("second", CoOpConfig(n_ctx=2, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    push_to_hub(model, "me/two", api=hub.api, adapter_name="second")
    files = hub.commits[-1]["files"]
    assert json.loads(files["adapter_config.json"])["n_ctx"] == 2  # the named adapter, not the active one
    _, meta = _meta(files["README.md"])
    assert "model-index" not in meta  # no results given: no evaluation metadata invented
    push_to_hub(model, "me/two", api=hub.api, adapter_name="default")  # the repo exists: exist_ok path (409)
    assert json.loads(hub.files("me/two")["adapter_config.json"])["n_ctx"] == 4 and len(hub.commits) == 2


# ------------------------------------------------------------------------------------------------ MergeTune


def test_mergetune_full_model_push_and_card(hub, tmp_path, monkeypatch):
    continued = tiny_clip(seed=3)
    push_to_hub(
        continued,
        "me/mt-full",
        api=hub.api,
        card_kwargs=dict(
            model_name="mt-full",
            dataset_name="toy",
            results=ROWS,
            base_model=BASE_ID,
            finetuned="me/full-ft",
            hyperparameters={"anchor_weight": 0.01, "tau": 0.3},
            baselines={"zero-shot": {"base": 70.0, "novel": 65.0}},
        ),
    )
    files = hub.commits[-1]["files"]
    assert set(files) == {"config.json", "model.safetensors", "README.md", ".eval_results/hf-cft__toy.yaml"}
    card, meta = _meta(files["README.md"])
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "finetune"
    assert {"mergetune", "full"} <= set(meta["tags"]) and meta["base_model"] == BASE_ID
    assert _metrics(meta)[("toy (novel)", "accuracy")] == 62.5
    assert "| zero-shot | 70.00 | 65.00 |" in card.text and "me/full-ft" in card.text
    offline(monkeypatch)
    pulled = load_model(hub.materialise("me/mt-full", tmp_path / "pulled"))
    for (n, a), b in zip(continued.state_dict().items(), pulled.state_dict().values()):
        assert torch.equal(a, b), n


def test_mergetune_adapter_card_for_lora_and_coop(toy_tokenizer, tmp_path):
    lora = _adapter("lora", toy_tokenizer)
    card = mergetune_card(lora, model_name="mt-lora", dataset_name="toy", results=ROWS, hm=70.0)
    meta = validate_card(card)
    assert _metrics(meta)[("toy (base-to-novel)", "hm")] == 70.0 and "**70.00**" in card.text
    assert meta["library_name"] == "peft" and "lora" in meta["tags"] and meta["base_model"] == BASE_ID
    assert "PeftModel.from_pretrained" in card.text and "weight space" in card.text
    coop = _adapter("coop", toy_tokenizer)
    coop.save_pretrained(tmp_path / "coop")
    folder_card = mergetune_card(tmp_path / "coop", model_name="mt-coop", dataset_name="toy", results=ROWS)
    assert "class_text_features" in folder_card.text and "coop" in validate_card(folder_card)["tags"]
    vpt_card = mergetune_card(_adapter("vpt", toy_tokenizer), model_name="mt-vpt", dataset_name="toy")
    assert "vpt" in validate_card(vpt_card)["tags"] and "prompt space" in vpt_card.text
    from peft import IA3Config

    ia3 = get_peft_model(_named(tiny_clip()), IA3Config(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"]))
    with pytest.raises(CardError, match="CoOp, a linear head, LoRA or VPT"):
        mergetune_card(ia3, model_name="x", dataset_name="toy")


# ------------------------------------------------------------------------------------------------ ConDU


def _expert(model, seed, scale=0.05):
    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n != "logit_scale":
                p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


KEYS = ["vision_model.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.1.self_attn.q_proj.weight"]


def _merger(base, tasks=("dtd", "eurosat")):
    merger = DeltaFusionMerger(base_model=base, base_model_name_or_path=BASE_ID)
    z = image_features(base, PIXELS).detach()
    for t, name in enumerate(tasks):
        merger.add_task(
            delta_from_models(base, _expert(base, 10 + t), keys=KEYS),
            name,
            prototypes=torch.stack([z[0], z[1]]),
            classnames=["a", "b"],
            templates=["a photo of a {}."],
            dataset=name,
        )
    return merger


MATRIX = {"names": ["dtd", "eurosat"], "values": [[60.0, 30.0], [55.0, 80.0]]}


def test_condu_bundle_push_pull_round_trip(hub, monkeypatch, tmp_path):
    base = tiny_clip()
    merger = _merger(base)
    push_to_hub(
        merger,
        "me/condu",
        api=hub.api,
        card_kwargs=dict(
            model_name="condu-toy",
            results=[{"name": "dtd", "accuracy": 55.0}, {"name": "eurosat", "accuracy": 80.0}],
            summary={"transfer": 30.0, "average": 56.25, "last": 67.5, "bwt": -5.0},
            matrix=MATRIX,
            stream_name="toy order",
        ),
    )
    files = hub.commits[-1]["files"]
    assert set(files) == {
        "manifest.json",
        "unified.safetensors",
        "masks.safetensors",
        "prototypes.safetensors",
        "README.md",
    }
    card, meta = _meta(files["README.md"])
    assert meta["library_name"] == "hf_cft" and meta["base_model"] == BASE_ID and "condu" in meta["tags"]
    assert _metrics(meta) == {
        ("dtd", "accuracy"): 55.0,
        ("eurosat", "accuracy"): 80.0,
        ("toy order", "transfer"): 30.0,
        ("toy order", "average"): 56.25,
        ("toy order", "last"): 67.5,
        ("toy order", "bwt"): -5.0,
    }
    assert "| dtd | 60.0 | 30.0 |" in card.text and "| eurosat | 55.0 | 80.0 |" in card.text
    offline(monkeypatch)
    calls = _pull_from(monkeypatch, hub, tmp_path)
    pulled = DeltaFusionMerger.from_pretrained("me/condu", base_model=base)
    assert calls and calls[0][0] == "me/condu"
    assert pulled.task_names == merger.task_names
    for name in merger.task_names:
        for k, v in merger.expert_delta(name).items():
            assert torch.equal(pulled.expert_delta(name)[k], v)


def test_condu_card_leaves_out_nan_and_the_merger_points_at_the_hub_layer():
    merger = _merger(tiny_clip(), tasks=("only",))
    card = condu_card(merger, summary={"transfer": math.nan, "average": 50.0})  # Transfer of one task is NaN
    meta = validate_card(card)
    assert _metrics(meta) == {("task stream: only", "average"): 50.0}
    assert "nan" not in card.text.lower().replace("nanoseconds", "")
    with pytest.raises(AttributeError, match=r"hf_cft\.hub\.condu_card\(merger"):
        merger.model_card()
    with pytest.raises(AttributeError, match=r"hf_cft\.hub\.push_to_hub\(merger, repo_id"):
        merger.push_to_hub("me/x")
    with pytest.raises(AttributeError, match=r"hf_cft\.hub\.push_to_hub\(state, repo_id"):
        _pam_state().push_to_hub("me/x")
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        merger.nothing  # noqa: B018


# ------------------------------------------------------------------------------------------------ PAM


def _pam_state():
    model = prepare_pam_model(_named(tiny_clip()), LoraConfig(r=2, target_modules=["fc1"]), PAMConfig())
    state = PAMState.from_model(model)
    g = torch.Generator().manual_seed(0)
    for t in range(2):
        task = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model, "task").items()}
        state.merge(task, f"task{t}")
    return state


def test_pam_state_push_pull_round_trip(hub, monkeypatch, tmp_path):
    state = _pam_state()
    push_to_hub(
        state,
        "me/pam",
        api=hub.api,
        card_kwargs=dict(
            results=[{"name": "task0", "accuracy": 40.0}],
            summary={"last": 40.0},
            matrix={"names": ["task0", "task1"], "values": [[40.0, None], [38.0, 41.0]]},
        ),
    )
    files = hub.commits[-1]["files"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "pam_state.json", "README.md"}
    card, meta = _meta(files["README.md"])
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE_ID and "pam" in meta["tags"]
    assert _metrics(meta)[("task stream: task0 → task1", "last")] == 40.0
    assert "| 2 | task1 | 0.5000 |" in card.text and "r=2" in card.text
    assert "| task0 | 40.0 |  |" in card.text  # a missing matrix entry stays blank
    offline(monkeypatch)
    _pull_from(monkeypatch, hub, tmp_path)
    pulled = PAMState.from_pretrained("me/pam")
    assert pulled.num_tasks == 2 and pulled.history == state.history
    for k, v in state.global_state.items():
        assert torch.equal(pulled.global_state[k], v)
    deployed = load_adapter_model(
        tiny_clip(), tmp_path / "pulled" / "me__pam"
    )  # the pulled folder is a PEFT LoRA adapter
    for k, v in adapter_state(deployed, "default").items():
        assert torch.equal(v, state.global_state[k]), k
    card2 = pam_card(pulled)
    assert validate_card(card2)["tags"][:2] == ["hf_cft", "clip"]


# ------------------------------------------------------------------------------------------------ refusals


def test_push_refuses_pickles_corrupt_weights_and_bad_cards_before_any_request(hub, toy_tokenizer, tmp_path):
    model = _adapter("vpt", toy_tokenizer)
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(HubError, match="optimizer.pt.*safetensors only"):
        push_folder_to_hub(tmp_path / "a", "me/a", api=hub.api)
    (tmp_path / "a" / "optimizer.pt").unlink()
    (tmp_path / "a" / "README.md").write_text("---\nmodel-index: [{results: [{bad: 1}]}]\n---\n")
    with pytest.raises(CardError, match="metadata is invalid"):
        push_folder_to_hub(tmp_path / "a", "me/a", api=hub.api)  # a broken README in the folder is not sent
    good = adapter_card(model, model_name="a", dataset_name="toy", results=ROWS)
    bad = str(good).replace("value: 81.25", "value: .nan")
    with pytest.raises(CardError, match="not a finite number"):
        push_folder_to_hub(tmp_path / "a", "me/a", api=hub.api, card=bad)
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(BundleError, match="adapter_model.safetensors"):
        push_folder_to_hub(tmp_path / "a", "me/a", api=hub.api, card=good)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="no safetensors"):
        push_folder_to_hub(tmp_path / "empty", "me/a", api=hub.api)
    with pytest.raises(HubError, match="Cannot push a Linear"):
        push_to_hub(torch.nn.Linear(2, 2), "me/a", api=hub.api)
    assert [p for p in hub.paths() if p.startswith("POST")] == []


def test_load_adapter_is_a_deprecated_alias_of_load_adapter_model(tmp_path, toy_tokenizer):
    model = _adapter("lora", toy_tokenizer)
    model.save_pretrained(tmp_path / "lora")
    with pytest.warns(FutureWarning, match="load_adapter_model"):
        old = load_adapter(tiny_clip(), tmp_path / "lora")
    new = load_adapter_model(tiny_clip(), tmp_path / "lora")
    assert type(old) is type(new) and old.peft_config["default"].peft_type == new.peft_config["default"].peft_type
    for (k, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_pull_errors_are_typed(tmp_path, toy_tokenizer):
    with pytest.raises(HubError, match="neither a local folder nor a downloadable Hub repo"):
        snapshot("me/not-here")  # conftest: HF_HUB_OFFLINE=1
    model = _adapter("lora", toy_tokenizer)
    model.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_model.safetensors").rename(tmp_path / "lora" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin: hf_cft reads safetensors only"):
        load_adapter_model(tiny_clip(), tmp_path / "lora")
    model.save_pretrained(tmp_path / "lora2")
    with pytest.raises(AdapterError, match="Cannot load adapter"):
        load_adapter_model(tiny_clip(hidden_size=40), tmp_path / "lora2")  # another base model: shapes differ
    tiny_clip().save_pretrained(tmp_path / "full")
    (tmp_path / "full" / "model.safetensors").rename(tmp_path / "full" / "pytorch_model.bin")
    with pytest.raises(BundleError, match="pytorch_model.bin: hf_cft loads safetensors only"):
        load_model(tmp_path / "full")
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=20)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(NotCLIPLikeError, match="bert"):
        load_model(tmp_path / "bert")


# ------------------------------------------------------------------------------------------------ cards


def test_adapter_card_from_folder_matches_card_from_model(toy_tokenizer, tmp_path):
    model = _adapter("head", toy_tokenizer)
    model.save_pretrained(tmp_path / "head")
    kwargs = dict(model_name="lp", dataset_name="toy", results=ROWS, training_data="all")
    from_model, from_folder = adapter_card(model, **kwargs), adapter_card(tmp_path / "head", **kwargs)
    assert from_model.data.to_dict() == from_folder.data.to_dict()
    assert "(51 adapter parameters)" in from_folder.text  # 3×16 weights + 3 biases
    with pytest.raises(CardError, match="'base' twice"):
        adapter_card(model, model_name="x", dataset_name="toy", results=[ROWS[0], ROWS[0]])
    with pytest.raises(CardError, match="is nan"):
        adapter_card(model, model_name="x", dataset_name="toy", results=[{"name": "base", "accuracy": math.nan}])
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        adapter_card(tmp_path, model_name="x", dataset_name="toy")


def test_validate_card_rejects_what_the_hub_would():
    with pytest.raises(CardError, match="no YAML metadata"):
        validate_card("# just text\n")
    with pytest.raises(CardError, match="lacks 'library_name'"):
        validate_card("---\npipeline_tag: zero-shot-image-classification\n---\n# x\n")
    with pytest.raises(CardError, match="lacks 'pipeline_tag'"):
        validate_card("---\nlibrary_name: peft\n---\n# x\n", require=("library_name", "pipeline_tag"))
    with pytest.raises(CardError, match="invalid"):
        validate_card("---\nlibrary_name: [unclosed\n---\n")


def test_eval_results_entries_only_for_hub_datasets():
    rows = [*ROWS, {"name": "extra", "accuracy": 10.0, "dataset_id": "org/bench", "task_id": "split_a"}]
    entries = eval_result_entries(rows)
    assert [(e.dataset_id, e.task_id, e.value) for e in entries] == [
        ("hf-cft/toy", "base", 81.25),
        ("org/bench", "split_a", 10.0),
    ]
    files = eval_results_files(entries)
    assert set(files) == {".eval_results/hf-cft__toy.yaml", ".eval_results/org__bench.yaml"}
    back = parse_eval_result_entries(yaml.safe_load(files[".eval_results/org__bench.yaml"]))
    assert back[0].task_id == "split_a" and back[0].value == 10.0
    assert eval_result_entries(ROWS, dataset_id="local-only") == eval_result_entries(ROWS[:1])


def test_push_to_hub_of_bundles_and_pam_states(hub):
    """``hf_cft.hub.push_to_hub`` uploads a ConDU bundle and a PAM state with their cards."""
    push_to_hub(_merger(tiny_clip()), "me/condu-method", api=hub.api, card_kwargs=dict(model_name="condu-toy"))
    assert {"manifest.json", "unified.safetensors", "masks.safetensors", "README.md"} <= set(hub.commits[-1]["files"])
    push_to_hub(_pam_state(), "me/pam-method", api=hub.api)
    files = set(hub.commits[-1]["files"])
    assert "README.md" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
