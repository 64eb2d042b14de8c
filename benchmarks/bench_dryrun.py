"""Benchmark: `snakemake -n` of the real workflow on a 10,000-slide sample sheet.

A temporary project holds one small synthetic slide and N symbolic links to it (the sheet check
only needs each path to be a file), a sheet of N TCGA-style rows in two cohorts, the shipped
config pointed at it, empty labelled-tile folders and placeholder target tables, so that every
rule of the workflow is in the DAG. Each measurement is a fresh `python -m snakemake` process;
its wall time, CPU time and peak RSS come from os.wait4 (the process itself, not its children).

Measured:
  dry-run          snakemake -n                              (what a user runs first)
  dry-run-slurm    snakemake -n --profile profiles/slurm     (the same, with the cluster profile's groups)
  parse            snakemake -l                              (Snakefile + config + sheet only, no DAG)
  one-job          snakemake --target-jobs tile:slide_id=... -n --force
                   (what every SLURM job and every member of a group job starts with: the plugin runs one
                   such Snakemake per job, and the jobs of a group one after another)

    python benchmarks/bench_dryrun.py [--slides 10000] [--only dry-run parse] [--cprofile OUT.prof] [--keep DIR]

Target: dry-run under 20 s for 10,000 slides. Numbers depend on the load of the machine: CPU
seconds are printed beside wall seconds for that reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 20.0
MEASUREMENTS = ("dry-run", "dry-run-slurm", "parse", "one-job")


def slide_id(i: int) -> str:
    return f"TCGA-{i // 100 % 100:02d}-{i:05d}-01Z-00-DX1"


def write_project(folder: Path, n: int) -> Path:
    """The temporary project: config, sheet of `n` rows, one real slide and n links to it."""
    from pathwsi.demo.slides import SyntheticTissue, write_slide

    slides = folder / "slides"
    slides.mkdir(parents=True)
    real = write_slide(slides / "real.svs", SyntheticTissue(400.0, 300.0, seed=1), 0.5, "svs")
    rows = ["cohort\tslide_id\tpatient_id\tpath\tmpp\tsite"]
    for i in range(n):
        sid = slide_id(i)
        (slides / f"{sid}.svs").symlink_to(real.name)
        cohort = "TCGA-LUAD" if i % 2 else "TCGA-LUSC"
        rows.append(f"{cohort}\t{sid}\t{sid[:12]}\tslides/{sid}.svs\t\t{sid[5:7]}")
    (folder / "config").mkdir()
    (folder / "config" / "samples.tsv").write_text("\n".join(rows) + "\n")
    for sub in ("train", "test"):
        (folder / "tiles" / sub).mkdir(parents=True)
    (folder / "targets").mkdir()
    (folder / "targets" / "expression.tsv").write_text("patient_id\tCD8A\n")
    (folder / "targets" / "mutations.tsv").write_text("patient_id\tTP53\n")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["samples"] = "config/samples.tsv"
    config["models"]["backbones"]["imgnet"]["weights"] = "untrained"  # no weights file to name here
    config["finetune"]["train_dir"] = "tiles/train"
    config["tissue_experiment"]["test_dir"] = "tiles/test"
    config["targets"]["cohorts"] = {
        "TCGA-LUAD": {"expression": "targets/expression.tsv", "mutations": "targets/mutations.tsv"}
    }
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def measure(args: list[str], cwd: Path, out: Path) -> dict:
    """Run one Snakemake process; wall, CPU and peak RSS of that process."""
    started = time.perf_counter()
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def job_stats(text: str) -> dict[str, int]:
    """The `Job stats` table the dry run prints (the first one)."""
    match = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal\s+(\d+)", text, re.S)
    if not match:
        return {}
    counts = {line.split()[0]: int(line.split()[1]) for line in match.group(1).splitlines() if line.strip()}
    counts["total"] = int(match.group(2))
    return counts


def group_stats(text: str) -> dict[str, int]:
    """How many group jobs of each group the dry run lists (each becomes one SLURM job)."""
    groups: dict[str, int] = {}
    for name in re.findall(r"\] Group job (\S+) \(jobs in lexicogr", text):
        groups[name] = groups.get(name, 0) + 1
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS))
    parser.add_argument("--cprofile", type=Path, help="also run the dry run under cProfile and write the stats here")
    parser.add_argument("--keep", type=Path, help="build the project here and keep it (reused when it exists)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    tmp = None
    if args.keep:
        project = args.keep.resolve()
        if not (project / "config" / "samples.tsv").is_file():
            write_project(project, args.slides)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_dryrun_")
        project = write_project(Path(tmp) / "project", args.slides)
    snakemake = ["-m", "snakemake", "-s", str(ROOT / "Snakefile")]
    commands = {
        "dry-run": [*snakemake, "-n"],
        "dry-run-slurm": [*snakemake, "-n", "--profile", str(ROOT / "profiles" / "slurm")],
        "parse": [*snakemake, "-l"],
        "one-job": [
            *snakemake,
            "-n",
            "--force",
            "--target-jobs",
            f"tile:slide_id={slide_id(0)}",
            "--allowed-rules",
            "tile",
        ],
    }
    if "dry-run-slurm" in args.only and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        print(
            "dry-run-slurm skipped: snakemake-executor-plugin-slurm is not installed (pip install -e '.[cluster]')",
            file=sys.stderr,
        )
        args.only.remove("dry-run-slurm")
    results: dict[str, dict] = {}
    try:
        for name in args.only:
            out = project / f"bench_{name}.txt"
            shutil.rmtree(project / ".snakemake", ignore_errors=True)
            result = measure(commands[name], project, out)
            text = out.read_text()
            if result["rc"] != 0:
                result["error"] = text[-2000:]
            if name.startswith("dry-run"):
                result["jobs"] = job_stats(text)
                result["groups"] = group_stats(text)
                result["printed_lines"] = text.count("\n")
            results[name] = result
            print(f"{name}: {json.dumps(result)}", file=sys.stderr)
        if args.cprofile:
            shutil.rmtree(project / ".snakemake", ignore_errors=True)
            profiled = ["-m", "cProfile", "-o", str(args.cprofile.resolve()), *commands["dry-run"]]
            print(
                f"cProfile: {json.dumps(measure(profiled, project, project / 'bench_cprofile.txt'))}", file=sys.stderr
            )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps({"slides": args.slides, "results": results}, indent=2))
        return
    print(
        f"\n{args.slides} slides, Snakemake {_snakemake_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'measurement':<15}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}  jobs / groups")
    for name, r in results.items():
        jobs = r.get("jobs", {})
        extra = f"{jobs.get('total', '')} jobs" if jobs else ""
        if r.get("groups"):
            extra += " in " + ", ".join(f"{n} {g} group jobs" for g, n in sorted(r["groups"].items()))
        if r["rc"] != 0:
            extra = f"FAILED rc={r['rc']}: {r.get('error', '')[-300:]}"
        print(f"{name:<15}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{r['peak_rss_mb']:>13.0f}  {extra}")
    if "dry-run" in results:
        verdict = "within" if results["dry-run"]["wall_s"] <= TARGET_S else "OVER"
        print(f"\ndry run: {results['dry-run']['wall_s']:.1f} s, {verdict} the {TARGET_S:.0f} s target")


def _snakemake_version() -> str:
    import snakemake

    return snakemake.__version__


if __name__ == "__main__":
    main()
