"""Mutation testing of hf_cft's core with mutmut: run it per module, then write the score table and the survivors.

    pip install -c constraints/dev.txt -e ".[dev,mutation]"
    python scripts/mutation.py                       # every core module (hours on 2 cores: run it in the background)
    python scripts/mutation.py merging.condu metrics # some modules
    python scripts/mutation.py --report              # only rewrite the tables from mutmut's last results
    python scripts/mutation.py merging.pam --only-survivors benchmarks/results/mutation-survivors-all-before.md
                                                     # re-run an earlier run's survivors against new tests

mutmut (configured in pyproject.toml's ``[tool.mutmut]``) copies the package to ``mutants/``, plants one small
change at a time in the core modules and runs the tests that cover the changed function (it learns which tests
cover which function in one traced run of ``pytest_add_cli_args_test_selection``, the union of ``TESTS`` below).
A mutant is *killed* when a test fails, *survives* when all pass. A survivor is either killed by a new test or
listed in ``benchmarks/results/mutation-equivalent.tsv`` (mutant name, a tab, one line on why no test can tell it
from the original; a line whose reason starts with ``GPU only:`` marks a mutant that changes behaviour only on a GPU,
which this CPU-only project cannot run: counted apart, not as equivalent). The score of a module is
killed / (mutants − equivalent − GPU only − not reached by any test − not run yet).

Writes ``benchmarks/results/mutation.md`` / ``.json`` (per module: mutants, killed, equivalent, survived, no tests,
timeout, score), ``benchmarks/results/mutation-survivors.md`` (each survivor's diff) and
``benchmarks/results/mutation-status.tsv`` (every mutant's result, per function with a hash of its source). A
later run given ``--base`` that file takes these results for the mutants of unchanged functions it does not run:

    python scripts/mutation.py --only-survivors benchmarks/results/mutation-survivors-latest.md \
        --base benchmarks/results/mutation-status-latest.tsv --tag latest
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT = RESULTS / "mutation-equivalent.tsv"

# core module (under hf_cft/) -> the test files that exercise it (their union is mutmut's test selection)
TESTS = {
    "merging.condu": ["test_condu.py", "test_router.py", "test_rule_gaps.py"],
    "merging.masks": ["test_condu.py", "test_deltas.py"],
    "merging.deltas": ["test_deltas.py", "test_condu.py"],
    "merging.baselines": [
        "test_merging_baselines.py",
        "test_merging_fidelity.py",
        "test_rule_gaps.py",
        "test_dare_counter.py",
    ],
    "merging.pam": ["test_pam.py"],
    "merging.router": ["test_router.py"],
    "trainers.mergetune_losses": ["test_mergetune.py", "test_mergetune_fidelity.py", "test_rule_gaps.py"],
    "trainers.mergetune_trainer": ["test_mergetune.py", "test_mergetune_fidelity.py", "test_family_matrix.py"],
    "trainers.mergetune_weightspace": ["test_mergetune_weightspace.py", "test_family_matrix.py"],
    "trainers.feature_training": ["test_feature_training.py"],
    "metrics": ["test_metrics.py", "test_continual.py"],
    "peft": ["test_peft_methods.py", "test_rule_gaps.py", "test_family_matrix.py", "test_coop_prompts.py"],
    "utils": ["test_rule_gaps.py", "test_condu.py"],
    # added by issue 18 (merging beyond mergekit and FusionBench)
    "merging.methods": ["test_merging_methods.py", "test_merge_registry_methods.py", "test_merging_fused.py"],
    "merging.streaming": [
        "test_merge_config.py",
        "test_merging_speed.py",
        "test_merge_registry.py",
        "test_streaming_io.py",
        "test_streaming_merge.py",
    ],
    "merging.registry": ["test_merge_registry.py", "test_merge_registry_methods.py"],
    "merging.data_dependent": ["test_merging_data_dependent.py", "test_merge_config.py"],
    "merging.fused": ["test_merging_fused.py", "test_dare_counter.py"],
}
# Not mutated: hf_cft/merging/_fused_kernels.py (numba-compiled loops: mutmut's trampolines cannot wrap them; their
# arithmetic is pinned against the torch kernels in tests/test_merging_fused.py).
#: functions that run only when their module is imported (registering merge methods): mutmut runs each mutant in a
#: child forked from a process that has imported the module already, so such a mutant never runs. They are counted
#: apart ("import time") and left out of the score; the registry they fill is tested by its behaviour
#: (tests/test_merge_registry.py, tests/test_merge_registry_methods.py).
IMPORT_TIME = (".x__register__mutmut_", ".x__register_builtins__mutmut_")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout"}


def _status(code) -> str:
    if code is None:
        return "not checked"
    return STATUS.get(code, "timeout" if code in (-24, -9, 152, 255) else "other")  # -9: a hung child killed


def _equivalent() -> dict[str, str]:
    if not EQUIVALENT.is_file():
        return {}
    out = {}
    for line in EQUIVALENT.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition("\t")
            out[name.strip()] = why.strip()
    return out


def _metas(module: str) -> list[Path]:
    """mutmut's ``.meta`` result files under ``mutants/`` for one module (a file, or every file of a package)."""
    base = ROOT / "mutants" / "hf_cft" / Path(*module.split("."))
    metas = sorted(base.rglob("*.py.meta")) if base.is_dir() else [base.with_suffix(".py.meta")]
    return [meta for meta in metas if meta.is_file()]


