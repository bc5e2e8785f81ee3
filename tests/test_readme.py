"""README.md is a guide that runs: its code blocks are executed in order, as a user pasting them would.

Every ```python block runs in ONE fresh Python process (names carry over from block to block); every ```bash
block runs in a shell from that same process, at its place in the order, so a command sees the files the Python
blocks before it wrote. The working directory is a temporary folder laid out like a fresh clone
(``recipes/``, ``benchmarks/`` and ``tests/`` of this repository, with ``../shared`` beside it), so the README's
``../shared/data`` is literally what runs. A failing block fails the test with its README line number.

Markers (an HTML comment on the line right above a block, invisible on GitHub):

- ``<!-- readme-test: skip: REASON -->``: not run; the reason is required and printed.
- ``<!-- readme-test: fake-hub -->``: needs the Hub; run against the local fake Hub of ``tests/hub_fake.py``
  (uploads are stored by it; ``snapshot_download`` of a pushed repo is answered from them). The rest of the guide
  runs with ``HF_HUB_OFFLINE=1``.

Docs pages (``docs/**/*.md``) are checked the same way for their Python blocks by ``test_docs_snippets_run``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<kind>skip|fake-hub)\b\s*:?\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)\s*$")


def extract_blocks(path: Path) -> list[dict]:
    """The fenced code blocks of a Markdown file: ``{"lang", "line" (of the first code line), "code", "mode"}``
    with ``mode`` one of ``run``, ``skip``, ``fake-hub`` (from a marker comment right above the fence)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: code fence is never closed")
        mode, reason = "run", ""
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k].strip()) if k >= 0 else None
        if marker:
            mode, reason = marker["kind"], marker["reason"]
        blocks.append(
            {
                "lang": m["lang"],
                "line": start + 2,
                "code": "\n".join(lines[start + 1 : j]),
                "mode": mode,
                "reason": reason,
            }
        )
        i = j + 1
    return blocks


# The program the fresh process runs: the blocks, in order, each compiled with its README line numbers.
DRIVER = r"""
import json, os, subprocess, sys, traceback
spec = json.load(open(sys.argv[1], encoding="utf-8"))
ns = {"__name__": "__main__"}
hub_state = {}

def fake_hub_on():
    sys.path.insert(0, os.environ["HF_CFT_FAKE_HUB_DIR"])
    from hub_fake import FakeHub
    import huggingface_hub
    from huggingface_hub import constants
    server = FakeHub().__enter__()
    saved = {k: getattr(constants, k) for k in ("HF_HUB_OFFLINE", "ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE")}
    constants.HF_HUB_OFFLINE = False
    constants.ENDPOINT = server.url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    os.environ["HF_TOKEN"] = "hf_fake"
    real_snapshot = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        folder = os.path.abspath(os.path.join(".fake_hub_pulls", repo_id.replace("/", "__")))
        return str(server.materialise(repo_id, __import__("pathlib").Path(folder)))

    huggingface_hub.snapshot_download = snapshot_download
    hub_state.update(server=server, saved=saved, snapshot=real_snapshot)

def fake_hub_off():
    import huggingface_hub
    from huggingface_hub import constants
    server = hub_state.pop("server")
    for k, v in hub_state.pop("saved").items():
        setattr(constants, k, v)
    huggingface_hub.snapshot_download = hub_state.pop("snapshot")
    os.environ.pop("HF_TOKEN", None)
    print("[readme-test] fake Hub repos:", {r: sorted(f) for r, f in server.repos.items()}, flush=True)
    server.__exit__(None, None, None)

import time
last = [None, time.perf_counter()]

def timing():
    if last[0] is not None:
        print(f"[readme-test] {last[0]} took {time.perf_counter() - last[1]:.1f} s", flush=True)

for block in spec["blocks"]:
    where = f"{spec['file']}:{block['line']}"
    timing()
    last[:] = [where, time.perf_counter()]
    print(f"[readme-test] {block['lang']} block at {where}", flush=True)
    if block["lang"] == "bash":
        rc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["code"]]).returncode
        if rc:
            print(f"[readme-test] FAILED: bash block at {where} exited with {rc}", flush=True)
            sys.exit(3)
        continue
    if block["mode"] == "fake-hub":
        fake_hub_on()
    try:
        code = compile("\n" * (block["line"] - 1) + block["code"], spec["file"], "exec")
        exec(code, ns)
    except BaseException:
        traceback.print_exc()
        print(f"[readme-test] FAILED: python block at {where}", flush=True)
        sys.exit(3)
    finally:
        if block["mode"] == "fake-hub":
            fake_hub_off()
timing()
print("[readme-test] all blocks ran", flush=True)
"""


def _shared_data() -> Path | None:
    env = os.environ.get("HF_CFT_DATA_DIR")
    data = Path(env) if env else ROOT.parent / "shared" / "data"
    return data if (data / "dtd10").is_dir() else None


