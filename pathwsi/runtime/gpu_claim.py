"""One GPU per job: each GPU job (features, finetune, tissue experiment) claims one of the CUDA devices it
can see, exclusively, for as long as it runs, so `snakemake --resources gpu=N` on an N-GPU node puts one
job on each GPU instead of N jobs on cuda:0.

A claim is an flock on one file per device, `<gpus.lock_dir>/<host>/gpu-<id>.lock` (default lock_dir
`/tmp/pathwsi-gpus-<user>`, not $TMPDIR, so every shell and job on the node agrees). The kernel drops
it when the claiming process ends, however it ends (exit, exception, SIGKILL). A device's `<id>` is its
CUDA_VISIBLE_DEVICES entry, or its index when that is unset, so jobs given different CUDA_VISIBLE_DEVICES
on one node agree on the physical GPUs as long as they name them the same way (indices, as SLURM and
hand-set values do). The file holds the holder's pid, host and job, for the message of a job that waits.

What a scheduler set is used as is: a job that sees one GPU takes that one (it still locks it, so two jobs
handed the same GPU by hand wait for each other instead of sharing it silently). Under SLURM the lock folder
is per SLURM job (`<host>/slurm-<jobid>`): SLURM already gave each job its own GPUs, often all numbered
from 0, so only the jobs of one allocation compete for them.

The claim is taken in the job's own process (a fork-server child, never the server, which must not touch
CUDA) and dies with it. Reader processes forked by the job inherit the lock's descriptor and hold it until
they exit too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathwsi.errors import PathwsiError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiting job tries the locks again


@dataclass(frozen=True)
class GpuSettings:
    """Config section `gpus`: where the claims live and how long a job waits for a free GPU."""

    lock_dir: str | None = None  # None: /tmp/pathwsi-gpus-<user>
    wait_s: float | None = None  # None: as long as it takes; 0: fail at once when every GPU is taken

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GpuSettings:
        """From a config's `gpus` section (the defaults where the config has none)."""
        return cls(**config.get("gpus", {}))


class GpuClaimError(PathwsiError, RuntimeError):
    """No GPU could be claimed: none visible, the one asked for does not exist, or all are taken."""


@dataclass
class GpuClaim:
    """A GPU held by this process until `release()` or the process ends."""

    index: int  # torch's index among the visible devices: cuda:<index>
    device_id: str  # what is locked: the device's CUDA_VISIBLE_DEVICES entry, or its index
    visible: str | None  # CUDA_VISIBLE_DEVICES as the job saw it (None: unset)
    waited_s: float
    lock_file: Path
    fd: int | None

    def release(self) -> None:
        """Let the GPU go (closing the lock file drops the flock)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def record(self) -> dict[str, Any]:
        """The claim as the job's timings and provenance record it."""
        return {
            "index": self.index,
            "id": self.device_id,
            "cuda_visible_devices": self.visible,
            "waited_s": round(self.waited_s, 3),
            "lock": str(self.lock_file),
        }


