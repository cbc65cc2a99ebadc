"""GRPO with a rule-based reward (Phi-4-reasoning-plus), on the shared engine.

Each step reads `train.global_batch` problems, samples `grpo.group_size` responses to each
with the current parameters (`prepare_batch`: the compiled KV-cache sampler, on-policy, no
stale copy), scores them with the reasoning reward (`data.reasoning`), turns rewards into
group-relative advantages and trains on [P, G, T] rows: the prompt (left-padded to
`train.seq_len + 1 - grpo.max_new_tokens` tokens) followed by the response, laid out in the
same slots as when it was sampled. The loss is the clipped-ratio objective with a KL term to
the frozen starting model (`losses.policy_gradient`). Sampling keys derive from the seed, the
step and the problem, so a resumed run samples exactly what the uninterrupted one did.
Logged each step: `reward`, `sample_accuracy` and `well_formed` (shares of the sampled
responses), `response_tokens`, `kl` to the reference, and `sample_time_s` apart from the
step time; each evaluation: held-out greedy `accuracy` (`eval.accuracy_problems`).
"""

from __future__ import annotations

import functools
import time
import zlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from phi4_jax.config_base import ConfigError
from phi4_jax.data import bad_records, pipeline, reasoning, synthetic
from phi4_jax.data.chat import Counts, where
from phi4_jax.data.sources import BadRecordError
from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.losses.policy_gradient import group_advantages, grpo_sums
from phi4_jax.model import lora
from phi4_jax.sampling import decode
from phi4_jax.sampling.scoring import target_log_probs
from phi4_jax.stages import teachability
from phi4_jax.stages.pretrain import Pretrain
from phi4_jax.train.state import Run

SEQUENCE_KEYS = ("inputs", "targets", "positions", "segment_ids")


def problem_of(record: Any) -> synthetic.Exercise:
    """A problem with a checkable answer: a built-in exercise, or JSON with `question` and
    `answer`; BadRecordError otherwise."""
    if isinstance(record, synthetic.Exercise):
        return record
    question = record.get("question") if isinstance(record, dict) else None
    answer = record.get("answer") if isinstance(record, dict) else None
    if not isinstance(question, str) or not isinstance(answer, (str, int, float)) or \
            not str(answer).strip():
        raise BadRecordError(f"{where(record)} is not a problem with a checkable answer; a GRPO "
                             f'record is {{"question": ..., "answer": ...}}')
    return synthetic.Exercise("json", question, "", str(answer))


def grpo_loss(params, batch, frozen, *, graphdef, chunk_tokens, clip_low, clip_high, kl_coef,
              normalization):
    """The engine's loss over [P, G, T] rows of sampled responses."""
    p, g, t = batch["inputs"].shape
    flat = {key: batch[key].reshape(p * g, t) for key in (*SEQUENCE_KEYS, "loss_mask",
                                                          "old_log_probs")}
    score = functools.partial(target_log_probs, graphdef=graphdef, batch=flat,
                              chunk_tokens=chunk_tokens)
    log_probs = score(params)
    # `frozen` is the starting model, or None under LoRA: the backbone, adapters zeroed
    reference = jax.lax.stop_gradient(score(lora.as_backbone(params) if frozen is None else frozen))
    return grpo_sums(log_probs, flat["old_log_probs"], reference,
                     batch["advantages"].reshape(p * g), flat["loss_mask"], clip_low=clip_low,
                     clip_high=clip_high, kl_coef=kl_coef, normalization=normalization)


