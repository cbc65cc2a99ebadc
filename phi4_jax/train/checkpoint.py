"""Orbax checkpoints of the whole run: train state, data-iterator state and run metadata.

Saves are asynchronous; only complete checkpoints are ever listed, so a run killed during
a save resumes from the newest complete one. Restoring takes an abstract target carrying
the *current* mesh's shardings, so a run can resume on a different mesh shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last `keep` checkpoints of `directory`, saving every `every_steps`."""

    def __init__(self, directory: str, *, keep: int, every_steps: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once the cluster announced a preemption."""
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, *,
             force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
        """Restores the state onto the shardings in `abstract_state`; the iterator in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def latest_complete_step(directory: str | Path) -> int | None:
    """The newest complete checkpoint step under a checkpoints directory, read-only."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(os.path.abspath(directory), options=options) as manager:
        return manager.latest_step()


def saved_param_shapes(step_dir: str | Path) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter path -> shape of one checkpoint step, read from its metadata alone."""
    tree = ocp.PyTreeCheckpointer().metadata(Path(step_dir) / "state").item_metadata.tree
    flat = {}

    def visit(prefix, node):
        if isinstance(node, dict):
            for key, child in node.items():
                visit((*prefix, str(key)), child)
        else:
            flat[prefix] = tuple(node.shape)

    visit((), tree["params"])
    return flat


def restore_params(step_dir: str | Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint step, placed on `abstract_params`' shardings (any
    mesh); the optimizer state and data position are left on disk."""
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return ocp.PyTreeCheckpointer().restore(Path(step_dir) / "state", args=args)["params"]
