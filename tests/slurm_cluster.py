"""A real single-node SLURM cluster for the cluster tests, and small projects to run on it.

The cluster follows the recipe measured on this project's machine kind (Debian 12, root, no systemd):
Debian's slurmctld/slurmd 22.05 + munge, started by hand, one node with every core, one partition
`debug`, no accounting database (so the tests pass `--slurm-status-command squeue`), and fake GPUs
(`gres/gpu` backed by /dev/null and /dev/zero) so that rules asking for `gpu=1` are scheduled.

The fixture never touches a SLURM it did not configure: when /etc/slurm/slurm.conf exists without
this module's marker line, the tests are skipped. It stops the daemons it started, by pid file.
Set PATHWSI_SKIP_SLURM=1 to skip the cluster tests without trying.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from workflow_project import demo_config

ROOT = Path(__file__).resolve().parent.parent
MARKER = "# written by pathwsi tests/slurm_cluster.py"
FAKE_GPUS = 2
SLURM_CONF = Path("/etc/slurm/slurm.conf")

# Idempotent; as root. Installs the Debian packages when missing, starts munged, slurmctld, slurmd.
SLURM_UP = r"""
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs="slurmctld slurmd slurm-client munge"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
H=$(hostname -s)
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
devs=(/dev/null /dev/zero)
: > /etc/slurm/gres.conf
for ((i = 0; i < FAKE_GPUS; i++)); do echo "NodeName=$H Name=gpu File=${devs[$i]}" >> /etc/slurm/gres.conf; done
cat > /etc/slurm/slurm.conf <<EOF
MARKER
ClusterName=localcluster
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
GresTypes=gpu
NodeName=$H CPUs=$(nproc) RealMemory=$MEM Gres=gpu:FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if scontrol ping 2>/dev/null | grep -q UP; then
  scontrol reconfigure
else
  /usr/sbin/slurmctld
  /usr/sbin/slurmd
fi
for _ in $(seq 100); do sinfo -h -o %t 2>/dev/null | grep -qx idle && break; sleep 0.1; done
sinfo -h -o %t | grep -qx idle || { tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; exit 1; }
""".replace("MARKER", MARKER).replace("FAKE_GPUS", str(FAKE_GPUS))

SLURM_DOWN = r"""
scontrol shutdown >/dev/null 2>&1 || true
for _ in $(seq 50); do
  alive=0
  for f in /run/slurmctld.pid /run/slurmd.pid; do [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break; sleep 0.1
done
"""


@dataclass(frozen=True)
class Cluster:
    """What the tests need to know about the running cluster."""

    partition: str
    fake_gpus: int


def _skip_reason() -> str | None:
    if os.environ.get("PATHWSI_SKIP_SLURM"):
        return "PATHWSI_SKIP_SLURM is set"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[cluster]')"
    if not sys.platform.startswith("linux") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting a throw-away SLURM needs root on Linux"
    if not shutil.which("apt-get") and not (shutil.which("slurmctld") and shutil.which("munged")):
        return "no apt-get to install SLURM, and slurmctld/munged are not installed"
    if SLURM_CONF.exists() and not _throw_away(SLURM_CONF.read_text(errors="replace")):
        return f"{SLURM_CONF} exists and is not a throw-away test cluster's; not touching a real SLURM"
    return None


def _throw_away(conf: str) -> bool:
    """This module's slurm.conf, or the same single-node recipe written by hand (cluster `localcluster`)."""
    recipe = ("ClusterName=localcluster", "StateSaveLocation=/var/spool/slurmctld", "PartitionName=debug Nodes=ALL")
    return MARKER in conf or all(line in conf for line in recipe)


def _running() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        return "UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node SLURM (munge + slurmctld + slurmd, fake GPUs) for the session; skipped when impossible."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    was_running = _running()
    munge_was_running = Path("/run/munge/munged.pid").is_file()
    try:
        done = subprocess.run(["bash", "-c", SLURM_UP], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("setting up SLURM took over 300 s (apt-get without a reachable registry?)")
    if done.returncode != 0:
        pytest.skip(f"SLURM could not be set up (rc {done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
    yield Cluster(partition="debug", fake_gpus=FAKE_GPUS)
    if not was_running:
        subprocess.run(["bash", "-c", SLURM_DOWN], capture_output=True, timeout=60)
        pid_file = Path("/run/munge/munged.pid")
        if not munge_was_running and pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
        # With slurm.conf left behind and no controller, every SLURM client call waits ~10 s, and the
        # slurm plugin runs `scontrol show config` when Snakemake imports it: every Snakemake start on
        # this machine would take 10 s longer. Without the file the clients fail at once.
        if SLURM_CONF.is_file() and MARKER in SLURM_CONF.read_text(errors="replace"):
            SLURM_CONF.with_name("gres.conf").unlink(missing_ok=True)
            SLURM_CONF.unlink()


def write_project(folder: Path, slide_paths: dict[str, Path], *, untrained_models: bool = True) -> Path:
    """A working directory with config/config.yaml (the demo's, made tiny) and a sheet of `slide_paths`.

    Both backbones become untrained 64-px models, so rule features needs no fine-tuning first.
    """
    (folder / "config").mkdir(parents=True, exist_ok=True)
    config = demo_config()
    if untrained_models:
        for model in config["models"]["backbones"].values():
            model.update(weights="untrained", input_px=64)
    config["features"].update(num_workers=0, threads=1)  # tiny slides: reading in the job's own process is fastest
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    lines = ["cohort\tslide_id\tpatient_id\tpath\tmpp\tsite"]
    lines += [f"c1\t{slide_id}\tP-{slide_id}\t{path}\t\t" for slide_id, path in slide_paths.items()]
    (folder / "config" / "samples.tsv").write_text("\n".join(lines) + "\n")
    return folder


def snakemake_on_slurm(
    project: Path, *args: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`snakemake --profile profiles/slurm` on `project`, tuned for the test cluster; stdout+stderr in .stdout.

    squeue as status command (no accounting database here), first status check after 1 s instead of 40,
    successful job logs kept so that the tests can read them. Killed (not terminated: Snakemake waiting
    for SLURM ignores SIGTERM) after `timeout` s.
    """
    command = [
        sys.executable, "-m", "snakemake", "--profile", str(ROOT / "profiles" / "slurm"), "-s", str(ROOT / "Snakefile"),
        "--directory", str(project), "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
        "--slurm-keep-successful-logs", "--latency-wait", "5", *args,
    ]  # fmt: skip
    try:
        return subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as err:
        subprocess.run(["scancel", "--partition", "debug", "--user", str(os.getuid())], capture_output=True)
        raise AssertionError(f"snakemake on SLURM ran over {timeout} s:\n{(err.stdout or '')[-3000:]}") from None
