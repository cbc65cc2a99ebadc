"""Orbax checkpoints of the whole run (train state, data-iterator state, run metadata) that a
run can trust.

Saves are asynchronous and atomic: orbax writes `<step>.orbax-checkpoint-tmp` and renames it
to `<step>` once every process has written its part. Just before the rename, process 0 (the
only one orbax runs its commit hook on, after all processes have written) reads every file of
the checkpoint back and writes a manifest of their sizes and CRC-32 checksums into it
(`MANIFEST`). This runs in orbax's background thread (zlib releases the GIL), so an
asynchronous save still overlaps training; on several hosts the checkpoint folder is shared
storage, which process 0 reads whole. A file truncated or lost later is found by a `stat`;
same-size damage by its checksum.

At start-up (`Checkpointer`) every step folder is checked (`damage`): orbax's commit marker,
its metadata, every item and each process's data-iterator file, and the manifest's sizes;
then the newest of those is verified against its checksums (`verify`), and the one before it
if that fails, until one passes, as that one is the step the run will trust. Only intact
checkpoints are candidates for restore and count toward `keep`. A damaged one among or newer
than the `keep` newest intact ones is reported in one line and moved to
`<checkpoints>.damaged/`, never deleted; older damaged ones (a deletion orbax had begun when
the run stopped) and temporary folders of saves that never finished are removed. Restored
parameters are checked finite. Checkpoints saved before checksums existed (a manifest of
sizes only) pass on their sizes and are reported as not verified.

A save that cannot complete (no permission, full disk) raises `CheckpointSaveError` within
a step of the failure, naming the folder and the cause, with the previous checkpoint intact.
Restoring takes an abstract target carrying the *current* mesh's shardings, so a run can
resume on a different mesh shape. Checkpoints on remote storage (`gs://...`) are left to
orbax's own commit protocol: the checks here read local folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from phi4_jax.errors import Phi4Error

ITEMS = ("state", "data", "meta")
MANIFEST = "phi4_manifest.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
CHUNK_BYTES = 1 << 20  # read size of the checksums: a constant memory cost


class CheckpointError(Phi4Error, RuntimeError):
    """A checkpoint that cannot be restored; the message names it and what to do."""


class CheckpointSaveError(Phi4Error, RuntimeError):
    """A save that could not complete; the previous checkpoint is intact."""


def _is_local(directory: str | Path) -> bool:
    return "://" not in str(directory)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class Checkpointer:
    """Keeps the last `keep` intact checkpoints of `directory`, saving every `every_steps`."""

    def __init__(self, directory: str, *, keep: int, every_steps: int, async_save: bool = True):
        self.directory = os.path.abspath(directory) if _is_local(directory) else directory
        self.async_save = async_save
        self._saving: int | None = None  # the step of a save not yet known to be complete
        self._failed = False
        if _is_local(self.directory):
            if jax.process_index() == 0:
                clean(self.directory, keep)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("phi4_jax checkpoint clean-up")
        # Always orbax's asynchronous checkpointer: its hook writes the manifest before the
        # commit; a synchronous save is a save followed by a wait.
        async_options = ocp.AsyncOptions(post_finalization_callback=self._write_manifest,
                                         create_directories_asynchronously=False)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps, create=True,
            enable_async_checkpointing=True, async_options=async_options)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
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
        """Starts saving `step` (waiting for the previous save first); CheckpointSaveError if
        that one failed or this one cannot start."""
        self.wait()  # orbax would wait too; this names the failed step if the last save failed
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  meta=ocp.args.JsonSave(meta))
        try:
            started = self.manager.save(step, args=args, force=force)
        except Exception as error:  # any failure to save must stop the run, clearly
            raise self._save_error(step, error) from error
        if started:
            self._saving = step
            if not self.async_save:
                self.wait()
        return started

    def check(self) -> None:
        """Raises CheckpointSaveError once a background save has failed; logs one line when one
        has completed. Cheap: the loop calls it every step."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()  # returns at once: the save is over

    def _save_error(self, step: int, error: BaseException) -> CheckpointSaveError:
        self._failed = True
        latest = [s for s in self.manager.all_steps() if s != step]
        previous = (f"the checkpoint at step {max(latest)} is intact and the run resumes from "
                    f"it" if latest else "no earlier checkpoint exists")
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} in {self.directory} failed ({_first_line(error)}); "
            f"{previous}. Free space or fix permissions there (or choose another --workdir), "
            f"then run again.")

    def _write_manifest(self) -> None:
        """Records the size and checksum of every file of the save in progress, just before
        orbax commits it (on process 0, after every process has written its part)."""
        if not _is_local(self.directory):
            return
        for folder in Path(self.directory).glob(f"*{TMP_MARKER}*"):  # the one save in flight
            files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": crc32(p)}
                     for item in ITEMS for p in (folder / item).rglob("*") if p.is_file()}
            with open(folder / MANIFEST, "w") as f:
                json.dump({"files": files}, f, indent=0, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())

    def latest_verdict(self) -> str:
        """The newest checkpoint and whether its files still match their checksums, read now:
        what a message may promise about it."""
        step = self.latest_step()
        if step is None:
            return "No checkpoint was saved yet"
        if not _is_local(self.directory):
            return f"The newest checkpoint ({step}, remote storage) is not verified here"
        step_dir = Path(self.directory) / str(step)
        if problem := damage(step_dir, verify=True):
            return (f"The newest checkpoint ({step}) is damaged ({problem}) and will be moved "
                    f"aside on resume")
        if not has_checksums(step_dir):
            return (f"The newest checkpoint ({step}) has no checksums (saved by an older "
                    f"phi4_jax), so it is not verified")
        return f"The newest checkpoint ({step}) is intact (its checksums verified just now)"

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
        """Restores the state onto the shardings in `abstract_state`; the iterator in place."""
        step_dir = Path(self.directory) / str(step)
        _check_param_shapes(step_dir, abstract_state.params)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(
                                      _TupleSlicesRestore(data_iterator)),
                                  meta=ocp.args.JsonRestore())
        move_aside = (f"move it aside (mkdir -p {self.directory}.damaged && mv {step_dir} "
                      f"{self.directory}.damaged/) to resume from the one before it.")
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as error:  # it passed the start-up checks: report, do not guess
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} cannot be restored "
                f"({_first_line(error)}); {move_aside}") from error
        if bad := non_finite(restored.state.params):
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} holds non-finite values "
                f"(NaN or Inf) in parameter {bad}; {move_aside}")
        return restored.state, restored.meta

    def wait(self) -> None:
        """Waits for the save in progress; CheckpointSaveError if it fails."""
        if self._failed:
            return
        if self._saving is not None:
            step, self._saving = self._saving, None
            try:
                self.manager.wait_until_finished()
            except Exception as error:
                raise self._save_error(step, error) from error
            logging.info("Checkpoint saved: step %d in %s", step, self.directory)

    def close(self) -> None:
        """Closes the manager; a failure already reported is not raised again."""
        try:
            self.manager.close()
        except Exception:  # pylint: disable=broad-except
            if not self._failed:
                raise