def _results(module: str) -> tuple[dict[str, str], dict[str, str]]:
    """(mutant name -> status, function -> mutmut's hash of its source), from mutmut's ``.meta`` files for one
    module; functions are named like their mutants (``hf_cft.merging.pam.x_merge``)."""
    out, hashes = {}, {}
    for meta in _metas(module):
        data = json.loads(meta.read_text(encoding="utf-8"))
        out.update({name: _status(code) for name, code in data["exit_code_by_key"].items()})
        prefix = ".".join(p for p in meta.relative_to(ROOT / "mutants").parts if p != "__init__.py.meta")
        prefix = prefix.removesuffix(".py.meta")  # hf_cft.<module path>, as the mutants are named
        hashes.update({f"{prefix}.{fn}": h for fn, h in data.get("hash_by_function_name", {}).items()})
    return out, hashes


def _function(name: str) -> str:
    """``hf_cft.a.x_f__mutmut_3`` -> ``hf_cft.a.x_f``."""
    return name.rsplit("__mutmut_", 1)[0]


def _number(name: str) -> int:
    """``hf_cft.a.x_f__mutmut_3`` -> 3."""
    return int(name.rsplit("__mutmut_", 1)[1])


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    out, numbers = [], sorted(numbers)
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


def write_status(path: Path, results: dict[str, str], hashes: dict[str, str]) -> None:
    """Every mutant's status, one line per function: ``function<TAB>source hash<TAB>status=1-40,42;...``; a later
    ``--base`` run takes from it the status of each mutant it did not run whose function is unchanged."""
    from hf_cft.utils import atomic_write_bytes

    by_function: dict[str, dict[str, list[int]]] = {}
    for name, status in results.items():
        by_function.setdefault(_function(name), {}).setdefault(status, []).append(_number(name))
    lines = ["# function\tmutmut's hash of its source\tstatus=mutant numbers (scripts/mutation.py --base reads this)"]
    for fn in sorted(by_function):
        cells = ";".join(f"{st}={_ranges(nums)}" for st, nums in sorted(by_function[fn].items()))
        lines.append(f"{fn}\t{hashes.get(fn, '')}\t{cells}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def read_status(path: Path) -> dict[str, tuple[str, dict[int, str]]]:
    """function -> (source hash, mutant number -> status), from a file :func:`write_status` wrote."""
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            fn, digest, cells = line.split("\t")
            numbers = {}
            for cell in cells.split(";"):
                status, _, spans = cell.partition("=")
                if status not in set(STATUS.values()) | {"other", "not checked"}:
                    raise ValueError(f"unknown status {status!r}")
                for span in spans.split(","):
                    lo, _, hi = span.partition("-")
                    numbers.update(dict.fromkeys(range(int(lo), int(hi or lo) + 1), status))
        except ValueError as err:
            raise SystemExit(
                f"{path}:{i}: not a status line (function<TAB>hash<TAB>status=1-3,7;...): {err}"
            ) from None
        out[fn] = (digest, numbers)
    return out


def _carry(results: dict[str, str], hashes: dict[str, str], base) -> int:
    """Fill in, from ``base`` (:func:`read_status`), each mutant this checkout has not run whose function's source
    is unchanged (same hash, same mutants); a changed function keeps "not checked" until it is run. Returns how many."""
    carried = 0
    for name, status in results.items():
        fn = _function(name)
        if status != "not checked" or fn not in base or not hashes.get(fn) or base[fn][0] != hashes[fn]:
            continue
        old = base[fn][1].get(_number(name))
        if old is not None and old != "not checked":
            results[name] = old
            carried += 1
    return carried


def survivor_names(path: Path, modules: list[str]) -> list[str]:
    """The mutant names listed in a survivors file (``## name`` headings or ``- `name``` lines) of ``modules``."""
    import re

    names = re.findall(r"^(?:## |- `)(hf_cft\.[^\s`]+)", path.read_text(encoding="utf-8"), flags=re.M)
    return [n for n in names if any(n.startswith(f"hf_cft.{m}.") for m in modules)]


def run(modules: list[str], children: int, only: list[str] | None = None) -> None:
    """One mutmut invocation for all ``modules`` (it runs the clean test selection and the coverage trace once);
    ``only``: just these mutant names (e.g. the survivors of an earlier run, against new tests)."""
    print(f"[mutation] {' '.join(modules)}", flush=True)
    patterns = only if only is not None else [f"hf_cft.{module}.*" for module in modules]
    subprocess.run(
        [sys.executable, "-m", "mutmut", "run", *patterns, "--max-children", str(children)], cwd=ROOT, env=_env()
    )


def _env() -> dict[str, str]:
    """The environment of a mutant's tests: offline, single-threaded (mutmut forks one child per mutant from a
    process that has imported torch: with intra-op thread pools a child can inherit a held lock and wait forever)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_timeouts_without_fork(modules: list[str], limit_s: int) -> None:
    """Run each mutant of ``modules`` that timed out or crashed (a signal, e.g. a segfault in a numba kernel reading
    out of bounds) under mutmut again, in a fresh pytest process of its own.

    mutmut forks every mutant's run from one long-lived process; a test whose thread pools (torch, numba) were
    started in that process can wait forever in the forked child, so a mutant that breaks no test "times out" where
    it should survive, and one that breaks a late test never gets there. Here ``MUTANT_UNDER_TEST`` (which mutmut's
    trampolines read) selects the mutant in a new process that runs the tests mutmut maps to its function, stopping at
    the first failure; the result (killed, survived, or a timeout again after ``limit_s``) replaces the timeout."""
    from hf_cft.utils import atomic_write_bytes

    stats = json.loads((ROOT / "mutants" / "mutmut-stats.json").read_text(encoding="utf-8"))
    tests_by_function = stats["tests_by_mangled_function_name"]
    env = _env()
    for module in modules:
        for meta in _metas(module):
            data = json.loads(meta.read_text(encoding="utf-8"))
            codes = data["exit_code_by_key"]
            for name in [n for n, code in codes.items() if _status(code) in ("timeout", "other")]:
                tests = sorted(tests_by_function.get(_function(name), ()))
                codes[name] = _run_without_fork(name, tests, env, limit_s) if tests else 33
                # after each mutant, atomically: an interrupted run keeps every result so far and a whole file
                atomic_write_bytes(meta, json.dumps(data).encode("utf-8"))
                print(f"[mutation] {name}: {_status(codes[name])} (no fork)", flush=True)


def _run_without_fork(name: str, tests: list[str], env: dict[str, str], limit_s: int) -> int:
    """mutmut's exit code for mutant ``name`` from its ``tests`` in a pytest process of its own: 1 killed, 0
    survived, 5 no tests collected, -24 still running after ``limit_s``."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not threads", *tests]
    try:
        run = subprocess.run(
            cmd, cwd=ROOT / "mutants", env={**env, "MUTANT_UNDER_TEST": name}, capture_output=True, timeout=limit_s
        )
    except subprocess.TimeoutExpired:
        return -24
    return run.returncode if run.returncode in (0, 5) else 1


