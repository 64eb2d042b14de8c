"""The bundled demo cohort: seeded synthetic H&E slides in two cohorts, and their sample sheet.

Slides are written as real Aperio-style SVS and generic tiled TIFF files at 0.25 and
0.5 µm/px, with faint tissue, pen ink and debris on some. Everything is deterministic.
It also writes labelled 9-class synthetic tiles (NCT-CRC-HE-100K layout) for fine-tuning and
the tissue-classification experiment: `tissue_tiles/train` and a separate `tissue_tiles/test`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pathwsi.synthetic import SyntheticTissue, write_slide
from pathwsi.tissue_tiles import write_tile_set

log = logging.getLogger(__name__)
SHEET_COLUMNS = ("cohort", "slide_id", "patient_id", "path", "mpp", "site")
SLIDE_UM = (1400.0, 1100.0)
TISSUE_TILE_SETS = {"train": (30, 101), "test": (20, 202)}  # labelled 9-class tiles: per class, seed


@dataclass(frozen=True)
class DemoSlide:
    """One demo slide: where it sits in the cohort and how it is drawn and scanned."""

    cohort: str
    slide_id: str
    patient_id: str
    site: str
    fmt: str
    mpp: float
    seed: int
    faint: bool = False
    pen: bool = False
    mpp_in_file: bool = True

    @property
    def file_name(self) -> str:
        return f"{self.slide_id}.{self.fmt}"

    def tissue(self) -> SyntheticTissue:
        return SyntheticTissue(*SLIDE_UM, seed=self.seed, faint=self.faint, pen=self.pen)


DEMO_SLIDES = (
    DemoSlide("demo-luad", "DEMO-01-DX1", "DEMO-01", "D1", "svs", 0.25, seed=1),
    DemoSlide("demo-luad", "DEMO-01-DX2", "DEMO-01", "D1", "tiff", 0.5, seed=2, pen=True),
    DemoSlide("demo-luad", "DEMO-02-DX1", "DEMO-02", "D1", "svs", 0.5, seed=3, faint=True),
    DemoSlide("demo-lusc", "DEMO-03-DX1", "DEMO-03", "D2", "tiff", 0.25, seed=4, faint=True, pen=True),
    DemoSlide("demo-lusc", "DEMO-04-DX1", "DEMO-04", "D2", "svs", 0.25, seed=5),
    DemoSlide("demo-lusc", "DEMO-05-DX1", "DEMO-05", "D2", "tiff", 0.5, seed=6, mpp_in_file=False),
)


def sheet_text(slides: tuple[DemoSlide, ...] = DEMO_SLIDES, slide_dir: str = "demo/slides") -> str:
    """The demo sample sheet; µm/px is given only for the slide whose file lacks it."""
    lines = ["\t".join(SHEET_COLUMNS)]
    for s in slides:
        mpp = "" if s.mpp_in_file else f"{s.mpp:g}"
        lines.append("\t".join([s.cohort, s.slide_id, s.patient_id, f"{slide_dir}/{s.file_name}", mpp, s.site]))
    return "\n".join(lines) + "\n"


def write_demo_slide(spec: DemoSlide, slide_dir: Path) -> Path:
    """Render and write one demo slide (atomically)."""
    target = slide_dir / spec.file_name
    partial = target.with_name(f".{spec.file_name}.partial")
    write_slide(partial, spec.tissue(), spec.mpp, spec.fmt, record_mpp=spec.mpp_in_file)
    partial.replace(target)
    return target


def make_demo(out_dir: Path = Path("demo"), jobs: int = 2, force: bool = False) -> Path:
    """Write the demo slides under `out_dir/slides`, the sheet `out_dir/samples.tsv` and the
    labelled tile sets under `out_dir/tissue_tiles`."""
    slide_dir = out_dir / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in DEMO_SLIDES if force or not (slide_dir / s.file_name).is_file()]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for path in pool.map(write_demo_slide, todo, [slide_dir] * len(todo)):
            log.info("wrote %s", path)
    sheet = out_dir / "samples.tsv"
    sheet.write_text(sheet_text(slide_dir=slide_dir.as_posix()))
    for name, (count, seed) in TISSUE_TILE_SETS.items():
        write_tile_set(out_dir / "tissue_tiles" / name, count, seed, force=force)
    return sheet
