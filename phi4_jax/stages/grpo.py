"""GRPO with a rule-based reward (Phi-4-reasoning-plus), on the shared engine.

Each step reads `train.global_batch` problems, samples `grpo.group_size` responses to each
with the current parameters (`prepare_batch`: the compiled KV-cache sampler, on-policy, no
stale copy), scores them with the reasoning reward `grpo.reward` (`data.synthetic.reasoning`: the
simple +1/-0.5 rule, or Phi-4-reasoning-plus's length-aware one), turns rewards into
group-relative advantages and trains on [P, G, T] rows: the prompt (left-padded to
`train.seq_len + 1 - grpo.max_new_tokens` tokens) followed by the response, laid out in the
same slots as when it was sampled. The loss is the clipped-ratio objective with a KL term to
the frozen starting model (`losses.policy_gradient`). Sampling keys derive from the seed, the
step and the problem, so a resumed run samples exactly what the uninterrupted one did. Under
LoRA a problem's responses are sampled and trained with the adapter its record names
(`data.adapters`); the KL reference is the backbone for every row.
Logged each step: `reward`, `sample_accuracy` and `well_formed` (shares of the sampled
responses), `response_tokens`, `kl` to the reference, and `sample_time_s` apart from the
step time; each evaluation: held-out greedy `accuracy` (`eval.accuracy_problems`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from phi4_jax.config_base import ConfigError
from phi4_jax.data import adapters, problems, synthetic
from phi4_jax.data.synthetic import reasoning
from phi4_jax.data.chat import Counts
from phi4_jax.errors import require
from phi4_jax.losses.policy_gradient import NORMALIZATIONS, group_advantages, grpo_sums
from phi4_jax.model import lora
from phi4_jax.model.config import ModelConfig
from phi4_jax.sampling import decode
from phi4_jax.sampling.scoring import target_log_probs
from phi4_jax.stages import evaluation, teachability
from phi4_jax.train.stage import Frozen, Rows, Stage, StageData, starting_copy
from phi4_jax.train.state import Run

SEQUENCE_KEYS = ("inputs", "targets", "positions", "segment_ids")
# The grpo.* keys of the 'simple' reward, in `reasoning.RewardRules`' field order.
SIMPLE_REWARD_KEYS = ("reward_correct", "reward_wrong", "format_penalty", "overlong_penalty")


def check(config: ml_collections.ConfigDict) -> None:
    """The grpo.* keys (the sampling ones through `teachability.check`) and reasoning.*."""
    teachability.check(config)
    g = config.grpo
    if not (isinstance(g.group_size, int) and g.group_size >= 2):
        raise ConfigError(f"grpo.group_size={g.group_size!r}: advantages are relative to a "
                          f"group, so each problem needs an integer >= 2 responses.")
    if not g.max_new_tokens < config.train.seq_len:
        raise ConfigError(f"grpo.max_new_tokens={g.max_new_tokens} must lie in (0, "
                          f"train.seq_len={config.train.seq_len}): the prompt needs room.")
    if g.normalization not in NORMALIZATIONS:
        raise ConfigError(f"grpo.normalization={g.normalization!r}: choose one of "
                          f"{NORMALIZATIONS}.")
    if not (0 <= g.clip_low < 1 and g.clip_high >= 0 and g.kl_coef >= 0):
        raise ConfigError(f"grpo.clip_low/clip_high/kl_coef={(g.clip_low, g.clip_high, g.kl_coef)}"
                          f": clip_low in [0, 1), clip_high >= 0 and kl_coef >= 0.")
    require(g.reward in reasoning.REWARDS, "grpo.reward", g.reward,
            f"choose one of {reasoning.REWARDS}.")
    if g.reward != "simple":  # the simple rule's values would be silently ignored
        for key, default in zip(SIMPLE_REWARD_KEYS, dataclasses.astuple(reasoning.RewardRules())):
            require(g[key] == default, f"grpo.{key}", g[key],
                    f"it sets the 'simple' reward, but grpo.reward={g.reward!r}; leave it at "
                    f"{default} or set --config.grpo.reward=simple.")
    scale = g.reward_length_scale
    require(isinstance(scale, (int, float)) and not isinstance(scale, bool)
            and math.isfinite(scale) and scale > 0, "grpo.reward_length_scale", scale,
            "give a positive number (1.0: the report's token lengths).")
    if jax.process_count() > 1:
        raise ConfigError("stage='grpo' samples on one process for now; run it on one "
                          "host (any number of its devices).")


def build(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> Stage:
    """No held-out loss (it means little here): held-out greedy accuracy is the measure."""
    check(config)
    counts = Counts()
    per_row = config.grpo.group_size
    return Stage(
        name="grpo", loss=_loss, data=functools.partial(_data, counts=counts),
        tokens_per_step=config.train.global_batch * config.train.seq_len * per_row,
        sequences_per_row=per_row,
        # the reference of the KL term; under LoRA the frozen backbone is it
        frozen=Frozen() if model_cfg.lora else starting_copy(model_cfg),
        prepare_batch=prepare_batch, evaluate=functools.partial(_evaluate, counts=counts),
        describe=evaluation.mixture_description(
            config, config.train.global_batch * config.train.seq_len * per_row))


def grpo_loss(params, batch, frozen, *, graphdef, chunk_tokens, clip_low, clip_high, kl_coef,
              normalization):
    """The engine's loss over [P, G, T] rows of sampled responses."""
    p, g, t = batch["inputs"].shape
    flat = {key: batch[key].reshape(p * g, t) for key in (*SEQUENCE_KEYS, "loss_mask",
                                                          "old_log_probs")}
    if "adapter_ids" in batch:  # LoRA: [P, G], a group on its problem's adapter
        flat["adapter_ids"] = batch["adapter_ids"].reshape(p * g)
    score = functools.partial(target_log_probs, graphdef=graphdef, batch=flat,
                              chunk_tokens=chunk_tokens)
    log_probs = score(params)
    # `frozen` is the starting model, or None under LoRA: the backbone, adapters zeroed
    reference = jax.lax.stop_gradient(score(lora.as_backbone(params) if frozen is None else frozen))
    return grpo_sums(log_probs, flat["old_log_probs"], reference,
                     batch["advantages"].reshape(p * g), flat["loss_mask"], clip_low=clip_low,
                     clip_high=clip_high, kl_coef=kl_coef, normalization=normalization)


