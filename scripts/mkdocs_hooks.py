"""MkDocs hooks (mkdocs.yml → ``hooks``): the table of hf_cft's top-level names on ``docs/api/hf_cft.md`` is built
from ``hf_cft._LAZY_IMPORTS`` at build time, so it lists exactly what ``from hf_cft import ...`` offers
(mkdocstrings cannot see lazily imported names)."""

from __future__ import annotations

MARKER = "<!-- top-level-names -->"


def top_level_table() -> str:
    import hf_cft

    lines = ["| subpackage | names |", "|---|---|"]
    for module, names in hf_cft._LAZY_IMPORTS.items():
        page = module.removeprefix("hf_cft.") + ".md"
        lines.append(f"| [{module}]({page}) | " + ", ".join(f"`{n}`" for n in names) + " |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, top_level_table()) if MARKER in markdown else markdown
