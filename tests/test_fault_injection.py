"""Fault injection on the toy run (CPU): kill -9, damaged and half-deleted checkpoints, failed
saves, bad records, Ctrl-C, user mistakes. Each test asserts the outcome (an identical resume,
a fallback, one clear error, counts) and that no file already written was altered.

One uninterrupted 6-step run (`straight`) is the reference every resume is compared with:
losses step by step, and the final parameters bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import grain
import pytest

from phi4_jax import config_base, stages
from phi4_jax.train import checkpoint, loop, metrics, workdir as workdir_lib
from phi4_jax.train import state as state_lib

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
OVERRIDES = {"train.steps": STEPS, "train.seq_len": 32, "train.global_batch": 8,
             "train.warmup_steps": 1, "log.every_steps": 1, "log.tensorboard": False,
             "log.progress_bar": False, "eval.every_steps": STEPS, "eval.batches": 0,
             "checkpoint.every_steps": 2, "checkpoint.keep": 3}
BAD_LINE = 20  # of 40 lines: fewer than the pre-flight reads, so it is found at start-up


def run_config(web_path: str, **overrides) -> ml_collections.ConfigDict:
    """The toy config of every run here: half synthetic, half a JSONL file with one bad line."""
    config = config_base.load_config("configs/pretrain.py", "toy")
    for dotted, value in {**OVERRIDES, **overrides}.items():
        section, key = dotted.split(".")
        config[section][key] = value
    config.data.sources.web.paths = web_path
    config.data.mix = {"synthetic": 0.5, "web": 0.5}
    return config


def write_web(path: Path) -> str:
    lines = [json.dumps({"text": f"Web page {i}: the quick brown fox jumps over the lazy dog."})
             for i in range(1, 41)]
    lines[BAD_LINE - 1] = '{"text": "a line cut short'
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def losses(history) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> SHA-1 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def final_params(workdir: Path, config) -> dict:
    run = state_lib.build_run(config)
    steps = checkpoint.intact_steps(workdir / "checkpoints")
    return jax.device_get(checkpoint.restore_params(workdir / "checkpoints" / str(steps[-1]),
                                                    run.abstract_params))


def assert_same_params(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def straight(made_once):
    """The uninterrupted run (made once per session): its workdir, history, config and final
    parameters."""
    def run(root):
        history = stages.run(run_config(write_web(root / "web.jsonl")), str(root / "run"))
        (root / "history.json").write_text(json.dumps(history, default=float))

    root = made_once("fault_injection_straight", run)
    config = run_config(str(root / "web.jsonl"))
    return {"workdir": root / "run", "history": json.loads((root / "history.json").read_text()),
            "config": config, "web": config.data.sources.web.paths,
            "params": final_params(root / "run", config)}


def checkpoints_up_to(straight, workdir: Path, last: int) -> None:
    """`workdir` holding the straight run's checkpoints up to step `last`."""
    for step in checkpoint.intact_steps(straight["workdir"] / "checkpoints"):
        if step <= last:
            shutil.copytree(straight["workdir"] / "checkpoints" / str(step),
                            workdir / "checkpoints" / str(step))


# ---------------------------------------------------------------- bad records, finished runs

@pytest.mark.slow
def test_straight_run_skips_the_bad_line_and_counts_it(straight, caplog):
    history = straight["history"]
    assert sorted(losses(history)) == list(range(1, STEPS + 1))
    assert [h for h in history if "loss" in h][-1]["bad_records/web"] == 1.0  # in the metrics
    assert checkpoint.intact_steps(straight["workdir"] / "checkpoints") == [2, 4, 6]  # keep=3
    before = snapshot(straight["workdir"])
    with caplog.at_level(logging.INFO):
        assert stages.run(straight["config"], str(straight["workdir"])) == []
    assert "is finished" in caplog.text and "--config.train.steps=N for some N > 6" in caplog.text
    assert snapshot(straight["workdir"]) == before


# ---------------------------------------------------------------- kill -9 and damaged checkpoints

KILL_DRIVER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_fault_injection as t
from phi4_jax import stages
from phi4_jax.train import checkpoint

commit = checkpoint.Checkpointer._write_manifest

def commit_or_die(self):  # kill -9 once step {step}'s files are written, before its commit
    if any(p.name.startswith("{step}.") for p in Path(self.directory).iterdir()):
        os.kill(os.getpid(), signal.SIGKILL)
    commit(self)

