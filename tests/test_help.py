"""Every command's ``--help`` works — every recipe in ``recipes/*.py`` (run as ``__main__``, as ``python`` and
``accelerate launch`` run it), every script of ``benchmarks/`` and every ``hf-cft`` subcommand found on the parser — and network failures of the
Hub commands are one line on stderr with exit status 2."""

import argparse
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_cft.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.py"))
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if '__name__ == "__main__"' in p.read_text())
SUBCOMMANDS = sorted(
    name
    for action in build_parser()._actions
    if isinstance(action, argparse._SubParsersAction)
    for name in action.choices
)


def test_the_commands_are_discovered():
    assert len(RECIPES) >= 7 and {"coop.py", "mergetune.py", "condu.py", "pam.py"} <= {p.name for p in RECIPES}
    assert len(SUBCOMMANDS) >= 5 and {"eval", "merge", "card", "push"} <= set(SUBCOMMANDS)


def _script_help(script: Path, monkeypatch, capsys) -> tuple[object, str]:
    """``python <script> --help``: the script's own ``__main__`` block, in-process (fast): (exit code, stdout)."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    return exc.value.code, capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_help(recipe, monkeypatch, capsys):
    """``python recipes/<x>.py --help``."""
    code, out = _script_help(recipe, monkeypatch, capsys)
    assert code in (0, None) and out.startswith("usage:") and "--help" in out, out[-2000:]


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_help(script, monkeypatch, capsys):
    """``python benchmarks/<x>.py --help`` exits 0 with a usage line (two scripts used to exit 1 on it)."""
    code, out = _script_help(script, monkeypatch, capsys)
    assert code in (0, None) and out.startswith("usage:"), out[-2000:]


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"] if command is None else [command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: hf-cft") and len(out.splitlines()) > 3


def _run(argv, **env):
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300, check=False
    )


@pytest.mark.slow
def test_python_and_accelerate_launch_recipe_help_in_a_subprocess():
    """The issue's two commands, as a user types them (~30 s on a busy 2-core machine)."""
    for argv in (
        [sys.executable, "recipes/mergetune.py", "--help"],
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            "1",
            "recipes/coop.py",
            "--help",
        ],
    ):
        res = _run(argv)
        assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_accelerate_launch_help_of_every_recipe(recipe):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    res = _run([*launch, str(recipe), "--help"])
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


def test_network_failures_of_push_and_pull_are_one_line_with_status_2(tmp_path):
    """``hf-cft push`` and a Hub model id for ``hf-cft eval`` (snapshot) against a closed loopback port."""
    from hf_cft.testing import tiny_clip

    tiny_clip().save_pretrained(tmp_path / "clip")
    script = textwrap.dedent(
        f"""
        import sys
        from hf_cft.cli import main
        push = main(["push", "--artefact", {str(tmp_path / "clip")!r}, "--repo_id", "me/clip", "--token", "hf_x"])
        print("---", file=sys.stderr)
        pull = main(["eval", "--model", "me/clip", "--dataset", "digits", "--output", {str(tmp_path / "e.json")!r}])
        print(push, pull)
        """
    )
    res = _run([sys.executable, "-c", script], HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    assert res.stdout.split() == ["2", "2"], res.stderr[-3000:]
    push_err, pull_err = (part.strip() for part in res.stderr.split("---"))
    push_lines = [line for line in push_err.splitlines() if line.startswith("hf-cft")]
    pull_lines = [line for line in pull_err.splitlines() if line.startswith("hf-cft")]
    assert len(push_lines) == 1 and "Traceback" not in res.stderr
    assert "hf-cft push: error: Cannot push" in push_lines[0] and "'me/clip'" in push_lines[0]
    assert "http://127.0.0.1:9" in push_lines[0]
    assert len(pull_lines) == 1 and "hf-cft eval: error: 'me/clip' is neither a local folder" in pull_lines[0]
    assert not (tmp_path / "e.json").exists()
