"""Every run-config key, declared once with its default, and the validation of the keys the
engine reads.

Stage configs (`configs/<stage>.py`) start from `base_config()` and change values; they
never add keys. `validate_config` checks the shared sections (model, lora, train, mesh, eval,
log, checkpoint) before anything is built; the data config is checked by
`data.pipeline.checked_data_config`, and each stage's or job's own section by its module
(`stages/<stage>.py`, `search/job.py`), once per start. Each error names the key, the bad
value and the fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from pathlib import Path

import ml_collections

from phi4_jax.data import pipeline, synthetic
from phi4_jax.data.synthetic import reasoning
from phi4_jax.data.sources import SPEC_DEFAULTS, SYNTHETIC_SPAN
from phi4_jax.data.tokenizer import TOKENIZER_NAMES, vocab_size_of
from phi4_jax.errors import ConfigError, require
from phi4_jax.model.config import SIZE_NAMES, ModelConfig, model_config_for
from phi4_jax.model.lora import LoRAConfig
from phi4_jax.parallel.sharding import MESH_AXES

SCHEDULES = ("linear", "cosine")

# Logical axis -> mesh axes. FSDP shards weights over their `embed` dimension, tensor
# parallelism splits heads and the MLP width, the batch spans data and fsdp, and context
# parallelism splits each row's positions over `sequence` (model.attention.context_parallel).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
)

# The built-in offline sources; the tiny configs mix these two.
BUILTIN_SOURCES = {
    "synthetic": {"kind": "synthetic"},
    "code": {"kind": "python_stdlib"},
}


def source_spec(kind: str, **fields) -> ml_collections.ConfigDict:
    """A data-source spec with every field declared, the defaults `sources.SPEC_DEFAULTS` gives
    (see phi4_jax.data.sources; the bad-record policy keys: phi4_jax.data.bad_records)."""
    return ml_collections.ConfigDict({**SPEC_DEFAULTS, "kind": kind, **fields})


def base_config() -> ml_collections.ConfigDict:
    """All keys with neutral defaults; stage configs set the recipe's values."""
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"
    c.seed = 0
    # Starting parameters: a phi4_jax workdir / checkpoints folder / step folder, or a
    # microsoft/phi-4-format Hugging Face directory; '' initializes afresh. Parameters only.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.size = "tiny"
    c.model.rope_theta = 10_000.0
    c.model.max_positions = 4096
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.attention_impl = "auto"
    c.model.attention_block_size = 512
    c.model.remat_policy = "none"
    c.model.scan_unroll = 0  # layers per layer-loop iteration; 0: all on CPU without remat, else 1

    # Low-rank adapters on a frozen backbone (phi4_jax.model.lora); rank 0 trains the whole
    # model. Targets from q, k, v, o, gate, up, down. A record picks its adapter with
    # `"adapter": k` (an index into lora.adapters, -1 for none; no field: the first), and a
    # row's loss trains that adapter alone (phi4_jax.data.adapters).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.targets = ("q", "k", "v", "o")
    c.lora.adapters = ("default",)
    c.lora.backbone_dtype = ""  # '' = model.param_dtype; 'bfloat16' halves the frozen weights

    c.train = ml_collections.ConfigDict()
    c.train.seq_len = 4096
    c.train.global_batch = 8
    c.train.microbatches = 1
    c.train.steps = 100  # 0: evaluate init_from once, train and save nothing
    c.train.lr = 3e-4
    c.train.warmup_steps = 10
    c.train.schedule = "linear"
    c.train.final_lr_fraction = 0.0
    c.train.weight_decay = 0.1
    c.train.decay_norms = False
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0
    # Positions per chunk of the LM head and loss: [B, chunk, V] float32 logits live at once,
    # never [B, T, V].
    c.train.loss_chunk_tokens = 1024

    c.mesh = ml_collections.ConfigDict({axis: 1 for axis in MESH_AXES})
    c.mesh.fsdp = -1
    c.mesh.rules = DEFAULT_RULES

    c.data = ml_collections.ConfigDict(pipeline.DATA_DEFAULTS)  # the keys, declared there
    c.data.sources = ml_collections.ConfigDict(
        {name: source_spec(**spec) for name, spec in BUILTIN_SOURCES.items()})

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 50
    c.eval.batches = 2
    c.eval.at_start = False  # also evaluate the starting model (before the first step)
    # Greedy accuracy on held-out built-in problems (0 = off); see phi4_jax.evals.verifiable.
    c.eval.accuracy_problems = 0
    # comma-separated synthetic families to draw them from; '' = all textbook ones
    c.eval.accuracy_families = ""
    c.eval.max_new_tokens = 128
    # The accuracy problems start this far into the eval span: a validation set apart from the
    # problems a report quotes (which start at 0).
    c.eval.accuracy_offset = 0
    # End the run at the first eval whose greedy `accuracy` reaches this (0 = off): early
    # stopping, on the problems at eval.accuracy_offset. The last checkpoint is that step.
    c.eval.stop_at_accuracy = 0.0
    # Held-out loss in this many equal position buckets of the row (0 = off), as metrics
    # `loss_pos<lo>-<hi>`: does the loss keep falling late in long rows? (pretrain stage)
    c.eval.position_buckets = 0

    # Supervised fine-tuning (stage 'sft'): over-long conversations are 'drop'ped or
    # 'truncate'd to train.seq_len + 1 tokens; either way counted.
    c.sft = ml_collections.ConfigDict()
    c.sft.truncation = "truncate"
    c.sft.template = "chat"  # or 'reasoning': built-in exercises as think-then-answer traces

    # DPO (stage 'dpo'); see phi4_jax.losses.preference and phi4_jax.data.preference.
    c.dpo = ml_collections.ConfigDict()
    c.dpo.variant = "sigmoid"
    c.dpo.beta = 0.1
    c.dpo.label_smoothing = 0.0  # eps of the conservative and robust variants
    c.dpo.length_normalize = False  # mean instead of summed response log-probs (IPO: True)
    c.dpo.reference = "on_the_fly"  # or 'precomputed': scored once, stored in the workdir
    c.dpo.pair_format = "sequence"  # or 'pivotal_token' (PTS pairs: one forward per pair)
    c.dpo.judge_weighting = "none"  # or 'margin': weight pairs by their judge-score margin
    c.dpo.judge_margin_scale = 5.0
    c.dpo.judge_min_weight = 0.1

    # The think-then-answer format (Phi-4-reasoning); see phi4_jax.data.synthetic.reasoning.
    c.reasoning = ml_collections.ConfigDict()
    c.reasoning.system = reasoning.DEFAULT_SYSTEM
    c.reasoning.think_open = "<think>"
    c.reasoning.think_close = "</think>"
    # The teachability filter (reasoning SFT and GRPO): before training, the first
    # `teachable_pool` problems of each source are answered `teachable_samples` times by the
    # starting model (sampled as grpo.* says); only those solved at a rate within
    # [teachable_low, teachable_high] are trained on. 0 = off. The band is a choice: the
    # report keeps prompts at the edge of the model's ability without publishing its bounds.
    c.reasoning.teachable_pool = 0
    c.reasoning.teachable_samples = 8
    c.reasoning.teachable_low = 0.1
    c.reasoning.teachable_high = 0.9

    # GRPO (stage 'grpo'): train.global_batch problems per step, group_size responses each.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.group_size = 8
    c.grpo.max_new_tokens = 1024
    c.grpo.temperature = 0.8
    c.grpo.top_k = 50
    c.grpo.top_p = 0.95
    c.grpo.clip_low = 0.2
    c.grpo.clip_high = 0.2
    c.grpo.kl_coef = 0.001
    c.grpo.normalization = "sequence"  # or 'token'
    c.grpo.scale_by_std = True
    # 'simple': the four values below; 'phi4_reasoning': Phi-4-reasoning-plus's length-aware
    # reward (report section 4.1), its token lengths times reward_length_scale (1.0: the report's
    # 31,744-token L_max; grpo.max_new_tokens / 31744 puts L_max at this run's budget).
    c.grpo.reward = "simple"
    c.grpo.reward_length_scale = 1.0
    c.grpo.reward_correct = 1.0
    c.grpo.reward_wrong = -0.5
    c.grpo.format_penalty = -0.5
    c.grpo.overlong_penalty = -0.5

    # Pivotal Token Search (stage 'pts_search': a job, not training); see phi4_jax.search.
    c.pts = ml_collections.ConfigDict()
    c.pts.task = "synthetic"  # or 'coding' (Python functions graded by unit tests, sandboxed)
    c.pts.first_question = 0  # questions [first, first + questions) of the training stream
    c.pts.families = ""  # task 'synthetic': comma-separated exercise families; '' = all textbook ones
    c.pts.questions = 1000
    c.pts.responses_per_question = 1  # sampled responses searched per kept question
    c.pts.p_gap = 0.2
    c.pts.min_success = 0.2  # a question is kept when min <= p(success | question) <= max
    c.pts.max_success = 0.8
    c.pts.rollouts = 32  # most rollouts per prefix
    c.pts.rollouts_per_round = 8  # adaptive rounds (0: all at once, no early stop)
    c.pts.confidence = 0.9  # each estimate's interval holds p with at least this probability
    c.pts.split = "log_prob"  # 'log_prob': cumulative log-prob midpoint; 'index': n // 2
    c.pts.max_new_tokens = 1024  # response budget; a rollout gets what its prefix leaves
    c.pts.temperature = 1.0
    c.pts.top_k = 0
    c.pts.top_p = 1.0
    c.pts.batch_rows = 256  # rollouts sampled at once, a multiple of the batch-sharded devices
    c.pts.response_pairs = 4  # whole-response (correct, incorrect) pairs per kept question
    c.pts.verifier_workers = 8  # sandboxed checks run at once (task 'coding')
    c.pts.code_time_limit_s = 5.0
    c.pts.code_memory_mb = 512

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.tensorboard = True
    c.log.progress_bar = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.memory = ml_collections.ConfigDict()
    c.memory.check = True
    c.memory.device_bytes = 0  # 0: ask the device (host RAM share on CPU)
    return c