checkpoint.Checkpointer._write_manifest = commit_or_die
stages.run(t.run_config({web!r}), {workdir!r})
"""


@pytest.mark.slow
def test_kill_9_during_a_save_resumes_to_the_identical_run(tmp_path, straight):
    checkpoints_up_to(straight, tmp_path, 2)
    kept = snapshot(tmp_path / "checkpoints" / "2")
    code = KILL_DRIVER.format(tests=str(REPO / "tests"), step=4, web=straight["web"],
                              workdir=str(tmp_path))
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert leftovers == ["2", "4" + checkpoint.TMP_MARKER], leftovers

    resumed = stages.run(straight["config"], str(tmp_path))
    assert losses(resumed) == {s: losses(straight["history"])[s] for s in range(3, STEPS + 1)}
    assert_same_params(final_params(tmp_path, straight["config"]), straight["params"])
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if checkpoint.TMP_MARKER in p.name]
    assert not (tmp_path / "checkpoints.damaged").exists()
    assert snapshot(tmp_path / "checkpoints" / "2") == kept


def _truncate_largest_array(step_dir: Path) -> None:
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)


DAMAGE = {
    "truncated array file": (_truncate_largest_array, "bytes, .* when saved"),
    "missing data-iterator file": (lambda d: (d / "data" / "process_0-of-1.json").unlink(),
                                   "data/ holds no data-iterator file"),
    "missing OCDBT manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(),
                               "state/manifest.ocdbt is missing"),
    "empty step metadata": (lambda d: (d / checkpoint.STEP_METADATA).write_bytes(b""),
                            "_CHECKPOINT_METADATA is empty"),
    "empty array metadata": (lambda d: (d / "state" / "_METADATA").write_bytes(b""),
                             "state/_METADATA is empty"),
    "no commit marker": (lambda d: (d / checkpoint.COMMIT_MARKER).unlink(),
                         "no commit_success.txt"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.slow
def test_damaged_newest_checkpoint_is_moved_aside_and_the_intact_one_used(tmp_path, straight,
                                                                          damage, caplog):
    checkpoints_up_to(straight, tmp_path, STEPS)
    corrupt, problem = DAMAGE[damage]
    corrupt(tmp_path / "checkpoints" / "6")
    before = snapshot(tmp_path / "checkpoints")
    with caplog.at_level(logging.WARNING):
        checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3, every_steps=2)
    assert checkpointer.latest_step() == 4
    checkpointer.close()
    assert "Checkpoint at step 6 is damaged" in caplog.text and "resuming from step 4" in caplog.text
    assert any(re.search(problem, r.getMessage()) for r in caplog.records), caplog.text
    after = snapshot(tmp_path / "checkpoints")
    after.update({f"6/{k}": v for k, v in snapshot(tmp_path / "checkpoints.damaged" / "6").items()})
    assert after == before  # moved, not altered or deleted


@pytest.mark.slow
def test_resume_after_a_damaged_checkpoint_equals_the_straight_run(tmp_path, straight, caplog):
    checkpoints_up_to(straight, tmp_path, STEPS)
    (tmp_path / "checkpoints" / "6" / "data" / "process_0-of-1.json").unlink()
    with caplog.at_level(logging.INFO):
        history = stages.run(straight["config"], str(tmp_path))
    assert losses(history) == {s: losses(straight["history"])[s] for s in (5, 6)}
    assert_same_params(final_params(tmp_path, straight["config"]), straight["params"])
    assert f"{straight['web']}:{BAD_LINE} is not JSON" in caplog.text  # reported once per run
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Run ended")]
    assert len(summary) == 1 and "step 6 of 6" in summary[0], summary
    assert "bad records skipped: 1 in data.sources.web" in summary[0]


@pytest.mark.slow
def test_unfinished_saves_and_half_deleted_steps_are_cleaned(tmp_path, straight):
    """What kill -9 leaves mid-save (a temporary folder) or mid-deletion of a step older than
    the kept ones, and a partial copy with a step's name: only intact steps remain candidates,
    and only they count toward keep."""
    checkpoints_up_to(straight, tmp_path, STEPS)
    folder = tmp_path / "checkpoints"
    shutil.copytree(folder / "6", folder / "8.orbax-checkpoint-tmp")
    shutil.copytree(folder / "2", folder / "1")
    for path in sorted((folder / "1" / "state").rglob("*"))[:3]:  # a deletion that stopped
        if path.is_file():
            path.unlink()
    (folder / "9" / "state").mkdir(parents=True)  # a partial copy under a step's name
    before = snapshot(folder)
    checkpointer = checkpoint.Checkpointer(str(folder), keep=3, every_steps=2)
    assert checkpointer.manager.all_steps() == [2, 4, 6] and checkpointer.latest_step() == 6
    checkpointer.close()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["2", "4", "6"]
    assert sorted(p.name for p in (tmp_path / "checkpoints.damaged").iterdir()) == ["9"]
    assert {k: v for k, v in before.items() if k.split("/")[0] in ("2", "4", "6")} == snapshot(folder)


# ---------------------------------------------------------------- failed saves

def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                            str(path)], capture_output=True).returncode:
        pytest.skip("needs root and mount(8) to put the workdir on a small or read-only tmpfs")


def _save_toy(checkpointer, step: int, values: int):
    state = {"w": jax.random.normal(jax.random.key(step), (values,))}  # random: incompressible
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    return checkpointer.save(step, state, data, {"step": step}, force=True)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's threads
@pytest.mark.parametrize("failure", ["full disk", "read-only storage"])
@pytest.mark.slow
def test_a_failed_save_is_reported_at_once_with_the_previous_checkpoint_intact(tmp_path, failure):
    mount = tmp_path / "mnt"
    _mount_tmpfs(mount, "2m")
    try:
        checkpointer = checkpoint.Checkpointer(str(mount / "checkpoints"), keep=3, every_steps=1)
        _save_toy(checkpointer, 1, 1000)
        checkpointer.wait()
        kept = snapshot(mount / "checkpoints" / "1")
        if failure == "read-only storage":
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
            with pytest.raises(workdir_lib.WorkdirError, match="not writable .*Read-only file system"):
                workdir_lib.prepare(str(mount))  # a new run refuses it before building anything
        message = (rf"saving the checkpoint of step 2 in {mount}/checkpoints failed \(.*"
                   r"(No space left on device|Read-only file system).*the checkpoint at step 1 is "
                   r"intact and the run resumes from it")
        start = time.monotonic()
        with pytest.raises(checkpoint.CheckpointSaveError, match=message):
            _save_toy(checkpointer, 2, 1_000_000)  # 4 MB
            while True:  # what the loop does after every step; no later save is needed
                checkpointer.check()
                assert time.monotonic() - start < 30, "the failed save was not reported"
                time.sleep(0.05)
        checkpointer.close()
        assert snapshot(mount / "checkpoints" / "1") == kept
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.slow
def test_a_run_whose_save_fails_stops_with_one_clear_error(tmp_path, straight):
    mount = tmp_path / "mnt"
    _mount_tmpfs(mount, "3m")  # the step-2 checkpoint (~1.7 MB) fits, a second does not
    try:
        workdir = mount / "run"
        checkpoints_up_to(straight, workdir, 2)
        kept = snapshot(workdir / "checkpoints" / "2")
        with pytest.raises(checkpoint.CheckpointSaveError,
                           match=r"step 4 .* failed \(.*No space left on device.*step 2 is intact"):
            stages.run(straight["config"], str(workdir))
        assert snapshot(workdir / "checkpoints" / "2") == kept
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ---------------------------------------------------------------- Ctrl-C

def _interrupt_at(monkeypatch, step: int, times: int) -> None:
    advance = metrics.MetricsWriter.advance

    def advance_then_interrupt(self, at):
        advance(self, at)
        if at == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(metrics.MetricsWriter, "advance", advance_then_interrupt)


@pytest.mark.slow
def test_ctrl_c_saves_and_resumes_exactly(tmp_path, straight, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    checkpoints_up_to(straight, tmp_path, 2)
    _interrupt_at(monkeypatch, 3, times=1)
    first = stages.run(straight["config"], str(tmp_path))
    assert max(losses(first)) == 3 and checkpoint.intact_steps(tmp_path / "checkpoints")[-1] == 3
    monkeypatch.undo()
    second = stages.run(straight["config"], str(tmp_path))
    assert {**losses(first), **losses(second)} == {s: losses(straight["history"])[s]
                                                   for s in range(3, STEPS + 1)}
    assert_same_params(final_params(tmp_path, straight["config"]), straight["params"])
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handler is gone


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once_without_saving(tmp_path, straight, monkeypatch):
    checkpoints_up_to(straight, tmp_path, 2)
    before = snapshot(tmp_path / "checkpoints")
    compile_steps = loop.compile_steps

    def interrupted_twice(*args):
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a checkpoint after the step
        os.kill(os.getpid(), signal.SIGINT)  # the second must not wait for it
        return compile_steps(*args)

    monkeypatch.setattr(loop, "compile_steps", interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        stages.run(straight["config"], str(tmp_path))
    assert snapshot(tmp_path / "checkpoints") == before


# ---------------------------------------------------------------- user mistakes, one line each

@pytest.mark.parametrize("args, message", [
    (["--config.train.learning_rate=1e-3"],
     "error: --config.train.learning_rate: no such key; did you mean --config.train.lr?"),
    (["--config.data.mix.web=0.5"],
     "error: --config.data.mix.web: data.mix has no entry 'web' to override; a new source joins "
     "the mix as a whole dict: --config.data.mix=\"{'code': 0.4, 'synthetic': 0.6, 'web': 0.5}\""),
    (["--config.data.mix={'web': 1.0}", "--config.data.sources.web.paths=/nonexistent/*.jsonl"],
     "error: data.sources.web.paths: glob '/nonexistent/*.jsonl' matches no files"),
])
@pytest.mark.slow
def test_user_mistakes_are_one_line_before_anything_is_built(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "phi4_jax.main", "--config=configs/pretrain.py:toy",
         f"--workdir={tmp_path}/run", *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env=subprocess_env())
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_workdir_that_is_a_file_is_refused_first(tmp_path, straight, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(loop, "build_run", lambda *a, **k: pytest.fail("built a run"))
    with pytest.raises(workdir_lib.WorkdirError, match=f"--workdir={tmp_path}/file is a file, not a folder"):
        stages.run(straight["config"], str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "not a folder"


def test_iterator_state_read_back_from_json_resumes_the_same_batches(tmp_path):
    """grain's packer compares its saved slices with tuples, JSON gives lists: the restore
    repairs them (here the web source's packer holds no remainder at batch 4)."""
    from phi4_jax.data import pipeline

    config = run_config(write_web(tmp_path / "web.jsonl"))
    kwargs = dict(seq_len=32, batch_size=8)
    reference = pipeline.make_train_iterator(config.data, **kwargs)
    expected = [next(reference)["inputs"] for _ in range(10)][4:]
    first = pipeline.make_train_iterator(config.data, **kwargs)
    for _ in range(4):
        next(first)
    saved = json.dumps(first.get_state()).encode()  # as grain's checkpoint handler writes it
    resumed = pipeline.make_train_iterator(config.data, **kwargs)
    checkpoint._TupleSlicesRestore(resumed).set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)
    for iterator in (reference, first, resumed):
        iterator.close()


