"""mkdocs hook: the site's home page is the README, so that the two never disagree.

docs/index.md only names its source; at build time its Markdown is replaced by README.md's, with the README's
links into docs/ made relative to the site (``docs/training.md`` -> ``training.md``).
"""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / 'README.md'


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != 'index.md':
        return markdown
    text = README.read_text()
    return re.sub(r'\]\(docs/', '](', text)
