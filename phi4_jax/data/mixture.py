"""Mixing sources by tokens, and the mixture report (tokens, unique tokens, implied epochs).

Each source is packed into full rows of `seq_len` tokens on its own, and grain's
`IterDataset.mix` interleaves rows in the normalized weights' proportions by a fixed
schedule; equal-length full rows make row proportions token proportions. The schedule is
deterministic; the seed enters through each source's shuffle (see `pipeline`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any

import grain


@dataclasses.dataclass(frozen=True)
class MixtureRow:
    """One source's share of a run; `epochs` is None when its unique-token count is unknown."""

    source: str
    weight: float
    tokens: float
    unique_tokens: int
    epochs: float | None


def normalized_weights(mix: Mapping[str, Any], source_names: Collection[str]) -> dict[str, float]:
    """The mix's weights divided by their sum, after refusing a mix that cannot be sampled."""
    if not mix:
        example = next(iter(source_names), "name")
        raise ValueError(f"data.mix is empty; give a weight per source, e.g. {{{example!r}: 1.0}}")
    for name, weight in mix.items():
        if name not in source_names:
            raise ValueError(
                f"data.mix.{name} has no source spec; add data.sources.{name} or remove it from the mix "
                f"(sources: {sorted(source_names)})"
            )
        is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not is_number or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"data.mix.{name} is {weight!r}; weights must be finite numbers >= 0")
    total = float(sum(mix.values()))
    if total == 0:
        raise ValueError(
            f"data.mix weights are all zero ({dict(mix)}); give at least one source a positive weight"
        )
    return {name: weight / total for name, weight in mix.items()}


def mix_rows(
    rows_by_source: Mapping[str, grain.IterDataset], weights: Mapping[str, float]
) -> grain.IterDataset:
    """Packed rows of the positive-weight sources, interleaved in the weights' proportions."""
    active = {name: weight for name, weight in weights.items() if weight > 0}
    missing = sorted(set(active) - set(rows_by_source))
    if missing:
        raise ValueError(f"no rows given for sources {missing} that have positive weights")
    return grain.IterDataset.mix({name: rows_by_source[name] for name in active}, active)


def mixture_rows(data_cfg: Mapping[str, Any], total_tokens: int) -> list[MixtureRow]:
    """Per source of `data.mix`: weight, tokens over a run of `total_tokens`, unique tokens, epochs."""
    cfg = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
    sources = cfg["sources"]
    weights = normalized_weights(cfg["mix"], sources)
    rows = []
    for name, weight in weights.items():
        tokens = weight * total_tokens
        unique = int(sources[name].get("unique_tokens", 0))
        rows.append(MixtureRow(name, weight, tokens, unique, tokens / unique if unique else None))
    return rows


def mixture_report(data_cfg: Mapping[str, Any], total_tokens: int) -> str:
    """The mixture as a Markdown table, the Phi-4 report's Table 5 layout (epochs = tokens / unique)."""
    lines = [
        f"mixture over {_count(total_tokens)} tokens",
        "| source | weight | tokens | unique tokens | epochs |",
        "|---|---:|---:|---:|---:|",
    ]
    sources = (data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg))["sources"]
    for row in mixture_rows(data_cfg, total_tokens):
        min_tokens = sources[row.source].get("min_tokens", 0)
        name = f"{row.source} (documents >= {min_tokens} tokens)" if min_tokens else row.source
        unique = _count(row.unique_tokens) if row.unique_tokens else "unknown"
        epochs = f"{row.epochs:.2f}" if row.epochs is not None else "-"
        lines.append(f"| {name} | {row.weight:.3f} | {_count(row.tokens)} | {unique} | {epochs} |")
    return "\n".join(lines)


def _count(n: float) -> str:
    """A token count in K/M/B/T units, three significant digits."""
    n = float(f"{n:.3g}")  # round first, so 999.99...B reads as 1T
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"
