"""Post-training stages on the shared engine: a sharded DPO step equals one device, DPO resumes
exactly, precomputed reference scores equal on-the-fly ones, `init_from` is checked before
anything compiles, and pretrain -> SFT -> DPO runs through `python -m phi4_jax.main`."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from phi4_jax import config_base, stages
from phi4_jax.data import preference, synthetic
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.stages import dpo
from phi4_jax.train import initial_params, loop
from phi4_jax.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]


def _dpo_config(steps=3, arg="toy", **train):
    c = config_base.load_config("configs/dpo.py", arg)
    c.train.update(steps=steps, warmup_steps=1, seq_len=320, global_batch=8, **train)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=steps, batches=1, accuracy_problems=0, at_start=False)
    c.checkpoint.update(every_steps=2)
    return c


def _random_pairs(b=8, t=16, seed=0, vocab=512):  # the toy size's vocabulary
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, 2, t + 1)).astype(np.int32)
    mask = np.zeros((b, 2, t), np.float32)
    mask[:, :, t // 2:t - 2] = 1.0  # a response in the middle, padding after it
    segments = np.ones((b, 2, t), np.int32)
    segments[:, :, t - 2:] = 0
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, 2, t)).copy()
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": mask,
            "segment_ids": segments, "positions": positions,
            "weight": rng.uniform(0.5, 1.0, b).astype(np.float32)}


def _dpo_steps(config, devices, batches):
    run = state_lib.build_run(config, devices, sequences_per_row=2)
    stage = dpo.build(config, run.model_cfg)
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        reference = state_lib.init_params(run)
        params = jax.tree.map(lambda x: x + 0.01, reference)  # a policy away from its reference
        state = state_lib.init_state(run, params)
        train_fn, _ = loop.compile_steps(run, stage.loss(run), reference)
        losses = []
        for batch in batches:
            state, metrics = train_fn(state, state_lib.to_global_batch(batch, run.batch_sharding),
                                      reference)
            losses.append((float(metrics["loss"]), float(metrics["reward_margin"])))
    return losses, jax.device_get(state.params)


def test_sharded_dpo_step_equals_one_device():
    config = _dpo_config()
    config.train.update(lr=1e-2, eps=1e-4, microbatches=2)
    batches = [_random_pairs(seed=0), _random_pairs(seed=1)]
    single, single_params = _dpo_steps(config, jax.devices()[:1], batches)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.microbatches = 1
    sharded, sharded_params = _dpo_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=2e-6),
                 sharded_params, single_params)


def _losses(history):
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.slow
def test_dpo_resume_equals_straight_run(tmp_path):
    straight = stages.run(_dpo_config(4), str(tmp_path / "straight"))
    first = stages.run(_dpo_config(4), str(tmp_path / "resumed"), stop_at_step=2)
    second = stages.run(_dpo_config(4), str(tmp_path / "resumed"))
    np.testing.assert_allclose(_losses(first) + _losses(second), _losses(straight), rtol=1e-6)
    assert len(_losses(straight)) == 4


def _pairs_file(path, count=40):
    with open(path, "w", encoding="utf-8") as f:
        for index in range(count):
            ex = synthetic.exercise(11, index)
            rejected, _ = preference.corrupted_solution(ex, __import__("random").Random(index),
                                                        judged=False)
            f.write(json.dumps({"prompt": ex.question, "chosen": ex.solution,
                                "rejected": rejected}) + "\n")


@pytest.mark.slow
def test_precomputed_reference_equals_on_the_fly(tmp_path):
    _pairs_file(tmp_path / "pairs.jsonl")

    def config(reference):
        c = _dpo_config(3)
        c.data.sources.pairs = config_base.source_spec("jsonl", paths=str(tmp_path / "*.jsonl"))
        c.data.mix = {"pairs": 1.0}
        c.data.eval_holdout = 0.2
        c.dpo.reference = reference
        return c

    on_the_fly = stages.run(config("on_the_fly"), str(tmp_path / "a"))
    precomputed = stages.run(config("precomputed"), str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b" / "reference_log_probs")) == [
        "pairs.eval.npy", "pairs.train.npy"]
    np.testing.assert_allclose(_losses(precomputed), _losses(on_the_fly), rtol=1e-5)
    evals = [[h["eval_loss"] for h in run if "eval_loss" in h] for run in (on_the_fly,
                                                                         precomputed)]
    np.testing.assert_allclose(evals[1], evals[0], rtol=1e-5)


def test_precomputed_reference_refuses_endless_sources():
    config = _dpo_config()
    config.dpo.reference = "precomputed"
    with pytest.raises(config_base.ConfigError, match="endless"):
        dpo.check(config)


def test_init_from_a_missing_directory_is_refused():
    with pytest.raises(config_base.ConfigError, match="init_from='/no/such/run': no such"):
        initial_params.locate("/no/such/run")


def _main(*args, timeout=600):
    result = subprocess.run([sys.executable, "-m", "phi4_jax.main", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return result.returncode, result.stdout + result.stderr


COMMON = ["--config.log.progress_bar=False", "--config.log.tensorboard=False",
          "--config.train.warmup_steps=1", "--config.eval.batches=1",
          "--config.checkpoint.every_steps=100"]


@pytest.mark.slow
def test_pretrain_sft_dpo_chain_through_main(tmp_path):
    code, out = _main("--config=configs/pretrain.py:toy", f"--workdir={tmp_path}/pt",
                      "--config.train.steps=2", "--config.train.seq_len=64", *COMMON)
    assert code == 0, out
    code, out = _main("--config=configs/sft.py:toy", f"--workdir={tmp_path}/sft",
                      f"--config.init_from={tmp_path}/pt", "--config.train.steps=2",
                      "--config.train.seq_len=512", "--config.eval.accuracy_problems=2",
                      "--config.eval.max_new_tokens=4", *COMMON)
    assert code == 0, out
    assert f"sft starts from phi4 checkpoint {tmp_path}/pt/checkpoints/2" in out
    assert "step 0: accuracy=" in out and "step 2: accuracy=" in out  # before and after
    code, out = _main("--config=configs/dpo.py:toy,pts", f"--workdir={tmp_path}/dpo",
                      f"--config.init_from={tmp_path}/sft", "--config.train.steps=2",
                      "--config.train.seq_len=320", "--config.eval.accuracy_problems=2",
                      "--config.eval.max_new_tokens=4", *COMMON)
    assert code == 0, out
    assert "eval_reward_accuracy=" in out
    # a checkpoint of another size is refused before anything compiles, in one line
    code, out = _main("--config=configs/sft.py:toy", f"--workdir={tmp_path}/wrong",
                      f"--config.init_from={tmp_path}/pt", "--config.model.size=125m", *COMMON)
    assert code == 1 and out.count("error: init_from=") == 1, out
    assert "model.size='125m'" in out and "Traceback" not in out
    assert not (tmp_path / "wrong" / "checkpoints").exists()
