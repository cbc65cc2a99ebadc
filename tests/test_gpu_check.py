"""The GPU check's scripts, as far as a CPU runs them: benchmarks/gpu_check.sh in its dry mode
keeps its time budget, cuts and skips steps by it and still ends with a summary;
benchmarks/vs_transformers.py writes every row the moment it is measured, with the
checkpointing both sides ran with."""

import functools
import importlib.util
import os
import pathlib
import subprocess
import sys
import time
import types

import pytest
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = ["kernels-cudnn", "trainer-125m", "14b-4l@4k-full", "14b-4l@4k-none", "kernels-other",
         "1b@4k-full", "14b-4l@16k-full"]


def _summary_rows(path: pathlib.Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in lines if line.startswith("| ") and not line.startswith("| step")]


@pytest.mark.slow
def test_dry_run_keeps_its_budget_cuts_skips_and_summarizes(tmp_path):
    budget = 20
    env = dict(os.environ, DRY="1", BUDGET_S=str(budget), STEP_BUDGETS="kernels-other=1")
    began = time.monotonic()
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=budget + 60, check=False)
    took = time.monotonic() - began
    assert took <= budget + 5, done.stderr  # + the summary's own second or two
    rows = _summary_rows(tmp_path / "summary.md")
    assert [r[0] for r in rows] == STEPS
    assert done.stdout.splitlines()[0].startswith(f"## Steps (budget {budget} s")
    statuses = {r[0]: r[2] for r in rows}
    assert all(s in ("ok", "cut at budget") or s.startswith(("failed", "skipped"))
               for s in statuses.values())
    # The plan is sized for 480 s; scaled to 20 s its 705 s of budgets cannot all run.
    assert any(s == "cut at budget" or s.startswith("skipped") for s in statuses.values())
    if not statuses["kernels-other"].startswith("skipped"):  # 1 s: cut before it measured
        assert statuses["kernels-other"] == "cut at budget"
    # Every result line a step wrote is kept, cut or not, and counted in the summary.
    results = (tmp_path / "results.md").read_text().splitlines()
    assert sum(int(r[4]) for r in rows) == len(results)
    for name, _, status, _, lines in rows:
        if status == "cut at budget" and name.startswith("14b-4l@4k"):
            assert int(lines) > 0  # what it wrote before the cut (its heading at least)


@functools.cache
def _vs_transformers():
    """The script as a module, loaded once (it defines absl flags)."""
    spec = importlib.util.spec_from_file_location("vs_transformers",
                                                  ROOT / "benchmarks" / "vs_transformers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rows_are_written_as_measured_with_their_checkpointing(tmp_path, monkeypatch):
    """A run stopped after two contenders keeps their two rows (and its header)."""
    vs = _vs_transformers()
    out = tmp_path / "results.md"
    flags.FLAGS(["vs_transformers", "--dry_run", f"--write={out}",
                 "--checkpointing=full,none", "--contenders=phi4_jax,torch_compile"])
    measured = []

    def run_one(contender, shape, checkpointing):
        if len(measured) == 2:
            raise KeyboardInterrupt  # the step's timeout
        measured.append((contender, checkpointing))
        return vs.Result(contender, shape, checkpointing, [2.0, 2.0], notes=contender)

    monkeypatch.setattr(vs, "run_one", run_one)
    monkeypatch.setattr(vs, "_device_kind", lambda: ("cpu", "cpu"))
    try:
        with pytest.raises(KeyboardInterrupt):
            vs.main(["vs_transformers"])
    finally:
        flags.FLAGS.unparse_flags()
    lines = out.read_text().splitlines()
    assert "| shape | checkpointing | contender |" in "\n".join(lines)
    rows = [line for line in lines if line.startswith("| tiny@64")]
    assert rows == ["| tiny@64 | full | phi4_jax | 2.000 | 64 | n/a |  | n/a | phi4_jax |",
                    "| tiny@64 | full | torch_compile | 2.000 | 64 | n/a | 1.00 | n/a | "
                    "torch_compile |"]
    assert measured == [("phi4_jax", "full"), ("torch_compile", "full")]


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_phi4_jax_runs_with_the_checkpointing_of_its_row(checkpointing):
    assert (_vs_transformers()._pretrain_config("tiny@64", checkpointing).model.remat_policy
            == checkpointing)


def test_profile_table_lists_the_costliest_events_per_step(tmp_path):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    vs = _vs_transformers()
    square = jax.jit(lambda a: (a @ a).sum())
    x, held = jnp.ones((128, 128)), {}
    vs._profile_table(lambda: held.update(out=square(x)), lambda: held["out"].block_until_ready(),
                      tmp_path / "ops.md", steps=2, top=5)
    rows = (tmp_path / "ops.md").read_text().splitlines()
    assert rows[0] == "| process | event | ms per step | calls per step |" and len(rows) == 7
    times = [float(row.split("|")[3]) for row in rows[2:]]
    assert times == sorted(times, reverse=True) and times[0] > 0


@pytest.mark.parametrize("count, faults_per_step, steps", [
    (0, [10**6] * 9, 0),          # no warm-up asked: none, however the heap grows
    (2, [0] * 9, 2),              # a settled heap: just the steps asked for
    (1, [10**6, 10**6, 0], 3),    # grows twice, then settles: two more steps
    (2, [10**6] * 9, 5),          # never settles: SETTLE_STEPS more at most
])
def test_warm_up_adds_steps_only_while_a_step_faults_in_new_memory(monkeypatch, count,
                                                                   faults_per_step, steps):
    vs = _vs_transformers()
    assert vs.SETTLE_STEPS == 3
    total = {"faults": 0, "steps": 0}

    def step():
        total["faults"] += faults_per_step[total["steps"]]
        total["steps"] += 1

    monkeypatch.setattr(vs.resource, "getrusage",
                        lambda _: types.SimpleNamespace(ru_minflt=total["faults"]))
    monkeypatch.setattr(vs.resource, "getpagesize", lambda: 4096)
    assert vs._warm_up(step, lambda: None, count) == steps == total["steps"]
