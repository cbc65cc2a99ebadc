"""The argument of every `configs/*.py` `get_config(arg)`: `--config=FILE:PART,PART,...`.

Each comma-separated part names one choice from one group (a size, a loss, a round, ...),
at most one per group, in any order (`configs/dpo.py:tiny,pts` = `pts,tiny`); a missing
group is None. An unknown part or two parts of one group is a one-line error that lists
the choices, so a typo never silently picks the paper's 14B recipe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections

from phi4_jax.errors import Phi4Error

# The research sizes every stage config accepts; their settings are configs/pretrain.py's.
RESEARCH_SIZES: tuple[str, ...] = ("tiny", "toy", "125m", "1b", "14b-4l")
# The sizes that train on a CPU in minutes, with one set of settings: tiny on Phi-4's
# tokenizer (the quick start), toy on the 512-id `bytes` one (tests, CPU experiments).
CPU_SIZES: tuple[str, ...] = ("tiny", "toy")
# Phi-4-mini at the released geometry (`mini`) and at tiny width for CPUs (`mini-tiny`): the
# stage configs that take them (sft, dpo, grpo) build them from the research size they scale
# like, then set the model (config_args.apply_mini).
MINI_SIZES: dict[str, tuple[str | None, str]] = {
    # part: (the size whose settings it takes (None: the paper's recipe), model.size)
    "mini": (None, "phi4-mini"),
    "mini-tiny": ("tiny", "mini-tiny"),
}
# The sizes of the post-training configs (sft, dpo, grpo): the research ones and Phi-4-mini's.
POST_TRAINING_SIZES: tuple[str, ...] = RESEARCH_SIZES + tuple(MINI_SIZES)
# The released Phi-4-mini context: 131072 positions by LongRoPE from an original 4096
# (/work/shared/PHI4_RECIPE.md, model table, "max positions").
MINI_CONTEXT = 131_072
# A CPU step at mini-tiny pays for the 200064-wide head (3x tiny's): half tiny's batch, few
# steps, the head's logits in chunks of 64 positions (200 MB), an 8-problem accuracy check.
MINI_TINY_STEPS = 20
MINI_TINY_BATCH = 4
MINI_TINY_LOSS_CHUNK = 64
# `lora` (any size): adapters on a frozen backbone. Not published for Phi-4-mini's stages, so
# documented defaults: rank 16, alpha 32, every projection, a bf16 backbone off CPU.
LORA = ("lora",)
# Bytes per Phi-4 token of the built-in conversations, rounded up (measured 2.7 to 3.9).
BYTES_PER_TOKEN = 4


def text_tokens(size: str, tokens: int) -> int:
    """A length that holds, at `size`, the text `tokens` Phi-4 tokens hold: toy's byte tokens
    need BYTES_PER_TOKEN times as many, or chat rows would not fit and be dropped."""
    return tokens * BYTES_PER_TOKEN if size == "toy" else tokens


def research_size(size: str | None) -> str | None:
    """The research size (or None) whose settings the chosen size part takes."""
    return MINI_SIZES[size][0] if size in MINI_SIZES else size


def apply_mini(c: ml_collections.ConfigDict, size: str | None) -> None:
    """Puts a `mini` part's model into a built stage config; other sizes are left alone.

    `mini` keeps the stage's paper recipe (Phi-4-mini's post-training numbers are not
    published in PHI4_RECIPE.md) with the released rope base 10000 and 128K context;
    `mini-tiny` keeps tiny's CPU run with fewer steps and a chunked head.
    """
    if size not in MINI_SIZES:
        return
    c.model.size = MINI_SIZES[size][1]
    if size == "mini":
        c.model.update(rope_theta=10_000.0, max_positions=MINI_CONTEXT)
        return
    steps = MINI_TINY_STEPS
    c.train.update(steps=steps, warmup_steps=min(c.train.warmup_steps, steps // 4),
                   global_batch=MINI_TINY_BATCH, loss_chunk_tokens=MINI_TINY_LOSS_CHUNK)
    c.eval.update(every_steps=steps // 2, batches=1,
                  accuracy_problems=min(c.eval.accuracy_problems, 8))
    c.checkpoint.every_steps = steps // 2


def apply_lora(c: ml_collections.ConfigDict, size: str | None) -> None:
    """The `lora` part: rank-16 adapters on every projection of a frozen backbone."""
    c.lora.update(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down"),
                  backbone_dtype="" if research_size(size) in CPU_SIZES else "bfloat16")


class ConfigArgError(Phi4Error, ValueError):
    """A `--config=FILE:ARG` argument that names no known choice; the message lists them."""


def parse_arg(arg: str | None, config: str,
              groups: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
    """{group: the part chosen from it, or None} for `arg`; `config` names the file in errors.

    `groups` maps a group's name to its choices; no choice may sit in two groups.
    """
    owner = {choice: group for group, choices in groups.items() for choice in choices}
    chosen: dict[str, str | None] = dict.fromkeys(groups)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part and arg:
            raise ConfigArgError(f"{config}:{arg} has an empty part; separate choices by single "
                                 f"commas ({_choices(groups)}).")
        if not part:
            continue
        if part not in owner:
            raise ConfigArgError(f"{config}:{arg}: unknown part {part!r}; choose from "
                                 f"{_choices(groups)}, comma-separated (no argument: the "
                                 f"paper's recipe).")
        group = owner[part]
        if chosen[group] is not None:
            raise ConfigArgError(f"{config}:{arg} names two {group} choices "
                                 f"({chosen[group]}, {part}); keep one.")
        chosen[group] = part
    return chosen


def _choices(groups: Mapping[str, Sequence[str]]) -> str:
    """`size (tiny, toy); round (pts, judge)`: every group with its choices."""
    return "; ".join(f"{group} ({', '.join(choices)})" for group, choices in groups.items())
