"""A per-node fork server: import pathwsi, torch and timm once, fork a fresh process for each job.

A per-slide job spends 2-13 s importing its libraries before it reads a pixel, often longer than the
work itself. With the fork server, the first job on a node starts `python -m pathwsi.runtime.forkserver`
(detached); that process imports each job module once, then forks one child per request. Each
child is a fresh process as far as its job can tell: its own process group, the job's working
directory, environment and stdin/stdout/stderr (passed over the socket), its own CUDA context (the
server never touches CUDA). The job (the client) waits for the child's exit status and exits with
it. A client that is stopped (SIGTERM, SIGINT) or killed takes its child with it; a server that
dies takes its children with it (PR_SET_PDEATHSIG). The server exits after `IDLE_S` seconds without
work, and on a SLURM node at the latest when the job that started it ends.

There is one server per user, host, SLURM job, Python, pathwsi source and set of installed packages:
editing pathwsi's code, installing a package or switching environments starts a new one. Linux only;
elsewhere, and with `fork_server: false`, jobs run in their own process as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pathwsi.errors import PathwsiError

IDLE_S = 300.0  # the server exits after this long without a job
KILL_GRACE_S = 10.0  # a stopped job's child gets SIGTERM, then SIGKILL after this long
START_TIMEOUT_S = 180.0  # how long a client waits for its child to be forked (a new server's imports included)
_LENGTH = struct.Struct("!Q")
_REPLY = struct.Struct(
    "!cq"
)  # b"P" + child pid, then b"X" + exit status (negative: killed by that signal); b"E": not started
_BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}  # held back across fork until the child has its own handlers
_PR_SET_PDEATHSIG = 1

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the pathwsi package: every file of it is in the server key


class ForkServerError(PathwsiError, RuntimeError):
    """The fork server could not be started or reached, or vanished during a job."""


def available() -> bool:
    """Whether this platform can run the fork server (Linux: fork, Unix sockets, fd passing, prctl)."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


class Job(Protocol):
    """A picklable job: `entry` ('module:function') is imported by the fork server before it forks; `run()` runs it."""

    entry: str

    def run(self) -> None: ...


class EntryJob:
    """A job run by calling its `entry` function with the job itself (the workflow's typed requests)."""

    entry: ClassVar[str]

    def run(self) -> None:
        resolve(self.entry)(self)


@dataclass(frozen=True)
class Call:
    """`entry`(**kwargs) as a job."""

    entry: str
    kwargs: dict[str, Any]

    def run(self) -> None:
        resolve(self.entry)(**self.kwargs)


def call(job: Job, use_server: bool) -> int:
    """Run `job` in a fork-server child (when `use_server` and available), else here; its exit status."""
    if use_server and available():
        return run_forked(job)
    job.run()
    return 0


