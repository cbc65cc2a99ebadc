r"""Phi-4-reasoning SFT: think-then-answer traces at 32K context.

  python -m phi4_jax.main --config=configs/reasoning_sft.py --workdir=... \
      --config.init_from=gs://bucket/phi4 --config.data.sources.chat.paths='/data/traces/*.jsonl'
  python -m phi4_jax.main --config=configs/reasoning_sft.py:tiny --workdir=/tmp/phi4-rsft \
      --config.init_from=/tmp/phi4      # offline: built-in exercises as reasoning traces

SFT (configs/sft.py) with the reasoning template (`sft.template='reasoning'`: a system
message asking for reasoning inside <think>...</think>, the answer after it; the text and
tags are `reasoning.*`). Published: lr 1e-5, 450 warm-up steps, weight decay 1e-4, 32K
context. The RoPE base for 32K is this project's documented choice, not a published number:
500,000, twice the 250,000 that took phi-4 from 4K to 16K.
"""

import ml_collections

from phi4_jax.config_args import CPU_SIZES, RESEARCH_SIZES, parse_arg
from phi4_jax.config_base import load_config

REASONING_CONTEXT = 32_768
REASONING_ROPE_THETA = 500_000.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = parse_arg(arg, "configs/reasoning_sft.py", {"size": RESEARCH_SIZES})["size"]
    c = load_config("configs/sft.py", size)
    c.sft.template = "reasoning"
    c.train.update(lr=1e-5, warmup_steps=450, weight_decay=1e-4)
    if not size:
        c.train.seq_len = REASONING_CONTEXT
        c.model.update(max_positions=REASONING_CONTEXT, rope_theta=REASONING_ROPE_THETA)
        c.train.global_batch = 128
        c.train.steps = 16_000
    else:
        c.train.update(lr=1e-3 if size in CPU_SIZES else 3e-4, warmup_steps=10)
    return c
