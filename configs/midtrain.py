r"""Phi-4 mid-training (report section 3.3): the pretrained model's context extended 4K -> 16K.

Starts from a pretraining checkpoint (parameters only, onto this run's mesh):
  python -m phi4_jax.main --config=configs/midtrain.py --workdir=gs://bucket/phi4-midtrain \
      --config.init_from=gs://bucket/phi4-pretrain \
      --config.data.sources.long.paths='/data/long/*.jsonl' ...
The argument picks the same sizes as configs/pretrain.py; `tiny` runs offline on CPU, its long
documents the built-in long-range recall family:
  python -m phi4_jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/phi4
  python -m phi4_jax.main --config=configs/midtrain.py:tiny --workdir=/tmp/phi4-mid \
      --config.init_from=/tmp/phi4

The diff from pretraining (everything else is configs/pretrain.py's for the same argument):
  - context x4: train.seq_len and model.max_positions 4096 -> 16384 (tiny, toy 128 -> 512);
  - model.rope_theta 1e4 -> 2.5e5 (published: the released 16K model's base);
  - train.lr / 10 (published), warm-up 1/10 of pretraining's (not published);
  - 250B tokens (published); tokens per step kept, so rows per step / 4 (not published);
  - data: 30% long documents (`long`, documents of at least 8192 tokens, packed whole) and 70%
    replay of the pretraining sources at their pretraining weights (published shares);
  - evaluation also reports the held-out loss in 8 position buckets, before the first step
    and at every eval (`eval.position_buckets`);
  - research sizes: steps as in MID_STEPS (about 2.5% of pretraining's, the paper's 250B/10T,
    and at least enough for the tiny run to show an effect).
"""

import ml_collections

from phi4_jax.config_args import RESEARCH_SIZES, parse_arg
from phi4_jax.config_base import load_config, source_spec

CONTEXT_FACTOR = 4  # 4K -> 16K
ROPE_THETA = 250_000.0
LR_DIVISOR = 10
MIDTRAIN_TOKENS = 250_000_000_000
LONG_SHARE = 0.30
LONG_MIN_TOKENS = 8192  # "documents longer than 8K tokens"
MID_STEPS = {"tiny": 80, "toy": 80, "125m": 500, "1b": 1250, "14b-4l": 100}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = parse_arg(arg, "configs/midtrain.py", {"size": RESEARCH_SIZES})["size"]
    c = load_config("configs/pretrain.py", size)
    c.model.rope_theta = ROPE_THETA
    c.train.seq_len *= CONTEXT_FACTOR
    c.model.max_positions = max(c.model.max_positions, c.train.seq_len)
    c.train.global_batch = max(c.train.global_batch // CONTEXT_FACTOR, 1)
    c.train.lr /= LR_DIVISOR
    c.train.warmup_steps = max(c.train.warmup_steps // 10, 1)
    tokens_per_step = c.train.global_batch * c.train.seq_len
    c.train.steps = MID_STEPS[size] if size else MIDTRAIN_TOKENS // tokens_per_step
    long = (source_spec("synthetic_long_range", min_tokens=c.train.seq_len // 2) if size else
            source_spec("jsonl", paths="/data/phi4/long/*.jsonl", min_tokens=LONG_MIN_TOKENS))
    replay = {name: round(weight * (1 - LONG_SHARE), 6) for name, weight in c.data.mix.items()}
    c.data.sources.long = long
    c.data.mix = ml_collections.ConfigDict({"long": LONG_SHARE, **replay})
    c.eval.update(at_start=True, position_buckets=8)
    return c
