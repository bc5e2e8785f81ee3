"""The benchmark harness's model selection and the pretraining-curve tool (no model is trained here)."""

import json
from pathlib import Path

import pytest
from tests_helpers import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    return load_benchmark(name)


@pytest.fixture(scope="module")
def run():
    return _load("run")


def test_every_protocol_has_a_design_with_a_config(run):
    assert set(run.PROTOCOL_DESIGN) == set(run.PROTOCOLS)
    configs = BENCH.parent / "recipes" / "configs"
    for design in set(run.PROTOCOL_DESIGN.values()):
        assert (configs / run.DESIGNS[design][0]).is_file()
    assert run.PROTOCOL_DESIGN["headroom"] == "F" and run.PROTOCOL_DESIGN["b2n"] == "C"


def test_design_checkpoints_are_distinct_cache_folders(run):
    paths = {run.design_checkpoint(d, quick=q) for d in run.DESIGNS for q in (False, True)}
    assert len(paths) == 2 * len(run.DESIGNS)
    assert run.design_checkpoint("F").parent.name == "benchmark-clip-web"
    with pytest.raises(SystemExit, match="unknown design 'Z'"):
        run.design_checkpoint("Z")


def test_a_checkpoint_without_config_is_refused_by_name(run, tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)):
        run.ensure_checkpoint(tmp_path, quick=False, data_dir=str(tmp_path), design="F")
    (tmp_path / "config.json").write_text("{}")
    assert run.ensure_checkpoint(tmp_path, quick=False, data_dir=str(tmp_path), design="F") == tmp_path