# ---------------------------------------------------------------- same-size damage (checksums)

def _array_files(step_dir: Path) -> list[Path]:
    """Every data file of a step's arrays (the OCDBT `d/` files)."""
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def _garbage(path: Path, where: float, size: int = 4096) -> None:
    """`size` random bytes written over the file at `where` (0: start, 1: end), its size kept."""
    length = path.stat().st_size
    size = min(size, length)
    offset = min(int(length * where), length - size)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(size)
        new = os.urandom(size)
        while new == old:
            new = os.urandom(size)
        f.seek(offset)
        f.write(new)
    assert path.stat().st_size == length


@pytest.mark.slow
def test_same_size_garbage_anywhere_in_any_array_file_is_found(tmp_path, straight):
    source = straight["workdir"] / "checkpoints" / "6"
    files = _array_files(source)
    assert len(files) >= 2, files
    assert checkpoint.damage(source, verify=True) is None
    for index in range(len(files)):
        for where in (0.0, 0.5, 1.0):
            step = tmp_path / f"{index}-{where}" / "6"
            shutil.copytree(source, step)
            target = _array_files(step)[index]
            _garbage(target, where)
            assert checkpoint.damage(step) is None  # sizes alone miss it
            problem = checkpoint.damage(step, verify=True)
            assert problem and problem.startswith(str(target.relative_to(step))), problem
            assert "when saved (its content changed)" in problem
            shutil.rmtree(step.parent)


