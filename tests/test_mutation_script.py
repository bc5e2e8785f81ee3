"""scripts/mutation.py: a mutant that timed out or crashed under mutmut's fork is run again in a process of its own;
the status file and --base."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timeouts_run_again_without_fork_become_killed_survived_or_no_tests(tmp_path, monkeypatch):
    """Each timed-out mutant runs the tests mutmut mapped to its function with MUTANT_UNDER_TEST naming it: a
    failing test makes it killed, passing tests survived, no mapped test "no tests"; other results are untouched."""
    mutation = _script()
    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    (tmp_path / "mutants" / "hf_cft" / "pkg").mkdir(parents=True)
    (tmp_path / "mutants" / "tests").mkdir()
    (tmp_path / "mutants" / "tests" / "test_probe.py").write_text(
        "import os\n\ndef test_probe():\n    assert os.environ['MUTANT_UNDER_TEST'] != 'hf_cft.pkg.mod.x_f__mutmut_1'\n"
    )
    codes = {
        "hf_cft.pkg.mod.x_f__mutmut_1": -24,  # breaks test_probe
        "hf_cft.pkg.mod.x_f__mutmut_2": -9,  # does not
        "hf_cft.pkg.mod.x_g__mutmut_1": -24,  # no test maps to g
        "hf_cft.pkg.mod.x_f__mutmut_3": 0,  # not a timeout: left alone
        "hf_cft.pkg.mod.x_f__mutmut_4": -11,  # crashed in the forked child (SIGSEGV): run again, passes
    }
    meta = tmp_path / "mutants" / "hf_cft" / "pkg" / "mod.py.meta"
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    stats = {"tests_by_mangled_function_name": {"hf_cft.pkg.mod.x_f": ["tests/test_probe.py::test_probe"]}}
    (tmp_path / "mutants" / "mutmut-stats.json").write_text(json.dumps(stats))
    mutation.run_timeouts_without_fork(["pkg.mod"], limit_s=120)
    got = {k: mutation._status(v) for k, v in json.loads(meta.read_text())["exit_code_by_key"].items()}
    assert got == {
        "hf_cft.pkg.mod.x_f__mutmut_1": "killed",
        "hf_cft.pkg.mod.x_f__mutmut_2": "survived",
        "hf_cft.pkg.mod.x_g__mutmut_1": "no tests",
        "hf_cft.pkg.mod.x_f__mutmut_3": "survived",
        "hf_cft.pkg.mod.x_f__mutmut_4": "survived",
    }


def test_status_file_round_trips_and_carries_only_unchanged_functions(tmp_path):
    """write_status stores each mutant's result per function with its source hash (numbers as ranges); --base takes a
    result from it only for a mutant this run did not check whose function's hash is unchanged."""
    mutation = _script()
    results = {f"hf_cft.m.x_f__mutmut_{i}": "killed" for i in (1, 2, 3, 7)}
    results |= {"hf_cft.m.x_f__mutmut_5": "survived", "hf_cft.m.x_g__mutmut_1": "no tests"}
    path = tmp_path / "status.tsv"
    mutation.write_status(path, results, {"hf_cft.m.x_f": "aaa", "hf_cft.m.x_g": "bbb"})
    assert "hf_cft.m.x_f\taaa\tkilled=1-3,7;survived=5" in path.read_text().splitlines()
    base = mutation.read_status(path)
    assert base["hf_cft.m.x_f"] == ("aaa", {1: "killed", 2: "killed", 3: "killed", 7: "killed", 5: "survived"})

    now = {
        "hf_cft.m.x_f__mutmut_1": "not checked",  # unchanged function, not run: carried
        "hf_cft.m.x_f__mutmut_5": "killed",  # run now: the new result stands
        "hf_cft.m.x_f__mutmut_9": "not checked",  # not in the base: stays not checked
        "hf_cft.m.x_g__mutmut_1": "not checked",  # its function changed: stays not checked
    }
    carried = mutation._carry(now, {"hf_cft.m.x_f": "aaa", "hf_cft.m.x_g": "ccc"}, base)
    assert carried == 1
    assert now == {
        "hf_cft.m.x_f__mutmut_1": "killed",
        "hf_cft.m.x_f__mutmut_5": "killed",
        "hf_cft.m.x_f__mutmut_9": "not checked",
        "hf_cft.m.x_g__mutmut_1": "not checked",
    }


def test_report_with_base_counts_carried_results_and_writes_every_status(tmp_path, monkeypatch):
    """The report of a run that re-ran one survivor takes the module's other results from the base status file and
    says how many it took; the status file it writes holds the whole module."""
    mutation = _script()
    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    monkeypatch.setattr(mutation, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(mutation, "EQUIVALENT", tmp_path / "results" / "equivalent.tsv")
    (tmp_path / "mutants" / "hf_cft").mkdir(parents=True)
    codes = {"hf_cft.mod.x_f__mutmut_1": None, "hf_cft.mod.x_f__mutmut_2": 1, "hf_cft.mod.x_f__mutmut_3": None}
    meta = {"exit_code_by_key": codes, "hash_by_function_name": {"x_f": "h1"}}
    (tmp_path / "mutants" / "hf_cft" / "mod.py.meta").write_text(json.dumps(meta))
    base = tmp_path / "base.tsv"
    base.write_text("hf_cft.mod.x_f\th1\tkilled=1;survived=2-3\n")
    table = mutation.report(["mod"], "t", diffs=False, base=base)
    row = table["mod"]
    assert (row["killed"], row["survived"], row["from base"], row["score"]) == (2, 1, 2, 66.7)
    written = mutation.read_status(tmp_path / "results" / "mutation-status-t.tsv")
    assert written == {"hf_cft.mod.x_f": ("h1", {1: "killed", 2: "killed", 3: "survived"})}
    assert "hf_cft.mod.x_f__mutmut_3" in (tmp_path / "results" / "mutation-survivors-t.md").read_text()


def test_a_malformed_status_file_is_refused_naming_the_file_and_line(tmp_path):
    mutation = _script()
    path = tmp_path / "status.tsv"
    for bad, why in (("hf_cft.m.x_f\taaa", "not enough values"), ("hf_cft.m.x_f\taaa\tkiled=1-3", "'kiled'")):
        path.write_text("# header\n" + bad + "\n")
        with pytest.raises(SystemExit, match=rf"status.tsv:2: not a status line .*{why}"):
            mutation.read_status(path)


def test_a_report_without_mutmut_results_refuses_and_writes_nothing(tmp_path, monkeypatch):
    """On a fresh clone (no mutants/) a report would replace the committed table with zeros: it is refused, naming the
    modules without results, and no result file is written."""
    mutation = _script()
    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    monkeypatch.setattr(mutation, "RESULTS", tmp_path / "results")
    (tmp_path / "mutants" / "hf_cft").mkdir(parents=True)
    (tmp_path / "mutants" / "hf_cft" / "mod.py.meta").write_text(json.dumps({"exit_code_by_key": {}}))
    with pytest.raises(SystemExit, match=r"^No mutmut results for other, pkg\.sub under .*Nothing was written\.$"):
        mutation.report(["mod", "other", "pkg.sub"], "latest", diffs=False)
    assert not (tmp_path / "results").exists()
