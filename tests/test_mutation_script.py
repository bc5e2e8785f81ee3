"""scripts/mutation.py: a mutant that timed out under mutmut's fork is run again in a process of its own."""

import importlib.util
import json
from pathlib import Path

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
    }
