"""Code written to escape the sandbox (`phi4_jax.search.sandbox`): each attempt is part of the
candidate's code, and the run passes only when the attempt was blocked or contained.

What holds depends on the machine (`sandbox.isolation()`): an escape that a mode does not
claim to stop is skipped there with the reason, never passed silently.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi4_jax.search import sandbox
from phi4_jax.search.sandbox import Limits, run_tests

REPO = Path(__file__).resolve().parents[1]
DOUBLE = "def double(x):\n    return 2 * x\n"
TESTS = "assert double(2) == 4\n"
MODE = sandbox.isolation()

pytestmark = pytest.mark.slow


def needs(*modes: str):
    return pytest.mark.skipif(MODE not in modes, reason=f"isolation here is {MODE!r}; this "
                              f"escape is stopped only under {' or '.join(modes)}")


def processes_with(marker: str) -> list[int]:
    """The processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # it ended while being read
            continue
    return found


def sleeper(marker: str) -> str:
    """Code that starts `/bin/sleep <marker>` (a number no other process uses)."""
    return f"os.execv('/bin/sleep', ['/bin/sleep', '{marker}'])"


def unique_seconds() -> str:
    return f"{30 + secrets.randbelow(10 ** 6) / 10 ** 7:.7f}"


@needs("bubblewrap", "uid")
def test_code_cannot_kill_the_process_that_runs_it():
    escape = ("import os, signal\n"
              "for pid in (os.getppid(), {caller}):\n"
              "    try:\n"
              "        os.kill(pid, signal.SIGTERM)\n"
              "    except OSError:\n"
              "        pass\n") + DOUBLE
    caller = ("import os, sys\nfrom phi4_jax.search.sandbox import run_tests\n"
              f"code = {escape!r}.format(caller=os.getpid())\n"
              f"print('survived', run_tests(code, {TESTS!r}).passed)\n")
    result = subprocess.run([sys.executable, "-c", caller], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["survived", "True"], result.stdout


@pytest.mark.parametrize("target", ["caller's folder", "/tmp"])
def test_code_cannot_write_outside_its_folder(tmp_path, target):
    if target == "/tmp" and MODE != "bubblewrap":
        pytest.skip(f"isolation here is {MODE!r}: world-writable folders stay writable")
    if MODE == "session":
        pytest.skip("isolation here is 'session': the code runs as the caller")
    folder = tmp_path if target == "caller's folder" else Path("/tmp")
    path = folder / f"phi4_escape_{secrets.token_hex(8)}.txt"
    escape = (f"try:\n    open({str(path)!r}, 'w').write('escaped')\nexcept OSError:\n"
              f"    pass\n") + DOUBLE
    assert run_tests(escape, TESTS).passed
    assert not path.exists()


@needs("bubblewrap")
def test_code_cannot_read_the_machines_files():
    escape = ("try:\n    seen = open('/etc/passwd').read()\nexcept OSError:\n    seen = ''\n"
              "try:\n    import os\n    seen += ' '.join(os.listdir('/home') + os.listdir('/root'))\n"
              "except OSError:\n    pass\n") + DOUBLE
    assert run_tests(escape, TESTS + "assert 'root:' not in seen, seen\n").passed


@needs("bubblewrap")
def test_code_cannot_load_ctypes():
    escape = "try:\n    import ctypes\n    loaded = True\nexcept ImportError:\n    loaded = False\n"
    assert run_tests(escape + DOUBLE, TESTS + "assert not loaded\n").passed


@needs("bubblewrap", "uid")
def test_a_daemon_started_by_the_code_does_not_outlive_the_run():
    marker = unique_seconds()
    escape = ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        {sleeper(marker)}\n    os._exit(0)\n") + DOUBLE
    assert run_tests(escape, TESTS, Limits(processes=4)).passed
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


@needs("bubblewrap", "uid")
def test_a_fork_bomb_is_bounded_by_the_process_limit_and_killed():
    marker = unique_seconds()
    bomb = ("import os\nforked = 0\nfor _ in range(300):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n"
            f"        {sleeper(marker)}\n    forked += 1\n") + DOUBLE
    start = time.monotonic()
    assert run_tests(bomb, TESTS + "assert forked <= 16, forked\n",
                     Limits(time_s=5.0, processes=16)).passed
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []
