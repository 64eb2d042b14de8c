"""Small, fast Snakemake projects for end-to-end tests of the workflow (resume, reruns, locking).

A project is a working directory with `config/config.yaml` (the shipped config with the demo overlay, shrunk so that a
slide has a few hundred tiles and dozens of feature chunks, with two seeded untrained backbones and no
fine-tuning) and `config/samples.tsv`; the workflow runs on it with
`snakemake -s <repo>/Snakefile --directory <project>`, exactly as a user with a separate project
folder would run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from snakemake.utils import update_config

from pathwsi.demo.cohort import demo_config_text

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TARGET = "results/summary.tsv"  # tiles + features + aggregate + summary (no fine-tuning, no experiment)

# Settings that keep a run small. 32-µm tiles of 64 px at 0.5 µm/px (a few hundred per synthetic
# slide of 900 x 700 µm), stored in chunks of 8 tiles written in batches of 4 (dozens of chunks per
# slide, so a run can be stopped between two), and two seeded untrained timm `test_resnet`s at 64 px
# (96-d features; nothing to fine-tune, built in milliseconds). Every stage runs the same code as
# with Xception; only the model is small, so that a test pays for Snakemake, not for convolutions.
TEST_SETTINGS: dict[str, Any] = {
    "tiling": {"tile_px": 64, "tile_mpp": 0.5},
    "stain": {"sample_tiles": 32},
    "qc": {"max_px": 300, "stain_tiles": 2},
    "features": {
        "batch_size": 4,
        "chunk_tiles": 8,
        "num_workers": 0,
        "dtype": "float32",
        "device": "cpu",
        "threads": 1,
    },
    "targets": {"cohorts": {}},
    "models": {
        "backbones": {
            "imgnet": {"arch": "test_resnet", "weights": "untrained", "input_px": 64, "seed": 0},
            "ftx": {"arch": "test_resnet", "weights": "untrained", "input_px": 64, "seed": 1},
        }
    },
}


@dataclass(frozen=True)
class Row:
    """One sample-sheet row."""

    cohort: str
    slide_id: str
    patient_id: str
    path: Path
    mpp: str = ""


def write_sheet(project: Path, rows: list[Row]) -> Path:
    """(Re)write the project's sample sheet."""
    sheet = project / "config" / "samples.tsv"
    lines = ["cohort\tslide_id\tpatient_id\tpath\tmpp\tsite"]
    lines += [f"{r.cohort}\t{r.slide_id}\t{r.patient_id}\t{r.path}\t{r.mpp}\t" for r in rows]
    sheet.write_text("\n".join(lines) + "\n")
    return sheet


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in, recursively (a mapping replaces keys; anything else the value)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and value and isinstance(out.get(key), dict) else value
        )
    return out


def read_config(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "config" / "config.yaml").read_text())


def write_config(project: Path, config: dict[str, Any]) -> None:
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def edit_config(project: Path, changes: dict[str, Any]) -> None:
    """Merge `changes` into the project's config file."""
    write_config(project, merge(read_config(project), changes))


