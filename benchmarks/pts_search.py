r"""Pivotal Token Search throughput: rollouts per second, new tokens per second, pivots per
minute, and what one searched response costs (prefixes sampled, sampler calls).

  python benchmarks/pts_search.py --size tiny --questions 8 --write benchmarks/RESULTS_pts.md
  python benchmarks/pts_search.py --size tiny --init_from /tmp/phi4-sft --verifier task \
      --questions 16 --write benchmarks/RESULTS_pts.md
  # one GPU, the ~1B size (written down, not run here):
  python benchmarks/pts_search.py --size 1b --compute_dtype bfloat16 --questions 64 \
      --max_new_tokens 512 --batch_rows 256 --write benchmarks/RESULTS_pts.md

`--verifier parity` accepts a response when the sum of its token ids is even: p(success) is
about 1/2 for any prefix of any model, so every question is searched (the final token is
always pivotal) and the numbers measure the machinery on random weights; `--verifier task`
uses the task's real verifier (a trained `--init_from` checkpoint). The first question
(compilation) is timed apart; the rest are the steady state. On CPU absolute numbers are
context only.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import jax
from absl import app, flags
from flax import nnx

from phi4_jax.config_base import load_config, validate_config
from phi4_jax.data.tokenizer import load_tokenizer
from phi4_jax.evals.verifiable import chat_prompt
from phi4_jax.model.transformer import init_model
from phi4_jax.sampling import decode
from phi4_jax.search import job, verifiers
from phi4_jax.search.model_scorer import QuestionRollouts, RolloutModel

_SIZE = flags.DEFINE_string("size", "tiny", "A size of configs/pts_search.py.")
_INIT = flags.DEFINE_string("init_from", "", "A checkpoint to sample ('' = random weights).")
_VERIFIER = flags.DEFINE_enum("verifier", "parity", ["parity", "task"], "How rollouts are judged.")
_QUESTIONS = flags.DEFINE_integer("questions", 8, "Questions searched after the warm-up one.")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 16, "Most rollouts per prefix.")
_ROUND = flags.DEFINE_integer("rollouts_per_round", 8, "Adaptive round size (0: one round).")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Response budget in tokens.")
_ROWS = flags.DEFINE_integer("batch_rows", 64, "Most rollouts sampled at once.")
_DTYPE = flags.DEFINE_string("compute_dtype", "float32", "Compute dtype (bfloat16 on GPU).")
_WRITE = flags.DEFINE_string("write", "", "Append the results to this markdown file.")


def _config():
    config = load_config("configs/pts_search.py", _SIZE.value)
    config.model.compute_dtype = _DTYPE.value
    config.init_from = _INIT.value
    config.pts.update(rollouts=_ROLLOUTS.value, rollouts_per_round=_ROUND.value,
                      max_new_tokens=_NEW.value, batch_rows=_ROWS.value)
    if _VERIFIER.value == "parity":
        config.pts.update(min_success=0.0, max_success=1.0)
    validate_config(config)
    return config


def _model(config, tokenizer) -> RolloutModel:
    if config.init_from:
        return job.load_rollout_model(config, validate_config(config), tokenizer)[0]
    cfg = validate_config(config)
    graphdef, params = nnx.split(init_model(cfg, config.seed))
    sampling = decode.SamplingParams(max_new_tokens=config.pts.max_new_tokens,
                                     stop_ids=(tokenizer.im_end_id, tokenizer.eot_id),
                                     pad_id=tokenizer.pad_id, draw="inverse_cdf")
    return RolloutModel(nnx.to_pure_dict(params), graphdef, cfg, sampling, config.seed,
                        config.pts.batch_rows)


def _search(config, model, tokenizer, question_id):
    problem = verifiers.problem(config.pts.task, config.data.seed, question_id)
    if _VERIFIER.value == "parity":
        def outcomes(responses):
            return [sum(r) % 2 == 0 for r in responses]
    else:
        def outcomes(responses):
            return job.response_outcomes(responses, problem_=problem, tokenizer=tokenizer,
                                         stop_ids=model.sampling.stop_ids,
                                         workers=config.pts.verifier_workers)
    sampler = QuestionRollouts(model, chat_prompt(problem.question, tokenizer), question_id,
                               outcomes)
    return job.search_with(sampler, config.pts), sampler


def main(argv):
    del argv
    config, tokenizer = _config(), load_tokenizer("phi4")
    model = _model(config, tokenizer)
    start = time.perf_counter()
    _search(config, model, tokenizer, 10**6)
    warm_up = time.perf_counter() - start
    totals = dict(kept=0, searched=0, pivots=0, pairs=0, rollouts=0, tokens=0, prefixes=0,
                  calls=0)
    start = time.perf_counter()
    for question_id in range(_QUESTIONS.value):
        result, sampler = _search(config, model, tokenizer, question_id)
        totals["kept"] += result.kept
        totals["searched"] += len(result.responses)
        totals["pivots"] += len(result.pivots)
        totals["pairs"] += len(result.pairs)
        totals["rollouts"] += sampler.rows
        totals["tokens"] += sampler.tokens
        totals["prefixes"] += sum(bool(e.rollouts) for e in result.estimates.values())
        totals["calls"] += result.scorer_calls
    seconds = time.perf_counter() - start
    row = (f"| {_SIZE.value} | {_VERIFIER.value} | {_QUESTIONS.value} | {totals['kept']} | "
           f"{totals['pivots']} | {totals['pairs']} | {totals['rollouts']} | "
           f"{totals['prefixes'] / max(totals['searched'], 1):.1f} | "
           f"{totals['calls'] / _QUESTIONS.value:.1f} | {warm_up:.1f} | {seconds:.1f} | "
           f"{totals['rollouts'] / seconds:.1f} | {totals['tokens'] / seconds:.0f} | "
           f"{60 * totals['pivots'] / seconds:.1f} |")
    print(row, flush=True)
    if _WRITE.value:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        header = (f"\n## Search throughput, run of {now}\n\n"
                  f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
                  f"cores, {jax.devices()[0].device_kind}; load average {os.getloadavg()}; "
                  f"jax {jax.__version__}\n"
                  f"- command: `python benchmarks/pts_search.py --size {_SIZE.value} "
                  f"--init_from '{_INIT.value}' --verifier {_VERIFIER.value} --questions "
                  f"{_QUESTIONS.value} --rollouts {_ROLLOUTS.value} --rollouts_per_round "
                  f"{_ROUND.value} --max_new_tokens {_NEW.value} --batch_rows {_ROWS.value} "
                  f"--compute_dtype {_DTYPE.value}`\n\n"
                  "| size | verifier | questions | kept | pivots | pairs | rollouts | prefixes "
                  "sampled / response | sampler calls / question | warm-up s | s | rollouts/s | "
                  "new tokens/s | pivots/min |\n"
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        with open(_WRITE.value, "a", encoding="utf-8") as f:
            f.write(header + row + "\n")


if __name__ == "__main__":
    app.run(main)