def resolve(target: str) -> Callable[..., Any]:
    """The function named by `module:function` (importing the module)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def socket_path() -> Path:
    """The server socket of this user, host, SLURM job, Python and pathwsi source, in a private folder of the temp dir."""
    package = PACKAGE_ROOT
    stamps: list[tuple[str, int] | tuple[str, int, int]] = sorted(
        (str(p.relative_to(package)), p.stat().st_mtime_ns, p.stat().st_size)
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    stamps.append(
        ("site-packages", Path(sysconfig.get_paths()["purelib"]).stat().st_mtime_ns)
    )  # changes when packages are (un)installed
    job = os.environ.get("SLURM_JOB_ID")  # a SLURM job's server serves that job only (its resources, its lifetime)
    key = repr((os.getuid(), socket.gethostname(), job, sys.executable, sys.version, str(package), stamps))
    folder = Path(tempfile.gettempdir()) / f"pathwsi-{os.getuid()}"
    if len(str(folder)) > 70:  # Unix socket paths are limited to ~107 bytes
        folder = Path("/tmp") / f"pathwsi-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise ForkServerError(f"{folder} must belong to you and be private (chmod 700), or set fork_server: false")
    return folder / f"fork-{hashlib.sha256(key.encode()).hexdigest()[:16]}.sock"


# -- the client (a workflow job) -------------------------------------------------------------------------


def run_forked(job: Job) -> int:
    """Run `job` in a child of this node's fork server, started if needed; its exit status.

    SIGTERM or SIGINT here stops the child (SIGTERM, then SIGKILL) and waits for it to be gone."""
    path = socket_path()
    request = pickle.dumps({
        "job": job, "cwd": os.getcwd(), "env": dict(os.environ),
        "affinity": sorted(os.sched_getaffinity(0)), "umask": _current_umask(),
    })  # fmt: skip
    stopped_by: list[int] = []  # the stop signals received, across both attempts
    for attempt in (1, 2):  # a server that was just exiting (idle) closes the connection unanswered: ask a new one
        if stopped_by:
            return 128 + stopped_by[0]  # stopped before any child was started
        with _connect_or_start(path) as sock:
            sock.settimeout(START_TIMEOUT_S)
            socket.send_fds(sock, [_LENGTH.pack(len(request))], _stdio())
            sock.sendall(request)
            with _stop_child_on_signal(sock, stopped_by):  # from here on, before the child may have started
                kind, _ = _reply(sock, path, allow_eof=attempt == 1)
                sock.settimeout(None)
                if kind == b"E":
                    return 1  # the server wrote why on our stderr
                if kind == b"P":
                    return _wait_for_child(sock, path, stopped_by)
                if kind:
                    raise ForkServerError(f"unexpected fork server reply {kind!r}")
    raise AssertionError("unreachable: the second attempt raises at EOF")


@contextlib.contextmanager
def _stop_child_on_signal(sock: socket.socket, stopped_by: list[int]) -> Iterator[None]:
    """While in the body, SIGTERM/SIGINT close our side of `sock`, so that the server stops the child (at once, or
    as soon as it has forked it); the signal received is appended to `stopped_by`."""

    def stop(signum: int, _frame: Any) -> None:
        if not stopped_by:
            stopped_by.append(signum)
            sock.shutdown(socket.SHUT_WR)  # the server sees EOF and stops the child

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_for_child(sock: socket.socket, path: Path, stopped_by: list[int]) -> int:
    """The child's exit status; once stopped (`stopped_by` a signal), wait (bounded) until the server says it ended."""
    deadline = None
    while not select.select([sock], [], [], 1.0)[0]:
        if stopped_by and deadline is None:
            deadline = time.monotonic() + KILL_GRACE_S + 30
        if deadline is not None and time.monotonic() > deadline:
            raise _failure(path, "did not confirm that the stopped job ended")
    _, status = _reply(sock, path, allow_eof=False)
    if stopped_by:
        return 128 + stopped_by[0]
    return status if status >= 0 else 128 - status


def _reply(sock: socket.socket, path: Path, allow_eof: bool) -> tuple[bytes, int]:
    """The server's next reply; (b"", 0) at EOF when `allow_eof`, else an error that points at the server's log."""
    try:
        data = _recv_exactly(sock, _REPLY.size)
    except TimeoutError:
        raise _failure(path, f"did not start the job within {START_TIMEOUT_S:.0f} s") from None
    if len(data) == _REPLY.size:
        kind, value = _REPLY.unpack(data)
        return kind, value
    if allow_eof and not data:
        return b"", 0
    raise _failure(path, "closed the connection before the job finished (it failed or was stopped)")


