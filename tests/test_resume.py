"""Resuming, rerunning and sharing a results folder: real Snakemake runs on a small synthetic project.

What docs/resume.md promises, proved end to end: a run stopped by SIGTERM or SIGKILL in the middle
of feature extraction finishes with the documented command and gives exactly the results of an
uninterrupted run, resuming the half-written store instead of starting it over; adding a cohort
runs only its jobs; changing a setting that changes results reruns exactly what it shapes and
nothing else; a second run on the same folder is refused; broken slides are isolated.

The project (tests/workflow_project.py): cohort `a` = good slides s0, s1 and three broken ones
(corrupt file, no tissue, no µm/px); cohort `b` = good slide s2. Good slides have a few hundred
tiles each, in chunks of 8; two small seeded untrained models. One uninterrupted run of the whole
batch (the module fixture `reference`) is what every other run is compared with; tests that start
from a finished run start from a copy of it (mtimes kept), with some outputs removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from workflow_project import (
    TARGET,
    Background,
    Row,
    assert_same_results,
    chunks_done,
    command,
    dry_run,
    edit_config,
    make_project,
    merge,
    planned_jobs,
    ran_jobs,
    read_config,
    slide_outputs,
    snakemake,
    snapshot,
    wait_until,
    write_sheet,
)

from pathwsi.features.store import verify_store

pytestmark = pytest.mark.filterwarnings("ignore:model '.*' uses UNTRAINED weights")

GOOD = ["s0", "s1", "s2"]
BROKEN = ["corrupt", "blank", "nompp"]
SLIDES = GOOD + BROKEN
COHORT_A = ["s0", "s1", *BROKEN]
COHORTS = ["a", "b"]
RESUMED = re.compile(r"(\S+): resuming at tile (\d+) of (\d+) \((\d+) chunks already stored\)")


@dataclass(frozen=True)
class Cohort:
    rows: list[Row]  # the project's sheet
    extra: Row  # a slide of a third cohort `c`, for adding a cohort


@pytest.fixture(scope="module")
def cohort(slides, tmp_path_factory) -> Cohort:
    from pathwsi.demo.slides import SyntheticTissue, write_slide

    folder = tmp_path_factory.mktemp("resume_slides")

    def slide(name: str, seed: int, fmt: str) -> Path:
        return write_slide(
            folder / f"{name}.{fmt}",
            SyntheticTissue(900.0, 700.0, seed=seed, tissue_cover=0.5, background_band=0.25),
            0.5,
            fmt,
        )

    rows = [
        Row("a", "s0", "pa1", slide("s0", 21, "svs")),
        Row("a", "s1", "pa2", slide("s1", 22, "tiff")),
        Row("a", "corrupt", "pa3", slides.corrupt),
        Row("a", "blank", "pa4", slides.blank),
        Row("a", "nompp", "pa5", slides.no_mpp),
        Row("b", "s2", "pb1", slide("s2", 23, "svs")),
    ]
    return Cohort(rows, Row("c", "s3", "pc1", slide("s3", 24, "tiff")))


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> Path:
    """The uninterrupted run every other run is compared with (do not modify it; copy it)."""
    project = make_project(tmp_path_factory.mktemp("reference"), cohort.rows)
    done = snakemake(project, "--cores", "2", TARGET)
    assert done.returncode == 0, done.stdout[-3000:]
    assert ran_jobs(done.stdout) == expected_jobs(tile=SLIDES, features=SLIDES, aggregate=COHORTS)
    return project


def copy_of(project: Path, dest: Path) -> Path:
    """A copy of a finished project with every mtime kept (Snakemake sees it as up to date)."""
    shutil.copytree(project, dest, symlinks=True)
    return dest


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def without_cohort_b(reference: Path, dest: Path, tiled: bool) -> Path:
    """A copy of the reference in which s2 (cohort b) is not extracted (and not tiled unless
    `tiled`), and cohort b's aggregate and the summary are missing."""
    project = copy_of(reference, dest)
    results = project / "results"
    remove(
        slide_outputs(project, "s2")[0 if not tiled else 4 :] + [results / "aggregate" / "b", results / "summary.tsv"]
    )
    return project


