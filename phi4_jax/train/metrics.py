"""Where a run's output goes: a quiet console (a progress bar with loss, tokens/s and ETA, one
line per log step, checkpoint and warning), the full log in the workdir, and TensorBoard event
files, written by process 0.

The console shows phi4_jax's own messages and other libraries' warnings, without their
tracebacks; other libraries' INFO lines (orbax, JAX, grain), every record of orbax and asyncio
(a failed save's errors from each of its threads: phi4_jax reports the failure in one line),
exceptions raised where Python cannot deliver them (`sys.unraisablehook`: tensorstore's
callbacks into a closed event loop after a failed save) and every traceback go to
`<workdir>/logs/process_<i>.log` only, unless `verbose` (`--verbose` or PHI4_VERBOSE=1).
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import tqdm
from tensorboardX import SummaryWriter

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMAT = "%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s"
FILE_FORMAT = "%(levelname).1s%(asctime)s %(process)d %(name)s %(filename)s:%(lineno)d] %(message)s"
NOT_ON_CONSOLE = {"console": False}  # `extra=` for records already shown another way


QUIET_SOURCES = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}")  # log file only


def _is_ours(record: logging.LogRecord) -> bool:
    return record.pathname.startswith(PACKAGE_DIR)


def _is_quiet(record: logging.LogRecord) -> bool:
    return any(source in record.pathname for source in QUIET_SOURCES)


class _Console(logging.Handler):
    """One line per record on stderr, written through tqdm so a progress bar stays whole."""

    def __init__(self, verbose: bool):
        super().__init__(logging.INFO)
        self.verbose = verbose
        self.setFormatter(logging.Formatter(FORMAT, datefmt="%m%d %H:%M:%S"))

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        if self.verbose or _is_ours(record):
            return True
        return record.levelno >= logging.WARNING and not _is_quiet(record)

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatter.formatTime(record, self.formatter.datefmt)
        return self.formatter.formatMessage(record)  # no traceback: the log file has it

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pylint: disable=broad-except
            self.handleError(record)


def configure_console(verbose: bool) -> None:
    """Replaces the root logger's handlers (absl's) with the quiet console; unless `verbose`,
    exceptions Python cannot raise anywhere go to the log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_Console(verbose))
    root.setLevel(logging.INFO)
    sys.unraisablehook = sys.__unraisablehook__ if verbose else _log_unraisable


def _log_unraisable(unraisable) -> None:
    """An exception raised where no caller can take it (a callback, a finalizer): logged to
    the log file only, with its traceback."""
    logging.warning("%s: %s", unraisable.err_msg or "Exception ignored", unraisable.exc_value,
                    exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
                    extra=NOT_ON_CONSOLE)


class _LogFile(logging.FileHandler):
    """The run's log file. A record it cannot write (a full disk) is dropped: logging's
    default would print a traceback on the console for every one, where the run's own error
    line already names the problem."""

    def handleError(self, record: logging.LogRecord) -> None:
        del record


def log_to_file(path: str | None) -> None:
    """Appends every record at INFO and above, tracebacks included, to `path` (None: nowhere)."""
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = _LogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)


class MetricsWriter:
    """Writes scalars to the console/log and `<workdir>/tensorboard`; silent on other hosts."""

    def __init__(self, workdir: str, *, enabled: bool, progress: bool, total_steps: int):
        self.is_lead = jax.process_index() == 0
        self.tensorboard = (SummaryWriter(os.path.join(workdir, "tensorboard"))
                            if enabled and self.is_lead else None)
        self.bar = (tqdm.tqdm(total=total_steps, unit="step", dynamic_ncols=True)
                    if progress and self.is_lead and jax.process_count() == 1 else None)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_lead:
            return
        line = " ".join(f"{k}={_format(v)}" for k, v in sorted(scalars.items()))
        if self.bar is not None:
            self.bar.write(f"step {step}: {line}", file=sys.stderr)
            if "loss" in scalars:
                self.bar.set_postfix({key: _format(scalars[key]) for key in ("loss", "tokens_per_s")
                                      if key in scalars}, refresh=True)
        logging.info("step %d: %s", step, line, extra=NOT_ON_CONSOLE if self.bar else None)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
