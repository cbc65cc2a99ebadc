r"""Phi-4 pretraining (report section 3): 14B, 4K context, ~10T tokens of a five-source mix.

The default is the paper's recipe on a pod:
  python -m phi4_jax.main --config=configs/pretrain.py --workdir=gs://bucket/phi4-pretrain \
      --config.data.sources.web.paths='/data/web/*.jsonl' ...
The argument picks a size or variant and shrinks what must shrink with it:
  python -m phi4_jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/phi4   # CPU, minutes
  python -m phi4_jax.main --config=configs/pretrain.py:toy --workdir=/tmp/toy     # CPU, seconds
(`toy` is tiny on the 512-id bytes tokenizer; every stage config takes it, with the lengths
that hold chat text 4x tiny's: config_args.text_tokens.)
  python -m phi4_jax.main --config=configs/pretrain.py:125m --workdir=...         # one GPU
  python -m phi4_jax.main --config=configs/pretrain.py:1b --workdir=...
Ablate the mix with overrides:
  --config.data.mix.synthetic=0.5
  --config.data.mix="{'web': 0.5, 'code': 0.5}"

Published: peak lr 3e-4, linear warm-up then decay, weight decay 0.1, global batch 5760,
4096 context, ~10T tokens, the mix below and its unique-token counts. Not published, so
documented defaults here: warm-up length (5000 steps), pretraining rope base (10000; the
released 16K model uses 250000 after mid-training), AdamW betas (0.9, 0.95), clip 1.0.
"""

import ml_collections

from phi4_jax.config_args import CPU_SIZES, RESEARCH_SIZES, parse_arg
from phi4_jax.config_base import base_config, source_spec

# Mix by tokens and unique tokens per source, as tabulated in the Phi-4 report.
PAPER_MIX = {"web": 0.15, "web_rewrites": 0.15, "synthetic": 0.40, "code": 0.20, "books": 0.10}
PAPER_UNIQUE_TOKENS = {"web": 1_300_000_000_000, "web_rewrites": 290_000_000_000,
                       "synthetic": 290_000_000_000, "code": 820_000_000_000,
                       "books": 580_000_000_000}
PAPER_TOTAL_TOKENS = 10_000_000_000_000

# Research sizes (config_args.RESEARCH_SIZES): (model size, sequence length, global batch,
# steps, peak lr, warm-up).
# toy is tiny on the 512-id bytes tokenizer: the same run, a step in milliseconds.
VARIANTS = {
    "tiny": ("tiny", 128, 8, 120, 3e-3, 10),
    "toy": ("toy", 128, 8, 120, 3e-3, 10),
    "125m": ("125m", 2048, 64, 20_000, 1e-3, 1000),
    "1b": ("1b", 4096, 256, 50_000, 4e-4, 2000),
    "14b-4l": ("phi4-14b-4l", 4096, 8, 1000, 3e-4, 100),
}


def _paper_sources() -> ml_collections.ConfigDict:
    """Pod data: JSONL shards per source (set `paths`), synthetic and code also built in."""
    sources = {name: source_spec("jsonl", paths=f"/data/phi4/{name}/*.jsonl",
                                 unique_tokens=PAPER_UNIQUE_TOKENS[name]) for name in PAPER_MIX}
    return ml_collections.ConfigDict(sources)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = parse_arg(arg, "configs/pretrain.py", {"size": RESEARCH_SIZES})["size"]
    c = base_config()
    c.stage = "pretrain"
    c.model.size = "phi4-14b"
    c.model.rope_theta = 10_000.0
    c.model.max_positions = 4096
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.train.seq_len = 4096
    c.train.global_batch = 5760
    c.train.microbatches = 1
    c.train.steps = PAPER_TOTAL_TOKENS // (5760 * 4096)  # 423,855 steps of 23.6M tokens
    c.train.lr = 3e-4
    c.train.warmup_steps = 5000
    c.train.schedule = "linear"
    c.train.weight_decay = 0.1
    c.data.sources = _paper_sources()
    c.data.mix = ml_collections.ConfigDict(PAPER_MIX)
    c.eval.every_steps = 1000
    c.eval.batches = 16
    c.log.every_steps = 10
    c.checkpoint.every_steps = 1000
    if size:
        _apply_size(c, size)
    return c


def _apply_size(c: ml_collections.ConfigDict, name: str) -> None:
    size, seq_len, batch, steps, lr, warmup = VARIANTS[name]
    c.model.size = size
    c.train.update(seq_len=seq_len, global_batch=batch, steps=steps, lr=lr, warmup_steps=warmup)
    c.model.max_positions = max(seq_len, 4096)
    # Research sizes train on the built-in offline sources unless paths are given.
    c.data.sources.synthetic = source_spec("synthetic")
    c.data.sources.code = source_spec("python_stdlib")
    c.data.mix = ml_collections.ConfigDict({"synthetic": 0.6, "code": 0.4})
    if name in CPU_SIZES:
        c.model.compute_dtype = "float32"
        c.model.remat_policy = "none"
        c.eval.update(every_steps=40, batches=2)
        c.log.every_steps = 10
        c.checkpoint.every_steps = 60
        c.data.read_threads = 2
    else:
        c.eval.update(every_steps=500, batches=8)
        c.checkpoint.every_steps = 1000
