"""Running a model's Python code against unit tests in a child process that holds against code
written to escape, on Linux, without root-only assumptions.

Every run gets a fresh temporary directory, a clean environment, its own session and process
group, and a fresh interpreter (`python -I -S`) that runs `_DRIVER`: it sets the resource
limits (CPU time, address space, file size, processes, open files, no core files), executes
the candidate and then the tests, and only after both ran prints a one-time token it read
from stdin before the candidate started, so code that exits early with status 0 does not
pass. A wall-clock timeout, a crash, a limit hit or an early exit is a failure, and the whole
process group is killed afterwards. Then, by what the machine allows (`isolation()`):

- `bubblewrap` (the `bwrap` tool, where installed and allowed): new PID, network, mount, IPC
  and UTS namespaces (and a user namespace when not root); a root holding only the system's
  and Python's files read-only and the temporary directory writable (no /etc, /home, /tmp,
  no caller's files); no network at all; `_ctypes` hidden, so ctypes cannot load; the caller
  and every other process are invisible, and every process left inside dies with the
  namespace. Started as root, bwrap keeps only the capabilities to change user and the
  driver drops to the run's own user id before anything else, so the process limit binds.
- `uid` (started as root, no working bwrap): the code runs as a user id of its own (one per
  run, unused by the system), so it cannot signal the caller or write the caller's files, the
  process limit binds, and every process of that id is killed afterwards (a daemon started
  with setsid included). The network is cut by new user and network namespaces where the
  kernel allows, else only Python's socket constructors are replaced. World-readable files
  (/etc/passwd) stay readable, world-writable folders (/tmp) writable, ctypes loadable.
- `session` (neither): limits, session and process group only; this stops mistakes, not code
  written to escape (it runs as the caller). Run the search as root or install bubblewrap.

Not guaranteed in any mode: limits on shared kernel resources beyond those rlimits (no
cgroup), protection against kernel exploits, and, without bubblewrap, against reading
world-readable files. The temporary directory must be reachable by the run's user id
(TMPDIR under /root is not).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_DRIVER = r'''
import resource, sys

def _cut_network():
    """Only where bubblewrap is not used (it has cut the network already)."""
    import ctypes, socket
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (0x10000000 | 0x40000000, 0x40000000):  # CLONE_NEWUSER | CLONE_NEWNET, NEWNET
        if libc.unshare(flags) == 0:
            break
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)

time_s, memory_bytes, output_bytes, processes, files, cut, uid = (int(v) for v in sys.argv[1:8])
if uid >= 0:  # under bubblewrap started as root: the run's own user id, no capabilities
    import os
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
if cut:
    _cut_network()
for limit, value in ((resource.RLIMIT_CPU, time_s), (resource.RLIMIT_AS, memory_bytes),
                     (resource.RLIMIT_FSIZE, output_bytes), (resource.RLIMIT_NPROC, processes),
                     (resource.RLIMIT_NOFILE, files), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
token = sys.stdin.readline().strip()
namespace = {"__name__": "__main__"}
for path in ("solution.py", "tests.py"):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    exec(compile(source, path, "exec"), namespace)
sys.stdout.write(token + "\n")
sys.stdout.flush()
'''

_KILL_ALL = """
import os, time
for _ in range(100):  # again while any is left (zombies not yet reaped count as left)
    try:
        os.kill(-1, 9)
    except ProcessLookupError:
        break
    time.sleep(0.002)
"""
_UID_BASE = 1 << 30  # run user ids: far above any system's or person's
_uids = itertools.count()
_uid_lock = threading.Lock()
_SIGNALED = 128  # bwrap exits with 128 + N when the code is killed by signal N


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run may use: wall-clock seconds, address space, output written, processes
    besides its own (0: it cannot start any) and open files."""

    time_s: float = 5.0
    memory_mb: int = 512
    output_kb: int = 256
    processes: int = 0
    open_files: int = 64


@dataclasses.dataclass(frozen=True)
class TestRun:
    """Whether the tests passed, and if not why: 'failed' (an exception or a failed
    assertion), 'timeout', 'killed' (a signal: CPU, memory or output limit, a crash) or
    'exited_early' (the tests never finished)."""

    passed: bool
    reason: str


def isolation() -> str:
    """'bubblewrap', 'uid' or 'session': how runs on this machine are isolated (see above)."""
    if _bwrap_works():
        return "bubblewrap"
    return "uid" if _uid_works() else "session"