@pytest.mark.slow
def test_same_size_damage_falls_back_to_the_older_step_and_resumes_identically(tmp_path, straight,
                                                                              caplog):
    checkpoints_up_to(straight, tmp_path, 4)
    shutil.copytree(straight["workdir"] / "checkpoints" / "4", tmp_path / "older" / "4")
    largest = max(_array_files(tmp_path / "checkpoints" / "4"), key=lambda p: p.stat().st_size)
    _garbage(largest, 0.5)
    damaged = snapshot(tmp_path / "checkpoints" / "4")
    checkpoints = tmp_path / "checkpoints"
    for step in (2,):
        assert checkpoint.damage(checkpoints / str(step), verify=True) is None
    with caplog.at_level(logging.INFO):
        history = stages.run(straight["config"], str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == 1 and "Checkpoint at step 4 is damaged (state/" in lines[0], lines
    assert "has checksum" in lines[0] and "resuming from step 2" in lines[0]
    assert "\n" not in lines[0]
    assert losses(history) == {s: losses(straight["history"])[s] for s in range(3, STEPS + 1)}
    assert_same_params(final_params(tmp_path, straight["config"]), straight["params"])
    assert snapshot(tmp_path / "checkpoints.damaged" / "4") == damaged  # moved, not altered


@pytest.mark.slow
def test_restored_parameters_must_be_finite(tmp_path, straight, monkeypatch):
    checkpoints_up_to(straight, tmp_path, 4)
    restore = checkpoint.ocp.CheckpointManager.restore

    def restore_with_a_nan(self, step, args=None):  # damage that no checksum saw (saved so)
        restored = restore(self, step, args=args)
        params = restored.state.params
        params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(float("nan"))
        return restored

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", restore_with_a_nan)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"the checkpoint at step 4 .* holds non-finite values \(NaN or Inf\) "
                             r"in parameter final_norm/scale; move it aside"):
        stages.run(straight["config"], str(tmp_path))


