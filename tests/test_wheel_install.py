"""A non-editable install (a wheel) works without the repository tree: schemas and data ship as package data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from workflow_project import ROOT, TARGET, Row, make_project

pytestmark = pytest.mark.slow
TOP_LEFT_OUT = {".git", ".venv", "build", "results", "demo", "logs", ".snakemake"}  # at the top only: not pathwsi/demo


def left_out(folder: str, names: list[str]) -> set[str]:
    """Build outputs and run folders of the tree, and caches anywhere."""
    top = {n for n in names if n in TOP_LEFT_OUT} if Path(folder) == ROOT else set()
    return top | {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with pathwsi installed from its wheel. The dependencies are borrowed from this environment's
    site-packages as a plain path entry (its .pth files, the editable install among them, are not read), so only
    pathwsi itself comes from the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy without build outputs, so that nothing stale goes into the wheel
    shutil.copytree(ROOT, source, ignore=left_out)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("pathwsi-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.check_output([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())  # fmt: skip
    (purelib / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, env={**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"}, capture_output=True, text=True)  # fmt: skip


def test_the_wheel_holds_the_package_not_the_repository(fresh_venv, tmp_path):
    done = run(fresh_venv, ["python", "-c", "import pathwsi; print(pathwsi.__file__)"], tmp_path)
    assert done.returncode == 0 and str(fresh_venv) in done.stdout and str(ROOT) not in done.stdout, done.stderr


def test_pathwsi_check_and_a_workflow_target_run_from_the_wheel(fresh_venv, tmp_path, slides):
    project = make_project(tmp_path / "project", [Row("c1", "a", "p1", slides.tiff_05)])
    check = run(fresh_venv, ["pathwsi", "check", "--config", "config/config.yaml"], project)
    assert check.returncode == 0 and "valid; 1 slides in 1 cohort(s): c1" in check.stdout, check.stderr
    snakemake = ["python", "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1", TARGET]
    done = run(fresh_venv, snakemake, project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((project / "results" / "tiles" / "a.json").read_text())["status"] == "ok"
    assert "\tok\t" in (project / "results" / "summary.tsv").read_text()
