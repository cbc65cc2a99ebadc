r"""Phi-4-reasoning-plus: GRPO on verifiable math problems with a rule-based reward.

  python -m phi4_jax.main --config=configs/grpo.py --workdir=... \
      --config.init_from=gs://bucket/phi4-reasoning \
      --config.data.sources.problems.paths='/data/math/*.jsonl'   # {"question", "answer"}
  python -m phi4_jax.main --config=configs/grpo.py:tiny --workdir=/tmp/phi4-grpo \
      --config.init_from=/tmp/phi4-rsft   # offline: built-in exercises

Each step samples `grpo.group_size` responses to each of `train.global_batch` problems with
the current model, rewards them (+1 correct, -0.5 wrong, plus format and length terms) and
takes one clipped-ratio step with a KL term to the starting model.
Published: 72,401 problems, 64 per iteration, about 90 iterations; sampling at temperature
0.8, top-k 50, top-p 0.95; the reasoning template at 32K. Not published, so documented
defaults here: group size 8, up to 4096 new tokens, lr 5e-8, KL coefficient 0.001, clip 0.2,
the format and length penalties (-0.5 each).

Phi-4-mini (3.8B, the o200k tokenizer its size picks) and LoRA are parts of the argument:
  python -m phi4_jax.main --config=configs/grpo.py:mini --workdir=... --config.init_from=...
  python -m phi4_jax.main --config=configs/grpo.py:mini-tiny,lora --workdir=/tmp/mini-grpo   # CPU
`mini` is this recipe on Phi-4-mini's released geometry, rope base 10000 and 131072
positions (PHI4_RECIPE.md, model table). Not published for Phi-4-mini (PHI4_RECIPE.md
has none): its GRPO learning rate, group size, batch and iterations; the numbers above stand as
documented defaults. `mini-tiny` is tiny's run at Phi-4-mini's geometry, 20 steps of 4
rows (config_args.apply_mini). `lora`: rank 16, alpha 32 on every projection, a bf16
backbone off CPU; not published, a documented default.
"""

import ml_collections

from phi4_jax import config_args
from phi4_jax.config_args import CPU_SIZES, POST_TRAINING_SIZES, parse_arg, text_tokens
from phi4_jax.config_base import load_config, source_spec


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = parse_arg(arg, "configs/grpo.py", {"size": POST_TRAINING_SIZES,
                                               "adapters": config_args.LORA})
    size = config_args.research_size(parts["size"])
    c = load_config("configs/reasoning_sft.py", size)
    c.stage = "grpo"
    c.train.update(lr=5e-8, warmup_steps=0, weight_decay=0.0, global_batch=64, steps=90)
    c.grpo.max_new_tokens = 4096
    c.data.sources = ml_collections.ConfigDict({
        "problems": source_spec("jsonl", paths="/data/phi4/grpo/*.jsonl")})
    c.data.mix = ml_collections.ConfigDict({"problems": 1.0})
    c.eval.at_start = True
    if size:
        c.data.sources.problems = source_spec("synthetic")
        c.train.update(lr=1e-4, global_batch=16, seq_len=384, steps=60)
        c.grpo.update(group_size=8, max_new_tokens=128)
        c.eval.update(every_steps=20, batches=1, accuracy_problems=64, max_new_tokens=128)
        if size in CPU_SIZES:
            c.train.update(global_batch=8, seq_len=text_tokens(size, 256), steps=30)
            c.grpo.update(group_size=4, max_new_tokens=text_tokens(size, 96))
            c.eval.update(every_steps=10, accuracy_problems=32,
                          max_new_tokens=text_tokens(size, 96))
            c.checkpoint.every_steps = 10
    config_args.apply_mini(c, parts["size"])
    if parts["adapters"]:
        config_args.apply_lora(c, parts["size"])
    return c