@pytest.mark.slow
def test_the_nan_message_calls_a_checkpoint_intact_only_when_verified(tmp_path, straight):
    checkpoints_up_to(straight, tmp_path, 4)
    folder = tmp_path / "checkpoints"
    checkpointer = checkpoint.Checkpointer(str(folder), keep=3, every_steps=2)
    nan = {"loss": float("nan")}
    try:
        with pytest.raises(loop.TrainingDivergedError,
                           match=r"The newest checkpoint \(4\) is intact \(its checksums verified"):
            loop._check_finite(nan, 5, checkpointer)
        manifest = folder / "4" / checkpoint.MANIFEST
        saved = manifest.read_text()
        sizes = {rel: e["bytes"] for rel, e in json.loads(saved)["files"].items()}
        manifest.write_text(json.dumps(sizes))  # as saved before checksums existed
        with pytest.raises(loop.TrainingDivergedError, match=r"\(4\) has no checksums .* not verified"):
            loop._check_finite(nan, 5, checkpointer)
        manifest.write_text(saved)
        _garbage(_array_files(folder / "4")[0], 0.5)  # damaged after the run started
        with pytest.raises(loop.TrainingDivergedError,
                           match=r"\(4\) is damaged \(state/.* has checksum .*\) and will be moved aside"):
            loop._check_finite(nan, 5, checkpointer)
    finally:
        checkpointer.close()


# ---------------------------------------------------------------- one line per failure (CLI)

CLI_RUN = ["--config.train.steps=6", "--config.train.seq_len=32", "--config.train.global_batch=8",
           "--config.train.warmup_steps=1", "--config.log.every_steps=1",
           "--config.log.tensorboard=False", "--config.log.progress_bar=False",
           "--config.eval.every_steps=6", "--config.eval.batches=0",
           "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3"]


