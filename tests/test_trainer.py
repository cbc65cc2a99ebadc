"""End to end on the built-in data: learning, resume onto another mesh, preemption, divergence,
memory refusal. (Resuming to the identical run is test_fault_injection's: after Ctrl-C, kill -9
and a damaged checkpoint, bit for bit.)"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from phi4_jax import config_base, stages
from phi4_jax.train import loop, memory
from phi4_jax.train import state as state_lib
from phi4_jax.train.checkpoint import Checkpointer, saved_meta

ROOT = Path(__file__).resolve().parents[1]


def _load(arg=None):
    return config_base.load_config("configs/pretrain.py", arg)


def _toy(steps, **train):
    c = _load("toy")
    c.train.update(**{"steps": steps, "seq_len": 64, "global_batch": 8, "warmup_steps": 2,
                      **train})
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=steps, batches=1)
    c.checkpoint.update(every_steps=4)  # asynchronous saves, as users run them
    return c


def _losses(history):
    return [h["loss"] for h in history if "loss" in h]


def _final_params(workdir, config):
    run = state_lib.build_run(config)
    checkpointer = Checkpointer(f"{workdir}/checkpoints", keep=3, every_steps=1)
    from phi4_jax.data import pipeline
    it = pipeline.make_train_iterator(config.data, seq_len=config.train.seq_len,
                                      batch_size=config.train.global_batch)
    state, _ = checkpointer.restore(checkpointer.latest_step(), run.abstract_state, it)
    checkpointer.close()
    return jax.device_get(state.params)


@pytest.mark.slow
def test_loss_falls_on_builtin_data(tmp_path):
    history = stages.run(_toy(30, lr=3e-3), str(tmp_path))
    losses = _losses(history)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals and np.isfinite(evals[-1])
    assert Checkpointer(f"{tmp_path}/checkpoints", keep=3, every_steps=4).latest_step() == 30


@pytest.mark.slow
def test_resume_onto_a_different_mesh(tmp_path):
    first_mesh = _toy(6)
    first_mesh.mesh.update(data=1, fsdp=8, tensor=1)
    stages.run(first_mesh, str(tmp_path / "a"), stop_at_step=3)
    other_mesh = _toy(6)
    other_mesh.mesh.update(data=2, fsdp=2, tensor=2)
    resumed = _losses(stages.run(other_mesh, str(tmp_path / "a")))
    straight = _losses(stages.run(_toy(6), str(tmp_path / "b")))
    np.testing.assert_allclose(resumed, straight[3:], rtol=1e-4)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    stages.run(_toy(12), str(tmp_path), stop_at_step=4)
    good = _final_params(tmp_path, _toy(12))
    exploding = _toy(12, lr=1e9, grad_clip=0.0, warmup_steps=0)
    with pytest.raises(loop.TrainingDivergedError, match="intact"):
        stages.run(exploding, str(tmp_path))
    assert Checkpointer(f"{tmp_path}/checkpoints", keep=3, every_steps=4).latest_step() == 4
    jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path, _toy(12)), good)


def test_14b_on_one_cpu_is_refused_before_compiling():
    config = _load()  # the paper's phi4-14b recipe
    config.mesh.update(data=1, fsdp=1, tensor=1)
    start = time.perf_counter()
    with pytest.raises(memory.MemoryBudgetError, match="model.remat_policy|mesh.fsdp"):
        state_lib.build_run(config, jax.devices()[:1])
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_main_refuses_14b_on_cpu_with_one_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "phi4_jax.main", "--config=configs/pretrain.py",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 1
    assert result.stderr.count("error: phi4-14b") == 1, result.stderr
    assert "--config.mesh.fsdp=" in result.stderr and "--config.train.microbatches=" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "phi4_jax.main", "--config=configs/pretrain.py:toy",
               f"--workdir={tmp_path}", "--config.train.steps=100000",
               "--config.train.seq_len=64", "--config.log.every_steps=1",
               "--config.log.progress_bar=False", "--config.checkpoint.every_steps=100000"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    deadline = time.time() + 240
    for line in process.stdout:
        output.append(line)
        if "step 2:" in line:
            process.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(output)
    output.extend(process.stdout)
    assert process.wait(timeout=120) == 0, "".join(output)
    steps = Checkpointer(f"{tmp_path}/checkpoints", keep=3, every_steps=1).latest_step()
    assert steps is not None and steps >= 2, "".join(output)


@pytest.mark.slow
def test_early_stopping_at_an_accuracy_saves_that_step_and_ends_the_run(tmp_path, monkeypatch):
    from phi4_jax.stages import evaluation
    accuracies = iter([0.1, 0.3, 0.5, 0.9])
    monkeypatch.setattr(evaluation, "greedy_accuracy",
                        lambda run, params: {"accuracy": next(accuracies)})
    config = _toy(20)
    config.eval.update(every_steps=2, accuracy_problems=8, stop_at_accuracy=0.4)
    history = stages.run(config, str(tmp_path))
    assert [h["step"] for h in history if "accuracy" in h] == [2, 4, 6]
    assert len(_losses(history)) == 6
    checkpoints = Checkpointer(f"{tmp_path}/checkpoints", keep=3, every_steps=4)
    assert checkpoints.latest_step() == 6
    assert saved_meta(f"{tmp_path}/checkpoints/6")["stopped_at_accuracy"] == 0.5
    checkpoints.close()
    assert stages.run(config, str(tmp_path)) == []  # finished: no step, no eval
    assert next(accuracies) == 0.9


def test_zero_steps_evaluates_the_starting_checkpoint_and_writes_nothing(tmp_path):
    trained = stages.run(_toy(1, warmup_steps=1), str(tmp_path / "trained"))
    measured = [h["eval_loss"] for h in trained if "eval_loss" in h]  # at step 1, as it saved it
    config = _toy(1, warmup_steps=1)
    config.train.steps = 0
    config.init_from = str(tmp_path / "trained")
    history = stages.run(config, str(tmp_path / "eval"))
    assert [h["step"] for h in history] == [0]
    np.testing.assert_allclose(history[0]["eval_loss"], measured[-1], rtol=1e-5)
    assert not list((tmp_path / "eval").glob("checkpoints/*"))


def test_zero_steps_without_a_starting_checkpoint_is_refused():
    config = _toy(1)
    config.train.steps = 0
    with pytest.raises(config_base.ConfigError, match=r"train.steps.*--config.init_from"):
        config_base.validate_config(config)