class _TupleSlicesRestore:
    """Restores a grain iterator from its JSON state with the packer's slices as tuples again.

    grain (0.2.18) compares `ConcatThenSplit`'s saved `remainder_slices` with the tuple
    (-1, -1), but JSON gives lists back, so a checkpoint taken when a source's packer held no
    remainder resumed one document off. grain's handler passes a non-iterator item the raw
    JSON text, which this parses and repairs.
    """

    def __init__(self, iterator: Any):
        self._iterator = iterator

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(_tuple_slices(json.loads(state)))

    def start_prefetch(self) -> None:
        self._iterator.start_prefetch()


def _tuple_slices(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: ({name: tuple(piece) for name, piece in value.items()}
                      if key == "remainder_slices" else _tuple_slices(value))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_tuple_slices(value) for value in node]
    return node


def non_finite(params: Any) -> str | None:
    """The path of the first floating-point parameter holding a NaN or an Inf, or None."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    floats = [(path, leaf) for path, leaf in flat if jnp.issubdtype(leaf.dtype, jnp.floating)]
    finite = jax.device_get(jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])(
        [leaf for _, leaf in floats]))
    return next(("/".join(str(getattr(k, "key", k)) for k in path)
                 for (path, _), ok in zip(floats, finite) if not ok), None)


def crc32(path: Path) -> str:
    """The CRC-32 of a file, read in chunks (it detects damage, not tampering)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def damage(step_dir: Path, *, verify: bool = False) -> str | None:
    """What is wrong with a step folder, or None when it is a complete checkpoint; `verify`
    also reads every file against its checksum."""
    problem = next((problem for problem in _problems(step_dir) if problem), None)
    if problem is None and verify:
        problem = _checksum_problem(step_dir)
    return problem


