"""What `config.stage` names: a training stage, which runs on the one engine, or a job that
trains nothing (Pivotal Token Search), which runs on its own; `run` starts either.

A stage is a module with `build(config, model_cfg) -> train.stage.Stage`; adding one is a
line in `STAGES` (README, "Adding a stage").
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from phi4_jax.config_base import ConfigError
from phi4_jax.model.config import ModelConfig
from phi4_jax.search import job as pts_job
from phi4_jax.stages import dpo, grpo, pretrain, sft
from phi4_jax.train import loop
from phi4_jax.train.stage import Stage

Builder = Callable[[ml_collections.ConfigDict, ModelConfig], Stage]

STAGES: dict[str, Builder] = {"pretrain": pretrain.build, "sft": sft.build, "dpo": dpo.build,
                              "grpo": grpo.build}
# Jobs that train nothing: name -> (check(config, model_cfg) of its sections,
# runner(config, workdir) -> a list of result dicts).
JOBS: dict[str, tuple[Callable[[ml_collections.ConfigDict, ModelConfig], None],
                      Callable[[ml_collections.ConfigDict, str], list[dict]]]] = {
    "pts_search": (pts_job.check, pts_job.run)}


def builder_for(config: ml_collections.ConfigDict) -> Builder:
    if config.stage not in STAGES:
        raise ConfigError(f"stage={config.stage!r}: choose one of "
                          f"{', '.join([*STAGES, *JOBS])}.")
    return STAGES[config.stage]


def check_sections(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
    """The stage's or job's own sections checked as its start-up checks them (a stage is built,
    which loads nothing): launchers refuse a run that cannot start before it is queued."""
    if config.stage in JOBS:
        JOBS[config.stage][0](config, model_cfg)
    else:
        builder_for(config)(config, model_cfg)


def run(config: ml_collections.ConfigDict, workdir: str,
        stop_at_step: int | None = None) -> list[dict[str, float]]:
    """Runs the job `config.stage` names, or trains the stage it names (see
    `train.loop.train`; `stop_at_step` applies to training only)."""
    if config.stage in JOBS:
        return JOBS[config.stage][1](config, workdir)
    return loop.train(config, workdir, builder_for(config), stop_at_step)