def visible_devices(count: int | None = None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The id of each CUDA device this process sees, by torch index: its CUDA_VISIBLE_DEVICES entry, or the
    index itself. count: how many there are (default: torch.cuda.device_count(); tests give a fake count)."""
    if count is None:
        import torch  # here, not at import: the fork server imports this module and must not touch CUDA

        count = torch.cuda.device_count()
    entries = [e.strip() for e in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return [entries[i] if i < len(entries) else str(i) for i in range(count)]


def lock_folder(settings: GpuSettings, environ: Mapping[str, str] = os.environ) -> Path:
    """This node's (and, under SLURM, this SLURM job's) folder of GPU locks."""
    folder = _lock_root(settings) / socket.gethostname()
    slurm_job = environ.get("SLURM_JOB_ID")
    return folder / f"slurm-{slurm_job}" if slurm_job else folder


def claim_gpu(
    devices: Sequence[str],
    settings: GpuSettings = GpuSettings(),
    *,
    index: int | None = None,
    job: str = "",
    environ: Mapping[str, str] = os.environ,
) -> GpuClaim:
    """Claim one of `devices` (visible_devices(): ids by torch index), the first free one, or `index` only;
    wait for one up to settings.wait_s (None: without limit), then raise GpuClaimError naming the holders."""
    if not devices:
        raise GpuClaimError(f"{job or 'job'}: no CUDA device to claim (CUDA_VISIBLE_DEVICES={_shown(environ)})")
    if index is not None and not 0 <= index < len(devices):
        raise GpuClaimError(
            f"{job or 'job'}: cuda:{index} asked for, but only {len(devices)} device(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={_shown(environ)}); use cuda or auto to take any free one"
        )
    folder = lock_folder(settings, environ)
    _make_folder(folder, _lock_root(settings), private=not settings.lock_dir)
    wanted = [index] if index is not None else list(range(len(devices)))
    files = {i: folder / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', devices[i])}.lock" for i in wanted}
    started, warned = time.monotonic(), False
    while True:
        for i in wanted:
            fd = _try_lock(files[i])
            if fd is not None:
                _write_holder(fd, job)
                claim = GpuClaim(
                    i, devices[i], environ.get("CUDA_VISIBLE_DEVICES"), time.monotonic() - started, files[i], fd
                )
                log.info(
                    "claimed GPU %d (id %s, CUDA_VISIBLE_DEVICES=%s, waited %.1f s; lock %s)",
                    i,
                    devices[i],
                    _shown(environ),
                    claim.waited_s,
                    files[i],
                )
                return claim
        waited = time.monotonic() - started
        if settings.wait_s is not None and waited >= settings.wait_s:
            raise GpuClaimError(
                f"{job or 'job'}: every GPU it may use is still taken after {waited:.1f} s (gpus.wait_s: "
                f"{settings.wait_s:g}): {_holders(devices, files)}. Run at most one GPU job per GPU "
                "(snakemake --resources gpu=N on an N-GPU node), or raise gpus.wait_s (null waits as long as it takes)"
            )
        if not warned:
            limit = "as long as it takes" if settings.wait_s is None else f"up to {settings.wait_s:g} s"
            log.warning(
                "%s: every GPU it may use is taken (%s); waiting %s", job or "job", _holders(devices, files), limit
            )
            warned = True
        time.sleep(POLL_S)


@contextlib.contextmanager
def claimed_device(
    device: torch.device, settings: GpuSettings = GpuSettings(), job: str = ""
) -> Iterator[tuple[torch.device, dict[str, Any]]]:
    """For the body of a job: a CUDA `device` becomes the GPU it claims (`cuda`: the first free one, `cuda:N`:
    that one), made torch's current device; any other device is used as is. Yields (device, the claim's record,
    {} without a claim); the claim ends with the body, however it ends."""
    if device.type != "cuda":
        yield device, {}
        return
    import torch

    claim = claim_gpu(visible_devices(), settings, index=device.index, job=job)
    try:
        torch.cuda.set_device(claim.index)
        yield torch.device("cuda", claim.index), claim.record()
    finally:
        claim.release()


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding the exclusive flock on `path`, or None while another holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:  # another user's lock file in a shared lock_dir: a read-only descriptor locks too
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_holder(fd: int, job: str) -> None:
    """Who holds the lock, for the message of a job that waits for it."""
    text = f"pid {os.getpid()} on {socket.gethostname()}, job {job or '?'}, since {time.strftime('%H:%M:%S')}\n"
    with contextlib.suppress(OSError):  # a read-only descriptor: the file keeps the last holder's line
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)


def _holders(devices: Sequence[str], files: Mapping[int, Path]) -> str:
    """`cuda:0 (id 0) by pid 123 on node1, job slide-7, since 10:02:03; ...`, as the lock files say."""
    return "; ".join(f"cuda:{i} (id {devices[i]}) by {_holder(path)}" for i, path in files.items())


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _lock_root(settings: GpuSettings) -> Path:
    return Path(settings.lock_dir) if settings.lock_dir else Path("/tmp") / f"pathwsi-gpus-{_user()}"


def _make_folder(folder: Path, root: Path, private: bool) -> None:
    """Create the lock folder; the default root is private, and must be this user's."""
    if private:
        root.mkdir(mode=0o700, exist_ok=True)
    if private and root.stat().st_uid != os.getuid():
        raise GpuClaimError(f"GPU lock folder {root} belongs to another user; set gpus.lock_dir to a folder of yours")
    folder.mkdir(parents=True, exist_ok=True)


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return str(os.getuid())


def _shown(environ: Mapping[str, str]) -> str:
    return environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