def _main(workdir: Path, *args: str, config: str = "configs/pretrain.py:toy", **kwargs):
    return subprocess.Popen([sys.executable, "-m", "phi4_jax.main", f"--config={config}",
                             f"--workdir={workdir}", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _one_error_line(stderr: str, workdir: Path | None) -> str:
    """The single `error:` line of a run's console, which has no traceback and no orbax or
    asyncio lines; it is also the last error in the workdir's log when there is one."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-5000:]
    assert "Traceback" not in stderr, stderr[-5000:]
    for noise in ("future.py", "base_events.py", "checkpoint_manager.py", "Event loop is closed",
                  "Task exception"):
        assert noise not in stderr, stderr[-5000:]
    if workdir is not None:
        log = (workdir / "logs" / "process_0.log").read_text()
        assert errors[0] in log
    return errors[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_is_one_line_on_the_console_and_the_noise_goes_to_the_log(tmp_path):
    mount = tmp_path / "mnt"
    # tiny, not toy: one checkpoint (~95 MB) fits and a second does not, and its large writes
    # fail with room left for the log file's lines (toy's 80 KB writes fill the disk)
    _mount_tmpfs(mount, "150m")
    try:
        child = _main(mount / "run", *CLI_RUN, config="configs/pretrain.py:tiny")
        _, stderr = child.communicate(timeout=600)
        assert child.returncode == 1, stderr[-3000:]
        line = _one_error_line(stderr, mount / "run")
        assert "failed (ValueError: RESOURCE_EXHAUSTED" in line and "is intact" in line, line
        log = (mount / "run" / "logs" / "process_0.log").read_text()
        assert "Task exception was never retrieved" in log or "Event loop is closed" in log \
            or "_SignalingThread.run() raised" in log  # the noise is kept, in the log
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_log_file_that_cannot_be_written_prints_nothing_on_the_console(tmp_path, capsys):
    """On a full disk the log file's writes fail too: no traceback per lost record."""
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    metrics.log_to_file(str(tmp_path / "logs" / "process_0.log"))
    handler = logging.getLogger().handlers[-1]
    try:
        handler.stream = FullDisk()
        logging.getLogger().error("Task exception was never retrieved")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_missing_config_file_is_one_line_before_anything_is_created(tmp_path):
    child = _main(tmp_path / "run", config="configs/nope.py:tiny")
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 1, stderr
    line = _one_error_line(stderr, None)
    assert line.startswith("error: --config=configs/nope.py:tiny: no such file 'configs/nope.py'")
    assert "pretrain.py" in line and "sft.py" in line  # the choices
    assert not (tmp_path / "run").exists()  # checked before the workdir (and the runtime)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty file", "a directory"])
def test_bad_data_paths_are_named_by_file(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    if case == "empty file":
        (data / "web.jsonl").write_text("")
        paths, message = str(data / "web.jsonl"), f"{data / 'web.jsonl'} is empty (0 bytes)"
    else:
        paths, message = str(data), f"data.sources.web.paths: {str(data)!r} is a directory"
    child = _main(tmp_path / "run", "--config.data.mix={'web': 1.0}",
                  f"--config.data.sources.web.paths={paths}")
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 1, stderr[-3000:]
    line = _one_error_line(stderr, tmp_path / "run" if (tmp_path / "run" / "logs").exists() else None)
    assert message in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_signal_handler_only_sets_a_flag():
    """A handler that logs re-enters the log file's writer when the signal lands inside a write;
    here it lands inside every write: the handler must not write at all."""
    depth, deepest = [0], [0]

    class Interrupted(logging.Handler):
        def emit(self, record):
            depth[0] += 1
            deepest[0] = max(deepest[0], depth[0])
            try:
                if record.getMessage() == "writing":
                    os.kill(os.getpid(), signal.SIGINT)  # delivered before this write ends
                    for _ in range(1000):
                        pass
            finally:
                depth[0] -= 1

    handler, root = Interrupted(), logging.getLogger()
    root.addHandler(handler)
    stop = loop._StopSignal()
    try:
        logging.warning("writing")
        assert stop.received == "SIGINT"
        assert deepest[0] == 1  # no write began inside another
    finally:
        stop.restore()
        root.removeHandler(handler)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_on_the_command_line_is_one_line_without_traceback(tmp_path, attempt):
    child = _main(tmp_path / "run", *CLI_RUN[1:], "--config.train.steps=100000")
    log = tmp_path / "run" / "logs" / "process_0.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and f"step {1 + attempt}:" in log.read_text()):
        assert child.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "reentrant" not in stderr, stderr[-3000:]
    assert re.search(r"SIGINT received: saving a checkpoint at step \d+", stderr), stderr[-3000:]
    stopped = re.search(r"Stopped at step (\d+) \(SIGINT\); checkpoint saved", stderr)
    assert stopped, stderr[-3000:]
    assert checkpoint.intact_steps(tmp_path / "run" / "checkpoints")[-1] == int(stopped.group(1))


@pytest.mark.slow
def test_init_from_a_damaged_checkpoint_is_refused_at_start_up(tmp_path, straight):
    from phi4_jax.config_base import ConfigError
    from phi4_jax.train import initial_params

    step = tmp_path / "6"
    shutil.copytree(straight["workdir"] / "checkpoints" / "6", step)
    run = state_lib.build_run(straight["config"])
    source = initial_params.locate(str(step))
    initial_params.check(source, run.abstract_params, run.model_cfg)  # intact: accepted
    _garbage(_array_files(step)[-1], 0.5)
    with pytest.raises(ConfigError, match=rf"init_from='{step}' is a damaged checkpoint \(state/"):
        initial_params.check(source, run.abstract_params, run.model_cfg)
