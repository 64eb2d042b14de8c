"""Cluster execution: the shipped profiles, job grouping, and real runs through a single-node SLURM.

The slow tests start SLURM themselves (tests/slurm_cluster.py): they need root on Debian/Ubuntu with
apt reachable, or SLURM and munge already installed, and snakemake-executor-plugin-slurm (in the
`test` and `cluster` extras). Anywhere else they are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slurm_cluster import ROOT, slurm_cluster, snakemake_on_slurm, write_project  # noqa: F401 (fixture)

from pathwsi.demo.slides import SyntheticTissue, write_slide

PROFILES = ROOT / "profiles"
HAS_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
needs_plugin = pytest.mark.skipif(
    not HAS_PLUGIN, reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[cluster]')"
)


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory) -> dict[str, Path]:
    """Four tiny SVS slides (a few tiles each): tiling takes about a second per slide."""
    folder = tmp_path_factory.mktemp("cluster_slides")
    return {
        f"s{i}": write_slide(folder / f"s{i}.svs", SyntheticTissue(600.0, 500.0, seed=i, tissue_cover=0.5), 0.5, "svs")
        for i in range(4)
    }


def dry_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(project), "-n", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def submissions(output: str) -> dict[str, list[str]]:
    """SLURM job ids the plugin reported, by log folder (group_<group>_<rule> or rule_<rule>)."""
    found: dict[str, list[str]] = {}
    for jobid, folder in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/([^/]+)/", output):
        found.setdefault(folder, []).append(jobid)
    return found


def slurm_job(jobid: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge, 300 s by default)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


# --- the profiles, without a cluster -------------------------------------------------------------


def test_profiles_are_snakemake_9_profiles():
    local = yaml.safe_load((PROFILES / "local" / "config.yaml").read_text())
    slurm = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and "executor" not in local
    for profile in (local, slurm):
        assert profile["rerun-incomplete"] is True
    assert {"tile=tiling", "features=extract"} <= set(slurm["groups"])
    assert set(slurm["set-resource-scopes"]) == {"lanes=local"}
    pins = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'cluster = \[[^\]]*"snakemake-executor-plugin-slurm==', pins)


def test_local_profile_dry_run(tmp_path, small_slides):
    project = write_project(tmp_path, small_slides)
    done = dry_run(project, "--profile", str(PROFILES / "local"), "tiles")
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(r"^tile\s+4$", done.stdout, re.M)


@needs_plugin
def test_slurm_profile_groups_slide_jobs(tmp_path, small_slides):
    """With 4 slides and groups of 3 (tile) and 2 (features): 2 tiling and 2 extract group jobs, GPU asked."""
    project = write_project(tmp_path, small_slides)
    done = dry_run(project, "--profile", str(PROFILES / "slurm"), "tiles", *[f"results/features/{s}.zarr" for s in small_slides],
                   "--group-components", "tiling=3", "extract=2")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    groups = re.findall(r"\] Group job (\S+) \(", done.stdout)
    assert sorted(groups) == ["extract", "extract", "tiling", "tiling"]
    features = done.stdout[done.stdout.index("rule features:") :]
    assert re.search(r"resources: [^\n]*gpu=1", features) and re.search(r"resources: [^\n]*lanes=1", features)


# --- a real SLURM ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiles_and_features_run_through_slurm_in_group_jobs(tmp_path, small_slides, slurm_cluster, fresh_tmp):
    """3 tile jobs become ONE SLURM job (group `tiling`); the features job is a SLURM job holding a (fake) GPU."""
    slides = {k: small_slides[k] for k in ("s0", "s1", "s2")}
    project = write_project(tmp_path, slides)
    done = snakemake_on_slurm(
        project, "tiles", "results/features/s0.zarr", env={"TMPDIR": str(fresh_tmp)}
    )  # where the jobs start their fork servers
    assert done.returncode == 0, done.stdout[-4000:]
    for slide in slides:
        for path in (f"results/tiles/{slide}.parquet", f"results/tiles/{slide}.json", f"results/qc/{slide}.png"):
            assert (project / path).is_file(), path
    assert (project / "results/features/s0.zarr").is_dir() and not (project / "results/features/s1.zarr").exists()

    jobs = submissions(done.stdout)
    assert {k: len(v) for k, v in jobs.items()} == {"group_tiling_tile": 1, "group_extract_features": 1}, done.stdout[
        -3000:
    ]
    tiling, features = slurm_job(jobs["group_tiling_tile"][0]), slurm_job(jobs["group_extract_features"][0])
    assert tiling["JobState"] == features["JobState"] == "COMPLETED"
    assert "gpu" not in tiling.get("TresPerJob", "") and "gpu:1" in features.get("TresPerJob", "")
    # one member's resources (members run one after another), the members' runtimes summed: 3 x 5 min
    assert tiling["NumCPUs"] == "1" and tiling["TimeLimit"] == "00:15:00"
    log = (project / ".snakemake/slurm_logs/group_tiling_tile" / f"{jobs['group_tiling_tile'][0]}.log").read_text()
    assert all(f"tile:slide_id={s}" in log for s in slides)  # the three slides ran inside that one SLURM job

    # one fork server per SLURM job: the three tile jobs forked from the one their group job started
    servers = {p.name: p.read_text() for p in fresh_tmp.glob("pathwsi-*/fork-*.log")}
    assert sorted(text.count("fork server pid") for text in servers.values()) == [1, 1], servers
    assert sorted(text.count(": pathwsi.") for text in servers.values()) == [1, 3], servers


@pytest.mark.slow
def test_without_grouping_each_tile_job_is_a_slurm_job(tmp_path, small_slides, slurm_cluster):
    """The contrast to the test above: one slide per group gives as many SLURM jobs as slides (3, not 1)."""
    slides = {k: small_slides[k] for k in ("s0", "s1", "s2")}
    project = write_project(tmp_path, slides)
    done = snakemake_on_slurm(project, "tiles", "--group-components", "tiling=1")
    assert done.returncode == 0, done.stdout[-4000:]
    assert all((project / f"results/tiles/{s}.json").is_file() for s in slides)
    jobs = submissions(done.stdout)
    assert {k: len(v) for k, v in jobs.items()} == {"group_tiling_tile": 3}
    assert all(
        slurm_job(j)["JobState"] == "COMPLETED" and slurm_job(j)["TimeLimit"] == "00:05:00"
        for j in jobs["group_tiling_tile"]
    )
