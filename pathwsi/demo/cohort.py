"""The bundled demo cohort: seeded synthetic H&E slides in two cohorts, and their sample sheet.

Slides are written as real Aperio-style SVS and generic tiled TIFF files at 0.25 and
0.5 µm/px, with faint tissue, pen ink and debris on some. Everything is deterministic.
It also writes labelled 9-class synthetic tiles (NCT-CRC-HE-100K layout) for fine-tuning and
the tissue-classification experiment (`tissue_tiles/train` and a separate `tissue_tiles/test`),
and, for the molecular predictors, small slides of more `demo-luad` patients whose
lymphocyte density (scattered lymphocytes and lymphocyte aggregates) varies, with expression and mutation tables whose signal is planted in that
density (`pathwsi.demo.targets`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathwsi.demo.labelled_tiles import write_tile_set
from pathwsi.demo.slides import SyntheticTissue, write_slide
from pathwsi.demo.targets import PLANTED_EXPRESSION, PLANTED_MUTATION, write_demo_targets
from pathwsi.runtime.outputs import atomic_path, write_text
from pathwsi.samples import REQUIRED_COLUMNS

log = logging.getLogger(__name__)

SLIDE_UM = (1400.0, 1100.0)
SMALL_SLIDE_UM = (620.0, 520.0)  # the prediction cohort's slides: about a dozen tiles each
PREDICTION_PATIENTS = 28  # more demo-luad patients, so 5-fold CV has 30 to split
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
    lymphocyte_density: float = 0.2
    small: bool = False

    @property
    def file_name(self) -> str:
        return f"{self.slide_id}.{self.fmt}"

    def tissue(self) -> SyntheticTissue:
        """Small slides are nearly all tissue, with lymphocyte aggregates as dense as their lymphocytes."""
        shape = (
            {"tissue_cover": 0.8, "background_band": 0.0, "infiltrate": self.lymphocyte_density} if self.small else {}
        )
        return SyntheticTissue(
            *(SMALL_SLIDE_UM if self.small else SLIDE_UM),
            seed=self.seed,
            faint=self.faint,
            pen=self.pen,
            lymphocyte_density=self.lymphocyte_density,
            **shape,
        )


def lymphocyte_densities(count: int = PREDICTION_PATIENTS, seed: int = 303) -> list[float]:
    """Seeded lymphocyte densities of the prediction patients, spread over [0.02, 0.8]."""
    rng = np.random.default_rng(seed)
    return [round(float(d), 3) for d in rng.uniform(0.02, 0.8, count)]


def prediction_slides() -> tuple[DemoSlide, ...]:
    """One small 0.5 µm/px slide per prediction patient, SVS and TIFF alternating, sites D1/D3."""
    return tuple(
        DemoSlide(
            "demo-luad",
            f"DEMO-{i:02d}-DX1",
            f"DEMO-{i:02d}",
            "D1" if i % 2 else "D3",
            "svs" if i % 2 else "tiff",
            0.5,
            seed=100 + i,
            lymphocyte_density=density,
            small=True,
        )
        for i, density in enumerate(lymphocyte_densities(), start=6)
    )


DEMO_SLIDES = (
    DemoSlide("demo-luad", "DEMO-01-DX1", "DEMO-01", "D1", "svs", 0.25, seed=1),
    DemoSlide("demo-luad", "DEMO-01-DX2", "DEMO-01", "D1", "tiff", 0.5, seed=2, pen=True),
    DemoSlide("demo-luad", "DEMO-02-DX1", "DEMO-02", "D1", "svs", 0.5, seed=3, faint=True),
    DemoSlide("demo-lusc", "DEMO-03-DX1", "DEMO-03", "D2", "tiff", 0.25, seed=4, faint=True, pen=True),
    DemoSlide("demo-lusc", "DEMO-04-DX1", "DEMO-04", "D2", "svs", 0.25, seed=5),
    DemoSlide("demo-lusc", "DEMO-05-DX1", "DEMO-05", "D2", "tiff", 0.5, seed=6, mpp_in_file=False),
    *prediction_slides(),
)


def sheet_text(slides: tuple[DemoSlide, ...] = DEMO_SLIDES, slide_dir: str = "demo/slides") -> str:
    """The demo sample sheet; µm/px is given only for the slide whose file lacks it."""
    lines = ["\t".join((*REQUIRED_COLUMNS, "mpp", "site"))]
    for s in slides:
        mpp = "" if s.mpp_in_file else f"{s.mpp:g}"
        lines.append("\t".join([s.cohort, s.slide_id, s.patient_id, f"{slide_dir}/{s.file_name}", mpp, s.site]))
    return "\n".join(lines) + "\n"


def write_demo_slide(spec: DemoSlide, slide_dir: Path) -> Path:
    """Render and write one demo slide (atomically)."""
    target = slide_dir / spec.file_name
    with atomic_path(target) as temporary:
        write_slide(temporary, spec.tissue(), spec.mpp, spec.fmt, record_mpp=spec.mpp_in_file)
    return target


DEMO_CONFIG = """\
# Written by `pathwsi demo`: the demo's overlay on config/config.yaml (the settings of a real run).
# Run it with:  snakemake --cores 2 --configfile {demo}/config.yaml
# It points the run at the synthetic cohort and makes it small enough for a 2-core CPU in minutes;
# everything it does not name comes from config/config.yaml.
samples: {demo}/samples.tsv
features:
  dtype: float32        # untrained weights give features of ~1e-5, below float16's normal range
  threads: 1            # the demo's slides are tiny: two one-thread jobs at once beat one two-thread job
targets:
  cohorts:
    demo-luad:          # SYNTHETIC tables, with signal planted in the slides' lymphocytes ({demo}/targets/README.txt)
      expression: {demo}/targets/expression.tsv
      mutations: {demo}/targets/mutations.tsv
      planted: [{planted}]  # the summary says whether each is found
predict:
  heatmaps:             # the planted mutation and the two best genes: 3 pictures a slide, not 12
    mutations: [{mutation}]
    top_genes: 2
finetune:
  train_dir: {demo}/tissue_tiles/train
  batch_size: 16
  step1:
    epochs: 1
  step2:                # a random base must learn from early blocks, at a higher rate
    lr: 0.001
    optimizer: adam
    unfreeze_from: block1
tissue_experiment:
  test_dir: {demo}/tissue_tiles/test
  repeats: 10
models:
  backbones:
    imgnet:
      weights: untrained  # seeded, UNTRAINED weights: nothing is downloaded, and the numbers say nothing about tissue
      input_px: 128
    ftx:
      input_px: 128
"""


def demo_config_text(out_dir: Path = Path("demo")) -> str:
    """The demo's config overlay (YAML) for a demo cohort written to `out_dir`."""
    return DEMO_CONFIG.format(
        demo=out_dir.as_posix(), planted=", ".join([*PLANTED_EXPRESSION, PLANTED_MUTATION]), mutation=PLANTED_MUTATION
    )


def make_demo(out_dir: Path = Path("demo"), jobs: int = 2, force: bool = False) -> Path:
    """Write the demo slides under `out_dir/slides`, the sheet `out_dir/samples.tsv`, the labelled tile sets
    under `out_dir/tissue_tiles`, the target tables under `out_dir/targets` and the config overlay
    `out_dir/config.yaml`; return the overlay's path."""
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
    write_demo_targets(
        out_dir / "targets", {s.patient_id: s.lymphocyte_density for s in DEMO_SLIDES if s.cohort == "demo-luad"}
    )
    overlay = out_dir / "config.yaml"
    write_text(demo_config_text(out_dir), overlay)
    return overlay