def report(modules: list[str], tag: str, diffs: bool = True, base: Path | None = None) -> dict:
    from hf_cft.utils import atomic_write_bytes

    missing = [module for module in modules if not _metas(module)]
    if missing:  # a table of zeros would replace the committed one
        raise SystemExit(
            f"No mutmut results for {', '.join(missing)} under {ROOT / 'mutants'}: run `python scripts/mutation.py "
            f"{' '.join(missing)}` first. Nothing was written."
        )
    equivalent = _equivalent()
    previous = read_status(base) if base is not None else {}
    table, survivors, everything, all_hashes = {}, [], {}, {}
    for module in modules:
        res, hashes = _results(module)
        carried = _carry(res, hashes, previous)
        everything.update(res)
        all_hashes.update(hashes)
        count = Counter()
        for name, status in res.items():
            if any(marker in name for marker in IMPORT_TIME):
                count["import time"] += 1
                continue
            if status == "survived" and name in equivalent:
                status = "GPU only" if equivalent[name].startswith("GPU only:") else "equivalent"
            count[status] += 1
            if status == "survived":
                survivors.append(name)
        apart = ("equivalent", "GPU only", "no tests", "not checked", "import time")
        reached = len(res) - sum(count[c] for c in apart)
        table[module] = {
            "mutants": len(res),
            "killed": count["killed"],
            "equivalent": count["equivalent"],
            "GPU only": count["GPU only"],
            "survived": count["survived"],
            "no tests": count["no tests"],
            "timeout": count["timeout"],
            "not checked": count["not checked"],
            "import time": count["import time"],
            "score": round(100.0 * count["killed"] / reached, 1) if reached else None,
            # mutmut's own score counts a timeout caught; kept for comparison with older tables, never the score
            "score with timeouts": round(100.0 * (count["killed"] + count["timeout"]) / reached, 1)
            if reached
            else None,
            "from base": carried,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"mutation{'-' + tag if tag else ''}"
    write_status(RESULTS / f"mutation-status{'-' + tag if tag else ''}.tsv", everything, all_hashes)
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(table, indent=2) + "\n").encode("utf-8"))
    cols = ["mutants", "killed", "equivalent", "GPU only", "survived", "no tests", "timeout", "not checked"]
    cols += ["import time", "score", "score with timeouts", "from base"]
    lines = [
        f"# Mutation testing{' (' + tag + ')' if tag else ''}",
        "",
        "mutmut over hf_cft's core (`python scripts/mutation.py`); score = killed / (mutants − equivalent − GPU only − no "
        "tests − not checked − import time), in %; a timeout is not a kill (re-run it with --timeouts-without-fork); "
        "score with timeouts, which counts it caught, is kept for comparison with older tables; from base: results "
        "taken from an earlier run's status file (--base) for mutants of unchanged functions that this run did not run.",
        "",
        "| module | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    lines += [f"| {m} | " + " | ".join(str(row[c]) for c in cols) + " |" for m, row in table.items()]
    atomic_write_bytes(stem.with_suffix(".md"), ("\n".join(lines) + "\n").encode("utf-8"))
    shown = []
    for name in survivors:
        if not diffs:  # names only, per function (mutmut show costs a second per mutant)
            shown.append(f"- `{name}`\n")
            continue
        diff = subprocess.run(
            [sys.executable, "-m", "mutmut", "show", name], cwd=ROOT, capture_output=True, text=True
        ).stdout
        shown.append(f"## {name}\n\n```diff\n{diff.strip()}\n```\n")
    if not shown:
        shown = ["None: every mutant reached is killed, listed in mutation-equivalent.tsv, or counted apart.\n"]
    survivors_md = "# Surviving mutants\n\n" + "\n".join(shown)
    atomic_write_bytes(RESULTS / f"mutation-survivors{'-' + tag if tag else ''}.md", survivors_md.encode("utf-8"))
    print("\n".join(lines))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"core modules (default: all): {', '.join(TESTS)}")
    parser.add_argument("--report", action="store_true", help="only write the tables from the last results")
    parser.add_argument("--children", type=int, default=1, help="parallel mutant runs (default 1)")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. before / after)")
    parser.add_argument("--names-only", action="store_true", help="list the survivors by name, without their diffs")
    parser.add_argument(
        "--base",
        type=Path,
        help="an earlier run's mutation-status-<tag>.tsv: each mutant this checkout did not run takes its status "
        "from there when its function's source is unchanged (re-run survivors and changed functions, report all)",
    )
    parser.add_argument(
        "--only-survivors",
        type=Path,
        help="re-run only the mutants a survivors file lists (mutmut keeps the other results of this checkout)",
    )
    parser.add_argument(
        "--timeouts-without-fork",
        type=int,
        metavar="SECONDS",
        help="run each mutant that timed out or crashed again in a fresh process of its own (at most SECONDS each), "
        "then report",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in TESTS]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {list(TESTS)}")
    modules = args.modules or list(TESTS)
    if args.base is not None and not args.base.is_file():
        parser.error(f"--base: {str(args.base)!r} is not a file")
    if args.only_survivors is not None and not args.only_survivors.is_file():
        parser.error(f"--only-survivors: {str(args.only_survivors)!r} is not a file")
    if args.timeouts_without_fork is not None:
        if args.timeouts_without_fork < 1:
            parser.error(f"--timeouts-without-fork must be at least 1 second, got {args.timeouts_without_fork}")
        if not (ROOT / "mutants" / "mutmut-stats.json").is_file():
            parser.error(
                "--timeouts-without-fork needs a mutmut run of this checkout first (no mutants/mutmut-stats.json)"
            )
        run_timeouts_without_fork(modules, args.timeouts_without_fork)
    elif not args.report:
        only = survivor_names(args.only_survivors, modules) if args.only_survivors else None
        if only == []:  # an empty name list would make mutmut run every mutant
            print(f"[mutation] {args.only_survivors} lists no survivor of {', '.join(modules)}: nothing to re-run")
        else:
            run(modules, args.children, only)
    report(modules, args.tag, diffs=not args.names_only, base=args.base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
