"""When the feature job runs its models through `torch.compile`, and where Inductor keeps what it compiled.

`features.compile` is `auto` (default), `true` or `false`. `decide` applies it:

- `false`: eager; `true`: compiled on any device (the CPU too: Inductor then needs a C++ compiler).
- `auto`: never on the CPU (Inductor's CPU code gains little over oneDNN's and costs a compile per job);
  on CUDA, compiled when the slide has at least `compile_min_tiles` tiles (default 100,000), or at
  least `compile_min_tiles_warm` (default 10,000) when Inductor's cache already holds this compile
  (a marker written by an earlier job with the same models, batch size, card and torch; below).
  The thresholds are a choice, not a measured break-even: on one H100 (docs/extract.md, torch 2.11)
  compiling made the two models alone 41 % faster, 5,048 -> 7,128 tiles/s, a saving of about
  0.06 ms a tile, against a cold compile of minutes; `benchmarks/bench_extract.py --compare-compile`
  prints the cold and warm compile seconds and the break-even tile counts on the card it runs on.

Inductor's on-disk caches (FX graphs, AOTAutograd, autotuning, Triton kernels) go to one directory
that outlives the job (`cache_dir`): `features.compile_cache` when set, else an existing
`TORCHINDUCTOR_CACHE_DIR`, else `$XDG_CACHE_HOME/pathwsi/inductor` (`~/.cache/pathwsi/inductor`),
not Inductor's default under /tmp, which SLURM often makes private to each job. So a node, or a
SLURM group job, pays the cold compile once and later jobs load the compiled graphs.

A compiled model sees one batch shape only: the job pads its last, partial batch to the full batch
size (pathwsi.features.extract), and compiles with `dynamic=False`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathwsi.features.backbones import Backbone
from pathwsi.runtime.outputs import write_json

log = logging.getLogger(__name__)
MARKERS = "pathwsi-compiled"  # subfolder of the cache directory with one marker per compiled setup
Net = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CompileSettings:
    """The `features.compile*` keys."""

    setting: bool | str = "auto"  # features.compile
    cache: str | None = None  # features.compile_cache
    min_tiles: int = 100_000  # features.compile_min_tiles
    min_tiles_warm: int = 10_000  # features.compile_min_tiles_warm


@dataclass(frozen=True)
class CompileDecision:
    """Whether to compile, and why (logged and kept in the job's timings record)."""

    compile: bool
    why: str


def decide(settings: CompileSettings, device: torch.device, n_tiles: int, warm: bool) -> CompileDecision:
    """`features.compile` applied to a job of `n_tiles` tiles on `device` (see the module docstring)."""
    if settings.setting is True or settings.setting is False:
        return CompileDecision(settings.setting, f"features.compile is {str(settings.setting).lower()}")
    if device.type != "cuda":
        return CompileDecision(False, f"features.compile is auto and the device is {device.type}, not CUDA")
    threshold, cache = (settings.min_tiles_warm, "warm") if warm else (settings.min_tiles, "cold")
    pays = n_tiles >= threshold
    return CompileDecision(
        pays,
        f"features.compile is auto: {n_tiles} tiles {'>=' if pays else '<'} {threshold} "
        f"(compile_min_tiles{'_warm' if warm else ''}; Inductor cache {cache})",
    )


def cache_dir(configured: str | None) -> Path:
    """Where Inductor's caches go: the config's folder, else $TORCHINDUCTOR_CACHE_DIR, else the XDG cache."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pathwsi" / "inductor"


def use_cache_dir(directory: Path) -> None:
    """Point Inductor's on-disk caches at `directory` (before anything is compiled in this process).

    TORCHINDUCTOR_CACHE_DIR is read when Inductor first needs the folder (Triton's kernels go under it
    unless TRITON_CACHE_DIR says otherwise); the FX-graph and AOTAutograd caches are on by default in
    torch 2.14 and switched on here in case a site's environment turned them off."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    functorch_config.enable_autograd_cache = True


def setup_key(models: list[Backbone], batch_size: int, tile_px: int, device: torch.device) -> str:
    """What makes one compile reusable from the cache: models' graphs and shapes, batch, card, torch."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    setup = {
        "torch": torch.__version__,
        "device": card,
        "batch_size": batch_size,
        "tile_px": tile_px,
        "models": [[m.spec.arch, m.spec.input_px, m.spec.precision] for m in models],
    }
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:24]


def is_warm(directory: Path, key: str) -> bool:
    """Whether a job compiled this setup into `directory` before."""
    return (directory / MARKERS / f"{key}.json").is_file()


def mark_warm(directory: Path, key: str, seconds: float, was_warm: bool) -> None:
    """Record a finished compile of this setup: the first (cold) and the latest compile seconds."""
    path = directory / MARKERS / f"{key}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"cold_s": round(seconds, 2)}
    record.update(latest_s=round(seconds, 2), latest_was_warm=was_warm, torch=torch.__version__)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, path)


def compile_models(
    nets: Mapping[str, torch.nn.Module], strict: bool, warm_up: Callable[[Mapping[str, Net]], None]
) -> tuple[dict[str, Net], float | None]:
    """The models compiled and warmed up on one full batch (`warm_up` runs it), and the seconds that took.

    A failing compile is an error when `strict` (features.compile: true); under auto it is logged and
    the models run eagerly (then the seconds are None)."""
    compiled = {name: torch.compile(net, dynamic=False) for name, net in nets.items()}
    started = time.perf_counter()
    try:
        warm_up(compiled)
    except Exception as err:  # Inductor, Triton or the C++ compiler: many kinds
        if strict:
            raise RuntimeError(
                f"torch.compile of the feature models failed ({type(err).__name__}: {err}); "
                "set features.compile to auto or false to run them eagerly"
            ) from err
        log.warning("torch.compile failed (%s: %s); running the models eagerly", type(err).__name__, err)
        return dict(nets), None
    return compiled, time.perf_counter() - started


def job_nets(
    models: list[Backbone],
    device: torch.device,
    n_tiles: int,
    batch_size: int,
    tile_px: int,
    settings: CompileSettings,
    warm_up: Callable[[Mapping[str, Net]], None],
) -> tuple[dict[str, Net], dict[str, Any]]:
    """The callables a job runs its models with (compiled or not, per `decide`) and a record of the
    decision: compiled, why, compile seconds (the warm-up batch included), the cache folder."""
    directory = cache_dir(settings.cache)
    key = setup_key(models, batch_size, tile_px, device)
    warm = is_warm(directory, key)
    decision = decide(settings, device, n_tiles, warm)
    log.info("torch.compile %s: %s", "on" if decision.compile else "off", decision.why)
    eager: dict[str, Net] = {m.spec.name: m.net for m in models}
    record: dict[str, Any] = {"compiled": False, "why": decision.why, "seconds": 0.0}
    if not decision.compile:
        return eager, record
    use_cache_dir(directory)
    nets, seconds = compile_models({m.spec.name: m.net for m in models}, settings.setting is True, warm_up)
    record.update(cache=str(directory), cache_was_warm=warm)
    if seconds is None:
        record["why"] += "; the compile failed, so the models ran eagerly"
        return nets, record
    mark_warm(directory, key, seconds, warm)
    log.info("compiled the models in %.1f s (Inductor cache %s, %s)", seconds, directory, "warm" if warm else "cold")
    record.update(compiled=True, seconds=seconds)
    return nets, record
