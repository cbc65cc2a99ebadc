r"""Phi-4 DPO (report sections 4.2-4.3): preference pairs, on the SFT model as reference.

The argument is a size of configs/pretrain.py, a loss and/or a round, comma-separated:
  python -m phi4_jax.main --config=configs/dpo.py:pts --workdir=... \
      --config.init_from=gs://bucket/phi4-sft --config.data.sources.pairs.paths='/pts/*.jsonl'
  python -m phi4_jax.main --config=configs/dpo.py:judge --workdir=... --config.init_from=...
  python -m phi4_jax.main --config=configs/dpo.py:tiny,pts --workdir=/tmp/phi4-dpo \
      --config.init_from=/tmp/phi4-sft
Variants: the loss (sigmoid, conservative, ipo, hinge, robust, reference_free), `pts`
(round 1: pivotal-token pairs, token ids, one forward per pair) and `judge` (round 2:
whole-response pairs weighted by their judge-score margin). Research sizes train on the
built-in pairs (a worked solution against a corrupted one; unanswerable problems prefer
"I don't know"); with `pts` the pivot is the final answer's first token.

Published: ChatML; round 1 on PTS pairs, round 2 on ~850k judge-scored pairs; 1-5%
hallucination/refusal data in each. Not published, so documented defaults here: beta 0.1,
lr 5e-7 with 50 warm-up steps, batch 256 pairs of 4096 tokens, one epoch of 850k pairs
(3320 steps), the refusal share 0.03.

Phi-4-mini (3.8B, the o200k tokenizer its size picks) and LoRA are parts of the argument:
  python -m phi4_jax.main --config=configs/dpo.py:mini,pts --workdir=... --config.init_from=...
  python -m phi4_jax.main --config=configs/dpo.py:mini-tiny,lora --workdir=/tmp/mini-dpo   # CPU
`mini` is this recipe on Phi-4-mini's released geometry, rope base 10000 and 131072
positions (PHI4_RECIPE.md, model table). Not published for Phi-4-mini (PHI4_RECIPE.md
has none): its DPO beta, learning rate, batch and epochs; the numbers above stand as
documented defaults. `mini-tiny` is tiny's run at Phi-4-mini's geometry, 20 steps of 4
rows (config_args.apply_mini). `lora`: rank 16, alpha 32 on every projection, a bf16
backbone off CPU; not published, a documented default.
"""

import ml_collections

from phi4_jax import config_args
from phi4_jax.config_args import CPU_SIZES, POST_TRAINING_SIZES, parse_arg, text_tokens
from phi4_jax.config_base import load_config, source_spec
from phi4_jax.losses.preference import VARIANTS

JUDGE_PAIRS = 850_000
REFUSAL_SHARE = 0.03
ROUNDS = ("pts", "judge")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = parse_arg(arg, "configs/dpo.py",
                      {"size": POST_TRAINING_SIZES, "loss": VARIANTS,
                       "round": ROUNDS, "adapters": config_args.LORA})
    size = config_args.research_size(parts["size"])
    c = load_config("configs/pretrain.py", size)
    c.stage = "dpo"
    c.train.update(lr=5e-7, warmup_steps=50, global_batch=256, seq_len=4096, weight_decay=0.0,
                   steps=JUDGE_PAIRS // 256)
    c.data.sources = ml_collections.ConfigDict({
        "pairs": source_spec("jsonl", paths="/data/phi4/dpo/*.jsonl"),
        "refusal": source_spec("synthetic_unanswerable")})
    c.data.mix = ml_collections.ConfigDict({"pairs": 1 - REFUSAL_SHARE, "refusal": REFUSAL_SHARE})
    c.eval.at_start = True
    for variant in (parts["loss"], parts["round"]):
        if variant:
            _apply_variant(c, variant)
    if size:
        _apply_size(c, size)
    config_args.apply_mini(c, parts["size"])
    if parts["adapters"]:
        config_args.apply_lora(c, parts["size"])
    return c


def _apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
    if variant == "pts":
        c.dpo.pair_format = "pivotal_token"
    elif variant == "judge":
        c.dpo.judge_weighting = "margin"
    else:
        c.dpo.variant = variant
        c.dpo.length_normalize = variant == "ipo"
        c.dpo.label_smoothing = 0.1 if variant in ("conservative", "robust") else 0.0


def _apply_size(c: ml_collections.ConfigDict, size: str) -> None:
    """Research sizes train on the built-in pairs."""
    c.data.sources.pairs = source_spec("synthetic")
    c.train.update(lr=1e-5, warmup_steps=10, global_batch=32, seq_len=512, steps=500)
    c.eval.update(accuracy_problems=64, max_new_tokens=128)
    if size in CPU_SIZES:
        c.train.update(lr=1e-4, global_batch=8, seq_len=text_tokens(size, 256), steps=60,
                       warmup_steps=5)
        c.eval.update(every_steps=30, batches=2, accuracy_problems=32,
                      max_new_tokens=text_tokens(size, 96))
        c.checkpoint.every_steps = 30
