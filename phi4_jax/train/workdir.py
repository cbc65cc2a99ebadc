"""The run's folder, checked before anything is built: it must be a folder (or not exist yet)
and writable. It holds `checkpoints/`, `tensorboard/` and `logs/` (the full log of each
process); remote folders (`gs://...`) are left to the storage client.
"""

from __future__ import annotations

import os
import tempfile

from phi4_jax.errors import Phi4Error


class WorkdirError(Phi4Error, OSError):
    """A --workdir that a run cannot write to; the message says why and what to do."""


def prepare(workdir: str) -> str:
    """Creates `workdir` if needed and proves it writable; returns it. WorkdirError otherwise."""
    if "://" in workdir:
        return workdir
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder; give a folder "
                           f"(new or from an earlier run) for checkpoints and logs.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise WorkdirError(f"--workdir={workdir} is not writable ({error.strerror or error}); "
                           f"fix its permissions or choose another folder.") from error
    return path


def log_path(workdir: str, process_index: int) -> str | None:
    """Where process `process_index` writes its full log, or None for a remote workdir."""
    if "://" in workdir:
        return None
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "logs",
                        f"process_{process_index}.log")