def run_tests(code: str, tests: str, limits: Limits = Limits()) -> TestRun:
    """Runs `code` then `tests` (plain asserts) in a sandboxed child process."""
    mode = isolation()
    uid = _run_uid() if mode != "session" else None
    with tempfile.TemporaryDirectory(prefix="phi4_sandbox_") as folder:
        work = Path(folder)
        (work / "solution.py").write_text(code, encoding="utf-8")
        (work / "tests.py").write_text(tests, encoding="utf-8")
        (work / "driver.py").write_text(_DRIVER, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
        token = secrets.token_hex(16)
        bwrap = mode == "bubblewrap"
        drop_to = uid if bwrap and uid is not None else -1  # the driver drops to it itself
        as_user = None if bwrap else uid  # else the child starts as it
        args = [str(max(1, int(limits.time_s + 1))), str(limits.memory_mb << 20),
                str(limits.output_kb << 10), str(limits.processes), str(limits.open_files),
                str(int(not bwrap)), str(drop_to)]
        command = [sys.executable, "-I", "-S", str(work / "driver.py"), *args]
        with open(work / "stdout.txt", "wb") as stdout:
            if uid is not None:
                os.chown(work / "stdout.txt", uid, uid)
            child = subprocess.Popen(
                (_bwrap_command(work) if bwrap else []) + command, cwd=work,
                stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.DEVNULL, user=as_user,
                group=as_user,
                extra_groups=None if as_user is None else [],
                env={"PATH": "/usr/bin:/bin", "HOME": folder, "LANG": "C.UTF-8"},
                start_new_session=True)
            try:
                child.communicate(f"{token}\n".encode(), timeout=limits.time_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # under bubblewrap, its PID namespace ends with it
                _kill_all(child, None if bwrap else uid)
        return _outcome(child.returncode, timed_out, bwrap, work / "stdout.txt", token)


def _outcome(returncode: int, timed_out: bool, bwrap: bool, stdout: Path, token: str) -> TestRun:
    if timed_out:
        return TestRun(False, "timeout")
    if returncode < 0 or (bwrap and returncode > _SIGNALED):
        return TestRun(False, "killed")
    if returncode != 0:
        return TestRun(False, "failed")
    printed = stdout.read_bytes()[-64:].decode(errors="replace")
    if printed.splitlines()[-1:] != [token]:
        return TestRun(False, "exited_early")
    return TestRun(True, "passed")


def _run_uid() -> int | None:
    """A user id of this run's own when started as root (None otherwise): unique among the
    runs of this process and of others (the process id is part of it)."""
    if os.geteuid() != 0:
        return None
    with _uid_lock:
        serial = next(_uids) % (1 << 12)
    return _UID_BASE + ((os.getpid() % (1 << 18)) << 12) + serial


def _bwrap_command(work: Path) -> list[str]:
    """bubblewrap's arguments: the system's and Python's files read-only, `work` writable,
    `_ctypes` replaced by an empty file, everything else (network included) absent. As root
    it keeps only the capabilities to change user (the driver drops to the run's user id
    first thing, so the process limit binds); otherwise a user namespace maps the caller."""
    if os.geteuid() == 0:
        command = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                   "--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command = ["bwrap", "--unshare-all"]
    command += ["--die-with-parent", "--new-session", "--dev", "/dev", "--proc", "/proc"]
    for path in sorted({"/usr", "/bin", "/lib", "/lib64", "/lib32", sys.base_prefix,
                        sys.prefix}, key=os.path.islink):  # folders first, then links to them
        if os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            for parent in reversed(Path(path).parents[:-1]):  # reachable by the run's user
                command += ["--perms", "0755", "--dir", str(parent)]
            command += ["--ro-bind", path, path]
    for path in _ctypes_files():
        command += ["--ro-bind", os.devnull, path]
    return command + ["--bind", str(work), str(work), "--chdir", str(work)]


def _ctypes_files() -> list[str]:
    """The extension module ctypes needs, where this interpreter has one as a file."""
    spec = importlib.util.find_spec("_ctypes")
    return [spec.origin] if spec and spec.origin and os.path.isfile(spec.origin) else []


def _starts(wrap: bool) -> bool:
    """Whether the driver's interpreter starts as a run user id (when root), under
    bubblewrap if `wrap`."""
    uid = _run_uid()
    with tempfile.TemporaryDirectory(prefix="phi4_sandbox_") as folder:
        if uid is not None:
            os.chown(folder, uid, uid)
        drop = f"import os; os.setgroups([]); os.setgid({uid}); os.setuid({uid})"
        python = [sys.executable, "-I", "-S", "-c", drop if wrap and uid is not None else "pass"]
        command = _bwrap_command(Path(folder)) + python if wrap else python
        as_user = uid if not wrap else None
        try:
            probe = subprocess.run(command, capture_output=True, user=as_user, group=as_user,
                                   cwd=folder, timeout=60, check=False,
                                   extra_groups=None if as_user is None else [])
        except OSError:  # the interpreter is out of the run user's reach
            return False
    return probe.returncode == 0


@functools.cache
def _bwrap_works() -> bool:
    """Whether bubblewrap can start a sandbox here: it needs user namespaces (as root, the
    right to mount instead), which some kernels and containers refuse."""
    return shutil.which("bwrap") is not None and _starts(wrap=True)


@functools.cache
def _uid_works() -> bool:
    """Whether Python starts as a run user id: it must be installed where others can read."""
    return os.geteuid() == 0 and _starts(wrap=False)


def _kill_all(child: subprocess.Popen, uid: int | None) -> None:
    """Kills and reaps the child with its process group and, with a run user id, every
    process of that id (those that left the group with setsid)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
    if uid is not None:  # kill(-1) as that user reaches exactly its processes, until none
        subprocess.run([sys.executable, "-I", "-S", "-c", _KILL_ALL], user=uid, group=uid,
                       extra_groups=[], check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
