"""MkDocs hooks: the CLI reference generated from the parser, the changelog from CHANGELOG.md
(both at build time, so neither can drift)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if "<!-- cli-reference -->" in markdown:
        from pgdispatch.console.main import build_parser
        from pgdispatch.console.reference import markdown as reference
        from pgdispatch.console.reference import walk

        markdown = markdown.replace("<!-- cli-reference -->", reference(walk(build_parser())))
    if "<!-- changelog -->" in markdown:
        changelog = (ROOT / "CHANGELOG.md").read_text().split("\n", 1)[1].replace("](docs/", "](")
        markdown = markdown.replace("<!-- changelog -->", changelog)
    return markdown
