"""Declarative, streamed merges: ``hf-cft merge --config merge.yaml`` and its Python form (hf_cft.merging.config,
hf_cft.merging.streaming, hf_cft.hub.run_merge) on tiny CLIPs saved to folders — equality with the in-memory
one-shot methods, per-input weights and densities, sharded output, out_dtype, the merge card and the resolved config
written with the output, the LoRA output loaded with PeftModel.from_pretrained, Hub ids through snapshot_download
(answered by the fake Hub), and typed errors naming the offending field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

from hf_cft.cli import main
from hf_cft.errors import BundleError, DeltaError, MergeConfigError, NonFiniteError
from hf_cft.merging import baselines, delta_from_lora, delta_from_models
from hf_cft.merging.config import MergeConfig
from hf_cft.merging.streaming import SafetensorsFile, ShardedWriter, merge_deltas, parse_size
from hf_cft.testing import save_tiny_clip

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


def _noisy(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "logit_scale":
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("merge")
    a = {"root": root, "clip": save_tiny_clip(root / "clip", hidden_size=32, num_layers=2)}

    def base():
        return AutoModel.from_pretrained(a["clip"]).eval()

    a["base"] = base
    for name, cfg in {
        "lora_a": LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "lora_b": LoraConfig(r=2, target_modules=["fc1", "q_proj"], init_lora_weights=False, lora_alpha=4),
    }.items():
        torch.manual_seed(1 if name == "lora_a" else 2)
        get_peft_model(base(), cfg).save_pretrained(root / name)
        a[name] = root / name
    for name, seed in (("ft_a", 3), ("ft_b", 4)):
        _noisy(base(), seed).save_pretrained(root / name)
        a[name] = root / name
    return a


def _weights(folder):
    folder = Path(folder)
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _dense(assets, names):
    base = assets["base"]()
    deltas = [
        delta_from_lora(assets[n], base) if n.startswith("lora") else delta_from_models(base, assets[n]) for n in names
    ]
    keys = sorted({k for d in deltas for k in d})
    state = base.state_dict()
    return state, keys, [{k: d.get(k, torch.zeros_like(state[k])) for k in keys} for d in deltas]


def _merge_argv(assets, method, adapters, *flags):
    """``hf-cft merge`` arguments: the tiny CLIP as base, ``method``, the named assets as inputs, then ``flags``."""
    return [
        "merge",
        "--base",
        str(assets["clip"]),
        "--method",
        method,
        "--adapters",
        *(str(assets[a]) for a in adapters),
        *flags,
    ]


def _write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ equality


def test_config_merge_with_per_input_weights_equals_the_in_memory_merge(assets, tmp_path):
    names = ["lora_a", "ft_a", "lora_b"]
    config = _write_yaml(
        tmp_path / "merge.yaml",
        {
            "base_model": str(assets["clip"]),
            "method": "ties",
            "parameters": {"density": 0.5},
            "inputs": [
                {"model": str(assets["lora_a"]), "weight": 1.0},
                {"model": str(assets["ft_a"]), "weight": 0.5, "density": 0.3},
                {"model": str(assets["lora_b"])},
            ],
        },
    )
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(config), "--out", str(out)]) == 0
    state, keys, dense = _dense(assets, names)
    # reference from the paper's steps: trim each to its density, scale by its weight, elect, disjoint mean
    trimmed = [
        {k: w * baselines.trim_top_k(d[k], dens) for k in keys}
        for d, w, dens in zip(dense, [1.0, 0.5, 1.0], [0.5, 0.3, 0.5])
    ]
    got = _weights(out)
    for k in keys:
        stacked = torch.stack([t[k] for t in trimmed])
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (sign != 0)
        ref = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got[k], state[k] + ref, rtol=0, atol=1e-6)
    untouched = [k for k in state if k not in keys]
    assert untouched and all(torch.equal(got[k], state[k]) for k in untouched)  # logit_scale, position ids, ...
    from hf_cft.hub import load_model

    assert load_model(out) is not None


@pytest.mark.parametrize(
    ("method", "params", "reference"),
    [
        ("task_arithmetic", {"weight": 0.4}, lambda ds: baselines.task_arithmetic(ds, lam=0.4)),
        ("magmax", {}, lambda ds: baselines.magmax(ds, lam=0.5)),
        ("dare", {"density": 0.5, "seed": 2}, lambda ds: baselines.dare(ds, rho=0.5, seed=2)),
        ("consensus", {"k": 1}, lambda ds: baselines.consensus(ds, k=1)),
        (
            "ties",
            {"trim_scope": "model", "merge": "sum", "density": 0.4},
            lambda ds: baselines.ties(ds, k=0.4, trim_scope="model", merge="sum"),
        ),
    ],
)
def test_python_merge_equals_the_one_shot_function(method, params, reference, assets, tmp_path):
    from hf_cft.hub import run_merge

    names = ["lora_a", "lora_b", "ft_b"]
    config = {
        "base_model": str(assets["clip"]),
        "method": method,
        "parameters": params,
        "inputs": [str(assets[n]) for n in names],
    }
    run_merge(config, tmp_path / "out")
    state, keys, dense = _dense(assets, names)
    merged = reference(dense)
    got = _weights(tmp_path / "out")
    for k in keys:
        torch.testing.assert_close(got[k], state[k] + merged[k], rtol=0, atol=1e-6)


def test_merge_deltas_never_needs_zero_filled_inputs():
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(4, 3, generator=g), "y": torch.randn(5, generator=g)}
    b = {"x": torch.randn(4, 3, generator=g)}  # no "y": counts as zeros
    dense_b = {**b, "y": torch.zeros(5)}
    for method, ref in (("ties", baselines.ties([a, dense_b], k=0.5)), ("magmax", baselines.magmax([a, dense_b]))):
        got = merge_deltas([a, b], method, {"density": 0.5} if method == "ties" else {})
        for k in ref:
            torch.testing.assert_close(got[k], ref[k])
    with pytest.raises(DeltaError, match="key 'x' has shape"):
        merge_deltas([a, {"x": torch.zeros(3)}], "task_arithmetic")


# ------------------------------------------------------------------------------------------------ output


def test_sharded_output_in_another_dtype_loads_and_holds_the_same_weights(assets, tmp_path):
    args = [
        "merge",
        "--base",
        str(assets["clip"]),
        "--method",
        "task_arithmetic",
        "--adapters",
        str(assets["ft_a"]),
        str(assets["lora_a"]),
        "--lam",
        "0.5",
        "-0.25",
    ]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "sharded"), "--max_shard_size", "40KB"]) == 0
    assert main([*args, "--out", str(tmp_path / "bf16"), "--out_dtype", "bfloat16", "--max_shard_size", "40KB"]) == 0
    one, sharded = _weights(tmp_path / "one"), _weights(tmp_path / "sharded")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(one) and set(index["weight_map"].values()) == set(shards)
    for f in shards:
        assert (tmp_path / "sharded" / f).stat().st_size <= 40_000 + 4096 or len(
            load_file(str(tmp_path / "sharded" / f))
        ) == 1
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
    bf16 = _weights(tmp_path / "bf16")
    for k, v in one.items():
        if v.is_floating_point():
            assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], v.to(torch.bfloat16))
        else:
            assert torch.equal(bf16[k], v)  # integer buffers keep their dtype
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()).get("dtype") == "bfloat16"
    state, keys, dense = _dense(assets, ["ft_a", "lora_a"])
    ref = baselines.task_arithmetic(dense, lam=[0.5, -0.25])
    for k in keys:
        torch.testing.assert_close(one[k], state[k] + ref[k], rtol=0, atol=1e-6)
    from hf_cft.hub import load_model

    model = load_model(tmp_path / "sharded")
    assert torch.equal(model.state_dict()["text_projection.weight"], one["text_projection.weight"])


def test_card_resolved_config_and_rerun_from_it(assets, tmp_path):
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"results": [{"name": "colours", "accuracy": 71.25}]}))
    out = tmp_path / "merged"
    assert (
        main(
            _merge_argv(
                assets,
                "dare",
                ["lora_a", "ft_b"],
                "--rho",
                "0.7",
                "--seed",
                "5",
                "--results",
                str(results),
                "--model_name",
                "clip-dare",
                "--out",
                str(out),
            )
        )
        == 0
    )
    card = ModelCard((out / "README.md").read_text())
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and "model-merging" in meta["tags"] and "dare" in meta["tags"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 71.25
    text = card.text
    assert "**dare**" in text and str(assets["lora_a"]) in text and "LoRA adapter" in text and "full model" in text
    assert "| density | " in text or "density" in text
    resolved = yaml.safe_load((out / "merge.yaml").read_text())
    assert resolved["method"] == "dare" and resolved["parameters"] == {"then": "ta", "seed": 5, "rng": "torch"}
    assert [i["density"] for i in resolved["inputs"]] == pytest.approx([0.3, 0.3])
    assert [i["weight"] for i in resolved["inputs"]] == [0.3, 0.3]
    assert yaml.safe_dump(resolved, sort_keys=False) in text  # the card carries the resolved config
    assert json.loads((out / "merge_config.json").read_text())["method"] == "dare"
    again = tmp_path / "again"
    assert main(["merge", "--config", str(out / "merge.yaml"), "--out", str(again)]) == 0
    a, b = _weights(out), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_output_loads_with_peft_and_equals_the_merged_delta(assets, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "lora_out"
    # task arithmetic of two rank-2 adapters: the merged ΔW has rank ≤ 4 per target, so rank 4 is exact
    config = {
        "base_model": str(assets["clip"]),
        "method": "task_arithmetic",
        "parameters": {"weight": 0.8},
        "inputs": [str(assets["lora_a"]), str(assets["lora_b"])],
        "lora_rank": 4,
    }
    from hf_cft.hub import run_merge

    run_merge(config, out)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "merge.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert ModelCard((out / "README.md").read_text()).data.library_name == "peft"
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(assets["clip"]), str(out))
    merged = peft_model.merge_and_unload().state_dict()
    state, keys, dense = _dense(assets, ["lora_a", "lora_b"])
    ref = baselines.task_arithmetic(dense, lam=0.8)
    for k in keys:
        torch.testing.assert_close(merged[k], state[k] + ref[k], rtol=0, atol=1e-5)
    # rank 1 is a truncation: the best rank-1 approximation of each merged ΔW (Eckart–Young), not the ΔW
    run_merge({**config, "lora_rank": 1}, tmp_path / "r1")
    with safe_open(str(tmp_path / "r1" / "adapter_model.safetensors"), "pt") as fh:
        key = "text_model.encoder.layers.0.self_attn.q_proj"
        b, a = (
            fh.get_tensor(f"base_model.model.{key}.lora_B.weight"),
            fh.get_tensor(f"base_model.model.{key}.lora_A.weight"),
        )
    u, s, vh = torch.linalg.svd(ref[f"{key}.weight"].double())
    torch.testing.assert_close((b @ a).double(), s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-5, atol=1e-6)
    with pytest.raises(MergeConfigError, match="needs LoRA inputs only.*full model"):
        run_merge({**config, "inputs": [str(assets["lora_a"]), str(assets["ft_a"])]}, tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ Hub


def test_hub_ids_are_resolved_and_the_merge_is_pushed_with_its_card(assets, tmp_path, monkeypatch, hub):
    from hf_cft.hub import push_folder_to_hub

    push_folder_to_hub(assets["lora_b"], "me/lora-b", api=hub.api)
    pulled = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        pulled.append((repo_id, revision))
        return str(hub.materialise(repo_id, tmp_path / "pulled" / repo_id.replace("/", "__")))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "merged"
    config = _write_yaml(
        tmp_path / "m.yaml",
        {
            "base_model": str(assets["clip"]),
            "method": "task_arithmetic",
            "inputs": [{"model": str(assets["lora_a"])}, {"model": "me/lora-b", "revision": "main"}],
        },
    )
    assert main(["merge", "--config", str(config), "--out", str(out)]) == 0
    assert pulled == [("me/lora-b", "main")]
    assert "[me/lora-b](https://huggingface.co/me/lora-b)" in (out / "README.md").read_text()
    state, keys, dense = _dense(assets, ["lora_a", "lora_b"])
    ref = baselines.task_arithmetic(dense, lam=0.3)
    got = _weights(out)
    for k in keys:
        torch.testing.assert_close(got[k], state[k] + ref[k], rtol=0, atol=1e-6)
    assert (
        main(["push", "--artefact", str(out), "--repo_id", "me/merged", "--endpoint", hub.url, "--token", "hf_fake"])
        == 0
    )
    pushed = hub.files("me/merged")
    assert pushed["README.md"] == (out / "README.md").read_bytes()
    assert {"model.safetensors", "merge.yaml", "config.json"} <= set(pushed)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": [{"model": "x", "density": 0}]}, r"inputs\[0\]\.density must lie in \(0, 1\]"),
        ({"inputs": [{"model": "x"}, {"weight": 1}]}, r"inputs\[1\]\.model is required"),
        (
            {"inputs": [{"model": "x", "parameters": {"merge": "sum"}}]},
            r"inputs\[0\]\.parameters\.merge is not a per-input option",
        ),
        ({"inputs": [{"model": "x", "dens": 0.2}]}, r"inputs\[0\]\.dens is not a field"),
        ({"parameters": {"trim_scope": "layer"}}, r"parameters\.trim_scope must be one of"),
        ({"parameters": {"k": 0.2}}, r"parameters\.k is not an option of method 'ties'"),
        ({"method": "tie"}, r"method must be one of .*ties.*got 'tie'"),
        ({"out_dtype": "fp8"}, r"out_dtype must be one of float32, float16, bfloat16"),
        ({"max_shard_size": "2 parsecs"}, r"max_shard_size must be a size"),
        ({"lora_rank": 0}, r"lora_rank must be at least 1"),
        ({"inputs": []}, r"inputs is empty"),
        ({"outdir": "x"}, r"outdir is not a field of a merge config"),
        (
            {"inputs": [{"model": "x", "weight": 1, "parameters": {"weight": 2}}]},
            r"inputs\[0\]\.weight is given twice",
        ),
    ],
)
def test_config_errors_name_the_field(change, message):
    data = {"base_model": "clip", "method": "ties", "inputs": [{"model": "x"}], **change}
    with pytest.raises(MergeConfigError, match=message):
        MergeConfig.from_dict(data)


def test_cli_config_errors_are_one_line(assets, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: [unclosed\n")
    assert main(["merge", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    cfg = _write_yaml(
        tmp_path / "c.yaml",
        {
            "base_model": str(assets["clip"]),
            "method": "ties",
            "inputs": [{"model": str(assets["lora_a"]), "density": 2}],
        },
    )
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-cft merge: error: ") and "inputs[0].density must lie in (0, 1]" in err
    assert (
        main(
            _merge_argv(
                assets, "task_arithmetic", ["lora_a", "lora_b"], "--lam", "1", "2", "3", "--out", str(tmp_path / "o")
            )
        )
        == 2
    )
    assert "--lam takes one value or one per model (2), got 3" in capsys.readouterr().err
    assert (
        main(_merge_argv(assets, "ties", ["lora_a"], "--param", "trim_scope=layer", "--out", str(tmp_path / "o"))) == 2
    )
    assert "parameters.trim_scope must be one of" in capsys.readouterr().err
    good = _write_yaml(
        tmp_path / "g.yaml",
        {"base_model": str(assets["clip"]), "method": "ties", "inputs": [{"model": str(assets["lora_a"])}]},
    )
    assert main(["merge", "--config", str(good), "--out", str(assets["lora_a"] / "sub")]) == 2
    assert "overlaps --adapters" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ low level


def test_sharded_writer_aligns_mixed_dtypes_and_refuses_what_was_not_planned(tmp_path):
    tensors = {
        "a": torch.arange(3, dtype=torch.int8),
        "b": torch.randn(5, dtype=torch.float64),
        "c": torch.randn(2, 3),
        "d": torch.arange(4, dtype=torch.int64),
        "e": torch.zeros(0),
    }
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_size=10**6)
    for k in ["c", "a", "e", "b", "d"]:  # any order
        writer.write(k, tensors[k])
    assert writer.close() == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    f = SafetensorsFile(tmp_path / "model.safetensors")
    assert all(e.start % max(1, e.dtype.itemsize) == 0 for e in f.entries.values())
    assert torch.equal(f.read("b"), tensors["b"])
    w = ShardedWriter(tmp_path / "x", plan, 10)
    with pytest.raises(DeltaError, match="not in the output plan"):
        w.write("z", torch.zeros(1))
    with pytest.raises(DeltaError, match="planned"):
        w.write("c", torch.zeros(3, 2))
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((tmp_path / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(BundleError, match="torn or inconsistent"):
        SafetensorsFile(torn)
    assert parse_size("1GiB") == 2**30 and parse_size("500MB") == 5 * 10**8 and parse_size(7) == 7


@pytest.mark.parametrize(
    "method, extra, message",
    [
        ("tsv_m", ["--alpha", "0.5"], "--alpha is an option of --method wise, not of 'tsv_m'"),
        ("consensus", ["--k", "1"], "--k is an option of --method ties, not of 'consensus'"),
        ("ties", ["--rho", "0.5"], "--rho is an option of --method dare, not of 'ties'"),
        ("tsv_m", ["--lam", "0.5"], "--lam sets the per-model weight, which --method 'tsv_m' does not take"),
        ("wise", ["--lam", "0.5"], "(use --alpha)"),
    ],
)
def test_cli_flag_of_another_method_is_refused_not_dropped(assets, tmp_path, capsys, method, extra, message):
    argv = _merge_argv(assets, method, ["ft_a"] if method == "wise" else ["ft_a", "ft_b"], *extra)
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_config_refuses_method_flags_it_would_ignore(assets, tmp_path, capsys):
    cfg = _write_yaml(tmp_path / "c.yaml", {"base_model": str(assets["clip"]), "method": "ties",
                                             "inputs": [{"model": str(assets["lora_a"])}]})  # fmt: skip
    for extra in (["--method", "dare"], ["--lam", "0.1"], ["--k", "0.5"]):
        assert main(["merge", "--config", str(cfg), *extra, "--out", str(tmp_path / "o")]) == 2
        assert f"{extra[0]} cannot be combined with --config" in capsys.readouterr().err


def test_cli_counts_only_keys_whose_merged_delta_is_not_zero(assets, tmp_path, capsys):
    base = ["merge", "--base", str(assets["clip"]), "--adapters", str(assets["lora_a"]), str(assets["lora_b"])]
    assert main([*base, "--method", "task_arithmetic", "--lam", "0", "--out", str(tmp_path / "zero")]) == 0
    captured = capsys.readouterr()
    assert "(0 key(s) changed)" in captured.out and "changed no key" in captured.err
    assert main([*base, "--method", "task_arithmetic", "--out", str(tmp_path / "ta")]) == 0
    captured = capsys.readouterr()
    n = int(re.search(r"\((\d+) key\(s\) changed\)", captured.out).group(1))
    assert n > 0 and "changed no key" not in captured.err


def test_cli_results_without_rows_is_refused(assets, tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text('{"acc": 0.5}')
    argv = _merge_argv(assets, "task_arithmetic", ["lora_a"])
    assert main([*argv, "--results", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "holds no evaluation rows" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_input_neither_a_folder_nor_a_fetchable_hub_id_is_one_line_naming_it(assets, tmp_path, capsys, monkeypatch):
    """Issue 18: a bare name that is no local folder, offline, fell through to huggingface_hub's long error."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "mymodel" is no folder here
    cfg = _write_yaml(
        tmp_path / "m.yaml",
        {
            "base_model": str(assets["clip"]),
            "method": "task_arithmetic",
            "inputs": [{"model": str(assets["lora_a"])}, {"model": "mymodel"}],
        },
    )
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 200, err
    assert err[0] == (
        "hf-cft merge: error: inputs[1].model 'mymodel' is neither a local folder nor a Hub id that could be fetched "
        "(no such folder; offline (HF_HUB_OFFLINE) and not in the local Hub cache)."
    )
    flags = ["merge", "--base", str(assets["clip"]), "--method", "ties", "--out", str(tmp_path / "o")]
    assert main([*flags, "--adapters", str(assets["lora_a"]), "mymodel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adapters entry 2 'mymodel' is neither a local folder nor a Hub id" in err[0]
    assert main([*flags, "--adapters", "./gone"]) == 2
    assert (
        "--adapters entry 1 './gone' is neither a local folder nor a Hub id that could be fetched (no such folder)"
        in (capsys.readouterr().err)
    )
    flags[2] = "no_base"
    assert main([*flags, "--adapters", str(assets["lora_a"])]) == 2
    assert "--base 'no_base' is neither a local folder" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unknown(repo_id, **kwargs):
        import importlib

        from huggingface_hub import errors

        url = f"https://huggingface.co/api/models/{repo_id}"
        http = importlib.import_module(errors.Response.__module__.split(".")[0])  # the HTTP client the Hub uses
        response = http.Response(404, request=http.Request("GET", url))
        raise errors.RepositoryNotFoundError(
            f"404 Client Error. Repository Not Found for url: {url}", response=response
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unknown)
    from hf_cft.errors import HubError
    from hf_cft.hub import run_merge

    with pytest.raises(HubError, match=r"^inputs\[1\]\.model 'me/nothing' is neither .*no such model repo on the Hub"):
        run_merge({**yaml.safe_load(cfg.read_text()), "inputs": [str(assets["lora_a"]), "me/nothing"]}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ calibration data
# RegMean and Fisher merging from the command line / a merge config: each input's statistics on its own task data.


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """Two tiny datasets in the formats the library reads: an ImageFolder (3 classes x 4 images, no meta.json) and
    a Parquet folder with a meta.json (2 classes x 4 images, its own class names and templates)."""
    import numpy as np
    from PIL import Image

    from hf_cft.data import from_arrays

    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fox"):
        (root / "folder" / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                root / "folder" / "train" / c / f"{i}.png"
            )
    images = [rng.integers(0, 256, (10, 14, 3), dtype=np.uint8) for _ in range(8)]
    ds = from_arrays(images, [0, 1] * 4, ["car", "bus"], templates=["a photo of a {}."])
    (root / "parquet").mkdir()
    ds["train"].to_parquet(str(root / "parquet" / "train.parquet"))
    meta = {"classnames": ["small car", "big bus"], "templates": ["a photo of a {}.", "a picture of a {}."]}
    (root / "parquet" / "meta.json").write_text(json.dumps(meta))
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    return root


def _python_loaders(base, folders, rows, seed, batch_size):
    """The Python API's side: the library's dataset loader, the rows the docs define (the first ``rows`` of a
    ``numpy.random.default_rng(seed)`` permutation of the split, in ascending order), θ⁰'s preprocessing."""
    import numpy as np
    from torch.utils.data import DataLoader

    from hf_cft.data import ImageClassificationCollator, apply_image_transform, load_classification_dataset
    from hf_cft.data.transforms import model_transform

    out = []
    for folder in folders:
        task = load_classification_dataset(folder)
        n = len(task["train"])
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:rows])
        view = apply_image_transform(task["train"].select(idx.tolist()), model_transform(base))
        out.append((task, DataLoader(view, batch_size=batch_size, collate_fn=ImageClassificationCollator())))
    return out


def test_regmean_from_a_merge_config_equals_regmean_merge_on_the_same_rows(assets, calib, tmp_path):
    from transformers import AutoModel

    from hf_cft.merging.data_dependent import regmean_merge

    config = _write_yaml(
        tmp_path / "merge.yaml",
        {
            "base_model": str(assets["clip"]),
            "method": "regmean",
            "parameters": {"alpha": 0.8},
            "calibration": {"rows": 6, "batch_size": 4, "seed": 3},
            "inputs": [
                {"model": str(assets["ft_a"]), "calibration": str(calib / "folder")},
                {"model": str(assets["ft_b"]), "calibration": {"data": str(calib / "parquet"), "split": "train"}},
            ],
        },
    )
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(config), "--out", str(out)]) == 0
    base = assets["base"]()
    experts = [AutoModel.from_pretrained(assets[n]).eval() for n in ("ft_a", "ft_b")]
    loaders = [dl for _, dl in _python_loaders(base, [calib / "folder", calib / "parquet"], 6, 3, 4)]
    want = regmean_merge(base, experts, loaders, alpha=0.8)
    got, state = _weights(out), base.state_dict()
    assert any(k.endswith("q_proj.weight") for k in want)
    for k, d in want.items():
        torch.testing.assert_close(got[k], state[k] + d, rtol=1e-5, atol=1e-5)
    # the seed decides the rows: another seed, another merge (the text tower is averaged either way)
    other = dict(yaml.safe_load(config.read_text()), calibration={"rows": 6, "batch_size": 4, "seed": 4})
    assert main(["merge", "--config", str(_write_yaml(tmp_path / "o.yaml", other)), "--out", str(tmp_path / "o")]) == 0
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(_weights(tmp_path / "o")[key], got[key], rtol=0, atol=1e-6)