def _stdio() -> list[int]:
    """This process's stdin, stdout and stderr, /dev/null for any that is closed."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            part = sock.recv(size - len(data))
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _connect_or_start(path: Path) -> socket.socket:
    """A connection to the server at `path`; the first client (under a lock) starts it and waits until it listens.

    The server listens before its slow imports, so the lock is held for well under a second; requests
    wait in the socket's backlog until the imports are done."""
    sock = _try_connect(path)
    if sock is not None:
        return sock
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _try_connect(path)
        if sock is not None:
            return sock
        path.unlink(missing_ok=True)  # a server that died without cleaning up
        log_path = path.with_suffix(".log")
        if log_path.exists() and log_path.stat().st_size > 2**20:
            log_path.replace(log_path.with_suffix(".log.old"))
        with open(log_path, "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "pathwsi.runtime.forkserver", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                env=_server_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            sock = _try_connect(path)
            if sock is not None:
                return sock
            if server.poll() is not None:
                raise _failure(path, f"exited with status {server.returncode} while starting")
            time.sleep(0.05)
        server.kill()
        raise _failure(path, f"did not start within {START_TIMEOUT_S:.0f} s")


def _server_env() -> dict[str, str]:
    """The caller's environment, with an absolute PYTHONPATH that starts with this pathwsi (the server runs in /)."""
    entries = [str(PACKAGE_ROOT.parent), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(e) for e in entries if e)}


def stop_servers(tmpdir: Path) -> None:
    """Stop (SIGTERM) every server of this user whose socket lies under temp dir `tmpdir` (tests, benchmarks)."""
    for sock in tmpdir.glob(f"pathwsi-{os.getuid()}/fork-*.sock"):
        with contextlib.suppress(OSError, ValueError):  # no pid file, or that server is gone already
            os.kill(int(sock.with_suffix(".pid").read_text()), signal.SIGTERM)


