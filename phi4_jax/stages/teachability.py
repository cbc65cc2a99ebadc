"""The teachability filter of Phi-4-reasoning: train only on problems the starting model
sometimes, but not always, solves.

Before training, the first `reasoning.teachable_pool` problems of each source are each
answered `reasoning.teachable_samples` times by the starting model (the KV-cache sampler at
`grpo`'s temperature and filters, in the reasoning format) and checked by the verifier; the
problems whose success rate lies in [`teachable_low`, `teachable_high`] are kept, and
training then reads only those (`pipeline.make_iterator(subsets=...)`). Records without a
checkable answer are handled by the source's bad-record policy. The rates are stored in
`<workdir>/teachability/<source>.npz` (temporary name, then renamed) and reused on restart;
the counts (pool, kept, too easy, too hard) are logged and reported with the eval metrics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from phi4_jax.config_base import ConfigError
from phi4_jax.data import bad_records, mixture, sources, synthetic
from phi4_jax.data.synthetic.reasoning import ReasoningFormat
from phi4_jax.data.tokenizer import Phi4Tokenizer
from phi4_jax.evals.verifiable import chat_prompt, sampled_responses
from phi4_jax.parallel.sharding import logical_rules
from phi4_jax.sampling import decode
from phi4_jax.train.state import Run

SAMPLE_BATCH = 64  # most responses sampled at once


def check(config: ml_collections.ConfigDict) -> None:
    """The reasoning.* keys of the filter, and the grpo.* keys it samples with."""
    r = config.reasoning
    if not (isinstance(r.teachable_pool, int) and r.teachable_pool >= 0):
        raise ConfigError(f"reasoning.teachable_pool={r.teachable_pool!r}: must be an integer "
                          f">= 0 (0 = off).")
    if not (isinstance(r.teachable_samples, int) and r.teachable_samples >= 1):
        raise ConfigError(f"reasoning.teachable_samples={r.teachable_samples!r}: must be an "
                          f"integer >= 1.")
    if not 0 <= r.teachable_low <= r.teachable_high <= 1:
        raise ConfigError(f"reasoning.teachable_low/high={(r.teachable_low, r.teachable_high)}: "
                          f"need 0 <= low <= high <= 1.")
    check_sampling(config.grpo)


def check_sampling(g: ml_collections.ConfigDict) -> None:
    """The grpo.* keys that say how responses are sampled (GRPO and this filter)."""
    for key in ("max_new_tokens", "top_k"):
        low = 1 if key == "max_new_tokens" else 0
        if not (isinstance(g[key], int) and not isinstance(g[key], bool) and g[key] >= low):
            raise ConfigError(f"grpo.{key}={g[key]!r}: must be an integer >= {low}.")
    if not (g.temperature > 0 and 0 < g.top_p <= 1):
        raise ConfigError(f"grpo.temperature/top_p={(g.temperature, g.top_p)}: temperature must "
                          f"be > 0 and top_p in (0, 1].")


def sampling_params(config: ml_collections.ConfigDict, tokenizer: Phi4Tokenizer
                    ) -> decode.SamplingParams:
    """How GRPO and this filter sample responses: the grpo.* keys, stopping at the
    tokenizer's end of turn or end of text."""
    g = config.grpo
    return decode.SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                 top_k=g.top_k, top_p=g.top_p, pad_id=tokenizer.pad_id,
                                 stop_ids=(tokenizer.end_of_turn_id, tokenizer.eot_id))


def success_rates(run: Run, params: Any, problems: list[synthetic.Exercise],
                  tokenizer: Phi4Tokenizer, fmt: ReasoningFormat, *, samples: int,
                  sampling: decode.SamplingParams, seed: int) -> np.ndarray:
    """Each problem's fraction of `samples` sampled responses that the verifier accepts."""
    if not problems:
        return np.zeros(0)
    prompts = [chat_prompt(ex.question, tokenizer, fmt) for ex in problems]
    asked = [i for i in range(len(problems)) for _ in range(samples)]  # problem of each row
    with jax.set_mesh(run.mesh), logical_rules(run.rules):
        responses = sampled_responses(
            params, run.graphdef, run.model_cfg, [prompts[i] for i in asked], tokenizer,
            sampling=sampling, batch_size=min(SAMPLE_BATCH, len(asked)), seed=seed)
    solved = np.zeros(len(problems))
    for i, response in zip(asked, responses):
        solved[i] += synthetic.verify(problems[i], fmt.split(response)[0])
    return solved / samples


def kept_subsets(run: Run, data_cfg: Mapping[str, Any],
                 problem_of: Callable[[Any], synthetic.Exercise],
                 tokenizer: Phi4Tokenizer, fmt: ReasoningFormat,
                 sampling: decode.SamplingParams, initial_params: Callable[[], Any],
                 workdir: str) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
    """Per positive-weight source, the indices (in its train split) of the teachable problems,
    and the counts; (None, {}) when `reasoning.teachable_pool` is 0. `data_cfg` is the run's
    checked data config (`pipeline.checked_data_config`)."""
    r = run.config.reasoning
    if not r.teachable_pool:
        return None, {}
    if jax.process_count() > 1:
        raise ConfigError("reasoning.teachable_pool: the teachability filter samples on one "
                          "process for now; run it on one host, or set it to 0.")
    weights = mixture.normalized_weights(data_cfg["mix"], data_cfg["sources"])
    subsets, counts, params = {}, dict.fromkeys(
        ("teachable_pool", "teachable_kept", "teachable_too_easy", "teachable_too_hard"), 0.0), None
    for name in (n for n, w in weights.items() if w > 0):
        path = os.path.join(workdir, "teachability", f"{name}.npz")
        if os.path.exists(path):
            with np.load(path) as stored:
                indices, rates = stored["indices"], stored["rates"]
        else:
            params = params if params is not None else initial_params()
            spec = data_cfg["sources"][name]
            records = sources.open_checked_records(name, spec, seed=data_cfg["seed"],
                                                   split="train",
                                                   eval_holdout=data_cfg["eval_holdout"])
            problems = bad_records.convert(name, records, problem_of, spec)  # bad ones: None
            pool = [(i, ex) for i in range(min(r.teachable_pool, len(records)))
                    if (ex := problems[i]) is not None]
            logging.info("Teachability: sampling %d x %d responses for data.sources.%s.",
                         len(pool), r.teachable_samples, name)
            indices = np.asarray([i for i, _ in pool], np.int64)
            rates = success_rates(run, params, [ex for _, ex in pool], tokenizer, fmt,
                                  samples=r.teachable_samples, sampling=sampling,
                                  seed=run.config.seed)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                np.savez(f, indices=indices, rates=rates)
            os.replace(path + ".tmp", path)
        keep = (rates >= r.teachable_low) & (rates <= r.teachable_high)
        subsets[name] = indices[keep]
        counts["teachable_pool"] += len(rates)
        counts["teachable_kept"] += int(keep.sum())
        counts["teachable_too_easy"] += int((rates > r.teachable_high).sum())
        counts["teachable_too_hard"] += int((rates < r.teachable_low).sum())
        if not keep.any():
            raise ConfigError(
                f"reasoning.teachable_low/high=[{r.teachable_low}, {r.teachable_high}] keeps none "
                f"of the {len(rates)} problems of data.sources.{name} (success rates "
                f"{np.round(np.quantile(rates, [0, 0.5, 1]), 2).tolist() if len(rates) else []} "
                f"min/median/max); widen the band, enlarge reasoning.teachable_pool, or start "
                f"from a stronger model.")
    logging.info("Teachability: %s", {k: int(v) for k, v in counts.items()})
    return subsets, counts
