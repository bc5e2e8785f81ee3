"""recipes/pam.py and recipes/mtil.py: options reaching the right strategies, errors before any training, the
results tables, and (slow) end-to-end runs on the digits stream and on a mocked real-MTIL stream with resume."""

import json
from pathlib import Path

import numpy as np
import pytest
from tests_helpers import load_recipe

from hf_cft.continual import ContinualConfig, make_strategy
from hf_cft.continual.report import results_markdown

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _parse(rec, cls, argv):
    return rec.parse_recipe_args(cls, ContinualConfig, args=argv, defaults=rec.RECIPE_DEFAULTS)


def test_pam_recipe_gives_each_strategy_the_options_it_takes():
    rec = load_recipe("pam")
    argv = ["--top_p", "0.7", "--align_every", "5", "--merge_weight", "running", "--ties_k", "0.5"]
    args, config = _parse(rec, rec.PAMRecipeArguments, argv)
    assert config.finetune == "lora" and config.lora_target_modules[:2] == ["q_proj", "k_proj"]
    assert not config.lora_use_rslora and config.lora_alpha == config.lora_r  # scaling 1 (pam.md §6)
    pam = rec.strategy_kwargs("pam", args)
    assert pam == {"top_p": 0.7, "align_every": 5, "reset": "zero", "moment_reset": "first", "merge_weight": "running"}
    assert rec.strategy_kwargs("merge_only", args) == {"top_p": 0.7, "merge_weight": "running"}
    assert rec.strategy_kwargs("pam_ties", args)["ties_k"] == 0.5
    assert rec.strategy_kwargs("sequential_lora", args) == {"top_p": 0.7}
    assert rec.strategy_kwargs("independent", args) == {}
    args.merge_weight = "0.25"
    assert rec.strategy_kwargs("pam", args)["merge_weight"] == 0.25
    args.merge_weight = "avg"
    with pytest.raises(SystemExit, match="--merge_weight"):
        rec.strategy_kwargs("pam", args)


def test_recipes_refuse_bad_strategies_and_options_before_training(tmp_path):
    rec = load_recipe("pam")
    missing = str(tmp_path / "no-model")  # never loaded: every refusal comes first
    base = ["--checkpoint", missing, "--output_dir", str(tmp_path / "out")]
    for extra, needle in (
        (["--strategy", "pam", "nope"], r"unknown \['nope'\]"),
        (["--strategy", "pam", "--top_p", "2"], "top_p"),
        (["--strategy", "independent", "pam", "--finetune", "full"], "--strategy pam: .*finetune='lora'"),
    ):
        args, config = _parse(rec, rec.PAMRecipeArguments, base + extra)
        with pytest.raises(SystemExit, match=needle):
            rec.main(args, config)
    mtil = load_recipe("mtil")
    for extra, needle in (
        (["--strategy_options", "{not json"], "not valid JSON"),
        (["--strategy_options", '{"nope": {}}'], r"unknown strategy name\(s\) \['nope'\]"),
        (
            ["--strategy", "ties", "--strategy_options", '{"ties": {"lam": 1, "rho": 0.9}}'],
            r"no option\(s\) \['rho'\]",
        ),
        (["--strategy", "ties", "--strategy_options", '{"ties": {"k": 0}}'], "option k must be"),
    ):
        args, config = _parse(mtil, mtil.MTILRecipeArguments, base + extra)
        with pytest.raises(SystemExit, match=needle):
            mtil.main(args, config)
    assert not (tmp_path / "out").exists()
    # options may also come from a YAML config as a mapping
    assert mtil.parse_strategy_options({"pam": {"top_p": 0.3}}) == {"pam": {"top_p": 0.3}}


def test_mtil_recipe_lists_every_registered_strategy(capsys):
    from hf_cft.continual import STRATEGIES

    mtil = load_recipe("mtil")
    args, config = _parse(mtil, mtil.MTILRecipeArguments, ["--list_strategies", "true"])
    assert mtil.main(args, config) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == list(STRATEGIES)
    assert "magmax: lam, tie_break" in lines and "ties: disjoint_merge, k, lam, trim_scope" in lines
    assert "fisher: floor, labels, max_batches, normalize, seed" in lines  # issue 18: continual Fisher merging