def _problems(step_dir: Path):
    """Each check's finding (None when it passes), cheapest first, computed as asked for."""
    yield None if (step_dir / COMMIT_MARKER).is_file() else (
        f"no {COMMIT_MARKER} (a save or a deletion that did not finish)")
    yield _json_problem(step_dir / STEP_METADATA)
    for item in ITEMS:
        yield None if (step_dir / item).is_dir() else f"its {item}/ folder is missing"
    yield _json_problem(step_dir / "state" / "_METADATA")
    yield None if (step_dir / "state" / "manifest.ocdbt").is_file() else (
        "state/manifest.ocdbt is missing")
    yield _json_problem(step_dir / "meta" / "metadata")
    yield _iterator_problem(step_dir)
    yield _size_problem(step_dir)


def _json_problem(path: Path) -> str | None:
    rel = f"{path.parent.name}/{path.name}" if path.parent.name in ITEMS else path.name
    if not path.is_file():
        return f"{rel} is missing"
    try:
        json.loads(path.read_bytes() or b"<empty>")
    except (ValueError, UnicodeDecodeError):
        return f"{rel} is {'empty' if path.stat().st_size == 0 else 'not valid JSON'}"
    return None


def _iterator_problem(step_dir: Path) -> str | None:
    """Each process that saved the checkpoint left one data-iterator file (process_i-of-n.json)."""
    names = sorted(p.name for p in (step_dir / "data").glob("process_*-of-*.json"))
    if not names:
        return "data/ holds no data-iterator file"
    count = int(names[0].rsplit("-of-", 1)[1].split(".")[0])
    for i in range(count):
        if problem := _json_problem(step_dir / "data" / f"process_{i}-of-{count}.json"):
            return f"{problem} (the data-iterator state of process {i})"
    return None


def _manifest(step_dir: Path) -> dict[str, dict] | None:
    """Relative path -> {"bytes", "crc32" (absent in manifests of sizes only)}; None without a
    manifest (checkpoints saved before manifests existed); ValueError if unreadable."""
    if not (step_dir / MANIFEST).is_file():
        return None
    saved = json.loads((step_dir / MANIFEST).read_text())
    if "files" in saved:
        return saved["files"]
    return {rel: {"bytes": size} for rel, size in saved.items()}  # sizes only


def has_checksums(step_dir: Path) -> bool:
    """Whether a step's manifest records checksums (saved by this version or later)."""
    try:
        files = _manifest(step_dir)
    except ValueError:
        return False
    return bool(files) and all("crc32" in entry for entry in files.values())