def jobs_of(jobs: set[tuple[str, str]], rule: str) -> set[str]:
    """The wildcard values of the jobs of `rule` (e.g. {'s0', 's2'}); '' for jobs without wildcards."""
    return {w.split("=", 1)[1] if "=" in w else w for r, w in jobs if r == rule}


def expected_jobs(tile=(), features=(), aggregate=(), summary=True) -> set[tuple[str, str]]:
    jobs = {("tile", f"slide_id={s}") for s in tile} | {("features", f"slide_id={s}") for s in features}
    jobs |= {("aggregate", f"cohort={c}") for c in aggregate}
    return jobs | ({("summary", "")} if summary else set())


def tiled(project: Path, slides: list[str]) -> set[str]:
    """Slides whose four tiling outputs all exist."""
    return {s for s in slides if all(p.exists() for p in slide_outputs(project, s)[:4])}


def complete_stores(project: Path, slides: list[str]) -> set[str]:
    """Slides with a store at the final path; every such store must be complete and valid."""
    from pathwsi.features.store import describe

    found = set()
    for slide in slides:
        store = project / "results" / "features" / f"{slide}.zarr"
        if store.exists():
            report = describe(store)
            assert report["valid"], f"a store at a final path is not complete and valid: {report}"
            found.add(slide)
    return found


def extracting(project: Path, at_least: int) -> dict[str, int]:
    """Slides with at least `at_least` chunks stored under the partial path (empty until then)."""
    return {slide: n for slide, n in chunks_done(project).items() if n >= at_least}


# -- 1. SIGTERM ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_mid_extraction_then_plain_rerun_finishes_only_what_is_missing(reference, tmp_path):
    project = without_cohort_b(reference, tmp_path / "p", tiled=False)
    run = Background(project, "--cores", "2", TARGET)
    try:
        wait_until(lambda: extracting(project, 1), run)
        run.signal_group(signal.SIGTERM)  # Ctrl-C (SIGINT) or a batch system's TERM reaches every process alike
        first = run.wait(120)
    finally:
        run.kill_all()
    assert run.process.returncode != 0, first[-3000:]
    assert jobs_of(ran_jobs(first), "tile") == {"s2"}

    # Stopped: nothing half-made at a final path; the stopped slide's chunks are kept under .partial.
    done_before = complete_stores(project, SLIDES)
    stopped = {s: n for s, n in chunks_done(project).items() if n >= 1 and s not in done_before}
    assert stopped == {"s2": stopped.get("s2", 0)} and stopped["s2"] >= 1, (
        f"s2 was not stopped mid-extraction: {chunks_done(project)}"
    )
    assert tiled(project, SLIDES) == set(SLIDES)

    again = snakemake(project, "--cores", "2", TARGET)
    assert again.returncode == 0, again.stdout[-3000:]
    assert ran_jobs(again.stdout) == expected_jobs(features=["s2"], aggregate=["b"]), (
        "the rerun redid finished jobs (s2 was tiled before the stop)"
    )
    log = (project / "logs" / "features" / "s2.log").read_text()
    match = RESUMED.search(log)
    assert match and int(match.group(4)) >= stopped["s2"], (
        f"s2 was not resumed from its {stopped['s2']} stored chunks:\n{log}"
    )
    assert not list((project / "results" / "features").glob("*.partial"))
    assert_same_results(project, reference, SLIDES, COHORTS)


# -- 2. SIGKILL, and 5. a second run on the same folder --------------------------------------------------


