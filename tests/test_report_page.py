"""Summaries and tables as HTML pages for the Snakemake report (which shows HTML inline, Markdown and TSV not)."""

from __future__ import annotations

from html.parser import HTMLParser

from pathwsi.runtime.report_page import write_markdown_page, write_tables_page


class Cells(HTMLParser):
    """The text of every table cell of a page, and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.tags: set[str] = set()
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self.tags.add(tag)
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = self._in_cell and tag not in ("td", "th")

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def parse(path) -> Cells:
    cells = Cells()
    cells.feed(path.read_text())
    return cells


def test_a_markdown_summary_becomes_a_page_with_its_tables_and_no_raw_html(tmp_path):
    markdown = "# Run\n\n> **WARNING:** untrained\n\n| cohort | slides |\n|---|---|\n| c1 | 3 |\n\n<script>x</script>\n"
    write_markdown_page(markdown, "summary", tmp_path / "s.html")
    page = parse(tmp_path / "s.html")
    assert page.cells == ["cohort", "slides", "c1", "3"]
    assert {"h1", "blockquote", "strong", "table"} <= page.tags and "script" not in page.tags


def test_tables_are_rendered_under_their_headings_with_empty_cells_kept(tmp_path):
    (tmp_path / "a.tsv").write_text("model\tmean\tnote\nftx\t0.91\t\nimgnet\t0.88\t<b>\n")
    write_tables_page({"Accuracy": tmp_path / "a.tsv"}, "Tissue", tmp_path / "t.html")
    page = parse(tmp_path / "t.html")
    assert page.cells == ["model", "mean", "note", "ftx", "0.91", "", "imgnet", "0.88", "<b>"]
    assert "<h2>Accuracy</h2>" in (tmp_path / "t.html").read_text() and "b" not in page.tags
