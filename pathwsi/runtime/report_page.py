"""Pages for the Snakemake report, which shows images, HTML and PDF inline but offers Markdown and TSV files
only as downloads: a summary's Markdown, or a set of TSV tables, as one self-contained HTML page."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from markdown_it import MarkdownIt

from pathwsi.runtime.outputs import write_text

_STYLE = (
    "body{font-family:sans-serif;font-size:14px;max-width:70em}"
    "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #bbb;padding:2px 6px;text-align:left}"
)


def write_markdown_page(markdown: str, title: str, path: Path) -> None:
    """`markdown` (CommonMark with tables; raw HTML in it is escaped) as an HTML page at `path`."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    write_text(_page(title, body), path)


def write_tables_page(tables: Mapping[str, Path], title: str, path: Path) -> None:
    """Each tab-separated table of `tables` (heading -> file) under its heading, as an HTML page at `path`."""
    sections = [
        f"<h2>{html.escape(heading)}</h2>\n"
        + pd.read_csv(table, sep="\t", keep_default_na=False).to_html(index=False, border=0, escape=True)
        for heading, table in tables.items()
    ]
    write_text(_page(title, f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections)), path)


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