def _curve(path, steps, evals=()):
    lines = [
        {"step": s, "minutes": s / 100, "loss": 5.0 - s / 100, "images_per_s": 100.0 + s, "lr": 1e-3, "epoch": 0}
        for s in steps
    ]
    lines += [
        {"step": s, "minutes": s / 100, "zeroshot": {"a": {"ensemble": acc}, "b": {"ensemble": 0.0}}}
        for s, acc in evals
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_pretrain_curves_summarise_and_plot(tmp_path):
    pc = _load("pretrain_curves")
    f = _curve(tmp_path / "f.jsonl", range(10, 210, 10), evals=[(100, 40.0), (200, 60.0)])
    c = _curve(tmp_path / "c.jsonl", range(10, 110, 10))
    s = pc.summarise(pc.read_curve(f))
    assert s["steps"] == 200 and s["minutes"] == 2.0
    assert s["final_loss"] == pytest.approx(sum(5.0 - k / 100 for k in range(110, 210, 10)) / 10)
    assert s["median_images_per_s"] == pytest.approx(100.0 + 105.0)
    pc.main([str(tmp_path / "out" / "curves"), f"F={f}", f"C={c}", "--batch_size", "8"])
    md = (tmp_path / "out" / "curves.md").read_text()
    assert "| F | 200 | 1,600 |" in md and "| C | 100 | 800 |" in md
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_pretrain_curves_bad_inputs_name_the_file(tmp_path):
    pc = _load("pretrain_curves")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        pc.read_curve(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        pc.read_curve(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "zeroshot": {}}\n')
    with pytest.raises(ValueError, match="no loss records"):
        pc.read_curve(empty)
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        pc.main([str(tmp_path / "x"), "no-label"])


def test_b2n_methods_filter_keeps_the_reference_rows(run, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCH))
    import b2n

    assert run._b2n_rows(SimpleNamespace(methods=None)) == b2n.ROWS
    rows = run._b2n_rows(SimpleNamespace(methods=["kgcoop", "vpt_mergetune", "coop"]))
    assert rows == ("zs_single", "coop", "kgcoop", "vpt_mergetune")
    with pytest.raises(SystemExit, match="kgcop"):
        run._b2n_rows(SimpleNamespace(methods=["kgcop"]))


def test_merging_tables_names_an_unreadable_results_file_and_writes_the_table(tmp_path):
    tables = _load("merging_tables")
    with pytest.raises(SystemExit, match=r"--lora '.*missing\.json' cannot be read as JSON"):
        tables.main([str(tmp_path / "t"), "--lora", str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit, match=r"--full '.*other\.json' is not a continual run's results\.json"):
        tables.main([str(tmp_path / "t"), "--full", str(tmp_path / "other.json")])
    assert not list(tmp_path.glob("t.*"))
    metrics = {"last": 50.0, "bwt": -1.0, "transfer": 40.0, "average": 45.0}
    (tmp_path / "run.json").write_text(json.dumps({"results": {"tsv_m": {"metrics": metrics, "seconds": 3.0}}}))
    result = tables.main([str(tmp_path / "t"), "--full", str(tmp_path / "run.json"), "--title", "Order I"])
    assert result["rows"]["tsv_m"]["full"] == metrics and result["rows"]["tsv_m"]["lora"] is None
    assert "| 50.00 | -1.00 | 40.00 | 45.00 |" in (tmp_path / "t.md").read_text()


def test_fewshot_seed_tables_give_mean_and_sample_std_per_row():
    """benchmarks/fewshot_mtil.py's aggregate: each row's metrics over the seeds that ran it (mean ± sample std, and
    each seed's value); a row no seed ran is left out."""
    fewshot = _load("fewshot_mtil")

    def seed_json(last, transfer):
        metrics = {"last": last, "bwt": -1.0, "plasticity": last + 1, "transfer": transfer, "average": last - 1}
        return {"runs": {"zeroshot": {"metrics": dict(metrics, bwt=0.0)}, "condu": {"metrics": metrics}}}

    record, lines = fewshot.aggregate({1: seed_json(40.0, 45.0), 2: seed_json(44.0, 47.0)}, "II")
    assert list(record["rows"]) == ["zeroshot", "condu"] and record["seeds"] == [1, 2]
    last = record["rows"]["condu"]["last"]
    assert last["mean"] == 42.0 and last["values"] == [40.0, 44.0]
    assert abs(last["std"] - 2 ** 0.5 * 2) < 1e-12  # sample std of (40, 44)
    assert lines[0] == "# Few-shot MTIL-mini (5 shots per class), Order II, seeds 1, 2"
    assert "| ConDU FT (task id) | 42.0 ± 2.8 | -1.0 ± 0.0 | 43.0 ± 2.8 | 46.0 ± 1.4 | 41.0 ± 2.8 |" in lines
    assert "fewshot-order2-seed{s}.md" in lines[2]


@pytest.mark.parametrize("quick", [False, True])
def test_fewshot_runs_launch_valid_recipe_commands_and_resume(monkeypatch, tmp_path, quick):
    """benchmarks/fewshot_mtil.py run: four recipe launches per order and seed, each a command recipes/condu.py's own
    parser accepts (5 shots, the seed as shot draw and base seed, the LoRA runs' lr, task-agnostic ConDU runs, quick:
    20 steps and 100 test rows); a second call keeps every run that wrote its results.json."""
    from tests_helpers import load_recipe

    from hf_cft.continual import ContinualConfig
    from hf_cft.recipe_utils import parse_recipe_args

    fewshot = _load("fewshot_mtil")
    recipe = load_recipe("condu")
    launched = []

    def fake_run(cmd, cwd, stdout, stderr):
        launched.append(cmd)
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text("{}")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(fewshot.subprocess, "run", fake_run)
    monkeypatch.setattr(fewshot, "_check_data", lambda: None)
    fewshot.run(tmp_path, [2], ["II"], quick)
    assert len(launched) == 4
    parsed = []
    for cmd in launched:
        assert cmd[1:3] == ["launch", "--cpu"]
        argv = cmd[[i for i, c in enumerate(cmd) if c.endswith("condu.py")][0] + 1 :]
        args, config = parse_recipe_args(
            recipe.ConDURecipeArguments, ContinualConfig, args=argv, defaults=recipe.RECIPE_DEFAULTS
        )
        parsed.append((args, config))
        assert (args.shots, args.shot_seed, config.seed, args.order) == (5, 2, 2, "II")
        assert args.max_test == (100 if quick else 500)
        assert config.max_steps == (20 if quick else 200)
        assert str(config.expert_cache).endswith("lora" if config.finetune == "lora" else "full")
        assert config.learning_rate == (1e-3 if config.finetune == "lora" else 1e-4)
    assert [args.strategy for args, _ in parsed] == [
        ["zeroshot", "sequential", "wise", "independent", "condu"], ["condu"], ["independent", "condu"], ["condu"]
    ]
    assert [bool(args.task_agnostic) for args, _ in parsed] == [False, True, False, True]
    fewshot.run(tmp_path, [2], ["II"], quick)  # resumed: nothing launched again
    assert len(launched) == 4