def _fresh_clone_dir(tmp_path: Path, data: Path) -> Path:
    """``tmp/clone`` with the repository's runnable folders linked in, and ``tmp/shared/data`` → the data."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("recipes", "benchmarks", "tests", "scripts", "model_cards", "pyproject.toml", "README.md"):
        (clone / name).symlink_to(ROOT / name)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data.resolve())
    return clone


def run_markdown(path: Path, tmp_path: Path, timeout: float) -> tuple[int, float, str]:
    data = _shared_data()
    if data is None:
        pytest.skip("../shared/data (or $HF_CFT_DATA_DIR) with dtd10 is absent: the guide's dataset is not here")
    blocks = extract_blocks(path)
    run = [b for b in blocks if b["mode"] != "skip" and b["lang"] in ("python", "bash")]
    for b in blocks:
        if b["mode"] == "skip":
            assert b["reason"], f"{path.name}:{b['line']}: a skipped block must state its reason"
            print(f"[readme-test] skip {path.name}:{b['line']} ({b['reason']})")
    clone = _fresh_clone_dir(tmp_path, data)
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps({"file": str(path.relative_to(ROOT)), "blocks": run}), encoding="utf-8")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    env = dict(os.environ)
    env.pop("HF_CFT_DATA_DIR", None)  # the guide must find ../shared/data as a user in a fresh clone does
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=venv_bin + os.pathsep + env.get("PATH", ""),  # hf-cft and accelerate of this environment
        HF_CFT_FAKE_HUB_DIR=str(ROOT / "tests"),
        HF_CFT_CACHE=str(tmp_path / "hf_cft_cache"),
        MPLBACKEND="Agg",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=os.environ.get("HF_CFT_TEST_THREADS", "1"),  # tiny models: one thread is fastest (conftest)
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(driver), str(spec)],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    failed = re.findall(r"\[readme-test\] FAILED: (.*)", out)
    assert proc.returncode == 0, f"{failed[0] if failed else 'the guide failed'}\n{out[-6000:]}"
    print("\n".join(line for line in out.splitlines() if " took " in line))
    print(f"[readme-test] {path.name}: {len(run)} blocks ran in {elapsed:.1f} s")
    return len(run), elapsed, out


def test_extract_blocks_reads_markers(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "# t\n\n<!-- readme-test: skip: installs packages -->\n```bash\npip install x\n```\n\n"
        "```python\nx = 1\n```\n<!-- readme-test: fake-hub -->\n\n```python\npush()\n```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(md)
    assert [(b["lang"], b["mode"], b["line"]) for b in blocks] == [
        ("bash", "skip", 5),
        ("python", "run", 9),
        ("python", "fake-hub", 14),
    ]
    assert blocks[0]["reason"] == "installs packages"
    md.write_text("```python\nx = 1\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="never closed"):
        extract_blocks(md)


def test_readme_blocks_are_marked_and_python_parses():
    """Cheap static checks (no data needed): every block has a known language, every skip a reason, the two
    commands at the top are the project's entry points, and every Python block compiles."""
    blocks = extract_blocks(README)
    assert blocks[0]["lang"] == "bash" and "bash scripts/main.sh" in blocks[0]["code"]
    assert "bash scripts/test.sh" in blocks[0]["code"] and blocks[0]["mode"] == "skip"
    for b in blocks:
        assert b["lang"] in ("python", "bash", "text", "yaml", "json"), (
            f"README.md:{b['line']}: language {b['lang']!r}"
        )
        if b["mode"] == "skip":
            assert b["reason"], f"README.md:{b['line']}: a skipped block must state its reason"
        if b["lang"] == "python":
            compile(b["code"], f"README.md:{b['line']}", "exec")
        if b["lang"] == "bash" and b["mode"] == "run":
            assert not re.search(r"^\s*pip install", b["code"], re.M), f"README.md:{b['line']}: pip install runs"
    assert any(b["mode"] == "fake-hub" for b in blocks), "the Hub section is exercised against the fake Hub"


@pytest.mark.data
def test_readme_guide_runs_top_to_bottom(tmp_path):
    n, elapsed, out = run_markdown(README, tmp_path, timeout=900)
    assert n >= 15, f"only {n} blocks ran"
    assert "[readme-test] all blocks ran" in out


@pytest.mark.data
def test_getting_started_page_runs(tmp_path):
    """docs/getting-started.md is self-contained (its own setup block): its Python blocks run in order too. The
    other pages' examples continue the README's names and are compile-checked in tests/test_docs.py."""
    n, _, out = run_markdown(ROOT / "docs" / "getting-started.md", tmp_path, timeout=600)
    assert n >= 2 and "[readme-test] all blocks ran" in out
