"""The argument of every `configs/*.py` `get_config(arg)`: `--config=FILE:PART,PART,...`.

Each comma-separated part names one choice from one group (a size, a loss, a round, ...),
at most one per group, in any order (`configs/dpo.py:tiny,pts` = `pts,tiny`); a missing
group is None. An unknown part or two parts of one group is a one-line error that lists
the choices, so a typo never silently picks the paper's 14B recipe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from phi4_jax.errors import Phi4Error

# The research sizes every stage config accepts; their settings are configs/pretrain.py's.
RESEARCH_SIZES: tuple[str, ...] = ("tiny", "toy", "125m", "1b", "14b-4l")
# The sizes that train on a CPU in minutes, with one set of settings: tiny on Phi-4's
# tokenizer (the quick start), toy on the 512-id `bytes` one (tests, CPU experiments).
CPU_SIZES: tuple[str, ...] = ("tiny", "toy")
# Bytes per Phi-4 token of the built-in conversations, rounded up (measured 2.7 to 3.9).
BYTES_PER_TOKEN = 4


def text_tokens(size: str, tokens: int) -> int:
    """A length that holds, at `size`, the text `tokens` Phi-4 tokens hold: toy's byte tokens
    need BYTES_PER_TOKEN times as many, or chat rows would not fit and be dropped."""
    return tokens * BYTES_PER_TOKEN if size == "toy" else tokens


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