class GRPO(Pretrain):
    name = "grpo"

    def __init__(self):
        self.counts = Counts()
        self.teachable: dict[str, float] = {}

    def sequences_per_row(self, config: ml_collections.ConfigDict) -> int:
        return config.grpo.group_size

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        g = config.grpo
        if g.group_size < 2:
            raise ConfigError(f"grpo.group_size={g.group_size}: advantages are relative to a "
                              f"group, so each problem needs at least 2 responses.")
        if not 0 < g.max_new_tokens < config.train.seq_len:
            raise ConfigError(f"grpo.max_new_tokens={g.max_new_tokens} must lie in (0, "
                              f"train.seq_len={config.train.seq_len}): the prompt needs room.")
        if jax.process_count() > 1:
            raise ConfigError("stage='grpo' samples on one process for now; run it on one "
                              "host (any number of its devices).")

    def loss_fn(self, run: Run):
        g = run.config.grpo
        return functools.partial(grpo_loss, graphdef=run.graphdef,
                                 chunk_tokens=run.config.train.loss_chunk_tokens,
                                 clip_low=g.clip_low, clip_high=g.clip_high, kl_coef=g.kl_coef,
                                 normalization=g.normalization)

    def eval_batches(self, run: Run, shard):
        """None: a held-out GRPO loss means little; held-out greedy accuracy is the measure."""
        return []

    def frozen(self, run: Run, initial_params, workdir: str) -> Any:
        """The reference model of the KL term (None under LoRA: the frozen backbone is it);
        the teachability filter samples with the starting model."""
        reference = None if run.model_cfg.lora else initial_params()
        start = initial_params if reference is None else (lambda: reference)
        self.subsets, self.teachable = teachability.kept_subsets(
            run, problem_of, run.tokenizer, reasoning.format_for(run.config),
            sampling_params(run.config, run.tokenizer), start, workdir)
        return reference

    def rows_fn(self, run: Run, split: str) -> pipeline.RowsFn:
        prompt_len = run.config.train.seq_len + 1 - run.config.grpo.max_new_tokens
        example = functools.partial(problem_row, tokenizer=run.tokenizer,
                                    fmt=reasoning.format_for(run.config), prompt_len=prompt_len,
                                    counts=self.counts)
        return functools.partial(_problem_rows, example=example)

    def prepare_batch(self, run: Run, batch, params, step: int):
        """Samples G responses per problem with `params`, rewards them and lays out the rows."""
        g, tokenizer = run.config.grpo, run.tokenizer
        start = time.perf_counter()
        prompt = {key: np.repeat(batch.pop(f"prompt_{key}"), g.group_size, axis=0)
                  for key in ("tokens", "positions", "segment_ids")}
        keys = _row_keys(run.config.seed, step, batch["question"], g.group_size)
        generate = decode.compiled_generate(run.graphdef, run.model_cfg,
                                            sampling_params(run.config, tokenizer))
        with jax.set_mesh(run.mesh):
            out = jax.device_get(generate(params, prompt, keys))
        rewards = self.rewards(run, batch, out, tokenizer)
        advantages = np.asarray(group_advantages(jnp.asarray(rewards["total"]),
                                                 scale_by_std=g.scale_by_std))
        rows = response_rows(prompt, out, advantages.reshape(-1))
        p = len(batch["question"])
        rows = {key: value.reshape(p, g.group_size, *value.shape[1:]) for key, value in
                rows.items()}
        metrics = {"reward": float(rewards["total"].mean()),
                   "sample_accuracy": float(rewards["correct"].mean()),
                   "well_formed": float(rewards["well_formed"].mean()),
                   "response_tokens": float(out.lengths.mean()),
                   "sample_time_s": time.perf_counter() - start}
        return rows, metrics

    def rewards(self, run: Run, batch, out, tokenizer) -> dict[str, np.ndarray]:
        g = run.config.grpo
        fmt = reasoning.format_for(run.config)
        rules = reasoning.RewardRules(g.reward_correct, g.reward_wrong, g.format_penalty,
                                      g.overlong_penalty)
        table = {"total": [], "correct": [], "well_formed": []}
        for row, (question, answer) in enumerate(zip(batch["question"], batch["answer"])):
            ex = synthetic.Exercise("problem", str(question), "", str(answer))
            for j in range(g.group_size):
                i = row * g.group_size + j
                emitted = out.tokens[i][out.mask[i] == 1]
                finished = bool(len(emitted)) and int(emitted[-1]) in (tokenizer.end_of_turn_id,
                                                                       tokenizer.eot_id)
                text = tokenizer.decode([t for t in emitted if t not in (tokenizer.end_of_turn_id,
                                                                         tokenizer.eot_id)])
                score = reasoning.reward(ex, text, finished=finished, fmt=fmt, rules=rules)
                for key in table:
                    table[key].append(getattr(score, key))
        return {key: np.asarray(v, np.float32).reshape(-1, g.group_size)
                for key, v in table.items()}

    def evaluate(self, run: Run, params, frozen) -> dict[str, float]:
        return {**super().evaluate(run, params, frozen), **self.counts.as_metrics("grpo"),
                **self.teachable}