def build_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The typed model config: the named size with the run's numerics and rope base."""
    m, a = config.model, config.lora
    adapters = LoRAConfig(rank=a.rank, alpha=a.alpha, targets=tuple(a.targets),
                          adapters=tuple(a.adapters), backbone_dtype=a.backbone_dtype)
    return model_config_for(
        m.size, rope_theta=float(m.rope_theta), max_positions=int(m.max_positions),
        param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, attention_impl=m.attention_impl,
        attention_block_size=int(m.attention_block_size), remat_policy=m.remat_policy,
        scan_unroll=int(m.scan_unroll), max_segments_per_row=int(config.data.max_segments_per_row),
        lora=adapters if a.rank else None)



def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Checks the whole config before anything is built; returns the model config."""
    require(config.model.size in SIZE_NAMES, "model.size", config.model.size,
            f"choose one of {', '.join(SIZE_NAMES)}.")
    segments = config.data.max_segments_per_row
    require(isinstance(segments, int) and not isinstance(segments, bool) and segments >= 1,
            "data.max_segments_per_row", segments,
            "give an integer >= 1 (32 is MaxText's bound; 1 = one document per row).")
    rank = config.lora.rank
    require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0, "lora.rank",
            rank, "give an integer >= 0 (0 trains the whole model, no adapters).")
    model_cfg = build_model_config(config)
    vocabularies = {vocab_size_of(name): name for name in TOKENIZER_NAMES}
    require(model_cfg.vocab_size in vocabularies, "model.size", config.model.size,
            f"its vocabulary of {model_cfg.vocab_size} matches no tokenizer "
            f"({vocabularies}); choose a size with one of those.")
    t = config.train
    for key in ("seq_len", "global_batch", "microbatches", "loss_chunk_tokens"):
        require(isinstance(t[key], int) and t[key] > 0, f"train.{key}", t[key],
                "must be a positive integer.")
    require(isinstance(t.steps, int) and t.steps >= 0, "train.steps", t.steps,
            "must be an integer >= 0 (0 evaluates --config.init_from and trains nothing).")
    require(t.steps or config.init_from, "train.steps", t.steps,
            "0 evaluates the starting checkpoint; give it with --config.init_from=DIR.")
    require(t.seq_len <= model_cfg.max_positions, "train.seq_len", t.seq_len,
            f"exceeds model.max_positions={model_cfg.max_positions}; raise "
            f"--config.model.max_positions or shorten the sequence.")
    require(t.global_batch % t.microbatches == 0, "train.microbatches", t.microbatches,
            f"must divide train.global_batch={t.global_batch}.")
    require(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "must be a positive number.")
    require(0 <= t.warmup_steps and (t.steps == 0 or t.warmup_steps <= t.steps),
            "train.warmup_steps", t.warmup_steps, f"must lie in [0, train.steps={t.steps}].")
    require(t.schedule in SCHEDULES, "train.schedule", t.schedule, f"choose one of {SCHEDULES}.")
    require(0.0 <= t.final_lr_fraction <= 1.0, "train.final_lr_fraction", t.final_lr_fraction,
            "must lie in [0, 1].")
    require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0.")
    require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables).")
    require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1/b2", (t.b1, t.b2), "must lie in [0, 1).")
    for section in ("eval", "log", "checkpoint"):
        value = config[section].every_steps
        require(isinstance(value, int) and value > 0, f"{section}.every_steps", value,
                "must be a positive integer.")
    require(config.checkpoint.keep > 0, "checkpoint.keep", config.checkpoint.keep,
            "must keep at least one checkpoint.")
    _validate_eval(config.eval)
    for axis in MESH_AXES:
        require(isinstance(config.mesh[axis], int), f"mesh.{axis}", config.mesh[axis],
                "must be an integer size (or -1 to fill the remaining devices).")
    samplers = [name for name, on in (("stage=grpo", config.stage == "grpo"),
                                      ("eval.accuracy_problems", config.eval.accuracy_problems),
                                      ("reasoning.teachable_pool", config.reasoning.teachable_pool))
                if on]
    require(config.mesh.sequence == 1 or not samplers, "mesh.sequence", config.mesh.sequence,
            f"decoding does not split rows over a sequence axis, and {', '.join(samplers)} "
            f"decodes; set --config.mesh.sequence=1 or turn those off.")
    for rule in config.mesh.rules:
        targets = (rule[1],) if isinstance(rule[1], str) or rule[1] is None else tuple(rule[1])
        require(len(rule) == 2 and all(a is None or a in MESH_AXES for a in targets),
                "mesh.rules", rule, f"each rule is (logical_name, mesh axis or tuple of {MESH_AXES}).")
    return model_cfg


REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_config(spec: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """A stage config as `--config=FILE[:ARG]` loads it: `get_config(ARG)` of FILE.

    FILE is a path, or a name under the repository's `configs/` (`pretrain.py:tiny`). Tests,
    benchmarks and configs that derive from another stage's config all load through here.
    """
    spec = str(spec)
    if arg is None and ":" in spec:
        spec, arg = spec.split(":", 1)
    path = Path(spec)
    if not path.is_file():
        path = REPO_CONFIGS / Path(spec).name
    if not path.is_file():
        raise ConfigError(f"config file {spec!r} not found (looked in the working directory and "
                          f"{REPO_CONFIGS}).")
    module_spec = importlib.util.spec_from_file_location(f"phi4_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _validate_eval(e: ml_collections.ConfigDict) -> None:
    for key in ("accuracy_problems", "max_new_tokens", "accuracy_offset"):
        require(isinstance(e[key], int) and e[key] >= 0, f"eval.{key}", e[key],
                "must be an integer >= 0.")
    require(e.accuracy_offset + e.accuracy_problems < SYNTHETIC_SPAN, "eval.accuracy_offset",
            e.accuracy_offset, f"with eval.accuracy_problems must stay within the eval span "
            f"({SYNTHETIC_SPAN} problems).")
    require(0 <= e.stop_at_accuracy <= 1, "eval.stop_at_accuracy", e.stop_at_accuracy,
            "must lie in [0, 1] (0 = off).")
    require(not e.stop_at_accuracy or e.accuracy_problems, "eval.stop_at_accuracy",
            e.stop_at_accuracy, "needs greedy accuracy: set eval.accuracy_problems > 0.")
    check_families(e.accuracy_families, "eval.accuracy_families")


# Names other trainers use, suggested when an override names one of them.
_COMMON_NAMES = {"learning_rate": "train.lr", "lr_warmup_steps": "train.warmup_steps",
                 "batch_size": "train.global_batch", "max_steps": "train.steps",
                 "num_steps": "train.steps", "seq_length": "train.seq_len",
                 "max_seq_len": "train.seq_len", "gradient_accumulation_steps": "train.microbatches"}


def declared_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key the config declares (`train.lr`, `data.sources.code.kind`, ...)."""
    keys = []
    for name, value in config.items():
        keys.append(f"{prefix}{name}")
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            keys += declared_keys(value, f"{prefix}{name}.")
    return keys


