"""Every link a user sees resolves inside the repository.

- Markdown links ``[text](target)`` in README.md, benchmarks/README.md, docs/**/*.md and model_cards/*.md: a
  relative target must be an existing file or folder (its ``#anchor`` a heading of that Markdown file).
- Paths of documentation pages named in code and configs (``docs/methods/condu.md``, ``pam.md §9``, ...) in
  hf_cft/, recipes/, benchmarks/, scripts/ and tests/: the page must exist under docs/ and the cited section
  ``§N`` must be a numbered heading ``## N.`` of that page.
- The MkDocs navigation lists every page under docs/ and nothing else (``mkdocs build --strict`` in .ci/run
  checks links between the pages and renders the API reference).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"(?<!\!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# "docs/methods/condu.md §10", "pam.md §2–§4", "``docs/benchmarks.md``", "condu.md §5–§6"
DOC_REF = re.compile(
    r"((?:docs/)?(?:methods/)?[a-z][a-z0-9_-]*\.md)`{0,2}(?:\s*(?:§\s*(\d+)(?:\s*[–-]\s*§?\s*(\d+))?))?"
)
CODE_DIRS = ("hf_cft", "recipes", "benchmarks", "scripts", "tests", "model_cards")
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".md")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    files += sorted(DOCS.rglob("*.md"))
    files += sorted((ROOT / "model_cards").glob("*.md"))
    return [f for f in files if f.is_file()]


def slug(heading: str) -> str:
    """The anchor GitHub and MkDocs' toc give a heading (lower case, punctuation dropped, spaces → '-')."""
    text = re.sub(r"`|\*|_(?=\w)|(?<=\w)_", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"\s", "-", text.strip())


def anchors(md: Path) -> set[str]:
    out, in_code = set(), False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.add(slug(m[1]))
    return out


def _strip_code(text: str) -> str:
    """Markdown without fenced code blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def broken_links(md: Path, root: Path = ROOT) -> list[str]:
    problems = []
    text = _strip_code(md.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("{{"):  # http:, mailto:, Jinja
            continue
        path_part, _, anchor = target.partition("#")
        dest = md if not path_part else (md.parent / path_part).resolve()
        rel = md.relative_to(root)
        if not dest.exists():
            problems.append(f"{rel}: link to {target!r}: {path_part!r} does not exist")
        elif not dest.resolve().is_relative_to(root.resolve()):
            problems.append(f"{rel}: link to {target!r} leaves the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{rel}: link to {target!r}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def test_slug_matches_github_and_mkdocs():
    assert slug("Protocol A: base-to-novel") == "protocol-a-base-to-novel"
    assert slug("7. Inference: prototypes and routing") == "7-inference-prototypes-and-routing"
    assert slug("`hf-cft eval`") == "hf-cft-eval"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(md):
    assert not broken_links(md), "\n".join(broken_links(md))


def test_broken_link_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n## Getting there\n", encoding="utf-8")
    (tmp_path / "outside.md").write_text("x", encoding="utf-8")
    md = tmp_path / "docs" / "page.md"
    md.write_text(
        "[ok](index.md#getting-there) [x](nope.md) [y](index.md#no-such-heading) `[z](code.md)`\n"
        "[web](https://example.org) [self](#top)\n\n# Top\n```\n[in code](gone.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(md, root=tmp_path)
    assert len(problems) == 2, problems
    assert "nope.md" in problems[0] and "#no-such-heading" in problems[1]
    md.write_text("[up](../../escape.md)\n", encoding="utf-8")
    (tmp_path.parent / "escape.md").write_text("x", encoding="utf-8")
    assert "leaves the repository" in broken_links(md, root=tmp_path)[0]


def _doc_page(ref: str) -> Path | None:
    """The docs/ page a reference names ("docs/methods/pam.md", "pam.md", "benchmarks.md")."""
    ref = ref.removeprefix("docs/")
    for candidate in (DOCS / ref, DOCS / "methods" / ref):
        if candidate.is_file():
            return candidate
    return None


def _numbered_sections(page: Path) -> set[int]:
    return {int(m[1]) for m in re.finditer(r"^##\s+(\d+)\.", page.read_text(encoding="utf-8"), re.M)}


DOC_NAMES = {
    "mergetune.md",
    "condu.md",
    "pam.md",
    "benchmarks.md",
    "merging.md",
    "clip-peft.md",
    "lora.md",
    "architecture.md",
    "ecosystem.md",
    "distributed.md",
    "hub.md",
    "cli.md",
}


def test_doc_references_in_code_resolve():
    """``docs/…`` paths and ``<page>.md §N`` citations in code, configs and tests name real pages and sections."""
    problems = []
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file()]
    files = [p for p in files if "results" not in p.relative_to(ROOT).parts and p.name != "test_docs.py"]
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in DOC_REF.finditer(text):
            ref, first, last = m[1], m[2], m[3]
            name = ref.rsplit("/", 1)[-1]
            if not (ref.startswith("docs/") or name in DOC_NAMES):
                continue  # "README.md", "adapter.md", ... are not documentation pages
            where = f"{path.relative_to(ROOT)}: {m[0].strip()!r}"
            page = _doc_page(ref)
            if page is None:
                problems.append(f"{where}: no page docs/{ref.removeprefix('docs/')}")
                continue
            if first:
                sections = _numbered_sections(page)
                for n in range(int(first), int(last or first) + 1):
                    if n not in sections:
                        problems.append(f"{where}: {page.relative_to(ROOT)} has no section '## {n}.'")
    assert not problems, "\n".join(problems)


def test_mkdocs_nav_pages_exist_and_every_page_is_reachable():
    """Every nav entry is a page; every page under docs/ is in the nav or linked from a page or the README."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(config["nav"]))
    present = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed <= present, f"nav entries without a page: {sorted(listed - present)}"
    linked = set()
    for md in markdown_files():
        for target in LINK.findall(_strip_code(md.read_text(encoding="utf-8"))):
            dest = (md.parent / target.partition("#")[0]).resolve()
            if dest.is_file() and dest.is_relative_to(DOCS.resolve()):
                linked.add(str(dest.relative_to(DOCS.resolve())))
    unreachable = sorted(present - listed - linked)
    assert not unreachable, f"pages neither in the mkdocs nav nor linked from anywhere: {unreachable}"


@pytest.mark.parametrize("md", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_python_snippets_compile(md):
    """The docs pages' Python examples are fragments (they continue the README's names), so they are compiled,
    not run: a syntax error in one fails here with its line."""
    from test_readme import extract_blocks

    for block in extract_blocks(md):
        if block["lang"] == "python":
            compile(block["code"], f"{md.relative_to(ROOT)}:{block['line']}", "exec")


def test_api_page_lists_every_top_level_name():
    """docs/api/hf_cft.md gets the table of lazily imported top-level names from the build hook (mkdocstrings cannot
    see them statically): every module's page exists and every name is listed."""
    import importlib.util

    import hf_cft

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (DOCS / "api" / "hf_cft.md").read_text(encoding="utf-8")
    assert hooks.MARKER in page
    rendered = hooks.on_page_markdown(page, None, None, None)
    missing = [n for names in hf_cft._LAZY_IMPORTS.values() for n in names if f"`{n}`" not in rendered]
    assert not missing and hooks.MARKER not in rendered, missing
    for module in hf_cft._LAZY_IMPORTS:
        assert (DOCS / "api" / (module.removeprefix("hf_cft.") + ".md")).is_file(), f"no API page for {module}"
