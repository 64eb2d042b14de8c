"""Updating pathwsi over a finished run keeps its tiles and feature stores: the previous release's workflow runs a
small project, then this release's workflow runs over its results, after its files got new mtimes as a `git pull`
gives them (profiles/default drops Snakemake's script-mtime trigger; pathwsi.rerun_params keeps settings added since
out of the params while they hold their earlier value)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fork_server_dir
from workflow_project import ROOT, TARGET, planned_jobs, slide_outputs, snapshot

pytestmark = pytest.mark.slow
PREVIOUS_RELEASE = "813e16ae09fe6e25392abc182d8948e75c982c4a"  # the last commit that landed before this release
EXPENSIVE_RULES = {"tile", "features", "finetune", "tissue_experiment"}


def git(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, **kwargs)


def previous_release(folder: Path) -> Path:
    """The previous release's tree (Snakefile, workflow, pathwsi, tests) in `folder`."""
    if git("cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}").returncode != 0:
        pytest.skip(f"{PREVIOUS_RELEASE} is not in this checkout's history (a shallow clone)")
    folder.mkdir()
    archive = git("archive", PREVIOUS_RELEASE, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run(code: Path, project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Snakemake with `code`'s Snakefile and pathwsi on `project`; stdout and stderr together."""
    command = [sys.executable, "-m", "snakemake", "-s", str(code / "Snakefile"), "--directory", str(project), *args]
    return subprocess.run(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_updating_pathwsi_keeps_the_finished_tiles_and_stores(tmp_path, slides):
    old = previous_release(tmp_path / "previous")
    project = tmp_path / "project"
    with fork_server_dir() as servers:
        old_env = {
            **{k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"},
            "PYTHONPATH": f"{old}{os.pathsep}{old / 'tests'}",
            "TMPDIR": str(servers),
        }
        make = "from pathlib import Path; from workflow_project import Row, make_project; import sys; make_project(Path(sys.argv[1]), [Row('c1', 'a', 'p1', Path(sys.argv[2])), Row('c1', 'b', 'p2', Path(sys.argv[3]))])"  # fmt: skip
        subprocess.run(
            [sys.executable, "-c", make, project, slides.tiff_05, slides.svs_025], cwd=tmp_path, env=old_env, check=True
        )
        done = run(old, project, "--cores", "2", TARGET, env=old_env)
        assert done.returncode == 0, done.stdout[-3000:]
    finished = [path for slide in ("a", "b") for path in slide_outputs(project, slide)]
    assert all(path.exists() for path in finished)
    before = snapshot(finished)
    new = pulled(tmp_path / "current")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SNAKEMAKE_PROFILE")}
    targets = (TARGET, "results/summary.html")  # the summary page is new: its rule runs over the finished slides
    dry = run(new, project, "-n", *targets, env=env)
    planned = {rule for rule, _ in planned_jobs(dry.stdout)}
    assert "summary" in planned and not planned & EXPENSIVE_RULES, dry.stdout[-3000:]
    done = run(new, project, "--cores", "2", *targets, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert snapshot(finished) == before


def pulled(folder: Path) -> Path:
    """This release's workflow, every file newer than any result: what a `git pull` does to the files it changes."""
    folder.mkdir()
    for name in ("Snakefile", "workflow", "profiles", "environment.yml"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, folder / name)
    for path in folder.rglob("*"):
        os.utime(path)  # copytree keeps the mtimes
    return folder