def test_fisher_from_the_cli_equals_fisher_merge_on_the_same_rows_and_round_trips(assets, calib, tmp_path):
    from transformers import AutoModel

    from hf_cft.merging.data_dependent import clip_log_probs, fisher_merge
    from hf_cft.models.tokenizer import load_tokenizer

    out = tmp_path / "merged"
    argv = _merge_argv(assets, "fisher", ["ft_a"])
    argv += [str(assets["ft_b"]), "--calibration_data", str(calib / "folder"), str(calib / "parquet")]
    argv += ["--calibration_rows", "5", "--calibration_batch_size", "2", "--calibration_seed", "1"]
    argv += ["--lam", "1.0", "0.5", "--param", "seed=7", "--out", str(out)]
    assert main(argv) == 0
    base = assets["base"]()
    experts = [AutoModel.from_pretrained(assets[n]).eval() for n in ("ft_a", "ft_b")]
    tasks = _python_loaders(base, [calib / "folder", calib / "parquet"], 5, 1, 2)
    tok = load_tokenizer(assets["clip"])
    # the Fisher's head: each dataset's own class names and templates (the Parquet folder's meta.json)
    assert tasks[1][0].classnames == ["small car", "big bus"] and len(tasks[1][0].templates) == 2
    fns = [clip_log_probs(tok, task.classnames, task.templates) for task, _ in tasks]
    want = fisher_merge(base, experts, [dl for _, dl in tasks], fns, weights=[1.0, 0.5], seed=7)
    got, state = _weights(out), base.state_dict()
    for k, d in want.items():
        torch.testing.assert_close(got[k], state[k] + d, rtol=1e-5, atol=1e-5)
    # merge.yaml records the calibration; fed back to --config it reproduces the merge
    resolved = yaml.safe_load((out / "merge.yaml").read_text())
    assert resolved["calibration"] == {"rows": 5, "batch_size": 2, "seed": 1, "split": "train"}
    assert [i["calibration"] for i in resolved["inputs"]] == [
        {"data": str(calib / "folder"), "split": "train"},
        {"data": str(calib / "parquet"), "split": "train"},
    ]
    again = tmp_path / "again"
    assert main(["merge", "--config", str(out / "merge.yaml"), "--out", str(again)]) == 0
    a, b = _weights(out), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "merge.yaml").read_text() == (out / "merge.yaml").read_text()
    card = (out / "README.md").read_text()
    assert "## Calibration data" in card and "5 row(s)" in card and "seed 1" in card
    assert f"| 0 | `{calib / 'folder'}` | train | 5 / 12 | 3 |" in card
    assert f"| 1 | `{calib / 'parquet'}` | train | 5 / 8 | 2 |" in card


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": [{"model": "x", "calibration": "d"}, {"model": "y"}]}, r"inputs\[1\]\.calibration is required"),
        (
            {"inputs": [{"model": "x", "calibration": {"split": "train"}}]},
            r"inputs\[0\]\.calibration\.data is required",
        ),
        ({"calibration": {"data": "d"}}, r"calibration\.data: method 'regmean' gathers each input's statistics on"),
        ({"calibration": {"rows": 0}}, r"calibration\.rows must be at least 1"),
        ({"calibration": {"batch_size": 2.5}}, r"calibration\.batch_size must be an integer"),
        ({"calibration": {"shuffle": True}}, r"calibration\.shuffle is not a field of the calibration section"),
        (
            {"inputs": [{"model": "x", "calibration": {"data": "d", "rows": 3}}]},
            r"inputs\[0\]\.calibration\.rows is not",
        ),
        (
            {"inputs": [{"model": "x", "calibration": ""}]},
            r"inputs\[0\]\.calibration\.data must be a non-empty string",
        ),
        (
            {"inputs": [{"model": "x", "calibration": {"data": "d", "classnames": ["a"]}}]},
            r"inputs\[0\]\.calibration\.classnames: method 'regmean' uses no class names",
        ),
        (
            {"method": "fisher", "inputs": [{"model": "x", "calibration": {"data": "d", "templates": ["no slot"]}}]},
            r"inputs\[0\]\.calibration\.templates: ",
        ),
        (
            {"method": "ties", "inputs": [{"model": "x", "calibration": "d"}]},
            r"inputs\[0\]\.calibration: method 'ties' uses no calibration data \(only fisher, regmean do\)",
        ),
        ({"method": "ties", "calibration": {"rows": 8}}, r"calibration: method 'ties' uses no calibration data"),
    ],
)
def test_calibration_config_errors_name_the_field(change, message):
    data = {"base_model": "clip", "method": "regmean", "inputs": [{"model": "x", "calibration": "d"}], **change}
    with pytest.raises(MergeConfigError, match=message):
        MergeConfig.from_dict(data)