def sampling_params(config: ml_collections.ConfigDict, tokenizer: Phi4Tokenizer
                    ) -> decode.SamplingParams:
    """How GRPO (and the teachability filter) sample responses: the grpo.* keys, stopping at
    the tokenizer's end of turn or end of text."""
    g = config.grpo
    return decode.SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                 top_k=g.top_k, top_p=g.top_p, pad_id=tokenizer.pad_id,
                                 stop_ids=(tokenizer.end_of_turn_id, tokenizer.eot_id))


def problem_row(record, *, tokenizer, fmt, prompt_len: int, counts: Counts):
    """A problem's left-padded prompt (reasoning template) and its question and answer text."""
    ex = problem_of(record)
    ids = tokenizer.encode_chat(fmt.messages(ex.question), add_generation_prompt=True).ids
    counts.add(examples=1)
    if len(ids) > prompt_len:
        counts.add(dropped=1)
        return None
    padded = decode.left_pad([ids], prompt_len, tokenizer.pad_id)
    return {**{f"prompt_{key}": value[0] for key, value in padded.items()},
            "question": np.asarray(ex.question), "answer": np.asarray(ex.answer)}


def _problem_rows(name, records: grain.MapDataset, cfg, *, example) -> grain.IterDataset:
    examples = bad_records.convert(name, records, example, cfg["sources"][name])
    return examples.filter(lambda r: r is not None).to_iter_dataset()


def _row_keys(seed: int, step: int, questions, group_size: int) -> jax.Array:
    """A key per response from the seed, the step, its problem's text and its index in the
    group: the same problem at the same step samples the same responses anywhere."""
    ids = [(zlib.crc32(str(q).encode()) * group_size + j) % 2**32 for q in questions
           for j in range(group_size)]
    return decode.row_keys(seed * 1_000_003 + step, ids)


def response_rows(prompt: dict[str, np.ndarray], out: decode.Generation,
                  advantages: np.ndarray) -> dict[str, np.ndarray]:
    """Training rows [R, T] of prompts and their sampled responses, in the sampler's slots.

    The sequence is prompt (P slots) + response (N slots); position t predicts slot t + 1,
    so T = P + N - 1. Only emitted response tokens are trained on.
    """
    prompts, positions = prompt["tokens"], prompt["positions"]
    tokens = np.concatenate([prompts, out.tokens], axis=1)
    emitted = out.mask.astype(bool)
    real = np.concatenate([prompt["segment_ids"].astype(bool), emitted], axis=1)
    steps = np.arange(out.tokens.shape[1])
    all_positions = np.concatenate([positions, positions[:, -1:] + 1 + steps], axis=1)
    target_mask = np.concatenate([np.zeros(prompts.shape, np.float32)[:, 1:],
                                  emitted.astype(np.float32)], axis=1)
    old = np.concatenate([np.zeros(prompts.shape, np.float32)[:, 1:], out.log_probs], axis=1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.where(real, all_positions, 0)[:, :-1].astype(np.int32),
            "segment_ids": real[:, :-1].astype(np.int32), "loss_mask": target_mask,
            "old_log_probs": old.astype(np.float32), "advantages": advantages.astype(np.float32)}