def demo_config(samples: str = "config/samples.tsv") -> dict[str, Any]:
    """The shipped config with the demo's overlay merged in, as `snakemake --configfile demo/config.yaml` sees it,
    reading the sheet `samples`."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load(demo_config_text()))
    return {**config, "samples": samples}


def make_project(folder: Path, rows: list[Row], settings: dict[str, Any] | None = None) -> Path:
    """A working directory with the shrunk config (plus `settings`) and a sample sheet of `rows`."""
    (folder / "config").mkdir(parents=True, exist_ok=True)
    write_config(folder, merge(merge(demo_config(), TEST_SETTINGS), settings or {}))
    write_sheet(folder, rows)
    return folder


def command(project: Path, *args: str) -> list[str]:
    return [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(project), *args]


def snakemake(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Snakemake on `project` to the end; stdout and stderr together in `.stdout`."""
    return subprocess.run(
        command(project, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


class Background:
    """Snakemake started in its own session (process group), its output going to a file."""

    def __init__(self, project: Path, *args: str, log_name: str = "run"):
        self.log = project / f"{log_name}.out"
        self._handle = self.log.open("w")
        self.process = subprocess.Popen(
            command(project, *args), stdout=self._handle, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )

    def signal_main(self, sig: int) -> None:
        """Signal the Snakemake process itself (what `kill PID` or a batch system's TERM does)."""
        os.kill(self.process.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Signal Snakemake and every job it runs (what Ctrl-C in a terminal, or kill -9 -PGID, does)."""
        os.killpg(self.process.pid, sig)

    def wait(self, timeout: float = 300) -> str:
        """Wait for the exit; the whole output."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise
        self._handle.close()
        return self.log.read_text()

    def kill_all(self) -> None:
        """SIGKILL whatever is left of the group (test clean-up)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._handle.close()

    @property
    def output(self) -> str:
        self._handle.flush()
        return self.log.read_text()


def chunks_done(project: Path) -> dict[str, int]:
    """Slide -> chunks recorded in `results/features/{slide}.zarr.partial/progress.json`."""
    done = {}
    for progress in (project / "results" / "features").glob("*.zarr.partial/progress.json"):
        try:
            done[progress.parent.name.removesuffix(".zarr.partial")] = json.loads(progress.read_text())["chunks_done"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue
    return done


def wait_until(condition, run: Background, timeout: float = 120, poll: float = 0.02) -> Any:
    """Poll `condition()` until it is truthy (returned); fail if the run ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if run.process.poll() is not None:
            raise AssertionError(
                f"the run ended (rc {run.process.returncode}) before the condition held:\n{run.output[-3000:]}"
            )
        time.sleep(poll)
    run.kill_all()
    raise AssertionError(f"timed out waiting:\n{run.output[-3000:]}")


# -- what a dry run plans ---------------------------------------------------------------------------

_JOB = re.compile(r"^(?:local)?rule (\w+):\s*$")


def planned_jobs(output: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run (`snakemake -n`) lists; wildcards as 'k=v,...' or ''."""
    jobs: list[list[str]] = []
    for line in output.splitlines():
        match = _JOB.match(line.strip())
        if match:
            jobs.append([match.group(1), ""])
        elif jobs and line.strip().startswith("wildcards:"):
            jobs[-1][1] = line.strip().removeprefix("wildcards:").strip().replace(" ", "")
    return {(rule, wildcards) for rule, wildcards in jobs}


def dry_run(project: Path, *targets: str) -> set[tuple[str, str]]:
    done = snakemake(project, "-n", *(targets or (TARGET,)))
    assert done.returncode == 0, done.stdout[-3000:]
    return planned_jobs(done.stdout)


def ran_jobs(output: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of the jobs a real run started (same job blocks as a dry run)."""
    return planned_jobs(output)


# -- comparing results ------------------------------------------------------------------------------

TIMING_COLUMNS = ["tile_s", "features_s", "read_s", "normalize_s", "model_s", "write_s", "tiles_per_s"]


def store_contents(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A complete store's attrs (they hold no timings) and every array, read in full."""
    from pathwsi.features.store import open_store

    store = open_store(path)
    arrays = {"coords": store.group["coords"][:], "tissue": store.group["tissue"][:]}
    arrays.update({f"features/{m}": store.features(m)[:] for m in store.models})
    return store.attrs, arrays


def assert_same_store(a: Path, b: Path) -> None:
    attrs_a, arrays_a = store_contents(a)
    attrs_b, arrays_b = store_contents(b)
    assert attrs_a == attrs_b, f"{a.name}: attrs differ"
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype, f"{a.name}:{name} dtype"
        assert np.array_equal(arrays_a[name], arrays_b[name]), f"{a.name}:{name} differs"


def summary_table(project: Path):
    """results/summary.tsv without its timing columns."""
    import pandas as pd

    frame = pd.read_csv(project / "results" / "summary.tsv", sep="\t", keep_default_na=False)
    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame.columns])


def assert_same_results(project: Path, reference: Path, slides: list[str], cohorts: list[str]) -> None:
    """Same stores, aggregated features, slide/patient tables and summary (timings aside) as `reference`."""
    import pandas as pd

    for slide in slides:
        assert_same_store(
            project / "results" / "features" / f"{slide}.zarr", reference / "results" / "features" / f"{slide}.zarr"
        )
    for cohort in cohorts:
        ours, theirs = project / "results" / "aggregate" / cohort, reference / "results" / "aggregate" / cohort
        for table in sorted(theirs.glob("*.parquet")):
            pd.testing.assert_frame_equal(
                pd.read_parquet(ours / table.name),
                pd.read_parquet(table),
                check_exact=True,
                obj=f"{cohort}/{table.name}",
            )
        for name in ("slides.tsv", "patients.tsv", "provenance.json"):
            assert (ours / name).read_text() == (theirs / name).read_text(), f"{cohort}/{name} differs"
    pd.testing.assert_frame_equal(summary_table(project), summary_table(reference), obj="summary.tsv")


def snapshot(paths: list[Path]) -> dict[str, tuple[int, str]]:
    """Every file under `paths` (files or folders): (mtime_ns, SHA-256 of its bytes)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files}


def slide_outputs(project: Path, slide: str) -> list[Path]:
    """A slide's tiling outputs and its feature store and timings."""
    results = project / "results"
    return [
        results / "tiles" / f"{slide}.parquet",
        results / "tiles" / f"{slide}.json",
        results / "qc" / f"{slide}.png",
        results / "qc" / "stain" / f"{slide}.png",
        results / "features" / f"{slide}.zarr",
        results / "features" / f"{slide}.timings.json",
    ]