def test_results_markdown_reports_metrics_and_the_misalignment_log():
    A = [[80.0, 10.0], [70.0, 90.0]]
    results = {
        "zeroshot": {
            "label": "zeroshot",
            "metrics": {"last": 50.0, "bwt": 0.0, "plasticity": 50.0, "transfer": 40.0, "average": 45.0},
            "matrix": A,
        },
        "pam": {
            "label": "PAM",
            "metrics": {"last": 80.0, "bwt": -10.0, "plasticity": 85.0, "transfer": 10.0, "average": 62.5},
            "matrix": A,
            "seconds": 3.0,
            "history": [
                {"task": "a", "reset_entries": 0, "task_adapter_accuracy": 81.0},
                {
                    "task": "b",
                    "reset_entries": 12,
                    "misalignment_top_p": 0.052,
                    "misalignment_all": 0.25,
                    "misalignment_top_p_A": 0.0,
                    "misalignment_top_p_B": 0.1,
                    "mean_step_misalignment": 0.125,
                    "task_adapter_accuracy": 95.0,
                },
            ],
        },
    }
    md = results_markdown(results, "T", "note", ["a", "b"])
    assert "| strategy | ACC (Last) | BWT | Plasticity | Transfer | Average | seconds |" in md
    assert "| PAM | 80.0 | -10.0 | 85.0 | 10.0 | 62.5 | 3 |" in md
    assert "| PAM | a | – | – | – | – | – | 0 | 81.0 | 80.0 |" in md
    assert "| PAM | b | 5.2 | 25.0 | 0.0 | 10.0 | 12.5 | 12 | 95.0 | 90.0 |" in md
    assert "| zeroshot | a |" not in md  # strategies without the log get no misalignment rows
    assert "Sign misalignment" not in results_markdown({"zeroshot": results["zeroshot"]}, "T")


# ------------------------------------------------------------------------------------------------ end to end


def _demo_checkpoint(path, classnames, templates):
    from hf_cft.data import format_prompts
    from hf_cft.recipe_utils import demo_clip

    model, tokenizer = demo_clip(format_prompts(classnames, templates), image_size=16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_pam_recipe_runs_the_digits_stream_and_resumes(tmp_path):
    from huggingface_hub import ModelCard

    from hf_cft.data import DIGIT_CLASSNAMES, DIGIT_TEMPLATES
    from hf_cft.merging.pam import PAMState

    clip = _demo_checkpoint(tmp_path / "clip", DIGIT_CLASSNAMES, DIGIT_TEMPLATES)
    rec = load_recipe("pam")
    strategies = ["zeroshot", "merge_only", "pam"]
    argv = ["--checkpoint", str(clip), "--benchmark", "digits", "--strategy", *strategies, "--align_every", "1"]
    argv += ["--max_steps", "2", "--warmup_steps", "0", "--per_device_train_batch_size", "8", "--use_cpu", "true"]
    argv += ["--output_dir", str(tmp_path / "out"), "--lora_r", "2", "--lora_alpha", "2", "--top_p", "1.0"]
    args, config = _parse(rec, rec.PAMRecipeArguments, argv)
    summary = rec.main(args, config)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["results"]) == strategies
    for name in strategies:
        m = json.loads((out / name / "accuracy_matrix.json").read_text())
        assert m["complete"] and saved["results"][name]["metrics"] == pytest.approx(m["metrics"])
        assert m["metrics"]["plasticity"] == pytest.approx(np.diag(np.array(m["values"])).mean())
        assert name in ModelCard.load(out / name / "README.md").data.tags
    pam_hist = saved["results"]["pam"]["history"]
    assert pam_hist[1]["alignment_steps"] == 2 and "misalignment_all" in pam_hist[1]
    table = (out / "results.md").read_text()
    assert "| strategy | ACC (Last) | BWT | Plasticity | Transfer | Average | seconds |" in table
    assert "| PAM (p=1.0, K=1) | digits-4-6 |" in table and "| merge only (no alignment) | digits-7-9 |" in table
    state = PAMState.from_pretrained(out / "pam" / "checkpoint" / "pam")  # a loadable LoRA folder + PAM state
    assert state.num_tasks == 3 and len(state.history) == 3
    # re-running the finished command trains nothing and reports the same numbers
    again = rec.main(*_parse(rec, rec.PAMRecipeArguments, argv))
    for name in strategies:
        assert again["results"][name]["resumed_at"] == 3 and summary["results"][name]["resumed_at"] == 0
        assert again["results"][name]["matrix"] == summary["results"][name]["matrix"]


