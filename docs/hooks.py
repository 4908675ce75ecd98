"""mkdocs hook (mkdocs.yml `hooks:`): the site's home page is the repository's README.md.

docs/index.md holds only a marker; this hook replaces the page's markdown with README.md, whose links to the pages
(`docs/CHECKS.md`) are made relative to the site root (`CHECKS.md`), so --strict checks them like any other link.
"""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md":
        return markdown
    return re.sub(r"\]\(docs/", "](", README.read_text())
