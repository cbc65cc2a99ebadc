"""Every stage runs with Phi-4-mini's geometry from `model.size` alone: the o200k tokenizer
and its chat format follow from the size, LongRoPE and the tied head come with it. `mini-tiny`
is that geometry at tiny width; sequences of 192 cross its original context of 128."""

import jax
import numpy as np
import pytest

from phi4_jax import config_base, stages
from phi4_jax.train import state as state_lib


def _config(stage: str, arg: str = "tiny"):
    c = config_base.load_config(f"configs/{stage}.py", arg)
    c.model.size = "mini-tiny"
    # 32 positions of [B, T, 200064] float32 logits at a time keep the loss's working set small
    c.train.update(steps=1, warmup_steps=1, seq_len=192, global_batch=8, loss_chunk_tokens=32)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.eval.update(every_steps=1, batches=1, accuracy_problems=0, at_start=False)
    if stage == "grpo":
        c.grpo.update(group_size=2, max_new_tokens=8)
    return c


def test_the_size_picks_the_mini_tokenizer():
    run = state_lib.build_run(_config("sft"), jax.devices()[:1])
    assert run.tokenizer_name == "phi4-mini" and run.tokenizer.end_of_turn_id == 200020
    assert run.model_cfg.long_rope.original_max_positions == 128 < 192
    assert run.model_cfg.tie_embeddings and run.model_cfg.rotary_fraction == 0.75


# GRPO goes through what is Phi-4-mini's own: its chat format, sampling with the KV cache and
# LongRoPE, and a training step over 192-token rows on the tied head. Pretraining's, SFT's and
# DPO's rows and losses are the same code for every tokenizer (test_tokenizer covers o200k's;
# the hf parity tests cover LongRoPE past its original context).
@pytest.mark.slow
def test_grpo_runs_at_phi4_mini_geometry(tmp_path):
    history = stages.run(_config("grpo"), str(tmp_path))
    trained = [h for h in history if "loss" in h]
    assert len(trained) == 1 and np.isfinite(trained[0]["loss"])
