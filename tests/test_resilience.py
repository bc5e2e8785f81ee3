"""Resilience (issue 8, items 4a/4b): SIGKILL a continual ConDU run at random points and resume it — the final
accuracy matrix and ConDU bundle must equal an uninterrupted run's bit for bit; SIGKILL bundle and checkpoint saves
mid-write — the folder must still load, as the previous or the new version, never a mix; a torn tensor file must
raise :class:`~hf_cft.errors.BundleError`; two same-seed continual runs must agree exactly.

The victims are children of ``tests/resilience_worker.py``, a fork server started once per module (it imports
torch/transformers/hf_cft once; each job is a fresh forked process killed with a real ``SIGKILL``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_cft.errors import BundleError

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "resilience_worker.py"
BUNDLE_FILES = ("unified.safetensors", "masks.safetensors", "prototypes.safetensors")
NUM_KILLS = 5


class ForkServer:
    """Client of ``resilience_worker.py``: ``start`` a job (returns its pid), ``wait`` for its ``waitpid`` status."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        )
        assert self._line() == "SERVER"

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"resilience worker died (exit {self.proc.wait()})")
        return line.strip()

    def start(self, *args) -> int:
        self.proc.stdin.write(" ".join(map(str, args)) + "\n")
        self.proc.stdin.flush()
        kind, pid = self._line().split()
        assert kind == "PID"
        return int(pid)

    def wait(self, pid: int) -> int:
        kind, done, status = self._line().split()
        assert kind == "EXIT" and int(done) == pid
        return int(status)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _log(out: Path) -> str:
    log = Path(f"{out}.log")
    return log.read_text() if log.exists() else ""


def _run_to_end(server: ForkServer, out: Path) -> float:
    t0 = time.perf_counter()
    pid = server.start("continual", out)
    status = server.wait(pid)
    assert status == 0, f"continual run in {out} failed:\n{_log(out)[-3000:]}"
    return time.perf_counter() - t0


def _completed(out: Path) -> int:
    for d in ("checkpoint", "checkpoint.old"):
        m = out / d / "manifest.json"
        if m.is_file():
            return json.loads(m.read_text())["completed"]
    return 0


def _final(out: Path) -> tuple[np.ndarray, dict[str, dict[str, torch.Tensor]], dict]:
    """The accuracy matrix, the ConDU bundle's tensors (per file) and its manifest's task records."""
    values = json.loads((out / "accuracy_matrix.json").read_text())["values"]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in values])
    bundle = out / "checkpoint" / "merger"
    tensors = {f: load_file(str(bundle / f)) for f in BUNDLE_FILES}
    return matrix, tensors, json.loads((bundle / "manifest.json").read_text())["tasks"]


def _assert_same_run(a: Path, b: Path) -> None:
    ma, ta, ra = _final(a)
    mb, tb, rb = _final(b)
    assert np.isfinite(ma).all() and ma.shape == (4, 4)
    np.testing.assert_array_equal(ma, mb)
    assert ra == rb  # task order, λ, flags, class names, templates
    for f in BUNDLE_FILES:
        assert sorted(ta[f]) == sorted(tb[f]), f
        for k in ta[f]:
            assert torch.equal(ta[f][k], tb[f][k]), f"{f}:{k} differs"


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("resilience") / "reference"
    seconds = _run_to_end(server, out)
    return out, seconds


@pytest.mark.slow
def test_same_seed_continual_runs_are_identical(server, reference, tmp_path):
    ref, _ = reference
    _run_to_end(server, tmp_path / "again")
    _assert_same_run(ref, tmp_path / "again")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_result(server, reference, tmp_path):
    ref, ref_seconds = reference
    out = tmp_path / "killed"
    rng = random.Random(8)
    landed, progress = 0, []
    for _ in range(NUM_KILLS):
        # a random point of the remaining work (the reference's wall time, scaled by the tasks still to do)
        remaining = ref_seconds * (4 - _completed(out)) / 4
        delay = rng.uniform(0.05, 0.7 * remaining)
        pid = server.start("continual", out)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):  # already finished and reaped: a kill that missed
            os.kill(pid, signal.SIGKILL)
        status = server.wait(pid)
        if _killed(status):
            landed += 1
        else:
            assert status == 0, f"run failed before the kill:\n{_log(out)[-3000:]}"
        progress.append(_completed(out))
    _run_to_end(server, out)
    print(f"\nSIGKILL: {landed}/{NUM_KILLS} kills landed mid-run; tasks checkpointed after each: {progress}")
    assert landed >= 3
    assert "resumed_at=" in _log(out)
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint.old").exists()
    _assert_same_run(ref, out)


# --------------------------------------------------------------------------- kills during a save


def _versions():
    """The four bundle versions the save loops cycle through, rebuilt here from the same seeds."""
    from resilience_worker import bundle_version
    from test_continual import _model

    model = _model()
    return model, [bundle_version(v, model) for v in range(4)]


def _assert_merger_is(merger, expected) -> None:
    assert merger.task_names == expected.task_names
    assert [r.lam for r in merger.tasks] == [r.lam for r in expected.tasks]
    u, ue = merger.unified_delta, expected.unified_delta
    assert sorted(u) == sorted(ue) and all(torch.equal(u[k], ue[k]) for k in u)
    for name in expected.task_names:
        assert torch.equal(merger.prototypes(name), expected.prototypes(name))
        for k in ue:
            assert torch.equal(merger.packed_mask(name, k).bits, expected.packed_mask(name, k).bits)