@dataclass
class Killed:
    project: Path
    stopped: dict[str, int]  # slide -> chunks stored when the run was killed
    locked: str  # a plain rerun before --unlock
    unlock: int
    resumed_rc: int
    resumed: str  # the output of `--rerun-incomplete`
    second: str  # a second run started while the resumed run was running
    second_rc: int
    first_still_running: bool
    untouched_before: dict
    untouched_after: dict


@pytest.fixture(scope="module")
def killed(reference, tmp_path_factory) -> Killed:
    """kill -9 of the whole run mid-extraction; a plain rerun; the documented --unlock and
    --rerun-incomplete; and while that resumed run works, a second run on the same folder."""
    project = without_cohort_b(reference, tmp_path_factory.mktemp("killed") / "p", tiled=True)
    run = Background(project, "--cores", "2", TARGET)
    try:
        wait_until(lambda: extracting(project, 2), run)
        run.signal_group(signal.SIGKILL)  # kill -9, node failure, out-of-memory killer: no clean-up at all
        run.wait(60)
    finally:
        run.kill_all()
    stopped = {s: n for s, n in chunks_done(project).items() if s not in complete_stores(project, SLIDES)}
    locked = snakemake(project, "--cores", "2", TARGET).stdout  # the killed run's lock is still there
    unlock = snakemake(project, "--unlock").returncode

    untouched = (
        [p for s in ["s0", "s1"] for p in slide_outputs(project, s)]
        + slide_outputs(project, "s2")[:4]
        + [project / "results" / "aggregate" / "a"]
    )
    before = snapshot(untouched)
    first = Background(project, "--cores", "2", "--rerun-incomplete", TARGET, log_name="resumed")
    try:
        wait_until(lambda: "rule features:" in first.output, first)
        # Paused, so that the first run is surely still running when the second one checks the lock
        # (with the fork server the resumed run can end within the second run's start-up).
        first.signal_group(signal.SIGSTOP)
        try:
            second = snakemake(project, "--cores", "2", TARGET)
            still_running = first.process.poll() is None
        finally:
            first.signal_group(signal.SIGCONT)
        resumed = first.wait(300)
    finally:
        first.kill_all()
    return Killed(
        project,
        stopped,
        locked,
        unlock,
        first.process.returncode,
        resumed,
        second.stdout,
        second.returncode,
        still_running,
        before,
        snapshot(untouched),
    )


@pytest.mark.slow
def test_sigkill_mid_extraction_then_unlock_and_rerun_incomplete_resumes_the_store(killed, reference):
    assert killed.stopped.get("s2", 0) >= 2, f"s2 was not stopped mid-extraction: {killed.stopped}"
    assert "cannot be locked" in killed.locked and "--unlock" in killed.locked, killed.locked[-3000:]
    assert killed.unlock == 0
    assert killed.resumed_rc == 0, killed.resumed[-3000:]
    assert ran_jobs(killed.resumed) == expected_jobs(features=["s2"], aggregate=["b"])
    match = RESUMED.search((killed.project / "logs" / "features" / "s2.log").read_text())
    assert match, "s2: the partial store was started over, not resumed"
    assert int(match.group(4)) >= killed.stopped["s2"] and int(match.group(2)) == int(match.group(4)) * 8
    assert_same_results(killed.project, reference, SLIDES, COHORTS)


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_and_the_first_finishes(killed, reference):
    assert killed.second_rc != 0 and "Directory cannot be locked" in killed.second, killed.second[-3000:]
    assert not ran_jobs(killed.second), "the refused run started a job"
    assert killed.first_still_running, "the first run had ended before the second was refused (nothing was tested)"
    assert killed.resumed_rc == 0, killed.resumed[-3000:]
    assert killed.untouched_after == killed.untouched_before
    assert_same_results(killed.project, reference, SLIDES, COHORTS)


