"""The fork server (pathwsi.runtime.forkserver): jobs run in forked children that already hold torch, with the
caller's directory, environment, stdio and exit status; stopping or killing either end takes the child down.

Each test client is a real subprocess, as a Snakemake job is. The job itself is a small script run by
`runpy.run_path` in the child, so that no test code lives in the package. The servers here live in a
private temp dir (TMPDIR, fixtures in conftest.py), apart from the one the workflow runs of the tests use.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pathwsi.runtime import forkserver

pytestmark = pytest.mark.skipif(not forkserver.available(), reason="the fork server needs Linux")

JOB = textwrap.dedent(
    """
    import json, os, sys, time
    report = {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "cwd": os.getcwd(),
              "torch_already_imported": "torch" in sys.modules, "env": os.environ.get("PATHWSI_TEST_VALUE"),
              "affinity": sorted(os.sched_getaffinity(0)), "umask": os.umask(0)}
    if os.environ.get("PATHWSI_TEST_THREADS"):
        import threadpoolctl, torch
        report["torch_threads"] = torch.get_num_threads()
        report["pool_threads"] = sorted({pool["num_threads"] for pool in threadpoolctl.threadpool_info()})
    with open(os.environ["PATHWSI_TEST_REPORT"], "w") as out:
        json.dump(report, out)
    if os.environ.get("PATHWSI_TEST_IGNORE_TERM"):
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("stdout of the job")
    print("stderr of the job", file=sys.stderr)
    if os.environ.get("PATHWSI_TEST_CUDA"):
        import torch
        print("cuda", torch.ones(2, device="cuda").sum().item())
    time.sleep(float(os.environ.get("PATHWSI_TEST_SLEEP", "0")))
    if os.environ.get("PATHWSI_TEST_RAISE"):
        raise RuntimeError("the job failed on purpose")
    if os.environ.get("PATHWSI_TEST_FLOOD"):
        print("x" * 1_000_000)  # into a pipe nobody reads any more
    code = os.environ.get("PATHWSI_TEST_EXIT", "0")
    sys.exit(None if code == "none" else int(code) if code.isdigit() else code)
    """
)
CLIENT = "import sys; from pathwsi.runtime.forkserver import Call, run_forked; sys.exit(run_forked(Call('runpy:run_path', {'path_name': sys.argv[1], 'run_name': '__main__'})))"


class Client:
    """One job submitted from a fresh process, as a Snakemake job script does."""

    def __init__(self, tmp: Path, workdir: Path, cpus: set[int] | None = None, **env: str | None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "job.py").write_text(JOB)
        self.report = workdir / "report.json"
        merged = {**os.environ, "TMPDIR": str(tmp), "PATHWSI_TEST_REPORT": str(self.report), **env}
        environment = {key: value for key, value in merged.items() if value is not None}
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLIENT, "job.py"],
            cwd=workdir,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=pin,
        )

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err

    def started(self, timeout: float = 120) -> dict:
        """The child's report, once it has written it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.report.exists() and self.report.read_text():
                return json.loads(self.report.read_text())
            assert self.process.poll() is None, self.process.communicate()
            time.sleep(0.05)
        raise AssertionError("the job did not start")


