"""Benchmark: what a per-slide job costs beyond its work, with and without the fork server.

K small synthetic slides go through the two per-slide jobs, `tile` then `features` (both
Xceptions, untrained, at --input-px), one job after another as a group job's members run on a
node. Each job is a fresh `python` process that calls `pathwsi.runtime.forkserver.call` exactly as the
workflow's scripts do (only Snakemake's own script preamble, the same in both modes, is left
out). Modes:

  fresh   fork_server: false   every job imports numpy/torch/timm/pathwsi itself
  fork    fork_server: true    jobs fork from one server; the first job of the run starts it

The two modes alternate over --rounds; each round's fork mode starts a new server in a private
TMPDIR, so its first job pays the server's start. Printed per stage: the median wall seconds
of a job, the median seconds of its work (the job's own timer: tiling `seconds`, features
`total`), the difference (start-up: interpreter, imports, model building, CUDA set-up), and for
fork mode the first job's extra cost (the server start).

    python benchmarks/bench_startup.py [--slides 8] [--rounds 2] [--device auto] [--input-px 224]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLIENT = "import pickle, sys; from pathwsi.runtime.forkserver import call; sys.exit(call(pickle.load(open(sys.argv[1], 'rb')), use_server=sys.argv[2] == '1'))"


def make_slides(folder: Path, count: int) -> list[dict]:
    """`count` small synthetic SVS slides (0.25 µm/px, JPEG tiles); their sample-sheet rows."""
    from pathwsi.demo.slides import SyntheticTissue, write_slide

    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        path = write_slide(folder / f"s{i}.svs", SyntheticTissue(1600.0, 1200.0, seed=i), 0.25, "svs")
        rows.append(
            {
                "cohort": "bench",
                "slide_id": f"s{i}",
                "patient_id": f"p{i}",
                "path": str(path),
                "mpp": None,
                "site": None,
            }
        )
    return rows


def job_files(config: dict, sample: dict, out: Path) -> dict[str, Any]:
    """The two jobs' requests for one slide, as workflow/scripts/{tile,features}.py build them."""
    from pathwsi.features.feature_request import FEATURE_SECTIONS, FeatureRequest
    from pathwsi.samples import Sample
    from pathwsi.slides.tile_request import TILING_SECTIONS, TileRequest, TilingOutputs

    sid = sample["slide_id"]
    outputs = TilingOutputs.under(out, sid)
    tile = TileRequest(
        Sample(**sample), {key: config[key] for key in TILING_SECTIONS}, outputs, out / f"{sid}.tile.log"
    )
    features = FeatureRequest(
        Sample(**sample),
        outputs.tiles,
        outputs.meta,
        out / "features" / f"{sid}.zarr",
        out / "features" / f"{sid}.timings.json",
        {key: config[key] for key in FEATURE_SECTIONS},
        config["features"]["threads"],
        out / f"{sid}.features.log",
    )
    return {"tile": tile, "features": features}


def run_job(request: Any, use_server: bool, env: dict[str, str]) -> float:
    """One job as a fresh process; its wall seconds."""
    path = request.log.with_suffix(".request")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(request))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, str(path), "1" if use_server else "0"], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{type(request).__name__} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def work_seconds(stage: str, request: Any) -> float:
    """The job's own timer: the tiling's `seconds`, or the extraction's `total`."""
    if stage == "tile":
        return json.loads(request.outputs.meta.read_text())["seconds"]
    return json.loads(request.timings.read_text())["seconds"]["total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from pathwsi.config import validate_config
    from pathwsi.runtime.forkserver import stop_servers

    config = validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    for entry in config["models"]["backbones"].values():
        entry.update(weights="untrained", input_px=args.input_px)
    config["features"].update(device=args.device, threads=args.threads, dtype="float16")
    with tempfile.TemporaryDirectory(prefix="pwbs", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        samples = make_slides(tmp / "slides", args.slides)
        walls: dict[tuple[str, str], list[float]] = {}
        works: dict[tuple[str, str], list[float]] = {}
        first_extra: dict[str, list[float]] = {"tile": [], "features": []}
        for round_ in range(args.rounds):
            for mode in ("fresh", "fork"):
                server_tmp = tmp / f"server{round_}"
                server_tmp.mkdir(exist_ok=True)
                env = {
                    **os.environ,
                    "TMPDIR": str(server_tmp),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                }
                out = tmp / f"{mode}{round_}"
                requests = [job_files(config, sample, out) for sample in samples]
                for stage in ("tile", "features"):
                    stage_walls = [run_job(r[stage], mode == "fork", env) for r in requests]
                    stage_work = [work_seconds(stage, r[stage]) for r in requests]
                    walls.setdefault((mode, stage), []).extend(stage_walls[1:])
                    works.setdefault((mode, stage), []).extend(stage_work[1:])
                    if mode == "fork":
                        first_extra[stage].append(stage_walls[0] - statistics.median(stage_walls[1:]))
                stop_servers(server_tmp)
                device = json.loads(requests[0]["features"].timings.read_text())["device"]
                tiles = [json.loads(r["features"].timings.read_text())["seconds"]["tiles"] for r in requests]
                print(f"round {round_ + 1} {mode}: done", file=sys.stderr, flush=True)

    print(
        f"{args.slides} slides ({statistics.median(tiles):.0f} tiles each, median) x {args.rounds} rounds; features: 2 x {config['models']['backbones']['imgnet']['arch']} at {args.input_px} px, device {device}, {args.threads} threads"
    )
    print(f"{'stage':9} {'mode':6} {'job wall s':>10} {'work s':>8} {'start-up s':>10}")
    for stage in ("tile", "features"):
        for mode in ("fresh", "fork"):
            wall, work = statistics.median(walls[(mode, stage)]), statistics.median(works[(mode, stage)])
            print(f"{stage:9} {mode:6} {wall:10.2f} {work:8.2f} {wall - work:10.2f}")
        fresh, fork = (statistics.median(walls[(m, stage)]) for m in ("fresh", "fork"))
        print(
            f"{stage:9} fork saves {fresh - fork:.2f} s per job ({fresh / fork:.1f}x faster); the server's start adds {statistics.median(first_extra[stage]):.2f} s to the first job"
        )


if __name__ == "__main__":
    main()