@pytest.mark.slow
def test_kill_9_of_snakemake_alone_then_the_documented_recovery_keeps_the_store(reference, tmp_path):
    """`kill -9` of the Snakemake process alone leaves its features job running. The rerun that
    docs/resume.md describes (--unlock, --rerun-incomplete) starts a second writer of the same store:
    it waits for the first, which finishes, and keeps its store (it used to crash on the half-written
    store, after which Snakemake deleted the finished one)."""
    project = without_cohort_b(reference, tmp_path / "p", tiled=True)
    run = Background(project, "--cores", "2", TARGET)
    holder = None
    try:
        wait_until(lambda: extracting(project, 2).get("s2"), run)
        lock = project / "results" / "features" / "s2.zarr.lock"
        holder = int(lock.read_text().split()[1])  # "pid N on HOST": the process writing the store
        os.kill(holder, signal.SIGSTOP)  # paused, so that the rerun surely meets it still writing
        run.signal_main(signal.SIGKILL)
        run.process.wait(60)
        assert snakemake(project, "--unlock").returncode == 0
        rerun = Background(project, "--cores", "2", "--rerun-incomplete", TARGET, log_name="rerun")
        try:
            wait_until(lambda: "is being written by pid" in rerun.output, rerun)
            os.kill(holder, signal.SIGCONT)
            output = rerun.wait(300)
        finally:
            rerun.kill_all()
    finally:
        if holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGCONT)
        run.kill_all()
    assert rerun.process.returncode == 0, output[-3000:]
    assert "already complete with these settings" in (project / "logs" / "features" / "s2.log").read_text()
    assert verify_store(project / "results" / "features" / "s2.zarr") == []
    assert_same_results(project, reference, SLIDES, COHORTS)


# -- 3. adding a cohort -------------------------------------------------------------------------------


@pytest.mark.slow
def test_adding_a_cohort_runs_only_its_jobs_and_leaves_the_others_untouched(cohort, reference, tmp_path):
    project = copy_of(reference, tmp_path / "p")
    assert dry_run(project) == set(), "a copied finished project must be up to date"
    write_sheet(project, [*cohort.rows, cohort.extra])

    planned = dry_run(project)
    assert planned == expected_jobs(tile=["s3"], features=["s3"], aggregate=["c"]), sorted(planned)

    existing = [p for s in SLIDES for p in slide_outputs(project, s)] + [
        project / "results" / "aggregate" / c for c in COHORTS
    ]
    before = snapshot(existing)
    done = snakemake(project, "--cores", "2", TARGET)
    assert done.returncode == 0, done.stdout[-3000:]
    assert ran_jobs(done.stdout) == planned
    assert snapshot(existing) == before, "outputs of the existing cohorts were rewritten"
    summary = pd.read_csv(project / "results" / "summary.tsv", sep="\t", keep_default_na=False)
    assert sorted(summary["slide_id"]) == sorted([*SLIDES, "s3"])
    assert (summary.set_index("slide_id").loc[[*GOOD, "s3"], "aggregate"] == "used").all()
    assert (project / "results" / "aggregate" / "c" / "imgnet.patients.parquet").is_file()


# -- 4. settings that change results, and settings that do not ------------------------------------------

ALL_TILES = expected_jobs(tile=SLIDES, features=SLIDES, aggregate=COHORTS)
ALL_FEATURES = expected_jobs(features=SLIDES, aggregate=COHORTS)
AGGREGATES = expected_jobs(aggregate=COHORTS)
NOTHING: set = set()


