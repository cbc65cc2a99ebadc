"""The training stages, by the name `config.stage` gives them; each runs on the one engine."""

from __future__ import annotations

import ml_collections

from phi4_jax.config_base import ConfigError
from phi4_jax.stages.dpo import DPO
from phi4_jax.stages.grpo import GRPO
from phi4_jax.stages.pretrain import Pretrain
from phi4_jax.stages.sft import SFT
from phi4_jax.train import loop
from phi4_jax.train.stage import Stage

# Stage objects are built per run: they hold host-side counters and precomputed scores.
STAGES: dict[str, type[Stage]] = {"pretrain": Pretrain, "sft": SFT, "dpo": DPO, "grpo": GRPO}


def stage_for(config: ml_collections.ConfigDict) -> Stage:
    if config.stage not in STAGES:
        raise ConfigError(f"stage={config.stage!r}: choose one of {', '.join(STAGES)}.")
    return STAGES[config.stage]()


def run(config: ml_collections.ConfigDict, workdir: str,
        stop_at_step: int | None = None) -> list[dict[str, float]]:
    """Trains the stage `config.stage` names; see `train.loop.train`."""
    return loop.train(config, workdir, stage_for(config), stop_at_step)
