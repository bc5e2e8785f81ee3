"""Kill loops of the attack suite (issue 16): SIGKILL ``hf-cft merge --overwrite`` and the crash-safe saves of
every artefact kind (LoRA adapter and full model through ``save_pretrained_atomic``, PAM state; the ConDU bundle's
loop is in ``test_resilience.py``) at seeded random moments, and check after every kill that the output is a
complete old or new version — never a mix, never a ``.tmp`` orphan inside it — and that the next save clears the
staging leftovers a kill left beside it.

The victims are children of ``tests/resilience_worker.py`` (one fork server per module, see ``test_resilience``).
Each loop takes well under a minute; they are ``slow`` tests (``RUN_SLOW=1``).
"""

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from resilience_worker import MERGE_LAMS, artefact_version, merge_assets
from safetensors.torch import load_file
from test_resilience import ForkServer, _killed, _log

from hf_cft.cli import main
from hf_cft.hub import load_adapter_model, load_model
from hf_cft.merging import PAMState
from hf_cft.testing import tiny_clip
from hf_cft.utils import stale_staging

KILLS = {"adapter": 12, "model": 12, "pam": 12, "merge": 30}


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def _version_of_adapter(out: Path, ref) -> int:
    r = json.loads((out / "adapter_config.json").read_text())["r"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(bool((t == float(r)).all()) and r in t.shape for t in tensors.values()), "mixed adapter"
    load_adapter_model(tiny_clip(), out)  # strict: every key present, shapes fit the config's rank
    return r - 1


def _version_of_model(out: Path, ref) -> int:
    model = load_model(out)
    state = model.state_dict()
    for v, expected in enumerate(ref):
        if all(torch.equal(state[k], t) for k, t in expected.items()):
            return v
    raise AssertionError("the model folder matches no saved version (a mix of two?)")


def _version_of_pam(out: Path, ref) -> int:
    state = PAMState.from_pretrained(out)
    v = state.num_tasks - 1
    expected = ref[v]
    assert sorted(state.global_state) == sorted(expected)
    assert all(torch.equal(state.global_state[k], expected[k]) for k in expected), "PAM weights of another version"
    return v


def _version_of_merge(out: Path, ref) -> int:
    lam = json.loads((out / "merge_config.json").read_text())["lam"]
    v = MERGE_LAMS.index(lam)
    state = load_model(out).state_dict()
    assert all(torch.equal(state[k], t) for k, t in ref[v].items()), "merged weights of another --lam (a mix)"
    return v


def _references(kind: str, tmp_path: Path):
    if kind == "model":
        return [artefact_version("model", v).state_dict() for v in range(3)]
    if kind == "pam":
        return [dict(artefact_version("pam", v).global_state) for v in range(3)]
    if kind == "merge":
        base, lora = merge_assets(tmp_path)
        refs = []
        for lam in MERGE_LAMS:
            out = tmp_path / f"ref_{lam}"
            argv = ["merge", "--base", base, "--method", "task_arithmetic", "--adapters", lora, "--out", out]
            assert main([str(x) for x in [*argv, "--lam", lam]]) == 0
            refs.append(load_model(out).state_dict())
        return refs
    return None


def _seconds_per_save(out: Path, saves: int) -> float:
    deadline = time.monotonic() + 120
    while "READY" not in _log(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    t = time.monotonic()
    while _log(out).count("SAVED") < saves and time.monotonic() < deadline:
        time.sleep(0.01)
    return (time.monotonic() - t) / saves


LOADERS = {
    "adapter": _version_of_adapter,
    "model": _version_of_model,
    "pam": _version_of_pam,
    "merge": _version_of_merge,
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(LOADERS))
def test_sigkill_during_a_save_leaves_the_old_or_the_new_output(server, kind, tmp_path):
    ref = _references(kind, tmp_path)
    out = tmp_path / f"{kind}_out"
    rng = random.Random(16)
    found, intact, saves, mid_write = [], 0, 0, 0
    t0 = time.monotonic()
    # calibration, into the output itself (so that every kill below has an old output to keep): how long one save
    # takes on this (possibly busy) machine; the kills then land within 3 saves of READY
    pid = server.start("artefact-loop", out, kind)
    per_save = _seconds_per_save(out, saves=2)
    os.kill(pid, signal.SIGKILL)
    server.wait(pid)
    found.append(LOADERS[kind](out, ref))
    for attempt in range(KILLS[kind]):
        Path(f"{out}.log").unlink(missing_ok=True)
        for stale in stale_staging(out):  # so that a leftover below is this attempt's
            shutil.rmtree(stale)
        pid = server.start("artefact-loop", out, kind)
        deadline = time.monotonic() + 60
        while "READY" not in _log(out) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, max(3 * per_save, 0.2)))
        os.kill(pid, signal.SIGKILL)
        assert _killed(server.wait(pid)), _log(out)[-3000:]
        saved = [int(line.split()[1]) for line in _log(out).splitlines() if line.startswith("SAVED")]
        saves += len(saved)
        assert out.is_dir(), f"attempt {attempt}: the output vanished"
        mid_write += bool(stale_staging(out))  # the kill landed inside a save (its staging folder is left)
        v = LOADERS[kind](out, ref)
        # each attempt saves versions 0, 1, 2, ... again: killed before its first "SAVED", the output is the
        # previous attempt's version or (swapped in just before the kill) version 0
        allowed = {saved[-1], (saved[-1] + 1) % 3} if saved else {found[-1], 0}
        assert v in allowed, f"attempt {attempt}: version {v}, expected one of {sorted(allowed)}"
        assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")], "a .tmp orphan inside the output"
        found.append(v)
        intact += 1
    # one more save runs to its end: it clears whatever staging leftovers the kills left beside the output
    pid = server.start("artefact-loop", out, kind)
    deadline = time.monotonic() + 60
    while "SAVED" not in _log(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    server.wait(pid)
    LOADERS[kind](out, ref)
    leftovers = [p.name for p in stale_staging(out)]
    assert len(leftovers) <= 1, leftovers  # at most the one the last kill left, never a pile
    print(
        f"\n{kind}: {KILLS[kind]} kills ({mid_write} inside a save) after {saves} complete saves, {intact} outputs intact "
        f"(versions {found}), {per_save:.2f} s per save, {time.monotonic() - t0:.1f} s"
    )
    assert intact == KILLS[kind]