# name: a config change, or a sample sheet edit as {"sheet": (slide, column, value)}
SETTING_CHANGES = {
    "tiling.tile_px": {"tiling": {"tile_px": 72}},
    "stain.target": {"stain": {"target": "config/stain_target.json"}},
    "untrained model seed": {"models": {"backbones": {"ftx": {"seed": 2}}}},
    "model weights file": {"models": {"backbones": {"ftx": {"weights": "ftx.safetensors"}}}},
    "features.dtype": {"features": {"dtype": "float16"}},
    "features.reader": {"features": {"reader": "exact"}},
    "aggregate.statistics": {"aggregate": {"statistics": ["mean", "std"]}},
    "features how-settings": {
        "features": {
            "batch_size": 8,
            "chunk_tiles": 16,
            "num_workers": 1,
            "threads": 2,
            "device": "auto",
            "compile": True,
        }
    },
    "aggregate.scheduler": {"aggregate": {"scheduler": "synchronous"}},
    "models.allow_network": {"models": {"allow_network": True}},
    "qc.max_px": {"qc": {"max_px": 400}},
    "fork_server": {"fork_server": False},
    "sheet site": {"sheet": ("s0", "site", "05")},
}


def write_weights(path: Path, seed: int) -> Path:
    """A .safetensors file of the test model, seeded."""
    from safetensors.torch import save_file

    from pathwsi.features.backbones import ModelSpec, build_backbone

    net = build_backbone(ModelSpec("w", arch="test_resnet", input_px=64, seed=seed)).net
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def planned_after(reference, tmp_path_factory) -> dict[str, set[tuple[str, str]]]:
    """What `snakemake -n` plans on a finished project after each change of SETTING_CHANGES.

    The dry runs read the same finished project, each with its own --configfile (and sample
    sheet), all at once: a dry run neither locks nor writes outputs."""
    import subprocess

    from pathwsi.stain.macenko import default_reference

    project = copy_of(reference, tmp_path_factory.mktemp("settings") / "p")
    target = default_reference().to_json()
    target["max_conc"] = [1.8, 1.1]
    (project / "config" / "stain_target.json").write_text(json.dumps(target))
    write_weights(project / "ftx.safetensors", seed=5)
    config = read_config(project)
    runs = {}
    for index, (name, change) in enumerate(SETTING_CHANGES.items()):
        if "sheet" in change:
            slide, column, value = change["sheet"]
            rows = [line.split("\t") for line in (project / "config" / "samples.tsv").read_text().splitlines()]
            row = next(r for r in rows if r[1] == slide)
            row[rows[0].index(column)] = value
            sheet = project / "config" / f"case{index}.tsv"
            sheet.write_text("\n".join("\t".join(r) for r in rows) + "\n")
            change = {"samples": str(sheet)}
        case = project / "config" / f"case{index}.yaml"
        case.write_text(json.dumps(merge(config, change)))
        runs[name] = subprocess.Popen(
            command(project, TARGET, "-n", "--configfile", str(case)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    outputs = {name: run.communicate(timeout=300)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {outputs[name][-3000:]}"
    return {name: planned_jobs(out) for name, out in outputs.items()}


SETTING_CASES = [
    pytest.param("tiling.tile_px", ALL_TILES),
    pytest.param("stain.target", ALL_TILES),
    pytest.param("untrained model seed", ALL_FEATURES),
    pytest.param("model weights file", ALL_FEATURES),
    pytest.param("features.dtype", ALL_FEATURES),
    pytest.param("features.reader", ALL_FEATURES),
    pytest.param("aggregate.statistics", AGGREGATES),
    pytest.param("features how-settings", NOTHING),
    pytest.param("aggregate.scheduler", NOTHING),
    pytest.param("models.allow_network", NOTHING),
    pytest.param("qc.max_px", NOTHING),
    pytest.param("fork_server", NOTHING),
]


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "expected"), SETTING_CASES)
def test_a_setting_reruns_exactly_what_it_shapes(planned_after, setting, expected):
    assert planned_after[setting] == expected, f"planned {sorted(planned_after[setting])}"


@pytest.mark.slow
def test_editing_a_slides_site_reruns_no_tiling_or_extraction(planned_after):
    planned = planned_after["sheet site"]
    assert not jobs_of(planned, "tile") and not jobs_of(planned, "features"), sorted(planned)


@pytest.mark.slow
def test_new_weights_rebuild_the_stores_that_need_them_and_the_aggregates_never_mix(reference, tmp_path):
    """Naming a weights file, then editing it in place, each make every store stale; a partial
    rebuild (one cohort) leaves the other cohort stale, never mixed."""
    from pathwsi.features.backbones import file_sha256
    from pathwsi.features.store import open_store
    from pathwsi.predict.aggregate import AggregateError, SlideEntry, aggregate_cohort

    project = copy_of(reference, tmp_path / "p")
    weights = write_weights(project / "ftx.safetensors", seed=5)
    edit_config(project, {"models": {"backbones": {"ftx": {"weights": "ftx.safetensors"}}}})

    done = snakemake(project, "--cores", "2", "results/aggregate/b/slides.tsv")  # cohort b only
    assert done.returncode == 0, done.stdout[-3000:]
    assert ran_jobs(done.stdout) == expected_jobs(features=["s2"], aggregate=["b"], summary=False)
    sha = file_sha256(weights)
    features = project / "results" / "features"
    assert open_store(features / "s2.zarr").attrs["models"]["ftx"]["weights_sha256"] == sha
    assert (
        json.loads((project / "results" / "aggregate" / "b" / "provenance.json").read_text())["models"]["ftx"][
            "weights_sha256"
        ]
        == sha
    )
    assert dry_run(project) == expected_jobs(features=COHORT_A, aggregate=["a"])  # cohort a: still stale, all of it
    with pytest.raises(AggregateError, match="different networks"):  # and stores of both weights are never combined
        aggregate_cohort(
            [SlideEntry("s0", "x", features / "s0.zarr"), SlideEntry("s2", "y", features / "s2.zarr")],
            ["imgnet", "ftx"],
            ["mean"],
        )

    write_weights(weights, seed=6)  # the same file name, new weights
    assert dry_run(project) == ALL_FEATURES


# -- 6. broken slides in the batch --------------------------------------------------------------------


@pytest.mark.slow
def test_broken_slides_are_isolated_through_features_aggregate_and_summary(reference):
    """The reference run's batch holds a corrupt file, a slide without tissue and one without µm/px
    beside the good slides; the run succeeded (fixture), and every later stage says what happened."""
    from pathwsi.features.store import open_store
    from pathwsi.predict.aggregate import read_features

    results = reference / "results"
    summary = pd.read_csv(results / "summary.tsv", sep="\t", keep_default_na=False).set_index("slide_id")
    assert dict(summary["status"]) == {
        "s0": "ok",
        "s1": "ok",
        "s2": "ok",
        "corrupt": "failed",
        "blank": "no_tissue",
        "nompp": "failed",
    }
    assert "'mpp' column" in summary.loc["nompp", "reason"] and "corrupt" in summary.loc["corrupt", "reason"], (
        summary.loc[BROKEN, "reason"].to_dict()
    )
    assert summary.loc["blank", "reason"]
    markdown = (results / "summary.md").read_text()
    for slide in BROKEN:
        assert summary.loc[slide, "aggregate"].startswith("left_out: no tiles"), summary.loc[slide, "aggregate"]
        assert f"`{slide}`" in markdown
        store = open_store(results / "features" / f"{slide}.zarr")  # complete, empty, with the tiling status
        assert store.attrs["n_tiles"] == 0 and store.attrs["tiling_status"] == summary.loc[slide, "status"]
    table = pd.read_csv(results / "aggregate" / "a" / "slides.tsv", sep="\t", keep_default_na=False).set_index(
        "slide_id"
    )
    assert dict(table["status"]) == {
        "s0": "used",
        "s1": "used",
        "corrupt": "left_out",
        "blank": "left_out",
        "nompp": "left_out",
    }
    assert all(table.loc[s, "reason"] for s in BROKEN)
    cohorts = pd.read_csv(results / "summary_cohorts.tsv", sep="\t").set_index("cohort")
    assert cohorts.loc["a", ["slides", "used", "left_out", "failed", "no_tissue"]].tolist() == [5, 2, 3, 2, 1]
    for model in ["imgnet", "ftx"]:
        patients = read_features(results / "aggregate" / "a" / f"{model}.patients.parquet")
        assert sorted(patients.index) == ["pa1", "pa2"] and np.isfinite(patients.to_numpy()).all()
        assert sorted(read_features(results / "aggregate" / "b" / f"{model}.patients.parquet").index) == ["pb1"]


# -- resuming with other "how" settings (library level, fast) ------------------------------------------


@pytest.fixture(scope="module")
def small_slide(slides, tmp_path_factory):
    """The 0.5 µm/px test slide tiled with defaults: sample, coords, fractions, metadata."""
    import pyarrow.parquet as pq

    from pathwsi.samples import Sample
    from pathwsi.slides.tile_job import TilingJobSettings, TilingOutputs, tile_slide
    from pathwsi.slides.tile_record import TilesRecord

    out = TilingOutputs.under(tmp_path_factory.mktemp("small_slide"), "section")
    sample = Sample("c", "section", "p", str(slides.tiff_05))
    tile_slide(sample, TilingJobSettings(), out)
    meta = TilesRecord.load(out.meta)  # as the feature job reads it (stain parameters rounded as stored)
    table = pq.read_table(out.tiles)
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.int64)
    return sample, coords, table.column("tissue_fraction").to_numpy().astype(np.float32), meta