def _failure(path: Path, what: str) -> ForkServerError:
    """An error saying what the server at socket `path` did wrong, with the end of its log."""
    log = path.with_suffix(".log")
    with contextlib.suppress(OSError):
        return ForkServerError(
            f"the fork server {what}; its log: {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        )
    return ForkServerError(f"the fork server {what}; it left no log at {log}")


# -- the server ------------------------------------------------------------------------------------------


@dataclass
class _Child:
    conn: socket.socket
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM of a stopped job
    peer_gone: bool = False


class _Server:
    """Single-threaded (so that fork is safe): one selector over the listening socket, the clients and SIGCHLD."""

    def __init__(self, path: Path, idle_s: float) -> None:
        self.path = path
        self.idle_s = idle_s
        self.pid = os.getpid()
        self.children: dict[int, _Child] = {}
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        path.with_suffix(".pid").write_text(str(self.pid))
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to the wakeup pipe
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.wake_read, selectors.EVENT_READ, self._reap)
        self.last_busy = time.monotonic()

    def serve(self) -> None:
        """Run until idle for `idle_s` seconds."""
        while self.children or time.monotonic() - self.last_busy < self.idle_s:
            for key, _ in self.selector.select(self._timeout()):
                key.data(key.fileobj)
            self._escalate()
            if self.children:
                self.last_busy = time.monotonic()

    def close(self) -> None:
        """Remove the socket and pid file, and stop every child still running."""
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".pid").unlink(missing_ok=True)
        for pid in self.children:
            _kill_group(pid, signal.SIGKILL)

    def _timeout(self) -> float:
        deadlines = [c.kill_at for c in self.children.values() if c.kill_at is not None]
        if not self.children:
            deadlines.append(self.last_busy + self.idle_s)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else 60.0

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.settimeout(30)
        fds: list[int] = []
        try:
            header, fds, _, _ = socket.recv_fds(conn, _LENGTH.size, 3)
            request = pickle.loads(_recv_exactly(conn, _LENGTH.unpack(header)[0]))
            resolve(request["job"].entry)  # import the job's module here, once, before forking
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_initialized():
                raise ForkServerError(
                    f"importing {request['job'].entry} initialised CUDA in the fork server; CUDA does not survive fork"
                )
            pid = self._fork(request, fds, conn)
        except Exception:
            message = f"pathwsi fork server: the job could not be started:\n{traceback.format_exc()}"
            print(message, file=sys.stderr, flush=True)
            if len(fds) == 3:
                _write_quietly(fds[2], message)  # the job's own stderr
            _send(conn, b"E", 0)
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = _Child(conn)
        self.selector.register(conn, selectors.EVENT_READ, self._client_spoke)
        _send(conn, b"P", pid)
        print(f"{time.strftime('%H:%M:%S')} pid {pid}: {request['job'].entry} in {request['cwd']}", flush=True)

    def _fork(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> int:
        """Fork the job's child (which never returns from here); its pid."""
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)  # no server handler may run in the child
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    self._become_child(request, fds, conn)
                finally:
                    os._exit(1)  # nothing in the child may ever return into the server's loop
            with contextlib.suppress(OSError):  # the child may have done it, or be gone already
                os.setpgid(pid, pid)  # here too, so that a stop right after the fork reaches its group
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)
        return pid

    def _client_spoke(self, conn: socket.socket) -> None:
        """The client closed its side (it was stopped or killed): stop its child."""
        pid = next((pid for pid, child in self.children.items() if child.conn is conn and not child.peer_gone), None)
        if pid is None:
            return  # the child was reaped, and its connection closed, earlier in this same round
        self.selector.unregister(conn)
        self.children[pid].peer_gone = True
        self.children[pid].kill_at = time.monotonic() + KILL_GRACE_S
        _kill_group(pid, signal.SIGTERM)

    def _escalate(self) -> None:
        for pid, child in self.children.items():
            if child.kill_at is not None and time.monotonic() >= child.kill_at:
                _kill_group(pid, signal.SIGKILL)
                child.kill_at = None

    def _reap(self, _pipe: int) -> None:
        os.read(self.wake_read, 4096)
        while self.children:
            peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if peek is None:
                return
            _kill_group(
                peek.si_pid, signal.SIGKILL
            )  # leftovers of its group (reader processes), before the pid is freed
            _, status = os.waitpid(peek.si_pid, 0)
            child = self.children.pop(peek.si_pid, None)
            if child is None:
                continue
            if not child.peer_gone:
                self.selector.unregister(child.conn)
            _send(child.conn, b"X", os.waitstatus_to_exitcode(status))
            child.conn.close()

    def _become_child(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> None:
        """In the forked child: become the job's process and run it; exits with its status."""
        os.setpgid(0, 0)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:  # the server died before prctl took effect
            os._exit(1)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)
        self.selector.close()
        for sock in [self.listener, conn, *(c.conn for c in self.children.values())]:
            sock.close()  # through the objects, so that no stale fd number is closed later
        os.close(self.wake_read)
        os.close(self.wake_write)
        for target_fd, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target_fd)
            os.close(fd)
        _take_on(request)
        status = 1
        try:
            request["job"].run()
            status = 0
        except SystemExit as stop:  # as Python itself would exit: None is 0, a message is printed and is 1
            if stop.code is None or isinstance(stop.code, int):
                status = stop.code or 0
            else:
                _write_quietly(2, f"{stop.code}\n")
        except BaseException:
            traceback.print_exc()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass  # a closed or full stdout must not change the status, nor escape into the server's code
        os._exit(status)


def _take_on(request: dict[str, Any]) -> None:
    """Make this child look like the job's own process: directory, environment, CPUs, umask, thread pools."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # the job's TMPDIR, not the server's
    os.sched_setaffinity(0, request["affinity"])
    os.umask(request["umask"])
    threads = request["env"].get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # the BLAS/OpenMP pools read it when they were loaded: in the server
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(threads))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))


def _write_quietly(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


def _send(conn: socket.socket, kind: bytes, value: int) -> None:
    try:
        conn.sendall(_REPLY.pack(kind, value))
    except OSError:
        pass  # the client is gone (killed): nobody to tell


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve(path: Path, idle_s: float = IDLE_S) -> None:
    """Serve fork requests at `path` until idle for `idle_s` seconds or sent SIGTERM."""
    server = _Server(path, idle_s)  # listening at once: the first requests wait in the backlog during the imports
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        importlib.import_module("torch")  # the slow imports, once
        importlib.import_module("timm")
        print(
            f"{time.strftime('%H:%M:%S')} fork server pid {os.getpid()} listening at {path} (exits after {idle_s:.0f} s idle)",
            flush=True,
        )
        server.serve()
    finally:
        server.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else IDLE_S)
