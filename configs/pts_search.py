r"""Pivotal Token Search (Phi-4 report section 4.3): pivotal-token DPO pairs from an SFT model.

A job, not training: it samples the model's responses to built-in verifiable questions,
finds the tokens that move p(success) by at least `pts.p_gap`, and writes PTS-DPO pairs
(and whole-response pairs from the same rollouts) to <workdir>/pts/:
  python -m phi4_jax.main --config=configs/pts_search.py --workdir=gs://bucket/phi4-pts \
      --config.init_from=gs://bucket/phi4-sft
  python -m phi4_jax.main --config=configs/pts_search.py:tiny --workdir=/tmp/phi4-pts \
      --config.init_from=/tmp/phi4-sft
then trains on them with PTS-DPO:
  python -m phi4_jax.main --config=configs/dpo.py:tiny,pts --workdir=/tmp/phi4-dpo \
      --config.init_from=/tmp/phi4-sft --config.data.sources.pairs.kind=jsonl \
      --config.data.sources.pairs.paths='/tmp/phi4-pts/pts/pairs-*.jsonl'
(`responses-*.jsonl` holds whole-response pairs from the same rollouts, for plain DPO.)
The argument picks a size of configs/pretrain.py (tiny, toy, 125m, 1b, 14b-4l) and shrinks the
search with it; `--config.pts.task=coding` searches Python exercises graded by unit tests.

Published: the recursive subdivision with the right half searched after the left half; p_gap
0.2 (the report's illustration); questions kept when 0.2 <= p(success) <= 0.8; the pair's
tokens taken from rollouts already sampled. Not published, so documented defaults here: the
production p_gap, rollouts per prefix (up to 32, in adaptive rounds of 8, intervals at 90%),
sampling at temperature 1 without truncation (the model's own distribution, whose success
rate the search estimates), 1024 new tokens, one searched response per question.
"""

import ml_collections

from phi4_jax.config_args import CPU_SIZES, RESEARCH_SIZES, parse_arg, text_tokens
from phi4_jax.config_base import load_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = parse_arg(arg, "configs/pts_search.py", {"size": RESEARCH_SIZES})["size"]
    c = load_config("configs/pretrain.py", size)
    c.stage = "pts_search"
    c.model.remat_policy = "none"
    # Inference: the model replicated over data-parallel groups of 2-way tensor parallelism
    # (phi4-14b's 40 query and 10 KV heads split in 2; 28 GB of bf16 weights per pair).
    c.mesh.update(data=-1, fsdp=1, tensor=2)
    c.pts.update(questions=100_000, batch_rows=256, max_new_tokens=1024)
    c.log.every_steps = 10
    if size:
        c.mesh.tensor = 1
        c.pts.update(questions=1000, max_new_tokens=512, batch_rows=128)
    if size in CPU_SIZES:
        c.pts.update(questions=64, max_new_tokens=text_tokens(size, 96), rollouts=16,
                     rollouts_per_round=8, batch_rows=64, response_pairs=4)
        c.log.every_steps = 8
    return c