def test_calibration_data_errors_name_the_input_and_the_field(assets, calib, tmp_path, capsys):
    from hf_cft.errors import NonFiniteError
    from hf_cft.hub import run_merge

    def config(second, **calibration):
        return {
            "base_model": str(assets["clip"]),
            "method": "regmean",
            "calibration": {"rows": 4, **calibration},
            "inputs": [
                {"model": str(assets["ft_a"]), "calibration": str(calib / "folder")},
                {"model": str(assets["ft_b"]), "calibration": second},
            ],
        }

    for second, calibration, message in (
        (
            str(tmp_path / "nowhere"),
            {},
            r"inputs\[1\]\.calibration\.data '.*nowhere' cannot be used .*Unknown dataset",
        ),
        (
            str(calib / "empty"),
            {},
            r"inputs\[1\]\.calibration\.data '.*empty' cannot be used .*holds neither Parquet files nor",
        ),
        (str(calib / "parquet"), {"rows": 9}, r"has 8 row\(s\) in split 'train', fewer than calibration\.rows = 9"),
        (
            {"data": str(calib / "parquet"), "split": "test"},
            {},
            r"has no split 'test' \(inputs\[1\]\.calibration\.split\)",
        ),
    ):
        with pytest.raises(MergeConfigError, match=message):
            run_merge(config(second, **calibration), tmp_path / "o")
    wrong = dict(config({"data": str(calib / "parquet"), "classnames": ["a", "b", "c"]}), method="fisher")
    with pytest.raises(MergeConfigError, match=r"^inputs\[1\]\.calibration\.classnames: 3 class names .* 2 classes"):
        run_merge(wrong, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # a statistic that is NaN/inf names the input's data, not "task 1" (ft_b's fc1 overflows fp32 on any image)
    blown = assets["base"]()
    with torch.no_grad():
        blown.vision_model.encoder.layers[0].mlp.fc1.weight.fill_(3e38)
    blown.save_pretrained(tmp_path / "blown")
    data = config(str(calib / "parquet"))
    data["inputs"][1]["model"] = str(tmp_path / "blown")
    with pytest.raises(
        NonFiniteError, match=r"regmean: the Gram matrix of key .* gathered on inputs\[1\]\.calibration\.data"
    ):
        run_merge(data, tmp_path / "o")
    # the flag form names the flags
    flags = ["merge", "--base", str(assets["clip"]), "--adapters", str(assets["ft_a"]), str(assets["ft_b"])]
    flags += ["--out", str(tmp_path / "o")]
    for extra, message in (
        (["--method", "fisher"], "--calibration_data is required by --method fisher"),
        (["--method", "regmean", "--calibration_data", str(calib / "folder")], "one dataset per --adapters entry (2)"),
        (["--method", "ties", "--calibration_rows", "8"], "--calibration_rows: calibration data is for the data-"),
        (
            ["--method", "regmean", "--calibration_rows", "10", "--calibration_data", str(calib / "folder")]
            + [str(calib / "parquet")],
            "--calibration_data entry 2 '" + str(calib / "parquet") + "' has 8 row(s) in split 'train', fewer than "
            "--calibration_rows = 10",
        ),
        (
            ["--method", "regmean", "--calibration_rows", "4", "--calibration_split", "test", "--calibration_data"]
            + [str(calib / "folder"), str(calib / "parquet")],
            "has no split 'test' (--calibration_split)",
        ),
    ):
        assert main([*flags, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # the error line (after any loading bars)
        assert err.startswith("hf-cft merge: error: ") and message in err, err
    cfg = _write_yaml(tmp_path / "c.yaml", config(str(calib / "parquet")))
    assert main(["merge", "--config", str(cfg), "--calibration_rows", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--calibration_rows cannot be combined with --config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.data
def test_regmean_on_a_shared_parquet_dataset_by_name(assets, shared_data, tmp_path):
    """A shared dataset named as the recipes name it (``dtd10`` under ``--data_dir``), 8 seeded rows."""
    out = tmp_path / "merged"
    argv = _merge_argv(assets, "regmean", ["ft_a"])
    argv += [str(assets["ft_b"]), "--calibration_data", "dtd10", "flowers5", "--data_dir", str(shared_data)]
    argv += ["--calibration_rows", "8", "--out", str(out)]
    assert main(argv) == 0
    resolved = yaml.safe_load((out / "merge.yaml").read_text())
    assert resolved["calibration"]["data_dir"] == str(shared_data)
    assert [i["calibration"]["data"] for i in resolved["inputs"]] == ["dtd10", "flowers5"]
    assert "| 0 | `dtd10` | train | 8 / " in (out / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ pinned rules
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py).


def test_lora_output_writes_the_documented_adapter_config_and_counts_the_merged_targets(assets, tmp_path):
    """The adapter config of a LoRA output, field by field (a plain LoRA: r = lora_alpha = rank, no dropout, no bias,
    inference mode), taking the first input's task type and base model; ``out_dtype`` reaches the factors; the
    summary counts the targets whose merged ΔW is not zero; options reach the kernel (TIES trims)."""
    from safetensors import safe_open

    from hf_cft.merging.streaming import merge_folders

    out = tmp_path / "ties_lora"
    summary = merge_folders(
        assets["clip"], [assets["lora_a"], assets["lora_b"]], "ties", {"density": 0.5}, out=out, lora_rank=4,
        out_dtype="bfloat16",
    )  # fmt: skip
    first = json.loads((assets["lora_a"] / "adapter_config.json").read_text())
    targets = ["fc1", "q_proj", "v_proj"]
    modules = sorted(
        k[: -len(".weight")]
        for k in assets["base"]().state_dict()
        if k.endswith(".weight") and k.split(".")[-2] in targets
    )
    want = {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path") or str(assets["clip"]),
        "r": 4,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    assert (out / "adapter_config.json").read_text(encoding="utf-8") == json.dumps(want, indent=2) + "\n"
    assert summary["files"][-1] == "adapter_config.json" and summary["keys_merged"] == len(modules)
    state, keys, dense = _dense(assets, ["lora_a", "lora_b"])
    ref = baselines.ties(dense, k=0.5)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        for module in modules:
            b = fh.get_tensor(f"base_model.model.{module}.lora_B.weight")
            a = fh.get_tensor(f"base_model.model.{module}.lora_A.weight")
            assert a.dtype == b.dtype == torch.bfloat16
            u, sv, vh = torch.linalg.svd(ref[f"{module}.weight"].double())  # TIES' masks break the low rank:
            best = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]  # the factors are its best rank-4 approximation
            torch.testing.assert_close((b.double() @ a.double()), best, rtol=0, atol=0.05)


def test_lora_output_refuses_bad_ranks_biases_and_full_models_naming_them(assets, tmp_path):
    from hf_cft.merging.streaming import merge_folders

    def merge(sources, rank):
        return merge_folders(assets["clip"], sources, "task_arithmetic", out=tmp_path / "x", lora_rank=rank)

    with pytest.raises(MergeConfigError, match=r"^lora_rank must be at least 1, got 0.$"):
        merge([assets["lora_a"]], 0)
    key = sorted(k for k in assets["base"]().state_dict() if k.endswith(("q_proj.weight", "v_proj.weight")))[0]
    with pytest.raises(
        MergeConfigError, match=rf"^lora_rank=33 exceeds the smaller dimension of '{key}' \(32, 32\).$"
    ):
        merge([assets["lora_a"]], 33)
    merge([assets["lora_a"]], 32)  # equal to the dimension: allowed
    with pytest.raises(
        MergeConfigError, match=r"^lora_rank: a LoRA output needs LoRA inputs only; input 0 \(.*ft_a'?\)"
    ):
        merge([assets["ft_a"], assets["lora_a"]], 2)
    biased = tmp_path / "biased"
    torch.manual_seed(0)
    get_peft_model(
        assets["base"](), LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    ).save_pretrained(biased)
    with pytest.raises(MergeConfigError, match=r"^lora_rank: input 1 \(.*biased'?\) trains LoRA biases \(lora_bias\)"):
        merge([assets["lora_a"], biased], 2)


def test_lora_output_takes_the_first_inputs_task_type_and_base_path(assets, tmp_path):
    import shutil

    from hf_cft.merging.streaming import merge_folders

    def renamed(name, base_path, task_type):
        folder = tmp_path / name
        shutil.copytree(assets[name], folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(base_model_name_or_path=base_path, task_type=task_type)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder

    first, second = renamed("lora_a", "first/base", "FEATURE_EXTRACTION"), renamed("lora_b", "second/base", None)
    merge_folders(assets["clip"], [first, second], "task_arithmetic", out=tmp_path / "o", lora_rank=2)
    written = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert written["task_type"] == "FEATURE_EXTRACTION" and written["base_model_name_or_path"] == "first/base"
    first_none = tmp_path / "none"
    shutil.copytree(second, first_none)
    cfg = json.loads((first_none / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (first_none / "adapter_config.json").write_text(json.dumps(cfg))
    merge_folders(assets["clip"], [first_none], "task_arithmetic", out=tmp_path / "o2", lora_rank=2)
    written = json.loads((tmp_path / "o2" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(assets["clip"])  # without one: θ0's folder


def test_a_nan_in_a_full_model_input_is_named_by_input_and_key(assets, tmp_path):
    """The merged delta is not finite: every input is read again (θ_ft − θ⁰, so θ⁰ is needed) to name the one
    that holds the NaN."""
    from hf_cft.merging.streaming import merge_folders

    model = _noisy(assets["base"](), 9)
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    with torch.no_grad():
        model.state_dict()[key][0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan_ft")
    with pytest.raises(NonFiniteError, match=rf"^The delta of input 1 \(.*nan_ft'?\) holds NaN/inf at key '{key}'.$"):
        merge_folders(assets["clip"], [assets["ft_a"], tmp_path / "nan_ft"], "task_arithmetic", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_sharded_writer_abort_closes_every_open_shard(tmp_path):
    from hf_cft.merging.streaming import ShardedWriter

    plan = [(f"k{i}", (4, 4), torch.float32) for i in range(4)]
    writer = ShardedWriter(tmp_path, plan, 2 * 64)  # two tensors per shard: two shards
    writer.write("k0", torch.ones(4, 4))
    handles = list(writer._files.values())
    assert handles and not all(fh.closed for fh in handles)
    writer.abort()
    assert all(fh.closed for fh in writer._files.values())
    writer.abort()  # twice: nothing left to close, no error


def test_lora_output_checks_each_merged_delta_naming_method_key_and_options(assets, tmp_path):
    """A LoRA output runs the same check of each merged ΔW as a full one: a wrong shape names the method and the key;
    an overflow names the options and the inputs' weights."""
    from hf_cft.merging import registry
    from hf_cft.merging.registry import MergeMethod, register
    from hf_cft.merging.streaming import merge_folders

    def flat(deltas, ctx):
        return deltas[0].reshape(-1)

    register(MergeMethod("pinned_flat", "tensor", flat))
    try:
        with pytest.raises(
            DeltaError, match=r"^Method 'pinned_flat' returned \(\d+,\) for key '[\w.]+q_proj.weight', "
        ):
            merge_folders(assets["clip"], [assets["lora_a"]], "pinned_flat", out=tmp_path / "o", lora_rank=2)
    finally:
        registry._METHODS.pop("pinned_flat", None)
    message = (
        r"^The merged delta of 'iso_c' at key '[\w.]+' holds NaN/inf: its options \{'alpha': 1e\+300\} scale "
        r"finite inputs beyond the float range; use smaller values.$"
    )  # Iso-C has no per-input weight: the message names none
    with pytest.raises(MergeConfigError, match=message):
        merge_folders(assets["clip"], [assets["lora_a"]], "iso_c", {"alpha": 1e300}, out=tmp_path / "o", lora_rank=2)
    message = (
        r"^The merged delta of 'task_arithmetic' at key '[\w.]+' holds NaN/inf: the inputs' weights \[1e\+300\] "
        r"scale finite inputs beyond the float range; use smaller values.$"
    )
    with pytest.raises(MergeConfigError, match=message):
        merge_folders(
            assets["clip"], [assets["lora_a"]], "task_arithmetic", {"weight": 1e300}, out=tmp_path / "o", lora_rank=2
        )


def test_full_output_of_lora_inputs_adds_s_b_a_and_the_lora_bias_in_fp32(assets, tmp_path):
    """A LoRA input merged into a full model: each target weight gets w·s·B@A and, with lora_bias, its bias gets
    w·s·b_B, computed in fp32 even from a bf16 adapter (s = lora_alpha / r)."""
    from safetensors.torch import load_file as load_st

    from hf_cft.merging.streaming import merge_folders

    torch.manual_seed(3)
    peft_model = get_peft_model(
        assets["base"](),
        LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False),
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft_model.to(torch.bfloat16).save_pretrained(tmp_path / "biased_bf16")
    out = tmp_path / "merged"
    merge_folders(assets["clip"], [tmp_path / "biased_bf16"], "task_arithmetic", {"weight": 0.5}, out=out)
    adapter = load_st(str(tmp_path / "biased_bf16" / "adapter_model.safetensors"))
    base, merged = assets["base"]().state_dict(), _weights(out)
    s = 6 / 2
    modules = sorted({k.split(".lora_")[0][len("base_model.model.") :] for k in adapter})
    assert modules and all(adapter[k].dtype == torch.bfloat16 for k in adapter)
    for m in modules:
        a = adapter[f"base_model.model.{m}.lora_A.weight"].float()
        b = adapter[f"base_model.model.{m}.lora_B.weight"].float()
        bias = adapter[f"base_model.model.{m}.lora_B.bias"].float()
        torch.testing.assert_close(merged[f"{m}.weight"], base[f"{m}.weight"] + 0.5 * s * (b @ a), rtol=0, atol=1e-6)
        torch.testing.assert_close(merged[f"{m}.bias"], base[f"{m}.bias"] + 0.5 * s * bias, rtol=0, atol=1e-6)


def _conv1d_base(folder, in_features=3, out_features=5, prefix="c"):
    """A one-layer GPT-2-style model folder: ``Conv1D`` weight stored as (in, out)."""
    from safetensors.torch import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(in_features)
    weights = {
        f"{prefix}.weight": torch.randn(in_features, out_features, generator=g),
        f"{prefix}.bias": torch.randn(out_features, generator=g),
    }
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return weights


def test_a_fan_in_fan_out_lora_input_adds_the_transposed_delta_and_base_mismatches_name_the_input(tmp_path):
    """A LoRA of a GPT-2-style ``Conv1D`` (``fan_in_fan_out=True``): the merged weight is θ⁰ + (s·B@A)ᵀ, what
    merge_and_unload gives. Refusals name the input: a base without the target's key, a base weight of another shape
    (both shapes), and a config whose r disagrees with the factors."""
    import shutil

    from transformers.pytorch_utils import Conv1D

    from hf_cft.merging.streaming import merge_folders

    weights = _conv1d_base(tmp_path / "base")
    net = torch.nn.Module()
    net.c = Conv1D(5, 3)
    net.load_state_dict(weights)
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["c"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(net, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = peft_model.merge_and_unload().c.weight.detach()

    def merge(base, adapter):
        return merge_folders(
            base, [adapter], "task_arithmetic", {"weight": 1.0}, out=tmp_path / "out", source_names=["task"]
        )

    merge(tmp_path / "base", tmp_path / "adapter")
    got = _weights(tmp_path / "out")
    assert got["c.weight"].shape == (3, 5) and torch.equal(got["c.bias"], weights["c.bias"])
    torch.testing.assert_close(got["c.weight"], want, rtol=0, atol=1e-6)
    _conv1d_base(tmp_path / "renamed", prefix="d")
    with pytest.raises(DeltaError) as err:
        merge(tmp_path / "renamed", tmp_path / "adapter")
    assert str(err.value) == "LoRA target 'c' of the input 0 (task) has no base key 'c.weight' in the base model."
    _conv1d_base(tmp_path / "wider", in_features=4)
    with pytest.raises(DeltaError) as err:
        merge(tmp_path / "wider", tmp_path / "adapter")
    assert str(err.value) == "LoRA delta for 'c.weight' has shape (3, 5) but the base weight is (4, 5)."
    shutil.copytree(tmp_path / "adapter", tmp_path / "bad_r")
    config = json.loads((tmp_path / "bad_r" / "adapter_config.json").read_text())
    config["r"] = 3
    (tmp_path / "bad_r" / "adapter_config.json").write_text(json.dumps(config))
    from hf_cft.errors import AdapterError

    with pytest.raises(AdapterError) as err:
        merge(tmp_path / "base", tmp_path / "bad_r")
    assert str(err.value) == (
        "Module 'c' of the input 0 (task): lora_A has rank 2 and lora_B rank 2 but the config says r=3."
    )


def test_merged_delta_checks_name_what_the_method_returned_and_what_scaled_it():
    """A method returning something other than a tensor is named by its type; an overflowing merged delta names the
    method's options *or* the inputs' weights (joined by " or "), and "its inputs" when it has neither."""
    from hf_cft.merging import registry
    from hf_cft.merging.registry import MergeMethod, Option, register

    def listed(deltas, ctx):
        return [deltas[0]]

    def scaled(deltas, ctx):
        out = torch.zeros_like(deltas[0])
        for t, row in enumerate(ctx.inputs):
            out += ctx.options.get("gain", 1.0) * row.get("weight", 1.0) * deltas[t]
        return out

    def huge(deltas, ctx):
        return deltas[0] * 1e39  # beyond fp32

    register(MergeMethod("pinned_listed", "tensor", listed))
    register(
        MergeMethod(
            "pinned_scaled", "tensor", scaled, options=(Option("gain", 1.0), Option("weight", 1.0, per_input=True))
        )
    )
    register(MergeMethod("pinned_huge", "tensor", huge))
    delta = {"w": torch.ones(2, 3)}
    try:
        with pytest.raises(DeltaError) as err:
            merge_deltas([delta], "pinned_listed")
        assert str(err.value) == "Method 'pinned_listed' returned list for key 'w', expected a tensor of shape (2, 3)."
        with pytest.raises(MergeConfigError) as err:
            merge_deltas([delta, delta], "pinned_scaled", {"gain": 1e20}, inputs=[{"weight": 1e20}, {}])
        assert str(err.value) == (
            "The merged delta of 'pinned_scaled' at key 'w' holds NaN/inf: its options {'gain': 1e+20} or the "
            "inputs' weights [1e+20, 1.0] scale finite inputs beyond the float range; use smaller values."
        )
        with pytest.raises(MergeConfigError) as err:
            merge_deltas([delta], "pinned_huge")
        assert str(err.value) == (
            "The merged delta of 'pinned_huge' at key 'w' holds NaN/inf: its inputs scale finite inputs beyond the "
            "float range; use smaller values."
        )
    finally:
        for name in ("pinned_listed", "pinned_scaled", "pinned_huge"):
            registry._METHODS.pop(name, None)


def test_model_methods_see_the_base_folder_and_lazy_deltas_refuse_unknown_keys_by_name(assets, tmp_path):
    """A ``kind="model"`` method writing a LoRA output gets θ⁰'s folder as ``ctx.base_model`` and
    ``ctx.extra["base_model"]``; an input's lazy delta raises ``KeyError(key)`` for a key it lacks. A lora_rank
    beyond several targets names the first one with its own shape."""
    from hf_cft.merging import registry
    from hf_cft.merging.registry import MergeMethod, register
    from hf_cft.merging.streaming import merge_folders

    seen = []

    def first(deltas, ctx):
        seen.append((ctx.base_model, ctx.extra.get("base_model")))
        return {k: deltas[0][k] for k in deltas[0]}

    def lookup(deltas, ctx):
        return {"w": deltas[0]["absent.weight"]}

    register(MergeMethod("pinned_first", "model", first))
    register(MergeMethod("pinned_lookup", "model", lookup))
    try:
        merge_folders(assets["clip"], [assets["lora_a"]], "pinned_first", out=tmp_path / "o", lora_rank=2)
        assert seen == [(Path(assets["clip"]), Path(assets["clip"]))]
        with pytest.raises(KeyError) as err:
            merge_deltas([{"w": torch.ones(2)}], "pinned_lookup")
        assert err.value.args == ("absent.weight",)
    finally:
        registry._METHODS.pop("pinned_first", None)
        registry._METHODS.pop("pinned_lookup", None)
    key = "text_model.encoder.layers.0.mlp.fc1.weight"  # lora_b: fc1 (37, 32) sorts before q_proj (32, 32)
    with pytest.raises(MergeConfigError) as err:
        merge_folders(assets["clip"], [assets["lora_b"]], "task_arithmetic", out=tmp_path / "x", lora_rank=33)
    assert str(err.value) == f"lora_rank=33 exceeds the smaller dimension of {key!r} (37, 32)."


# --------------------------------------------------------- exact sizes, refusals and side files (mutation tests)


def test_parse_size_reads_units_and_refuses_exactly():
    from hf_cft.errors import MergeConfigError
    from hf_cft.merging.streaming import parse_size

    sizes = {"500": 500, "500B": 500, "2KB": 2000, "1.5MB": 1_500_000, "1GiB": 1024**3, "3 kib": 3072, 1: 1}
    assert {v: parse_size(v) for v in sizes} == sizes
    refusals = [
        (True, "max_shard_size must be a size such as 2GB or a number of bytes, got True."),
        ("lots", "max_shard_size must be a size such as 500MB, 2GB or 1GiB, got 'lots'."),
        (0, "max_shard_size must be at least 1 byte, got 0."),
        ("0.1B", "max_shard_size must be at least 1 byte, got '0.1B'."),
    ]
    for value, message in refusals:
        with pytest.raises(MergeConfigError) as err:
            parse_size(value)
        assert str(err.value) == message


def test_merge_deltas_refusals_are_exact():
    from hf_cft.errors import MergeConfigError
    from hf_cft.merging.streaming import merge_deltas

    d = {"w": torch.ones(2)}
    for bad in (d, []):
        with pytest.raises(MergeConfigError) as err:
            merge_deltas(bad, "task_arithmetic")
        assert str(err.value) == "deltas must be a non-empty list of deltas (dicts of tensors)."
    with pytest.raises(MergeConfigError) as err:
        merge_deltas([d, d], "task_arithmetic", inputs=[{}, {}, {}])
    assert str(err.value) == "inputs has 3 entries for 2 deltas."


def test_side_files_set_the_dtype_under_the_key_the_config_uses_and_keep_its_layout(tmp_path):
    """config.json of a merged model: the output dtype goes under ``dtype`` (transformers 5), or under
    ``torch_dtype`` when only that key is there; the file is the config as 2-space indented JSON."""
    from hf_cft.merging.streaming import _write_model_side_files

    cases = [
        ({"model_type": "clip"}, "dtype"),
        ({"model_type": "clip", "torch_dtype": "float32"}, "torch_dtype"),
        ({"model_type": "clip", "dtype": "float32", "torch_dtype": "float32"}, "dtype"),
    ]
    for i, (config, key) in enumerate(cases):
        base, stage = tmp_path / f"base{i}", tmp_path / f"stage{i}"
        base.mkdir()
        stage.mkdir()
        (base / "config.json").write_text(json.dumps(config))
        _write_model_side_files(base, stage, "bfloat16")
        want = {**config, key: "bfloat16"}
        assert (stage / "config.json").read_text(encoding="utf-8") == json.dumps(want, indent=2) + "\n"
    _write_model_side_files(base, stage, None)
    assert json.loads((stage / "config.json").read_text()) == cases[-1][0]


def test_merge_inputs_without_safetensors_or_with_damaged_files_are_named_exactly(tmp_path):
    """A folder holding only pickles lists every one (hf_cft merges safetensors only); a file that is not
    safetensors names the input and the file; the default description is "safetensors file"."""
    from hf_cft.errors import BundleError
    from hf_cft.merging.streaming import SafetensorsFile, _Folder

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    for name in ("pytorch_model.bin", "c.pt", "b.pth", "a.ckpt", "notes.txt"):
        (pickles / name).write_bytes(b"not read")
    with pytest.raises(BundleError) as err:
        _Folder(pickles, "input 0")
    assert str(err.value) == (
        f"input 0: no safetensors weights in {str(pickles)!r}. It holds a.ckpt, b.pth, c.pt, pytorch_model.bin: "
        "hf_cft merges safetensors only (never pickle)."
    )
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{bad json")
    with pytest.raises(BundleError) as err:
        _Folder(junk, "input 1")
    assert str(err.value).startswith("input 1: 'model.safetensors' is not a readable safetensors file (")
    with pytest.raises(BundleError) as err:
        SafetensorsFile(junk / "model.safetensors")
    path = repr(str(junk / "model.safetensors"))
    assert str(err.value).startswith(f"safetensors file: {path} is not a readable safetensors file (")
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(good), metadata={"k": "v"})
    f = SafetensorsFile(good)
    assert f.what == "safetensors file" and f.metadata == {"k": "v"} and f.read("w").tolist() == [1.0, 1.0]
    save_file({"w": torch.ones(2)}, str(good))  # no metadata at all: an empty dict, not None
    assert SafetensorsFile(good).metadata == {}
