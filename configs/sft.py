r"""Phi-4 SFT (report section 4.1): ChatML conversations, loss on the assistant turns.

Starts from a pretrained (or mid-trained) checkpoint:
  python -m phi4_jax.main --config=configs/sft.py --workdir=gs://bucket/phi4-sft \
      --config.init_from=gs://bucket/phi4-midtrain \
      --config.data.sources.chat.paths='/data/sft/*.jsonl'
The argument picks a size of configs/pretrain.py; `tiny` trains offline on the built-in
exercises as conversations (with 3% unanswerable ones answered "I don't know"):
  python -m phi4_jax.main --config=configs/sft.py:tiny --workdir=/tmp/phi4-sft \
      --config.init_from=/tmp/phi4

Published: lr 1e-6, about 8B tokens, ChatML, 1-5% refusal ("I don't know") data. Not
published, so documented defaults here: batch 1024 x 4096 tokens (4.2M per step, 1907 steps
for 8B tokens), 100 warm-up steps, linear decay, weight decay 0.1 and the refusal share
(0.03). Every other key is pretraining's for the same size (configs/pretrain.py).

Phi-4-mini (3.8B, the o200k tokenizer its size picks) and LoRA are parts of the argument:
  python -m phi4_jax.main --config=configs/sft.py:mini --workdir=... --config.init_from=...
  python -m phi4_jax.main --config=configs/sft.py:mini-tiny,lora --workdir=/tmp/mini-sft   # CPU
`mini` is this recipe on Phi-4-mini's released geometry, rope base 10000 and 131072
positions (PHI4_RECIPE.md, model table). Not published for Phi-4-mini (PHI4_RECIPE.md
has none): its SFT learning rate, batch, tokens and epochs; the numbers above stand as
documented defaults. `mini-tiny` is tiny's run at Phi-4-mini's geometry, 20 steps of 4
rows (config_args.apply_mini). `lora`: rank 16, alpha 32 on every projection, a bf16
backbone off CPU; not published, a documented default.
"""

import ml_collections

from phi4_jax import config_args
from phi4_jax.config_args import CPU_SIZES, POST_TRAINING_SIZES, parse_arg, text_tokens
from phi4_jax.config_base import load_config, source_spec

SFT_TOKENS = 8_000_000_000
REFUSAL_SHARE = 0.03


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = parse_arg(arg, "configs/sft.py", {"size": POST_TRAINING_SIZES,
                                              "adapters": config_args.LORA})
    size = config_args.research_size(parts["size"])
    c = load_config("configs/pretrain.py", size)
    c.stage = "sft"
    c.train.update(lr=1e-6, warmup_steps=100, global_batch=1024, seq_len=4096)
    c.train.steps = SFT_TOKENS // (c.train.global_batch * c.train.seq_len)
    c.data.sources = ml_collections.ConfigDict({
        "chat": source_spec("jsonl", paths="/data/phi4/sft/*.jsonl"),
        "refusal": source_spec("synthetic_unanswerable")})
    c.data.mix = ml_collections.ConfigDict({"chat": 1 - REFUSAL_SHARE, "refusal": REFUSAL_SHARE})
    c.eval.at_start = True
    if size:
        _apply_size(c, size)
    config_args.apply_mini(c, parts["size"])
    if parts["adapters"]:
        config_args.apply_lora(c, parts["size"])
    return c


def _apply_size(c: ml_collections.ConfigDict, size: str) -> None:
    """Research sizes train on the built-in exercises as conversations."""
    c.data.sources.chat = source_spec("synthetic")
    c.train.update(lr=1e-3 if size in CPU_SIZES else 3e-4, warmup_steps=20, global_batch=64,
                   seq_len=512, steps=2000)
    c.eval.update(accuracy_problems=64, max_new_tokens=128)
    if size in CPU_SIZES:
        c.train.update(global_batch=8, seq_len=text_tokens(size, 256), steps=150,
                       warmup_steps=10)
        c.eval.update(every_steps=75, batches=2, accuracy_problems=32,
                      max_new_tokens=text_tokens(size, 96))
        c.checkpoint.every_steps = 75
