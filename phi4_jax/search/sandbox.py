"""Running a model's Python code against unit tests in a child process that cannot hang the
search: a wall-clock time limit (the process group is killed), CPU, memory, file-size and
process-count limits, no network, a fresh temporary working directory and a clean
environment. A timeout, a crash, a limit hit or an early exit is a failure.

The child is a fresh interpreter (`python -I -S`, no site-packages) that runs `_DRIVER`: it
cuts the network by entering new user and network namespaces where the kernel allows it
(with only a downed loopback inside) and, in any case, replaces the socket constructors; then
it sets its resource limits, executes the candidate and then the tests, and only after both
ran prints a one-time token it read from stdin before the candidate started, so code that
exits early with status 0 does not pass. This guards against mistakes and runaway code, not
against code written to escape (it runs as the same user; the process-count limit does not
bind root): run the search as an unprivileged user, or in a container, for hostile code.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_DRIVER = r'''
import ctypes, resource, socket, sys

def _cut_network():
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (0x10000000 | 0x40000000, 0x40000000):  # CLONE_NEWUSER | CLONE_NEWNET, NEWNET
        if libc.unshare(flags) == 0:
            break
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)

_cut_network()
time_s, memory_bytes, output_bytes = (int(v) for v in sys.argv[1:4])
for limit, value in ((resource.RLIMIT_CPU, time_s), (resource.RLIMIT_AS, memory_bytes),
                     (resource.RLIMIT_FSIZE, output_bytes), (resource.RLIMIT_NPROC, 0),
                     (resource.RLIMIT_CORE, 0)):
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


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run may use: wall-clock seconds, address space and output written."""

    time_s: float = 5.0
    memory_mb: int = 512
    output_kb: int = 256


@dataclasses.dataclass(frozen=True)
class TestRun:
    """Whether the tests passed, and if not why: 'failed' (an exception or a failed
    assertion), 'timeout', 'killed' (a signal: CPU, memory or output limit, a crash) or
    'exited_early' (the tests never finished)."""

    passed: bool
    reason: str


def run_tests(code: str, tests: str, limits: Limits = Limits()) -> TestRun:
    """Runs `code` then `tests` (plain asserts) in a sandboxed child process."""
    with tempfile.TemporaryDirectory(prefix="phi4_sandbox_") as folder:
        work = Path(folder)
        (work / "solution.py").write_text(code, encoding="utf-8")
        (work / "tests.py").write_text(tests, encoding="utf-8")
        (work / "driver.py").write_text(_DRIVER, encoding="utf-8")
        token = secrets.token_hex(16)
        args = [str(max(1, int(limits.time_s + 1))), str(limits.memory_mb << 20),
                str(limits.output_kb << 10)]
        with open(work / "stdout.txt", "wb") as stdout:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", str(work / "driver.py"), *args], cwd=work,
                stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", "HOME": folder, "LANG": "C.UTF-8"},
                start_new_session=True)
            try:
                child.communicate(f"{token}\n".encode(), timeout=limits.time_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(child)
        if timed_out:
            return TestRun(False, "timeout")
        if child.returncode < 0:
            return TestRun(False, "killed")
        if child.returncode != 0:
            return TestRun(False, "failed")
        printed = (work / "stdout.txt").read_bytes()[-64:].decode(errors="replace")
        if printed.splitlines()[-1:] != [token]:
            return TestRun(False, "exited_early")
        return TestRun(True, "passed")


def _kill_group(child: subprocess.Popen) -> None:
    """Kills the child and anything it started in its session, then reaps the child."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