def _loss(run: Run):
    g = run.config.grpo
    return functools.partial(grpo_loss, graphdef=run.graphdef,
                             chunk_tokens=run.config.train.loss_chunk_tokens,
                             clip_low=g.clip_low, clip_high=g.clip_high, kl_coef=g.kl_coef,
                             normalization=g.normalization)


def _data(run: Run, data_cfg, load_initial, workdir: str, *, counts: Counts) -> StageData:
    """Problem rows; the teachable ones only, when the filter is on (sampled with the
    starting model: the loaded reference when there is one)."""
    c = run.config
    fmt = reasoning.format_for(c)
    subsets, kept = teachability.kept_subsets(
        run, data_cfg, problems.problem_of, run.tokenizer, fmt,
        teachability.sampling_params(c, run.tokenizer), load_initial, workdir)
    example = functools.partial(problems.problem_row, tokenizer=run.tokenizer, fmt=fmt,
                                prompt_len=c.train.seq_len + 1 - c.grpo.max_new_tokens,
                                counts=counts, routing=adapters.routing_for(run.model_cfg.lora))
    return StageData({"train": Rows(functools.partial(problems.problem_rows, example=example),
                                    subsets=subsets)}, kept)


def prepare_batch(run: Run, batch, params, step: int):
    """Samples G responses per problem with `params`, rewards them and lays out the rows."""
    g, tokenizer = run.config.grpo, run.tokenizer
    start = time.perf_counter()
    prompt = {key: np.repeat(batch.pop(f"prompt_{key}"), g.group_size, axis=0)
              for key in ("tokens", "positions", "segment_ids")}
    if "adapter_ids" in batch:  # LoRA: each response sampled with its problem's adapter
        prompt["adapter_ids"] = np.repeat(batch.pop("adapter_ids"), g.group_size)
    keys = _row_keys(run.config.seed, step, batch["question"], g.group_size)
    generate = decode.compiled_generate(run.graphdef, run.model_cfg,
                                        teachability.sampling_params(run.config, tokenizer))
    with jax.set_mesh(run.mesh):
        out = jax.device_get(generate(params, prompt, keys))
    scores = rewards(run, batch, out, tokenizer)
    advantages = np.asarray(group_advantages(jnp.asarray(scores["total"]),
                                             scale_by_std=g.scale_by_std))
    rows = problems.response_rows(prompt, out, advantages.reshape(-1))
    if "adapter_ids" in prompt:
        rows["adapter_ids"] = prompt["adapter_ids"]
    p = len(batch["question"])
    rows = {key: value.reshape(p, g.group_size, *value.shape[1:]) for key, value in rows.items()}
    metrics = {"reward": float(scores["total"].mean()),
               "sample_accuracy": float(scores["correct"].mean()),
               "well_formed": float(scores["well_formed"].mean()),
               "response_tokens": float(out.lengths.mean()),
               "sample_time_s": time.perf_counter() - start}
    return rows, metrics


def rewards(run: Run, batch, out, tokenizer) -> dict[str, np.ndarray]:
    """The `grpo.reward` of every sampled response; the length-aware one counts a response's
    emitted tokens, its end of turn included."""
    g = run.config.grpo
    fmt = reasoning.format_for(run.config)
    rules = reasoning.RewardRules(*(g[key] for key in SIMPLE_REWARD_KEYS))
    length_aware = reasoning.LengthAwareRules(length_scale=g.reward_length_scale)
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
            if g.reward == "phi4_reasoning":
                score = reasoning.length_aware_reward(ex, text, tokens=len(emitted),
                                                      finished=finished, fmt=fmt,
                                                      rules=length_aware)
            else:
                score = reasoning.reward(ex, text, finished=finished, fmt=fmt, rules=rules)
            for key in table:
                table[key].append(getattr(score, key))
    return {key: np.asarray(v, np.float32).reshape(-1, g.group_size)
            for key, v in table.items()}


def _evaluate(run: Run, params, frozen, held_out: list, *, counts: Counts) -> dict[str, float]:
    del frozen, held_out
    return {**evaluation.greedy_accuracy(run, params), **counts.as_metrics("grpo")}


def _row_keys(seed: int, step: int, questions, group_size: int) -> jax.Array:
    """A key per response from the seed, the step, its problem's text and its index in the
    group: the same problem at the same step samples the same responses anywhere."""
    ids = [(zlib.crc32(str(q).encode()) * group_size + j) % 2**32 for q in questions
           for j in range(group_size)]
    return decode.row_keys(seed * 1_000_003 + step, ids)