def interrupted_store(small_slide, models, settings, path: Path, chunks: int, values: dict[str, np.ndarray]) -> None:
    """The partial store a run with `settings` leaves when killed after `chunks` chunks."""
    from pathwsi.features.extract import store_attrs
    from pathwsi.features.store import open_writer

    sample, coords, fractions, meta = small_slide
    writer = open_writer(
        path,
        coords,
        fractions,
        {m.spec.name: m.feature_dim for m in models},
        store_attrs(sample, meta, models, settings),
        settings.aligned_chunk,
        settings.dtype,
    )
    size = settings.aligned_chunk
    for index in range(chunks):
        writer.write_chunk(index, {name: v[index * size : (index + 1) * size] for name, v in values.items()})


@pytest.mark.parametrize(("resume_batch", "resumes"), [(1, True), (3, False)])
def test_resuming_with_another_batch_size_never_skips_or_misplaces_tiles(
    small_slide, tmp_path, caplog, one_torch_thread, resume_batch, resumes
):
    """features.batch_size 'changes nothing', so it may differ between the killed run and the rerun
    (e.g. lowered after running out of GPU memory): the result must still be every tile's features."""
    import logging

    from pathwsi.features.backbones import ModelSpec, build_backbone
    from pathwsi.features.extract import ExtractSettings, extract_slide
    from pathwsi.features.store import open_store

    sample, coords, fractions, meta = small_slide
    models = [build_backbone(ModelSpec("m", arch="test_resnet", input_px=64, seed=1))]
    killed, rerun = (
        ExtractSettings(batch_size=2, chunk_tiles=2, num_workers=0),
        ExtractSettings(batch_size=resume_batch, chunk_tiles=2, num_workers=0),
    )
    assert len(coords) > 3 * 3 and len(coords) % 3 != 0
    extract_slide(sample, coords, fractions, meta, models, rerun, tmp_path / "reference.zarr")
    expected = open_store(tmp_path / "reference.zarr").features("m")[:]

    store = tmp_path / "s.zarr"
    interrupted_store(small_slide, models, killed, store, 2, {"m": expected})
    with caplog.at_level(logging.INFO, logger="pathwsi"):
        extract_slide(sample, coords, fractions, meta, models, rerun, store)
    assert ("resuming at tile 4" in caplog.text) == resumes, caplog.text
    got = open_store(store).features("m")[:]
    assert np.abs(got).sum(axis=1).min() > 0, "tiles were skipped (all-zero features)"
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