def gone(pid: int, timeout: float = 15) -> bool:
    """Whether process `pid` has ended (and been reaped) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_jobs_run_in_children_of_one_warm_server_with_the_callers_directory_environment_and_stdio(
    private_tmp, tmp_path
):
    first = Client(private_tmp, tmp_path / "a", PATHWSI_TEST_VALUE="one")
    code, out, err = first.finish()
    assert code == 0, err
    assert out == "stdout of the job\n" and "stderr of the job" in err
    a = json.loads(first.report.read_text())
    assert a["cwd"] == str(tmp_path / "a") and a["env"] == "one"
    assert a["pgid"] == a["pid"], "the child is not the leader of its own process group"

    second = Client(private_tmp, tmp_path / "b", PATHWSI_TEST_VALUE="two")
    assert second.finish()[0] == 0
    b = json.loads(second.report.read_text())
    assert b["ppid"] == a["ppid"] != first.process.pid, "the second job did not fork from the same server"
    assert b["torch_already_imported"], "the child had to import torch itself"
    assert b["cwd"] == str(tmp_path / "b") and b["env"] == "two"


@pytest.mark.parametrize(
    "env, expected, message",
    [
        ({"PATHWSI_TEST_EXIT": "3"}, 3, ""),
        ({"PATHWSI_TEST_EXIT": "none"}, 0, ""),
        ({"PATHWSI_TEST_EXIT": "the job says no"}, 1, "the job says no"),
        ({"PATHWSI_TEST_RAISE": "1"}, 1, "RuntimeError: the job failed on purpose"),
    ],
)
def test_the_jobs_exit_status_and_traceback_reach_the_caller_as_python_would_give_them(
    private_tmp, tmp_path, env, expected, message
):
    code, _, err = Client(private_tmp, tmp_path, **env).finish()
    assert code == expected and message in err


def test_the_child_takes_on_the_callers_cpus_umask_and_thread_count(private_tmp, tmp_path):
    """The BLAS/OpenMP pools were sized when the server loaded them; each child is resized to its job."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    cpu = min(os.sched_getaffinity(0))
    old_mask = os.umask(0o027)
    try:
        client = Client(private_tmp, tmp_path, PATHWSI_TEST_THREADS="1", OMP_NUM_THREADS="1", cpus={cpu})
    finally:
        os.umask(old_mask)
    assert client.finish()[0] == 0
    report = json.loads(client.report.read_text())
    assert report["affinity"] == [cpu] and report["umask"] == 0o027
    assert report["torch_threads"] == 1 and report["pool_threads"] == [1], report


def test_a_job_whose_output_breaks_cannot_harm_the_server_or_other_jobs(fresh_tmp, tmp_path):
    buffered = {"PYTHONUNBUFFERED": None}  # a server with block-buffered stdout, as on a node without that variable
    sleeper = Client(fresh_tmp, tmp_path / "sleeper", PATHWSI_TEST_SLEEP="5", **buffered)
    sleeper.started()
    broken = Client(fresh_tmp, tmp_path / "broken", PATHWSI_TEST_FLOOD="1", **buffered)
    broken.process.stdout.close()  # the job's stdout now leads nowhere
    assert broken.process.wait(timeout=120) != 0
    assert sleeper.finish()[0] == 0, "the other job was killed"
    assert list(fresh_tmp.glob("pathwsi-*/fork-*.sock")), "the server lost its socket"


def test_clients_starting_at_once_share_one_new_server(fresh_tmp, tmp_path):
    clients = [Client(fresh_tmp, tmp_path / str(i)) for i in range(3)]
    assert [c.finish()[0] for c in clients] == [0, 0, 0]
    assert len({json.loads(c.report.read_text())["ppid"] for c in clients}) == 1
    (log,) = fresh_tmp.glob("pathwsi-*/fork-*.log")
    assert log.read_text().count("fork server pid") == 1


@pytest.mark.parametrize(
    "sig, expected",
    [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 128 + signal.SIGINT), (signal.SIGKILL, -signal.SIGKILL)],
)
def test_stopping_or_killing_the_caller_stops_its_child(private_tmp, tmp_path, sig, expected):
    client = Client(private_tmp, tmp_path, PATHWSI_TEST_SLEEP="600")
    child = client.started()["pid"]
    client.process.send_signal(sig)
    code, _, _ = client.finish(timeout=60)
    assert code == expected
    assert gone(child), f"the child {child} outlived its caller ({sig!r})"


def test_a_stopped_caller_waits_idle_until_a_child_that_ignores_sigterm_is_killed(private_tmp, tmp_path):
    client = Client(private_tmp, tmp_path, PATHWSI_TEST_SLEEP="600", PATHWSI_TEST_IGNORE_TERM="1")
    child = client.started()["pid"]
    client.process.send_signal(signal.SIGTERM)
    before = cpu_seconds(client.process.pid)
    time.sleep(3)
    assert cpu_seconds(client.process.pid) - before < 0.5, "the waiting caller burns CPU"
    assert client.process.poll() is None, "the caller returned before its child was gone"
    code, _, _ = client.finish(timeout=forkserver.KILL_GRACE_S + 30)
    assert code == 128 + signal.SIGTERM
    assert gone(child)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_dead_server_takes_its_children_with_it_and_the_caller_says_so(fresh_tmp, tmp_path):
    client = Client(fresh_tmp, tmp_path, PATHWSI_TEST_SLEEP="600")
    report = client.started()
    os.kill(report["ppid"], signal.SIGKILL)
    code, _, err = client.finish(timeout=60)
    assert code == 1 and "closed the connection before the job finished" in err
    assert gone(report["pid"]), "the child outlived its server"


