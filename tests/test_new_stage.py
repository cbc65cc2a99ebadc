"""The README's recipe for a new stage, followed once: answer-only training on the built-in
exercises (the loss covers the final-answer tokens only, averaged per row). Its loss, its
row builder, its stage (check and build), its config and its registry line are all here;
the engine trains it through `stages.run` like any other stage."""

import functools

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax import config_base, stages
from phi4_jax.data import bad_records
from phi4_jax.errors import ConfigError
from phi4_jax.losses.lm import shift_for_next_token
from phi4_jax.sampling.scoring import target_log_probs
from phi4_jax.train.stage import Rows, Stage, StageData

SEQ_LEN = 256  # bytes: room for a question and its answer


def per_row_loss(log_probs, loss_mask):
    """1. Its loss: the mean negative log-likelihood of each row's answer, summed over rows;
    one unit per row that has answer tokens."""
    tokens = loss_mask.sum(axis=-1)
    per_row = -(log_probs * loss_mask).sum(axis=-1) / jnp.maximum(tokens, 1.0)
    rows = (tokens > 0).astype(jnp.float32)
    return (per_row * rows).sum(), rows.sum(), {"answer_tokens": tokens.sum()}


def answer_rows(name, records, cfg, *, tokenizer, seq_len):
    """2. Its row builder: the question, then `Final answer: ...`, trained on the answer."""
    def row(ex):
        prompt = tokenizer.encode(ex.question + "\n")
        answer = tokenizer.encode(f"Final answer: {ex.answer}") + [tokenizer.eot_id]
        ids = np.full(seq_len + 1, tokenizer.pad_id, np.int32)
        mask = np.zeros(seq_len + 1, np.float32)
        n = min(len(prompt) + len(answer), seq_len + 1)
        ids[:n] = (prompt + answer)[:n]
        mask[len(prompt):n] = 1.0
        inputs, targets, loss_mask = shift_for_next_token(ids, mask)
        real = (np.arange(seq_len) < n - 1).astype(np.int32)
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
                "segment_ids": real, "positions": np.arange(seq_len, dtype=np.int32) * real}
    rows = bad_records.convert(name, records, row, cfg["sources"][name])
    return rows.to_iter_dataset(grain.ReadOptions(num_threads=0))


def check(config):
    """3. Its stage file: the rules of what it reads."""
    if config.train.seq_len < 32:
        raise ConfigError(f"train.seq_len={config.train.seq_len}: the answer-only stage needs "
                          f"room for a question and its answer; give at least 32.")


def _loss(run):
    def loss(params, batch, frozen):
        del frozen
        log_probs = target_log_probs(params, run.graphdef, batch,
                                     chunk_tokens=run.config.train.loss_chunk_tokens)
        return per_row_loss(log_probs, batch["loss_mask"])
    return loss


def _data(run, data_cfg, load_initial, workdir):
    del data_cfg, load_initial, workdir
    rows = Rows(functools.partial(answer_rows, tokenizer=run.tokenizer,
                                  seq_len=run.config.train.seq_len))
    return StageData({"train": rows, "eval": rows})


def build(config, model_cfg):
    check(config)
    return Stage(name="answer_only", loss=_loss, data=_data,
                 tokens_per_step=config.train.global_batch * config.train.seq_len)


def answer_only_config():
    """4. Its config: the toy pretraining config on the built-in exercises, no new keys."""
    c = config_base.load_config("configs/pretrain.py", "toy")
    c.stage = "answer_only"
    c.data.mix = {"synthetic": 1.0, "code": 0.0}
    c.train.update(steps=2, seq_len=SEQ_LEN, global_batch=8, warmup_steps=1)
    c.eval.update(every_steps=2, batches=1)
    c.log.update(every_steps=1, tensorboard=False, progress_bar=False)
    c.checkpoint.every_steps = 2
    return c


def test_per_row_loss_by_hand():
    log_probs = jnp.log(jnp.asarray([[0.5, 0.25, 1.0], [1.0, 1.0, 1.0]]))
    mask = jnp.asarray([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    total, units, metrics = per_row_loss(log_probs, mask)
    np.testing.assert_allclose(float(total), np.log(4) / 2, rtol=1e-6)
    assert float(units) == 1.0 and float(metrics["answer_tokens"]) == 2.0


def test_the_new_stage_trains_on_the_engine(tmp_path, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "answer_only", build)  # 5. its registry line
    config = answer_only_config()
    history = stages.run(config, str(tmp_path))
    logged = [h for h in history if "loss" in h]
    evaluated = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in logged] == [1, 2]
    assert all(np.isfinite(h["loss"]) and h["answer_tokens"] > 1 for h in logged)
    # one unit per row: the engine divided the stage's sums by its rows
    assert evaluated[0]["eval_units"] == config.train.global_batch * config.eval.batches
    config.train.seq_len = 16
    with pytest.raises(ConfigError, match="train.seq_len=16"):
        stages.run(config, str(tmp_path / "short"))