def _size_problem(step_dir: Path) -> str | None:
    """A file of the manifest missing or of another size than saved (checkpoints saved before
    manifests existed have only the other checks)."""
    try:
        files = _manifest(step_dir)
    except ValueError:
        return f"{MANIFEST} is not valid JSON"
    if files is None:
        return None
    for rel, size in sorted((rel, entry["bytes"]) for rel, entry in files.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} is {path.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
    return None


def _checksum_problem(step_dir: Path) -> str | None:
    """A file whose content no longer matches its checksum (same-size damage); run after the
    cheap checks passed, so the manifest is readable and every file has its size."""
    for rel, entry in sorted(_manifest(step_dir).items() if has_checksums(step_dir) else []):
        if (actual := crc32(step_dir / rel)) != entry["crc32"]:
            return f"{rel} has checksum {actual}, {entry['crc32']} when saved (its content changed)"
    return None


def step_folders(directory: str | Path) -> dict[int, Path]:
    """Step number -> folder of every committed-looking step folder (a plain number)."""
    folder = Path(directory)
    if not folder.is_dir():
        return {}
    return {int(p.name): p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()}


def intact_steps(directory: str | Path) -> list[int]:
    """The steps of `directory` that pass `damage`'s cheap checks, oldest first; read-only."""
    return sorted(s for s, p in step_folders(directory).items() if damage(p) is None)


def _problems_verified(folder: Path) -> dict[int, str | None]:
    """Step -> its problem (None if intact): the cheap checks on every step, the checksums on
    the newest intact one, and on the one before it while they fail."""
    problems = {s: damage(p) for s, p in step_folders(folder).items()}
    for step in sorted((s for s, problem in problems.items() if problem is None), reverse=True):
        problems[step] = _checksum_problem(folder / str(step))
        if problems[step] is None:
            break
    return problems


def clean(directory: str | Path, keep: int) -> None:
    """Makes a checkpoints folder hold only intact checkpoints: damaged ones moved aside (or
    removed when older than the `keep` newest intact ones), unfinished saves removed."""
    folder = Path(directory)
    if not folder.is_dir():
        return
    for tmp in sorted(p for p in folder.iterdir() if TMP_MARKER in p.name):
        logging.warning("Removing %s: a checkpoint save that never finished.", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    problems = _problems_verified(folder)
    intact = sorted(s for s, problem in problems.items() if problem is None)
    oldest_kept = intact[-keep] if len(intact) >= keep else -1
    for step, problem in sorted(problems.items()):
        if problem is None:
            continue
        if step < oldest_kept:
            logging.warning("Removing incomplete checkpoint %s (%s): older than the %d kept, "
                            "it was being deleted.", folder / str(step), problem, keep)
            shutil.rmtree(folder / str(step), ignore_errors=True)
        else:
            aside = _aside(folder, step)
            logging.warning("Checkpoint at step %d is damaged (%s): moved to %s; %s", step,
                            problem, aside, f"resuming from step {intact[-1]}" if intact else
                            "no intact checkpoint is left, so the run starts afresh")
            aside.parent.mkdir(exist_ok=True)
            os.replace(folder / str(step), aside)


def _aside(folder: Path, step: int) -> Path:
    """A free name for a damaged step in `<checkpoints>.damaged/`."""
    parent = folder.parent / f"{folder.name}.damaged"
    candidate, n = parent / str(step), 1
    while candidate.exists():
        candidate, n = parent / f"{step}-{n}", n + 1
    return candidate


def latest_complete_step(directory: str | Path) -> int | None:
    """The newest intact checkpoint step under a checkpoints directory, read-only."""
    steps = intact_steps(directory)
    return steps[-1] if steps else None


def saved_param_shapes(step_dir: str | Path) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter path -> shape of one checkpoint step, read from its metadata alone (through
    the handler: a checkpointer would also look for step metadata in `state/`, which only the
    step folder has, and warn on every resume)."""
    tree = ocp.PyTreeCheckpointHandler().metadata(Path(step_dir) / "state").tree
    flat = {}

    def visit(prefix, node):
        if isinstance(node, dict):
            for key, child in node.items():
                visit((*prefix, str(key)), child)
        else:
            flat[prefix] = tuple(node.shape)

    visit((), tree["params"])
    return flat


def _check_param_shapes(step_dir: Path, abstract_params: Any) -> None:
    """A checkpoint of another model size is a config mistake, not damage: say so."""
    saved = saved_param_shapes(step_dir)
    wanted = {tuple(str(k.key) for k in path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name) != wanted.get(name):
            raise CheckpointError(
                f"the checkpoint at step {step_dir.name} in {step_dir.parent} holds parameter "
                f"{'/'.join(name)} of shape {saved.get(name, 'absent')}, this config's model "
                f"{wanted.get(name, 'absent')}: resume with the config that wrote it, or use "
                f"another --workdir.")


def saved_meta(step_dir: str | Path) -> dict:
    """The run metadata a step saved (seed, the model config, the backbone's source), read
    from its JSON alone."""
    return json.loads((Path(step_dir) / "meta" / "metadata").read_text())


def restore_params(step_dir: str | Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint step, placed on `abstract_params`' shardings (any
    mesh); the optimizer state and data position are left on disk."""
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return ocp.PyTreeCheckpointer().restore(Path(step_dir) / "state", args=args)["params"]
