"""Where a run's starting parameters come from: `init_from` names a phi4_jax checkpoint (a
run's workdir, its `checkpoints/` folder or one step folder) or a `microsoft/phi-4`-format
Hugging Face directory; empty means a fresh initialization.

Only parameters are taken: the optimizer, schedule and data position start afresh. They are
restored onto the current run's mesh, whatever mesh saved them, and the current model
config (a new RoPE base, say) applies to them. `locate` and `check` run at start-up and read
metadata and checksums only, so a missing path, a damaged checkpoint or one of another size
is refused before anything is allocated or compiled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from phi4_jax.config_base import ConfigError
from phi4_jax.errors import require
from phi4_jax.interop import hf_checkpoint as hf
from phi4_jax.model.config import ModelConfig
from phi4_jax.train import checkpoint


@dataclasses.dataclass(frozen=True)
class InitialCheckpoint:
    """A located checkpoint: `kind` is 'phi4' (a step folder) or 'hf' (a model directory)."""

    kind: str
    path: Path


def require_whole_trained_model(config: Any, tool: str) -> None:
    """What a tool that decodes one trained model (evaluation, Pivotal Token Search) needs of
    the config, checked at start-up: no adapters to route, a checkpoint, no sequence split."""
    require(config.lora.rank == 0, "lora.rank", config.lora.rank,
            f"{tool} runs one whole model and routes no adapters; merge the adapter (python -m "
            f"phi4_jax.export --adapter=NAME), point --config.init_from at the export and set "
            f"lora.rank=0.")
    require(bool(config.init_from), "init_from", config.init_from,
            f"{tool} needs a trained model; set --config.init_from to a run's workdir, a step "
            f"folder or a Hugging Face directory.")
    require(config.mesh.sequence == 1, "mesh.sequence", config.mesh.sequence,
            f"{tool} decodes, and decoding does not split rows over a sequence axis; set "
            f"--config.mesh.sequence=1.")


def locate(init_from: str) -> InitialCheckpoint | None:
    """The checkpoint `init_from` names, or None for a fresh start; ConfigError if none is there."""
    if not init_from:
        return None
    path = Path(init_from).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"init_from={init_from!r}: no such directory; give a phi4_jax workdir, its "
            f"checkpoints/ folder, one step folder in it, or a Hugging Face model directory.")
    if (path / hf.SINGLE_FILE).is_file() or (path / hf.INDEX_FILE).is_file():
        return InitialCheckpoint("hf", path)
    if (path / "state").is_dir():
        return InitialCheckpoint("phi4", path)
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and (step := _latest_step(folder)) is not None:
            return InitialCheckpoint("phi4", folder / str(step))
    raise ConfigError(
        f"init_from={init_from!r} holds no complete checkpoint (no step folder with a saved "
        f"state, no {hf.SINGLE_FILE} or {hf.INDEX_FILE}); point it at a finished run's workdir "
        f"or a Hugging Face model directory.")


def _latest_step(folder: Path) -> int | None:
    if not any(child.name.isdigit() for child in folder.iterdir()):
        return None
    return checkpoint.latest_complete_step(folder)


def check(source: InitialCheckpoint, abstract_params: Any, model_cfg: ModelConfig) -> None:
    """Refuses a damaged checkpoint, or one whose parameters do not have the run's shapes."""
    if source.kind == "hf":
        try:
            hf.check_hf_checkpoint(source.path, model_cfg)
        except hf.HFCheckpointError as error:
            raise ConfigError(f"init_from={str(source.path)!r} does not fit model.size="
                              f"{model_cfg.name!r}: {error}") from error
        return
    if problem := checkpoint.damage(source.path, verify=True):
        raise ConfigError(
            f"init_from={str(source.path)!r} is a damaged checkpoint ({problem}); point init_from "
            f"at another step folder of that run.")
    saved = checkpoint.saved_param_shapes(source.path)
    wanted = {path: tuple(leaf.shape) for path, leaf in _flat(abstract_params).items()}
    for name in sorted(set(wanted) | set(saved)):
        if saved.get(name) != wanted.get(name):
            raise ConfigError(
                f"init_from={str(source.path)!r} does not fit model.size={model_cfg.name!r}: "
                f"parameter {'/'.join(name)} is {saved.get(name, 'absent')} there and "
                f"{wanted.get(name, 'absent')} here; set model.size to the size it was "
                f"trained at.")


def load(source: InitialCheckpoint, abstract_params: Any, model_cfg: ModelConfig) -> Any:
    """The checkpoint's parameters as a pure dict, each placed on its target sharding."""
    if source.kind == "phi4":
        return checkpoint.restore_params(source.path, abstract_params)
    shardings = nnx.State(jax.tree.map(lambda leaf: leaf.sharding, abstract_params))
    dtype = (model_cfg.lora.backbone_dtype or None) if model_cfg.lora else None
    state = hf.load_hf_checkpoint(source.path, model_cfg, dtype=dtype, shardings=shardings)
    return nnx.to_pure_dict(state)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    """Path (tuple of keys) -> leaf of a nested dict."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(key.key) for key in path): leaf for path, leaf in leaves}
