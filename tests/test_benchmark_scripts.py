"""Every benchmark script at least parses: most run only on a GPU or for minutes, so a syntax
error in one (a bad merge broke train_step.py once) would otherwise surface on the device."""

import pathlib
import subprocess

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_python_script_compiles(path):
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.sh")), ids=lambda p: p.name)
def test_shell_script_parses(path):
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