@pytest.mark.slow
def test_mtil_recipe_on_the_real_mtil_stream_with_a_mocked_hub(tmp_path):
    from hf_cft.data import from_arrays, get_spec
    from hf_cft.recipe_utils import run_continual_recipe

    names = ["mnist", "eurosat"]
    specs = {n: get_spec(f"mtil/{n}") for n in names}
    prompts_classes = [c for n in names for c in specs[n].classnames]
    clip = _demo_checkpoint(tmp_path / "clip", prompts_classes, ["a photo of {}."])
    calls = []

    def loader(name):
        calls.append(name)
        spec = specs[name]
        rng = np.random.default_rng(len(name))
        n = spec.num_classes
        imgs = [rng.integers(0, 255, (16, 16, 3)).astype(np.uint8) for _ in range(2 * n)]
        labels = [i % n for i in range(2 * n)]
        ds = from_arrays(imgs, labels, list(spec.classnames), list(spec.templates), name=name)
        ds.splits["test"] = ds.splits["train"]
        return ds

    mtil = load_recipe("mtil")
    argv = ["--checkpoint", str(clip), "--benchmark", "mtil", "--datasets", *names, "--strategy", "zeroshot", "wise"]
    argv += ["--max_steps", "1", "--warmup_steps", "0", "--per_device_train_batch_size", "8", "--use_cpu", "true"]
    argv += ["--output_dir", str(tmp_path / "out")]
    args, config = _parse(mtil, mtil.MTILRecipeArguments, argv)
    strategies = {n: make_strategy(n) for n in args.strategy}
    summary = run_continual_recipe(args, config, strategies, mtil_loader=loader)
    assert calls == names and summary["benchmark"] == "mtil" and summary["stream"] == "MTIL custom"
    assert [t["source"] for t in summary["tasks"]] == ["mtil/mnist", "mtil/eurosat"]
    assert np.isfinite(np.array(summary["results"]["wise"]["matrix"])).all()


def test_condu_recipe_and_mtil_options_run_the_released_modes():
    """recipes/condu.py passes --lora_merge and --rescaler_groups to ConDU (issue 17 items 9, 10); recipes/mtil.py
    reaches the same options and the baselines' reference switches through --strategy_options."""
    from hf_cft.continual import ConDUStrategy

    rec = load_recipe("condu")
    argv = ["--finetune", "lora", "--lora_merge", "factors", "--rescaler_groups", "openai"]
    args, config = _parse(rec, rec.ConDURecipeArguments, argv)
    kwargs = rec.strategy_kwargs("condu", args)
    assert kwargs["lora_merge"] == "factors" and kwargs["rescaler_groups"] == "openai"
    strategy = make_strategy("condu", **kwargs)
    assert isinstance(strategy, ConDUStrategy) and strategy.settings()["lora_merge"] == "factors"
    strategy.check_config(config)  # factor mode with LoRA: accepted
    mtil = load_recipe("mtil")
    options = mtil.parse_strategy_options(
        '{"condu": {"lora_merge": "factors"}, "ties": {"trim_scope": "model", "disjoint_merge": "sum"}, '
        '"magmax": {"tie_break": "earlier"}, "emr": {"rescaler": "global_sum", "zero_sign": 0}, '
        '"opcm": {"rank_rule": "fusion_bench"}}'
    )
    built = {name: make_strategy(name, **opts) for name, opts in options.items()}
    assert built["ties"].merger.trim_scope == "model" and built["magmax"].merger.tie_break == "earlier"
    assert built["emr"].settings() == {"rescaler": "global_sum", "zero_sign": 0}


def test_shot_seed_reaches_the_few_shot_draw(monkeypatch):
    """--shot_seed (default 0) is the seed of the 5-shot draw of MTIL-mini and MTIL, and the stream says it."""
    from types import SimpleNamespace

    import hf_cft.continual as continual
    from hf_cft.recipe_utils import ContinualStreamArguments, continual_tasks

    seen = []
    monkeypatch.setattr(continual, "mtil_mini_tasks", lambda *a, **k: seen.append(("mini", k)) or [])
    monkeypatch.setattr(continual, "mtil_tasks", lambda *a, **k: seen.append(("mtil", k)) or [])
    assert ContinualStreamArguments().shot_seed == 0
    args = SimpleNamespace(datasets=None, order="I", data_dir=None, shots=5, shot_seed=3, max_test=None)
    _, stream = continual_tasks(args, "mtil_mini")
    assert seen[-1] == ("mini", {"shots": 5, "shot_seed": 3, "max_test": None})
    assert stream == "MTIL-mini Order I, 5-shot (draw seed 3)"
    _, stream = continual_tasks(args, "mtil")
    assert seen[-1][1]["shot_seed"] == 3 and stream == "MTIL Order I, 5-shot (draw seed 3)"
