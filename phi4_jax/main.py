r"""Runs a phi4_jax stage: `python -m phi4_jax.main --config=configs/<stage>.py[:arg] --workdir=DIR`.

The stage is chosen by the config (`config.stage`). Overrides use ml_collections syntax,
e.g. `--config.data.mix.synthetic=0.5`. `--print_mixture` prints the data-mixture table
(weights, tokens per source over the run, unique tokens, epochs) and exits.

A mistake the user can fix (a config key, a data file, the workdir, a damaged checkpoint)
is printed as one line, `error: ...`, exit status 1, and written with its traceback to the
workdir's log; `--verbose` (or PHI4_VERBOSE=1) also shows the traceback and other libraries'
INFO logs on the console. Ctrl-C saves a checkpoint and exits; a
second Ctrl-C aborts (exit status 130).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. "
                                          "configs/pretrain.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard.")
_PRINT_MIXTURE = flags.DEFINE_bool("print_mixture", False,
                                   "Print the data-mixture report and exit without training.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks and other libraries' INFO logs "
                             "on the console (also PHI4_VERBOSE=1).")


def _verbose() -> bool:
    return _VERBOSE.value or os.environ.get("PHI4_VERBOSE", "") not in ("", "0")


def main(argv: list[str]) -> int:
    del argv
    from phi4_jax.errors import Phi4Error  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import metrics  # pylint: disable=g-import-not-at-top

    metrics.configure_console(_verbose())
    try:
        return _run()
    except Phi4Error as error:
        if _verbose():
            traceback.print_exc()
        return _report(f"error: {error}", 1)
    except KeyboardInterrupt:
        return _report("error: aborted (Ctrl-C); nothing was saved since the last checkpoint. "
                       "The same command resumes from it.", 130)


def _report(line: str, status: int) -> int:
    """Prints the final error line, and writes it (with its traceback) to the workdir's log."""
    from phi4_jax.train import metrics  # pylint: disable=g-import-not-at-top

    logging.error("%s", line, exc_info=True, extra=metrics.NOT_ON_CONSOLE)
    print(line, file=sys.stderr)
    return status


def _run() -> int:
    """Workdir check, distributed start-up, the log file, then the stage."""
    from phi4_jax.data import mixture  # pylint: disable=g-import-not-at-top
    from phi4_jax.train import metrics, workdir  # pylint: disable=g-import-not-at-top

    config = _CONFIG.value
    if _PRINT_MIXTURE.value:
        t = config.train
        print(mixture.mixture_report(config.data, total_tokens=t.steps * t.global_batch * t.seq_len))
        return 0
    if not _WORKDIR.value:
        raise workdir.WorkdirError("--workdir is required to train: give a folder for checkpoints "
                                   "and logs (a new one, or an earlier run's to resume it).")
    workdir.prepare(_WORKDIR.value)  # before anything is built
    from phi4_jax.train import host_memory  # pylint: disable=g-import-not-at-top

    kept = host_memory.keep_freed_memory()  # before any backend
    from phi4_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize_distributed()  # before anything touches a JAX backend
    import jax  # pylint: disable=g-import-not-at-top

    from phi4_jax import stages  # pylint: disable=g-import-not-at-top

    metrics.log_to_file(workdir.log_path(_WORKDIR.value, jax.process_index()))
    logging.info("Command: %s", " ".join(sys.argv), extra=metrics.NOT_ON_CONSOLE)
    if kept:
        logging.info("CPU run: freed host memory is kept for reuse (%s=0 turns this off).",
                     host_memory.OPT_OUT_VAR, extra=metrics.NOT_ON_CONSOLE)
    stages.run(config, _WORKDIR.value)
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad --config file or override is reported in one line, before
    any folder is created or the distributed runtime starts."""
    if problem := _config_file_problem(_config_spec(argv)):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    try:
        parsed = flags.FLAGS(argv)
        if _CONFIG.value is not None:  # a file that failed to load raises only when read
            _CONFIG.value.get("stage")
        return parsed
    except (AttributeError, KeyError, OSError, flags.Error) as error:
        print(f"error: {_flag_problem(argv, error)}", file=sys.stderr)
        sys.exit(1)


def _config_spec(argv: list[str]) -> str | None:
    """The value of --config (`FILE[:ARG]`), or None when it is not given."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    return spec


def _config_file_problem(spec: str | None) -> str | None:
    """A --config whose file does not exist, with the stage configs to choose from."""
    if spec is None or os.path.isfile(spec.split(":", 1)[0]):
        return None
    from phi4_jax import config_base  # pylint: disable=g-import-not-at-top

    choices = ", ".join(sorted(p.name for p in config_base.REPO_CONFIGS.glob("*.py")))
    return (f"--config={spec}: no such file {spec.split(':', 1)[0]!r} (relative to "
            f"{os.getcwd()}); the stage configs in {config_base.REPO_CONFIGS} are {choices}.")


def _flag_problem(argv: list[str], error: BaseException) -> str:
    """The override that names an undeclared key (with suggestions), else the error's last line."""
    from phi4_jax import config_base  # pylint: disable=g-import-not-at-top

    last_line = ([line.strip() for line in str(error).splitlines() if line.strip()] or [""])[-1]
    spec = _config_spec(argv)
    try:
        config = config_base.load_config(spec) if spec else None
    except Exception as load_error:  # pylint: disable=broad-except
        lines = [line for line in traceback.format_exception_only(load_error) if line.strip()]
        return f"--config={spec}: {lines[-1].strip()}"
    for arg in argv:
        if config is not None and arg.startswith("--config."):
            dotted, _, value = arg[len("--config."):].partition("=")
            try:
                config_base.check_override(config, dotted, value or "...")
            except config_base.ConfigError as unknown:
                return str(unknown)
    return last_line


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)