def _kill_loop(server, mode: str, out: Path, load, tries: int, seed: int) -> list[int]:
    """Start the save loop ``tries`` times, kill it at a random moment, and check after each kill that ``load``
    returns a complete version: the last one logged as saved, or the one being written. Returns the versions."""
    _, versions = _versions()
    rng = random.Random(seed)
    found, saves = [], 0
    on_disk = None  # version left by the previous attempt
    for attempt in range(tries):
        log = Path(f"{out}.log")
        log.unlink(missing_ok=True)
        pid = server.start(mode, out)
        deadline = time.monotonic() + 60
        while "READY" not in _log(out) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(pid, signal.SIGKILL)
        assert _killed(server.wait(pid)), _log(out)[-3000:]
        saved = [int(line.split()[1]) for line in _log(out).splitlines() if line.startswith("SAVED")]
        saves += len(saved)
        allowed = {saved[-1], (saved[-1] + 1) % 4} if saved else {0} | ({on_disk} - {None})
        if not saved and on_disk is None and not (out / "manifest.json").exists() and mode == "bundle-loop":
            continue  # killed inside the very first save: nothing was ever complete
        v = load(out, versions)
        assert v in allowed, f"attempt {attempt}: found version {v}, expected one of {sorted(allowed)}"
        found.append(v)
        on_disk = v
    print(f"\n{mode}: {tries} kills after {saves} complete saves; versions found: {found}")
    return found


@pytest.mark.slow
def test_sigkill_during_bundle_save_leaves_a_whole_bundle(server, tmp_path):
    from hf_cft.merging import DeltaFusionMerger

    def load(out, versions):
        merger = DeltaFusionMerger.from_pretrained(out)
        v = len(merger.task_names) - 1
        _assert_merger_is(merger, versions[v])
        return v

    found = _kill_loop(server, "bundle-loop", tmp_path / "bundle", load, tries=6, seed=4)
    assert len(found) >= 5


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_a_loadable_checkpoint(server, tmp_path):
    from conftest import ToyTokenizer
    from resilience_worker import stream
    from test_continual import _runner

    from hf_cft.continual import ConDUStrategy
    from hf_cft.continual.strategies import RunContext

    model, _ = _versions()

    def load(out, versions):
        strategy = ConDUStrategy(top_k=2)
        runner = _runner(strategy, out, ToyTokenizer(), model=model, tasks=stream())
        strategy.bind(RunContext(model, runner.tokenizer, runner.config, runner.evaluator, runner.tasks, out))
        found = runner._find_checkpoint()
        assert found is not None, f"no checkpoint in {sorted(p.name for p in out.iterdir())}"
        manifest = json.loads((found / "manifest.json").read_text())
        runner._check_identity(manifest, runner._identity(), found)
        strategy.load_checkpoint(found)
        v = manifest["completed"]
        _assert_merger_is(strategy.merger, versions[v])
        return v

    found = _kill_loop(server, "checkpoint-loop", tmp_path / "run", load, tries=6, seed=5)
    assert len(found) == 6


# --------------------------------------------------------------------------- torn files (fast)


@pytest.mark.parametrize("fname", BUNDLE_FILES)
@pytest.mark.parametrize("verify", [True, False])
def test_a_truncated_tensor_file_raises_bundle_error(tmp_path, fname, verify):
    from resilience_worker import bundle_version
    from test_continual import _model

    bundle_version(1, _model()).save_pretrained(tmp_path)
    file = tmp_path / fname
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # a torn write: the header survives, the tensor bytes do not
    with pytest.raises(BundleError, match=fname if verify else "cannot read"):
        __import__("hf_cft.merging", fromlist=["DeltaFusionMerger"]).DeltaFusionMerger.from_pretrained(
            tmp_path, verify=verify
        )


def _bundle_pair(tmp_path):
    """Version 0 saved in ``tmp_path/b``, version 2 saved elsewhere; both mergers and both folders."""
    from resilience_worker import bundle_version
    from test_continual import _model

    model = _model()
    old, new = bundle_version(0, model), bundle_version(2, model)
    old.save_pretrained(tmp_path / "b")
    new.save_pretrained(tmp_path / "new")
    return old, new, tmp_path / "b", tmp_path / "new"


@pytest.mark.parametrize("moved", [0, 1, 3])
def test_a_save_killed_after_its_commit_point_loads_the_new_bundle(tmp_path, moved):
    """The state a kill leaves after the staged manifest was written and ``moved`` files were moved into place."""
    from hf_cft.merging import DeltaFusionMerger
    from hf_cft.merging.condu import STAGING_DIR

    old, new, folder, new_folder = _bundle_pair(tmp_path)
    stage = folder / STAGING_DIR
    stage.mkdir()
    for i, name in enumerate(BUNDLE_FILES + ("manifest.json",)):
        (folder / name if i < moved else stage / name).write_bytes((new_folder / name).read_bytes())
    _assert_merger_is(DeltaFusionMerger.from_pretrained(folder), new)
    assert stage.exists()  # reading never writes
    old.save_pretrained(folder)  # the next save finishes the pending one first, then writes its own
    assert not stage.exists()
    _assert_merger_is(DeltaFusionMerger.from_pretrained(folder), old)


def test_a_save_killed_before_its_commit_point_loads_the_old_bundle(tmp_path):
    from hf_cft.merging import DeltaFusionMerger
    from hf_cft.merging.condu import STAGING_DIR

    old, new, folder, new_folder = _bundle_pair(tmp_path)
    stage = folder / STAGING_DIR
    stage.mkdir()
    for name in BUNDLE_FILES[:2]:  # staged tensors, no staged manifest: not committed
        (stage / name).write_bytes((new_folder / name).read_bytes())
    (stage / ".prototypes.safetensors.x.tmp").write_bytes(b"torn")
    _assert_merger_is(DeltaFusionMerger.from_pretrained(folder), old)
    new.save_pretrained(folder)
    assert not stage.exists()
    _assert_merger_is(DeltaFusionMerger.from_pretrained(folder), new)
