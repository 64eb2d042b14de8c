"""Where dask computes the aggregation: a local scheduler on the job's CPUs, or dask.distributed.

Config `aggregate.scheduler` names it (`threads`, `synchronous`, `processes`, `distributed`).
With `distributed`, `aggregate.scheduler_address` points at a running cluster (`tcp://host:8786`,
or a scheduler file written by `dask scheduler --scheduler-file`); without an address a local
cluster is started in the job's process, one worker of the job's CPUs as threads, and closed after
it (memory limits, spilling and a dashboard, which the local schedulers lack). Threads, not worker
processes: spawned workers would re-run a Snakemake script's top-level code. How to run a cluster on SLURM: docs/cluster.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathwsi.errors import PathwsiError

log = logging.getLogger(__name__)
LOCAL = ("threads", "synchronous", "processes")


class SchedulerError(PathwsiError):
    """A dask scheduler that cannot be used; the message names the setting and what to do."""


@dataclass(frozen=True)
class DaskScheduler:
    """Config `aggregate.scheduler` and `aggregate.scheduler_address`, plus the job's CPUs."""

    name: str = "threads"
    address: str | None = None
    workers: int | None = None  # CPUs of a local scheduler or local cluster (None: all)
    connect_timeout_s: float = 30.0  # how long to wait for the cluster at `address`

    @classmethod
    def from_config(cls, config: Mapping[str, Any], workers: int | None = None) -> DaskScheduler:
        """From a validated config's `aggregate` section (its `statistics` say what is computed: a rule param)."""
        return cls(config["aggregate"]["scheduler"], config["aggregate"]["scheduler_address"], workers=workers)


@contextmanager
def compute_options(scheduler: DaskScheduler) -> Iterator[dict[str, Any]]:
    """Keyword arguments for `dask.compute` while the scheduler is up (a local cluster is closed after)."""
    if scheduler.name in LOCAL:
        yield {"scheduler": scheduler.name, "num_workers": scheduler.workers}
        return
    if scheduler.name != "distributed":
        raise SchedulerError(f"aggregate.scheduler '{scheduler.name}' is not one of {LOCAL + ('distributed',)}")
    from distributed import Client, LocalCluster

    if scheduler.address is None:
        with (
            LocalCluster(
                n_workers=1, threads_per_worker=scheduler.workers, processes=False, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            log.info("dask: local cluster in this process, dashboard %s", client.dashboard_link)
            yield {"scheduler": client}
        return
    where = (
        {"scheduler_file": scheduler.address} if scheduler.address.endswith(".json") else {"address": scheduler.address}
    )
    if "scheduler_file" in where and not Path(scheduler.address).is_file():  # Client would wait for it forever
        raise SchedulerError(
            f"aggregate.scheduler_address '{scheduler.address}': no such scheduler file; start the cluster first (docs/cluster.md) or fix the path"
        )
    try:
        client = Client(**where, timeout=f"{scheduler.connect_timeout_s}s")
    except (OSError, TimeoutError) as err:
        raise SchedulerError(
            f"aggregate.scheduler_address '{scheduler.address}': no dask scheduler answers ({err}); start one (docs/cluster.md) or remove the address to use a local cluster"
        ) from err
    with client:
        log.info(
            "dask: cluster at %s, %d workers, dashboard %s",
            scheduler.address,
            len(client.scheduler_info()["workers"]),
            client.dashboard_link,
        )
        yield {"scheduler": client}