def check_override(config: ml_collections.ConfigDict, dotted: str, value: str = "...") -> None:
    """ConfigError for an override (`--config.<dotted>=<value>`) of a key the config does not
    declare, with the closest declared keys; a new data.mix entry is shown in the dict form."""
    node, parents = config, []
    for part in dotted.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
            node, parents = node[part], [*parents, part]
            continue
        section = ".".join(parents)
        if section == "data.mix":
            mix = {**config.data.mix, part: value}
            mix_text = "{" + ", ".join(f"'{k}': {v}" for k, v in mix.items()) + "}"
            raise ConfigError(
                f"--config.{dotted}: data.mix has no entry {part!r} to override; a new source "
                f"joins the mix as a whole dict: --config.data.mix=\"{mix_text}\" (and declare "
                f"data.sources.{part}).")
        raise ConfigError(f"--config.{dotted}: no such key; {_suggest(config, dotted, section)}")


def _suggest(config: ml_collections.ConfigDict, dotted: str, section: str) -> str:
    """'did you mean ...?' from the declared keys, else the keys of the deepest section that exists."""
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(dotted, declared_keys(config), n=3, cutoff=0.75)
    if leaf in _COMMON_NAMES:
        close = [_COMMON_NAMES[leaf], *close]
    if close:
        return f"did you mean {' or '.join(f'--config.{key}' for key in dict.fromkeys(close))}?"
    node = config
    for part in section.split(".") if section else []:
        node = node[part]
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
        return f"{section} is a value, not a section."
    return f"{section or 'the config'} declares {', '.join(sorted(node))}."


def check_families(value: str, key: str) -> None:
    """Refuses a families key that names no known exercise family, in one line."""
    try:
        synthetic.parse_families(value, key)
    except ValueError as error:
        raise ConfigError(str(error)) from None