def test_an_idle_server_exits_and_removes_its_socket(tmp_path):
    path = Path(tempfile.mkdtemp(prefix="pwfs", dir="/tmp")) / "s.sock"
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "pathwsi.runtime.forkserver", str(path), "0.5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out, _ = server.communicate(timeout=120)
        assert server.returncode == 0, out
        assert "listening" in out and not path.exists() and not path.with_suffix(".pid").exists()
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def test_another_python_or_pathwsi_source_gets_its_own_server(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    here = forkserver.socket_path()
    monkeypatch.setattr(sys, "executable", "/another/python")
    assert forkserver.socket_path() != here and forkserver.socket_path().parent == here.parent


def test_without_the_server_the_job_runs_in_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWSI_TEST_REPORT", str(tmp_path / "report.json"))
    (tmp_path / "job.py").write_text(JOB)
    with pytest.raises(SystemExit) as stop:
        forkserver.call(
            forkserver.Call("runpy:run_path", {"path_name": str(tmp_path / "job.py"), "run_name": "__main__"}),
            use_server=False,
        )
    assert stop.value.code == 0
    assert json.loads((tmp_path / "report.json").read_text())["pid"] == os.getpid()


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_every_forked_child_gets_its_own_working_cuda(private_tmp, tmp_path):
    """The server imports torch but never initialises CUDA, so each child can (CUDA does not survive fork)."""
    for name in ("a", "b"):
        code, out, err = Client(private_tmp, tmp_path / name, PATHWSI_TEST_CUDA="1").finish()
        assert code == 0 and "cuda 2.0" in out, err


def test_a_job_that_cannot_be_started_says_why_on_its_own_stderr(private_tmp):
    client = "import sys; from pathwsi.runtime.forkserver import Call, run_forked; sys.exit(run_forked(Call('pathwsi.no_such_module:main', {})))"
    done = subprocess.run(
        [sys.executable, "-c", client],
        env={**os.environ, "TMPDIR": str(private_tmp)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "the job could not be started" in done.stderr and "No module named 'pathwsi.no_such_module'" in done.stderr


def test_the_server_key_covers_every_file_of_the_package_sub_packages_and_data_included(tmp_path, monkeypatch):
    package = tmp_path / "pathwsi"
    for name in ("__init__.py", "slides/tile_job.py", "data/schemas/config.schema.yaml"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("x = 1\n")
    monkeypatch.setattr(forkserver, "PACKAGE_ROOT", package)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    keys = [forkserver.socket_path()]
    for name in ("slides/tile_job.py", "data/schemas/config.schema.yaml"):
        (package / name).write_text("x = 22\n")
        keys.append(forkserver.socket_path())
    assert len(set(keys)) == 3


def test_a_caller_stopped_while_the_server_is_still_starting_waits_for_its_child(fresh_tmp, tmp_path):
    """SIGTERM before the child exists (the new server is importing torch): the caller still has the server stop the
    child once forked, and returns only after it is gone."""
    client = Client(fresh_tmp, tmp_path, PATHWSI_TEST_SLEEP="600")
    deadline = time.monotonic() + 60
    while not list(fresh_tmp.glob(f"pathwsi-{os.getuid()}/fork-*.sock")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the server listens before its imports: the request is sent, the reply not yet
    time.sleep(0.5)
    assert not client.report.exists(), "the child started before the test could stop its caller"
    client.process.send_signal(signal.SIGTERM)
    code, _, _ = client.finish(timeout=forkserver.KILL_GRACE_S + 60)
    assert code == 128 + signal.SIGTERM
    if client.report.exists() and client.report.read_text():
        assert gone(json.loads(client.report.read_text())["pid"])
